# On-policy preference pairs for the reward model (InstructGPT's comparison data): label_samples answers of the SFT
# model to each training prompt, the task's judge prefers a right one to each distinct wrong one; python rlhf.py
# config/label.py writes label_out and its held-out twin ..._val.jsonl (other prompts; the eval problems are in
# neither, prompts.jsonl holds none of them). config/rm.py then trains on these and the offline pairs.
stage = "label"
init_from = "out/add-sft"
data = "data/add/prompts.jsonl"
label_out = "data/add/prefs_sft.jsonl"
label_prompts = 9000        # about 10k pairs: an RM needs them all to rank the policy's near-misses (37+48=84)
label_val_prompts = 300
label_samples = 8
max_new_tokens = 10         # as config/ppo.py
