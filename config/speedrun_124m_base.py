# The baseline of the 124M speedrun: GPT-2 small (the GPT-2 layout, AdamW, cosine schedule) on the default corpus
# (python prepare.py: the stdlib, 4,096-token BPE), 1,000 steps of 32 x 1024 tokens on one GPU.
# python bench.py --mode=speedrun --speedrun_config=config/speedrun_124m.py --speedrun_baseline=config/speedrun_124m_base.py
out_dir = "out/speedrun_124m_base"
dataset = "stdlib"
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
max_iters = 1000
warmup_iters = 100
min_lr = 6e-5
eval_interval = 100
eval_iters = 20
eval_train = False
log_interval = 50
compile = True
