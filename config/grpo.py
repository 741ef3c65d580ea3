# GRPO of the SFT model against the built-in task's judge (reward_model="task"; or a reward model's out_dir):
# python rlhf.py config/grpo.py. Each step samples num_generations answers to each of rollout_batch prompts; an
# answer's advantage is its reward against its group's mean (and std); one clipped update per step, no value model.
# Held-out greedy accuracy of the built-in task (300 problems, seeds 1337/1/2 from one SFT model at 0.73): 0.879
# after 600 steps, 0.896 after 1200 (PPO on the judge, config/ppo.py: 0.906 after 700 steps, at 2.2x the CPU time).
stage = "grpo"
init_from = "out/add-sft"
out_dir = "out/add-grpo"
reward_model = "task"
data = "data/add/prompts.jsonl"
eval_prompts = "data/add/prompts_val.jsonl"
max_iters = 1200
rollout_batch = 8
num_generations = 8
ppo_epochs = 1
minibatch = 64
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 5
max_new_tokens = 10
grpo_beta = 0.0
grpo_loss_type = "dapo"
eval_interval = 300
log_interval = 10
