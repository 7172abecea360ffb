# Pretraining on an 8 GB GPU (RTX 3060 Ti / 3070 / 4060 class): 8 layers x 512 wide, 8 heads, the
# qwen3 recipe with an untied head: 58.5M parameters with the 32k vocabulary (32.8M of them in the
# embedding and the output layer), block 512.
#   python data/prepare.py --input ../shared/data/zhwiki       # block_size 512
#   python train.py config/train_config_8gb.py
# Memory (derived, not yet measured: bench/gpu_check.py measures the 24/80 GB shape when a GPU is
# at hand): weights + gradients + optimizer state ~0.9 GiB, activations of a 16 x 511 micro-batch
# in bf16 with flash attention ~1.1 GiB, the 32k-way logits and their loss ~1.5 GiB, plus the CUDA
# context: about 4 GiB, so the card keeps headroom for torch.compile's workspace and the desktop.
# Speed (derived): 0.38 GFLOP per token, so at 40% MFU a card of P dense bf16 TFLOP/s trains about
# 0.4 * P / 0.38e-3 tokens/s (~60k tokens/s at P = 60). Time to a given val bpc: not measured yet.
_extends = "train_config.py"  # the GPU preset's recipe, schedule and data; a smaller model and micro-batch

n_layer = 8
n_head = 8
n_embd = 512
# 16 blocks x 8 micro-steps x 511 tokens = 65k tokens per step, as the other presets
batch_size = 16
gradient_accumulation_steps = 8
# dtype and compile stay 'auto': bfloat16 on Ampere and newer (float16 with a GradScaler before),
# torch.compile on CUDA under Linux
