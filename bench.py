"""
Measurements anyone can rerun.
    python bench.py --mode=bpe        # tokenizer training and encoding speed (CPU)
    python bench.py --mode=train      # training throughput, MFU, memory (GPU)
    python bench.py --mode=generate   # generation tokens/s with and without the KV cache (GPU)
    python bench.py --mode=rlhf       # the post-training pipeline on the built-in task: accuracy, reward, KL
    python bench.py --mode=speedrun   # wall time from launch to a target val loss: recipe against baseline, seeds
"""
import json
import os

from configurator import configure

mode = "train"
# --mode=rlhf: the pipeline of rlhf.py on its built-in task, in rlhf_dir (stages already there are reused)
rlhf_dir = "out/bench-rlhf"
rlhf_json = "out/bench-rlhf/results.json"
rlhf_seeds = (1337, 1, 2)   # the whole pipeline once per seed, in rlhf_dir/seed<N>; the table: mean +- std
rlhf_parallel = 1           # seeds whose stages run at the same time (a GPU has room for all three tiny chains)
rlhf_args = ()              # extra --key=value for every rlhf.py stage, e.g. ("--device=cpu",)
rlhf_train_args = ()        # extra --key=value for the pretraining (train.py config/add.py)
# --mode=train: train.py's own step (train.parallelize + train.train_step) timed on the model of train_config
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
gen_cuda_graph = True       # replay the decode step as a CUDA graph (model.generate's cuda_graph)
gen_compile = False         # also time the cache with a torch.compiled decode step (cold then includes compiling)
gen_device = "auto"
gen_out_dir = "out/bench"
gen_cold = True             # also the first and second generate call of a fresh process, batch 1: what sample.py meets
gen_cold_variants = ""      # ";"-separated overrides, a fresh process each: "; cuda_graph=False; prompt_len=1"
                            # (keys: shape, batch, prompt_len, new_tokens, cuda_graph, compile; "" = as sample.py)
gen_cold_profile = False    # and profile each variant's first call (in one more process): the ops its time goes to
# --mode=speedrun: train.py runs from launch (start-up, data, compile and evals included) to a val-loss target
speedrun_config = "config/speedrun_small.py"     # the recipe
speedrun_baseline = "config/speedrun_small_base.py"  # the baseline (GPT-2 layout + AdamW) on the same tokens; "": none
speedrun_variants = ""      # ";"-separated overrides of the recipe, one row each (the ablation): "unet_skips=False"
speedrun_common = ""        # overrides for every run ("device=cpu max_iters=50" for a quick check)
speedrun_seeds = 3
speedrun_target = 0.0       # val loss to reach; 0 = the baseline's best val loss (mean over its seeds)
speedrun_parallel = 1       # runs at once (on one GPU: small models leave it idle; their times then overlap)
speedrun_dir = "out/speedrun"
speedrun_data_root = "data" # where the small corpus is made (data_root/stdlib-1mb)


def bench_bpe():
    """bpe.py against HF tokenizers' BpeTrainer (if installed): a 32,000 vocab with the GPT-4 pattern on the
    default corpus (the standard library's .py files, the last 5% held out). Each trainer runs in a fresh
    interpreter, so its time and peak memory are its own; encoding is then timed here, best of 7. CPU seconds
    are printed next to wall seconds: on a shared machine they are the number that other jobs disturb least."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    import sysconfig
    import tempfile
    import time

    import tiktoken

    import bpe
    from prepare import corpus_files, read_documents

    vocab_size, repeats, n_cpu = 32000, 7, os.cpu_count()
    docs = list(read_documents(corpus_files("stdlib"), strict=False))  # the default corpus of prepare.py
    n_train = len(docs) - len(docs) // 20
    held = docs[n_train:]
    held_mb = sum(len(t.encode()) for t in held) / 1e6
    train_mb = sum(len(t.encode()) for t in docs[:n_train]) / 1e6
    # The child trains and reports {seconds, cpu_seconds, peak_mb}. CPU: its own and its worker processes'.
    # Peak = the main process + its largest worker (ru_maxrss of each), an upper bound: workers share pages.
    child = """if 1:
        import json, resource, sys, time
        import bpe
        def usage():
            return [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        which, out, vocab_size, n_train = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        from prepare import corpus_files, read_documents
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
        peak_mb = sum(u.ru_maxrss for u in usage()) / 1024
        print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_mb=peak_mb)))
    """

    def train_in_child(which, out):
        r = subprocess.run([sys.executable, "-c", child, which, out, str(vocab_size), str(n_train)],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(bpe.__file__)))
        if r.returncode != 0:
            raise SystemExit(f"error: training {which} in a child process failed: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def mb_per_s(encoders):  # {name: fn} -> {name: (wall MB/s, MB per CPU second)}, best of `repeats` rounds
        wall, cpu = {name: float("inf") for name in encoders}, {name: float("inf") for name in encoders}
        for _ in range(repeats):
            for name, encode in encoders.items():  # in turn, so load from elsewhere hits all alike
                t0, c0 = time.perf_counter(), time.process_time()
                encode()
                wall[name] = min(wall[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        return {name: (held_mb / wall[name], held_mb / cpu[name]) for name in encoders}

    rows = []  # (name, train s, train CPU s, peak MB, bytes/token, MB/s 1 thread, MB/s all threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours = train_in_child("ours", os.path.join(tmp, "ours.bpe"))
        tok = bpe.Tokenizer.load(os.path.join(tmp, "ours.bpe"))
        bare = tiktoken.Encoding("bare", pat_str=tok.pattern, mergeable_ranks=tok.ranks,
                                 special_tokens=tok.special_tokens)
        # Both encoders get the same history, call for call: tiktoken keeps per-thread regex state, so which
        # threads used an Encoding first changes its later speed by up to ~30%.
        ids = tok.encode_ordinary_batch(held, num_threads=n_cpu)
        assert ids == bare.encode_ordinary_batch(held, num_threads=n_cpu)  # the same Rust core: the same ids
        bytes_per_token = held_mb * 1e6 / sum(map(len, ids))
        speed = mb_per_s({"ours 1": lambda: [tok.encode(t) for t in held],
                          "bare 1": lambda: [bare.encode(t) for t in held],
                          "ours n": lambda: tok.encode_batch(held, num_threads=n_cpu),
                          "bare n": lambda: bare.encode_batch(held, num_threads=n_cpu)})
        rows.append(("scratchlm bpe.py", ours["seconds"], ours["cpu_seconds"], ours["peak_mb"], bytes_per_token,
                     speed["ours 1"][0], speed["ours n"][0]))
        rows.append(("bare tiktoken, same ranks", None, None, None, bytes_per_token, speed["bare 1"][0],
                     speed["bare n"][0]))
        overhead = {n: [speed["bare " + n][i] / speed["ours " + n][i] - 1 for i in (0, 1)] for n in ("1", "n")}
        if importlib.util.find_spec("tokenizers") is not None:
            from tokenizers import Tokenizer
            hf = train_in_child("hf", os.path.join(tmp, "hf.json"))
            hf_tok = Tokenizer.from_file(os.path.join(tmp, "hf.json"))
            hf_bpt = held_mb * 1e6 / sum(len(e.ids) for e in hf_tok.encode_batch(held))
            speed = mb_per_s({"1": lambda: [hf_tok.encode(t) for t in held], "n": lambda: hf_tok.encode_batch(held)})
            rows.append(("HF tokenizers BpeTrainer", hf["seconds"], hf["cpu_seconds"], hf["peak_mb"], hf_bpt,
                         speed["1"][0], speed["n"][0]))
        else:
            print("(HF tokenizers is not installed: its row is skipped; pip install tokenizers to compare)")

    print(f"BPE training: vocab {vocab_size:,}, GPT-4 pattern, {n_train} documents ({train_mb:.1f} MB) of "
          f"{sysconfig.get_paths()['stdlib']}, held out the last {len(held)} ({held_mb:.1f} MB); {n_cpu} CPUs")
    print(f"{'':28}{'train s':>9}{'CPU s':>7}{'peak MB':>9}{'bytes/token':>13}{'enc MB/s 1 thr':>16}"
          f"{f'enc MB/s {n_cpu} thr':>16}")
    for name, seconds, cpu_seconds, peak, bpt, one, many in rows:
        s = f"{seconds:9.1f}{cpu_seconds:7.1f}{peak:9.0f}" if seconds is not None else f"{'-':>9}{'-':>7}{'-':>9}"
        print(f"{name:28}{s}{bpt:13.3f}{one:16.2f}{many:16.2f}")
    print(f"bpe.py encode overhead over bare tiktoken, by CPU time: {overhead['1'][1]:+.1%} (1 thread), "
          f"{overhead['n'][1]:+.1%} ({n_cpu} threads); by wall time: {overhead['1'][0]:+.1%}, {overhead['n'][0]:+.1%}")
    if len(rows) == 3:
        (_, s_ours, c_ours, _, bpt_ours, _, _), (_, s_hf, c_hf, _, bpt_hf, _, _) = rows[0], rows[2]
        print(f"bpe.py vs HF tokenizers: training wall time {s_ours / s_hf:.2f}x, CPU time {c_ours / c_hf:.2f}x, "
              f"bytes/token {bpt_ours / bpt_hf - 1:+.2%}")


# kinds of kernel, told apart by name: cuBLAS (nvjet, gemm, cutlass), cuDNN/flash attention, NCCL, fused AdamW,
# and the compiler's own kernels (Triton on GPUs, C++ on CPUs: norms, activations, the loss, casts)
KERNEL_KINDS = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm"),
                "attention": ("flash", "fmha", "sdpa", "attention"), "communication": ("nccl", "gloo"),
                "optimizer": ("adam",), "compiled": ("triton", "cpp_fused")}


def profile_steps(step, n, cuda):
    """Where a step's time goes: n steps under torch.profiler, per step: the busy time and kernel count (on the
    GPU; on the CPU, the ops' own time), the time of each kind in KERNEL_KINDS, and the 12 longest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        ops = [(e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_type.name == "CUDA"]
    else:
        ops = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    ops = [(name, count / n, us / n / 1000) for name, count, us in ops]  # per step, in ms
    kinds = {}
    for name, _, ms in ops:
        kind = next((k for k, marks in KERNEL_KINDS.items() if any(m in name.lower() for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0) + ms
    return dict(busy_ms=sum(ms for *_, ms in ops), kernels=sum(c for _, c, _ in ops), unit="kernels" if cuda else "ops",
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                top=sorted(ops, key=lambda op: -op[2])[:12])


def bench_train():
    """ms/step, tokens/s, MFU and GPU memory of train.py's step, for each variant. Each variant is train.py's
    config: defaults, then train_config, then train_common, then the variant's overrides. MFU is against this
    card's bf16 matmul rate, measured here (train.peak_flops). Memory: `state` is what stays allocated between
    steps (weights, AdamW moments, DDP's gradient buckets), `peak` the most during a step, `act` = peak - state
    (activations and temporaries: what gradient checkpointing and the fused loss shrink). Under torchrun every
    rank runs every variant (sharding=ddp|zero1|fsdp picks the parallelism); rank 0 reports. With train_alone, each
    rank first runs the variant alone on its GPU (all at once), and `scaling` = world x their mean step time / the
    joint step time (2.0x for two GPUs is perfect). A variant that runs out of memory is reported as OOM and the
    next one runs. Prints a table last; writes train_json. E.g.
        CUDA_VISIBLE_DEVICES=0 python bench.py --mode=train --train_variants="; loss_chunk=0; grad_ckpt=full"
        torchrun --standalone --nproc_per_node=2 bench.py --mode=train \
            --train_variants="; sharding=zero1; sharding=fsdp" \
            --train_common="vocab_size=50304 bias=False batch_size=32 gradient_accumulation_steps=2 compile=True"""
    import gc
    import json
    import math
    import os
    import time
    from dataclasses import fields
    from itertools import cycle
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    import train
    from configurator import config_keys
    from model import GPT, GPTConfig

    defaults = config_keys(vars(train))  # train.py's own defaults: each variant's config starts from a copy
    rank, local_rank, world, device = train.setup_distributed(train.device)
    cuda = device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak_flops = train.peak_flops(device, torch.bfloat16 if cuda else torch.float32)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} process(es) on {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}; "
        f"measured matmul peak {peak_flops / 1e12:.1f} TFLOP/s ({'bf16' if cuda else 'fp32'})")
    datas = {"random": ["random"], "real": ["real"], "both": ["random", "real"]}[train_data]
    rows = []
    for variant in [v.strip() for v in train_variants.split(";")]:
        for data in datas:
            config = dict(defaults)
            configure(config, ([train_config] if train_config else []) +
                      [f"--{kv}" for kv in (train_common + " " + variant).split()])
            T = SimpleNamespace(**config)  # the variant's config, as train.py would read it (train.py is untouched)
            row = dict(variant=variant or "(common)", data=data, world=world, batch_size=T.batch_size,
                       block_size=T.block_size, grad_accum=train.micro_steps(T.gradient_accumulation_steps, world))
            dtype_name, ptdtype = train.resolve_dtype(T.dtype, device)
            train.check_precision(dtype_name, T.sharding, T.bf16_residual)
            if data == "real":
                data_dir = os.path.join(T.data_root, T.dataset)
                if not os.path.isfile(os.path.join(data_dir, "meta.json")):
                    say(f"no prepared data in {data_dir}: real-data run of '{row['variant']}' skipped")
                    continue
                meta = train.load_meta(data_dir)
                if meta["vocab_size"] > T.vocab_size:
                    raise SystemExit(f"error: {data_dir} has {meta['vocab_size']} tokens > vocab_size "
                                     f"{T.vocab_size}; raise vocab_size in train_common")
                ds = train.TokenWindows(train.split_paths(data_dir, meta, "train"), T.block_size)
                batches = train.Batches(ds, T.batch_size, rank, world, T.seed, pin=cuda)
            else:  # a few fixed random batches, pinned like train.py's, different on every rank
                g = torch.Generator().manual_seed(T.seed + rank)
                w = [torch.randint(T.vocab_size, (T.batch_size, T.block_size + 1), generator=g) for _ in range(4)]
                w = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in w]
                batches = cycle([(x.pin_memory(), y.pin_memory()) if cuda else (x, y) for x, y in w])
            def measure(w):  # the variant's figures with w processes training together (1: this one alone)
                raw = model = optimizer = None
                out = {}
                try:
                    torch.manual_seed(T.seed)
                    with torch.device(device):  # initialised on the device: fast even for billions of parameters
                        raw = GPT(GPTConfig(**{f.name: getattr(T, f.name) for f in fields(GPTConfig)}))
                    model = train.parallelize(raw, device, w, T.compile, T.grad_ckpt, T.sharding, T.loss_chunk,
                                              T.fp8, T.bf16_residual)
                    optimizer = train.make_optimizers(raw, w, T.sharding, T.weight_decay, T.learning_rate,
                                                      (T.beta1, T.beta2), device, T.optimizer, T.embed_lr, T.head_lr,
                                                      T.muon_lr, T.muon_momentum, T.muon_weight_decay)
                    scaler = torch.amp.GradScaler(enabled=ptdtype == torch.float16)
                    guard = torch.zeros(len(train.GUARD_FIELDS), device=device)
                    ctx = train.autocast(device, ptdtype)

                    def step():
                        return train.train_step(model, optimizer, scaler, batches, row["grad_accum"], ctx, device,
                                                guard, T.grad_clip, T.spike_factor, T.max_bad_steps, world=w)

                    t0 = time.perf_counter()
                    for _ in range(train_warmup):
                        step()
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
                    tokens = T.batch_size * T.block_size * row["grad_accum"] * w  # per step, all w processes
                    # the guard skips AdamW on a bad update (non-finite loss or gradients, a loss spike): such a
                    # step is not one of training, and is cheaper
                    out.update(ms_per_step=1000 * dt, tokens_per_s=tokens / dt, tokens_per_s_per_gpu=tokens / dt / w,
                               mfu=raw.flops_per_token(T.block_size) * tokens / w / dt / peak_flops,
                               loss=loss.item(), params_m=raw.num_params() / 1e6, dtype=dtype_name,
                               skipped=int(guard[train.GUARD_FIELDS.index("total")].item()))
                    if cuda:
                        peak = torch.cuda.max_memory_allocated(device)
                        out.update(state_gib=state / 2**30, peak_gib=peak / 2**30, act_gib=(peak - state) / 2**30)
                    if train_profile:
                        out["profile"] = profile_steps(step, train_profile, cuda)
                except torch.OutOfMemoryError:
                    out["oom"] = True
                del raw, model, optimizer
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
                return out

            if world > 1 and train_alone:
                # the scaling column's baseline: first every process trains the variant alone (no DDP, no FSDP), all
                # at the same time, each on its own GPU; scaling = world x their mean step time / the joint one's
                alone = torch.zeros(world, dtype=torch.float64, device=device)
                alone[rank] = measure(1).get("ms_per_step", math.nan)
                dist.all_reduce(alone)
                row["alone_ms"] = alone.tolist()
            row.update(measure(world))
            if "alone_ms" in row and "ms_per_step" in row:
                row["scaling"] = sum(row["alone_ms"]) / row["ms_per_step"]
            del batches
            rows.append(row)
            say(json.dumps(row), flush=True)
            if rank == 0:
                os.makedirs(os.path.dirname(os.path.abspath(train_json)), exist_ok=True)
                with open(train_json, "w") as f:
                    json.dump(dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", world=world,
                                   torch=torch.__version__, peak_flops=peak_flops, rows=rows), f, indent=1)
    say(f"\n{'variant':<44} {'data':<6} {'ms/step':>8} {'tok/s':>10} {'tok/s/gpu':>10} {'MFU':>6} "
        f"{'state':>7} {'peak':>7} {'act':>7} GiB" + ("  scaling (ms alone)" if world > 1 and train_alone else ""))
    for r in rows:
        if r.get("oom"):
            say(f"{r['variant'][:44]:<44} {r['data']:<6} {'OOM':>8}")
            continue
        mem = "".join(f" {r[k]:7.2f}" if k in r else f" {'-':>7}" for k in ("state_gib", "peak_gib", "act_gib"))
        alone = (f"  {r['scaling']:.3f}x ({', '.join(f'{t:.1f}' for t in r['alone_ms'])})"
                 if "scaling" in r else "")
        say(f"{r['variant'][:44]:<44} {r['data']:<6} {r['ms_per_step']:8.1f} {r['tokens_per_s']:10,.0f} "
            f"{r['tokens_per_s_per_gpu']:10,.0f} {100 * r['mfu']:5.1f}%{mem}{alone}")
    for r in rows:
        if r.get("skipped"):
            say(f"warning: {r['variant']} ({r['data']}): the guard skipped {r['skipped']} of its "
                f"{train_warmup + train_steps} updates as bad (non-finite loss or gradients, or a spike), so its time is "
                f"not that of training")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            say(f"\nwhere a step's time goes, {r['variant']} ({r['data']}): {p['busy_ms']:.1f} ms busy, "
                f"{p['kernels']:.0f} {p['unit']}\n  " + ", ".join(f"{k} {ms:.2f} ms ({100 * ms / p['busy_ms']:.0f}%)"
                                                          for k, ms in p["kinds"].items()))
            for name, count, ms in p["top"]:
                say(f"  {ms:8.3f} ms {count:5.0f}x  {name[:100]}")
    train.leave_process_group(world)


def bench_generate():
    """Tokens/s of model.generate with and without the KV cache, batch 1 and 64, the first call (cold: each
    new shape pays kernel selection, lazy CUDA set-up and graph capture) and the second (warm), on random
    weights in bf16 (fp32 on CPU); sampling as sample.py's defaults (temperature 0.8, top-k 200). The cache
    rows run before the cache-less ones, so "cold" for the cache is the first generate of the process for
    that model and batch. With gen_cold, then the first and second call of a fresh process, as a user of
    sample.py meets them (generate_in_fresh_process). Writes gen_out_dir/generate.json."""
    import json
    import os
    import time

    import torch

    from model import GPT, GPTConfig

    device = ("cuda" if torch.cuda.is_available() else "cpu") if gen_device == "auto" else gen_device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    llama = dict(bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu")
    if gen_tiny:
        base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=256)
        shapes = {"gpt2-tiny": dict(base), "llama-tiny": dict(base, n_kv_head=2, **llama)}
    else:
        base = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
        shapes = {"gpt2-124m": dict(base), "llama-124m": dict(base, n_kv_head=4, **llama)}
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    os.makedirs(gen_out_dir, exist_ok=True)
    rows, cold, path = [], [], os.path.join(gen_out_dir, "generate.json")

    def save():  # after every row: a run cut short still leaves its numbers
        with open(path, "w") as f:
            json.dump(dict(device=name, dtype=str(dtype), torch=torch.__version__, new_tokens=gen_new_tokens,
                           prompt_len=gen_prompt_len, cuda_graph=gen_cuda_graph, rows=rows, cold=cold), f, indent=1)
    if gen_cold:  # first, while this process has no CUDA context yet to share the GPU with
        bench_fresh_processes(shapes, device, cold, save)
        print()
    torch.zeros(1, device=device).sum().item()  # the CUDA context is made here, outside every timing
    a = torch.randn(64, 64, device=device, dtype=dtype)
    (a @ a).sum().item()  # and the cuBLAS handle: process set-up, not the model's
    models = {}
    for shape, args in shapes.items():
        torch.manual_seed(0)
        models[shape] = GPT(GPTConfig(**args)).to(device, dtype).eval()
    print(f"generate: {gen_new_tokens} new tokens after a {gen_prompt_len}-token prompt, {name}, {dtype}")
    print(f"{'model':12}{'batch':>6}{'path':>15}{'cold tok/s':>12}{'warm tok/s':>12}{'cold s':>9}{'warm s':>9}")
    paths = ["cache"] + ["cache+compile"] * gen_compile + ["no cache"] * gen_no_cache  # the slow ones last
    for path_name in paths:
        use_cache, compile = path_name != "no cache", path_name == "cache+compile"
        for shape, model in models.items():
            cfg = model.config
            for batch in gen_batches:
                prompt = torch.randint(cfg.vocab_size, (batch, gen_prompt_len), device=device)
                seconds = []
                for _ in range(2):  # cold, warm
                    g = torch.Generator(device=device).manual_seed(0)
                    sync()
                    t0 = time.perf_counter()
                    for _ in model.generate(prompt, gen_new_tokens, 0.8, 200, generator=g, use_cache=use_cache,
                                            cuda_graph=gen_cuda_graph, compile=compile):
                        pass
                    sync()
                    seconds.append(time.perf_counter() - t0)
                tok = batch * gen_new_tokens
                rows.append(dict(model=shape, batch=batch, path=path_name, cold_s=seconds[0], warm_s=seconds[1],
                                 cold_tok_s=tok / seconds[0], warm_tok_s=tok / seconds[1]))
                print(f"{shape:12}{batch:6}{path_name:>15}{tok / seconds[0]:12,.0f}{tok / seconds[1]:12,.0f}"
                      f"{seconds[0]:9.2f}{seconds[1]:9.2f}", flush=True)
                save()
    print(f"wrote {path}")


def bench_fresh_processes(shapes, device, cold, save):
    """bench_generate's gen_cold table: for each of gen_cold_variants, the first and second generate call of a
    fresh process (generate_in_fresh_process), appended to `cold`; save() writes the json after each row."""
    import ast

    first = next(iter(shapes))
    print(f"fresh process (a new interpreter per row, as `python sample.py` runs): its first generate call "
          f"against its second; {first} unless the variant says otherwise")
    print(f"{'variant':34}{'first s':>9}{'second s':>10}{'ratio':>7}{'1st token s':>13}{'(2nd call)':>11}"
          f"{'import s':>10}{'model s':>9}")
    for variant in [v.strip() for v in gen_cold_variants.split(";")]:
        args = dict(shape=first, batch=1, prompt_len=gen_prompt_len, new_tokens=gen_new_tokens,
                    cuda_graph=gen_cuda_graph, compile=False)
        for kv in variant.split():
            key, _, value = kv.partition("=")
            if key not in args:
                raise SystemExit(f"error: gen_cold_variants: unknown key {key!r} in {variant!r}; use "
                                 f"{', '.join(args)}")
            args[key] = value if key == "shape" else ast.literal_eval(value)
        if args["shape"] not in shapes:
            raise SystemExit(f"error: gen_cold_variants: shape {args['shape']!r} is not one of {', '.join(shapes)}")
        r = generate_in_fresh_process(dict(args, model=shapes[args["shape"]], device=device))
        cold.append(dict(variant=variant or "(as sample.py)", **args, **r))
        print(f"{variant or '(as sample.py)':34}{r['first_s']:9.3f}{r['second_s']:10.3f}{r['ratio']:6.2f}x"
              f"{r['first_token_s'][0]:13.3f}{r['first_token_s'][1]:11.3f}{r['import_s']:10.2f}{r['model_s']:9.2f}",
              flush=True)
        save()
        if gen_cold_profile:  # in one more fresh process, as the profiler distorts the timing
            ops = generate_in_fresh_process(dict(args, model=shapes[args["shape"]], device=device, profile=True))
            cold[-1]["profile"] = ops["profile"]
            api = "with the CUDA API calls, " if device.startswith("cuda") else ""
            print(f"  its first call's most expensive ops (self CPU time, {api}under the profiler):")
            for op, count, ms in ops["profile"]:
                print(f"  {ms:10.1f} ms {count:6d}x  {op[:90]}")
            save()


def generate_in_fresh_process(args):
    """The first and the second model.generate call of a new interpreter, made as sample.py makes them: the model
    built in fp32 on the device, cast once to sample.pick_dtype's dtype, every token read on the host as it
    streams. args: model (GPTConfig kwargs), device, batch, prompt_len, new_tokens, cuda_graph, compile; and
    profile=True to profile the first call instead. Returns {first_s, second_s, ratio, first_token_s (both calls),
    import_s, model_s} (import: torch and the scripts; model: building it and its first move to the device,
    which makes the CUDA context), or {profile: [(op, calls, self CPU ms)]} for the 15 most expensive ops."""
    import json
    import os
    import subprocess
    import sys

    child = """if 1:
        import json, sys, time
        t0 = time.perf_counter()
        import torch
        import sample
        from model import GPT, GPTConfig
        import_s = time.perf_counter() - t0
        a = json.loads(sys.argv[1])
        device = sample.pick_device(a["device"])
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = GPT(GPTConfig(**a["model"])).to(device).eval().to(sample.pick_dtype("auto", device))
        prompt = torch.randint(model.config.vocab_size, (a["batch"], a["prompt_len"]), device=device)
        sync()
        model_s = time.perf_counter() - t0

        def call():
            g = torch.Generator(device=device).manual_seed(0)
            sync()
            t0, first = time.perf_counter(), None
            for next_id in model.generate(prompt, a["new_tokens"], 0.8, 200, 1.0, generator=g,
                                          cuda_graph=a["cuda_graph"], compile=a["compile"]):
                next_id.tolist()  # as sample.py, which decodes each token as it comes
                first = first or time.perf_counter() - t0
            sync()
            return time.perf_counter() - t0, first
        if a.get("profile"):
            from torch.profiler import ProfilerActivity, profile
            cuda = [ProfilerActivity.CUDA] if device.startswith("cuda") else []
            with profile(activities=[ProfilerActivity.CPU] + cuda) as prof:
                call()
            ops = [(e.key, e.count, e.self_cpu_time_total / 1000) for e in prof.key_averages()]
            print(json.dumps(dict(profile=sorted(ops, key=lambda op: -op[2])[:15])))
        else:
            (first_s, t1), (second_s, t2) = call(), call()
            print(json.dumps(dict(first_s=first_s, second_s=second_s, ratio=first_s / second_s,
                                  first_token_s=[t1, t2], import_s=import_s, model_s=model_s)))
    """
    r = subprocess.run([sys.executable, "-c", child, json.dumps(args)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        raise SystemExit(f"error: generate in a fresh process failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_rlhf():
    """rlhf.py's built-in task end to end, once per seed of rlhf_seeds: pretraining, SFT, RM, PPO, DPO, GRPO, RLOO,
    each a subprocess running its config file (what a user runs) with --seed, in rlhf_dir/seed<N>/ (the task's
    data, and so the held-out problems, are shared). Then every model is evaluated the same way on the held-out
    problems: exact-match accuracy (greedy, and sampled at temperature 1), the reward model's mean score of the
    samples, and the KL to its seed's SFT model; the table shows each figure as the mean +- std over the seeds.
    Besides the offline pairs' RM, the InstructGPT way: the SFT model's own samples labelled by the judge (label),
    an RM on those + the offline pairs (rm-onpol), PPO on it (ppo-onpol). Finished stages are reused: delete
    rlhf_dir (or a stage's folder) to rerun them. Each stage's output goes to its log file next to its folder."""
    import json
    import os
    import shutil
    import statistics
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    import torch

    import rlhf
    from sample import load
    task, data = os.path.join(rlhf_dir, "task"), os.path.join(rlhf_dir, "data")
    t = lambda name: os.path.join(task, name)  # noqa: E731
    ev = [f"--eval_prompts={t('prompts_val.jsonl')}"]

    def stages(s):  # one seed's out_dirs and chain: (name, the file that shows it finished, its commands)
        d = os.path.join(rlhf_dir, f"seed{s}")
        out = {n: os.path.join(d, n) for n in ("base", "sft", "rm", "ppo", "ppo-judge", "dpo", "rm-onpol", "ppo-onpol",
                                                "grpo", "rloo")}

        def rl(cfg, name, *args, parent="sft"):
            return name, os.path.join(out[name], "latest.json"), [["rlhf.py", cfg, f"--init_from={out[parent]}",
                                                                   f"--out_dir={out[name]}", f"--seed={s}", *args,
                                                                   *rlhf_args]]
        return out, [
            ("base", os.path.join(out["base"], "latest.json"), [["train.py", "config/add.py", f"--data_root={data}",
                                                                 f"--out_dir={out['base']}", f"--seed={s}",
                                                                 *rlhf_train_args]]),
            rl("config/sft.py", "sft", f"--data={t('sft.jsonl')}", f"--val_data={t('sft_val.jsonl')}", *ev,
               parent="base"),
            rl("config/rm.py", "rm", f"--data={t('prefs.jsonl')}", f"--val_data={t('prefs_val.jsonl')}"),
            rl("config/ppo.py", "ppo", f"--reward_model={out['rm']}", f"--data={t('prompts.jsonl')}", *ev),
            rl("config/ppo.py", "ppo-judge", "--reward_model=task", f"--data={t('prompts.jsonl')}", *ev),
            rl("config/dpo.py", "dpo", f"--data={t('prefs.jsonl')}", f"--val_data={t('prefs_val.jsonl')}", *ev),
            rl("config/grpo.py", "grpo", "--reward_model=task", f"--data={t('prompts.jsonl')}", *ev),
            rl("config/rloo.py", "rloo", "--reward_model=task", f"--data={t('prompts.jsonl')}", *ev),
            ("label", os.path.join(d, "prefs_sft_val.jsonl"), [
                ["rlhf.py", "config/label.py", f"--init_from={out['sft']}", f"--data={t('prompts.jsonl')}",
                 f"--label_out={d}/prefs_sft.jsonl", f"--seed={s}", *rlhf_args]]),
            rl("config/rm.py", "rm-onpol", f"--data={t('prefs.jsonl')},{d}/prefs_sft.jsonl",  # config/rm.py's mix
               f"--val_data={d}/prefs_sft_val.jsonl"),
            rl("config/ppo.py", "ppo-onpol", f"--reward_model={out['rm-onpol']}", f"--data={t('prompts.jsonl')}", *ev)]

    def run_chain(s, chain, times_path):
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        for name, done, cmds in chain:
            if name in times and os.path.exists(done):  # times.json lists the stages that finished
                continue
            if done.endswith("latest.json") and os.path.isdir(os.path.dirname(done)):  # a run cut short: again
                shutil.rmtree(os.path.dirname(done))
            t0, log = time.time(), os.path.join(os.path.dirname(times_path), f"{name}.log")
            with open(log, "w") as f:
                for cmd in cmds:
                    f.write(f"--- python {' '.join(cmd)}\n")
                    f.flush()
                    if subprocess.run([sys.executable] + cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                        raise SystemExit(f"error: seed {s}, stage {name} failed (see {log}); fix it and rerun, "
                                         f"finished stages in {rlhf_dir} are reused")
            times[name] = time.time() - t0
            with open(times_path, "w") as f:
                json.dump(times, f)
            print(f"seed {s}: {name} done in {times[name]:.0f}s ({log})", flush=True)
        return times

    t0 = time.time()
    shared = [("task", t("prompts_val.jsonl"), [["rlhf.py", "--stage=task", f"--task_dir={task}"]]),
              ("data", os.path.join(data, "add", "meta.json"), [
                  ["prepare.py", f"--input={t('corpus.txt')}", f"--data_root={data}", "--dataset=add",
                   "--vocab_size=261"]])]
    os.makedirs(rlhf_dir, exist_ok=True)
    run_chain("-", shared, os.path.join(rlhf_dir, "times.json"))
    chains = {s: stages(s) for s in rlhf_seeds}
    for s in rlhf_seeds:
        os.makedirs(os.path.join(rlhf_dir, f"seed{s}"), exist_ok=True)
    print(f"{len(rlhf_seeds)} seeds, {rlhf_parallel} at a time: {', '.join(n for n, _, _ in chains[rlhf_seeds[0]][1])}",
          flush=True)
    with ThreadPoolExecutor(rlhf_parallel) as pool:  # threads only wait on the stages' processes
        futures = {s: pool.submit(run_chain, s, chains[s][1], os.path.join(rlhf_dir, f"seed{s}", "times.json"))
                   for s in rlhf_seeds}
        times = {s: f.result() for s, f in futures.items()}
    print(f"all stages in {time.time() - t0:.0f}s; evaluating", flush=True)

    prompts = [r["prompt"] for r in rlhf.read_jsonl(t("prompts_val.jsonl"), [("prompt",)])]

    def pairwise(rm, tok, path):  # a reward model's pairwise accuracy on a file of held-out pairs
        pairs = rlhf.read_jsonl(path, [("prompt", "chosen", "rejected")])
        ids, mask, last = rlhf.pair_batch(tok, pairs)
        with torch.no_grad():
            r = rlhf.reward_scores(*rm, ids, mask, last)
        return (r[:len(pairs)] > r[len(pairs):]).float().mean().item()
    results = {}
    for s in rlhf_seeds:
        out, d = chains[s][0], os.path.join(rlhf_dir, f"seed{s}")
        sft, tok = load(out["sft"], "cpu")
        rms = {name: rlhf.load_reward_model(out[name], "cpu") for name in ("rm", "rm-onpol")}
        res = {name: rlhf.evaluate(load(out[name], "cpu")[0], tok, prompts, nullcontext(), rlhf.max_new_tokens,
                                   rlhf.no_end_score, ref=sft, rm=rms["rm-onpol"], seed=0)
               for name in ("base", "sft", "ppo", "ppo-judge", "dpo", "grpo", "rloo", "ppo-onpol")}
        for name, m in rms.items():  # each RM on the offline held-out pairs and on the SFT model's own held-out samples
            res[name] = {"offline": pairwise(m, tok, t("prefs_val.jsonl")),
                         "on-policy": pairwise(m, tok, os.path.join(d, "prefs_sft_val.jsonl"))}
        res["label"] = {"pairs": sum(1 for _ in open(os.path.join(d, "prefs_sft.jsonl")))}
        for name, r in res.items():
            r["wall_s"] = times[s].get(name, float("nan"))
        results[s] = res
        print(f"seed {s}: evaluated", flush=True)

    def ms(name, key, fmt=".3f"):  # "mean+-std" of results[seed][name][key] over the seeds
        v = [results[s][name][key] for s in rlhf_seeds]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):{fmt}}+-{sd:{fmt}}"
    print(f"\nbuilt-in task ({len(prompts)} held-out problems), mean+-std over seeds {', '.join(map(str, rlhf_seeds))} "
          f"({rlhf_parallel} run at a time: wall s includes their contention); acc = exact match, sampled at "
          f"temperature 1 or greedy; reward = the samples' mean score by the seed's rm-onpol; KL = to the seed's SFT "
          f"model, nats/response; ppo = PPO on the offline pairs' RM, ppo-judge / grpo / rloo = on the programmatic "
          f"judge; rm-onpol / ppo-onpol: the RM also trained on the SFT model's samples labelled by the judge, PPO "
          f"on it")
    print(f"{'stage':<10} {'acc(sampled)':>13} {'acc(greedy)':>13} {'reward':>13} {'KL':>13} {'wall s':>9}")
    for name in ("base", "sft", "rm", "ppo", "ppo-judge", "dpo", "grpo", "rloo", "label", "rm-onpol", "ppo-onpol"):
        wall = ms(name, "wall_s", ".0f")
        if name in ("rm", "rm-onpol"):
            acc = f"pairwise acc offline {ms(name, 'offline')}, on-policy {ms(name, 'on-policy')}"
            print(f"{name:<10} {acc:>55} {wall:>9}")
        elif name == "label":
            print(f"{name:<10} {ms(name, 'pairs', '.0f') + ' on-policy pairs (prefs_sft.jsonl)':>55} {wall:>9}")
        else:
            print(f"{name:<10} " + " ".join(f"{ms(name, k):>13}" for k in ("acc_sampled", "acc_greedy", "reward", "kl"))
                  + f" {wall:>9}")
    os.makedirs(os.path.dirname(rlhf_json) or ".", exist_ok=True)
    with open(rlhf_json, "w") as f:
        json.dump(dict(seeds=list(rlhf_seeds), results={str(s): r for s, r in results.items()},
                       n_prompts=len(prompts)), f, indent=1)
    print(f"wrote {rlhf_json}")


def speedrun_data(data_root="data", name="stdlib-1mb", max_bytes=1_000_000):
    """The small corpus of the speedrun recipes: ~1 MB of the default corpus (every 10th stdlib .py file in sorted
    order, whole files, for variety), byte level (vocab 256 + the 5 special tokens), every 10th file held out."""
    import subprocess
    import sys

    from prepare import corpus_files, read_documents
    if os.path.exists(os.path.join(data_root, name, "meta.json")):
        return
    src = os.path.join(data_root, name + ".txt")
    os.makedirs(data_root, exist_ok=True)
    with open(src, "w", encoding="utf-8") as f:
        size = 0
        for doc in read_documents(corpus_files("stdlib")[::10], strict=False):
            if "<|endoftext|>" in doc:
                continue
            f.write(doc + "\n<|endoftext|>\n")
            size += len(doc.encode())
            if size >= max_bytes:
                break
    subprocess.run([sys.executable, "prepare.py", f"--input={src}", f"--dataset={name}", f"--data_root={data_root}",
                    "--vocab_size=261", "--val_fraction=0.1"], check=True)


def speedrun_one(config, overrides, seed, out_dir):
    """One train.py run in a fresh process; returns its eval rows, each with `wall` = seconds from launch."""
    import shlex
    import shutil
    import subprocess
    import sys
    import time
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "train.py", config, *("--" + kv for kv in shlex.split(speedrun_common + " " + overrides)),
           f"--seed={seed}", f"--out_dir={out_dir}", f"--data_root={speedrun_data_root}", "--save_checkpoints=False"]
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=open(out_dir + ".log", "w"), stderr=subprocess.STDOUT)
    return proc, t0, cmd


def speedrun_rows(out_dir, t0):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    for r in rows:
        if "time" in r:
            r["wall"] = r["time"] - t0
    return rows


def bench_speedrun():
    """Wall time from launch to a val-loss target, for a recipe against a baseline on the same tokens, over seeds.
    Every run is `python train.py CONFIG --seed=S` in a fresh process, so start-up, data loading, compilation and
    evaluations all count. The baseline's runs come first; the target is their best val loss (mean over seeds)
    unless speedrun_target is set. Each recipe row (the recipe, then each variant: the ablation) reports the time
    and steps to the first evaluation at or below the target, its best val loss, and its whole wall time, as
    mean +- std over the seeds. Writes speedrun_dir/results.json and a val-loss-vs-time plot if matplotlib is there.
        python bench.py --mode=speedrun                                        # config/speedrun_small*.py
        python bench.py --mode=speedrun --speedrun_variants="unet_skips=False; value_embeds=False"
        python bench.py --mode=speedrun --speedrun_config=config/speedrun_124m.py \
            --speedrun_baseline=config/speedrun_124m_base.py --speedrun_seeds=1"""
    import statistics
    import time
    speedrun_data(speedrun_data_root)
    if not speedrun_baseline and not speedrun_target:
        raise SystemExit("error: speedrun_baseline='' needs a speedrun_target (the val loss to reach)")
    runs = ([("baseline", speedrun_baseline, "")] if speedrun_baseline else []) + [("recipe", speedrun_config, "")]
    runs += [(v.strip(), speedrun_config, v.strip()) for v in speedrun_variants.split(";") if v.strip()]
    results = {}
    jobs = [(name, config, ov, seed) for name, config, ov in runs for seed in range(speedrun_seeds)]
    pending, active = list(jobs), []
    while pending or active:  # the baseline's seeds first: with speedrun_parallel > 1 they overlap each other only
        while pending and len(active) < speedrun_parallel and (pending[0][0] == "baseline" or
                                                               all(a[0][0] != "baseline" for a in active)):
            job = pending.pop(0)
            out = os.path.join(speedrun_dir, f"{job[0].replace(' ', '_').replace('=', '-')}-s{job[3]}")
            active.append((job, out, *speedrun_one(job[1], job[2], 1337 + job[3], out)))
        time.sleep(0.2)
        for a in [a for a in active if a[2].poll() is not None]:
            active.remove(a)
            (name, _, _, seed), out, proc, t0, cmd = a
            if proc.returncode:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{open(out + '.log').read()[-2000:]}")
            rows = speedrun_rows(out, t0)
            results.setdefault(name, []).append(dict(seed=seed, rows=rows, wall=time.time() - t0))
            print(f"{name} seed {seed}: best val {min(r['val_loss'] for r in rows if 'val_loss' in r):.4f}, "
                  f"{time.time() - t0:.1f}s", flush=True)
    base_best = [min(r["val_loss"] for r in run["rows"] if "val_loss" in r) for run in results.get("baseline", [])]
    target = speedrun_target or statistics.mean(base_best)
    ms = lambda xs: (f"{statistics.mean(xs):.4g} +- {statistics.stdev(xs):.2g}" if len(xs) > 1 else
                     f"{xs[0]:.4g}") if xs and all(x == x for x in xs) else "-"
    table = []
    for name, _, _ in runs:
        hit = [next((r for r in run["rows"] if r.get("val_loss", 1e9) <= target), None) for run in results[name]]
        first = [next((r["first_step_s"] for r in run["rows"] if "first_step_s" in r), float("nan"))
                 for run in results[name]]
        row = dict(name=name, reached=sum(h is not None for h in hit), seeds=len(hit),
                   time_to_target=[h["wall"] for h in hit if h], steps=[h["step"] for h in hit if h],
                   tokens=[h["tokens"] for h in hit if h], first_step_s=first,
                   best_val=[min(r["val_loss"] for r in run["rows"] if "val_loss" in r) for run in results[name]],
                   wall=[run["wall"] for run in results[name]])
        table.append(row)
    print(f"\ntarget val loss {target:.4f} (baseline best, mean of {len(base_best)} seeds)" if not speedrun_target
          else f"\ntarget val loss {target:.4f}")
    print(f"{'run':<34} {'reached':>7} {'s to target':>16} {'steps':>14} {'best val':>18} {'first step s':>14} "
          f"{'wall s':>14}")
    for r in table:
        print(f"{r['name'][:34]:<34} {r['reached']:>3}/{r['seeds']:<3} {ms(r['time_to_target']):>16} "
              f"{ms(r['steps']):>14} {ms(r['best_val']):>18} {ms(r['first_step_s']):>14} {ms(r['wall']):>14}")
    os.makedirs(speedrun_dir, exist_ok=True)
    with open(os.path.join(speedrun_dir, "results.json"), "w") as f:
        json.dump(dict(target=target, table=table, runs=results), f, indent=1)
    try:  # val loss against wall time from launch, the first seed of each row
        import plot
        path = plot.curves({name: results[name][0]["rows"] for name, _, _ in runs},
                           os.path.join(speedrun_dir, "val_vs_time.png"), x="wall", title=f"target {target:.4f}")
        print(f"wrote {path}")
    except SystemExit as e:  # matplotlib missing: the table is the result
        print(e)


if __name__ == "__main__":
    configure(globals())
    modes = {"bpe": bench_bpe, "train": bench_train, "generate": bench_generate, "rlhf": bench_rlhf,
             "speedrun": bench_speedrun}
    if mode not in modes:
        raise SystemExit(f"error: unknown mode '{mode}'; choose one of {', '.join(modes)}")
    modes[mode]()
