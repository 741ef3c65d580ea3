"""
How the model is spread over processes and sped up: the precision settings (bf16 autocast over fp32 weights, fp16
with a GradScaler where bf16 is missing, TF32 for the rest), gradient checkpointing, the chunked loss and the fp8
head and MLP (fp8.py), the bf16 residual stream, and the DDP / ZeRO-1 / FSDP2 wrapping; the micro-steps each process
takes, and the reference peak that MFU is reported against (reference_flops). train.py calls setup once, then
parallelize on its GPT.
"""
import os
import time
import types

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from compute import dtype_name, pick_dtype
from fp8 import chunk_loss, chunked_head_loss, fp8_logits_loss, use_fp8_head, use_fp8_mlp


def setup(cfg, device, world, say=print):
    """(the compute dtype, micro-steps per process) of the config cfg on `world` processes: the precision settings
    checked, TF32 on for whatever still runs in fp32 (Ampere+), and a note (say) when the global batch grew."""
    ptdtype = pick_dtype(cfg.dtype, device)
    check_precision(dtype_name(ptdtype), cfg.sharding, cfg.bf16_residual)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    grad_accum = micro_steps(cfg.gradient_accumulation_steps, world)
    if grad_accum * world != cfg.gradient_accumulation_steps:
        tokens = cfg.batch_size * cfg.block_size
        say(f"note: gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not divide by the {world} "
            f"processes, so each takes {grad_accum} micro-step(s): the global batch grew from "
            f"{cfg.gradient_accumulation_steps * tokens:,} to {grad_accum * world * tokens:,} tokens per step")
    return ptdtype, grad_accum


def micro_steps(gradient_accumulation_steps, world):
    """Micro-steps per process. The config counts them over all processes, so a config written for one process
    trains the same global batch on N processes when N divides the count; when it does not, each process takes
    ceil(count / N) and the global batch grows (to the smallest N processes can share)."""
    if type(gradient_accumulation_steps) is not int or gradient_accumulation_steps < 1:
        raise SystemExit(f"error: gradient_accumulation_steps must be an int >= 1, got "
                         f"{gradient_accumulation_steps!r}")
    return -(-gradient_accumulation_steps // world)


def check_precision(dtype_name, sharding, bf16_residual):
    """Refuses the precision settings that cannot go together, naming the fix."""
    if sharding != "ddp" and dtype_name == "float16":
        raise SystemExit(f"error: sharding={sharding!r} needs dtype bfloat16 or float32 (fp16's GradScaler is not "
                         f"shard-aware here); use --dtype=bfloat16, or sharding='ddp' for fp16")
    if bf16_residual and dtype_name != "bfloat16":
        raise SystemExit(f"error: bf16_residual needs dtype bfloat16 (autocast), this run uses {dtype_name}; set "
                         f"--dtype=bfloat16 or --bf16_residual=False")


# Nominal dense matmul peaks (TFLOP/s; bf16/fp16, and TF32 for fp32 runs) from the vendors' datasheets, by a
# piece of torch.cuda.get_device_name(): MFU against a fixed number is comparable from run to run and machine to
# machine, where a peak measured at start-up moves with clocks, heat and neighbours. First match wins.
NOMINAL_TFLOPS = (("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 495), ("H200", 989, 495),
                  ("GH200", 989, 495), ("A100", 312, 156), ("L40S", 362, 183), ("L40", 181, 90),
                  ("L4", 121, 60), ("RTX 4090", 165, 83), ("RTX 3090", 71, 36))


def gpu_peak(name, dtype_name):
    """(nominal FLOP/s, the reference in words) of a GPU by name, or None if NOMINAL_TFLOPS does not know it."""
    for key, half, tf32 in NOMINAL_TFLOPS:
        if key in name:
            tflops = tf32 if dtype_name == "float32" else half
            kind = "TF32" if dtype_name == "float32" else dtype_name
            return tflops * 1e12, f"nominal {tflops} TFLOP/s: {name}, {kind} dense"
    return None


def cpu_peak(cores, ghz, flags):
    """(nominal fp32 FLOP/s, the reference in words) of cores at ghz: 2 FMA units x the vector width, per cycle."""
    width = (64, "AVX-512") if "avx512f" in flags else (32, "AVX2 FMA") if {"avx2", "fma"} <= flags else (8, "SSE")
    return (cores * ghz * 1e9 * width[0], f"nominal {cores * ghz * width[0]:.0f} GFLOP/s: {cores} core(s) x "
            f"{ghz:.2f} GHz x {width[0]} FLOP/cycle ({width[1]})")


def cpu_facts():
    """(cores this process computes on, max GHz or None, the CPU flags) from torch, /sys cpufreq and /proc/cpuinfo."""
    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1e9)
    ghz, flags, mhz = None, set(), None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            ghz = int(f.read()) / 1e6  # kHz
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except (OSError, ValueError):
        pass
    return int(cores), ghz or (mhz / 1e3 if mhz else None), flags


def reference_flops(device, ptdtype):
    """(the FLOP/s that MFU is reported against, that reference in words): a GPU's nominal peak (gpu_peak), a CPU's
    from its cores, clock and vector units (cpu_peak); the matmul rate measured now (peak_flops) where those are
    unknown (a GPU not in NOMINAL_TFLOPS, a CPU whose clock cannot be read), said so."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, dtype_name(ptdtype))
        if found:
            return found
        why = f"{name} is not in scale.NOMINAL_TFLOPS"
    elif device == "cpu":
        cores, ghz, flags = cpu_facts()
        if ghz:
            return cpu_peak(cores, ghz, flags)
        why = "the CPU's clock is unknown"
    else:
        why = f"{device} has no nominal peak here"
    measured = peak_flops(device, ptdtype)
    return measured, f"measured {measured / 1e12:.3g} TFLOP/s (a matmul at start-up; {why})"


def peak_flops(device, ptdtype):
    """This device's dense matmul rate in FLOP/s, measured now: reference_flops' fallback, and what bench.py's MFU
    is against (the fastest of several trials: other processes may share the machine)."""
    cuda = device.startswith("cuda")
    n, trials, reps = (8192, 10, 10) if cuda else (1024, 20, 1)  # 8192: big enough to reach an H100's ~800 TFLOP/s
    a = torch.randn(n, n, device=device, dtype=ptdtype)
    b = torch.randn(n, n, device=device, dtype=ptdtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = float("inf")
    for _ in range(trials):
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


def check_speedups(model, device, sharding, loss_chunk, fp8):
    """Refuses the scale settings that do not exist or cannot go together, naming the fix."""
    if sharding not in ("ddp", "zero1", "fsdp"):
        raise SystemExit(f"error: sharding must be 'ddp', 'zero1' or 'fsdp', got {sharding!r}")
    if fp8 not in ("none", "head", "mlp", "both"):
        raise SystemExit(f"error: fp8 must be 'none', 'head', 'mlp' or 'both', got {fp8!r}")
    head = fp8 in ("head", "both")
    if model.config.logit_softcap and (loss_chunk or head):
        raise SystemExit("error: logit_softcap needs loss_chunk=0 and fp8='none' or 'mlp' (the fused losses do not "
                         "cap)")
    if head and loss_chunk:
        raise SystemExit(f"error: fp8={fp8!r} needs loss_chunk=0 (the chunked loss multiplies by lm_head's weight "
                         f"itself), or fp8='mlp'")
    if fp8 != "none" and device != "cpu" and not (device.startswith("cuda") and
                                                   torch.cuda.get_device_capability(device) >= (8, 9)):
        raise SystemExit(f"error: fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9+: "
                         f"H100, L40, RTX 4090), and {device} has none; set fp8='none'")


def parallelize(model, device, world, *, compile=False, grad_ckpt=None, sharding="ddp", loss_chunk=0, fp8="none",
                bf16_residual=False):
    """Makes a GPT (already on `device`) ready to train; returns the module the step calls. Swaps in the speed and
    memory features (gradient checkpointing, the chunked loss, the fp8 head and MLP, the bf16 residual stream), then
    under torchrun shards the GPT in place (FSDP2) or wraps it in DDP, then compiles. Read state dicts and FLOPs from
    the GPT itself, not from what this returns."""
    every = ckpt_interval(grad_ckpt)
    check_speedups(model, device, sharding, loss_chunk, fp8)
    if fp8 in ("mlp", "both"):  # before checkpointing and sharding wrap the blocks; compiled with them
        use_fp8_mlp(model)
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
    elif fp8 in ("head", "both"):
        use_fp8_head(model, torch.compile(fp8_logits_loss, dynamic=False) if separately else fp8_logits_loss)
    elif separately:  # eager, the plain loss makes fp32 copies of the logits
        model.head_loss = torch.compile(model.head_loss, dynamic=False)
    model = spread(model, device, world, sharding)
    # compiled after DDP, so that dynamo's DDPOptimizer cuts the graph at bucket boundaries and the all-reduce
    # still overlaps the (compiled) backward; compiled after FSDP2, which it traces through. dynamic=False: a second
    # shape (short_block_size's) gets a graph of its own, not one with dynamic shapes that every later step would run
    return torch.compile(model, dynamic=False) if compile else model


def spread(model, device, world, sharding):
    """Under torchrun: the GPT sharded in place (FSDP2) or wrapped in DDP; alone, the GPT itself."""
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
    return model
