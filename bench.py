"""
Measurements anyone can rerun.
    python bench.py --mode=bpe        # tokenizer training and encoding speed (CPU)
    python bench.py --mode=train      # training throughput, MFU, memory (GPU)
    python bench.py --mode=generate   # generation tokens/s with and without the KV cache (GPU)
    python bench.py --mode=rlhf       # the post-training pipeline on the built-in task: accuracy, reward, KL
"""
from configurator import configure

mode = "train"


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

    vocab_size, repeats, n_cpu = 32000, 7, os.cpu_count()
    files = bpe.corpus_files()
    n_train = len(files) - len(files) // 20
    held = [bpe.read_text(f) for f in files[n_train:]]
    held_mb = sum(len(t.encode()) for t in held) / 1e6
    train_mb = sum(os.path.getsize(f) for f in files[:n_train]) / 1e6
    # The child trains and reports {seconds, cpu_seconds, peak_mb}. CPU: its own and its worker processes'.
    # Peak = the main process + its largest worker (ru_maxrss of each), an upper bound: workers share pages.
    child = """if 1:
        import json, resource, sys, time
        import bpe
        def usage():
            return [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        which, out, vocab_size, n_train = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        texts = [bpe.read_text(f) for f in bpe.corpus_files()[:n_train]]
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

    print(f"BPE training: vocab {vocab_size:,}, GPT-4 pattern, {n_train} files ({train_mb:.1f} MB) of "
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


def bench_train():
    raise SystemExit("error: bench_train is not written yet")


def bench_generate():
    raise SystemExit("error: bench_generate is not written yet")


def bench_rlhf():
    raise SystemExit("error: bench_rlhf is not written yet")


if __name__ == "__main__":
    configure(globals())
    modes = {"bpe": bench_bpe, "train": bench_train, "generate": bench_generate, "rlhf": bench_rlhf}
    if mode not in modes:
        raise SystemExit(f"error: unknown mode '{mode}'; choose one of {', '.join(modes)}")
    modes[mode]()
