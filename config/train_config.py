# Pretraining on a GPU: GPT-2 small's shape (12 layers, 768 wide, 12 heads), about 134M parameters
# with the 32k-token vocabulary and the untied output layer (24.6M each in the embedding and the output
# layer; 110M with --arch=gpt2's tied embedding).
#   python data/prepare.py --input ../shared/data/zhwiki          # block_size 512
#   python train.py config/train_config.py                        # one GPU
#   torchrun --standalone --nproc_per_node=4 train.py config/train_config.py
# zhwiki here is about 40M characters, ~30M tokens: one epoch is ~450 steps of 65k tokens, so the
# run is counted in epochs; dropout helps a model this size when it sees the data several times.
out_dir = "out/pretrain"
data_dir = "data/processed"

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1
# the recipe: the CPU measurement's choice (BENCHMARKS.md; not measured on a GPU) and the anchors'
# (nanochat, modded-nanogpt: RoPE + QK-norm, untied head, Muon for the hidden matrices, wsd).
# The GPT-2 recipe: --arch=gpt2 --optimizer=adamw --lr_schedule=cosine
arch = "qwen3"
tie_embeddings = False
optimizer = "muon"
muon_lr = 0.02
lr_schedule = "wsd"
decay_frac = 0.3

# 32 blocks x 4 micro-steps x 511 tokens = 65k tokens per step on one GPU (torchrun multiplies it)
batch_size = 32
gradient_accumulation_steps = 4
max_epochs = 4
eval_interval = 100
eval_iters = 40
log_interval = 10

learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0

# bfloat16 and torch.compile are chosen automatically on a CUDA GPU (dtype/compile = 'auto')
