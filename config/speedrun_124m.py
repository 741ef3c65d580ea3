# The 124M speedrun recipe: config/speedrun_124m_base.py's width, depth, data and batch with the modern pieces
# and Muon (the small recipe's U-net skips and soft-cap are not measured at this size, so not here).
# python bench.py --mode=speedrun --speedrun_config=config/speedrun_124m.py --speedrun_baseline=config/speedrun_124m_base.py
out_dir = "out/speedrun_124m"
dataset = "stdlib"
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
max_iters = 500
warmup_iters = 0
min_lr = 0.0
eval_interval = 50
eval_iters = 20
eval_train = False
log_interval = 50
compile = False             # eager: at 500 steps compiling costs more than it saves
