# The base model of the built-in RLHF task (addition.py, rlhf.py): a tiny byte-level GPT pretrained on a generated
# corpus of additions, a few minutes on a 2-core CPU. See rlhf.py's docstring for the whole pipeline.
# python addition.py && python prepare.py --input=data/add/corpus.txt --dataset=add --vocab_size=261
# python train.py config/add.py
out_dir = "out/add"
dataset = "add"
n_layer = 3
n_head = 4
n_embd = 96
block_size = 64
dropout = 0.0
bias = False
batch_size = 32
gradient_accumulation_steps = 1
learning_rate = 3e-3
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 50
min_lr = 3e-4
weight_decay = 0.0
eval_interval = 1000
eval_iters = 10
log_interval = 100
