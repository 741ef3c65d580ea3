# config/small_gpt2.py with the Llama-3 / Mistral pieces (RoPE, RMSNorm, SwiGLU, grouped-query attention with 2 kv heads
# for 4 query heads, no biases), so the two layouts compare at one size: same width, depth and recipe, and the same
# non-embedding parameter count. GQA's attention is 3*C^2 instead of 4*C^2 and SwiGLU's 3*C*384 instead of 8*C^2,
# 12*C^2 per block either way; RoPE needs no position table.
# python train.py config/llama_small.py && python sample.py --out_dir=out/llama_small
out_dir = "out/llama_small"
dataset = "stdlib"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 128
dropout = 0.0
bias = False
pos_encoding = "rope"
norm = "rmsnorm"
mlp = "swiglu"             # hidden 8/3 * 128 rounded up to a multiple of 64 = 384
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 2e-3
max_iters = 1500
warmup_iters = 50
min_lr = 2e-4
eval_interval = 250
eval_iters = 20
log_interval = 25
