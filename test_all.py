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
import base64
import hashlib
import random
import string as string_module
import textwrap

import tiktoken

import bpe

# A small multilingual corpus: a few stdlib modules plus text in other scripts, so merges of multi-byte
# characters get learned too.
BPE_CORPUS = [open(m.__file__, encoding="utf-8").read() for m in (textwrap, string_module, json.encoder)] + [
    "Grüße aus Köln! Ça va très bien. 東京は日本の首都です。 Привет, мир! שלום עולם مرحبا بالعالم 🎉🎉 👍🏽 " * 20]


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe.train(BPE_CORPUS, 1000)


def random_unicode(rng, max_len=40):
    """Text from a mix of hard cases: any code point (no surrogates), emoji with modifiers and joiners, CJK,
    combining marks, right-to-left scripts and marks, control characters, whitespace runs, digits, contractions."""
    pools = ["abcXYZ hello world", "0123456789", " \t\n\r\x0b\x0c\u00a0\u2028\u3000", "éüñßøÅ", "東京日本語한국어中文",
             "😀🎉👍🏽👨\u200d👩\u200d👧🇩🇪", "e\u0301a\u0308\u20dd\u0338", "שלום مرحبا\u200f\u200e\u202e",
             "\x00\x01\x1b\x7f\x85", "'s'S'll'VE're", "<|endoftext|>", "!?.,;:(){}[]-_=+*/\\\"'#@$%^&~`"]
    out = []
    for _ in range(rng.randint(0, max_len)):
        if rng.random() < 0.2:
            c = rng.randint(0, 0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


ADVERSARIAL = ["", " ", "\n", "a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ab" * 50, " " * 100, "\n" * 50,
               "\r\n\r\n  \r\n\t\t\n", "   x   y\n\n\n   ", "1234567890123", "'s's's'S'LL", "naïve café",
               "\u0000\u0001", "🎉" * 30, "😀👍🏽" * 10, "e\u0301\u0301\u0301", "العربية", "<|endoftext|> <|user|>",
               "def f(x):\n    return x  # comment\n", "\u00a0\u00a0 \u3000\u2028", "x" * 2000, "é" * 1000]


def test_bpe_known_answer_aaabdaaabac_worked_by_hand():
    # "aaabdaaabac" is one chunk. Pair counts: aa 4, ab 2, bd 1, da 1, ba 1, ac 1 -> merge aa = 256.
    # Left to right, "aaab" becomes [aa, a, b]: now Z=aa, text Z a b d Z a b a c; pairs (Z,a) 2 and (a,b) 2
    # tie, and the smaller pair of ids wins: (97, 98) < (256, 97), so ab = 257. Then (Z, ab) 2 -> aaab = 258.
    tok = bpe.train(["aaabdaaabac"], 256 + 3 + len(bpe.SPECIAL_TOKENS))
    learned = sorted(tok.ranks.items(), key=lambda kv: kv[1])[256:]
    assert learned == [(b"aa", 256), (b"ab", 257), (b"aaab", 258)]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert bpe.encode_reference(tok, "aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_bpe_vocab_size_is_exact_with_special_tokens_last(bpe_tok):
    assert bpe_tok.vocab_size == 1000 and len(bpe_tok.ranks) == 1000 - len(bpe.SPECIAL_TOKENS)
    assert sorted(bpe_tok.ranks.values()) == list(range(1000 - len(bpe.SPECIAL_TOKENS)))
    assert list(bpe_tok.special_tokens) == bpe.SPECIAL_TOKENS
    assert list(bpe_tok.special_tokens.values()) == list(range(995, 1000)) and bpe_tok.eot == 995
    assert bpe_tok.enc.n_vocab == 1000
    smallest = bpe.train(BPE_CORPUS[:1], 256 + 2, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert smallest.vocab_size == 258 and smallest.eot == 256
    no_specials = bpe.train(BPE_CORPUS[:1], 300, special_tokens=[])
    assert no_specials.vocab_size == 300 and no_specials.eot is None


def test_bpe_impossible_vocab_sizes_are_clear_errors():
    with pytest.raises(SystemExit, match="error: vocab_size=260 is too small"):
        bpe.train(["hello"], 260)
    with pytest.raises(SystemExit, match="error: the corpus has no pairs left.*at most 265"):
        bpe.train(["hello"], 5000)  # 5 bytes in one chunk allow exactly 4 merges: 256 + 4 + 5 specials = 265


def test_bpe_roundtrip_random_unicode_fuzz(bpe_tok):
    rng = random.Random(1234)
    texts = [random_unicode(rng) for _ in range(2000)] + ADVERSARIAL
    for text in texts:
        assert bpe_tok.decode(bpe_tok.encode_ordinary(text)) == text
        assert bpe_tok.decode_bytes(bpe_tok.encode(text, disallowed_special=())) == text.encode("utf-8")
    assert [bpe_tok.decode(ids) for ids in bpe_tok.encode_ordinary_batch(texts)] == texts


@pytest.mark.parametrize("pattern", [bpe.GPT4_PATTERN, bpe.GPT2_PATTERN], ids=["gpt4", "gpt2"])
def test_bpe_reference_encoder_matches_tiktoken_ids(pattern, bpe_tok):
    tok = bpe_tok if pattern == bpe.GPT4_PATTERN else bpe.train(BPE_CORPUS, 700, pattern=pattern)
    rng = random.Random(99)
    texts = [random_unicode(rng, 80) for _ in range(1000)] + ADVERSARIAL + [BPE_CORPUS[0][:5000], BPE_CORPUS[-1]]
    for text in texts:
        assert bpe.encode_reference(tok, text) == tok.encode_ordinary(text), repr(text)


def test_bpe_special_tokens_follow_tiktoken_allowed_disallowed_rules(bpe_tok):
    bare = tiktoken.Encoding("bare", pat_str=bpe_tok.pattern, mergeable_ranks=bpe_tok.ranks,
                             special_tokens=bpe_tok.special_tokens)
    text = "hi<|endoftext|>there<|user|>"
    with pytest.raises(ValueError, match="disallowed special token"):
        bpe_tok.encode(text)  # by default every special token is disallowed: data can't inject them
    all_ids = bpe_tok.encode(text, allowed_special="all")
    assert all_ids == bare.encode(text, allowed_special="all")
    assert all_ids.count(bpe_tok.eot) == 1 and bpe_tok.special_tokens["<|user|>"] == all_ids[-1]
    only_eot = bpe_tok.encode("hi<|endoftext|>there<|user|>", allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert bpe_tok.eot in only_eot and bpe_tok.special_tokens["<|user|>"] not in only_eot
    as_text = bpe_tok.encode(text, disallowed_special=())
    assert as_text == bpe_tok.encode_ordinary(text) == bare.encode_ordinary(text)
    assert not set(as_text) & set(bpe_tok.special_tokens.values())
    assert bpe_tok.decode(all_ids) == bpe_tok.decode(as_text) == text
    assert bpe_tok.encode_batch([text, "x"], allowed_special="all") == [all_ids, bpe_tok.encode("x")]
    with pytest.raises(ValueError):
        bpe_tok.encode_batch(["ok", text])


def test_bpe_special_tokens_in_training_text_are_not_learned():
    tok = bpe.train(["<|endoftext|>" * 50 + "ab"], 256 + 1 + len(bpe.SPECIAL_TOKENS))
    assert sorted(tok.ranks.items(), key=lambda kv: kv[1])[256:] == [(b"ab", 256)]


def test_bpe_training_is_deterministic_byte_identical_file(tmp_path, bpe_tok):
    again = bpe.train(iter(BPE_CORPUS), 1000)  # a generator this time
    bpe_tok.save(tmp_path / "a.bpe")
    again.save(tmp_path / "b.bpe")
    assert (tmp_path / "a.bpe").read_bytes() == (tmp_path / "b.bpe").read_bytes()
    assert again.hash == bpe_tok.hash


def test_bpe_parallel_chunk_counting_equals_serial():
    serial = bpe.count_chunks(BPE_CORPUS, bpe.GPT4_PATTERN, bpe.SPECIAL_TOKENS)
    parallel = bpe.count_chunks(BPE_CORPUS, bpe.GPT4_PATTERN, bpe.SPECIAL_TOKENS, chars_per_batch=10_000)
    assert parallel == serial


def test_bpe_save_load_roundtrip_is_identical(tmp_path, bpe_tok):
    path = tmp_path / "tok.bpe"
    bpe_tok.save(path)
    loaded = bpe.Tokenizer.load(path)
    assert (loaded.ranks, loaded.pattern, loaded.special_tokens) == (bpe_tok.ranks, bpe_tok.pattern, bpe_tok.special_tokens)
    assert loaded.hash == bpe_tok.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.encode("héllo wörld 🎉") == bpe_tok.encode("héllo wörld 🎉")
    header = json.loads(path.read_text().split("\n")[0])  # human-inspectable: a JSON header, then base64 + rank
    assert header["format"] == "scratchlm-bpe" and header["n_ranks"] == 995
    b64, rank = path.read_text().split("\n")[257].split(" ")
    assert rank == "256" and bpe_tok.ranks[base64.b64decode(b64)] == 256
    assert [p.name for p in tmp_path.iterdir()] == ["tok.bpe"]  # the temporary file of the atomic save is gone


def test_bpe_corrupt_truncated_or_missing_file_is_a_clear_error(tmp_path, bpe_tok):
    path = tmp_path / "tok.bpe"
    bpe_tok.save(path)
    good = path.read_bytes()
    lines = good.split(b"\n")
    swapped = lines[:300] + [lines[301], lines[300]] + lines[302:]
    cases = {"half": good[:len(good) // 2], "last byte": good[:-1], "last line": b"\n".join(lines[:-2]) + b"\n",
             "header": b"{not json\n" + b"\n".join(lines[1:]), "bad base64": good.replace(lines[300], b"@@@ 299"),
             "empty": b"", "binary": bytes(range(256)), "ranks out of order": b"\n".join(swapped)}
    for name, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: tokenizer file .*tok\.bpe is corrupt: .*; retrain it") as e:
            bpe.Tokenizer.load(path)
        assert "\n" not in str(e.value), name
    with pytest.raises(SystemExit, match=r"^error: tokenizer file .*missing\.bpe does not exist"):
        bpe.Tokenizer.load(tmp_path / "missing.bpe")


def test_bpe_lone_surrogate_is_a_clear_error(bpe_tok):
    for call in (bpe_tok.encode, bpe_tok.encode_ordinary, lambda t: bpe_tok.encode_batch([t]),
                 lambda t: bpe_tok.encode_ordinary_batch([t]), lambda t: bpe.train([t], 300)):
        with pytest.raises(ValueError, match="lone surrogate '\\\\udcff' at index 3"):
            call("abc\udcffdef")


def test_bpe_bad_patterns_are_clear_errors():
    with pytest.raises(SystemExit, match="does not match every character"):
        bpe.train(["hello, world"], 300, pattern=r"\w+")  # would silently drop ", "
    with pytest.raises(SystemExit, match="^error: bad pattern"):
        bpe.train(["hello, world"], 300, pattern=r"(\w+")


def test_bpe_cli_trains_saves_and_summarises(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(BPE_CORPUS):
        (tmp_path / "corpus" / f"{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tok.bpe"
    r = subprocess.run([sys.executable, os.path.join(HERE, "bpe.py"), f"--input={tmp_path / 'corpus'}",
                        "--vocab_size=400", f"--out={out}", "--holdout=0.25"], capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert "vocab_size 400" in r.stdout and "bytes/token" in r.stdout and "merges/s" in r.stderr
    assert bpe.Tokenizer.load(out).vocab_size == 400
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
