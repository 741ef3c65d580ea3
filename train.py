"""
Pretrain a GPT on shards made by prepare.py. One process, or many under torchrun (DDP or FSDP2).

    python train.py config/small.py                                      # CPU or one GPU
    python train.py config/small.py --learning_rate=3e-4 --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py # one node of 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --sharding=fsdp --grad_ckpt=full
    # 2 nodes x 8 GPUs: the same command on both nodes, --node_rank=1 on the second; HOST = node 0's address
    # (any free port); gradient_accumulation_steps must divide by the 16 processes (the recipe's 16 does)
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_id=gpt2 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/gpt2_124m.py

Scale (the config keys under "scale"): bf16 autocast over fp32 weights and AdamW state (fp16 with a GradScaler
where bf16 is missing, TF32 for the rest); gradient checkpointing (grad_ckpt); the loss without the (B, T, vocab)
logits (loss_chunk) or 8-bit float matmuls for the lm_head on H100-class GPUs (fp8), both in fp8.py; a bf16 residual
stream (bf16_residual); DDP; DDP with AdamW's state split over the processes (sharding='zero1', ZeRO-1); or FSDP2
with sharding='fsdp' (ZeRO-3: parameters, gradients and AdamW state split, for models whose state does not fit one
GPU). Checkpoints hold whole (unsharded) state dicts whatever the sharding: any run resumes (or samples) from any
other's checkpoint, on any number of processes (the data position counts each process's batches, so on another
number of processes the epoch goes on from a different window).
Across nodes, set NCCL_SOCKET_IFNAME / NCCL_IB_HCA if NCCL picks the wrong network, and give both nodes the
same data (data_root) and a shared out_dir (only rank 0 writes; resuming reads it on every node).

Writes out_dir/: ckpt-NNNNNNN.pt + latest.json (checkpoints), tokenizer.bpe, metrics.jsonl.
Config files are executed Python: run only the ones you trust. Checkpoints are loaded with
weights_only=True, so a checkpoint can never run code.
"""
import gc
import json
import math
import os
import resource
import shlex
import shutil
import signal
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
from checkpoint import full_state_dicts, load_checkpoint, load_optimizer_state, save_checkpoint
from configurator import configure
from eval import mc_rows, multiple_choice
from fp8 import chunk_loss, chunked_head_loss, fp8_logits_loss, use_fp8_head
from model import GPT, GPTConfig
from prepare import load_meta, read_header, read_shard

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 250         # evaluate (and checkpoint) every this many steps
eval_iters = 20             # batches per split for an evaluation (at most one pass over the split)
eval_train = True           # also estimate the train split's loss at each evaluation
eval_mc = ""                # also score multiple choice at each evaluation: "hellaswag" or a JSONL of eval.py's rows
eval_mc_rows = 500          # the first rows of eval_mc scored each time (0 = all)
log_interval = 10
always_save_checkpoint = True  # else only when val loss improves
save_checkpoints = True     # False: write none at all (benchmarks, speedruns)
wandb_log = False           # also log metrics.jsonl's rows to Weights & Biases (pip install wandb)
wandb_project = "scratchlm"
wandb_run_name = "run"
init_from = "scratch"       # scratch | resume (out_dir's latest checkpoint) | another run's out_dir (its weights,
                            # a fresh optimizer: fine-tuning) | a transformers directory | gpt2, gpt2-medium, ...
# data
dataset = "stdlib"          # reads data_root/dataset/, made by prepare.py
data_root = "data"
batch_size = 12             # micro-batch per process
block_size = 1024
gradient_accumulation_steps = 40  # micro-steps per update, summed over all processes
# model: every field of GPTConfig (model.py) is a config key here; vocab_size comes from the data
globals().update({f.name: f.default for f in fields(GPTConfig)})
vocab_size = None           # None: the tokenizer's vocab, padded up to a multiple of 128 (faster matmuls)
# optimizer
optimizer = "adamw"         # adamw | muon (Muon for the blocks' 2-D weights, AdamW for embeddings, head, gains)
learning_rate = 6e-4        # AdamW's lr (with muon: of the parameters AdamW keeps)
max_iters = 600000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0 disables clipping
embed_lr = 0.0              # AdamW lr of the embedding tables; 0 = learning_rate
head_lr = 0.0               # AdamW lr of an untied lm_head; 0 = learning_rate
muon_lr = 0.02              # Muon's lr (torch's "original" scaling: x sqrt(max(1, rows/cols)))
muon_momentum = 0.95
muon_weight_decay = 0.0
# learning-rate schedule: linear warmup, then cosine (or wsd: flat, then linear) decay to min_lr at lr_decay_iters
decay_lr = True
lr_schedule = "cosine"      # cosine | wsd (warmup-stable-decay, Hu et al. 2024: flat, then linear over the last cooldown_frac)
cooldown_frac = 0.2
warmup_iters = 2000
lr_decay_iters = 0          # 0 = max_iters (the decay ends with the run)
min_lr = 6e-5               # the floor of the decay, as a fraction of each group's lr: min_lr / learning_rate
# system
device = "auto"             # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, else fp16, fp32 on CPU)
compile = False             # torch.compile the model
# scale
grad_ckpt = None            # recompute activations in the backward: None/"none" | "full" (every block) | k (every k-th)
sharding = "ddp"            # under torchrun: ddp (a full copy per process) | zero1 (DDP, AdamW state sharded) |
                            # fsdp (FSDP2: params, grads, AdamW state sharded)
loss_chunk = 0              # > 0: rows of logits alive at once in the loss (fp8.LinearCrossEntropy); 0: plain logits
fp8 = "none"                # none | head: the lm_head's matmuls in 8-bit floats (fp8.py; needs loss_chunk=0)
bf16_residual = False       # the residual stream in bf16, not fp32: less memory traffic (needs dtype bfloat16)
seed = 1337
stop_at_val_loss = 0.0      # > 0: stop at the first evaluation whose val loss is at or below this (speedruns)
# faults: a bad update (loss NaN/Inf, or above spike_factor x its running average) is skipped, not applied
max_bad_steps = 5           # this many bad updates in a row stop the run, with the weights from before them saved
spike_factor = 2.0          # loss > spike_factor x running average is a spike; 0 = only NaN/Inf are bad
# -----------------------------------------------------------------------------


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", cooldown_frac=0.2):
    """Linear warmup from ~0 to learning_rate over warmup_iters, then down to min_lr at lr_decay_iters: along a
    cosine, or (wsd) flat until the last cooldown_frac of the steps and linear from there."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        cooldown = max(int(cooldown_frac * lr_decay_iters), 1)
        ratio = max(it - (lr_decay_iters - cooldown), 0) / cooldown
        return learning_rate - ratio * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

# ---------------------------------------------------------------------------- devices and processes


def setup_distributed(device="auto"):
    """Returns (rank, local_rank, world_size, device). Under torchrun (RANK set) joins the process group:
    NCCL on GPUs, gloo on CPU (which is how CI tests DDP)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if "RANK" in os.environ:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def leave_process_group(world):
    """Under torchrun: wait for every rank (rank 0 may still be writing a checkpoint), then tear down. A rank
    that tears gloo down while another still talks to it can abort at exit ("terminate called...")."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def resolve_dtype(dtype, device):
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return dtype, {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_precision(dtype_name, sharding, bf16_residual):
    """Refuses the precision settings that cannot go together, naming the fix."""
    if sharding != "ddp" and dtype_name == "float16":
        raise SystemExit(f"error: sharding={sharding!r} needs dtype bfloat16 or float32 (fp16's GradScaler is not "
                         f"shard-aware here); use --dtype=bfloat16, or sharding='ddp' for fp16")
    if bf16_residual and dtype_name != "bfloat16":
        raise SystemExit(f"error: bf16_residual needs dtype bfloat16 (autocast), this run uses {dtype_name}; set "
                         f"--dtype=bfloat16 or --bf16_residual=False")


def autocast(device, ptdtype):
    """Mixed precision: weights and optimizer state stay fp32, matmuls run in ptdtype."""
    if ptdtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=ptdtype)


def peak_flops(device, ptdtype):
    """This device's dense matmul rate in FLOP/s, measured (a datasheet number is wrong for half the
    cards people own, and meaningless on a CPU). MFU is reported against it."""
    cuda = device.startswith("cuda")
    n, trials, reps = (8192, 10, 10) if cuda else (1024, 20, 1)  # 8192: big enough to reach an H100's ~800 TFLOP/s
    a = torch.randn(n, n, device=device, dtype=ptdtype)
    b = torch.randn(n, n, device=device, dtype=ptdtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = float("inf")
    for _ in range(trials):  # the fastest trial: other processes may share the machine
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best


def ckpt_interval(grad_ckpt):
    """The grad_ckpt config as a block interval: 0 = off, 1 = every block ("full"), k = every k-th block."""
    if grad_ckpt in (None, "none", 0):
        return 0
    if grad_ckpt == "full":
        return 1
    if type(grad_ckpt) is int and grad_ckpt > 0:
        return grad_ckpt
    raise SystemExit(f"error: grad_ckpt must be 'none', 'full' or a block interval k >= 1, got {grad_ckpt!r}")


def checkpoint_blocks(model, every):
    """Gradient checkpointing (Chen et al. 2016) of every `every`-th block: only its input is kept, and its forward
    runs again in the backward. torch's wrapper keeps the state dict's names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i in range(0, len(model.transformer.h), every):
        model.transformer.h[i] = checkpoint_wrapper(model.transformer.h[i])


def parallelize(model, device, world, compile=False, grad_ckpt=None, sharding="ddp", loss_chunk=0, fp8="none",
                bf16_residual=False):
    """Makes a GPT (already on `device`) ready to train; returns the module the step calls. Swaps in the speed and
    memory features (gradient checkpointing, the chunked loss, the fp8 head, the bf16 residual stream), then under
    torchrun shards the GPT in place (FSDP2) or wraps it in DDP, then compiles. Read state dicts and FLOPs from
    the GPT itself, not from what this returns."""
    every = ckpt_interval(grad_ckpt)
    if sharding not in ("ddp", "zero1", "fsdp"):
        raise SystemExit(f"error: sharding must be 'ddp', 'zero1' or 'fsdp', got {sharding!r}")
    if fp8 not in ("none", "head"):
        raise SystemExit(f"error: fp8 must be 'none' or 'head', got {fp8!r}")
    if model.config.logit_softcap and (loss_chunk or fp8 != "none"):
        raise SystemExit("error: logit_softcap needs loss_chunk=0 and fp8='none' (the fused losses do not cap)")
    if fp8 == "head" and loss_chunk:
        raise SystemExit("error: fp8='head' needs loss_chunk=0 (the chunked loss multiplies by lm_head's weight "
                         "itself)")
    if fp8 == "head" and device != "cpu" and not (device.startswith("cuda") and
                                                   torch.cuda.get_device_capability(device) >= (8, 9)):
        raise SystemExit(f"error: fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9+: "
                         f"H100, L40, RTX 4090), and {device} has none; set fp8='none'")
    if bf16_residual:  # the residual stream in bf16 from the embeddings on: half the bytes for norms and adds
        model.transformer.drop.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16))
    separately = compile and (every or loss_chunk)
    if separately:
        # Checkpointing and the chunked loss free memory by running as Python around compiled parts: traced into
        # one whole-model graph, the compiler keeps most of what they free (GPT-2 at 32x1024, grad_ckpt=full: 7.8
        # against 3.2 GiB of activations). So the blocks and the loss are compiled one by one, the rest is eager.
        for block in model.transformer.h:
            block.compile()
        if every and torch.cuda.is_available():
            torch.cuda.init()  # the first compile touches CUDA, which checkpoint forbids inside its forward
        compile = False
    if every:
        checkpoint_blocks(model, every)
    if loss_chunk:
        step = torch.compile(chunk_loss, dynamic=False) if separately else chunk_loss
        model.head_loss = types.MethodType(chunked_head_loss(loss_chunk, step), model)
    elif fp8 == "head":
        use_fp8_head(model, torch.compile(fp8_logits_loss, dynamic=False) if separately else fp8_logits_loss)
    elif separately:  # eager, the plain loss makes fp32 copies of the logits
        model.head_loss = torch.compile(model.head_loss, dynamic=False)
    if world > 1 and sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard
        # FSDP2 (ZeRO-3): each process keeps 1/world of every parameter, gradient and AdamW moment. A block's
        # parameters are all-gathered just before its forward (and again before its backward) and freed after;
        # its gradients are reduce-scattered as soon as its backward is done. The root unit holds the rest
        # (embeddings, tied head, final norm). Blocks are sharded first so the root does not take their params.
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif world > 1:  # ddp, zero1
        # DDP all-reduces gradients in buckets as soon as the backward has filled each one, so the
        # communication overlaps the rest of the backward; gradient_as_bucket_view: .grad are views into the
        # buckets (no copy, no second gradient-sized buffer)
        model = DDP(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None,
                    gradient_as_bucket_view=True)
    # compiled after DDP, so that dynamo's DDPOptimizer cuts the graph at bucket boundaries and the all-reduce
    # still overlaps the (compiled) backward; compiled after FSDP2, which it traces through
    return torch.compile(model) if compile else model


def make_optimizers(model, world, sharding, weight_decay, learning_rate, betas, device, kind="adamw",
                    embed_lr=0.0, head_lr=0.0, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0):
    """The optimizers of the GPT's parameters, as a list that the loop steps one after the other.
    adamw: one AdamW (made after FSDP2 sharded the parameters, it holds this process's shards only). With
    sharding='zero1' (ZeRO stage 1, Rajbhandari et al. 2020) each process keeps whole weights and gradients, as
    under DDP, but AdamW's moments for only 1/world of the parameters: it updates those, then broadcasts them.
    muon: Muon (Jordan et al. 2024: momentum, then the update orthogonalised by Newton-Schulz iterations) for the
    blocks' 2-D weights, and AdamW for the embeddings, the head and the gains, which Muon is not meant for.
    Each optimizer keeps its groups' own lrs in .base_lrs (not in the groups: checkpoints load into optimizers
    made without them); the schedule scales them all by one factor."""
    fused = device.startswith("cuda")
    if kind not in ("adamw", "muon"):
        raise SystemExit(f"error: optimizer must be 'adamw' or 'muon', got {kind!r}")
    if kind == "adamw":
        optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, device.split(":")[0])
        if world > 1 and sharding == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer  # here: importing it takes 0.6 s
            # parameters_as_bucket_view: one broadcast per rank, not one per parameter
            optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=torch.optim.AdamW,
                                                parameters_as_bucket_view=True,
                                                **{k: optimizer.defaults[k] for k in ("lr", "betas", "fused")})
        optimizers = [optimizer]
    else:
        if not hasattr(torch.optim, "Muon"):
            raise SystemExit(f"error: optimizer='muon' needs torch >= 2.9 (torch.optim.Muon), this is torch "
                             f"{torch.__version__}; upgrade torch or use optimizer='adamw'")
        if world > 1 and sharding != "ddp":
            raise SystemExit(f"error: optimizer='muon' orthogonalises whole matrices, and sharding={sharding!r} "
                             f"gives each process only a slice of them; use sharding='ddp' or optimizer='adamw'")
        groups = {"muon": [], "embed": [], "head": [], "gain": []}
        for name, p in model.named_parameters():
            if name.startswith("transformer.h.") and p.dim() == 2:
                groups["muon"].append(p)
            elif p.dim() < 2:
                groups["gain"].append(p)
            elif name.startswith("lm_head"):
                groups["head"].append(p)
            else:  # wte, wpe, value embeddings
                groups["embed"].append(p)
        adamw = torch.optim.AdamW([dict(params=groups["embed"], lr=embed_lr or learning_rate, weight_decay=0.0),
                                   dict(params=groups["head"], lr=head_lr or learning_rate, weight_decay=0.0),
                                   dict(params=groups["gain"], lr=learning_rate, weight_decay=0.0)],
                                  lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))
        muon = torch.optim.Muon(groups["muon"], lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
        optimizers = [adamw, muon]
    for opt in optimizers:
        opt.base_lrs = [group["lr"] for group in opt.param_groups]
    return optimizers


def set_lr(optimizers, factor):
    """Every group's lr = its own initial lr x factor (the schedule's lr / learning_rate)."""
    for opt in optimizers:
        for group, base in zip(opt.param_groups, opt.base_lrs):
            group["lr"] = base * factor


# ---------------------------------------------------------------------------- data


class TokenWindows:
    """The (block_size + 1)-token windows of the shards on a grid of stride block_size, started `shift` tokens
    into each shard: window i gives the inputs x = tokens[s : s+T] and the targets y = tokens[s+1 : s+T+1].
    Windows never cross shards. Training moves the grid every epoch (Batches), evaluation keeps shift 0."""

    def __init__(self, paths, block_size):
        self.shards = [read_shard(p) for p in paths]
        self.block_size = block_size
        if len(self) == 0:
            raise SystemExit(f"error: block_size {block_size} is longer than the data in {paths[0]}'s split "
                             f"({max(len(s) for s in self.shards)} tokens); lower block_size or add data")

    def starts(self, shift=0):
        """Cumulative window counts per shard under this shift: window index -> shard, by binary search."""
        return np.cumsum([0] + [max((len(s) - 1 - shift) // self.block_size, 0) for s in self.shards])

    def __len__(self):
        return int(self.starts()[-1])

    def window(self, i, starts, shift=0):
        shard = int(np.searchsorted(starts, i, side="right")) - 1
        s = shift + (i - starts[shard]) * self.block_size
        w = torch.from_numpy(self.shards[shard][s:s + self.block_size + 1].astype(np.int64))
        return w[:-1], w[1:]


class Batches:
    """Epochs over a TokenWindows: each epoch is a seeded permutation of every window, dealt round-robin
    to the ranks (no overlap between ranks, no replacement), cut into micro-batches. With shift=True each epoch
    also moves the window grid by a seeded offset in [0, block_size): on data seen for many epochs, a fixed grid
    lets the model memorise the same windows every epoch (train loss falls while val loss turns up sooner).
    The position (epoch, batch, shift) is saved in checkpoints, so a resumed run sees exactly the batches it
    would have."""

    def __init__(self, ds, batch_size, rank, world, seed, epoch=0, pos=0, offset=None, shift=False, pin=False):
        self.ds, self.batch_size, self.rank, self.world, self.seed = ds, batch_size, rank, world, seed
        self.epoch, self.pos, self.shift, self.pin = epoch, pos, shift, pin
        self._order(offset)
        if self.per_epoch == 0:
            raise SystemExit(f"error: {len(ds)} windows of block_size {ds.block_size} are too few for "
                             f"batch_size {batch_size} x {world} processes; lower batch_size or block_size")

    def _order(self, offset=None):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        # the grid offset of this epoch (drawn, or restored from a checkpoint); epoch 0 keeps the unshifted grid
        drawn = int(torch.randint(self.ds.block_size, (1,), generator=g)) if self.shift and self.epoch else 0
        self.offset = drawn if offset is None else offset
        self.starts = self.ds.starts(self.offset)
        n = int(self.starts[-1])
        self.per_epoch = (n // self.world) // self.batch_size
        self.order = torch.randperm(n, generator=g)[self.rank::self.world]

    def __next__(self):
        if self.pos >= self.per_epoch:  # (>: a run resumed on more processes has shorter epochs)
            self.epoch, self.pos = self.epoch + 1, 0
            self._order()
        idx = self.order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        x, y = (torch.stack(t) for t in zip(*(self.ds.window(int(i), self.starts, self.offset) for i in idx)))
        if self.pin:  # page-locked memory lets the copy to the GPU run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def state(self):
        return dict(epoch=self.epoch, pos=self.pos, offset=self.offset)


def split_paths(data_dir, meta, split):
    paths = [os.path.join(data_dir, p) for p in meta[f"{split}_shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"error: shard {p} is missing; re-run prepare.py")
        if read_header(p)["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: {p} was made with another tokenizer than {data_dir}/meta.json says; "
                             f"re-run prepare.py")
    return paths


def load_data(data_root, dataset):
    """(data_dir, meta, tokenizer) of a dataset made by prepare.py, its tokenizer file checked against the shards'."""
    data_dir = os.path.join(data_root, dataset)
    meta = load_meta(data_dir)
    tok_path = os.path.join(data_dir, meta["tokenizer"])
    tok = bpe.Tokenizer.load(tok_path)
    if tok.hash != meta["tokenizer_hash"]:
        raise SystemExit(f"error: {tok_path} is not the tokenizer {data_dir}/meta.json and the shards were made "
                         f"with; re-run prepare.py")
    return data_dir, meta, tok


def make_batches(data_dir, meta, block_size, batch_size, rank, world, seed, data_state, eval_train, pin):
    """(the train windows, the training batches from data_state on, {split: a function making eval batches})."""
    train_ds = TokenWindows(split_paths(data_dir, meta, "train"), block_size)
    val_ds = TokenWindows(split_paths(data_dir, meta, "val"), block_size)
    batches = Batches(train_ds, batch_size, rank, world, seed, shift=True, pin=pin, **data_state)
    # evaluation always uses the same windows (epoch 0 of a fixed permutation), so numbers are comparable
    loaders = {"train": lambda: Batches(train_ds, batch_size, rank, world, seed + 1, pin=pin),
               "val": lambda: Batches(val_ds, batch_size, rank, world, seed + 1, pin=pin)}
    if not eval_train:
        del loaders["train"]
    return train_ds, batches, loaders

# ---------------------------------------------------------------------------- faults
# A bad update (loss NaN/Inf, or a spike far above the running average) is skipped, and the run stops after
# max_bad_steps of them in a row, saving the weights from before the first one. It stops rather than roll
# back and lower the LR: a silent LR change would alter the experiment, while a stop with the pre-fault weights
# lets a person choose (the PaLM remedy for spikes is the same: restart from before the spike and skip the bad
# batches, which is what resuming from this checkpoint does, since the data position is past them).
# The decision is made on the device: no host sync per step. The host reads the counters at log steps only.
GUARD_BETA, GUARD_WARMUP = 0.99, 10  # running average over ~100 good steps; spikes are judged after 10 of them
GUARD_FIELDS = ("ema", "good", "in_row", "total", "tripped", "last_bad_loss")


def guard_update(g, loss, grad_norm, spike_factor, max_bad_steps):
    """One step of the bad-update guard. g: float32 tensor of GUARD_FIELDS, updated in place; loss: the
    step's (0-d) loss, the same on every rank; grad_norm: the total gradient norm or None.
    Returns a 0-d float32 tensor: 1.0 = skip this update. Once tripped (max_bad_steps in a row), every
    later update is skipped too, so the weights stay those from before the fault until the host stops."""
    ema, good, in_row, total, tripped, last = g.unbind()
    loss = loss.detach().float()
    avg = ema / (1 - GUARD_BETA ** good).clamp(min=1e-12)  # bias-corrected, as in Adam
    fault = ~torch.isfinite(loss)
    if grad_norm is not None:
        fault |= ~torch.isfinite(grad_norm)
    if spike_factor:
        fault |= (good >= GUARD_WARMUP) & (loss > spike_factor * avg)
    bad = fault | (tripped > 0)
    in_row = torch.where(bad, in_row + 1, 0.0)
    new = torch.stack([torch.where(bad, ema, GUARD_BETA * ema + (1 - GUARD_BETA) * loss),
                       good + (~bad).float(), in_row, total + bad.float(),
                       torch.maximum(tripped, (in_row >= max_bad_steps).float()),
                       torch.where(fault & (tripped == 0), loss, last)])
    g.copy_(new)
    return bad.float()


def apply_update(optimizers, scaler, bad):
    """Steps each optimizer unless bad (0-d float32 tensor, 1.0 = skip) - skipped means nothing changes, not the
    weights, not the moments, not the step count. Fused AdamW (CUDA) takes the skip flag on the device
    (`found_inf`, the hook GradScaler uses), so no host sync. Otherwise the host reads the flag: free on a CPU; on a
    GPU one sync a step (Muon has no such hook); with fp16's GradScaler a sync the scaler makes anyway."""
    for optimizer in optimizers:
        inner = getattr(optimizer, "optim", optimizer)  # ZeRO steps an AdamW of its own over this rank's part
        if inner.defaults.get("fused") and not scaler.is_enabled():
            inner.found_inf = bad
            optimizer.step()
            del inner.found_inf
        elif not bad.item():
            scaler.step(optimizer)


def check_guard_settings(max_bad_steps, spike_factor):
    if max_bad_steps < 1 or not (spike_factor == 0 or spike_factor > 1):
        raise SystemExit(f"error: max_bad_steps must be >= 1 (got {max_bad_steps}) and spike_factor 0 (off) or > 1 "
                         f"(got {spike_factor})")


def read_guard(guard, bad_seen, iter_num, master, spike_factor, max_bad_steps, out_dir):
    """The guard's count of bad updates, read by the host (a sync: at log steps only), saying how many were skipped
    since the count bad_seen. Returns (that count, the error to stop with if the guard tripped, else None); a tripped
    guard is reset first, so that the checkpoint saved with it trains on when resumed."""
    state = guard.tolist()
    total = state[GUARD_FIELDS.index("total")]
    if total > bad_seen and master:
        print(f"step {iter_num}: skipped {total - bad_seen:.0f} bad update(s) ({total:.0f} in all), "
              f"last loss {state[-1]:.4g}")
    if not state[GUARD_FIELDS.index("tripped")]:
        return total, None
    guard[GUARD_FIELDS.index("in_row")] = guard[GUARD_FIELDS.index("tripped")] = 0
    return total, guard_trip_error(state, iter_num, spike_factor, max_bad_steps, out_dir)


def guard_trip_error(guard, iter_num, spike_factor, max_bad_steps, out_dir):
    """The one-line error of a tripped guard (guard: its GUARD_FIELDS as floats): from which step the bad
    updates ran, which of guard_update's three faults the last one was, and what to do."""
    ema, good, in_row, total, tripped, last = guard
    first = iter_num - int(in_row)
    avg = ema / (1 - GUARD_BETA ** good) if good else math.nan  # ema and good stay put over bad steps: the avg used
    why = (f"loss {last}" if not math.isfinite(last) else
           f"loss {last:.4g} > spike_factor {spike_factor} x running average {avg:.4g}"
           if spike_factor and good >= GUARD_WARMUP and last > spike_factor * avg else
           f"non-finite gradients at loss {last:.4g}")
    return (f"error: {max_bad_steps} bad updates in a row from step {first} ({why}); skipped them all and saved "
            f"the weights from before step {first} in {out_dir} (resuming skips those batches). Lower learning_rate "
            f"or check the data, or raise max_bad_steps / spike_factor; then resume with --init_from=resume")


STOP = {}  # {"signal": name} once SIGTERM (preemption) or SIGINT (Ctrl-C) arrived


def request_stop(signum, frame):
    """Signal handler: ask the loop to stop after the current step and save. A second signal acts at once."""
    STOP["signal"] = signal.Signals(signum).name
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    os.write(2, f"{STOP['signal']}: finishing this step and saving a checkpoint "
                f"(send it again to quit without saving)\n".encode())


def catch_stop_signals(world, device):
    """From here on SIGTERM (preemption) and SIGINT (Ctrl-C) make the loop finish its step, save and exit 0
    (request_stop). Returns the CPU (gloo) group over which the ranks agree to stop (stop_requested), or None."""
    STOP.clear()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request_stop)
    return dist.new_group(backend="gloo") if world > 1 and device.startswith("cuda") else None


def stop_requested(world, at_log_step, group=None):
    """Whether SIGTERM / SIGINT asked to stop. One process checks its flag every step (a Python bool: free); under
    torchrun the ranks agree at log steps, by an all-reduce of the flag on a CPU (gloo) group, which needs no GPU
    sync; so the grace period before SIGKILL must cover log_interval steps."""
    if world == 1 or not at_log_step:
        return world == 1 and bool(STOP)
    flag = torch.tensor([float(bool(STOP))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() > 0


def resume_command(world, argv):
    """The command that goes on from this run's checkpoint: the same one, with --init_from=resume."""
    args = shlex.join(a for a in argv[1:] if not a.startswith("--init_from="))
    return f"{'python' if world == 1 else 'torchrun (same options)'} {argv[0]} {args} --init_from=resume"

# ---------------------------------------------------------------------------- the run


def micro_steps(gradient_accumulation_steps, world):
    """Micro-steps per process. The config counts them over all processes, so a config written for one process
    trains the same global batch on N processes when N divides the count; when it does not, each process takes
    ceil(count / N) and the global batch grows (to the smallest N processes can share)."""
    if type(gradient_accumulation_steps) is not int or gradient_accumulation_steps < 1:
        raise SystemExit(f"error: gradient_accumulation_steps must be an int >= 1, got "
                         f"{gradient_accumulation_steps!r}")
    return -(-gradient_accumulation_steps // world)


def check_out_dir(out_dir, init_from):
    """A run that starts at step 0 (from scratch, or a fine-tune) must not write into another run's out_dir: the
    two runs' rows would interleave in metrics.jsonl (steps 25, 50, 25, 50...) and its checkpoints replace them."""
    if init_from == "resume" or not os.path.isdir(out_dir):
        return
    held = [f for f in sorted(os.listdir(out_dir)) if f == "latest.json" or (f.startswith("ckpt-") and f.endswith(
        ".pt")) or (f == "metrics.jsonl" and os.path.getsize(os.path.join(out_dir, f)))]
    if held:
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(held[:3])}); continue it with "
                         f"--init_from=resume, or start this one in another --out_dir")


def init_model(init_from, out_dir, data_dir, meta, config):
    """Where the model comes from: (model_args, its weights or None, the checkpoint to resume or None).
    scratch: the config's shape, random weights. resume: out_dir's latest checkpoint, optimizer, step and data
    position included. Another run's out_dir (it holds latest.json): that run's weights only, with a fresh
    optimizer and schedule (fine-tuning). A transformers directory, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl:
    export.load_pretrained's weights. The shape comes from the source, the data's tokenizer must be the source's."""
    if init_from == "scratch":
        vocab = config["vocab_size"]
        vocab = -(-meta["vocab_size"] // 128) * 128 if vocab is None else vocab
        if type(vocab) is not int or vocab < meta["vocab_size"]:  # None-default keys take any type
            raise SystemExit(f"error: vocab_size {vocab!r} must be an int >= the tokenizer's {meta['vocab_size']} "
                             f"tokens (or None: the tokenizer's, padded to a multiple of 128)")
        return dict({f.name: config[f.name] for f in fields(GPTConfig)}, vocab_size=vocab), None, None
    if init_from == "resume" or os.path.isfile(os.path.join(init_from, "latest.json")):
        ckpt = load_checkpoint(out_dir if init_from == "resume" else init_from)
        if init_from == "resume" and ckpt["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: checkpoint in {out_dir} was trained with another tokenizer than {data_dir}; "
                             f"resume on the same data or start a new out_dir")
        if init_from == "resume":
            return ckpt["model_args"], ckpt["model"], ckpt
        same_tokenizer = ckpt["tokenizer_hash"] == meta["tokenizer_hash"]
        model_args, weights = ckpt["model_args"], ckpt["model"]
    else:
        import export  # only here: it is the Hugging Face side of the pipeline
        model_args, weights, tok = export.load_pretrained(init_from)
        same_tokenizer = tok.hash == meta["tokenizer_hash"] if tok else model_args["vocab_size"] >= meta["vocab_size"]
    if not same_tokenizer:
        raise SystemExit(f"error: {init_from} was trained with another tokenizer than {data_dir} was made with; "
                         f"fine-tune on data prepared with its tokenizer (prepare.py --tokenizer=FILE), or pick "
                         f"such a --dataset")
    return dict(model_args, dropout=config["dropout"]), weights, None  # fine-tuning may set its own dropout


def build_model(model_args, weights, seed, device):
    """The GPT of model_args on device: the given weights, or random ones, the same on every rank (seeded)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(device)


def restore(ckpt, model, optimizers, scaler, device):
    """A resumed run's state from its checkpoint: (iter_num, best_val_loss, data position, guard on device); fresh
    ones for a run that starts at step 0."""
    if ckpt is None:
        return 0, float("inf"), dict(epoch=0, pos=0), torch.zeros(len(GUARD_FIELDS), device=device)
    load_optimizer_state(model, optimizers, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    guard = ckpt.get("guard", torch.zeros(len(GUARD_FIELDS)))
    return ckpt["iter_num"], ckpt["best_val_loss"], ckpt["data"], guard.to(device)


def announce(model, optimizers, world, device, dtype_name, tokens_per_iter, train_windows):
    """The run's first lines: its size and where it runs; a warning for a GPU-sized run on a CPU."""
    params = model.num_params()
    print(f"{params / 1e6:.2f}M parameters | {world} process(es) on {device}, {dtype_name} | "
          f"{tokens_per_iter:,} tokens/step | {train_windows:,} train windows")
    if device == "cpu" and (params > 50e6 or tokens_per_iter > 100_000):
        print(f"warning: a GPU-sized run on the CPU ({params / 1e6:.0f}M parameters, {tokens_per_iter:,} tokens per "
              f"step) takes minutes to hours per step; config/small.py is sized for a CPU")
    if hasattr(optimizers[0], "optim"):  # ZeRO-1: how much of AdamW's state this process keeps
        count = lambda groups: sum(p.numel() for g in groups for p in g["params"])
        print(f"zero1: AdamW state for {count(optimizers[0].optim.param_groups):,} of the "
              f"{count(optimizers[0].param_groups):,} parameters on this process")


def open_out_dir(out_dir, tokenizer, world, master, config, wandb_log=False, wandb_project="scratchlm",
                 wandb_run_name="run"):
    """Makes out_dir (on rank 0, once every rank has checked it), copies the tokenizer file in, and returns
    log(**row): one JSON line of out_dir/metrics.jsonl, and with wandb_log the same row to Weights & Biases, on
    rank 0; nothing on the other ranks. wandb is imported only when asked for."""
    if world > 1:
        dist.barrier()  # every rank has checked out_dir (check_out_dir) before rank 0 writes into it
    if not master:
        return lambda **row: None
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.bpe"))
    if wandb_log:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: wandb_log=True needs the wandb package: pip install wandb, or set "
                             "--wandb_log=False") from None
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a")

    def log(**row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if wandb_log:
            wandb.log(row)
    return log


def train_step(model, optimizers, scaler, batches, grad_accum, ctx, device, guard, grad_clip, spike_factor,
               max_bad_steps, world=None):
    """One update: grad_accum micro-batches forward and backward, gradients averaged over the processes, clipped,
    and the optimizers stepped unless the guard calls the update bad. Returns the step's mean loss (0-d, on device).
    No host sync anywhere: the CPU only queues GPU work and runs ahead, so the next micro-batch is read, pinned
    and copied (non_blocking) while the GPU still computes the one before."""
    world = world or (dist.get_world_size() if dist.is_initialized() else 1)  # 1: this process trains alone
    inner = getattr(model, "_orig_mod", model)  # the DDP or FSDP module under torch.compile
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once, after the last micro-batch;
        # earlier ones just accumulate locally
        last = micro == grad_accum - 1
        if hasattr(inner, "set_requires_gradient_sync"):
            inner.set_requires_gradient_sync(last)
        with (inner.no_sync() if isinstance(inner, DDP) and not last else nullcontext()), ctx:
            _, loss = model(x, y)
            loss = loss / grad_accum
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if world > 1:  # every rank must make the same skip decision: judge the mean loss of all ranks
        dist.all_reduce(step_loss)
        step_loss /= world
    for optimizer in optimizers:
        scaler.unscale_(optimizer)  # a no-op unless fp16: clipping and the guard see the true gradients
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor (already summed over the shards)
        norm = norm.full_tensor()
    # under fp16 an Inf gradient is the GradScaler's business (it skips the step and lowers the scale, often a
    # few steps in a row at the start): only the loss speaks to the guard then
    norm = None if scaler.is_enabled() else norm
    apply_update(optimizers, scaler, guard_update(guard, step_loss, norm, spike_factor, max_bad_steps))
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return step_loss


@torch.no_grad()
def evaluate(model, loaders, ctx, eval_iters, world, device):
    """Mean loss per split over its first eval_iters fixed batches (at most one pass over the split), averaged
    over ranks. Called with the uncompiled model: a compiled one would compile again for eval mode."""
    model.eval()
    out = {}
    for split, make in loaders.items():
        batches = make()
        n = min(eval_iters, batches.per_epoch)
        total = torch.zeros((), device=device)
        for _ in range(n):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            with ctx:
                total += model(x, y)[1].float()
        mean = total / n
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        out[split] = mean.item()
    model.train()
    return out


def eval_report(iter_num, losses, bytes_per_token, tokens_per_iter, mc=None):
    """Prints the line of an evaluation (losses: evaluate's; mc: multiple_choice's scores, if any), with the val
    loss in bits per byte; returns its metrics row."""
    bpb = losses["val"] / math.log(2) / bytes_per_token
    scored = f", multiple choice acc_norm {mc['acc_norm']:.4f} ({mc['n']} rows)" if mc else ""
    print(f"step {iter_num}: train loss {losses.get('train', math.nan):.4f}, val loss {losses['val']:.4f}, "
          f"val bits/byte {bpb:.4f}{scored}")
    return dict(step=iter_num, train_loss=losses.get("train"), val_loss=losses["val"], val_bpb=bpb,
                tokens=iter_num * tokens_per_iter, **({f"mc_{k}": v for k, v in mc.items()} if mc else {}))


def progress(iter_num, max_iters, loss, lr, dt, tokens_per_iter, flops_per_iter, peak, device):
    """Prints the progress line of a log step (dt: seconds per step); returns its metrics row."""
    tok_s, mfu = tokens_per_iter / dt, flops_per_iter / dt / peak
    mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # GPU peak, or CPU RSS peak
    print(f"step {iter_num}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}% | "
          f"mem {mem:.2f} GiB | {1000 * dt:.0f} ms/step | ETA {(max_iters - iter_num) * dt:.0f}s")
    return dict(step=iter_num, loss=loss, lr=lr, tokens_per_s=tok_s, mfu=mfu, mem_gib=mem, ms_per_step=1000 * dt,
                tokens=iter_num * tokens_per_iter)


def farewell(stopped, iter_num, tokens_per_iter, best_val_loss, bytes_per_token, seconds, world, out_dir):
    """The run's last lines: how far it got, and how to go on if a signal stopped it."""
    best = (f"best val loss {best_val_loss:.4f} ({best_val_loss / math.log(2) / bytes_per_token:.4f} bits/byte)"
            if math.isfinite(best_val_loss) else "no evaluation yet")
    summary = f"{iter_num} steps, {iter_num * tokens_per_iter:,} tokens in {seconds:.0f}s; {best}"
    if not stopped:
        return f"done: {summary}; checkpoint in {out_dir}"
    return (f"so far: {summary}\nstopped by {STOP.get('signal', 'a signal on another rank')} at step {iter_num}; "
            f"checkpoint saved in {out_dir}. Resume with: {resume_command(world, sys.argv)}")


def main():
    global device
    t_launch = time.time()
    config = configure(globals())
    rank, _, world, device = setup_distributed(device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    dtype_name, ptdtype = resolve_dtype(dtype, device)
    check_precision(dtype_name, sharding, bf16_residual)
    check_guard_settings(max_bad_steps, spike_factor)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32 on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    grad_accum = micro_steps(gradient_accumulation_steps, world)
    tokens_per_iter = grad_accum * world * batch_size * block_size
    if grad_accum * world != gradient_accumulation_steps:
        say(f"note: gradient_accumulation_steps={gradient_accumulation_steps} does not divide by the {world} "
            f"processes, so each takes {grad_accum} micro-step(s): the global batch grew from "
            f"{gradient_accumulation_steps * batch_size * block_size:,} to {tokens_per_iter:,} tokens per step")
    schedule = lambda it: get_lr(it, learning_rate, warmup_iters, lr_decay_iters or max_iters, min_lr, lr_schedule,
                                 cooldown_frac) if decay_lr else learning_rate
    if decay_lr and lr_decay_iters > max_iters:
        say(f"warning: lr_decay_iters={lr_decay_iters} > max_iters={max_iters}: the LR ends at "
            f"{schedule(max_iters - 1):.2e}, not min_lr {min_lr:.2e}; set --lr_decay_iters=0 to follow max_iters")

    data_dir, meta, tok = load_data(data_root, dataset)
    check_out_dir(out_dir, init_from)
    model_args, weights, ckpt = init_model(init_from, out_dir, data_dir, meta, config)
    if block_size > model_args["block_size"]:
        raise SystemExit(f"error: block_size {block_size} > the model's {model_args['block_size']}")
    raw_model = build_model(model_args, weights, seed, device)  # the GPT: state dicts and FLOPs come from it
    model = parallelize(raw_model, device, world, compile, grad_ckpt, sharding, loss_chunk, fp8, bf16_residual)
    optimizers = make_optimizers(raw_model, world, sharding, weight_decay, learning_rate, (beta1, beta2), device,
                                 optimizer, embed_lr, head_lr, muon_lr, muon_momentum, muon_weight_decay)
    scaler = torch.amp.GradScaler(enabled=(ptdtype == torch.float16))  # fp16 needs loss scaling, bf16 does not
    iter_num, best_val_loss, data_state, guard = restore(ckpt, raw_model, optimizers, scaler, device)
    del ckpt, weights
    if init_from == "resume" and iter_num >= max_iters:  # saving again under the same name would not be atomic
        say(f"nothing to do: the checkpoint in {out_dir} is at step {iter_num}, max_iters={max_iters}")
        return
    train_ds, batches, loaders = make_batches(data_dir, meta, block_size, batch_size, rank, world, seed, data_state,
                                              eval_train, pin=device.startswith("cuda"))
    ctx = autocast(device, ptdtype)
    mc = mc_rows(eval_mc, data_root, eval_mc_rows) if eval_mc else None
    bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    peak = peak_flops(device, ptdtype)
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
    if master:
        announce(raw_model, optimizers, world, device, dtype_name, tokens_per_iter, len(train_ds))
    log = open_out_dir(out_dir, os.path.join(data_dir, meta["tokenizer"]), world, master, config, wandb_log,
                       wandb_project, wandb_run_name)

    def checkpoint():  # every rank calls it (under FSDP and ZeRO-1, gathering is a collective); rank 0 writes
        if save_checkpoints and (master or (sharding != "ddp" and world > 1)):
            model_state, optimizer_state = full_state_dicts(raw_model, optimizers)
            if master:
                save_checkpoint(out_dir, dict(model=model_state, optimizer=optimizer_state,
                                              scaler=scaler.state_dict(), model_args=model_args, config=config,
                                              iter_num=iter_num, best_val_loss=best_val_loss, data=batches.state(),
                                              tokenizer_hash=meta["tokenizer_hash"], guard=guard.cpu()))

    stop_group = catch_stop_signals(world, device)
    bad_seen, stopped = guard[GUARD_FIELDS.index("total")].item(), False
    # the log window: its loss sums the steps since loss_from, its step rate times the steps since t0_iter
    start_iter, t0, t0_iter, loss_sum, loss_from = iter_num, time.time(), iter_num, torch.zeros((), device=device), iter_num
    while True:
        if (iter_num % eval_interval == 0 and iter_num != start_iter) or iter_num == max_iters:
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # steps still queued on the GPU are training time, not evaluation's
            t_eval = time.time()
            losses = evaluate(raw_model, loaders, ctx, eval_iters, world, device)
            scores = multiple_choice(raw_model, tok, mc, device, ctx, rank=rank, world=world) if mc else None
            if master:
                log(**eval_report(iter_num, losses, bytes_per_token, tokens_per_iter, scores),
                    elapsed_s=time.time() - t_launch, time=time.time())
            if losses["val"] < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                checkpoint()
            t0 += time.time() - t_eval  # the step rate (tok/s, MFU, ETA) leaves evaluation and checkpointing out
            if stop_at_val_loss and losses["val"] <= stop_at_val_loss:
                say(f"val loss {losses['val']:.4f} <= stop_at_val_loss {stop_at_val_loss} at step {iter_num}, "
                    f"{time.time() - t_launch:.1f}s after start")
                break
        if iter_num >= max_iters:
            break

        lr = schedule(iter_num)
        set_lr(optimizers, lr / learning_rate)
        torch.manual_seed(seed + 1_000_003 * rank + iter_num)  # dropout, from (seed, rank, step): a resume replays it
        loss_sum += train_step(model, optimizers, scaler, batches, grad_accum, ctx, device, guard, grad_clip,
                               spike_factor, max_bad_steps)
        iter_num += 1
        at_log = iter_num % log_interval == 0
        if iter_num == start_iter + 1 and master:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"first step done {time.time() - t_launch:.1f}s after start (set-up and compilation included)")
            log(step=iter_num, first_step_s=time.time() - t_launch, time=time.time())
            if not at_log:  # the step rate leaves the first step's compilation out
                t0, t0_iter = time.time(), iter_num
        if at_log:
            if master:  # the only host sync in the loop
                row = progress(iter_num, max_iters, loss_sum.item() / (iter_num - loss_from), lr,
                               (time.time() - t0) / max(iter_num - t0_iter, 1), tokens_per_iter, flops_per_iter,
                               peak, device)
                log(**row, elapsed_s=time.time() - t_launch, time=time.time())
            t0, t0_iter, loss_sum, loss_from = time.time(), iter_num, torch.zeros((), device=device), iter_num
        if at_log or iter_num == max_iters:  # faults, acted on where every rank agrees (the guard is the same on all)
            bad_seen, error = read_guard(guard, bad_seen, iter_num, master, spike_factor, max_bad_steps, out_dir)
            if error:  # max_bad_steps in a row: save the weights from before them
                checkpoint()
                raise SystemExit(error)
        if stop_requested(world, at_log, stop_group):
            checkpoint()
            stopped = True
            break

    say(farewell(stopped, iter_num, tokens_per_iter, best_val_loss, bytes_per_token, time.time() - t_launch, world,
                 out_dir), flush=True)
    leave_process_group(world)


if __name__ == "__main__":
    try:
        main()
        # DDP/FSDP wrappers sit in reference cycles that keep the process group's C++ objects alive until
        # interpreter shutdown, where gloo can abort ("terminate called without an active exception"): free them now
        gc.collect()
    except SystemExit as e:  # a user error is the same on every rank: under torchrun, rank 0 alone says it
        if os.environ.get("RANK", "0") != "0" and str(e.code).startswith("error:"):
            raise SystemExit(1) from None
        raise
    except torch.OutOfMemoryError:
        raise SystemExit(f"error: out of GPU memory with batch_size={batch_size} x block_size={block_size}; lower "
                         f"batch_size and raise gradient_accumulation_steps by the same factor (same tokens per step), "
                         f"or set --grad_ckpt=full to recompute activations") from None
    except KeyboardInterrupt:  # Ctrl-C a second time (request_stop): quit at once, the last checkpoint stays
        os.write(2, f"interrupted: quit without saving; the last checkpoint in {out_dir} is kept\n".encode())
        raise SystemExit(130) from None
