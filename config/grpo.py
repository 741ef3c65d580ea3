# GRPO of the SFT model against the built-in task's judge (reward_model="task"; or a reward model's out_dir):
# python rlhf.py config/grpo.py. Each step samples num_generations answers to each of rollout_batch prompts; an
# answer's advantage is its reward against its group's mean (and std); one clipped update per step, no value model.
stage = "grpo"
init_from = "out/add-sft"
out_dir = "out/add-grpo"
reward_model = "task"
data = "data/add/prompts.jsonl"
eval_prompts = "data/add/prompts_val.jsonl"
max_iters = 200
rollout_batch = 16
num_generations = 8
ppo_epochs = 1
minibatch = 128
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 5
max_new_tokens = 10
beta = 0.0
loss_type = "dapo"
eval_interval = 50
log_interval = 10
