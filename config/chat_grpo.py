# The chat recipe's GRPO (runs/chat.sh, REAL): the SFT model (config/chat_sft.py) samples 16 solutions to each of
# 16 GSM8K training problems a step, scored by gsm8k.judge against each row's answer; one update a step. A 124M
# model solves few GSM8K problems, and a group with no right answer teaches nothing: expect a small lift. Not yet run.
# python rlhf.py config/chat_grpo.py
stage = "grpo"
task = "gsm8k"
reward_model = "task"
init_from = "out/chat/sft"
out_dir = "out/chat/grpo"
data = "data/chat/gsm8k_train.jsonl"
eval_prompts = "data/chat/gsm8k_val.jsonl"
eval_samples = 200
max_new_tokens = 256
no_end_score = 0.0          # a judged answer cut off before <|end|> is wrong, no worse (config/wordprob_grpo.py)
rollout_batch = 16
num_generations = 16
ppo_epochs = 1
minibatch = 256
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 10
grpo_beta = 0.0
grpo_loss_type = "dapo"
max_iters = 300
eval_interval = 100
log_interval = 5
