# The offline chat recipe's base model (runs/chat.sh, OFFLINE): config/small.py's recipe, wider and deeper, with a
# context of 256 tokens, room for a word problem (<= 84 tokens in the chat template) and its worked solution (<= 97
# with <|end|>, the stdlib tokenizer's counts for gsm8k.py --synthetic's problems).
# python prepare.py && python train.py config/wordprob_base.py
out_dir = "out/chat/base"
dataset = "stdlib"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.0
bias = False
pos_encoding = "rope"
norm = "rmsnorm"
mlp = "gelu"
qk_norm = True
tie_embeddings = False
zero_init_proj = True
value_embeds = True
unet_skips = True
batch_size = 32
gradient_accumulation_steps = 1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
embed_lr = 0.05
head_lr = 3e-3
beta1 = 0.8
lr_schedule = "wsd"
cooldown_frac = 0.4
max_iters = 1000            # ~2.7 passes over a 3M-token stdlib: val loss rises after (3000 steps: 2.35 -> 3.27)
warmup_iters = 0
min_lr = 0.0
eval_interval = 250
eval_iters = 20
log_interval = 50
