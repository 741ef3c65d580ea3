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

Scale (the config keys under "scale", applied by scale.py): bf16 autocast over fp32 weights, gradient checkpointing,
the loss without the (B, T, vocab) logits, fp8 matmuls in the head and MLPs (fp8.py), a bf16 residual stream; DDP,
ZeRO-1 or FSDP2.
Checkpoints hold whole (unsharded) state dicts whatever the sharding: any run resumes (or samples) from any other's
checkpoint, on any number of processes (on another number, the epoch goes on from a different window).
Across nodes, set NCCL_SOCKET_IFNAME / NCCL_IB_HCA if NCCL picks the wrong network, and give both nodes the
same data (data_root) and a shared out_dir (only rank 0 writes; resuming reads it on every node).

Writes out_dir/: ckpt-NNNNNNN.pt + latest.json (checkpoints), tokenizer.bpe, metrics.jsonl.
Config files are executed Python: run only the ones you trust. Checkpoints are loaded with
weights_only=True, so a checkpoint can never run code.
"""
import gc
import math
import os
import resource
import time
import types
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import scale
from checkpoint import (build_model, check_out_dir, full_state_dicts, init_model, open_log, restore_run,
                        save_checkpoint)
from compute import autocast, compute_cleanup, compute_init, dtype_name
from configurator import configure
from dataloader import load_data, make_batches
from eval import mc_rows, multiple_choice
from faults import (GUARD_WARMUP, catch_stop_signals, check_guard_settings, farewell, faults_and_stops,
                    guarded_update, interrupted_note)
from model import GPTConfig
from muon import Muon

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
short_block_size = 0        # > 0: for the first short_block_iters steps each window is cut into sequences of this many
short_block_iters = 0       # tokens: the same tokens a step, a shorter context, cheaper attention (a sequence-length
                            # schedule, like the growing attention window of modded-nanogpt's record)
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
muon_ns = "jordan"          # jordan | polar_express (per-step minimax quintics, Amsel et al. 2025: muon.py)
muon_normuon = False        # NorMuon (Li et al. 2025): each row of Muon's update normalised by its second moment's EMA
muon_cautious_wd = False    # decay only where update and weight share a sign (Chen et al. 2025; with muon_weight_decay)
muon_momentum_warmup = 0    # steps over which Muon's momentum rises linearly from 0.85 to muon_momentum; 0 = none
# learning-rate schedule: linear warmup, then cosine (or wsd: flat, then linear) decay to min_lr at lr_decay_iters
decay_lr = True
lr_schedule = "cosine"      # cosine | wsd (warmup-stable-decay, Hu et al. 2024: flat, then linear over the last cooldown_frac)
cooldown_frac = 0.2
cooldown_patience = 0       # wsd: > 0 ends the flat phase once val loss has not improved for this many evaluations in
                            # a row, then cools down for cooldown_frac of the run: its length by its val curve (the
                            # right step count differs from corpus to corpus), at most max_iters
warmup_iters = 2000
lr_decay_iters = 0          # 0 = max_iters (the decay ends with the run)
min_lr = 6e-5               # the floor of the decay, as a fraction of each group's lr: min_lr / learning_rate
# system
device = "auto"             # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, else fp16, fp32 on CPU)
compile = False             # torch.compile the model
# scale
grad_ckpt = None            # recompute activations in the backward: None/"none" | "full" (every block) | k (every k-th)
sharding = "ddp"            # under torchrun: ddp (a full copy per process) | zero1 (DDP, optimizer state sharded) |
                            # fsdp (FSDP2: params, grads, optimizer state sharded)
loss_chunk = 0              # > 0: rows of logits alive at once in the loss (fp8.LinearCrossEntropy); 0: plain logits
fp8 = "none"                # fp8 matmuls (fp8.py): none | head (lm_head; needs loss_chunk=0) | mlp (every MLP) | both
bf16_residual = False       # the residual stream in bf16, not fp32: less memory traffic (needs dtype bfloat16)
seed = 1337
stop_at_val_loss = 0.0      # > 0: stop at the first evaluation whose val loss is at or below this (speedruns)
# faults: a bad update (loss NaN/Inf, or above spike_factor x its running average) is skipped, not applied
max_bad_steps = 5           # this many bad updates in a row stop the run, with the weights from before them saved
spike_factor = 2.0          # loss > spike_factor x running average is a spike; 0 = only NaN/Inf are bad
# -----------------------------------------------------------------------------
# the keys' ranges and choices, checked by configure (what depends on other keys or an open bound: check_settings)
RULES = dict(eval_interval=(1, None), eval_iters=(1, None), eval_mc_rows=(0, None), log_interval=(1, None),
             batch_size=(1, None), block_size=(1, None), short_block_size=(0, None), short_block_iters=(0, None),
             gradient_accumulation_steps=(1, None), vocab_size=(int, 1, None), n_layer=(1, None), n_head=(1, None),
             n_embd=(1, None), dropout=(0.0, 1.0), n_kv_head=(int, 1, None), pos_encoding=("learned", "rope"),
             norm=("layernorm", "rmsnorm"), mlp=("gelu", "swiglu"), mlp_hidden=(0, None), sliding_window=(0, None),
             logit_softcap=(0.0, None), bigram_embeds=(0, None), optimizer=("adamw", "muon"), max_iters=(0, None),
             weight_decay=(0.0, None), beta1=(0.0, 1.0), beta2=(0.0, 1.0), grad_clip=(0.0, None),
             embed_lr=(0.0, None), head_lr=(0.0, None), muon_lr=(0.0, None), muon_momentum=(0.0, 1.0),
             muon_weight_decay=(0.0, None), muon_ns=("jordan", "polar_express"), muon_momentum_warmup=(0, None),
             lr_schedule=("cosine", "wsd"), cooldown_frac=(0.0, 1.0), cooldown_patience=(0, None),
             warmup_iters=(0, None), lr_decay_iters=(0, None), min_lr=(0.0, None),
             dtype=("auto", "float32", "bfloat16", "float16"), grad_ckpt=((str, int),),
             sharding=("ddp", "zero1", "fsdp"), loss_chunk=(0, None), learning_rate=(0.0, None),
             rope_theta=(0.0, None), stop_at_val_loss=(0.0, None), max_bad_steps=(1, None), spike_factor=(0.0, None),
             fp8=("none", "head", "mlp", "both"))


def cooldown_start(lr_decay_iters, cooldown_frac):
    """The step where wsd's linear cooldown starts: the last cooldown_frac of lr_decay_iters steps (at least one)."""
    return lr_decay_iters - max(int(cooldown_frac * lr_decay_iters), 1)


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", cooldown_frac=0.2):
    """Linear warmup from ~0 to learning_rate over warmup_iters, then down to min_lr at lr_decay_iters: along a
    cosine, or (wsd) flat until the last cooldown_frac of the steps and linear from there."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        start = cooldown_start(lr_decay_iters, cooldown_frac)
        ratio = max(it - start, 0) / (lr_decay_iters - start)
        return learning_rate - ratio * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

# ---------------------------------------------------------------------------- optimizers


def make_optimizers(model, *, world, sharding, weight_decay, learning_rate, betas, device, kind="adamw",
                    embed_lr=0.0, head_lr=0.0, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0,
                    muon_variants=None):
    """The optimizers of the GPT's parameters, as a list that the loop steps one after the other.
    adamw: one AdamW (made after FSDP2 sharded the parameters, it holds this process's shards only). With
    sharding='zero1' (ZeRO stage 1, Rajbhandari et al. 2020) each process keeps whole weights and gradients, as
    under DDP, but AdamW's moments for only 1/world of the parameters: it updates those, then broadcasts them.
    muon: Muon (Jordan et al. 2024: momentum, then the update orthogonalised by Newton-Schulz iterations) for the
    blocks' 2-D weights, and AdamW for the embeddings, the head and the gains, which Muon is not meant for. Under
    ZeRO-1 and FSDP2 each of Muon's weights is orthogonalised whole by one process (muon.py says how).
    muon_variants: Muon's ns, normuon and cautious_wd (muon.py), as a dict; None: Muon's own update.
    Each optimizer keeps its groups' own lrs in .base_lrs (not in the groups: checkpoints load into optimizers
    made without them); the schedule scales them all by one factor."""
    fused = device.startswith("cuda")
    zero1 = world > 1 and sharding == "zero1"
    if kind not in ("adamw", "muon"):
        raise SystemExit(f"error: optimizer must be 'adamw' or 'muon', got {kind!r}")
    if kind == "adamw":
        groups = model.configure_optimizers(weight_decay, learning_rate, betas, device.split(":")[0]).param_groups
        muon = None
    else:
        muon_params, parts = [], {"embed": [], "head": [], "gain": []}
        for name, p in model.named_parameters():
            if name.startswith("transformer.h.") and p.dim() == 2:
                muon_params.append(p)
            else:  # embeddings (wte, wpe, value embeddings), the head, the gains
                parts["gain" if p.dim() < 2 else "head" if name.startswith("lm_head") else "embed"].append(p)
        groups = [dict(params=parts["embed"], lr=embed_lr or learning_rate, weight_decay=0.0),
                  dict(params=parts["head"], lr=head_lr or learning_rate, weight_decay=0.0),
                  dict(params=parts["gain"], lr=learning_rate, weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]  # no head group with a tied head: torch's loader refuses one
        muon = Muon(muon_params, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay, owners=zero1,
                    **(muon_variants or {}))
    adamw = dict(lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # here: importing it takes 0.6 s
        # parameters_as_bucket_view: one broadcast per rank, not one per parameter
        adamw = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, parameters_as_bucket_view=True,
                                        **adamw)
    else:
        adamw = torch.optim.AdamW(groups, **adamw)
    optimizers = [adamw] + ([muon] if muon else [])
    for opt in optimizers:
        opt.base_lrs = [group["lr"] for group in opt.param_groups]
    return optimizers


def set_lr(optimizers, factor):
    """Every group's lr = its own initial lr x factor (the schedule's lr / learning_rate)."""
    for opt in optimizers:
        for group, base in zip(opt.param_groups, opt.base_lrs):
            group["lr"] = base * factor


def set_muon_momentum(optimizers, it, momentum, warmup):
    """Muon's momentum (its groups: the optimizers after AdamW) at step it: from 0.85 linearly to `momentum` over the
    first `warmup` steps (Jordan's speedruns: a shorter memory while the early gradients change fast), then it."""
    for group in (g for opt in optimizers[1:] for g in opt.param_groups):
        group["momentum"] = momentum if it >= warmup else 0.85 + (momentum - 0.85) * it / warmup


# ---------------------------------------------------------------------------- the run


def load_pretrained(init_from):
    import export  # only here: it is the Hugging Face side of the pipeline
    return export.load_pretrained(init_from)


def setup_step(raw_model, cfg, *, device, world, ptdtype, grad_accum):
    """What a training step needs around the GPT of the config cfg: (its optimizers, the GradScaler (fp16 needs loss
    scaling, bf16 does not), the autocast context, step(batches, guard) -> one update's mean loss). The step runs
    the module scale.parallelize made (checkpointed, compiled, DDP/FSDP-wrapped). main and bench.py both call it."""
    model = scale.parallelize(raw_model, device, world, compile=cfg.compile, grad_ckpt=cfg.grad_ckpt,
                              sharding=cfg.sharding, loss_chunk=cfg.loss_chunk, fp8=cfg.fp8,
                              bf16_residual=cfg.bf16_residual)
    optimizers = make_optimizers(raw_model, world=world, sharding=cfg.sharding, weight_decay=cfg.weight_decay,
                                 learning_rate=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), device=device,
                                 kind=cfg.optimizer, embed_lr=cfg.embed_lr, head_lr=cfg.head_lr, muon_lr=cfg.muon_lr,
                                 muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay,
                                 muon_variants=dict(ns=cfg.muon_ns, normuon=cfg.muon_normuon,
                                                    cautious_wd=cfg.muon_cautious_wd))
    scaler = torch.amp.GradScaler(enabled=(ptdtype == torch.float16))
    ctx = autocast(device, ptdtype)

    def step(batches, guard, judge_update=True, seq_len=0):
        return train_step(model, optimizers, scaler, batches, grad_accum=grad_accum, ctx=ctx, device=device,
                          guard=guard, grad_clip=cfg.grad_clip, spike_factor=cfg.spike_factor,
                          max_bad_steps=cfg.max_bad_steps, world=world, judge_update=judge_update, seq_len=seq_len)
    return optimizers, scaler, ctx, step


def check_settings(cfg):
    """What RULES cannot say (open bounds, a non-empty path, the guard's 0-or->1), each a one-line error."""
    for key, above in (("learning_rate", 0), ("rope_theta", 0), ("beta1", None), ("beta2", None),
                       ("muon_momentum", None)):  # RULES gave [0, inf) or [0, 1]: the open end is checked here
        value = getattr(cfg, key)
        if value == above or value == 1 and above is None:
            raise SystemExit(f"error: --{key}={value!r} is out of range; give a value "
                             f"{'> 0' if above == 0 else 'in [0, 1)'}")
    if cfg.cooldown_patience and (cfg.lr_schedule != "wsd" or not cfg.decay_lr or cfg.lr_decay_iters):
        raise SystemExit("error: cooldown_patience needs lr_schedule='wsd', decay_lr=True and lr_decay_iters=0: it "
                         "decides where the decay ends")
    muon_keys = dict(muon_ns="jordan", muon_normuon=False, muon_cautious_wd=False, muon_momentum_warmup=0)
    changed = [k for k, off in muon_keys.items() if getattr(cfg, k) != off]
    if changed and cfg.optimizer != "muon":
        raise SystemExit(f"error: --{changed[0]} is a Muon setting and optimizer={cfg.optimizer!r}; set "
                         f"--optimizer=muon")
    if bool(cfg.short_block_size) != bool(cfg.short_block_iters):
        raise SystemExit("error: short_block_size and short_block_iters go together: give both (or neither), e.g. "
                         "--short_block_size=256 --short_block_iters=500")
    if cfg.short_block_size and cfg.block_size % cfg.short_block_size:
        raise SystemExit(f"error: short_block_size={cfg.short_block_size} does not divide block_size={cfg.block_size}; "
                         f"give a divisor, e.g. {cfg.block_size // 4}")
    if not cfg.out_dir.strip():
        raise SystemExit("error: --out_dir is empty; give the directory the run writes to, e.g. --out_dir=out/run")
    check_guard_settings(cfg.max_bad_steps, cfg.spike_factor)


def make_schedule(cfg, say):
    """The LR of step it: get_lr's warmup and decay to lr_decay_iters (0 = max_iters), or learning_rate throughout
    without decay_lr; a one-line warning when the decay would outlast the run."""
    if not cfg.decay_lr:
        return lambda it: cfg.learning_rate
    schedule = lambda it: get_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters,
                                 cfg.min_lr, cfg.lr_schedule, cfg.cooldown_frac)
    if cfg.lr_decay_iters > cfg.max_iters:
        say(f"warning: lr_decay_iters={cfg.lr_decay_iters} > max_iters={cfg.max_iters}: the LR ends at "
            f"{schedule(cfg.max_iters - 1):.2e}, not min_lr {cfg.min_lr:.2e}; set --lr_decay_iters=0 to follow "
            f"max_iters")
    return schedule


def plateau_end(run, cfg):
    """With cooldown_patience, the step the run now ends at: its val loss has not improved for cooldown_patience
    evaluations, so the cooldown starts here and lasts cooldown_frac of the whole run (get_lr's wsd with max_iters =
    that step). None while the rule does not apply: off, in warmup, already cooling down, or improving."""
    if (not cfg.cooldown_patience or run.end or run.evals_since_best < cfg.cooldown_patience
            or not cfg.warmup_iters <= run.iter_num < cooldown_start(cfg.max_iters, cfg.cooldown_frac)):
        return None
    end = run.iter_num + 1
    while cooldown_start(end, cfg.cooldown_frac) < run.iter_num:
        end += 1
    return end


def announce(model, optimizers, world, device, dtype_name, tokens_per_iter, train_windows, *, mfu_ref):
    """The run's first lines: its size, where it runs and what MFU is against; a warning for a GPU-sized run on a
    CPU."""
    params = model.num_params()
    print(f"{params / 1e6:.2f}M parameters | {world} process(es) on {device}, {dtype_name} | "
          f"{tokens_per_iter:,} tokens/step | {train_windows:,} train windows | mfu vs {mfu_ref}")
    if device == "cpu" and (params > 50e6 or tokens_per_iter > 100_000):
        print(f"warning: a GPU-sized run on the CPU ({params / 1e6:.0f}M parameters, {tokens_per_iter:,} tokens per "
              f"step) takes minutes to hours per step; config/small.py is sized for a CPU")
    if hasattr(optimizers[0], "optim"):  # ZeRO-1: how much of AdamW's state this process keeps
        count = lambda groups: sum(p.numel() for g in groups for p in g["params"])
        print(f"zero1: AdamW state for {count(optimizers[0].optim.param_groups):,} of the "
              f"{count(optimizers[0].param_groups):,} parameters on this process")


def make_saver(run, cfg, model, optimizers, scaler, *, model_args, config, batches, tokenizer_hash):
    """save(): a checkpoint of the run as it is now. Every rank calls it (under FSDP and ZeRO-1, gathering is a
    collective); rank 0 writes."""
    def save():
        if cfg.save_checkpoints and (run.master or (cfg.sharding != "ddp" and run.world > 1)):
            model_state, optimizer_state = full_state_dicts(model, optimizers)
            if run.master:
                save_checkpoint(cfg.out_dir, dict(model=model_state, optimizer=optimizer_state,
                                                  scaler=scaler.state_dict(), model_args=model_args, config=config,
                                                  iter_num=run.iter_num, best_val_loss=run.best_val_loss,
                                                  data=batches.state(), tokenizer_hash=tokenizer_hash,
                                                  guard=run.guard.cpu(), end=run.end,
                                                  evals_since_best=run.evals_since_best))
    return save


def train_step(model, optimizers, scaler, batches, *, grad_accum, ctx, device, guard, grad_clip, spike_factor,
               max_bad_steps, world=None, judge_update=True, seq_len=0):
    """One update: grad_accum micro-batches forward and backward, gradients averaged over the processes, clipped,
    and the optimizers stepped unless the guard calls the update bad (faults.guarded_update). Returns the step's
    mean loss (0-d, on device).
    judge_update: also judge the applied update (a copy of the weights and optimizer state, and one host sync at
    the end; faults.guarded_update). Otherwise no host sync anywhere: the CPU only queues GPU work and runs ahead,
    so the next micro-batch is read, pinned and copied (non_blocking) while the GPU still computes the one before.
    seq_len > 0: each (B, T) micro-batch is cut into (B * T / seq_len, seq_len) sequences; a target stays the token
    after its input (x and y are cut at the same places)."""
    world = world or (dist.get_world_size() if dist.is_initialized() else 1)  # 1: this process trains alone
    inner = getattr(model, "_orig_mod", model)  # the DDP or FSDP module under torch.compile
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = (t.to(device, non_blocking=True).view(-1, seq_len or t.size(1)) for t in next(batches))
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
    # few steps in a row at the start): only the loss (and the update) speak to the guard then
    norm = None if scaler.is_enabled() else norm
    guarded_update(optimizers, scaler, guard, list(model.parameters()), step_loss, norm, spike_factor=spike_factor,
                   max_bad_steps=max_bad_steps, judge=judge_update)
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


def evaluate_and_save(run, cfg, model, loaders, ctx, *, mc, tok, log, save):
    """An evaluation of the GPT (mc: multiple choice rows too), printed and logged; a checkpoint if val loss improved
    (or always_save_checkpoint). Returns True if val loss reached stop_at_val_loss."""
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()  # steps still queued on the GPU are training time, not evaluation's
    t_eval = time.time()
    losses = evaluate(model, loaders, ctx, cfg.eval_iters, run.world, run.device)
    scores = multiple_choice(model, tok, mc, run.device, ctx, rank=run.rank, world=run.world) if mc else None
    if not math.isfinite(losses["val"]):  # the same on every rank (all-reduced): no checkpoint of such weights
        raise SystemExit(f"error: val loss {losses['val']} at step {run.iter_num}: the weights are broken, so they "
                         f"were not saved; the last checkpoint in {cfg.out_dir} (if any) is from before. Lower "
                         f"learning_rate or check the data, then resume with --init_from=resume")
    if run.master:  # the val loss in bits per byte too; only what was measured
        bpb = losses["val"] / math.log(2) / run.bytes_per_token
        scored = f", multiple choice acc_norm {scores['acc_norm']:.4f} ({scores['n']} rows)" if scores else ""
        train = f"train loss {losses['train']:.4f}, " if "train" in losses else ""
        print(f"step {run.iter_num}: {train}val loss {losses['val']:.4f}, val bits/byte {bpb:.4f}{scored}")
        log(step=run.iter_num, train_loss=losses.get("train"), val_loss=losses["val"], val_bpb=bpb,
            tokens=run.iter_num * run.tokens_per_iter, **{f"mc_{k}": v for k, v in (scores or {}).items()},
            elapsed_s=time.time() - run.t_launch, time=time.time())
    improved = losses["val"] < run.best_val_loss
    run.evals_since_best = 0 if improved else run.evals_since_best + 1
    end = plateau_end(run, cfg)
    if end:  # decided before the checkpoint, which then holds it: a resumed run ends at the same step
        run.end = cfg.max_iters = end
        if run.master:
            print(f"val loss has not improved for {run.evals_since_best} evaluations: the cooldown starts now, the "
                  f"run ends at step {end} (cooldown_patience={cfg.cooldown_patience})")
    if improved or cfg.always_save_checkpoint:
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        save()
    run.t0 += time.time() - t_eval  # the step rate (tok/s, MFU, ETA) leaves evaluation and checkpointing out
    reached = bool(cfg.stop_at_val_loss) and losses["val"] <= cfg.stop_at_val_loss
    if reached and run.master:
        print(f"val loss {losses['val']:.4f} <= stop_at_val_loss {cfg.stop_at_val_loss} at step {run.iter_num}, "
              f"{time.time() - run.t_launch:.1f}s after start")
    return reached


def open_window(run):
    """A new log window: its loss sums the steps since loss_from, its step rate times the steps since t0_iter."""
    run.t0, run.t0_iter, run.loss_sum, run.loss_from = time.time(), run.iter_num, torch.zeros((), device=run.device), \
        run.iter_num


def log_step(run, cfg, lr, *, log, flops_per_iter, peak):
    """After a step: the first step's time since launch, and at log steps the progress line and row (loss, tokens/s,
    MFU against peak FLOP/s, memory), then a new log window. Returns whether this was a log step."""
    at_log = run.iter_num % cfg.log_interval == 0
    if run.iter_num == run.start_iter + 1 and run.master:
        if run.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"first step done {time.time() - run.t_launch:.1f}s after start (set-up and compilation included)")
        log(step=run.iter_num, first_step_s=time.time() - run.t_launch, time=time.time())
        if not at_log:  # the step rate leaves the first step's compilation out
            run.t0, run.t0_iter = time.time(), run.iter_num
    if not at_log:
        return False
    if run.master:  # the only host sync in the loop
        dt = (time.time() - run.t0) / max(run.iter_num - run.t0_iter, 1)
        loss, tok_s, mfu = run.loss_sum.item() / (run.iter_num - run.loss_from), run.tokens_per_iter / dt, \
            flops_per_iter / dt / peak
        mem = (torch.cuda.max_memory_allocated() if run.device.startswith("cuda") else
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # GPU peak, or CPU RSS peak
        print(f"step {run.iter_num}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu "
              f"{100 * mfu:.1f}% | mem {mem:.2f} GiB | {1000 * dt:.0f} ms/step | "
              f"ETA {(cfg.max_iters - run.iter_num) * dt:.0f}s")
        log(step=run.iter_num, loss=loss, lr=lr, tokens_per_s=tok_s, mfu=mfu, mem_gib=mem, ms_per_step=1000 * dt,
            tokens=run.iter_num * run.tokens_per_iter, elapsed_s=time.time() - run.t_launch, time=time.time())
    open_window(run)
    return True


def main():
    run = types.SimpleNamespace(t_launch=time.time())  # the run's constants and the loop's counters
    config = configure(globals())
    cfg = types.SimpleNamespace(**config)
    run.rank, _, run.world, run.device = compute_init(cfg.device)
    run.master, device = run.rank == 0, run.device
    say = print if run.master else (lambda *a, **k: None)
    ptdtype, grad_accum = scale.setup(cfg, device, run.world, say)  # precision, TF32, micro-steps per process
    check_settings(cfg)
    run.tokens_per_iter = grad_accum * run.world * cfg.batch_size * cfg.block_size
    schedule = make_schedule(cfg, say)

    data_dir, meta, tok = load_data(cfg.data_root, cfg.dataset)
    check_out_dir(cfg.out_dir, resume=cfg.init_from == "resume")
    model_args, weights, ckpt = init_model(cfg.init_from, cfg.out_dir, data_dir, meta, config,
                                           load_pretrained=load_pretrained)
    raw_model = build_model(model_args, weights, cfg.seed, device)  # the GPT: state dicts and FLOPs come from it
    optimizers, scaler, ctx, step = setup_step(raw_model, cfg, device=device, world=run.world, ptdtype=ptdtype,
                                               grad_accum=grad_accum)
    restore_run(run, ckpt, raw_model, optimizers, scaler)
    cfg.max_iters = run.end or cfg.max_iters  # a run that cooldown_patience shortened stays so when resumed
    del ckpt, weights
    if cfg.init_from == "resume" and run.iter_num >= cfg.max_iters:  # saving again under the same name: not atomic
        say(f"nothing to do: the checkpoint in {cfg.out_dir} is at step {run.iter_num}, max_iters={cfg.max_iters}")
        return
    train_ds, batches, loaders = make_batches(data_dir, meta, cfg, rank=run.rank, world=run.world,
                                              data_state=run.data, pin=device.startswith("cuda"))
    mc = mc_rows(cfg.eval_mc, cfg.data_root, cfg.eval_mc_rows) if cfg.eval_mc else None
    run.bytes_per_token = meta["val_bytes"] / meta["val_tokens"]
    peak, peak_text = scale.reference_flops(device, ptdtype)
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * run.tokens_per_iter
    if run.master:
        announce(raw_model, optimizers, run.world, device, dtype_name(ptdtype), run.tokens_per_iter, len(train_ds),
                 mfu_ref=peak_text)
    log = open_log(cfg, config, os.path.join(data_dir, meta["tokenizer"]), run.world, run.master)
    save = make_saver(run, cfg, raw_model, optimizers, scaler, model_args=model_args, config=config,
                      batches=batches, tokenizer_hash=meta["tokenizer_hash"])

    stop_group = catch_stop_signals(run.world, device)
    open_window(run)
    while True:
        if (run.iter_num % cfg.eval_interval == 0 and run.iter_num != run.start_iter) or run.iter_num == cfg.max_iters:
            if evaluate_and_save(run, cfg, raw_model, loaders, ctx, mc=mc, tok=tok, log=log, save=save):
                break
        if run.iter_num >= cfg.max_iters:
            break
        lr = schedule(run.iter_num)
        set_lr(optimizers, lr / cfg.learning_rate)
        if cfg.muon_momentum_warmup:  # from the step, as the lr: a resumed run goes on exactly
            set_muon_momentum(optimizers, run.iter_num, cfg.muon_momentum, cfg.muon_momentum_warmup)
        torch.manual_seed(cfg.seed + 1_000_003 * run.rank + run.iter_num)  # dropout from (seed, rank, step): replayed
        # an update is judged once applied only in a run's first steps, where a learning rate too large for the
        # weights shows; later the gradient norm, judged before stepping, is the guard, and a step costs no copy
        run.loss_sum += step(batches, run.guard, judge_update=run.iter_num - run.start_iter < GUARD_WARMUP,
                             seq_len=cfg.short_block_size if run.iter_num < cfg.short_block_iters else 0)
        run.iter_num += 1
        at_log = log_step(run, cfg, lr, log=log, flops_per_iter=flops_per_iter, peak=peak)
        if faults_and_stops(run, cfg, at_log, save, stop_group):
            break
    say(farewell(run, cfg), flush=True)
    compute_cleanup(run.world)


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
        os.write(2, f"interrupted: quit without saving; {interrupted_note(out_dir)}\n".encode())
        raise SystemExit(130) from None
