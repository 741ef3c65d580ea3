# PPO of the SFT model against the reward model (reward_model="task": the programmatic judge instead);
# python rlhf.py config/ppo.py. The PPO knobs not set here keep TRL's defaults (see rlhf.py).
stage = "ppo"
init_from = "out/add-sft"
out_dir = "out/add-ppo"
reward_model = "out/add-rm"
data = "data/add/prompts.jsonl"
eval_prompts = "data/add/prompts_val.jsonl"
max_iters = 700            # the gains come late (LOG.md)
rollout_batch = 64
minibatch = 16
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
kl_coef = 0.2              # TRL: 0.05; on the built-in task the policy exploits the reward model at 0.05
max_new_tokens = 10
eval_interval = 100
log_interval = 10
