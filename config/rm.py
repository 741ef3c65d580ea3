# The reward model: the SFT model's trunk + a scalar head, trained on preference pairs; python rlhf.py config/rm.py
# after config/label.py. The pairs are the task's offline ones and the SFT model's own answers compared by the
# labeler (on-policy); held out: on-policy pairs of other prompts, whose offline pairs are dropped from training.
# The on-policy near-misses (37+48=84 against 85, 37+49=86 for 37+48=) take longer to learn than the offline pairs:
# 4000 steps of 64 pairs. reward_pool="mean": the head averaged over the response's tokens, so a wrong digit can be
# scored at the token where it is written: mean-pooling learns the near-misses faster than reading at <|end|>
# (LOG.md).
stage = "rm"
init_from = "out/add-sft"
out_dir = "out/add-rm"
data = "data/add/prefs.jsonl,data/add/prefs_sft.jsonl"
val_data = "data/add/prefs_sft_val.jsonl"
drop_val_prompts = True
batch_size = 64
reward_pool = "mean"
max_iters = 4000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 1000
log_interval = 100
