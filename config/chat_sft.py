# The chat recipe's SFT (runs/chat.sh, REAL): GPT-2 124M pretrained on FineWeb-Edu (config/gpt2_124m.py) learns the
# chat template on SmolTalk's everyday conversations and GSM8K's worked solutions (python chat_data.py), about 3
# passes over the ~9k rows. pass@1 on GSM8K's held-out val problems is logged as acc_greedy.
# python chat_data.py && python rlhf.py config/chat_sft.py
stage = "sft"
task = "gsm8k"
init_from = "out/gpt2_124m"
out_dir = "out/chat/sft"
data = "data/chat/smoltalk_train.jsonl,data/chat/gsm8k_train.jsonl"
val_data = "data/chat/gsm8k_val.jsonl"
eval_prompts = "data/chat/gsm8k_val.jsonl"
eval_samples = 200
max_new_tokens = 256        # GSM8K's worked solutions run to ~200 GPT-2-sized tokens
batch_size = 32
max_iters = 900
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 30
eval_interval = 300
log_interval = 20
