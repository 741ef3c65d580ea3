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
    raise SystemExit("error: bench_bpe is not written yet")


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
