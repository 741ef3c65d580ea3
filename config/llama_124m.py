# The Llama-3 layout at GPT-2 small's size, to compare layouts at one scale: 12 layers, 768 wide, 12 query heads
# sharing 4 kv heads (GQA: smaller k/v projections and KV cache), RoPE, RMSNorm, SwiGLU with hidden 2048, no
# biases: 114.2M parameters against GPT-2 124M's 123.7M. Batch and schedule are config/gpt2_124m.py's, for a node
# of 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/llama_124m.py
out_dir = "out/llama_124m"
dataset = "tinystories"
n_layer = 12
n_head = 12
n_kv_head = 4
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False
pos_encoding = "rope"
rope_theta = 10000.0
norm = "rmsnorm"
mlp = "swiglu"
batch_size = 32                    # per micro-step: more tok/s on an H100 than 12 (README, Measured); lower it
gradient_accumulation_steps = 16   # and raise this on smaller cards. 32 x 1024 x 16 = 524,288 tokens per step
learning_rate = 6e-4
max_iters = 600000
warmup_iters = 2000
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
