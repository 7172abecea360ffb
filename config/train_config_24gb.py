# Pretraining on a 24 GB GPU (RTX 3090 / 4090, A10, L4 class): the GPU preset's model (12 layers x
# 768 wide, 12 heads, qwen3 recipe, untied head: 134.1M parameters with the 32k vocabulary), block 512,
# with the micro-batch that fills such a card well.
#   python data/prepare.py --input ../shared/data/zhwiki       # block_size 512
#   python train.py config/train_config_24gb.py
# Memory (derived, not yet measured): weights + gradients + optimizer state ~2.0 GiB, activations of
# a 32 x 511 micro-batch (bf16, flash attention) ~4.8 GiB, logits and loss ~2.9 GiB, plus the CUDA
# context: about 10-11 GiB, so batch 32 leaves room; batch 48 with gradient_accumulation_steps 3
# is about 16 GiB. Speed (derived): 0.86 GFLOP per token, so at 40% MFU a 4090 (165 dense bf16
# TFLOP/s) trains about 77k tokens/s: one epoch of the shared zhwiki (~30M tokens) in ~7 minutes.
# Time to a given val bpc: not measured yet (bench/gpu_check.py when a GPU is at hand).
_extends = "train_config.py"  # the GPU preset is sized for this card: 32 blocks x 4 micro-steps x 511 tokens
