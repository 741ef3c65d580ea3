# The reward model: the SFT model's trunk + a scalar head, trained on preference pairs; python rlhf.py config/rm.py
stage = "rm"
init_from = "out/add-sft"
out_dir = "out/add-rm"
data = "data/add/prefs.jsonl"
val_data = "data/add/prefs_val.jsonl"
batch_size = 32
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 500
log_interval = 100
