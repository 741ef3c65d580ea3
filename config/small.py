# A small GPT on the default corpus (the Python stdlib), sized for ~5 minutes of training on a 2-core CPU (the README
# names the CPUs it was timed on), with the speedrun recipe's pieces (config/speedrun_small.py): Muon, RoPE, RMSNorm,
# QK-norm, an untied head, zero-init projections, value embeddings, U-net skips, a warmup-stable-decay schedule.
# python prepare.py && python train.py config/small.py && python sample.py --out_dir=out/small
out_dir = "out/small"
dataset = "stdlib"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
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
batch_size = 16
gradient_accumulation_steps = 1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
embed_lr = 0.05
head_lr = 3e-3
beta1 = 0.8
lr_schedule = "wsd"
cooldown_frac = 0.4
max_iters = 900             # ~290 ms/step on a 2-core AVX2 EPYC (500 steps: val 1.69 bits/byte, too few)
warmup_iters = 0
min_lr = 0.0
eval_interval = 300
eval_iters = 20
log_interval = 25
