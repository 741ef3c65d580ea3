# config/small.py with the GPT-2 layout and AdamW (learned positions, LayerNorm, GELU, tied head, cosine schedule):
# the baseline that config/small.py's recipe and config/llama_small.py compare against. ~5 min on a 2-core CPU.
# python train.py config/small_gpt2.py
out_dir = "out/small_gpt2"
dataset = "stdlib"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
bias = False
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 2e-3
max_iters = 1500
warmup_iters = 50
min_lr = 2e-4
eval_interval = 250
eval_iters = 20
log_interval = 25
