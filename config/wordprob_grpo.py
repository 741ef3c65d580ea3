# The offline chat recipe's GRPO (runs/chat.sh, OFFLINE): the SFT model (config/wordprob_sft.py) samples 16 worked
# solutions to each of 32 word problems a step, gsm8k.judge scores each final "#### N" against the row's answer, and
# one update on all 512 moves it toward its right answers. Its problems (rl.jsonl) are fresh: none is in the SFT
# stage's train.jsonl. Evaluated on the same test problems as the SFT stage: its acc_greedy is pass@1, to compare with
# SFT's last. On the SFT stage's own problems it did not lift pass@1 (LOG.md): flat at this lr, lower at 1e-4.
# python rlhf.py config/wordprob_grpo.py
stage = "grpo"
task = "gsm8k"
reward_model = "task"
init_from = "out/chat/sft"
out_dir = "out/chat/grpo"
data = "data/wordprob/rl.jsonl"
eval_prompts = "data/wordprob/test.jsonl"
eval_samples = 500
max_new_tokens = 100
no_end_score = 0.0          # a judged answer cut off before <|end|> is wrong, no worse: at -3 the finished wrong
                            # answers of its group got a positive advantage
rollout_batch = 32          # 16 samples a problem: more groups with a right answer in them (62-73% of 8 were all
num_generations = 16        # wrong); 512 samples an update: less noise in each
ppo_epochs = 1
minibatch = 512
learning_rate = 3e-5        # 1e-4 lowered pass@1 (0.33 -> 0.28), 2e-4 collapsed it (KL 14-20)
min_lr = 3e-5
warmup_iters = 5
grpo_beta = 0.04            # k3 KL to the SFT model in the loss (DeepSeekMath's 0.04): an anchor against that collapse
grpo_loss_type = "dapo"
max_iters = 100
eval_interval = 25
log_interval = 5
