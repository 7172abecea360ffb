# Pretraining on a CPU in about 10 minutes (2 cores): a small model whose loss falls clearly in that
# time. On a CPU the output layer dominates the compute, so the CPU path uses an 8k-token tokenizer
# (pipeline.py does this by itself):
#   python tokenizer.py --input ../shared/data/zhwiki --out data/tokenizer --vocab_size 8192 --max_chars 8000000
#   python data/prepare.py --input ../shared/data/zhwiki --block_size 256 --pack
#   python train.py config/train_config_cpu.py
# Measured on this 2-core machine (quiet): one training step of this model at block 256, batch 16,
# runs at about 5,200 tokens/s with the 8k vocabulary (2,600 tokens/s for a 4 x 128 model with the
# 32k one), so 800 steps of 4,080 tokens (3.3M tokens) take about 11 minutes. The result of a real
# run is in the README ("Does fine-tuning teach the model what it read?").
out_dir = "out/pretrain_cpu"
data_dir = "data/processed"  # block size from its meta.json

n_layer = 4
n_head = 6
n_embd = 192
dropout = 0.0
# the recipe, chosen by bench/bench_recipe.py (BENCHMARKS.md): the Qwen3 decoder with an untied output
# layer, Muon for the blocks' matrices (AdamW at learning_rate for the rest), warmup-stable-decay.
# The GPT-2 recipe: --arch=gpt2 --optimizer=adamw --lr_schedule=cosine
arch = "qwen3"
tie_embeddings = False
optimizer = "muon"
muon_lr = 0.02
lr_schedule = "wsd"
decay_frac = 0.3

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 800
eval_interval = 100
eval_iters = 8
log_interval = 20

learning_rate = 2e-3  # small models tolerate a high learning rate; it makes the short run count
min_lr = 2e-4
warmup_iters = 40
weight_decay = 0.1
grad_clip = 1.0

device = "cpu"
# precision and compilation are measured choices (issue 20, BENCHMARKS.md "bf16 and torch.compile on the
# CPU"): dtype 'auto' is bf16 autocast only on a CPU with native bf16 (on this avx2-only machine bf16
# steps measured 5x slower than float32). compile is off: its 1.07x was measured with one thread, and
# with the two threads this preset trains on (the pipeline on 2 cores) compiled steps measured 1.01x
# eager (878 vs 872 tokens/s, medians of 8 intervals each, alternating; BENCHMARKS.md), no gain to
# repay a warm-up. `--compile=auto` applies train.choose_compile's rule instead.
dtype = "auto"
compile = False
