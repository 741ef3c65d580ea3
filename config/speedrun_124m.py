# The 124M speedrun recipe: config/speedrun_124m_base.py's width, depth, data and batch with the modern pieces
# and Muon (the small recipe's U-net skips and soft-cap are not measured at this size, so not here).
# Data: python prepare.py --dataset=sitepackages (installed packages' sources, no network, 32,768-token BPE).
# Steps by rule, as the baseline's: >= 100M training tokens in one pass, no repetition: 3,100 x 32 x 1024 = 101.6M.
# python prepare.py --dataset=sitepackages
# RECIPE=config/speedrun_124m.py BASE=config/speedrun_124m_base.py SEEDS=1 bash runs/speedrun.sh
out_dir = "out/speedrun_124m"
dataset = "sitepackages"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False
pos_encoding = "rope"
norm = "rmsnorm"
mlp = "gelu"
qk_norm = True
tie_embeddings = False
zero_init_proj = True
value_embeds = True
batch_size = 32
gradient_accumulation_steps = 1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
embed_lr = 0.05
head_lr = 3e-3
beta1 = 0.8
beta2 = 0.95
lr_schedule = "wsd"
cooldown_frac = 0.4
max_iters = 3100
warmup_iters = 0
min_lr = 0.0
eval_interval = 250
eval_iters = 20
eval_train = False
log_interval = 50
compile = True              # at 3,100 steps compiling pays for itself
