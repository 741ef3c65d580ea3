"""
Measurements anyone can rerun.
    python bench.py --mode=bpe        # tokenizer training and encoding speed (CPU)
    python bench.py --mode=train      # training throughput, MFU, memory (GPU)
    python bench.py --mode=generate   # generation tokens/s with and without the KV cache (GPU)
    python bench.py --mode=prepare    # prepare.py's tokenization MB/s on 1 to all cores (parquet corpus, pyarrow)
Whole runs over seeds are runs/speedrun.sh (time to a val loss) and runs/posttrain.sh (the post-training chain).
"""
import filecmp
import gc
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import fields
from itertools import cycle
from types import SimpleNamespace

from configurator import configure

mode = "train"
# --mode=train: train.py's own step (train.build_model, train.setup_step) timed on the model of train_config
train_config = ""           # a train.py config file; "" = train.py's defaults (GPT-2 124M shape)
train_common = "vocab_size=50304 bias=False dropout=0.0 batch_size=32 gradient_accumulation_steps=1 compile=True"
train_variants = ""         # ";"-separated sets of train.py overrides, one run each: "compile=False; grad_ckpt=full"
train_steps = 20            # timed steps per variant, after train_warmup untimed ones (compilation happens there)
train_warmup = 5
train_data = "random"       # random | real | both (real: train.py's data_root/dataset train shards, if prepared)
train_json = "out/bench/train.json"
train_alone = True          # under torchrun: time each variant on every GPU alone first, for a scaling column
train_profile = 0           # > 0: then profile this many more steps and print where a step's time goes, by kernel
# --mode=generate: model.generate's tokens/s on random weights (GPT-2 124M and config/llama_124m.py shapes)
gen_batches = (1, 64)
gen_new_tokens = 512
gen_prompt_len = 16         # random prompt tokens
gen_tiny = False            # tiny shapes (2 layers, 64 wide) so that the benchmark itself runs and is tested on CPU
gen_no_cache = True         # also time the cache-less reference path (slow: a full forward per token)
gen_device = "auto"
gen_out_dir = "out/bench"
gen_cold = True             # also the first and second generate call of a fresh process, batch 1: what sample.py meets
gen_cold_variants = ""      # ";"-separated overrides, a fresh process each: "; cuda_graph=False; prompt_len=1" (keys:
                            # shape batch prompt_len new_tokens cuda_graph warm_up; warm_up=False: no sample.warm_up)
gen_cold_profile = False    # and profile each variant's first call (in one more process): the ops its time goes to
gen_sample_runs = 3         # and `python sample.py` itself on the same checkpoint, from launch to exit, so many times
# --mode=prepare: prepare.py on a parquet corpus made of the default corpus's documents, shuffled and repeated
prepare_mb = 300            # corpus size in MB of text
prepare_procs = (1, 4, 8, 16)  # --num_proc of each run (the same tokenizer each time)
prepare_vocab = 50257       # GPT-2's vocabulary size, as for fineweb-edu
prepare_dir = "out/bench-prepare"
RULES = dict(mode=("bpe", "train", "generate", "prepare"), train_steps=(1, None), train_warmup=(0, None),
             train_data=("random", "real", "both"), train_profile=(0, None), gen_new_tokens=(1, None),
             gen_prompt_len=(1, None), gen_sample_runs=(0, None), prepare_mb=(1, None))

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_WIDTHS = (51, 8, 10, 10, 6, 7, 7, 7)  # the columns of the train table


def row_text(cells, widths):
    """One line of a table: the first cell left-aligned, the others right-aligned, each in its width, a space apart."""
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(f" {c:>{w}}" for c, w in zip(rest, widths[1:]))


def save_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def in_fresh_process(name, *args):
    """bench.<name>(*args) in a new interpreter, so that its time and memory are its own; returns its dict."""
    code = f"import json, sys, bench; print(json.dumps(bench.{name}(*json.loads(sys.argv[1]))))"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=HERE)
    if r.returncode != 0:
        raise SystemExit(f"error: {name} in a fresh process failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def train_tokenizer(which, out, vocab_size, n_train):
    """In a fresh process: bpe.py ("ours") or HF's BpeTrainer ("hf") trained on the first n_train documents, saved
    to out. CPU counts its workers; peak = this process + its largest worker (an upper bound: workers share pages)."""
    import resource  # Unix only
    import bpe
    from prepare import corpus_files, read_documents

    def usage():
        return [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    texts = list(read_documents(corpus_files("stdlib"), strict=False))[:n_train]
    cpu0, t0 = sum(u.ru_utime + u.ru_stime for u in usage()), time.time()
    if which == "ours":
        tok = bpe.train(texts, vocab_size)
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(bpe.GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=bpe.SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    seconds, cpu_seconds = time.time() - t0, sum(u.ru_utime + u.ru_stime for u in usage()) - cpu0
    tok.save(out)
    return dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_mb=sum(u.ru_maxrss for u in usage()) / 1024)


def encode_speed(encoders, mb, repeats):
    """{name: fn encoding mb MB} -> {name: (wall MB/s, MB per CPU second)}, best of `repeats` rounds, in turn."""
    wall = {name: math.inf for name in encoders}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, encode in encoders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            encode()
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return {name: (mb / wall[name], mb / cpu[name]) for name in encoders}


def hf_tokenizer_row(tmp, held, held_mb, vocab_size, n_train, repeats):
    from tokenizers import Tokenizer
    hf = in_fresh_process("train_tokenizer", "hf", os.path.join(tmp, "hf.json"), vocab_size, n_train)
    tok = Tokenizer.from_file(os.path.join(tmp, "hf.json"))
    bytes_per_token = held_mb * 1e6 / sum(len(e.ids) for e in tok.encode_batch(held))
    speed = encode_speed({"1": lambda: [tok.encode(t) for t in held], "n": lambda: tok.encode_batch(held)},
                         held_mb, repeats)
    return ("HF tokenizers BpeTrainer", hf["seconds"], hf["cpu_seconds"], hf["peak_mb"], bytes_per_token,
            speed["1"][0], speed["n"][0])


def bench_bpe(vocab_size=32000, repeats=7):
    """bpe.py against HF tokenizers' BpeTrainer (if installed): a 32,000 vocab, GPT-4 pattern, on the default
    corpus (stdlib .py files, the last 5% held out for encoding). CPU seconds are printed next to wall seconds: on
    a shared machine they are what other jobs disturb least."""
    import tiktoken
    import bpe
    from prepare import corpus_files, read_documents

    docs = list(read_documents(corpus_files("stdlib"), strict=False))  # the default corpus of prepare.py
    n_train, n_cpu = len(docs) - len(docs) // 20, os.cpu_count()
    held = docs[n_train:]
    held_mb = sum(len(t.encode()) for t in held) / 1e6
    train_mb = sum(len(t.encode()) for t in docs[:n_train]) / 1e6
    rows = []  # (name, train s, train CPU s, peak MB, bytes/token, MB/s 1 thread, MB/s all threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours = in_fresh_process("train_tokenizer", "ours", os.path.join(tmp, "ours.bpe"), vocab_size, n_train)
        tok = bpe.Tokenizer.load(os.path.join(tmp, "ours.bpe"))
        bare = tiktoken.Encoding("bare", pat_str=tok.pattern, mergeable_ranks=tok.ranks,
                                 special_tokens=tok.special_tokens)
        # Both encoders get the same history, call for call: tiktoken keeps per-thread regex state, so which
        # threads used an Encoding first changes its later speed by up to ~30%.
        ids = tok.encode_ordinary_batch(held, num_threads=n_cpu)
        assert ids == bare.encode_ordinary_batch(held, num_threads=n_cpu)  # the same Rust core: the same ids
        bytes_per_token = held_mb * 1e6 / sum(map(len, ids))
        speed = encode_speed({"ours 1": lambda: [tok.encode(t) for t in held],
                              "bare 1": lambda: [bare.encode(t) for t in held],
                              "ours n": lambda: tok.encode_batch(held, num_threads=n_cpu),
                              "bare n": lambda: bare.encode_batch(held, num_threads=n_cpu)}, held_mb, repeats)
        rows.append(("scratchlm bpe.py", ours["seconds"], ours["cpu_seconds"], ours["peak_mb"], bytes_per_token,
                     speed["ours 1"][0], speed["ours n"][0]))
        rows.append(("bare tiktoken, same ranks", None, None, None, bytes_per_token, speed["bare 1"][0],
                     speed["bare n"][0]))
        overhead = {n: [speed["bare " + n][i] / speed["ours " + n][i] - 1 for i in (0, 1)] for n in ("1", "n")}
        if importlib.util.find_spec("tokenizers") is None:
            print("(HF tokenizers is not installed: its row is skipped; pip install tokenizers to compare)")
        else:
            rows.append(hf_tokenizer_row(tmp, held, held_mb, vocab_size, n_train, repeats))

    print(f"BPE training: vocab {vocab_size:,}, GPT-4 pattern, {n_train} documents ({train_mb:.1f} MB) of "
          f"{sysconfig.get_paths()['stdlib']}, held out the last {len(held)} ({held_mb:.1f} MB); {n_cpu} CPUs")
    widths = (28, 8, 6, 8, 12, 15, 15)
    print(row_text(("", "train s", "CPU s", "peak MB", "bytes/token", "enc MB/s 1 thr", f"enc MB/s {n_cpu} thr"),
                   widths))
    for name, seconds, cpu_seconds, peak, bpt, one, many in rows:
        trained = (f"{seconds:.1f}", f"{cpu_seconds:.1f}", f"{peak:.0f}") if seconds is not None else ("-",) * 3
        print(row_text((name, *trained, f"{bpt:.3f}", f"{one:.2f}", f"{many:.2f}"), widths))
    print(f"bpe.py encode overhead over bare tiktoken, by CPU time: {overhead['1'][1]:+.1%} (1 thread), "
          f"{overhead['n'][1]:+.1%} ({n_cpu} threads); by wall time: {overhead['1'][0]:+.1%}, {overhead['n'][0]:+.1%}")


# kinds of kernel, by name: cuBLAS, cuDNN/flash attention, NCCL, fused AdamW, the compiler's (Triton; C++ on CPUs)
KERNEL_KINDS = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm"),
                "attention": ("flash", "fmha", "sdpa", "attention"), "communication": ("nccl", "gloo"),
                "optimizer": ("adam",), "compiled": ("triton", "cpp_fused")}


def profile_steps(step, n, cuda, host=False):
    """Where a step's time goes: n steps under torch.profiler, per step: the busy time and kernel count (on the
    GPU; on the CPU or with host, the ops' own CPU time, the CUDA API calls included), the time of each kind in
    KERNEL_KINDS, and the 12 longest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    kernels = cuda and not host
    with profile(activities=[ProfilerActivity.CPU] * (not kernels) + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    if kernels:
        ops = [(e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_type.name == "CUDA"]
    else:
        ops = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    ops = [(name, count / n, us / n / 1000) for name, count, us in ops]  # per step, in ms
    kinds = {}
    for name, _, ms in ops:
        kind = next((k for k, marks in KERNEL_KINDS.items() if any(m in name.lower() for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0) + ms
    return dict(busy_ms=sum(ms for *_, ms in ops), kernels=sum(c for _, c, _ in ops),
                unit="kernels" if kernels else "ops (self CPU time)", top=sorted(ops, key=lambda op: -op[2])[:12],
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])))


def print_profile(p, what, label):
    kinds = ", ".join(f"{k} {ms:.2f} ms ({100 * ms / p['busy_ms']:.0f}%)" for k, ms in p["kinds"].items())
    print(f"\nwhere {what} time goes, {label}: {p['busy_ms']:.1f} ms busy, {p['kernels']:.0f} {p['unit']}\n  {kinds}")
    for name, count, ms in p["top"]:
        print(f"  {ms:8.3f} ms {count:5.0f}x  {name[:100]}")


def train_variant(defaults, variant):
    """A variant's config as train.py would read it: train.py's defaults, train_config, train_common, the variant."""
    import train
    rules = getattr(train, "RULES", {})  # train.py's own rules hold for its keys here too
    config = configure(dict(defaults, RULES=rules), ([train_config] if train_config else []) +
                       [f"--{kv}" for kv in (train_common + " " + variant).split()])
    if config["vocab_size"] is None:  # train.py takes it from the data; the random batches need it given
        raise SystemExit(f"error: variant '{variant or '(common)'}' of --mode=train has no vocab_size; add one to "
                         f"--train_common, e.g. vocab_size=50304 (GPT-2's, padded)")
    return SimpleNamespace(**config)


def train_batches(T, data, rank, world, cuda):
    """train.py's batches (dataloader.py) of the prepared train shards (data "real"; None if there are none), or a few fixed random
    batches, pinned like train.py's, different on every rank."""
    import torch
    import dataloader
    if data == "real":
        data_dir = os.path.join(T.data_root, T.dataset)
        if not os.path.isfile(os.path.join(data_dir, "meta.json")):
            return None
        _, meta, _ = dataloader.load_data(T.data_root, T.dataset)
        if meta["vocab_size"] > T.vocab_size:
            raise SystemExit(f"error: {data_dir} has {meta['vocab_size']} tokens > vocab_size "
                             f"{T.vocab_size}; raise vocab_size in train_common")
        return dataloader.make_batches(data_dir, meta, T, rank=rank, world=world, data_state={}, pin=cuda)[1]
    g = torch.Generator().manual_seed(T.seed + rank)
    windows = [torch.randint(T.vocab_size, (T.batch_size, T.block_size + 1), generator=g) for _ in range(4)]
    pairs = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in windows]
    return cycle([(x.pin_memory(), y.pin_memory()) if cuda else (x, y) for x, y in pairs])


def time_train_steps(T, device, w, batches, grad_accum, ptdtype, peak_flops, out):
    """train.py's model, optimizers and step for w processes, built by train.py's own set-up functions:
    train_warmup steps, then train_steps timed, into out."""
    import torch
    import train
    from faults import GUARD_FIELDS
    from model import GPTConfig
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    raw = train.build_model({f.name: getattr(T, f.name) for f in fields(GPTConfig)}, None, T.seed, device)
    _, _, _, train_step = train.setup_step(raw, T, device=device, world=w, ptdtype=ptdtype, grad_accum=grad_accum)
    guard = torch.zeros(len(GUARD_FIELDS), device=device)
    step = lambda judge=False: train_step(batches, guard, judge_update=judge)  # timed: the steady state's step
    t0 = time.perf_counter()
    for _ in range(train_warmup):
        step(judge=True)  # as a run's first steps (train.main)
    sync()
    out["warmup_s"] = time.perf_counter() - t0
    if cuda:
        state = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(train_steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / train_steps
    tokens = T.batch_size * T.block_size * grad_accum * w  # per step, all w processes
    # the guard skips AdamW on a bad update (non-finite loss or gradients, a loss spike): such a step is not one
    # of training, and is cheaper
    out.update(ms_per_step=1000 * dt, tokens_per_s=tokens / dt, tokens_per_s_per_gpu=tokens / dt / w,
               mfu=raw.flops_per_token(T.block_size) * tokens / w / dt / peak_flops, loss=loss.item(),
               params_m=raw.num_params() / 1e6, skipped=int(guard[GUARD_FIELDS.index("total")].item()))
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out.update(state_gib=state / 2**30, peak_gib=peak / 2**30, act_gib=(peak - state) / 2**30)
    if train_profile:
        out["profile"] = profile_steps(step, train_profile, cuda)


def measure_train(T, device, w, batches, grad_accum, ptdtype, peak_flops):
    """The variant's figures with w processes training together (1: this one alone); oom=True if it ran out."""
    import torch
    out = {}
    try:
        time_train_steps(T, device, w, batches, grad_accum, ptdtype, peak_flops, out)
    except torch.OutOfMemoryError:
        out["oom"] = True
    gc.collect()  # the model and optimizer went with time_train_steps' frame: free their memory for the next one
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


def print_train_row(r):
    """The train table's row of measure_train's figures r; a skipped update's warning and the profile under it."""
    first = f"{r['variant'][:44]:<44} {r['data']:<6}"
    if r.get("oom"):
        return print(row_text((first, "OOM"), TRAIN_WIDTHS), flush=True)
    mem = [f"{r[k]:.2f}" if k in r else "-" for k in ("state_gib", "peak_gib", "act_gib")]
    alone = f"  {r['scaling']:.3f}x ({', '.join(f'{t:.1f}' for t in r['alone_ms'])})" if "scaling" in r else ""
    print(row_text((first, f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_gpu']:,.0f}",
                    f"{100 * r['mfu']:.1f}%", *mem), TRAIN_WIDTHS) + alone, flush=True)
    if r.get("skipped"):
        print(f"warning: {r['variant']} ({r['data']}): the guard skipped {r['skipped']} of its "
              f"{train_warmup + train_steps} updates as bad (non-finite loss or gradients, or a spike), so its time "
              f"is not that of training")
    if "profile" in r:
        print_profile(r["profile"], "a step's", f"{r['variant']} ({r['data']})")


def bench_train():
    """ms/step, tokens/s, MFU (against the matmul peak measured here) and GPU memory of train.py's step, per variant.
    `state` stays allocated between steps (weights, AdamW moments, DDP buckets), `peak` is a step's most, `act` =
    peak - state (what gradient checkpointing and the fused loss shrink). Under torchrun rank 0 reports; `scaling` =
    world x the mean step time of each rank alone / the joint one (2.0x for two GPUs is perfect)."""
    import torch
    import torch.distributed as dist
    import scale
    import train
    from compute import compute_cleanup, compute_init, dtype_name
    from configurator import config_keys

    defaults = config_keys(vars(train))  # train.py's own defaults: each variant's config starts from a copy
    rank, _, world, device = compute_init(train.device)
    cuda = device.startswith("cuda")
    peak_flops = scale.peak_flops(device, torch.bfloat16 if cuda else torch.float32)
    say = print if rank == 0 else (lambda *a, **k: None)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    header = row_text((f"{'variant':<44} {'data':<6}", "ms/step", "tok/s", "tok/s/gpu", "MFU", "state", "peak",
                       "act"), TRAIN_WIDTHS) + " GiB" + "  scaling (ms alone)" * (world > 1 and train_alone)
    say(f"{world} process(es) on {gpu}, torch {torch.__version__}; measured matmul peak {peak_flops / 1e12:.1f} "
        f"TFLOP/s ({'bf16' if cuda else 'fp32'})\n\n{header}")
    rows = []
    for variant in [v.strip() for v in train_variants.split(";")]:
        for data in {"random": ["random"], "real": ["real"], "both": ["random", "real"]}[train_data]:
            T = train_variant(defaults, variant)
            ptdtype, grad_accum = scale.setup(T, device, world, say=lambda *a, **k: None)  # as train.py, TF32 too
            row = dict(variant=variant or "(common)", data=data, world=world, batch_size=T.batch_size,
                       block_size=T.block_size, grad_accum=grad_accum)
            batches = train_batches(T, data, rank, world, cuda)
            if batches is None:
                say(f"no prepared data in {os.path.join(T.data_root, T.dataset)}: real-data run of "
                    f"'{row['variant']}' skipped")
                continue
            if world > 1 and train_alone:  # scaling's baseline: each process alone on its GPU, all at the same time
                alone = torch.zeros(world, dtype=torch.float64, device=device)
                alone[rank] = measure_train(T, device, 1, batches, row["grad_accum"], ptdtype,
                                            peak_flops).get("ms_per_step", math.nan)
                dist.all_reduce(alone)
                row["alone_ms"] = alone.tolist()
            row.update(measure_train(T, device, world, batches, row["grad_accum"], ptdtype, peak_flops),
                       dtype=dtype_name(ptdtype))
            if "alone_ms" in row and "ms_per_step" in row:
                row["scaling"] = sum(row["alone_ms"]) / row["ms_per_step"]
            del batches
            rows.append(row)
            if rank == 0:
                print_train_row(row)
                save_json(train_json, dict(device=gpu, world=world, torch=torch.__version__, peak_flops=peak_flops,
                                           rows=rows))
    compute_cleanup(world)


def gen_shapes(tiny):
    """The shapes timed: GPT-2 124M's and config/llama_124m.py's, or tiny ones (2 layers, 64 wide) for a CPU."""
    llama = dict(bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu")
    if tiny:
        base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=256)
        return {"gpt2-tiny": dict(base), "llama-tiny": dict(base, n_kv_head=2, **llama)}
    base = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
    return {"gpt2-124m": dict(base), "llama-124m": dict(base, n_kv_head=4, **llama)}


def time_call(model, prompt, new_tokens, device, *, read=False, **gen):
    """Seconds of one model.generate call, sampling as sample.py's defaults (seed 0), and to its first token;
    read: each token read on the host as it streams, as sample.py reads it (a sync per token)."""
    import torch
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    sync()
    t0, first = time.perf_counter(), None
    for next_id in model.generate(prompt, new_tokens, 0.8, 200, generator=g, **gen):
        if read:
            next_id.tolist()
        first = first or time.perf_counter() - t0
    sync()
    return time.perf_counter() - t0, first


def bench_generate():
    """Tokens/s of model.generate with and without the KV cache on random weights (compute.pick_dtype's dtype), warm
    (a call after an untimed one); with gen_cold, first the first and second call of a fresh process, as sample.py
    meets them. Writes gen_out_dir/generate.json."""
    import torch
    from compute import pick_device, pick_dtype
    from model import GPT, GPTConfig

    device = pick_device(gen_device)
    dtype, shapes = pick_dtype("auto", device), gen_shapes(gen_tiny)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    rows, cold, path = [], [], os.path.join(gen_out_dir, "generate.json")

    def save():  # after every row: a run cut short still leaves its numbers
        save_json(path, dict(device=name, dtype=str(dtype), torch=torch.__version__, new_tokens=gen_new_tokens,
                             prompt_len=gen_prompt_len, rows=rows, cold=cold))
    if gen_cold:  # first, while this process has no CUDA context yet to share the GPU with
        bench_fresh_processes(shapes, device, cold, save)
    torch.zeros(1, device=device).sum().item()  # the CUDA context is made here, outside every timing
    a = torch.randn(64, 64, device=device, dtype=dtype)
    (a @ a).sum().item()  # and the cuBLAS handle: process set-up, not the model's
    models = {}
    for shape, args in shapes.items():
        torch.manual_seed(0)
        models[shape] = GPT(GPTConfig(**args)).to(device, dtype).eval()
    print(f"\ngenerate: {gen_new_tokens} new tokens after a {gen_prompt_len}-token prompt, {name}, {dtype}")
    widths = (12, 5, 10, 11, 8)
    print(row_text(("model", "batch", "path", "warm tok/s", "warm s"), widths))
    for path_name in ["cache"] + ["no cache"] * gen_no_cache:  # the slow one last
        for (shape, model), batch in [(m, b) for m in models.items() for b in gen_batches]:
            prompt = torch.randint(model.config.vocab_size, (batch, gen_prompt_len), device=device)
            warm_s = [time_call(model, prompt, gen_new_tokens, device, use_cache=path_name == "cache")[0]
                      for _ in range(2)][1]  # the first call selects kernels and captures the graph: untimed
            tok = batch * gen_new_tokens
            rows.append(dict(model=shape, batch=batch, path=path_name, warm_s=warm_s, warm_tok_s=tok / warm_s))
            print(row_text((shape, batch, path_name, f"{tok / warm_s:,.0f}", f"{warm_s:.2f}"), widths), flush=True)
            save()
    print(f"wrote {path}")


def bench_fresh_processes(shapes, device, cold, save):
    """bench_generate's gen_cold table: for each of gen_cold_variants (its keys override sample.py's defaults), the
    first and second generate call of a fresh process (generate_first_calls), appended to `cold`; save() writes the
    json after each row. One untimed process runs first, as a training run before sample.py would: the OS then holds
    the CUDA libraries and the checkpoint in its page cache, so a row's figure does not depend on the rows before."""
    keys = dict(shape=next(iter(shapes)), batch=1, prompt_len=gen_prompt_len, new_tokens=gen_new_tokens,
                cuda_graph=True, warm_up=None, RULES=dict(shape=tuple(shapes), warm_up=(bool,)))
    variants = [(v.strip() or "(as sample.py)", configure(dict(keys), [f"--{kv}" for kv in v.split()]))
                for v in gen_cold_variants.split(";")]  # a mistake in any is an error before the first row

    def call_of(args):  # the arguments of a fresh process, with its shape's checkpoint
        ckpt = random_checkpoint(os.path.join(gen_out_dir, f"ckpt-{args['shape']}"), shapes[args["shape"]])
        return dict(args, ckpt=ckpt, device=device)
    print(f"fresh process (a new interpreter per row, as `python sample.py` runs): it loads a checkpoint, then its "
          f"first generate call against its second; {next(iter(shapes))} unless the variant says otherwise; "
          f"total = import + load + first call")
    widths = (34, 8, 8, 9, 6, 12, 10, 9, 8)
    print(row_text(("variant", "load s", "first s", "second s", "ratio", "1st token s", "(2nd call)", "import s",
                    "total s"), widths))
    in_fresh_process("generate_first_calls", call_of(variants[0][1]))  # untimed
    for label, args in variants:
        call = call_of(args)
        r = in_fresh_process("generate_first_calls", call)
        cold.append(dict(variant=label, **args, **r))
        print(row_text((label, *(f"{r[k]:.3f}" for k in ("load_s", "first_s", "second_s")), f"{r['ratio']:.2f}x",
                        *(f"{t:.3f}" for t in r["first_token_s"]), f"{r['import_s']:.2f}", f"{r['total_s']:.2f}"),
                       widths), flush=True)
        save()
        if gen_cold_profile:  # in one more fresh process, as the profiler distorts the timing
            cold[-1]["profile"] = in_fresh_process("generate_first_calls", dict(call, profile=True))["profile"]
            print_profile(cold[-1]["profile"], "the first call's", label)
            save()
    if gen_sample_runs:
        cmd = [sys.executable, "sample.py", f"--out_dir={call_of(keys)['ckpt']}", f"--device={device}",
               "--num_samples=1", f"--max_new_tokens={gen_new_tokens}"]
        seconds = []
        for _ in range(gen_sample_runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=HERE, check=True, capture_output=True)
            seconds.append(time.perf_counter() - t0)
        cold.append(dict(variant="python sample.py", cmd=shlex.join(cmd[1:]), seconds=seconds))
        print(f"{shlex.join(['python'] + cmd[1:])}: {', '.join(f'{t:.2f}' for t in seconds)} s from launch to exit")
        save()


def generate_first_calls(a):
    """In a fresh process, as sample.py runs: the checkpoint a["ckpt"] loaded by checkpoint.load_run (with
    sample.warm_up meanwhile, on CUDA as sample.py does; a["warm_up"] True or False: always or never) and cast to
    compute.pick_dtype's dtype, then its first and second model.generate call, each token read as it streams; and
    the seconds to import torch and the scripts and to load. With a["profile"], the first call's profile instead."""
    t0 = time.perf_counter()
    import torch
    import checkpoint
    import compute
    import sample
    import_s = time.perf_counter() - t0
    device = compute.pick_device(a["device"])
    dtype, cuda = compute.pick_dtype("auto", device), device.startswith("cuda")
    shape, sampling = (a["batch"], a["prompt_len"]), dict(temperature=0.8, top_k=200)
    on = cuda if a["warm_up"] is None else a["warm_up"]  # None: as sample.py, on CUDA only
    warm = (lambda args: sample.warm_up(args, device, dtype, shape, a["new_tokens"], **sampling)) if on else None
    t0 = time.perf_counter()
    model = checkpoint.load_run(a["ckpt"], device, warm_up=warm)[0].to(dtype)
    torch.manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, shape, device=device)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    call = lambda: time_call(model, prompt, a["new_tokens"], device, read=True, cuda_graph=a["cuda_graph"])
    if a.get("profile"):
        return dict(profile=profile_steps(call, 1, cuda, host=True))
    (first_s, t1), (second_s, t2) = call(), call()
    return dict(first_s=first_s, second_s=second_s, ratio=first_s / second_s, first_token_s=[t1, t2],
                import_s=import_s, load_s=load_s, total_s=import_s + load_s + first_s)


def random_checkpoint(out_dir, model_args):
    """out_dir as a training run leaves it, with random weights (seed 0) of model_args and a byte-level tokenizer
    without special tokens (so that no sample ends early at <|endoftext|>); kept, so that every fresh process reads
    the same files (as the OS caches them)."""
    import torch
    import bpe
    from checkpoint import manifest_model_args, save_checkpoint
    from model import GPT, GPTConfig
    if manifest_model_args(out_dir) == model_args:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tok = bpe.train(["x"], 256, special_tokens=())
    tok.save(os.path.join(out_dir, "tokenizer.bpe"))
    torch.manual_seed(0)
    save_checkpoint(out_dir, dict(model=GPT(GPTConfig(**model_args)).state_dict(), model_args=model_args,
                                  tokenizer_hash=tok.hash, iter_num=0))
    return out_dir


def prepare_corpus(root, mb):
    """root/NNN.parquet files of about mb MB of text: the stdlib corpus's documents, reshuffled for each file."""
    from prepare import corpus_files, parquet_module, read_documents
    pq = parquet_module()
    import pyarrow as pa
    docs = list(read_documents(corpus_files("stdlib"), strict=False))
    rng, size, k = random.Random(0), 0, 0
    os.makedirs(root, exist_ok=True)
    while size < mb * 1e6:
        batch = []
        for d in rng.sample(docs, len(docs)):
            if size >= mb * 1e6:
                break
            batch.append(d)
            size += len(d.encode())
        pq.write_table(pa.table({"text": batch}), os.path.join(root, f"{k:03d}.parquet"), row_group_size=1024)
        k += 1
    return size


def bench_prepare():
    """prepare.py's own tokenizing rate (its final progress line: text bytes over the time from the first batch to
    the last) and the whole run's wall time, once per prepare_procs, on the same corpus and tokenizer; the shards
    must come out byte-identical whatever the number of processes."""
    corpus, data = os.path.join(prepare_dir, "corpus"), os.path.join(prepare_dir, "data")
    shutil.rmtree(prepare_dir, ignore_errors=True)
    size = prepare_corpus(corpus, prepare_mb)
    prep = [sys.executable, os.path.join(HERE, "prepare.py"), f"--input={corpus}", f"--data_root={data}"]
    subprocess.run(prep + ["--dataset=tok", f"--vocab_size={prepare_vocab}", "--tokenizer_max_bytes=30000000"],
                   check=True, capture_output=True)
    print(f"{size / 1e6:.0f} MB of parquet text, a {prepare_vocab}-id tokenizer, {os.cpu_count()} cores")
    print(row_text(["processes", "tokenizing MB/s", "wall s"], [10, 16, 8]))
    rows = []
    for n in prepare_procs:
        t0 = time.time()
        p = subprocess.run(prep + [f"--dataset=p{n}", f"--tokenizer={data}/tok/tokenizer.bpe", f"--num_proc={n}"],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"error: prepare.py --num_proc={n} failed:\n{p.stderr[-2000:]}")
        rate = float(re.findall(r"tokenizing \(\d+ process(?:es)?\): [\d,.]+ MB \| ([\d.]+) MB/s", p.stderr)[-1])
        rows.append(dict(procs=n, mb_per_s=rate, wall_s=time.time() - t0))
        print(row_text([n, f"{rate:.1f}", f"{rows[-1]['wall_s']:.1f}"], [10, 16, 8]), flush=True)
    first = os.path.join(data, f"p{prepare_procs[0]}")
    same = all(filecmp.cmp(os.path.join(first, f), os.path.join(data, f"p{n}", f), shallow=False)
               for n in prepare_procs[1:] for f in os.listdir(first) if f.endswith(".bin"))
    print("the same shards from every number of processes" if same else "warning: the shards differ")
    save_json(os.path.join(prepare_dir, "results.json"), dict(mb=size / 1e6, rows=rows, same_shards=same))
    return rows, same


if __name__ == "__main__":
    configure(globals())
    modes = {"bpe": bench_bpe, "train": bench_train, "generate": bench_generate, "prepare": bench_prepare}
    modes[mode]()  # (RULES names the modes)
