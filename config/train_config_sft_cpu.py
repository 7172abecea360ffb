# Supervised fine-tuning of the CPU pretraining run in a few minutes (2 cores).
#   python data/prepare_sft.py --input ../shared/data/qa --out data/sft --block_size 256
#   python train.py config/train_config_sft_cpu.py
# The SFT data must use the pretraining run's tokenizer and block size (train.py checks both).
# Measured here: 100 steps in 190 s; from the CPU pretraining run above, the answer-token val loss
# went 8.55 -> 8.00 on CMRC2018/DRCD questions (data/prepare_sft.py --input ../shared/data/qa).
out_dir = "out/sft_cpu"
data_dir = "data/sft"
init_from = "out/pretrain_cpu"

dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 100
eval_interval = 25
eval_iters = 4
log_interval = 10

learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
weight_decay = 0.1
grad_clip = 1.0

device = "cpu"
compile = False
