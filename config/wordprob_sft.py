# The offline chat recipe's SFT (runs/chat.sh, OFFLINE): the stdlib base model (config/wordprob_base.py) learns to
# answer gsm8k.py --synthetic's word problems with worked solutions ending "#### N". About 5 passes over the 5000
# problems: at 400 steps pass@1 was 0.17-0.19 and still rising (0.08 at 200), and GRPO learns only from groups with a
# right answer in them, so a stronger start gives it more signal; it stays below the ceiling, room for GRPO to lift.
# python gsm8k.py --synthetic && python rlhf.py config/wordprob_sft.py
stage = "sft"
task = "gsm8k"
init_from = "out/chat/base"
out_dir = "out/chat/sft"
data = "data/wordprob/train.jsonl"
val_data = "data/wordprob/val.jsonl"
eval_prompts = "data/wordprob/test.jsonl"   # pass@1 (acc_greedy) on the test problems, the same set as GRPO's
eval_samples = 500
max_new_tokens = 100        # the longest worked solution is 97 tokens with its <|end|>
batch_size = 32
max_iters = 800
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 20
eval_interval = 400
log_interval = 20
