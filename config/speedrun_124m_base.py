# The baseline of the 124M speedrun: the peers' GPT-2 small recipe (nanoGPT/llm.c: GPT-2 layout, AdamW 6e-4, betas
# 0.9/0.95 (train.py's defaults), warmup, cosine to 6e-5, weight decay 0.1, compiled) at 32 x 1024 tokens per step on
# one GPU, on python prepare.py --dataset=sitepackages (installed packages' sources, 32,768-token BPE).
# Steps by rule: >= 100M training tokens in one pass, no repetition: 3,100 x 32 x 1024 = 101.6M. Warmup 100 steps
# (nanoGPT's ratio is ~700/19,073 steps).
# python prepare.py --dataset=sitepackages
# RECIPE=config/speedrun_124m.py BASE=config/speedrun_124m_base.py SEEDS=1 bash runs/speedrun.sh
out_dir = "out/speedrun_124m_base"
dataset = "sitepackages"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False
batch_size = 32
gradient_accumulation_steps = 1
learning_rate = 6e-4
weight_decay = 0.1
max_iters = 3100
warmup_iters = 100
min_lr = 6e-5
eval_interval = 250
eval_iters = 20
eval_train = False
log_interval = 50
compile = True
