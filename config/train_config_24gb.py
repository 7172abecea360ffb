# Pretraining on a 24 GB GPU (RTX 3090 / 4090, A10, L4 class): the GPU preset's model (12 layers x
# 768 wide, 12 heads, qwen3 recipe, untied head: 134.1M parameters with the 32k vocabulary), block 512,
# with the micro-batch that fills such a card well.
# Data: ~20 tokens per parameter (Chinchilla) is 2.7B tokens, one epoch of a ~2.7B-token corpus: about
# 4.5B characters at 1.65 characters per token, ~13 GB of UTF-8 text (~6-7 GB of zstd parquet, the
# shared wiki's ratio). The shared zhwiki (~30M tokens) is 1% of that. From parquet shards with a `text`
# column (README "A bigger corpus" downloads FineWeb-2 cmn_Hani), the wiki mixed in twice:
#   python data/prepare.py --input data/raw/fineweb2 ../shared/data/zhwiki:2 --clean none wiki \
#       --out data/web --block_size 512 --pack --shard_tokens 500000000
#   python train.py config/train_config_24gb.py               # zhwiki alone: --data_dir=data/processed --max_epochs=4
# Memory (derived, not yet measured): weights + gradients + optimizer state ~2.0 GiB, activations of
# a 32 x 511 micro-batch (bf16, flash attention) ~4.8 GiB, logits and loss ~2.9 GiB, plus the CUDA
# context: about 10-11 GiB, so batch 32 leaves room; batch 48 with gradient_accumulation_steps 3
# is about 16 GiB. Speed (derived): 0.86 GFLOP per token, so at 40% MFU a 4090 (165 dense bf16
# TFLOP/s) trains about 77k tokens/s: the 2.7B-token budget (41k steps) in ~10 hours, one epoch of
# the shared zhwiki (~30M tokens) in ~7 minutes.
# Time to a given val bpc: not measured yet (bench/gpu_check.py when a GPU is at hand).
_extends = "train_config.py"  # the GPU preset is sized for this card: 32 blocks x 4 micro-steps x 511 tokens
data_dir = "data/web"  # the corpus above, prepared from parquet
max_epochs = 1  # one pass over ~2.7B tokens: 20 tokens per parameter
