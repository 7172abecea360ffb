# DPO (direct preference optimisation) of the SFT run on preference pairs: gold answer (chosen) vs
# the SFT model's own wrong answer or another article's answer (rejected).
#   python data/prepare_dpo.py --input ../shared/data/qa/cmrc2018_trial.json --out data/dpo --sft_run out/sft
#   python train.py config/train_config_dpo.py
# The policy starts from out/sft/best.pt and that same file, frozen, is the reference model (train.py
# records it by path and sha256). batch_size counts pairs (2 rows each). DPO moves a fine-tuned
# model by small steps: a low learning rate, no dropout (policy and reference should see the same
# network), a couple of epochs over the pairs. dpo_margin / dpo_acc in log.jsonl should rise.
out_dir = "out/dpo"
data_dir = "data/dpo"
init_from = "out/sft"
dpo_beta = 0.1

dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 2
max_epochs = 2
eval_interval = 50
eval_iters = 10
log_interval = 10

learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 20
weight_decay = 0.0
grad_clip = 1.0
