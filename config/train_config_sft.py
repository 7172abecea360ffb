# Supervised fine-tuning of the GPU pretraining run on question/answer data.
#   python data/prepare_sft.py --input ../shared/data/qa ../shared/data/dialog --out data/sft  # block 512
#   python train.py config/train_config_sft.py
# It starts from out/pretrain/best.pt (same tokenizer, vocabulary and block size, checked) with a
# fresh optimizer; the loss counts only answer tokens. A lower learning rate keeps what pretraining
# learned; a few epochs suffice.
out_dir = "out/sft"
data_dir = "data/sft"
init_from = "out/pretrain"

dropout = 0.1
batch_size = 32
gradient_accumulation_steps = 1
max_epochs = 3
eval_interval = 100
eval_iters = 40
log_interval = 10

learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
