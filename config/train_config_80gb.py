# Pretraining on an 80 GB GPU (A100 80GB, H100, H200): the GPU preset's model (12 layers x 768 wide,
# qwen3 recipe, untied head: 134.1M parameters), block 512, the whole 65k-token step in one micro-batch:
# larger matmuls, no accumulation loop, the best MFU this model can get on such a card.
#   python data/prepare.py --input ../shared/data/zhwiki       # block_size 512
#   python train.py config/train_config_80gb.py
# Memory (derived, not yet measured): weights + gradients + optimizer state ~2.0 GiB, activations of
# a 128 x 511 micro-batch (bf16, flash attention) ~19 GiB, logits and loss ~12 GiB: about 33 GiB.
# With more data than the shared zhwiki (~30M tokens, which a larger model would overfit), a 16 x
# 1024 model (268M parameters: --n_layer=16 --n_head=16 --n_embd=1024 --batch_size=64
# --gradient_accumulation_steps=2) is about 27 GiB. Speed (derived): 0.86 GFLOP per token, so at 40%
# MFU an H100 (989 dense bf16 TFLOP/s) trains about 460k tokens/s: an epoch of zhwiki in about a
# minute. Time to a given val bpc: not measured yet (bench/gpu_check.py when a GPU is at hand).
_extends = "train_config.py"  # the GPU preset's model, recipe and schedule; this card's micro-batch

# 128 blocks x 1 micro-step x 511 tokens = 65k tokens per step
batch_size = 128
gradient_accumulation_steps = 1
eval_iters = 10  # 10 x 128 validation blocks, as the base's 40 x 32
