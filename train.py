"""
Pretrain a GPT on shards made by prepare.py. One process, or many under torchrun (DDP).

    python train.py config/small.py                                      # CPU or one GPU
    python train.py config/small.py --learning_rate=3e-4 --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py # one node of 8 GPUs

Writes out_dir/: ckpt-NNNNNNN.pt + latest.json (checkpoints), tokenizer.bpe, metrics.jsonl.
Config files are executed Python: run only the ones you trust. Checkpoints are loaded with
weights_only=True, so a checkpoint can never run code.
"""
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from model import GPT, GPTConfig
from prepare import load_meta, read_header, read_shard

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 250         # evaluate (and checkpoint) every this many steps
eval_iters = 20             # batches per split for an evaluation
log_interval = 10
always_save_checkpoint = True  # else only when val loss improves
init_from = "scratch"       # scratch | resume (from out_dir's latest checkpoint)
# data
dataset = "stdlib"          # reads data_root/dataset/, made by prepare.py
data_root = "data"
batch_size = 12             # micro-batch per process
block_size = 1024
gradient_accumulation_steps = 40  # micro-steps per update, summed over all processes
# model: every field of GPTConfig (model.py) is a config key here; vocab_size comes from the data
globals().update({f.name: f.default for f in fields(GPTConfig)})
vocab_size = None           # None: the tokenizer's vocab, padded up to a multiple of 128 (faster matmuls)
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0 disables clipping
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
device = "auto"             # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, else fp16, fp32 on CPU)
compile = False             # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Linear warmup from ~0 to learning_rate over warmup_iters, then cosine down to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
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


def resolve_dtype(dtype, device):
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return dtype, {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def autocast(device, ptdtype):
    """Mixed precision: weights and optimizer state stay fp32, matmuls run in ptdtype."""
    if ptdtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=ptdtype)


def peak_flops(device, ptdtype):
    """This device's dense matmul rate in FLOP/s, measured (a datasheet number is wrong for half the
    cards people own, and meaningless on a CPU). MFU is reported against it."""
    n = 4096 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device, dtype=ptdtype)
    b = torch.randn(n, n, device=device, dtype=ptdtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.startswith("cuda") else 5
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)

# ---------------------------------------------------------------------------- data


class TokenWindows(torch.utils.data.Dataset):
    """Every (block_size + 1)-token window of the shards, stepping by block_size: window i gives the
    inputs x = tokens[s : s+T] and the targets y = tokens[s+1 : s+T+1]. Windows never cross shards."""

    def __init__(self, paths, block_size):
        self.shards = [read_shard(p) for p in paths]
        self.block_size = block_size
        counts = [max((len(s) - 1) // block_size, 0) for s in self.shards]
        self.starts = np.cumsum([0] + counts)  # window index -> shard, by binary search
        if self.starts[-1] == 0:
            raise SystemExit(f"error: block_size {block_size} is longer than the data in {paths[0]}'s split "
                             f"({max(len(s) for s in self.shards)} tokens); lower block_size or add data")

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        s = (i - self.starts[shard]) * self.block_size
        w = torch.from_numpy(self.shards[shard][s:s + self.block_size + 1].astype(np.int64))
        return w[:-1], w[1:]


class Batches:
    """Epochs over a TokenWindows: each epoch is a seeded permutation of every window, dealt round-robin
    to the ranks (no overlap between ranks, no replacement), cut into micro-batches. The position
    (epoch, batch) is saved in checkpoints, so a resumed run sees exactly the batches it would have."""

    def __init__(self, ds, batch_size, rank, world, seed, epoch=0, pos=0, pin=False):
        self.ds, self.batch_size, self.rank, self.world, self.seed = ds, batch_size, rank, world, seed
        self.epoch, self.pos, self.pin = epoch, pos, pin
        self.per_epoch = (len(ds) // world) // batch_size
        if self.per_epoch == 0:
            raise SystemExit(f"error: {len(ds)} windows of block_size {ds.block_size} are too few for "
                             f"batch_size {batch_size} x {world} processes; lower batch_size or block_size")
        self._order()

    def _order(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.order = torch.randperm(len(self.ds), generator=g)[self.rank::self.world]

    def __next__(self):
        if self.pos == self.per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order()
        idx = self.order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        x, y = (torch.stack(t) for t in zip(*(self.ds[int(i)] for i in idx)))
        if self.pin:  # page-locked memory lets the copy to the GPU run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def state(self):
        return dict(epoch=self.epoch, pos=self.pos)


def split_paths(data_dir, meta, split):
    paths = [os.path.join(data_dir, p) for p in meta[f"{split}_shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"error: shard {p} is missing; re-run prepare.py")
        if read_header(p)["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: {p} was made with another tokenizer than {data_dir}/meta.json says; "
                             f"re-run prepare.py")
    return paths

# ---------------------------------------------------------------------------- checkpoints
# out_dir/ckpt-NNNNNNN.pt are torch.save files; out_dir/latest.json names the newest complete one and its
# sha256. Each file is written under a temporary name, fsynced and renamed, and latest.json is replaced
# only after that: a kill at any moment leaves latest.json pointing at a whole, verified checkpoint.
CKPT_FORMAT = 1


class HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def atomic_write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_checkpoint(out_dir, state, keep=2):
    name = f"ckpt-{state['iter_num']:07d}.pt"
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "wb") as f:
        w = HashingWriter(f)
        torch.save(dict(state, format=CKPT_FORMAT), w)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    atomic_write_json(os.path.join(out_dir, "latest.json"),
                      dict(file=name, sha256=w.sha.hexdigest(), format=CKPT_FORMAT, iter_num=state["iter_num"]))
    old = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt-") and f.endswith(".pt"))
    for f in old[:-keep]:
        os.remove(os.path.join(out_dir, f))
    return path


def load_checkpoint(out_dir):
    """The latest checkpoint of out_dir, verified, on the CPU (so resuming needs no extra GPU memory)."""
    manifest = os.path.join(out_dir, "latest.json")
    if not os.path.isfile(manifest):
        raise SystemExit(f"error: no checkpoint in {out_dir} (missing latest.json); train one with train.py")
    try:
        with open(manifest) as f:
            m = json.load(f)
        path = os.path.join(out_dir, m["file"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SystemExit(f"error: {manifest} is corrupt; delete it to start over")
    if m.get("format") != CKPT_FORMAT:
        raise SystemExit(f"error: {path} has checkpoint format {m.get('format')}, this code reads {CKPT_FORMAT}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} named by {manifest} is missing")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != m["sha256"]:
        raise SystemExit(f"error: checkpoint {path} is corrupt or truncated (sha256 mismatch); restore it or "
                         f"start over with init_from='scratch'")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model

# ---------------------------------------------------------------------------- the run


def evaluate(model, loaders, ctx, eval_iters, world, device):
    """Mean loss per split over eval_iters fixed batches, averaged over ranks."""
    model.eval()
    out = {}
    for split, make in loaders.items():
        batches = make()
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            with ctx:
                losses[k] = model(x, y)[1].item()
        mean = losses.mean().to(device)
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        out[split] = mean.item()
    model.train()
    return out


def main():
    global vocab_size, device
    config = configure(globals())
    rank, local_rank, world, device = setup_distributed(device)
    master = rank == 0
    dtype_name, ptdtype = resolve_dtype(dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32 on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    if gradient_accumulation_steps % world:
        raise SystemExit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} must be a "
                         f"multiple of the {world} processes")
    grad_accum = gradient_accumulation_steps // world
    tokens_per_iter = grad_accum * world * batch_size * block_size

    data_dir = os.path.join(data_root, dataset)
    meta = load_meta(data_dir)
    ckpt = load_checkpoint(out_dir) if init_from == "resume" else None
    if init_from not in ("scratch", "resume"):
        raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got {init_from!r}")
    if ckpt is not None:  # the model's shape comes from the checkpoint, and the data must match it
        model_args = ckpt["model_args"]
        if ckpt["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: checkpoint in {out_dir} was trained with another tokenizer than {data_dir}; "
                             f"resume on the same data or start a new out_dir")
    else:
        if vocab_size is None:
            vocab_size = -(-meta["vocab_size"] // 128) * 128
        if vocab_size < meta["vocab_size"]:
            raise SystemExit(f"error: vocab_size {vocab_size} < the tokenizer's {meta['vocab_size']} tokens")
        model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
    if block_size > model_args["block_size"]:
        raise SystemExit(f"error: block_size {block_size} > the model's {model_args['block_size']}")

    torch.manual_seed(seed)  # same initial weights on every rank
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device.split(":")[0])
    scaler = torch.amp.GradScaler(enabled=(ptdtype == torch.float16))  # fp16 needs loss scaling, bf16 does not
    iter_num, best_val_loss, data_state = 0, float("inf"), dict(epoch=0, pos=0)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss, data_state = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["data"]
    del ckpt
    raw_model = model
    if compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)

    pin = device.startswith("cuda")
    train_ds = TokenWindows(split_paths(data_dir, meta, "train"), block_size)
    val_ds = TokenWindows(split_paths(data_dir, meta, "val"), block_size)
    batches = Batches(train_ds, batch_size, rank, world, seed, pin=pin, **data_state)
    # evaluation always uses the same windows (epoch 0 of a fixed permutation), so numbers are comparable
    loaders = {"train": lambda: Batches(train_ds, batch_size, rank, world, seed + 1, pin=pin),
               "val": lambda: Batches(val_ds, batch_size, rank, world, seed + 1, pin=pin)}
    ctx = autocast(device, ptdtype)
    bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    peak = peak_flops(device, ptdtype)
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter

    if master:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(os.path.join(data_dir, meta["tokenizer"]), os.path.join(out_dir, "tokenizer.bpe"))
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters | {world} process(es) on {device}, {dtype_name} | "
              f"{tokens_per_iter:,} tokens/step | {len(train_ds):,} train windows")
    metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None

    def log(**row):
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def checkpoint():
        save_checkpoint(out_dir, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                      scaler=scaler.state_dict(), model_args=model_args, config=config,
                                      iter_num=iter_num, best_val_loss=best_val_loss, data=batches.state(),
                                      tokenizer_hash=meta["tokenizer_hash"]))

    start_iter, t0, loss_sum = iter_num, time.time(), torch.zeros((), device=device)
    t_start = t0
    while True:
        if (iter_num % eval_interval == 0 and iter_num != start_iter) or iter_num == max_iters:
            losses = evaluate(model, loaders, ctx, eval_iters, world, device)
            bpb = losses["val"] / math.log(2) / bytes_per_token
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"val bits/byte {bpb:.4f}")
            log(step=iter_num, train_loss=losses["train"], val_loss=losses["val"], val_bpb=bpb)
            if losses["val"] < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if master:
                    checkpoint()
        if iter_num >= max_iters:
            break

        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr) if decay_lr else learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Randomness (dropout) is re-seeded from (seed, rank, step): a resumed run replays it exactly.
        torch.manual_seed(seed + 1_000_003 * rank + iter_num)
        for micro in range(grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            # DDP all-reduces gradients only on the last micro-step; earlier ones just accumulate locally
            sync = micro == grad_accum - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()), ctx:
                _, loss = model(x, y)
                loss = loss / grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % log_interval == 0 and master:  # the only host sync in the loop
            loss_val = loss_sum.item() / log_interval
            dt = (time.time() - t0) / log_interval
            tok_s = tokens_per_iter / dt
            mfu = flops_per_iter / dt / peak
            mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # GPU peak, or CPU RSS peak
            eta = (max_iters - iter_num) * dt
            print(f"step {iter_num}/{max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                  f"mfu {100 * mfu:.1f}% | mem {mem:.2f} GiB | {1000 * dt:.0f} ms/step | ETA {eta:.0f}s")
            log(step=iter_num, loss=loss_val, lr=lr, tokens_per_s=tok_s, mfu=mfu, mem_gib=mem, ms_per_step=1000 * dt)
            t0, loss_sum = time.time(), torch.zeros((), device=device)
        elif iter_num % log_interval == 0:
            t0, loss_sum = time.time(), torch.zeros((), device=device)

    if master:
        print(f"done: {iter_num} steps in {time.time() - t_start:.0f}s; checkpoint in {out_dir}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
