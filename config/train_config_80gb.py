# Pretraining on an 80 GB GPU (A100 80GB, H100, H200): the GPU preset's model (12 layers x 768 wide,
# qwen3 recipe, untied head: 134.1M parameters), block 512, the whole 65k-token step in one micro-batch:
# larger matmuls, no accumulation loop, the best MFU this model can get on such a card.
# Data: ~20 tokens per parameter (Chinchilla) is 2.7B tokens, one epoch of a ~2.7B-token corpus (about
# 4.5B characters, ~13 GB of UTF-8 text, ~6-7 GB of zstd parquet); the 268M variant below wants 5.4B
# tokens (~26 GB of text). From parquet shards with a `text` column (README "A bigger corpus"
# downloads FineWeb-2 cmn_Hani), the wiki mixed in twice:
#   python data/prepare.py --input data/raw/fineweb2 ../shared/data/zhwiki:2 --clean none wiki \
#       --out data/web --block_size 512 --pack --shard_tokens 500000000
#   python train.py config/train_config_80gb.py               # zhwiki alone: --data_dir=data/processed --max_epochs=4
# Memory (derived, not yet measured): weights + gradients + optimizer state ~2.0 GiB, activations of
# a 128 x 511 micro-batch (bf16, flash attention) ~19 GiB, logits and loss ~12 GiB: about 33 GiB.
# With more data than the shared zhwiki (~30M tokens, which a larger model would overfit), a 16 x
# 1024 model (268M parameters: --n_layer=16 --n_head=16 --n_embd=1024 --batch_size=64
# --gradient_accumulation_steps=2) is about 27 GiB. Speed (derived): 0.86 GFLOP per token, so at 40%
# MFU an H100 (989 dense bf16 TFLOP/s) trains about 460k tokens/s: the 2.7B-token budget in ~1.6 hours,
# an epoch of zhwiki in about a minute. Time to a given val bpc: not measured yet (bench/gpu_check.py
# when a GPU is at hand).
_extends = "train_config.py"  # the GPU preset's model, recipe and schedule; this card's micro-batch

# 128 blocks x 1 micro-step x 511 tokens = 65k tokens per step
batch_size = 128
gradient_accumulation_steps = 1
eval_iters = 10  # 10 x 128 validation blocks, as the base's 40 x 32
data_dir = "data/web"  # the corpus above, prepared from parquet
max_epochs = 1  # one pass over ~2.7B tokens: 20 tokens per parameter
