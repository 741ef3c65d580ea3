# GPT-2 small (124M) reproduced on FineWeb-Edu's 10B-token sample, with llm.c's schedule for it: 524,288 tokens a
# step for 19,073 steps (10.0B tokens, about one epoch), AdamW at 6e-4 after 700 warmup steps, cosine decay to 0,
# weight decay 0.1.
#   python prepare.py --dataset=fineweb-edu      # 14 parquet shards (28.5 GB), a 50,257-token BPE trained on them
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
#   python eval.py --out_dir=out/gpt2_124m --task=hellaswag
# The tokenizer is this repo's own byte-level BPE trained on fineweb-edu with GPT-2's vocabulary size (50,257 ids,
# padded to 50,304 in the model), not GPT-2's: its loss per token is not GPT-2's, its bits per byte and HellaSwag are
# comparable. What to expect, from llm.c's GPT-2 124M run on 10B tokens of FineWeb: val loss ~3.28 and HellaSwag
# acc_norm ~29.9% (GPT-2 124M itself: 29.55%). This recipe has NOT been run here.
out_dir = "out/gpt2_124m"
dataset = "fineweb-edu"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = True
vocab_size = None                  # the tokenizer's 50,257 padded up to a multiple of 128: 50,304
# The global batch is fixed: 32 x 1024 tokens per micro-step, 16 micro-steps summed over all processes = 524,288
# tokens a step. train.py gives each of N processes 16 / N micro-steps: 2 each on 8 GPUs, 1 on 16 (two nodes), 16 on
# one GPU. N must divide 16. On a card with less memory halve batch_size and double gradient_accumulation_steps.
batch_size = 32
gradient_accumulation_steps = 16
learning_rate = 6e-4
max_iters = 19073
warmup_iters = 700
min_lr = 0.0
weight_decay = 0.1
eval_interval = 250                # val loss (and a checkpoint) every 250 steps, as llm.c evaluates
eval_iters = 20
log_interval = 10
compile = True
loss_chunk = 0                     # plain logits: faster at this shape on an H100; 4096 saves ~5 GiB of activations
fp8 = "none"                       # "head" on H100/H200: lm_head's matmuls in fp8 (needs loss_chunk = 0)
bf16_residual = False              # True on bf16 GPUs: the residual stream in bf16, ~5% faster, same loss
