# Pretraining on a CPU in about 10 minutes (2 cores): a small model whose loss falls clearly in that
# time; its samples are Chinese wiki-like fragments (see the measurement below).
#   python data/prepare.py --input ../shared/data/zhwiki --block_size 256
#   python train.py config/train_config_cpu.py
# Measured here (2 cores of an AMD EPYC, shared with other jobs): 2,000-2,500 tokens/s for this
# model when the machine was quiet (1,330 tokens/s on one core by CPU time), so 300 steps of 4,080
# tokens (1.2M tokens) take about 10 minutes. On zhwiki (block 256, 32k tokenizer) val loss went
# 10.41 -> 7.93 (bits/char 9.13 -> 6.96); samples are wiki-flavoured fragments ("海拔高度",
# "平方公里", dates), not yet sentences: a 32k-token vocabulary needs more tokens than ten CPU
# minutes give. Train longer (--max_iters=2000, about 70 minutes) for sentences. Batch 8 with lr 6e-3 was
# no better per token (val 8.34 vs 8.29 after 408k tokens).
# The 32k-token output layer costs most of the compute at this width, so the model is narrow and
# shallow; a wider one would see fewer tokens in the same time.
out_dir = "out/pretrain_cpu"
data_dir = "data/processed"  # block size from its meta.json (256 or 128)

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 300
eval_interval = 50
eval_iters = 4
log_interval = 10

learning_rate = 2e-3  # small models tolerate a high learning rate; it makes the short run count
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.1
grad_clip = 1.0

device = "cpu"
compile = False
