# The offline chat recipe's GRPO (runs/chat.sh, OFFLINE): the SFT model (config/wordprob_sft.py) samples 8 worked
# solutions to each of 16 word problems a step, gsm8k.judge scores each final "#### N" against the row's answer, and
# one clipped update on all 128 (TRL's default) moves it toward its right answers. Evaluated on the same test
# problems as the SFT stage: its acc_greedy is pass@1, to compare with SFT's last.
# python rlhf.py config/wordprob_grpo.py
stage = "grpo"
task = "gsm8k"
reward_model = "task"
init_from = "out/chat/sft"
out_dir = "out/chat/grpo"
data = "data/wordprob/train.jsonl"
eval_prompts = "data/wordprob/test.jsonl"
eval_samples = 500
max_new_tokens = 100
rollout_batch = 16
num_generations = 8
ppo_epochs = 1
minibatch = 128
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 5
grpo_beta = 0.0
grpo_loss_type = "dapo"
max_iters = 150
eval_interval = 50
log_interval = 5
