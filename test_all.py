"""
The tests of scratchlm, grouped by the file they test. Tiny models, tiny data, CPU only.
Run: python -m pytest -q test_all.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# ==== bpe.py ====
# ==== end bpe.py ====

# ==== configurator.py ====
# ==== end configurator.py ====

# ==== prepare.py ====
TINY_TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.0",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--compile=False"]


def run(*args, cwd=HERE, check=True, env=None):
    """Run a repo script in a subprocess (its own interpreter, like a user would); return the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


def tiny_corpus(root):
    """40 small Python-like documents, made fresh (CI has no data/)."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "value", "for", "in", "range", "if", "else", "print", "x", "y"]
    os.makedirs(root, exist_ok=True)
    docs = []
    for i in range(40):
        lines = [f"def f{i}(x):"] + ["    " + " ".join(rng.choice(words, 6)) for _ in range(8)] + ["# ünïcödé ✓"]
        docs.append("\n".join(lines) + "\n")
        with open(os.path.join(root, f"doc{i:02d}.py"), "w", encoding="utf-8") as f:
            f.write(docs[-1])
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared tiny dataset: (data_root, dataset name, the documents)."""
    root = tmp_path_factory.mktemp("tiny")
    docs = tiny_corpus(str(root / "corpus"))
    run("prepare.py", f"--input={root / 'corpus'}", f"--data_root={root / 'data'}", "--dataset=tiny",
        "--vocab_size=300", "--val_fraction=0.2")
    return str(root / "data"), "tiny", docs


def test_prepare_shards_decode_to_the_documents_joined_by_eot(tiny_data):
    import bpe
    import prepare
    data_root, name, docs = tiny_data
    meta = json.load(open(os.path.join(data_root, name, "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(data_root, name, "tokenizer.bpe"))
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["tokenizer_hash"] == tok.hash
    prepare.val_fraction = 0.2
    for split in ("train", "val"):
        ids = np.concatenate([prepare.read_shard(os.path.join(data_root, name, p)) for p in meta[f"{split}_shards"]])
        header = prepare.read_header(os.path.join(data_root, name, meta[f"{split}_shards"][0]))
        assert header["itemsize"] == 2 and header["vocab_size"] == 300 and header["tokenizer_hash"] == tok.hash
        assert len(ids) == meta[f"{split}_tokens"]
        expected = [d for i, d in enumerate(docs) if prepare.split_of(i) == split]
        assert len(expected) == meta[f"{split}_docs"] > 0
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in expected)


def test_prepare_rerun_with_same_inputs_is_a_noop(tiny_data):
    data_root, name, _ = tiny_data
    shard = os.path.join(data_root, name, "train_000.bin")
    before = os.stat(shard).st_mtime_ns
    p = run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={data_root}",
            f"--dataset={name}", "--vocab_size=300", "--val_fraction=0.2")
    assert "up to date" in p.stdout and os.stat(shard).st_mtime_ns == before


def test_download_from_url_is_cached_and_checksummed(tmp_path):
    import prepare
    src = tmp_path / "src.txt"
    src.write_text("hello world\n" * 1000)
    url = src.as_uri()
    dest = str(tmp_path / "cache" / "src.txt")
    os.makedirs(os.path.dirname(dest))
    prepare.download(url, dest, size=12000)
    assert open(dest).read() == src.read_text()
    assert open(dest + ".sha256").read().strip() == prepare.file_sha256(dest)  # pinned on first download
    with open(dest, "a") as f:  # the cached copy changes behind our back: refused, removed
        f.write("tampered")
    with pytest.raises(SystemExit, match="checksum mismatch"):
        prepare.download(url, dest)
    assert not os.path.exists(dest)
    with pytest.raises(SystemExit, match="cannot download"):
        prepare.download((tmp_path / "missing.txt").as_uri(), str(tmp_path / "cache" / "missing.txt"))

def test_download_resumes_a_partial_file_with_an_http_range_request(tmp_path):
    import http.server
    import threading
    import prepare
    payload = os.urandom(300_000)
    ranges = []

    class RangeHandler(http.server.BaseHTTPRequestHandler):  # a minimal server that honours "Range: bytes=N-"
        def do_GET(self):
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            ranges.append(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = str(tmp_path / "big.bin")
        with open(dest + ".part", "wb") as f:  # an earlier download died a third of the way through
            f.write(payload[:100_000])
        prepare.download(f"http://127.0.0.1:{server.server_port}/big.bin", dest, size=len(payload))
    finally:
        server.shutdown()
    assert ranges == [100_000] and open(dest, "rb").read() == payload


def test_prepare_reuses_a_given_tokenizer(tiny_data, tmp_path):
    data_root, name, _ = tiny_data
    tok_file = os.path.join(data_root, name, "tokenizer.bpe")
    run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={tmp_path}", "--dataset=again",
        f"--tokenizer={tok_file}", "--val_fraction=0.2")
    meta = json.load(open(tmp_path / "again" / "meta.json"))
    assert meta["tokenizer_hash"] == json.load(open(os.path.join(data_root, name, "meta.json")))["tokenizer_hash"]
# ==== end prepare.py ====

# ==== model.py ====
# ==== end model.py ====

# ==== train.py ====
def tiny_train(tiny_data, out_dir, *extra, torchrun=0, check=True):
    data_root, name, _ = tiny_data
    args = ["train.py", *TINY_TRAIN, f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={out_dir}", *extra]
    if torchrun:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    return run(*args, check=check, env={"OMP_NUM_THREADS": "1"})


def final_params(out_dir):
    from train import load_checkpoint
    return load_checkpoint(str(out_dir))["model"]


def test_lr_schedule_warmup_cosine_and_floor():
    from train import get_lr
    lr = lambda it: get_lr(it, learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert lr(0) == pytest.approx(1 / 11)                # linear warmup starts near 0, not at 0
    assert lr(10) == pytest.approx(1.0)                  # end of warmup: the peak
    assert lr(60) == pytest.approx(0.55)                 # half-way through the cosine: the mean of peak and floor
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)  # the floor, and it stays there


def test_tiny_model_overfits_one_batch():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128))
    x = torch.randint(0, 128, (4, 33))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ln(128) = 4.85: it has memorised the batch


def test_training_lowers_val_loss_and_logs_metrics(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=30")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 30 and {"step", "loss", "lr", "tokens_per_s", "mfu", "mem_gib"} <= set(steps[0])
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < np.log(300) - 1.0 and evals[-1]["val_bpb"] > 0
    assert os.path.exists(tmp_path / "tokenizer.bpe") and "step 30" in p.stdout


def test_resume_is_bit_exact(tiny_data, tmp_path):
    common = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1"]  # dropout: RNG replays too
    tiny_train(tiny_data, tmp_path / "once", *common)
    tiny_train(tiny_data, tmp_path / "twice", *common[1:], "--max_iters=4")
    tiny_train(tiny_data, tmp_path / "twice", *common, "--init_from=resume")
    a, b = final_params(tmp_path / "once"), final_params(tmp_path / "twice")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    common = ["--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    tiny_train(tiny_data, tmp_path / "single", *common)
    tiny_train(tiny_data, tmp_path / "ddp", *common, torchrun=2)
    a, b = final_params(tmp_path / "single"), final_params(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

def test_epochs_deal_every_window_once_and_ranks_never_overlap(tiny_data):
    from train import Batches, TokenWindows, split_paths
    from prepare import load_meta
    data_root, name, _ = tiny_data
    data_dir = os.path.join(data_root, name)
    ds = TokenWindows(split_paths(data_dir, load_meta(data_dir), "train"), block_size=8)
    seen = []
    for rank in range(2):
        b = Batches(ds, 3, rank, 2, seed=0)
        seen.append(torch.cat([b.order[i * 3:(i + 1) * 3] for i in range(b.per_epoch)]).tolist())
        x, y = next(b)
        assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert not set(seen[0]) & set(seen[1])                       # no window on both ranks
    assert len(set(seen[0])) == len(seen[0])                     # no window twice: no replacement
    assert len(seen[0]) + len(seen[1]) >= len(ds) - 2 * 3 * 2   # all but the ragged tail of the epoch
    fresh, resumed = Batches(ds, 3, 0, 2, seed=0, epoch=1), Batches(ds, 3, 0, 2, seed=0, epoch=1, pos=1)
    next(fresh)
    assert torch.equal(next(fresh)[0], next(resumed)[0])  # a saved position picks up the very next batch
# ==== end train.py ====

# ==== train.py (scale) ====
# ==== end train.py (scale) ====

# ==== train.py (faults) ====
# ==== end train.py (faults) ====

# ==== bad inputs ====
# ==== end bad inputs ====

# ==== sample.py ====
# ==== end sample.py ====

# ==== chat ====
# ==== end chat ====

# ==== rlhf.py ====
# ==== end rlhf.py ====
