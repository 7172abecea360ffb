# Supervised fine-tuning of the CPU pretraining run in a few minutes (2 cores).
#   python data/prepare_sft.py --input data/qa_generated.jsonl --out data/sft --block_size 256 \
#       --pretrain_data data/processed
#   python train.py config/train_config_sft_cpu.py
# The SFT data must use the pretraining run's tokenizer and block size (train.py checks both).
# QA rows are short, and training drops their all-padding tail columns (exactly), so a step of 32
# rows costs about what 8 full pretraining rows do.
out_dir = "out/sft_cpu"
data_dir = "data/sft"
init_from = "out/pretrain_cpu"

dropout = 0.0
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 400
eval_interval = 100
eval_iters = 8
log_interval = 20

learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 20
weight_decay = 0.1
grad_clip = 1.0

device = "cpu"
compile = False
