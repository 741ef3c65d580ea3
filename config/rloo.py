# RLOO of the SFT model against the built-in task's judge: python rlhf.py config/rloo.py. As config/grpo.py, but an
# answer's advantage is its reward minus the mean reward of the other num_generations - 1 answers to its prompt
# (no division by a std); grpo_beta > 0 would put the KL to the reference into the reward, as TRL's RLOOTrainer does.
stage = "rloo"
init_from = "out/add-sft"
out_dir = "out/add-rloo"
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
