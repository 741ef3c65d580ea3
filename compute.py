"""
Where a script computes: the device and the dtype ("auto" picks the best this machine has: cuda, then mps, then
cpu; bf16 on GPUs that have it, fp16 on those that do not, fp32 elsewhere), and under torchrun the process group.
Written once, called by every script (train, sample, rlhf, eval, export, bench), so they all agree.

    from compute import compute_init, autocast
    rank, local_rank, world, device = compute_init("auto")
    ctx = autocast(device, pick_dtype("auto", device))
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device):
    """'auto' is the best this machine has (cuda, mps, cpu); a device named must exist, else a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        d = torch.device(device)
        kind, index = d.type, d.index
    except (RuntimeError, TypeError):
        kind, index = None, None
    if kind == "cuda" and not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise SystemExit(f"error: --device={device}, but {why}; use --device=cpu (or auto)")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device={device}, but there are {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device={device}, but this machine has no MPS (Apple GPU); use --device=cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype, device):
    """The torch dtype of 'auto' | float32 | bfloat16 | float16 on this device: auto is bf16 on GPUs that have it,
    else fp16; fp32 on CPU and MPS (where half precision is slower or unsupported for training)."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise SystemExit(f"error: unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(ptdtype):
    return str(ptdtype).removeprefix("torch.")


def autocast(device, ptdtype):
    """Mixed precision: weights (and optimizer state) stay fp32, matmuls run in ptdtype."""
    if ptdtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=ptdtype)


def compute_init(device="auto"):
    """(rank, local_rank, world_size, device). The device as pick_device says; under torchrun (RANK set) each
    process takes GPU local_rank and joins the process group: NCCL on GPUs, gloo on CPU (how CI tests DDP)."""
    device = pick_device(device)
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if "RANK" in os.environ:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def compute_cleanup(world):
    """Under torchrun: wait for every rank (rank 0 may still be writing a checkpoint), then tear down. A rank
    that tears gloo down while another still talks to it can abort at exit ("terminate called...")."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
