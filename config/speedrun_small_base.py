# The baseline of the small-corpus speedrun: nanoGPT's small character-level recipe (6 layers, 6 heads, 384 wide,
# block 256, batch 64, dropout 0.2, AdamW lr 1e-3, 2,000 steps) with the GPT-2 layout, on ~1 MB of the default
# corpus at byte level, seen for ~30 epochs. python bench.py --mode=speedrun makes the data (data/stdlib-1mb).
out_dir = "out/speedrun_small_base"
dataset = "stdlib-1mb"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
bias = False
batch_size = 64
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 200
log_interval = 10
compile = True
