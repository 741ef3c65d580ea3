# DPO of the SFT model on the preference pairs, the SFT model as the frozen reference; python rlhf.py config/dpo.py
# rpo_alpha adds the chosen answers' NLL: without it, on the built-in task, DPO ranks pairs well but lowers the
# likelihood of the chosen answers too, and held-out accuracy falls below SFT's (see the report in bench.py).
stage = "dpo"
init_from = "out/add-sft"
out_dir = "out/add-dpo"
data = "data/add/prefs.jsonl"
val_data = "data/add/prefs_val.jsonl"
eval_prompts = "data/add/prompts_val.jsonl"
batch_size = 32
max_iters = 300
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 10
dpo_beta = 0.5
rpo_alpha = 1.0
eval_interval = 100
log_interval = 20
