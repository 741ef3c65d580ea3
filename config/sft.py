# SFT of the built-in task's base model (config/add.py) on the demonstrations; python rlhf.py config/sft.py
# For your own data: point init_from at a pretrained out_dir and data/val_data at JSONL of {"messages": [...]}
# or {"prompt", "response"}; set eval_prompts="" unless the prompts are the task's.
stage = "sft"
init_from = "out/add"
out_dir = "out/add-sft"
data = "data/add/sft.jsonl"
val_data = "data/add/sft_val.jsonl"
eval_prompts = "data/add/prompts_val.jsonl"
batch_size = 32
max_iters = 1000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 10
eval_interval = 250
log_interval = 50
