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
def conf_defaults():
    return dict(n_layer=12, learning_rate=6e-4, compile=False, out_dir="out", betas=(0.9, 0.95), vocab_size=None)


def test_configurator_applies_file_then_flags_in_order_and_types_hold(tmp_path):
    from configurator import configure
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 4\nlearning_rate = 1  # an int widens to a float\nimport math\n_private = 3\n")
    ns = conf_defaults()
    out = configure(ns, [str(cfg), "--n_layer=6", "--out_dir=2024", "--betas=[0.8, 0.9]", "--compile"])
    assert out == dict(n_layer=6, learning_rate=1.0, compile=True, out_dir="2024", betas=(0.8, 0.9), vocab_size=None)
    assert type(ns["learning_rate"]) is float and ns["out_dir"] == "2024"  # a str key keeps the text as written


@pytest.mark.parametrize("args, pattern", [
    (["--n_layers=4"], r"^error: unknown config key 'n_layers' \(did you mean n_layer\?\)$"),
    (["--zzz=1"], r"^error: unknown config key 'zzz' \(valid keys: betas, compile, learning_rate, n_layer, out_dir, "),
    (["--n_layer=4.5"], r"^error: config key 'n_layer' expects int \(default 12\), got float 4.5$"),
    (["--n_layer=big"], r"^error: config key 'n_layer' expects int \(default 12\), got str 'big'$"),
    (["--compile=false"], r"^error: config key 'compile' expects bool .*got str 'false'; write True or False$"),
    (["--compile=1"], r"^error: config key 'compile' expects bool"),  # 1 is not a bool, even though it is an int
    (["--n_layer"], r"^error: '--n_layer' has no value; write --n_layer=VALUE$"),
    (["config/nope.py"], r"^error: config file 'config/nope.py' does not exist"),
])
def test_configurator_bad_key_type_or_file_is_a_one_line_error(args, pattern):
    from configurator import configure
    with pytest.raises(SystemExit, match=pattern):
        configure(conf_defaults(), args)


@pytest.mark.parametrize("text, pattern", [
    ("n_layers = 4\n", r"unknown config key 'n_layers' in .*c\.py \(did you mean n_layer\?\)"),
    ("n_layer = 4\nlearning_rate = = 1\n", r"^error: config file .*c\.py line 2: SyntaxError"),
    ("n_layer = 4\n\nout_dir = base + '/x'\n", r"^error: config file .*c\.py line 3: NameError: name 'base'"),
])
def test_configurator_mistakes_in_a_config_file_name_the_file_and_line(tmp_path, text, pattern):
    from configurator import configure
    (tmp_path / "c.py").write_text(text)
    with pytest.raises(SystemExit, match=pattern):
        configure(conf_defaults(), [str(tmp_path / "c.py")])


def test_configurator_errors_reach_the_terminal_as_one_line_without_traceback(tmp_path):
    (tmp_path / "c.py").write_text("vocab_size = 300\nval_fraction = 0.1\nshard_tokns = 5\n")
    for args, pattern in ((["--vocab_sise=300"], "did you mean vocab_size"),
                          ([str(tmp_path / "c.py")], r"'shard_tokns' in .*c\.py \(did you mean shard_tokens\?\)")):
        one_line_error(run("prepare.py", *args, check=False), pattern)  # prepare.py: the quickest script to start
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
import math

MODEL_OPTIONS = {  # each switch alone, then combinations
    "gpt2": {}, "rope": dict(pos_encoding="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1),
    "window": dict(sliding_window=5), "no_bias_untied": dict(bias=False, tie_embeddings=False),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "mistral_qk_untied": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, qk_norm=True,
                              sliding_window=6, rope_theta=5e5, tie_embeddings=False, mlp_hidden=96),
    "window_gqa_dropout": dict(sliding_window=4, n_kv_head=2, qk_norm=True, dropout=0.1),
}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes extra threads spin, not work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt_with(seed=0, spread=0.0, **kw):
    """A 2-layer GPT, vocab 64, context 32. spread > 0 adds N(0, spread) noise to every parameter, so logits
    have clear winners and greedy decoding is not decided by float rounding."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model.eval()


def expected_params(cfg):
    """Parameter count written out from the architecture, independently of the model code."""
    C, V, L, b = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.bias
    hd = C // cfg.n_head
    kv = (cfg.n_kv_head or cfg.n_head) * hd
    per_norm = 2 if cfg.norm == "layernorm" and b else 1  # weight (+ bias)
    hidden = cfg.mlp_hidden or (64 * math.ceil(8 * C / 3 / 64) if cfg.mlp == "swiglu" else 4 * C)
    fc = 2 * hidden if cfg.mlp == "swiglu" else hidden
    attn = C * (C + 2 * kv) + C * C + ((C + 2 * kv) + C if b else 0) + (2 * hd * per_norm if cfg.qk_norm else 0)
    mlp = C * fc + hidden * C + (fc + C if b else 0)
    n = V * C + L * (attn + mlp + 2 * C * per_norm) + C * per_norm
    n += C * cfg.block_size if cfg.pos_encoding == "learned" else 0
    return n + (0 if cfg.tie_embeddings else V * C)


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_option_shapes_tying_initial_loss_and_backward(name, one_thread):
    model = gpt_with(**MODEL_OPTIONS[name]).train()
    idx, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, 64)
    assert abs(loss.item() - math.log(64)) < 0.1  # small init: near-uniform predictions
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    cfg = model.config
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg.tie_embeddings
    assert ("wpe" in model.transformer) == (cfg.pos_encoding == "learned")  # RoPE: no position table
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_parameter_count_matches_the_formula(name, one_thread):
    model = gpt_with(**MODEL_OPTIONS[name])
    cfg = model.config
    n = expected_params(cfg)
    assert model.num_params(non_embedding=False) == n
    lookups = (cfg.n_embd * cfg.block_size if cfg.pos_encoding == "learned" else 0) + \
        (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)  # wpe, and wte when untied
    assert model.num_params() == n - lookups


def test_model_llama_small_config_has_the_gpt2_small_configs_parameter_count(one_thread):
    import runpy
    from model import GPT, GPTConfig
    counts = []
    for name in ("small_gpt2", "llama_small"):
        c = runpy.run_path(os.path.join(HERE, "config", f"{name}.py"))
        cfg = GPTConfig(**{k: v for k, v in c.items() if k in GPTConfig.__dataclass_fields__}, vocab_size=4096)
        model = GPT(cfg)
        assert model.num_params(non_embedding=False) == expected_params(cfg)
        counts.append(model.num_params())
    assert counts[0] == counts[1]  # equal non-embedding parameters: a fair comparison


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_causality_a_future_token_cannot_change_earlier_logits(name, one_thread):
    model = gpt_with(spread=0.1, **MODEL_OPTIONS[name])
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (idx[:, 12] + 1) % 64
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-3  # and the changed position itself does see it


def test_model_rope_scores_depend_only_on_relative_position(one_thread):
    from model import apply_rope, rope_rotations
    torch.manual_seed(0)
    q, k = torch.randn(2, 10, 3, 16), torch.randn(2, 10, 3, 16)  # (B, T, heads, head_dim)
    pos = torch.arange(10)

    def scores(qpos, kpos):  # (B, heads, Tq, Tk)
        return (apply_rope(q, rope_rotations(qpos, 16, 1e4)).transpose(1, 2) @
                apply_rope(k, rope_rotations(kpos, 16, 1e4)).permute(0, 2, 3, 1))
    torch.testing.assert_close(scores(pos, pos), scores(pos + 37, pos + 37), rtol=0, atol=1e-4)  # all shifted
    assert (scores(pos, pos) - scores(pos, pos + 3)).abs().max() > 0.1  # a relative shift does change them
    assert (scores(pos, pos) - q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).abs().max() > 0.1  # not a no-op


@pytest.mark.parametrize("kw", [dict(), dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)])
def test_model_gqa_with_copied_kv_heads_equals_mha(kw, one_thread):
    gqa = gpt_with(spread=0.1, n_kv_head=2, **kw)
    mha = gpt_with(n_kv_head=4, **kw)
    sd, hd = gqa.state_dict(), 8
    for name in list(sd):
        if name.endswith("c_attn.weight") or name.endswith("c_attn.bias"):
            q, k, v = sd[name].split([4 * hd, 2 * hd, 2 * hd])
            # kv head j serves query heads 2j and 2j+1: give MHA two copies of it
            dup = lambda t: t.view(2, hd, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hd, *t.shape[1:])
            sd[name] = torch.cat([q, dup(k), dup(v)])
    mha.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)  # causal kernel path
    # and the cached path, which folds query heads into the query axis instead of copying k/v
    a, b = (m.forward_cached(idx, torch.arange(20), m.new_cache(2, 20, torch.float32, "cpu")) for m in (gqa, mha))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_sliding_window_equals_an_explicit_banded_mask(n_kv_head, one_thread):
    w, T = 3, 12
    model = gpt_with(spread=0.1, n_layer=1, sliding_window=w, n_kv_head=n_kv_head)
    band = torch.tensor([[0 <= i - j < w for j in range(T)] for i in range(T)])  # written out, entry by entry
    pos = torch.arange(T)
    assert torch.equal(model.attn_mask(pos, pos), band)
    attn, x = model.transformer.h[0].attn, torch.randn(2, T, 32)
    q, k, v = attn.c_attn(x).split([32, 8 * n_kv_head, 8 * n_kv_head], dim=2)
    q, k, v = (t.view(2, T, -1, 8).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(4 // n_kv_head, dim=1) for t in (k, v))
    att = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~band, float("-inf")).softmax(-1)
    ref = attn.c_proj((att @ v).transpose(1, 2).reshape(2, T, 32))  # plain softmax attention, by hand
    torch.testing.assert_close(attn(x, None, model.sdpa_mask(pos, pos)), ref, rtol=1e-5, atol=1e-5)
    idx = torch.randint(0, 64, (1, T))  # one layer: position 9 sees tokens 7..9 and nothing earlier
    logits = model(idx)[0]
    for j, seen in ((6, False), (7, True)):
        changed = idx.clone()
        changed[0, j] = (idx[0, j] + 1) % 64
        assert ((model(changed)[0][0, 9] - logits[0, 9]).abs().max() > 1e-4) == seen


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_kv_cache_logits_equal_full_forward_logits(name, one_thread):
    model = gpt_with(spread=0.1, **MODEL_OPTIONS[name])
    idx = torch.randint(0, 64, (3, 25))
    full = model(idx)[0]
    cache = model.new_cache(3, 32, torch.float32, "cpu")
    steps = [model.forward_cached(idx[:, :7], torch.arange(7), cache)]  # prefill 7, then one token at a time
    steps += [model.forward_cached(idx[:, t:t + 1], torch.tensor([t]), cache) for t in range(7, 25)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_greedy_generation_is_identical_with_and_without_cache(name, one_thread):
    model = gpt_with(spread=0.3, **MODEL_OPTIONS[name])
    prompt = torch.randint(0, 64, (3, 5))
    # 70 new tokens with a context of 32: the context is cut (and the cache re-prefilled) twice on the way
    gen = lambda **kw: torch.stack(list(model.generate(prompt, 70, temperature=0, **kw)), dim=1)
    with_cache = gen()
    assert with_cache.shape == (3, 70)
    assert torch.equal(with_cache, gen(use_cache=False))


def test_model_generate_stop_ids_end_rows_and_then_generation(one_thread):
    model = gpt_with(spread=0.3, **MODEL_OPTIONS["llama"])
    prompt = torch.randint(0, 64, (3, 5))
    free = torch.stack(list(model.generate(prompt, 40, temperature=0)), dim=1)
    stop = int(free[0, 3])
    out = torch.stack(list(model.generate(prompt, 40, temperature=0, stop_ids=[stop])), dim=1)
    for row, o in zip(free, out):
        hits = (row == stop).nonzero()
        first = int(hits[0]) if len(hits) else None
        if first is None:  # a row that never stops runs to the end as before, so generation did too
            assert out.shape[1] == 40 and torch.equal(o, row)
        else:  # identical up to its stop id, then only that stop id
            assert torch.equal(o[:first + 1], row[:first + 1]) and (o[first:] == stop).all()
    assert out.shape[1] == 40 or (out[:, -1] == stop).all()  # it ends early only once every row has stopped


def test_model_top_k_and_top_p_keep_the_right_tokens(one_thread):
    from model import sample_next
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)  # probabilities, as log-probabilities
    g = torch.Generator().manual_seed(0)
    kept = lambda **kw: set(sample_next(logits, generator=g, **kw).tolist())
    assert kept() == {0, 1, 2, 3}
    assert kept(top_k=2) == {0, 1}
    assert kept(top_p=0.45) == {0}            # 0.5 alone reaches 0.45
    assert kept(top_p=0.7) == {0, 1}          # 0.5 + 0.3 reaches 0.7
    assert kept(top_p=0.9) == {0, 1, 2}
    assert kept(top_k=3, top_p=0.7) == {0, 1}
    assert kept(temperature=0) == {0}         # greedy
    counts = torch.bincount(sample_next(logits, top_k=2, generator=g), minlength=4).float() / 4000
    assert abs(counts[0] - 0.5 / 0.8) < 0.03  # renormalised over the kept tokens


def test_model_bad_options_are_one_line_errors(one_thread):
    for kw, word in ((dict(mlp="swish"), "mlp"), (dict(norm="batchnorm"), "norm"), (dict(n_kv_head=3), "n_kv_head"),
                     (dict(pos_encoding="alibi"), "pos_encoding")):
        with pytest.raises(SystemExit, match=f"error: .*{word}"):
            gpt_with(**kw)


def test_bench_generate_runs_tiny_on_cpu_and_writes_json(tmp_path):
    p = run("bench.py", "--mode=generate", "--gen_tiny=True", "--gen_new_tokens=6", "--gen_batches=(1, 3)",
            "--gen_device=cpu", f"--gen_out_dir={tmp_path}", env={"OMP_NUM_THREADS": "1"})
    rows = json.load(open(tmp_path / "generate.json"))["rows"]
    assert len(rows) == 8 and all(r["warm_tok_s"] > 0 and r["cold_tok_s"] > 0 for r in rows)
    assert {(r["model"], r["batch"], r["path"]) for r in rows} == \
        {(m, b, c) for m in ("gpt2-tiny", "llama-tiny") for b in (1, 3) for c in ("cache", "no cache")}
    assert "llama-tiny" in p.stdout.splitlines()[-2]  # the table is printed
# ==== end model.py ====

# ==== train.py ====
def tiny_train(tiny_data, out_dir, *extra, torchrun=0, check=True):
    data_root, name, _ = tiny_data
    args = ["train.py", *TINY_TRAIN, f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={out_dir}", *extra]
    if torchrun:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    return run(*args, check=check, env={"OMP_NUM_THREADS": "1"})


def final_params(out_dir):
    from checkpoint import load_checkpoint
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


def test_logged_step_rate_leaves_evaluation_out(tiny_data, tmp_path):
    # the evaluation at step 8 (2 x 200 batches, some 100 steps' worth of time) falls in the window of steps 9-12
    tiny_train(tiny_data, tmp_path, "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=8", "--eval_iters=200",
               "--log_interval=4", "--gradient_accumulation_steps=1")
    ms = {r["step"]: r["ms_per_step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r}
    assert ms[12] < 5 * max(ms[4], ms[8]), ms


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
def tiny_gpt(**kw):
    """A 4-layer GPT in training mode (gpt_with's, deeper, so that every-k-th-block checkpointing differs)."""
    return gpt_with(**{**dict(n_layer=4, n_head=2, block_size=16, vocab_size=96), **kw}).train()


def test_grad_ckpt_full_and_every_2nd_block_give_identical_loss_and_grads():
    from train import checkpoint_blocks, ckpt_interval
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    results = {}
    for setting in (None, "full", 2):
        model = tiny_gpt(dropout=0.1)  # dropout: the recomputed forward must replay the same random masks
        if ckpt_interval(setting):
            checkpoint_blocks(model, ckpt_interval(setting))
        torch.manual_seed(1)
        _, loss = model(x, y)
        loss.backward()
        results[setting] = loss, [p.grad for p in model.parameters()], list(model.state_dict())
    (loss0, grads0, names0) = results[None]
    for setting in ("full", 2):
        loss, grads, names = results[setting]
        assert torch.equal(loss, loss0) and names == names0  # the wrapped blocks keep the state dict's names
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0)), setting
    with pytest.raises(SystemExit, match="grad_ckpt"):
        ckpt_interval("sometimes")


def test_grad_ckpt_under_compile_keeps_as_little_as_eager_with_the_same_grads():
    """Traced into a compiled graph, a checkpoint is only a hint, and the partitioner kept 3x what eager keeps
    here; train.parallelize compiles checkpointed blocks alone instead. (The chunked loss runs compiled too.)"""
    from train import parallelize
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))

    def run(compile, grad_ckpt):  # -> loss, grads, bytes the forward saved for the backward
        torch.manual_seed(0)
        raw = tiny_gpt()
        model = parallelize(raw, "cpu", 1, compile, grad_ckpt, loss_chunk=16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        return loss, [p.grad for p in raw.parameters()], sum(saved)
    loss0, grads0, plain = run(False, None)
    _, _, eager = run(False, "full")
    loss, grads, compiled = run(True, "full")
    assert compiled <= 1.05 * eager < plain / 3
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


def test_grad_ckpt_under_compile_with_plain_logits_keeps_no_fp32_copy_of_them():
    """With loss_chunk=0 the loss on the logits is compiled on its own too. Run eagerly between compiled blocks it
    kept fp32 log-probabilities of the bf16 logits: more memory than no checkpointing at all."""
    from train import parallelize
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    saved, losses = {}, {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = parallelize(tiny_gpt(), "cpu", 1, compile, "full", loss_chunk=0)
        saved[compile] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved[compile].append(t.nbytes) or t, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16):
                _, losses[compile] = model(x, y)
        losses[compile].backward()
    fp32_logits = 3 * 16 * 96 * 4
    assert sum(saved[True]) + fp32_logits <= sum(saved[False])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-3, atol=1e-3)


def test_compiled_training_step_makes_no_zero_gradient_for_the_logits():
    """A compiled model gives each returned tensor that needs grad a zero gradient in the backward: for the
    logits a (B, T, vocab) fill per step (3.3 GB at GPT-2 32x1024). With targets the model
    returns them detached, so the compiled backward fills nothing of their shape, and the grads are eager's."""
    from torch.profiler import profile
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    torch.manual_seed(0)
    model = tiny_gpt()
    compiled = torch.compile(model)
    for _ in range(2):  # compile, then the run we look at
        with profile(record_shapes=True) as prof:
            logits, loss = compiled(x, y)
            loss.backward()
    grads = [p.grad.clone() / 2 for p in model.parameters()]
    filled = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")]
    assert not logits.requires_grad and [3, 16, 96] not in filled
    model.zero_grad()
    model(x, y)[1].backward()
    for g, g0 in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_equals_cross_entropy_on_logits_in_loss_and_grads():
    import torch.nn.functional as F
    import types
    from train import LinearCrossEntropy, chunked_head_loss
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)   # 37 rows in chunks of 8: a ragged last one
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = -1                                                           # ignored positions
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(3 * ref, (x, w))
    loss = LinearCrossEntropy.apply(x, w, t, 8)
    fx, fw = torch.autograd.grad(3 * loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        torch.testing.assert_close(LinearCrossEntropy.apply(x, w, t, 8), ref, rtol=1e-12, atol=1e-12)
    model = tiny_gpt()  # in the model: tied head, loss_chunk on gives the same loss and returns no logits
    idx, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits, plain = model(idx, y)
    model.head_loss = types.MethodType(chunked_head_loss(7), model)
    none, fused = model(idx, y)
    assert logits.shape == (2, 16, 96) and none is None
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_trains_through_train_step():
    import train
    from itertools import cycle
    model = tiny_gpt()
    run = train.parallelize(model, "cpu", 1, grad_ckpt=2, loss_chunk=8)
    opt = [model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")]
    scaler = torch.amp.GradScaler(enabled=False)
    guard = torch.zeros(len(train.GUARD_FIELDS))
    w = torch.randint(0, 96, (2, 4, 17))
    batches = cycle([(b[:, :-1], b[:, 1:]) for b in w])
    ctx = train.autocast("cpu", torch.bfloat16)
    losses = [train.train_step(run, opt, scaler, batches, 2, ctx, "cpu", guard, 1.0, 0.0, 5).item() for _ in range(12)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0  # from ln(96) = 4.6, memorising 8 rows
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # fp32 master weights


def test_fp8_matmul_is_exact_on_its_fp8_operands_and_close_to_the_real_product():
    from fp8 import fp8_forward, fp8_grads, scaled_mm, to_fp8
    x = torch.randn(64, 32)
    w = 0.02 * torch.randn(48, 32)
    g = 1e-4 * torch.randn(64, 48)                     # a gradient's scale: far below e5m2's range without scaling
    y, x8, w8, sx, sw = fp8_forward(x, w, torch.float32)
    g8, sg = to_fp8(g, torch.float8_e5m2)
    gx, gw = fp8_grads(g8, sg, x8, w8, sx, sw, (torch.float32, torch.float32))
    assert x8.float().abs().max() == 448 and g8.float().abs().max() == 57344  # the largest magnitude on fp8's max
    xd, wd, gd = (t.double() * s.double() for t, s in ((x8, sx), (w8, sw), (g8, sg)))
    for got, want in ((y, xd @ wd.t()), (gx, gd @ wd), (gw, gd.t() @ xd)):   # fp64 on the same fp8 values
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    X, W, G = x.double(), w.double(), g.double()
    assert rel(y, X @ W.t()) < 0.06 and rel(gx, G @ W) < 0.1 and rel(gw, G.t() @ X) < 0.1  # fp8's rounding
    # the CPU's fp32 emulation gives what torch's own (slow) fp8 matmul gives
    torch.testing.assert_close(scaled_mm(g8, w8.t().contiguous().t(), sg, sw, torch.float32),
                               torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw,
                                                out_dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_fp8_head_loss_gives_the_cross_entropy_and_its_gradients_without_an_amax_pass():
    from fp8 import Float8LinearCrossEntropy, to_fp8
    x = torch.randn(64, 32, requires_grad=True)
    w = (0.3 * torch.randn(80, 32)).requires_grad_()
    t = torch.randint(0, 80, (64,))
    t[::7] = -1                                        # positions without a target
    loss, logits = Float8LinearCrossEntropy.apply(x, w, t, torch.float32)
    assert not logits.requires_grad
    (-2.5 * loss).backward()                           # any upstream gradient, negative included
    (x8, sx), (w8, sw) = to_fp8(x, torch.float8_e4m3fn), to_fp8(w, torch.float8_e4m3fn)
    xd, wd = x8.double() * sx.double(), w8.double() * sw.double()
    torch.testing.assert_close(logits.double(), xd @ wd.t(), rtol=1e-5, atol=1e-5)
    want_loss = torch.nn.functional.cross_entropy(xd @ wd.t(), t, ignore_index=-1)  # fp64, same fp8 operands
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    X, W = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (-2.5 * torch.nn.functional.cross_entropy(X @ W.t(), t, ignore_index=-1)).backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(x.grad, X.grad) < 0.1 and rel(w.grad, W.grad) < 0.1   # fp8's rounding, not a wrong scale or sign


def test_fp8_is_transposed_only_by_fp8_t_which_the_compiler_cannot_fuse_into_the_cast():
    # a kernel that stores an fp8 value both as is and transposed is miscompiled by Triton (see fp8.fp8_t):
    # fp8 -> fp8 ops may only be views and fp8_t, never a copy that the compiler could fuse into the cast
    from torch.fx.experimental.proxy_tensor import make_fx
    from fp8 import Float8LinearCrossEntropy

    def step(x, w, t):
        loss, _ = Float8LinearCrossEntropy.apply(x, w, t, torch.float32)
        return torch.autograd.grad(loss, (x, w))

    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(80, 32, requires_grad=True)
    graph = make_fx(step, tracing_mode="fake")(x, w, torch.randint(-1, 80, (64,))).graph
    is_fp8 = lambda n: isinstance(n, torch.fx.Node) and getattr(n.meta.get("val"), "dtype", None) in (
        torch.float8_e4m3fn, torch.float8_e5m2)
    fp8_to_fp8 = [str(n.target) for n in graph.nodes if is_fp8(n) and any(map(is_fp8, n.args))]
    assert set(fp8_to_fp8) == {"aten.t.default", "scratchlm.fp8_t.default"}, fp8_to_fp8
    assert fp8_to_fp8.count("scratchlm.fp8_t.default") == 3  # x8, w8 and g8 in the backward


def test_fp8_head_keeps_no_16_or_32_bit_logits_for_the_backward():
    # the gradient is made in the forward, in e5m2: the backward holds 1 byte per logit, not the 2-4 of the logits
    from fp8 import Float8LinearCrossEntropy
    saved = []
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(80, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, logits = Float8LinearCrossEntropy.apply(x, w, torch.randint(0, 80, (64,)), torch.bfloat16)
    big = [t for t in saved if t.numel() == logits.numel()]
    assert [t.dtype for t in big] == [torch.float8_e5m2]


def test_compiled_training_forward_and_backward_are_one_graph_with_the_fp8_head_too():
    # a graph break runs the rest eagerly, which is slower (and torch 2.11 broke on an autograd Function's .apply)
    import train
    from torch._dynamo.utils import counters
    x = torch.randint(0, 96, (2, 17))
    for fp8 in ("none", "head"):
        torch._dynamo.reset()
        counters.clear()
        run = train.parallelize(tiny_gpt(bias=False, n_layer=1), "cpu", 1, compile=True, loss_chunk=0, fp8=fp8)
        with torch.autocast("cpu", torch.bfloat16):
            loss = run(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, (fp8, dict(counters))


def bf16_training_loss(model, run, steps=40):
    """The last loss of `steps` AdamW steps of run (the step module for model) under CPU bf16 autocast, on one
    fixed batch of 16 rows that repeat themselves halfway: something to learn beyond unigram counts."""
    x = torch.randint(0, 96, (16, 17), generator=torch.Generator().manual_seed(0))
    x[:, 8:] = x[:, :9]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16):
            loss = run(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def test_fp8_training_tracks_bf16_training_and_is_refused_where_it_cannot_apply():
    import fp8 as fp8_head
    import train
    losses = {}
    for fp8 in ("none", "head"):
        torch.manual_seed(0)
        model = tiny_gpt(bias=False)
        losses[fp8] = bf16_training_loss(model, train.parallelize(model, "cpu", 1, loss_chunk=0, fp8=fp8))
        assert (getattr(model.head_loss, "__func__", None) is fp8_head.fp8_head_loss) == (fp8 == "head")
    assert losses["none"] < 3.0  # from ln(96) = 4.6
    assert abs(losses["head"] - losses["none"]) < 0.05 * losses["none"]
    with pytest.raises(SystemExit, match="fp8='head' needs loss_chunk=0"):
        train.parallelize(tiny_gpt(), "cpu", 1, loss_chunk=8, fp8="head")
    with pytest.raises(SystemExit, match="fp8 must be 'none' or 'head'"):
        train.parallelize(tiny_gpt(), "cpu", 1, fp8=True)
    with pytest.raises(SystemExit, match="fp8 needs an NVIDIA GPU with fp8 tensor cores"):
        train.parallelize(tiny_gpt(), "mps", 1, loss_chunk=0, fp8="head")


def test_bf16_residual_keeps_the_stream_between_blocks_in_bf16_and_trains_like_fp32():
    import train
    losses, seen = {}, []
    for bf16_residual in (False, True):
        torch.manual_seed(0)
        model = tiny_gpt(bias=False)
        run = train.parallelize(model, "cpu", 1, compile=True, loss_chunk=0, bf16_residual=bf16_residual)
        model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        losses[bf16_residual] = bf16_training_loss(model, run)
        assert seen[-1] == (torch.bfloat16 if bf16_residual else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[False] < 3.0 and abs(losses[True] - losses[False]) < 0.05 * losses[False]


@pytest.mark.parametrize("sharding", ["fsdp", "zero1"])
def test_sharded_two_processes_match_one_process_and_checkpoints_load_across_shardings(sharding, tiny_data,
                                                                                    tmp_path):
    import shutil
    from model import GPT, GPTConfig
    from checkpoint import load_checkpoint, model_from_checkpoint
    from train import load_optimizer_state
    common = ["--max_iters=4", "--lr_decay_iters=6", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    tiny_train(tiny_data, tmp_path / "single", *common)
    p = tiny_train(tiny_data, tmp_path / "sharded", *common, f"--sharding={sharding}", torchrun=2)
    if sharding == "zero1":  # each of the 2 processes keeps AdamW's moments for about half of the parameters
        import re
        mine, total = re.search(r"zero1: AdamW state for ([\d,]+) of the ([\d,]+)", p.stdout).groups()
        assert 0.4 < int(mine.replace(",", "")) / int(total.replace(",", "")) < 0.6
    a, b = load_checkpoint(str(tmp_path / "single")), load_checkpoint(str(tmp_path / "sharded"))
    for k in a["model"]:  # FSDP2 or ZeRO-1 over 2 processes = one process with the same global batch
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb) and "transformer.h.0.mlp.c_fc.weight" in sb  # keyed by name, whole (unsharded)
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=1e-3, atol=1e-6)
    # the sharded run's checkpoint is a plain one: the model loads for sampling, AdamW's state in one process
    model = model_from_checkpoint(b)
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape[:2] == (1, 4)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    load_optimizer_state(model, [opt], b["optimizer"])
    p = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(opt.state[p]["exp_avg_sq"], sb["transformer.h.0.mlp.c_fc.weight"]["exp_avg_sq"])
    # and training goes on across shardings, both ways: sharded -> one process, one process -> sharded
    shutil.copytree(tmp_path / "single", tmp_path / "to_sharded")
    more = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=2", "--gradient_accumulation_steps=2",
            "--init_from=resume"]
    p1 = tiny_train(tiny_data, tmp_path / "sharded", *more)
    p2 = tiny_train(tiny_data, tmp_path / "to_sharded", *more, f"--sharding={sharding}", torchrun=2)
    for p, d in ((p1, "sharded"), (p2, "to_sharded")):
        assert "step 6/6" in p.stdout and load_checkpoint(str(tmp_path / d))["iter_num"] == 6


# bench.py's train_common for a model that it times in seconds on a CPU
TINY_BENCH = "n_layer=2 n_head=2 n_embd=32 block_size=16 batch_size=4 vocab_size=384"


def test_bench_train_runs_variants_at_tiny_size_on_cpu(tiny_data, tmp_path):
    data_root, name, _ = tiny_data
    common = f"{TINY_BENCH} gradient_accumulation_steps=2 compile=False data_root={data_root} dataset={name}"
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=; grad_ckpt=full loss_chunk=0",
            "--train_steps=2", "--train_warmup=1", "--train_data=both", f"--train_json={tmp_path / 'b.json'}")
    rows = json.load(open(tmp_path / "b.json"))["rows"]
    assert [(r["variant"], r["data"]) for r in rows] == [("(common)", "random"), ("(common)", "real"),
                                                         ("grad_ckpt=full loss_chunk=0", "random"),
                                                         ("grad_ckpt=full loss_chunk=0", "real")]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert "tok/s" in p.stdout.splitlines()[-5]  # the table comes last
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=bf16_residual=True",
            check=False)
    assert p.returncode and "error: bf16_residual needs dtype bfloat16" in p.stderr  # as train.py refuses it


def test_bench_train_flags_a_variant_whose_updates_the_guard_skipped(tmp_path):
    # a skipped update leaves AdamW out of the step, so its time is not that of training: the bench must say so
    common = f"{TINY_BENCH} compile=False"
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=; learning_rate=1e30 grad_clip=0",
            "--train_steps=2", "--train_warmup=1", f"--train_json={tmp_path / 'b.json'}")
    fine, diverged = json.load(open(tmp_path / "b.json"))["rows"]
    assert fine["skipped"] == 0 and diverged["skipped"] >= 1 and not np.isfinite(diverged["loss"])
    assert "warning: learning_rate=1e30 grad_clip=0 (random): the guard skipped" in p.stdout
    assert "warning: (common)" not in p.stdout


def test_bench_train_profile_splits_a_step_into_kinds_of_kernel(tmp_path):
    common = f"{TINY_BENCH} compile=False"
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_steps=2", "--train_warmup=1",
            "--train_profile=2", f"--train_json={tmp_path / 'b.json'}")
    prof = json.load(open(tmp_path / "b.json"))["rows"][0]["profile"]
    assert prof["busy_ms"] > 0 and prof["kinds"]["matmul"] > 0 and prof["kinds"]["optimizer"] > 0
    assert sum(prof["kinds"].values()) == pytest.approx(prof["busy_ms"])  # every op in exactly one kind
    times = [ms for *_, ms in prof["top"]]
    assert len(times) == 12 and times == sorted(times, reverse=True) and times[0] <= prof["busy_ms"]
    assert "where a step's time goes" in p.stdout and "aten::mm" in p.stdout


def test_bench_train_under_torchrun_reports_scaling_against_each_rank_alone(tmp_path):
    common = f"{TINY_BENCH} gradient_accumulation_steps=2"
    p = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "bench.py", "--mode=train",
            f"--train_common={common}", "--train_steps=3", "--train_warmup=1", f"--train_json={tmp_path / 'b.json'}",
            env={"OMP_NUM_THREADS": "1"})
    (row,) = json.load(open(tmp_path / "b.json"))["rows"]
    assert row["world"] == 2 and len(row["alone_ms"]) == 2 and min(row["alone_ms"]) > 0
    assert row["scaling"] == pytest.approx(sum(row["alone_ms"]) / row["ms_per_step"])
    assert f"{row['scaling']:.3f}x" in p.stdout.splitlines()[-1]
# ==== end train.py (scale) ====

# ==== train.py (faults) ====
# Faults are injected for real: train.py runs in its own process through FAULTS_DRIVER, which can SIGKILL it
# half-way through writing a checkpoint, or make the loss NaN / a spike, or raise a CUDA OOM, at chosen steps.
FAULTS_DRIVER = r'''
import io, os, runpy, signal, sys
sys.path.insert(0, os.environ["REPO"])
import torch
import model
torch.set_num_threads(1)
fault, _, arg = os.environ.get("FAULT", "").partition(":")
if os.environ.get("PID_DIR"):  # so a test can signal one rank of a torchrun job
    with open(os.path.join(os.environ["PID_DIR"], "pid-" + os.environ.get("RANK", "0")), "w") as f:
        f.write(str(os.getpid()))
saves, calls = [0], [0]
real_save, real_replace, real_forward = torch.save, os.replace, model.GPT.forward

def save(obj, f, *a, **k):  # FAULT=mid_save:N: the N-th checkpoint gets half its bytes written, then SIGKILL
    saves[0] += 1
    if fault == "mid_save" and saves[0] == int(arg):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)

def replace(src, dst):  # FAULT=before_manifest:N: the N-th checkpoint is renamed into place, latest.json not yet
    real_replace(src, dst)
    if fault == "before_manifest" and saves[0] == int(arg) and dst.endswith(".pt"):
        os.kill(os.getpid(), signal.SIGKILL)

def forward(self, idx, targets=None):  # FAULT=nan:A-B / spike:A-B / gradnan:A-B: steps A..B-1 (1 micro-step each)
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    logits, loss = real_forward(self, idx, targets)
    if self.training and targets is not None:
        calls[0] += 1
        a, b = map(int, arg.split("-")) if "-" in arg else (0, 0)
        if a <= calls[0] - 1 < b:
            if fault == "gradnan":  # a finite loss whose gradients are NaN
                loss.register_hook(lambda g: g * float("nan"))
            else:
                loss = loss * float("nan") if fault == "nan" else loss * 10
    return logits, loss

torch.save, os.replace, model.GPT.forward = save, replace, forward
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "train.py"), run_name="__main__")
'''
FAULTS_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.1",
                "--gradient_accumulation_steps=1", "--max_iters=200", "--lr_decay_iters=200", "--warmup_iters=5",
                "--learning_rate=1e-2", "--eval_interval=10", "--eval_iters=1", "--log_interval=5"]


def faults_cmd(tiny_data, out_dir, *extra):
    data_root, name, _ = tiny_data
    driver = os.path.join(os.path.dirname(str(out_dir)), "faults_driver.py")
    if not os.path.exists(driver):
        with open(driver, "w") as f:
            f.write(FAULTS_DRIVER)
    return [sys.executable, driver, *FAULTS_TRAIN, f"--data_root={data_root}", f"--dataset={name}",
            f"--out_dir={out_dir}", *extra]


def faults_env(**kw):
    return dict(os.environ, REPO=HERE, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)


def faults_run(tiny_data, out_dir, *extra, **env):
    return subprocess.run(faults_cmd(tiny_data, out_dir, *extra), capture_output=True, text=True, timeout=300,
                          env=faults_env(**env), cwd=HERE)


def faults_ckpt(out_dir, name=None):
    """The checkpoint named (ckpt-NNNNNNN.pt) or the verified latest one."""
    from checkpoint import load_checkpoint
    if name:
        return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=True)
    return load_checkpoint(str(out_dir))


def faults_same_state(a, b):
    """Bit-identical weights, optimizer state and data position."""
    assert a["iter_num"] == b["iter_num"] and a["data"] == b["data"]
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    return True


def one_line_error(p, pattern, after_progress=False):
    """A user error: exit code != 0, stderr is one line `error: ...` matching pattern, and no traceback.
    after_progress: prepare.py streams the corpus, so a bad file found mid-way follows its progress lines."""
    import re
    assert p.returncode not in (0, None), p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 or after_progress, p.stderr
    assert lines[-1].startswith("error: ") and "Traceback" not in p.stderr and "error" not in "".join(lines[:-1])
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def faults_clean(tiny_data, tmp_path_factory):
    """One uninterrupted run of FAULTS_TRAIN: (its final checkpoint, seconds from its first line (set-up done)
    to its exit, out_dir)."""
    import time
    out = tmp_path_factory.mktemp("faults") / "clean"
    proc = subprocess.Popen(faults_cmd(tiny_data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=faults_env(), cwd=HERE)
    proc.stdout.readline()
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "done: 200 steps" in stdout, stdout + stderr
    return faults_ckpt(out), time.time() - t0, str(out)


@pytest.mark.parametrize("fault", ["mid_save", "before_manifest"])
def test_kill9_while_saving_keeps_previous_checkpoint_and_resume_is_bit_exact(tiny_data, faults_clean, tmp_path,
                                                                              fault):
    out = tmp_path / "out"
    p = faults_run(tiny_data, out, FAULT=f"{fault}:3")  # saves at steps 10, 20, then killed saving step 30
    assert p.returncode == -9
    assert faults_ckpt(out)["iter_num"] == 20  # latest.json still names the previous, whole checkpoint
    assert os.path.exists(out / ("ckpt-0000030.pt.tmp" if fault == "mid_save" else "ckpt-0000030.pt"))
    p = faults_run(tiny_data, out, "--init_from=resume")
    assert p.returncode == 0, p.stderr
    assert faults_same_state(faults_ckpt(out), faults_clean[0])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the torn file was cleaned up


def test_kill9_at_random_moments_soak_ends_bit_identical_to_a_clean_run(tiny_data, faults_clean, tmp_path):
    """For SOAK_SECONDS (default 20): a run is SIGKILLed at random moments and resumed until it finishes, then
    compared with the clean run; then the next run (round) starts. Prints how many kills were survived."""
    import random
    import shutil
    import time
    budget = float(os.environ.get("SOAK_SECONDS", 20))
    seed = int(os.environ.get("SOAK_SEED", time.time()))
    rng, t_end = random.Random(seed), time.time() + budget
    kills, rounds, lost = 0, 0, []
    while rounds == 0 or time.time() < t_end:
        out = tmp_path / f"round{rounds}"
        while True:
            before = json.load(open(out / "latest.json"))["iter_num"] if (out / "latest.json").exists() else None
            extra = [] if before is None else ["--init_from=resume"]
            if before is None:  # killed before its first checkpoint: nothing to resume, so start over afresh
                shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.Popen(faults_cmd(tiny_data, out, *extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=faults_env(), cwd=HERE)
            if time.time() < t_end:
                try:  # a random moment once set up: a step, an evaluation, a checkpoint write, the exit
                    proc.stdout.readline()
                    proc.wait(timeout=rng.uniform(0, faults_clean[1]))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    kills += 1
                    after = json.load(open(out / "latest.json"))["iter_num"] if (out / "latest.json").exists() else 0
                    lost.append(after - (before or 0))
                    continue
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stdout + stderr
            break
        assert faults_same_state(faults_ckpt(out), faults_clean[0]), f"round {rounds}, SOAK_SEED={seed}"
        rounds += 1
    print(f"soak: survived {kills} SIGKILLs in {rounds} runs, each ending bit-identical to the clean run "
          f"({budget:.0f}s, SOAK_SEED={seed}; steps saved between kills: {lost})")
    assert kills >= 1


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_finishes_the_step_saves_exits_0_and_resume_is_bit_exact(tiny_data, faults_clean,
                                                                                    tmp_path, sig):
    import signal
    out = tmp_path / "out"
    proc = subprocess.Popen(faults_cmd(tiny_data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=faults_env(), cwd=HERE)
    for line in proc.stdout:  # wait until it trains, then preempt it
        if line.startswith("step 5/"):
            break
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    last = stdout.strip().splitlines()[-1]
    stopped = faults_ckpt(out)["iter_num"]
    assert last.startswith(f"stopped by {sig} at step {stopped}") and last.endswith("--init_from=resume")
    assert 5 <= stopped < 200 and f"{sig}: finishing this step" in stderr
    if sig == "SIGTERM":  # the checkpoint is at a step boundary: resuming replays the rest exactly
        assert faults_run(tiny_data, out, "--init_from=resume").returncode == 0
        assert faults_same_state(faults_ckpt(out), faults_clean[0])


def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tiny_data, tmp_path):
    import signal
    import time
    out = tmp_path / "out"
    cmd = faults_cmd(tiny_data, out, "--gradient_accumulation_steps=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + cmd[1:]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=faults_env(PID_DIR=str(tmp_path)), cwd=HERE)
    for line in proc.stdout:
        if line.startswith("step 5/"):
            break
    while not (tmp_path / "pid-1").exists():
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only: rank 0 learns it by all-reduce
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    stopped = faults_ckpt(out)["iter_num"]
    assert f"stopped by a signal on another rank at step {stopped};" in stdout and stopped % 5 == 0  # a log step
    assert "SIGTERM: finishing this step" in stderr and "done:" not in stdout


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())  # cuda: on a GPU machine
def test_guard_skips_a_bad_update_exactly_and_spots_nan_inf_and_spikes(device, tmp_path, request):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from model import GPT, GPTConfig
    from train import GUARD_FIELDS, apply_update, guard_update
    scaler = torch.amp.GradScaler(enabled=False)
    # fused: the device-side skip (found_inf) that CUDA uses (on CPU: the CPU kernel); zero: that AdamW inside ZeRO-1
    for fused, zero in [(False, False), (True, False)] + [(True, True)] * (device == "cpu"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        if zero:  # a one-process group is enough to build it
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
            request.addfinalizer(dist.destroy_process_group)  # even if an assert below fails
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, fused=True)
        g = torch.zeros(len(GUARD_FIELDS), device=device)
        x, y = torch.randint(0, 32, (2, 8), device=device), torch.randint(0, 32, (2, 8), device=device)

        def step(scale=1.0):
            _, loss = model(x, y)
            (loss * scale).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            bad = guard_update(g, loss * scale, norm, 2.0, 3)
            apply_update([opt], scaler, bad)
            opt.zero_grad(set_to_none=True)
            return bad.item()

        assert [step() for _ in range(12)] == [0.0] * 12  # 12 good steps: the spike check is armed
        adam = getattr(opt, "optim", opt).state
        before = ({k: v.clone() for k, v in model.state_dict().items()},
                  [{k: v.clone() for k, v in s.items()} for s in adam.values()])
        assert (step(float("nan")), step(float("inf")), step(10.0)) == (1.0, 1.0, 1.0)  # NaN, Inf, a 10x spike
        assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())  # nothing was applied:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], adam.values()) for k in a)  # nor Adam's
        state = dict(zip(GUARD_FIELDS, g.tolist()))
        assert state["in_row"] == state["total"] == 3 and state["tripped"] == 1 and state["good"] == 12
        assert step() == 1.0  # tripped: even a good step is held back until the host stops the run
        assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())


def test_nan_loss_is_skipped_then_max_bad_steps_in_a_row_stop_with_the_weights_from_before(tiny_data, tmp_path):
    out = tmp_path / "out"
    p = faults_run(tiny_data, out, "--max_bad_steps=3", FAULT="nan:30-1000")
    one_line_error(p, r"^error: 3 bad updates in a row from step 30 \(loss nan\);.*--init_from=resume$")
    stop, pre = faults_ckpt(out), faults_ckpt(out, "ckpt-0000030.pt")  # saved at 35 (a log step), and before step 30
    assert stop["iter_num"] == 35 and pre["iter_num"] == 30
    assert all(torch.equal(stop["model"][k], pre["model"][k]) for k in pre["model"])
    for sa, sb in zip(stop["optimizer"]["state"].values(), pre["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    p = faults_run(tiny_data, out, "--init_from=resume", "--max_iters=50")  # the fault is gone: training goes on
    assert p.returncode == 0 and faults_ckpt(out)["iter_num"] == 50, p.stderr


def test_non_finite_gradients_from_the_first_step_stop_with_an_error_naming_them(tiny_data, tmp_path):
    # the loss is finite: the error must not call it a spike (and there is no running average yet to compare with)
    p = faults_run(tiny_data, tmp_path / "out", "--max_bad_steps=3", FAULT="gradnan:0-1000")
    one_line_error(p, r"^error: 3 bad updates in a row from step 0 \(non-finite gradients at loss [0-9.]+\);")


@pytest.mark.parametrize("fault", ["nan", "spike"])
def test_a_few_bad_steps_are_skipped_counted_and_training_goes_on(tiny_data, tmp_path, fault):
    out = tmp_path / "out"
    p = faults_run(tiny_data, out, "--max_iters=40", FAULT=f"{fault}:30-32")
    assert p.returncode == 0 and "step 35: skipped 2 bad update(s) (2 in all)" in p.stdout, p.stdout + p.stderr
    ckpt = faults_ckpt(out)
    assert ckpt["guard"][2] == 0 and ckpt["guard"][3] == 2  # none in a row now, 2 in all (kept across resumes)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cuda_oom_at_the_first_step_is_a_one_line_hint(tiny_data, tmp_path):
    p = faults_run(tiny_data, tmp_path / "out", FAULT="oom")
    one_line_error(p, r"out of GPU memory.*lower batch_size and raise gradient_accumulation_steps.*grad_ckpt")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import checkpoint
    state = lambda it: dict(iter_num=it, model={"w": torch.full((4,), float(it))})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit, match=r"^error: could not save .*No space left on device.*no earlier checkpoint"):
        checkpoint.save_checkpoint(str(tmp_path), state(10))
    monkeypatch.undo()
    checkpoint.save_checkpoint(str(tmp_path), state(10))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit, match=r"No space left on device\); the previous checkpoint .*ckpt-0000010.pt is "
                                         r"intact; free disk space"):
        checkpoint.save_checkpoint(str(tmp_path), state(20))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000010.pt", "latest.json"]  # no half-written leftovers
    assert torch.equal(checkpoint.load_checkpoint(str(tmp_path))["model"]["w"], torch.full((4,), 10.0))


def test_corrupt_truncated_or_foreign_checkpoints_are_refused_clearly(tmp_path):
    import hashlib
    import checkpoint
    checkpoint.save_checkpoint(str(tmp_path), dict(iter_num=1, model={"w": torch.ones(1000)}))
    path, good = tmp_path / "ckpt-0000001.pt", (tmp_path / "ckpt-0000001.pt").read_bytes()
    manifest = json.loads((tmp_path / "latest.json").read_text())
    for bad in (good[:len(good) // 2], good[:100] + bytes([good[100] ^ 1]) + good[101:]):  # truncated, one bit flipped
        path.write_bytes(bad)
        with pytest.raises(SystemExit, match="^error: checkpoint .* is corrupt or truncated"):
            checkpoint.load_checkpoint(str(tmp_path))

    class Payload:  # a pickle that would run code when loaded: weights_only refuses it
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    import pickle
    evil = pickle.dumps({"format": checkpoint.CKPT_FORMAT, "x": Payload()}, protocol=2)
    path.write_bytes(evil)
    (tmp_path / "latest.json").write_text(json.dumps(dict(manifest, sha256=hashlib.sha256(evil).hexdigest())))
    with pytest.raises(SystemExit, match="^error: cannot load checkpoint .*only checkpoints written by train.py"):
        checkpoint.load_checkpoint(str(tmp_path))
    (tmp_path / "latest.json").write_text('{"file": "ckpt-0000001.pt", "sha')  # torn manifest
    with pytest.raises(SystemExit, match="latest.json is corrupt"):
        checkpoint.load_checkpoint(str(tmp_path))
    (tmp_path / "latest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(SystemExit, match="checkpoint format 99"):
        checkpoint.load_checkpoint(str(tmp_path))
    os.remove(tmp_path / "latest.json")
    with pytest.raises(SystemExit, match="no checkpoint in"):
        checkpoint.load_checkpoint(str(tmp_path))


def test_load_checkpoint_reads_onto_the_cpu_with_weights_only(tmp_path, monkeypatch):
    import checkpoint
    checkpoint.save_checkpoint(str(tmp_path), dict(iter_num=3, model={"w": torch.arange(5.0)}))
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    ckpt = checkpoint.load_checkpoint(str(tmp_path))
    assert seen == [dict(map_location="cpu", weights_only=True)] and ckpt["model"]["w"].device.type == "cpu"
# ==== end train.py (faults) ====

# ==== bad inputs ====
# Each bad input is a one-line `error: ...` that names the problem and the fix. Through the real command line
# where that is the point (exit code, stderr, no traceback), else in-process on a fresh copy of the script.
def fresh_main(script, *argv):
    """Run script's main() in this process on a fresh copy of its globals (configure() cannot leak)."""
    import runpy
    ns = runpy.run_path(os.path.join(HERE, script))
    saved, sys.argv = sys.argv, [script, *argv]
    try:
        return ns["main"]()
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory):
    """The tiny corpus prepared with another tokenizer (vocab 280): data_root, name."""
    data_root, _, _ = tiny_data
    root = tmp_path_factory.mktemp("other")
    run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={root}", "--dataset=other",
        "--vocab_size=280", "--val_fraction=0.2")
    return str(root), "other"


def copy_data(tiny_data, tmp_path):
    import shutil
    data_root, name, _ = tiny_data
    shutil.copytree(os.path.join(data_root, name), tmp_path / name)
    return tmp_path / name, [f"--data_root={tmp_path}", f"--dataset={name}", f"--out_dir={tmp_path / 'out'}",
                             *FAULTS_TRAIN]


def test_missing_data_dir_says_which_command_prepares_it(tmp_path):
    p = run("train.py", f"--data_root={tmp_path}", "--dataset=nope", check=False, env={"OMP_NUM_THREADS": "1"})
    one_line_error(p, r"no prepared data in .*nope \(missing meta.json\); run `python prepare.py --input=PATH "
                      r"--dataset=nope --data_root=.*` first \(PATH: your corpus\), or use a dataset prepare.py knows: "
                      r"stdlib, shakespeare, tinystories, fineweb-edu$")


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"input .*missing does not exist; pass --input="),
    ("empty", r"the corpus is empty"),
    ("no_text", r"has no \.txt/\.md/\.py/\.jsonl\[\.gz\] or \.parquet files"),
    ("latin1", r"latin1\.txt is not UTF-8 text \(byte 3\); convert it"),
    ("not_json", r"bad\.jsonl:2 is not a JSON object with a \"text\" field"),
    ("no_field", r"bad\.jsonl:3 is not a JSON object with a \"text\" field"),
    ("tokenizer", r"tokenizer file .*corrupt\.bpe is corrupt"),
])
def test_bad_corpus_or_tokenizer_given_to_prepare_is_a_one_line_error(tmp_path, case, pattern):
    src, extra = tmp_path / case, []
    if case != "missing":
        src.mkdir()
    if case == "empty":
        (src / "a.txt").write_text("  \n\n")
    elif case == "no_text":
        (src / "a.csv").write_text("x,y\n")
    elif case == "latin1":
        (src / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))  # \xe9 at byte 3
    elif case in ("not_json", "no_field"):
        lines = ['{"text": "one"}', '{"text": "two"' if case == "not_json" else '{"text": "two"}', '{"txt": "3"}']
        (src / "bad.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "tokenizer":
        (src / "a.txt").write_text("hello\n\nworld\n")
        (tmp_path / "corrupt.bpe").write_text('{"format": "scratchlm-bpe"\nAAAA 0\n')
        extra = [f"--tokenizer={tmp_path / 'corrupt.bpe'}"]
    p = run("prepare.py", f"--input={src}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300", *extra,
            check=False)
    one_line_error(p, pattern, after_progress=True)


@pytest.mark.parametrize("case, pattern", [
    ("magic", r"train_000\.bin is not a scratchlm shard \(bad magic\); re-run prepare\.py"),
    ("truncated", r"train_000\.bin is truncated or corrupt \(\d+ bytes, header says \d+\); re-run prepare\.py"),
    ("shard_tokenizer", r"train_000\.bin was made with another tokenizer than .*meta\.json says; re-run prepare"),
    ("tokenizer_file", r"tokenizer\.bpe is not the tokenizer .*meta\.json and the shards were made with; re-run"),
    ("tokenizer_corrupt", r"tokenizer file .*tokenizer\.bpe is corrupt"),
    ("meta", r"meta\.json is corrupt \(JSONDecodeError.*\); re-run prepare\.py"),
    ("vocab", r"vocab_size 256 must be an int >= the tokenizer's 300 tokens"),
    ("vocab_type", r"vocab_size 'big' must be an int >= the tokenizer's 300 tokens"),
    ("block_size", r"block_size 100000 is longer than the data in .*train_000\.bin's split"),
])
def test_bad_data_dir_is_refused_before_training(tiny_data, other_data, tmp_path, case, pattern):
    import shutil
    d, args = copy_data(tiny_data, tmp_path)
    other = os.path.join(*other_data)
    if case == "magic":
        with open(d / "train_000.bin", "r+b") as f:
            f.write(b"NOTSHARD")
    elif case == "truncated":
        with open(d / "train_000.bin", "r+b") as f:
            f.truncate(os.path.getsize(d / "train_000.bin") - 3)
    elif case == "shard_tokenizer":
        shutil.copy(os.path.join(other, "train_000.bin"), d / "train_000.bin")
    elif case == "tokenizer_file":
        shutil.copy(os.path.join(other, "tokenizer.bpe"), d / "tokenizer.bpe")
    elif case == "tokenizer_corrupt":
        (d / "tokenizer.bpe").write_text((d / "tokenizer.bpe").read_text()[:-30])
    elif case == "meta":
        (d / "meta.json").write_text((d / "meta.json").read_text()[:50])
    args += {"vocab": ["--vocab_size=256"], "vocab_type": ["--vocab_size=big"],
             "block_size": ["--block_size=100000"]}.get(case, [])
    with pytest.raises(SystemExit, match="^error: " + ".*" + pattern):
        fresh_main("train.py", *args)
    assert not (tmp_path / "out" / "latest.json").exists()


@pytest.mark.parametrize("args, pattern", [(["--sharding=zero3"], r"sharding must be 'ddp', 'zero1' or 'fsdp'"),
                                           (["--sharding=zero1", "--dtype=float16"], r"sharding='zero1' needs dtype"),
                                           (["--bf16_residual=True"], r"bf16_residual needs dtype bfloat16 .* float32")])
def test_unknown_sharding_and_precision_settings_that_cannot_go_together_are_refused(tiny_data, tmp_path, args,
                                                                                   pattern):
    _, base = copy_data(tiny_data, tmp_path)
    with pytest.raises(SystemExit, match="^error: " + pattern):
        fresh_main("train.py", *base, *args)


@pytest.mark.parametrize("arg", ["--max_bad_steps=0", "--spike_factor=0.5"])
def test_guard_settings_that_would_skip_every_update_are_refused(tiny_data, tmp_path, arg):
    _, args = copy_data(tiny_data, tmp_path)
    with pytest.raises(SystemExit, match=r"^error: max_bad_steps must be >= 1 .* and spike_factor 0 \(off\) or > 1"):
        fresh_main("train.py", *args, arg)


@pytest.mark.parametrize("case, pattern", [
    ("other_tokenizer", r"checkpoint in .* was trained with another tokenizer than .*other; resume on the same data"),
    ("block_size", r"block_size 32 > the model's 16"),
])
def test_resume_on_data_or_block_size_the_checkpoint_does_not_match_is_refused(tiny_data, other_data, faults_clean,
                                                                               tmp_path, case, pattern):
    import shutil
    shutil.copytree(faults_clean[2], tmp_path / "out")
    data_root, name = other_data if case == "other_tokenizer" else tiny_data[:2]
    extra = ["--block_size=32"] if case == "block_size" else []
    with pytest.raises(SystemExit, match="^error: " + pattern):
        fresh_main("train.py", *FAULTS_TRAIN, f"--data_root={data_root}", f"--dataset={name}",
                   f"--out_dir={tmp_path / 'out'}", "--init_from=resume", *extra)


@pytest.mark.parametrize("case, pattern", [
    ("prompt_file", r"cannot read the prompt file .*prompt\.txt .*invalid continuation byte.*give a UTF-8 text file"),
    ("tokenizer_corrupt", r"tokenizer file .*tokenizer\.bpe is corrupt: .*truncated"),
    ("tokenizer_other", r"tokenizer\.bpe is not the tokenizer this checkpoint was trained with"),
    ("no_checkpoint", r"no checkpoint in .* \(missing latest\.json\)"),
])
def test_sample_refuses_bad_prompt_files_tokenizers_and_missing_checkpoints(faults_clean, other_data, tmp_path,
                                                                            case, pattern):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(faults_clean[2], out)
    start = "the"
    if case == "prompt_file":
        (tmp_path / "prompt.txt").write_bytes(b"caf\xe9 au lait")
        start = f"FILE:{tmp_path / 'prompt.txt'}"
    elif case == "tokenizer_corrupt":
        (out / "tokenizer.bpe").write_text((out / "tokenizer.bpe").read_text()[:-1])
    elif case == "tokenizer_other":
        shutil.copy(os.path.join(*other_data, "tokenizer.bpe"), out / "tokenizer.bpe")
    elif case == "no_checkpoint":
        os.remove(out / "latest.json")
    with pytest.raises(SystemExit, match="^error: .*" + pattern):
        fresh_main("sample.py", f"--out_dir={out}", f"--start={start}", "--max_new_tokens=2", "--device=cpu")


def test_rlhf_jsonl_errors_name_the_file_and_line(tmp_path):
    import rlhf
    path = tmp_path / "sft.jsonl"
    for lines, pattern in ((['{"prompt": "1+1=", "response": "2"}', "", '{"prompt": "2+2=", '],
                            r"sft\.jsonl:3 is not valid JSON \(.*\); fix or remove that line"),
                           (['{"prompt": "1+1=", "response": "2"}', '{"prompt": "2+2=", "answer": "4"}'],
                            r'sft\.jsonl:2 lacks the fields \{"prompt", "response"\}')):
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(SystemExit, match="^error: .*" + pattern):
            rlhf.read_jsonl(str(path), [("prompt", "response")])
    path.write_bytes(b'{"prompt": "caf\xe9", "response": "2"}\n')  # latin-1, not UTF-8
    with pytest.raises(SystemExit, match=r"^error: .*sft\.jsonl is not UTF-8 text \(byte 15\)"):
        rlhf.read_jsonl(str(path), [("prompt", "response")])
# ==== end bad inputs ====

# ==== sample.py ====
@pytest.fixture(scope="module")
def sample_ckpt(tiny_data, tmp_path_factory):
    """A tiny Llama-style checkpoint (RoPE, RMSNorm, SwiGLU, GQA) trained for a few steps by train.py."""
    out = tmp_path_factory.mktemp("sample_ckpt")
    tiny_train(tiny_data, out, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=20", "--pos_encoding=rope",
               "--norm=rmsnorm", "--mlp=swiglu", "--n_kv_head=1", "--bias=False")
    return str(out)


def sample(out_dir, *extra, check=True):
    return run("sample.py", f"--out_dir={out_dir}", "--device=cpu", *extra, check=check, env={"OMP_NUM_THREADS": "1"})


def test_sample_py_prints_one_batch_of_samples_and_streams_the_first(sample_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n")
    p = sample(sample_ckpt, f"--start=FILE:{prompt}", "--num_samples=3", "--max_new_tokens=30", "--seed=1")
    samples = p.stdout.split("-" * 40 + "\n")
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each closed by a rule
    assert all(s.startswith("def f(x):\n") and len(s) > len("def f(x):\n") + 5 for s in samples[:3])
    assert len(set(samples[:3])) > 1  # sampled, not one sample printed three times
    again = sample(sample_ckpt, f"--start=FILE:{prompt}", "--num_samples=3", "--max_new_tokens=30", "--seed=1")
    assert again.stdout == p.stdout  # a seed fixes the samples


def test_sample_py_stops_at_the_stop_string_and_at_end_of_text(sample_ckpt):
    common = ["--start=def", "--num_samples=2", "--max_new_tokens=40", "--temperature=0"]
    free = sample(sample_ckpt, *common).stdout.split("-" * 40 + "\n")[0]
    stop = free[len("def") + 4:len("def") + 7]  # a piece of the greedy continuation
    cut = sample(sample_ckpt, *common, f"--stop={stop!r}").stdout.split("-" * 40 + "\n")[0]
    assert cut == free[:free.index(stop, len("def"))] + "\n"  # ends just before the stop string, which is hidden
    eot = sample(sample_ckpt, "--start=<|endoftext|>", "--max_new_tokens=200", "--num_samples=4").stdout
    assert eot.count("<|endoftext|>") == 4  # the 4 prompts; an end-of-text the model samples ends it, unprinted


def test_sample_py_prompt_longer_than_context_is_a_one_line_error(sample_ckpt):
    p = sample(sample_ckpt, "--start=" + "x y " * 200, check=False)
    assert p.returncode != 0 and p.stderr.strip().startswith("error: the prompt has")
    assert len(p.stderr.strip().splitlines()) == 1
# ==== end sample.py ====

# ==== chat ====
def chat_tokenizer():
    import bpe
    return bpe.train(["12+34=46\n"], 261)  # the 256 bytes and the 5 special tokens, no merges


def test_chat_template_masks_exactly_the_assistant_content_and_its_end():
    from bpe import encode_chat
    tok = chat_tokenizer()
    sp = tok.special_tokens
    msgs = [dict(role="system", content="be brief"), dict(role="user", content="hi"),
            dict(role="assistant", content="yo"), dict(role="user", content="1+1="),
            dict(role="assistant", content="2")]
    ids, mask = encode_chat(tok, msgs)
    enc = tok.encode_ordinary
    want = ([sp["<|endoftext|>"], sp["<|system|>"]] + enc("be brief") + [sp["<|end|>"], sp["<|user|>"]] + enc("hi") +
            [sp["<|end|>"], sp["<|assistant|>"]] + enc("yo") + [sp["<|end|>"], sp["<|user|>"]] + enc("1+1=") +
            [sp["<|end|>"], sp["<|assistant|>"]] + enc("2") + [sp["<|end|>"]])
    assert ids == want
    learned = [t for t, m in zip(ids, mask) if m]
    assert learned == enc("yo") + [sp["<|end|>"]] + enc("2") + [sp["<|end|>"]]
    gen, gmask = encode_chat(tok, msgs[:4], add_generation_prompt=True)
    assert gen[-1] == sp["<|assistant|>"] and gen == want[:len(gen)] and not gmask[-1]
    # typed special-token text stays text: a user cannot close their own turn
    assert sp["<|end|>"] not in encode_chat(tok, [dict(role="user", content="<|end|>")])[0][:-1]
    import bpe
    plain = bpe.train(["abc"], 257, special_tokens=["<|endoftext|>"])
    with pytest.raises(SystemExit, match="error: the tokenizer lacks the chat tokens"):
        encode_chat(plain, msgs)


def test_chat_loop_from_stdin_replies_resets_and_quits(rlhf_tiny):
    # the SFT model of the rlhf.py fixture answers "1+1=" with "1+1=2" (or the demonstrators' "1+1=3")
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={rlhf_tiny['sft']}", "--chat=True", "--temperature=0",
                        "--max_new_tokens=8", "--device=cpu"], input="1+1=\n/reset\n1+1=\n/quit\nnever read\n",
                       capture_output=True, text=True, cwd=HERE, timeout=60)
    assert p.returncode == 0, p.stderr
    turns = p.stdout.split("> ")
    assert turns[1].strip() in ("1+1=2", "1+1=3") and "(history cleared)" in turns[2]
    assert turns[3].strip() == turns[1].strip()  # greedy, and the history was reset: the same reply
    assert len(turns) == 5 and turns[4] == ""  # /quit ended it before the last line
# ==== end chat ====

# ==== rlhf.py ====
def rlhf_run(argv):
    """One rlhf.py stage in this process, from freshly reset config globals."""
    import importlib
    import rlhf
    rlhf = importlib.reload(rlhf)
    old, sys.argv = sys.argv, ["rlhf.py"] + argv
    try:
        rlhf.main()
    finally:
        sys.argv = old
    return rlhf


def rlhf_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def rlhf_tiny(tmp_path_factory):
    """A trivially learnable task run through every stage on a tiny model: the prompt is always "1+1=", the
    demonstrators answer "1+1=2" or "1+1=3" at random, the labeler prefers the first. Returns the stages' out_dirs."""
    import bpe
    from model import GPT, GPTConfig
    from checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("rlhf")
    tok = bpe.train(["12+34=46\n"], 261)
    os.makedirs(d / "base")
    tok.save(str(d / "base" / "tokenizer.bpe"))
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261, dropout=0.0, bias=False)
    torch.manual_seed(0)
    save_checkpoint(str(d / "base"), dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args,
                                           tokenizer_hash=tok.hash, iter_num=0))

    def write(name, rows):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write("sft.jsonl", [dict(prompt="1+1=", response="1+1=" + "23"[i % 2]) for i in range(64)])
    write("prefs.jsonl", [dict(prompt="1+1=", chosen="1+1=2", rejected="1+1=3")] * 16)
    write("prompts.jsonl", [dict(prompt="1+1=")] * 16)
    common = ["--device=cpu", "--warmup_iters=0", "--log_interval=5", "--eval_samples=16",
              f"--eval_prompts={d}/prompts.jsonl", "--batch_size=16"]
    dirs = {s: str(d / s) for s in ("base", "sft", "rm", "ppo", "dpo")}
    rlhf_run(common + ["--stage=sft", f"--init_from={dirs['base']}", f"--out_dir={dirs['sft']}",
                       f"--data={d}/sft.jsonl", f"--val_data={d}/sft.jsonl", "--max_iters=40", "--eval_interval=40",
                       "--learning_rate=1e-2", "--min_lr=1e-2"])
    rlhf_run(common + ["--stage=rm", f"--init_from={dirs['sft']}", f"--out_dir={dirs['rm']}",
                       f"--data={d}/prefs.jsonl", f"--val_data={d}/prefs.jsonl", "--max_iters=10",
                       "--eval_interval=10", "--learning_rate=3e-3"])
    rlhf_run(common + ["--stage=ppo", f"--init_from={dirs['sft']}", f"--out_dir={dirs['ppo']}",
                       f"--data={d}/prompts.jsonl", "--reward_model=task", "--max_iters=10", "--eval_interval=10",
                       "--learning_rate=3e-3", "--rollout_batch=16", "--minibatch=8", "--max_new_tokens=7"])
    rlhf_run(common + ["--stage=ppo", f"--init_from={dirs['sft']}", f"--out_dir={d}/ppo-rm",  # the reward model's path
                       f"--data={d}/prompts.jsonl", f"--reward_model={dirs['rm']}", "--max_iters=2", "--log_interval=1",
                       "--rollout_batch=8", "--minibatch=4", "--max_new_tokens=7"])
    rlhf_run(common + ["--stage=dpo", f"--init_from={dirs['sft']}", f"--out_dir={dirs['dpo']}",
                       f"--data={d}/prefs.jsonl", f"--val_data={d}/prefs.jsonl", "--max_iters=10",
                       "--eval_interval=10", "--learning_rate=1e-3", "--beta=0.5"])
    return dict(dirs, data=str(d))


def test_every_stage_runs_and_improves_on_a_trivial_task(rlhf_tiny):
    import math
    sft = rlhf_metrics(rlhf_tiny["sft"])
    evals = [r for r in sft if "acc_sampled" in r]
    assert evals[0]["acc_sampled"] == 0 and evals[-1]["acc_sampled"] > 0.2  # learns the format and the answer
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] / 2
    rm = [r for r in rlhf_metrics(rlhf_tiny["rm"]) if "val_accuracy" in r]
    assert rm[-1]["val_accuracy"] == 1.0 and rm[-1]["val_loss"] < rm[0]["val_loss"]
    ppo = rlhf_metrics(rlhf_tiny["ppo"])
    evals = [r for r in ppo if "acc_sampled" in r]
    assert evals[-1]["acc_sampled"] > evals[0]["acc_sampled"] + 0.2
    steps = [r for r in ppo if "clipfrac" in r]
    assert {"reward", "kl", "entropy", "clipfrac", "value_loss", "response_len"} <= set(steps[0])
    ppo_rm = [r for r in rlhf_metrics(os.path.join(rlhf_tiny["data"], "ppo-rm")) if "clipfrac" in r]
    assert len(ppo_rm) == 2 and all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in ppo_rm)
    dpo = [r for r in rlhf_metrics(rlhf_tiny["dpo"]) if "acc_sampled" in r]
    assert dpo[-1]["val_reward_acc"] == 1.0 and dpo[-1]["val_chosen_reward"] > 0 > dpo[-1]["val_rejected_reward"]
    assert dpo[0]["acc_greedy"] == 0 and dpo[-1]["acc_greedy"] == 1.0  # the mode moved to the preferred answer
    from sample import load  # each stage's checkpoint is one sample.py can load
    for s in ("sft", "rm", "ppo", "dpo"):
        assert load(rlhf_tiny[s], "cpu")[0].config.n_layer == 1


def test_label_writes_on_policy_pairs_with_chosen_judged_right_and_rejected_wrong(rlhf_tiny):
    import rlhf
    d = rlhf_tiny["data"]  # the tiny SFT model answers "1+1=2" or "1+1=3": both kinds turn up in 8 samples
    rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--data={d}/prompts.jsonl",
              f"--label_out={d}/prefs_sft.jsonl", "--label_prompts=8", "--label_val_prompts=4", "--max_new_tokens=7"])
    for name, n_prompts in (("prefs_sft.jsonl", 8), ("prefs_sft_val.jsonl", 4)):
        pairs = rlhf.read_jsonl(os.path.join(d, name), [("prompt", "chosen", "rejected")])
        assert 0 < len(pairs) <= n_prompts * 7  # at most k - 1 wrong answers per prompt
        assert all(rlhf.task_reward(r["prompt"], r["chosen"]) == 1.0 for r in pairs)
        assert all(rlhf.task_reward(r["prompt"], r["rejected"]) == 0.0 for r in pairs)
    with pytest.raises(SystemExit, match="label_prompts"):  # more prompts asked for than the file has
        rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--data={d}/prompts.jsonl",
                  f"--label_out={d}/x.jsonl", "--label_prompts=16"])


def test_reward_model_scores_are_normalised_on_held_out_pairs(rlhf_tiny):
    import rlhf
    from sample import load
    rm = rlhf.load_reward_model(rlhf_tiny["rm"], "cpu")
    tok = load(rlhf_tiny["rm"], "cpu")[1]
    ids, mask, last = rlhf.pair_batch(tok, rlhf.read_jsonl(os.path.join(rlhf_tiny["data"], "prefs.jsonl"), [("prompt",)]))
    with torch.no_grad():
        r = rlhf.reward_scores(*rm, ids, mask, last)
    assert abs(r.mean().item()) < 1e-3 and abs(r.std(unbiased=False).item() - 1) < 1e-3
    assert (r[:16] > r[16:]).all()  # and the chosen answer still wins


def test_resume_continues_from_the_checkpoint(rlhf_tiny, tmp_path):
    import shutil
    d, out = rlhf_tiny["data"], str(tmp_path / "dpo")
    shutil.copytree(rlhf_tiny["dpo"], out)
    args = ["--stage=dpo", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={out}", f"--data={d}/prefs.jsonl",
            "--val_data=", "--eval_prompts=", "--device=cpu", "--log_interval=1"]
    with pytest.raises(SystemExit, match="already has a checkpoint"):
        rlhf_run(args + ["--max_iters=12"])
    rlhf_run(args + ["--max_iters=12", "--resume=True"])
    steps = [r["step"] for r in rlhf_metrics(out) if "loss" in r and "val_loss" not in r]
    assert steps[-2:] == [11, 12]  # continued at step 10, did not start over


def test_sft_targets_mask_exactly_the_non_assistant_tokens():
    import rlhf
    from bpe import encode_chat
    tok = chat_tokenizer()
    msgs = [dict(role="user", content="hi"), dict(role="assistant", content="yo"),
            dict(role="user", content="1+1="), dict(role="assistant", content="2")]
    x, y = rlhf.sft_example(tok, dict(messages=msgs))
    ids, mask = encode_chat(tok, msgs)
    assert x == ids[:-1] and [t for t in y if t != -1] == [t for t, m in zip(ids, mask) if m]
    assert all((t == -1) != m for t, m in zip(y, mask[1:]))  # target i is token i+1, kept iff it is learned
    assert rlhf.sft_example(tok, dict(prompt="1+1=", response="2")) == rlhf.sft_example(tok, dict(messages=msgs[2:]))
    # the model's loss is the mean cross-entropy over exactly those targets
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    X, Y = torch.tensor([x]), torch.tensor([y])
    logits = m(X)[0][0]
    keep = Y[0] != -1
    want = torch.nn.functional.cross_entropy(logits[keep], Y[0][keep])
    assert torch.allclose(rlhf.sft_loss(m, X, Y), want)


def test_reward_loss_and_accuracy_on_a_hand_made_batch():
    import math
    import rlhf
    loss, acc = rlhf.reward_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    want = sum(math.log1p(math.exp(-m)) for m in (2.0, -1.0, 0.0)) / 3  # -log sigmoid(m)
    assert abs(loss.item() - want) < 1e-6 and abs(acc.item() - 1 / 3) < 1e-6


def test_ppo_policy_equal_to_reference_gives_zero_kl_and_unit_ratio():
    import copy
    import rlhf
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    ref = copy.deepcopy(policy)
    ids = torch.randint(0, 261, (3, 10))
    mask = torch.ones(3, 9)
    logp, ref_logp = rlhf.token_logprobs(policy(ids)[0], ids), rlhf.token_logprobs(ref(ids)[0], ids)
    assert ((logp - ref_logp) * mask).sum(1).abs().max() == 0
    adv, v = torch.randn(3, 9), torch.randn(3, 9)
    pg, vf, clipfrac = rlhf.ppo_loss(logp, ref_logp, adv, v, v, v, mask, 0.2, 0.2)
    assert torch.allclose(pg, -adv.mean()) and vf == 0 and clipfrac == 0  # ratio 1: the plain policy gradient


def test_gae_against_a_hand_computed_example():
    import rlhf
    # row 0: a 3-token response; row 1: a prompt slot, a 1-token response, then padding with junk values
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [9.0, 0.4, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a2 = 1.0 - 0.7                      # delta_2 = r_2 - V_2, last token
    a1 = (0.0 + 0.7 - 0.6) + 0.95 * a2  # delta_1 + gamma lam A_2
    a0 = (0.0 + 0.6 - 0.5) + 0.95 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [0.0, 2.0 - 0.4, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7], [0.0, 2.0, 0.0]]))


def test_clipped_objective_on_a_known_case():
    import math
    import rlhf
    ratio = torch.tensor([[1.5, 0.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    values, old_values, returns = torch.tensor([[1.5] * 3]), torch.ones(1, 3), torch.full((1, 3), 2.0)
    pg, vf, clipfrac = rlhf.ppo_loss(ratio.log(), old, adv, values, old_values, returns, torch.ones(1, 3), 0.2, 0.2)
    # the pessimistic min of (r A, clip(r) A): 1.5 -> capped at 1.2; 0.5 with A<0 -> 0.8 counts; 0.5 with A>0 stays
    assert math.isclose(pg.item(), -(1.2 - 0.8 + 0.5) / 3, rel_tol=1e-6) and clipfrac.item() == 1.0
    assert math.isclose(vf.item(), 0.5 * (1.2 - 2.0) ** 2, rel_tol=1e-6)  # the clipped value (1.2) is further


def test_dpo_loss_at_init_equals_log_2():
    import math
    import rlhf
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    tok = chat_tokenizer()
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    rows = [dict(prompt="1+1=", chosen="2", rejected="3"), dict(prompt="9+9=", chosen="18", rejected="8")]
    ref = rlhf.sequence_logps(m, tok, rows, torch.no_grad())  # the reference is the policy at init
    ids, mask, _ = rlhf.pair_batch(tok, rows)
    lp = (rlhf.token_logprobs(m(ids)[0], ids) * mask).sum(1)
    loss, rc, rr = rlhf.dpo_loss(lp[:2], lp[2:], ref[:, 0], ref[:, 1], beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and rc.abs().max() < 1e-6
    ipo, _, _ = rlhf.dpo_loss(lp[:2], lp[2:], ref[:, 0], ref[:, 1], beta=0.1, loss_type="ipo")
    assert math.isclose(ipo.item(), (1 / 0.2) ** 2, rel_tol=1e-5)


def test_mean_pooled_reward_averages_the_head_over_the_response_tokens_only():
    import rlhf
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    tok = chat_tokenizer()
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261)).eval()
    head = torch.nn.Linear(32, 1)
    rows = [dict(prompt="1+1=", chosen="1+1=2", rejected="1+1=23"), dict(prompt="9+9=", chosen="18", rejected="8")]
    ids, mask, last = rlhf.pair_batch(tok, rows)  # padded: the sequences differ in length
    with torch.no_grad():
        r = rlhf.reward_scores(m, head, "mean", ids, mask, last)
        h = rlhf.forward_hidden(m, ids)[1]
        for i, (p, resp) in enumerate([(x["prompt"], x[k]) for k in ("chosen", "rejected") for x in rows]):
            seq, n = rlhf.prompt_response(tok, p, resp)  # the response's tokens and its <|end|>: seq[n:]
            assert torch.isclose(r[i], head(h[i, n:len(seq)]).mean(), atol=1e-5)
        assert torch.allclose(rlhf.reward_scores(m, head, "last", ids, mask, last), head(h[range(4), last])[:, 0])


def test_bad_jsonl_names_file_and_line(tmp_path):
    import rlhf
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(SystemExit, match=f"error: {p}:2 is not valid JSON"):
        rlhf.read_jsonl(str(p), [("prompt", "chosen", "rejected")])
    p.write_text('\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SystemExit, match=f'error: {p}:2 lacks the fields {{"prompt", "chosen", "rejected"}}'):
        rlhf.read_jsonl(str(p), [("prompt", "chosen", "rejected")])


def test_task_writes_every_file_and_holds_problems_out(tmp_path):
    import rlhf
    rlhf.make_task(str(tmp_path), slip=0.5, n_held=300, seed=0)
    val = {r["prompt"] for r in rlhf.read_jsonl(str(tmp_path / "prompts_val.jsonl"), [("prompt",)])}
    assert len(val) == 300
    for name in ("sft", "prefs", "prompts"):
        rows = rlhf.read_jsonl(str(tmp_path / f"{name}.jsonl"), [("prompt",)])
        assert not val & {r["prompt"] for r in rows}
    corpus = (tmp_path / "corpus.txt").read_text()
    assert not val & {l.split("=")[0] + "=" for l in corpus.splitlines() if "+" in l}
    prefs = rlhf.read_jsonl(str(tmp_path / "prefs_val.jsonl"), [("prompt",)])
    assert all(rlhf.task_reward(r["prompt"], r["chosen"]) == 1 and rlhf.task_reward(r["prompt"], r["rejected"]) == 0
               for r in prefs)
# ==== end rlhf.py ====


# ============================================================ export
# export.py: a GPT to a transformers directory and back, checked against transformers' own forward, generate,
# tokenizer and chat template. Needs transformers and safetensors (test-only dependencies).
import dataclasses
import re
import runpy

EXPORT_LAYOUTS = {  # layout name -> GPTConfig options; each exercises a different mapping
    "gpt2": {},  # biases, tied
    "gpt2_no_bias_untied": dict(bias=False, tie_embeddings=False, mlp_hidden=96),  # config/small.py's kind
    "llama_gqa": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, rope_theta=5e5),
    "llama_mqa_bias_untied": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=True,
                                  tie_embeddings=False, mlp_hidden=96),
    "mistral_window": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                           sliding_window=5, tie_embeddings=False),
}
HF_CLASS = dict(gpt2="GPT2LMHeadModel", llama="LlamaForCausalLM", mistral="MistralForCausalLM")


@pytest.fixture(scope="module")
def hf():
    """transformers, imported once for the whole block (the import alone takes seconds)."""
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def export_gpt(seed=0, **kw):
    """A random 2-layer GPT of width 64 over bpe_tok's 1000 ids padded to 1024, with N(0, 0.05) noise on every
    parameter so that biases and norm gains are not left at their 0 / 1 init (a lost bias would go unseen)."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1024, block_size=64), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", EXPORT_LAYOUTS)
def test_export_transformers_forward_gives_our_logits(name, hf, bpe_tok, tmp_path, one_thread):
    import export
    model = export_gpt(**EXPORT_LAYOUTS[name])
    layout = export.export(model, bpe_tok, str(tmp_path))
    theirs = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(theirs).__name__ == HF_CLASS[layout]
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))  # 48 > the window of 5
    with torch.no_grad():
        ours, hf_logits = model(x)[0], theirs(x).logits
    assert (hf_logits - ours).abs().max() <= 1e-5 * ours.abs().max()


@pytest.mark.parametrize("name", ["gpt2", "mistral_window"])
def test_export_transformers_generate_with_its_cache_gives_our_greedy_tokens(name, hf, bpe_tok, tmp_path, one_thread):
    import export
    model = export_gpt(**EXPORT_LAYOUTS[name])
    export.export(model, bpe_tok, str(tmp_path))
    theirs = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = torch.tensor([bpe_tok.encode("def main():\n    x = 1")])
    ours = torch.stack(list(model.generate(prompt, 24, temperature=0, n_vocab=bpe_tok.vocab_size)), 1)[0].tolist()
    new = theirs.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.size(1):].tolist()
    stops = {bpe_tok.eot, bpe_tok.special_tokens["<|end|>"]}  # generation_config.json's eos_token_id
    assert new == ours[:len(new)] and (len(new) == 24 or new[-1] in stops)
    assert max(ours) < bpe_tok.vocab_size and max(new) < bpe_tok.vocab_size  # padding ids are never sampled


@pytest.mark.parametrize("name", EXPORT_LAYOUTS)
def test_export_then_import_gives_back_the_same_config_and_bits(name, bpe_tok, tmp_path):
    pytest.importorskip("safetensors")
    import export
    model = export_gpt(**EXPORT_LAYOUTS[name])
    export.export(model, bpe_tok, str(tmp_path))
    args, sd = export.load_hf(str(tmp_path))
    assert args == dataclasses.asdict(model.config)
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) and sd[k].dtype == ref[k].dtype for k in ref)
    assert export.tokenizer_from_hf(str(tmp_path)).hash == bpe_tok.hash


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_export_tokenizer_json_gives_tiktokens_ids_on_adversarial_text(pattern, hf, bpe_tok, tmp_path):
    import tokenizers
    import export
    tok = bpe_tok if pattern == "gpt4" else bpe.train(BPE_CORPUS, 600, pattern=bpe.GPT2_PATTERN)
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(export.tokenizer_json(tok), f)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    specials = "<|endoftext|>x<|user|> hi<|end|>\n<|assistant|><|system|><|endoftext|><|endoftext|>"
    texts = ADVERSARIAL + [random_unicode(rng, 60) for _ in range(500)] + [BPE_CORPUS[0][:4000], BPE_CORPUS[-1],
                                                                          specials, " <|end|> " * 3 + "1,234.5e6\r\n"]
    for text in texts:
        ids = tok.encode(text, allowed_special="all")  # HF matches special tokens anywhere in the text
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids, skip_special_tokens=False) == text


def test_export_autotokenizer_and_chat_template_give_encode_chats_ids_and_mask(hf, bpe_tok, tmp_path):
    import export
    export.export(export_gpt(), bpe_tok, str(tmp_path))
    theirs = hf.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "x = 3  # 東京 🎉\r\n\n\n   <|endoftext|>  y"
    assert theirs(text)["input_ids"] == bpe_tok.encode(text, allowed_special="all")
    chat = [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "What is 12+30?  🎉"},
            {"role": "assistant", "content": " 42\n\n  done"}, {"role": "user", "content": "東京 again\r\n"}]
    for messages, gen in ((chat, True), (chat[:3], False), (chat[:1], True)):
        ids, mask = bpe.encode_chat(bpe_tok, messages, add_generation_prompt=gen)
        out = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert [bool(m) for m in out["assistant_masks"]] == mask


def test_export_tokenizer_json_in_gpt2s_own_form_imports_exactly(hf, tmp_path):
    """GPT-2's tokenizer.json has a ByteLevel pre-tokenizer with its built-in regex, not a Split: importing it
    must give a tiktoken encoding with the same ids as HF's."""
    import tokenizers
    import export
    tok = bpe.train(BPE_CORPUS, 600, pattern=bpe.GPT2_PATTERN, special_tokens=["<|endoftext|>"])
    j = export.tokenizer_json(tok)
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(j, f)
    theirs, ours = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), export.tokenizer_from_hf(str(tmp_path))
    rng = random.Random(1)
    for text in ADVERSARIAL + [random_unicode(rng, 60) for _ in range(300)]:
        assert theirs.encode(text).ids == ours.encode(text, allowed_special="all"), text


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_bin"])
def test_export_imports_models_saved_by_transformers(kind, hf, tmp_path, one_thread):
    import export
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    if kind == "gpt2":
        theirs = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64))
    else:
        theirs = hf.LlamaForCausalLM(hf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    hidden_size=64, intermediate_size=96, vocab_size=300,
                                                    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e5))
    with torch.no_grad():  # noise: transformers initialises GPT-2's biases to zero
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.eval().save_pretrained(str(tmp_path))
    if kind == "llama_bin":  # the older pytorch_model.bin form, read with weights_only=True
        os.remove(tmp_path / "model.safetensors")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    args, sd = export.load_hf(str(tmp_path))
    ours = GPT(GPTConfig(**args)).eval()
    ours.load_state_dict(sd)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = theirs(x).logits, ours(x)[0]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("kw, names", [
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(value_embeds=True), "value_embeds=True"),
    (dict(pos_encoding="rope"), "norm='layernorm'"),  # rope with GPT-2's LayerNorm and GELU: no HF layout
    (dict(n_kv_head=2), "n_kv_head=2"),
    (dict(sliding_window=8), "sliding_window=8"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", sliding_window=8, bias=True), "bias=True"),
])
def test_export_options_hf_cannot_express_are_one_line_errors(kw, names):
    import export
    from model import GPTConfig
    with pytest.raises(SystemExit, match=r"^error: .*" + re.escape(names)) as e:
        export.hf_layout(GPTConfig(**kw))
    assert "\n" not in str(e.value)


def test_export_refuses_a_gptconfig_field_it_does_not_know():
    """A field added to GPTConfig later is refused once it leaves its default, until export.py learns it."""
    import export
    from model import GPTConfig

    @dataclasses.dataclass
    class FutureConfig(GPTConfig):
        attn_softcap: float = 0.0

    assert export.hf_layout(FutureConfig()) == "gpt2"
    with pytest.raises(SystemExit, match=r"^error: export.py does not know the option attn_softcap=30.0"):
        export.hf_layout(FutureConfig(attn_softcap=30.0))


def test_export_load_pretrained_bad_sources_are_one_line_errors(tmp_path, monkeypatch):
    import export
    with pytest.raises(SystemExit, match="is neither a directory nor one of gpt2"):
        export.load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit, match="holds a 'bert' model; export.py reads gpt2, llama and mistral"):
        export.load_pretrained(str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(SystemExit, match="needs huggingface_hub"):
        export.load_pretrained("gpt2")


def test_export_offline_download_is_a_one_line_error(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    import export
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network, and an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: cannot download openai-community/gpt2-medium \(") as e:
        export.load_pretrained("gpt2-medium")
    assert "\n" not in str(e.value)


def test_export_cli_exports_a_checkpoint_and_checks_it_with_transformers(hf, bpe_tok, tmp_path, monkeypatch, capsys):
    from checkpoint import save_checkpoint
    model = export_gpt(**EXPORT_LAYOUTS["llama_gqa"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bpe_tok.save(str(run_dir / "tokenizer.bpe"))
    save_checkpoint(str(run_dir), dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config),
                                       tokenizer_hash=bpe_tok.hash, iter_num=0))
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={run_dir}"])
    runpy.run_path(os.path.join(HERE, "export.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"wrote {run_dir}-hf: llama layout" in out and "token ids the same" in out
    assert sorted(os.listdir(f"{run_dir}-hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"]
# ============================================================ evalprep
# prepare.py (parquet, fineweb-edu, processes, val split of small corpora, errors), bpe.status, eval.py.
import math
import re


def test_status_lines_rewrite_one_line_on_a_terminal_and_are_plain_lines_every_few_seconds_in_a_log(monkeypatch):
    import io
    import prepare

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    clock = [100.0]
    monkeypatch.setattr(bpe.time, "time", lambda: clock[0])
    for stream in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stream)
        bpe._status_last[0] = 0.0
        for i in range(40):  # 10 s of updates, 4 a second
            bpe.status(f"line {i}")
            clock[0] += 0.25
        bpe.status("done", final=True)
        bpe.status("next")  # a new job after a final line: its first line shows at once
        if isinstance(stream, Terminal):
            assert stream.getvalue() == "".join(f"\rline {i}   " for i in range(40)) + "\rdone   \n\rnext   "
        else:
            assert stream.getvalue() == "line 0\nline 20\ndone\nnext\n"  # every 5 s, no carriage return
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bpe._status_last[0] = 0.0
    prepare.progress("tokenizing", 50e6, clock[0] - 10, frac=0.25)  # prepare.py's lines go through bpe.status
    assert sys.stderr.getvalue() == "tokenizing: 50.0 MB | 5.0 MB/s | 25.0% | ETA 30s\n"


def test_scripts_import_each_other_without_a_cycle():
    import ast
    scripts = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f != "test_all.py"}
    graph = {}
    for s in scripts:  # every import, at the top or inside a function
        names = set()
        for node in ast.walk(ast.parse(open(os.path.join(HERE, s + ".py"), encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[s] = (names & scripts) - {s}
    state = {}

    def visit(s, path):
        assert state.get(s) != "open", f"import cycle: {' -> '.join(path + [s])}"
        if state.get(s) is None:
            state[s] = "open"
            for t in sorted(graph[s]):
                visit(t, path + [s])
            state[s] = "done"
    for s in sorted(scripts):
        visit(s, [])
    assert "prepare" not in graph["bpe"] and "prepare" in graph["eval"] and "train" not in graph["eval"]


def write_parquet(path, docs, row_group_size=7):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs, "id": [f"doc{i}" for i in range(len(docs))]}), str(path),
                   row_group_size=row_group_size)


def words_docs(n, seed=0):
    rng = random.Random(seed)
    vocab = ["the", "cell", "energy", "water", "plants", "light", "ünï", "school", "of", "and", "is", "läuft"]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 60))) + "." for _ in range(n)]


def test_prepare_tokenizes_in_processes_exactly_as_in_one(tmp_path, bpe_tok):
    import prepare
    path = str(tmp_path / "tok.bpe")
    bpe_tok.save(path)
    pairs = [("val" if i % 7 == 3 else "train", d) for i, d in enumerate(words_docs(80))]
    serial = list(prepare.encoded_batches(pairs, bpe_tok, path, procs=1))
    parallel = list(prepare.encoded_batches(pairs, bpe_tok, path, procs=2, batch_chars=500))
    assert len(serial) == 1 and len(parallel) > 4
    for split in ("train", "val"):
        docs = [d for s, d in pairs if s == split]
        expected = np.concatenate([np.array([bpe_tok.eot] + bpe_tok.encode_ordinary(d)) for d in docs])
        for results in (serial, parallel):
            got = [r[split] for r in results if split in r]
            assert np.array_equal(np.concatenate([ids for ids, _, _ in got]), expected)
            assert sum(n for _, n, _ in got) == len(docs)
            assert sum(b for _, _, b in got) == sum(len(d.encode()) for d in docs)


def test_prepare_fineweb_edu_downloads_its_parquet_shards_and_splits_rows_into_documents(tmp_path, monkeypatch):
    import prepare
    assert len(prepare.REMOTE["fineweb-edu"]) == 14 and prepare.DEFAULT_VOCAB["fineweb-edu"] == 50257
    assert sum(size for _, size, _ in prepare.REMOTE["fineweb-edu"]) == 28_518_193_415  # the sample's published size
    assert all(url.startswith(prepare.FINEWEB_EDU) and len(sha) == 64 for url, _, sha in prepare.REMOTE["fineweb-edu"])
    docs = words_docs(60)
    write_parquet(tmp_path / "000_00000.parquet", docs[:30] + [None, "   "] + docs[30:])  # null and blank rows: skipped
    src = tmp_path / "000_00000.parquet"
    monkeypatch.setitem(prepare.REMOTE, "fineweb-edu", [(src.as_uri(), src.stat().st_size, prepare.file_sha256(src)),
                                                        ("file:///nonexistent/001_00000.parquet", 1, "0" * 64)])
    for key, value in dict(dataset="fineweb-edu", data_root=str(tmp_path / "data"), vocab_size=300,
                           val_fraction=0.1, fineweb_shards=1, input="").items():
        monkeypatch.setattr(prepare, key, value)
    out = prepare.prepare()  # fineweb_shards=1: the second (unreachable) shard is never asked for
    assert os.path.exists(tmp_path / "data" / "downloads" / "000_00000.parquet.sha256")
    meta = json.load(open(os.path.join(out, "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(out, "tokenizer.bpe"))
    assert meta["train_docs"] + meta["val_docs"] == 60 and meta["val_split"] == "documents"
    for split in ("train", "val"):
        ids = np.concatenate([prepare.read_shard(os.path.join(out, p)) for p in meta[f"{split}_shards"]])
        expected = [d for i, d in enumerate(docs) if prepare.split_of(i) == split]
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in expected)


def test_parquet_without_pyarrow_is_a_one_line_error_before_any_download(tmp_path, monkeypatch):
    import prepare
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow.parquet` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(prepare, "dataset", "fineweb-edu")
    monkeypatch.setattr(prepare, "input", "")
    monkeypatch.setattr(prepare, "data_root", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: reading \.parquet files \(fineweb-edu\) needs pyarrow; "
                                         r"`pip install pyarrow`$"):
        prepare.source_files()
    assert not os.path.exists(tmp_path / "downloads")


def test_prepare_one_file_without_blank_lines_holds_out_its_tail_as_val(tmp_path):
    import prepare
    text = "\n".join(words_docs(120, seed=1)) + "\n"  # one document that no blank line splits
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    run("prepare.py", f"--input={tmp_path / 'one.txt'}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300",
        "--val_fraction=0.1")
    out = tmp_path / "data" / "one"
    meta = json.load(open(out / "meta.json"))
    tok = bpe.Tokenizer.load(str(out / "tokenizer.bpe"))
    decoded = {s: tok.decode(np.concatenate([prepare.read_shard(str(out / p)) for p in meta[f"{s}_shards"]]).tolist())
               for s in ("train", "val")}
    cut = len(text) - round(len(text) * 0.1)
    assert meta["val_split"] == "tail" and meta["train_docs"] == meta["val_docs"] == 1
    assert decoded == {"train": "<|endoftext|>" + text[:cut], "val": "<|endoftext|>" + text[cut:]}
    assert meta["val_bytes"] == len(text[cut:].encode()) and sorted(os.listdir(tmp_path / "data")) == ["one"]


def test_prepare_error_mid_way_leaves_no_output_and_keeps_an_earlier_complete_one(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(words_docs(40)):
        (src / f"a{i:02d}.txt").write_text(d)
    common = [f"--input={src}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300", "--val_fraction=0.2",
              "--tokenizer_max_bytes=2000"]  # the tokenizer is made from the first files, before the bad one is read
    (src / "z_bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    one_line_error(run("prepare.py", *common, check=False), r"z_bad\.jsonl:2 is not a JSON object", True)
    assert os.listdir(tmp_path / "data") == []  # no tokenizer, no shards, no .tmp left behind
    (src / "z_bad.jsonl").unlink()
    run("prepare.py", *common)
    out = tmp_path / "data" / "corpus"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    (src / "z_bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    one_line_error(run("prepare.py", *common, check=False), r"z_bad\.jsonl:2 is not a JSON object", True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path / "data") == ["corpus"]


def test_unknown_dataset_errors_name_choices_that_work(tmp_path):
    import prepare
    p = run("prepare.py", "--dataset=nosuch", f"--data_root={tmp_path}", check=False)
    one_line_error(p, r"^error: unknown dataset 'nosuch'; prepare.py knows stdlib, shakespeare, tinystories, "
                      r"fineweb-edu; for a corpus of your own pass --input=PATH \(then --dataset names its output\)$")
    one_line_error(run("prepare.py", "--dataset=fineweb", f"--data_root={tmp_path}", check=False),
                   r"unknown dataset 'fineweb'; did you mean --dataset=fineweb-edu\?")
    with pytest.raises(SystemExit, match=r"run `python prepare.py --dataset=shakespeare --data_root=\S+` first$"):
        prepare.load_meta(str(tmp_path / "shakespeare"))
    with pytest.raises(SystemExit) as e:
        prepare.load_meta(str(tmp_path / "mine"))
    command = re.search(r"`python (prepare\.py [^`]*)`", str(e.value)).group(1).split()
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(words_docs(30)))
    run(*[a.replace("PATH", str(src)) for a in command], "--vocab_size=300")  # the suggested command works
    assert prepare.load_meta(str(tmp_path / "mine"))["vocab_size"] == 300


class Unigram(torch.nn.Module):
    """A model whose loss for token t is exactly -log p[t] whatever the context: the same logits, log p, at every
    position (tokens outside p get none of the probability)."""

    def __init__(self, p, vocab, block_size=64):
        super().__init__()
        self.logp = torch.full((vocab,), -1e4)
        for t, v in p.items():
            self.logp[t] = math.log(v)
        self.config = type("Config", (), dict(block_size=block_size))

    def forward(self, idx, targets=None):
        return self.logp.expand(*idx.shape, -1), None


def test_mc_scores_only_the_endings_tokens_summed_for_acc_and_per_token_for_acc_norm():
    import eval as ev
    tok = bpe.train(["abcdz"], 256 + len(bpe.SPECIAL_TOKENS))  # bytes only: one token per character
    p = {"z": 0.5, "c": 0.3, "a": 0.08, "b": 0.08, "d": 0.04}
    model = Unigram({ord(k): v for k, v in p.items()}, tok.vocab_size)
    endings = ["d", "ccc", "ab", "aaaa"]
    sums = [-math.log(0.04), -3 * math.log(0.3), -2 * math.log(0.08), -4 * math.log(0.08)]  # 3.22 3.61 5.05 10.10
    # per token: 3.22, 1.20, 2.53, 2.53. Least summed loss: ending 0; least per token: ending 1
    rows = [dict(context="zzzzzzzzzz", endings=endings, label=label) for label in (0, 1, 1)]
    got, counts = ev.ending_losses(model, ev.encode_rows(tok, rows[:1], 64), "cpu", ev.nullcontext())
    assert torch.allclose(got, torch.tensor(sums)) and counts.tolist() == [1, 3, 2, 4]  # the context is not scored
    r = ev.multiple_choice(model, tok, rows, "cpu", batch_rows=2)
    assert r == dict(acc=pytest.approx(1 / 3), acc_norm=pytest.approx(2 / 3), n=3)


def eval_gpt(tok, block_size=16):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    vocab = -(-tok.vocab_size // 64) * 64
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab))


def test_mc_batched_forward_equals_a_naive_loop_over_the_endings(bpe_tok):
    import eval as ev
    model = eval_gpt(bpe_tok).eval()
    rng = random.Random(0)
    rows = [dict(context=" ".join(rng.choice(["def", "x", "return", "(", "):"]) for _ in range(rng.randint(0, 12))),
                 endings=[" " + " ".join(rng.choice(["y", "1", "self", "+"]) for _ in range(rng.randint(1, 5)))
                          for _ in range(rng.choice([2, 4]))], label=0) for _ in range(9)]
    for r in rows:
        r["label"] = rng.randrange(len(r["endings"]))
    right = torch.zeros(2)
    for r in rows:  # one ending at a time, unpadded; contexts longer than the model are cut on the left
        losses = []
        for e in r["endings"]:
            end = bpe_tok.encode_ordinary(e)
            seq = torch.tensor(((bpe_tok.encode_ordinary(r["context"]) or [bpe_tok.eot]) + end)[-17:])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[None, :-1])[0][0].float(), -1)
            losses.append((-logp[range(len(seq) - 1), seq[1:]][-len(end):].sum(), len(end)))
        s = torch.tensor([l for l, _ in losses])
        n = torch.tensor([k for _, k in losses])
        sums, counts = ev.ending_losses(model, ev.encode_rows(bpe_tok, [r], 16), "cpu", ev.nullcontext())
        assert torch.allclose(sums, s, atol=1e-4) and torch.equal(counts, n)
        right += torch.tensor([s.argmin() == r["label"], (s / n).argmin() == r["label"]])
    got = ev.multiple_choice(model, bpe_tok, rows, "cpu", batch_rows=4)
    assert (got["acc"], got["acc_norm"], got["n"]) == (pytest.approx(right[0] / 9), pytest.approx(right[1] / 9), 9)
    # under torchrun each rank scores every world-th row, all ranks the same number of forwards; the counts add up
    parts = [ev.multiple_choice(model, bpe_tok, rows, "cpu", batch_rows=2, rank=k, world=2) for k in (0, 1)]
    assert [p["n"] for p in parts] == [5, 4]
    assert sum(p["acc"] * p["n"] for p in parts) == pytest.approx(right[0].item())
    assert sum(p["acc_norm"] * p["n"] for p in parts) == pytest.approx(right[1].item())


def test_bits_per_byte_scores_every_token_once_and_equals_a_direct_computation(bpe_tok):
    import eval as ev
    model = eval_gpt(bpe_tok).eval()
    text = BPE_CORPUS[0][:400]
    ids = [bpe_tok.eot] + bpe_tok.encode_ordinary(text)
    T = 16
    for stride in (5, 16):
        total = 0.0
        for t in range(1, len(ids)):  # token t is scored in the first window that holds it: start k*stride
            s = max(0, -(-(t - T) // stride)) * stride
            with torch.no_grad():
                logits = model(torch.tensor([ids[s:t]]))[0][0, -1].float()
            total += (torch.logsumexp(logits, -1) - logits[ids[t]]).item()
        r = ev.bits_per_byte(model, bpe_tok, text, "cpu", stride=stride, batch_size=3)
        assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode())
        assert r["bpb"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)


HELLASWAG_LINES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_test"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "she",
     "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["lifts it over her head.", "sings.", "walks away from it.", "sits on the bar."],
     "source_id": "activitynet~v_test2"},
]


def test_hellaswag_download_checks_the_file_and_rows_get_the_joining_space(tmp_path, monkeypatch):
    import eval as ev
    src = tmp_path / "hellaswag_val.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in HELLASWAG_LINES))
    content = src.read_bytes()
    monkeypatch.setattr(ev, "HELLASWAG_URL", src.as_uri())
    monkeypatch.setattr(ev, "HELLASWAG_BLOB", hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest())
    dest = ev.hellaswag_file(str(tmp_path / "data"))
    assert dest == str(tmp_path / "data" / "downloads" / "hellaswag_val.jsonl") and open(dest, "rb").read() == content
    assert open(dest + ".sha256").read().strip() == hashlib.sha256(content).hexdigest()
    rows = ev.hellaswag_rows(dest)
    assert rows[0] == dict(context="A man is sitting on a roof. he", label=3,
                           endings=[" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                    " is holding a cube.", " starts pulling up roofing on a roof."])
    monkeypatch.setattr(ev, "HELLASWAG_BLOB", "0" * 40)  # a file that is not HellaSwag's: refused and removed
    with pytest.raises(SystemExit, match=r"is not HellaSwag's val file \(git blob id mismatch\); removed it"):
        ev.hellaswag_file(str(tmp_path / "data"))
    assert not os.path.exists(dest) and not os.path.exists(dest + ".sha256")
    monkeypatch.setattr(ev, "HELLASWAG_URL", (tmp_path / "offline.jsonl").as_uri())
    with pytest.raises(SystemExit, match=r"^error: cannot download .*; no network\? Fetch it yourself to "
                                         r".*hellaswag_val\.jsonl \(it is checked all the same\)$"):
        ev.hellaswag_file(str(tmp_path / "data"))


@pytest.fixture(scope="module")
def eval_run(bpe_tok, tmp_path_factory):
    """An out_dir with an untrained tiny checkpoint and its tokenizer, as train.py leaves them."""
    from checkpoint import save_checkpoint
    out = tmp_path_factory.mktemp("eval_run")
    model = eval_gpt(bpe_tok, block_size=32)
    args = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    bpe_tok.save(str(out / "tokenizer.bpe"))
    save_checkpoint(str(out), dict(model=model.state_dict(), model_args=args, iter_num=0, tokenizer_hash=bpe_tok.hash))
    return out, model


def test_eval_cli_scores_mc_and_bpb_and_bad_inputs_are_one_line_errors(eval_run, bpe_tok, tmp_path, capsys):
    import eval as ev
    out, model = eval_run
    data = tmp_path / "rows.jsonl"
    rows = [dict(context=l["ctx"], endings=[" " + e for e in l["endings"]], label=l["label"]) for l in HELLASWAG_LINES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run("eval.py", f"--out_dir={out}", "--task=mc", f"--data={data}", "--device=cpu")
    r = ev.multiple_choice(model.eval(), bpe_tok, rows, "cpu")
    assert p.stdout.strip() == f"mc: acc {100 * r['acc']:.2f}% | acc_norm {100 * r['acc_norm']:.2f}% (2 rows)"
    (tmp_path / "t.txt").write_text(BPE_CORPUS[1][:300])
    r = fresh_main("eval.py", f"--out_dir={out}", "--task=bpb", f"--text={tmp_path / 't.txt'}", "--device=cpu")
    assert r["bytes"] == 300 and capsys.readouterr().out == (
        f"{tmp_path / 't.txt'}: {r['bpb']:.4f} bits/byte ({r['loss']:.4f} nats/token over {r['tokens']:,} tokens, "
        f"300 bytes)\n")
    one_line_error(run("eval.py", f"--out_dir={tmp_path / 'none'}", check=False),
                   r"no checkpoint in .*none \(missing latest\.json\); train one")
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "endings": ["b"], "label": 0}\n')
    for args, pattern in [
        (["--task=mc", f"--data={tmp_path / 'missing.jsonl'}"], r"--task=mc needs --data=FILE\.jsonl; .*missing"
                                                                r"\.jsonl does not exist$"),
        (["--task=bpb"], r"--task=bpb needs --text=FILE; no text file given$"),
        (["--task=mc", f"--data={tmp_path / 'bad.jsonl'}"], r"bad\.jsonl:1 is not a multiple-choice row"),
        (["--task=nosuch"], r"unknown task 'nosuch'; choose one of hellaswag, mc, bpb$"),
    ]:
        with pytest.raises(SystemExit, match="^error: .*" + pattern):
            fresh_main("eval.py", f"--out_dir={out}", "--device=cpu", *args)
# ============================================================ surface
# --help on every script, sample.py's everyday errors and warnings, bench's fresh-process first call, plot.py.
def surface_script_ns(script):
    import runpy
    return runpy.run_path(os.path.join(HERE, script))


def test_help_lists_every_train_key_with_its_default_and_comment_and_no_constants():
    import train
    from configurator import config_keys, source_notes
    from model import GPTConfig
    p = run("train.py", "--help")
    assert p.returncode == 0 and p.stderr == ""
    out = p.stdout.splitlines()
    assert out[0].startswith("train.py: Pretrain a GPT") and "    python train.py config/small.py" in p.stdout
    keys = config_keys(vars(train))
    assert {"out_dir", "n_layer", "sharding", "vocab_size", "spike_factor"} <= set(keys)
    assigns = {line.split("  #")[0].rstrip() for line in out}
    assert {f"{k} = {v!r}" for k, v in keys.items()} <= assigns  # every key, with its default
    notes = source_notes(open(os.path.join(HERE, "train.py")).read())[0]
    fields = source_notes(textwrap.dedent(__import__("inspect").getsource(GPTConfig)), in_class=True)[0]
    comments = [c for k in keys for c in (notes.get(k) or fields[k])[2]]
    assert len(comments) > 30 and all(f"# {c}" in p.stdout for c in comments)  # the comments as written
    assert "# fsdp (FSDP2: params, grads, AdamW state sharded)" in p.stdout  # a continuation line, on its own line
    sections = [line for line in out if line.startswith("# ")]
    assert sections[:3] == ["# I/O", "# data", "# model: every field of GPTConfig (model.py) is a config key here; "
                                                 "vocab_size comes from the data"] and "# scale" in sections
    assert not any(line.split(" = ")[0].isupper() for line in out if " = " in line)  # no GUARD_FIELDS, STOP...
    with pytest.raises(SystemExit) as e:
        __import__("configurator").configure(dict(vars(train)), ["--zzzzzz=1"])
    suggested = str(e.value).split("valid keys: ")[1].rstrip(")").split(", ")
    assert set(suggested) == set(keys) and not any(k.isupper() for k in suggested)


@pytest.mark.parametrize("script", ["bpe.py", "prepare.py", "sample.py", "rlhf.py", "bench.py", "plot.py"])
def test_help_and_h_print_every_key_and_exit_0_on_every_script(script, capsys):
    from configurator import config_keys, configure
    ns = surface_script_ns(script)
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            configure(ns, ["--out_dir=x", flag])
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        assert out.startswith(f"{script}: ") and "usage:" in out and f"python {script}" in out
        assert all(f"{k} = {v!r}" in out for k, v in config_keys(ns).items())


def test_configurator_keys_are_lowercase_so_config_file_constants_are_allowed(tmp_path, capsys):
    from configurator import configure
    (tmp_path / "c.py").write_text("LAYERS = 6  # a constant of the file itself\nn_layer = LAYERS\n")
    ns = conf_defaults() | {"CHAT_TOKENS": ("a",), "REMOTE": "x"}
    assert configure(ns, [str(tmp_path / "c.py")])["n_layer"] == 6
    with pytest.raises(SystemExit, match=r"valid keys: betas, compile, learning_rate, n_layer, out_dir, vocab_size\)"):
        configure(ns, ["--zzz=1"])
    with pytest.raises(SystemExit):  # a namespace without __file__ or __doc__ still gets its keys listed
        configure(conf_defaults(), ["-h"])
    assert "n_layer = 12" in capsys.readouterr().out


def surface_ckpt(out, vocab_size=261, stage=None):
    """A tiny checkpoint in out/ with the chat tokenizer; stage: as rlhf.py records it (None: pretraining)."""
    import bpe
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    tok = bpe.train(["12+34=46\n"], 261)
    os.makedirs(out, exist_ok=True)
    tok.save(str(out / "tokenizer.bpe"))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size, bias=False)
    torch.manual_seed(0)
    state = dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args, tokenizer_hash=tok.hash, iter_num=0)
    save_checkpoint(str(out), dict(state, stage=stage) if stage else state)
    return str(out)


@pytest.mark.parametrize("arg, pattern", [
    ("--num_samples=0", r"--num_samples=0 is out of range; give 1 or more$"),
    ("--max_new_tokens=-3", r"--max_new_tokens=-3 is out of range; give 1 or more$"),
    ("--temperature=-1", r"--temperature=-1.0 is out of range; give >= 0 \(0 = greedy\)$"),
    ("--top_p=0", r"--top_p=0.0 is out of range; give in \(0, 1\] \(1 = off\)$"),
    ("--top_p=1.5", r"--top_p=1.5 is out of range"),
    ("--top_k=-1", r"--top_k=-1 is out of range"),
    ("--device=gpu", r"unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps$"),
    ("--dtype=fp8", r"unknown dtype 'fp8'; use auto, float32, bfloat16, float16$"),
])
def test_sample_bad_settings_are_one_line_errors_before_loading(arg, pattern, tmp_path):
    with pytest.raises(SystemExit, match="^error: " + pattern) as e:
        fresh_main("sample.py", f"--out_dir={tmp_path / 'none'}", arg)  # no checkpoint: refused before loading
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_sample_device_cuda_on_a_cpu_build_is_a_one_line_error_without_traceback(tmp_path):
    p = run("sample.py", f"--out_dir={tmp_path}", "--device=cuda", check=False)
    one_line_error(p, r"^error: --device=cuda, but this torch \(.*\) is a CPU build; use --device=cpu \(or auto\)$")


def test_sample_refuses_a_model_with_fewer_token_ids_than_its_tokenizer(tmp_path):
    out = surface_ckpt(tmp_path / "run", vocab_size=256)
    with pytest.raises(SystemExit, match=r"^error: the model in .*run has 256 token ids, fewer than its tokenizer's "
                                         r"261 tokens; .*vocab_size >= 261$"):
        fresh_main("sample.py", f"--out_dir={out}", "--device=cpu")


def test_sample_without_a_checkpoint_lists_the_runs_and_the_command_to_sample_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in out \(missing latest\.json\), and no run under "
                                         r".*python train\.py config/small\.py$"):
        fresh_main("sample.py")
    surface_ckpt(tmp_path / "out" / "small")
    surface_ckpt(tmp_path / "out" / "sweep" / "lr3")
    os.makedirs(tmp_path / "out" / "empty")
    with pytest.raises(SystemExit) as e:
        fresh_main("sample.py")  # out_dir = "out", as after README command 1
    assert str(e.value) == ("error: no checkpoint in out (missing latest.json); runs with one: out/small, "
                            "out/sweep/lr3; sample one with: python sample.py --out_dir=out/small")
    with pytest.raises(SystemExit, match=r"no checkpoint in out/smal \(missing latest\.json\); runs with one: "
                                         r"out/small, out/sweep/lr3;"):
        fresh_main("sample.py", "--out_dir=out/smal")  # a typo: the runs next to it


@pytest.mark.parametrize("stage", [None, "sft"])
def test_sample_chat_warns_once_on_a_model_never_fine_tuned_then_chats(stage, tmp_path, monkeypatch, capsys):
    import io
    out = surface_ckpt(tmp_path / "run", stage=stage)
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1=\n/quit\n"))
    fresh_main("sample.py", f"--out_dir={out}", "--chat", "--device=cpu", "--max_new_tokens=3", "--temperature=0")
    captured = capsys.readouterr()
    assert captured.out.startswith("chat: type a message") and captured.out.count("> ") == 2  # it went on
    if stage:
        assert captured.err == ""  # rlhf.py's checkpoints record their stage
    else:
        warning, = captured.err.strip().splitlines()
        assert warning.startswith(f"warning: {out} holds a pretrained model that was never fine-tuned for chat")
        assert f"python rlhf.py config/sft.py --init_from={out}" in warning


def test_sample_imports_no_training_code():
    p = run("-c", "import sys, sample; print(sorted(m for m in ('train', 'rlhf', 'prepare') if m in sys.modules))")
    assert p.stdout.strip() == "[]"


def test_bench_generate_times_the_first_and_second_call_of_a_fresh_process(tmp_path):
    p = run("bench.py", "--mode=generate", "--gen_tiny=True", "--gen_new_tokens=5", "--gen_batches=(1,)",
            "--gen_no_cache=False", "--gen_device=cpu", "--gen_cold_variants=prompt_len=1", "--gen_cold_profile=True",
            f"--gen_out_dir={tmp_path}", env={"OMP_NUM_THREADS": "1"})
    row, = json.load(open(tmp_path / "generate.json"))["cold"]
    assert row["variant"] == "prompt_len=1" and row["prompt_len"] == 1 and row["batch"] == 1
    assert row["first_s"] > 0 and row["second_s"] > 0 and row["ratio"] == pytest.approx(row["first_s"] / row["second_s"])
    assert all(0 < t <= s for t, s in zip(row["first_token_s"], (row["first_s"], row["second_s"])))
    assert row["import_s"] > 0 and any(op.startswith("aten::addmm") for op, _, _ in row["profile"])
    assert "fresh process" in p.stdout and "prompt_len=1" in p.stdout and "most expensive ops" in p.stdout


def surface_metrics(path, steps, k=1.0, elapsed=True, resumed_from=None):
    """A tiny metrics.jsonl as train.py writes it: training rows every 10 steps, evaluations every 50."""
    import math
    rows = []
    for s in range(0, steps + 1, 10):
        extra = dict(elapsed_s=s * 0.5) if elapsed else {}
        if s:
            rows.append(dict(step=s, loss=2 + 5 * math.exp(-k * s / 80), lr=1e-3 * min(1, s / 50), tokens_per_s=1e3,
                             **extra))
        if s % 50 == 0:
            rows.append(dict(step=s, train_loss=2 + 5 * math.exp(-k * s / 80), val_loss=2.1 + 5 * math.exp(-k * s / 80),
                             val_bpb=1.0, **extra))
    if resumed_from is not None:  # killed, then resumed from the checkpoint at resumed_from: those steps again
        rows += [dict(r, **{"loss": r["loss"] - 0.5} if "loss" in r else {}) for r in rows if r["step"] > resumed_from]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 3')  # a half-written last line
    return str(path)


def assert_png(path, min_side=300):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= min_side
    return img


def test_plot_draws_several_runs_overlaid_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = surface_metrics(tmp_path / "baseline", 200)
    b = surface_metrics(tmp_path / "recipe", 150, k=1.5, elapsed=False)
    fresh_main("plot.py", a, b, f"--out={tmp_path / 'curves.png'}", "--title=baseline vs recipe")
    img = assert_png(tmp_path / "curves.png")
    assert img.shape[1] > img.shape[0]  # the 2 x 2 panels, landscape
    with pytest.raises(SystemExit, match=r"^error: --labels=x gives 1 labels for 2 runs"):
        fresh_main("plot.py", a, b, "--labels=x")
    with pytest.raises(SystemExit, match=r"^error: no metrics in .*nope"):
        fresh_main("plot.py", str(tmp_path / "nope.jsonl"))


def test_plot_curves_draws_val_loss_against_wall_time_for_a_speedrun(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    runs = {"baseline": plot.read_metrics(surface_metrics(tmp_path / "a", 200)),
            "recipe": plot.read_metrics(surface_metrics(tmp_path / "b", 200, k=2.0))}
    assert plot.curves(runs, str(tmp_path / "val.png")) == str(tmp_path / "val.png")
    assert_png(tmp_path / "val.png")


def test_plot_reads_a_resumed_run_once_and_takes_tokens_from_the_checkpoint_config(tmp_path, sample_ckpt):
    import plot
    from checkpoint import load_checkpoint
    rows = plot.read_metrics(surface_metrics(tmp_path / "r", 100, resumed_from=50))  # the torn last line: left out
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(10, 101, 10)) and [r["step"] for r in rows if "val_loss" in r] == [0, 50, 100]
    assert [r["loss"] for r in rows if "loss" in r][5:] == pytest.approx(  # steps 60..100: the resumed run's rows
        [r["loss"] - 0.5 for r in plot.read_metrics(surface_metrics(tmp_path / "s", 100)) if "loss" in r][5:])
    config = load_checkpoint(sample_ckpt)["config"]
    per_step = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    assert plot.tokens_per_step(sample_ckpt) == per_step and plot.tokens_per_step(str(tmp_path / "r")) is None
    kept, xs = plot.x_values(plot.read_metrics(sample_ckpt), "tokens", per_step)
    assert xs and xs == [r["step"] * per_step for r in kept]


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch):
    import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then raises ImportError
    with pytest.raises(SystemExit, match=r"^error: plot\.py needs matplotlib, which is not installed: "
                                         r"pip install matplotlib$"):
        plot.pyplot()


# ============================================================ time to quality (train.py data order, Muon, model switches, speedrun)
def windows_of(tiny_data, split="train", block_size=8):
    from prepare import load_meta
    from train import TokenWindows, split_paths
    data_root, name, _ = tiny_data
    data_dir = os.path.join(data_root, name)
    return TokenWindows(split_paths(data_dir, load_meta(data_dir), split), block_size)


def test_shifted_epochs_move_the_window_grid_and_still_deal_every_window_once(tiny_data):
    from train import Batches
    ds = windows_of(tiny_data)
    offsets = []
    for epoch in range(4):
        starts = []
        for rank in range(2):
            b = Batches(ds, 3, rank, 2, seed=0, epoch=epoch, shift=True)
            offsets.append(b.offset)
            starts.append(b.order[:b.per_epoch * 3].tolist())
            x, y = next(b)
            first = int(b.order[0])  # the batch's first row is window `first` of the shifted grid
            shard = int(np.searchsorted(b.starts, first, side="right")) - 1
            s = b.offset + (first - b.starts[shard]) * 8
            assert torch.equal(x[0], torch.from_numpy(ds.shards[shard][s:s + 8].astype(np.int64)))
            assert torch.equal(x[:, 1:], y[:, :-1])
        assert not set(starts[0]) & set(starts[1])                       # no window on both ranks
        assert all(len(set(s)) == len(s) for s in starts)                # no window twice in an epoch
        assert len(starts[0]) + len(starts[1]) >= int(b.starts[-1]) - 2 * 3 * 2
    assert offsets[0] == offsets[1] == 0 and len(set(offsets[2::2])) > 1  # epoch 0 unshifted, later ones move
    assert all(0 <= o < 8 for o in offsets)


def test_evaluation_batches_stay_the_same_from_eval_to_eval(tiny_data):
    from train import Batches
    ds = windows_of(tiny_data, "val")
    a, b = Batches(ds, 2, 0, 1, seed=1), Batches(ds, 2, 0, 1, seed=1)
    for _ in range(3):
        assert torch.equal(next(a)[0], next(b)[0])
    assert a.offset == 0


def test_resume_is_bit_exact_with_muon_and_shifted_epochs(tiny_data, tmp_path):
    # 40 steps of 4 x 16 tokens run several epochs of the tiny corpus, so the resume crosses shifted grids
    common = ["--max_iters=40", "--lr_decay_iters=40", "--eval_interval=20", "--optimizer=muon", "--log_interval=10",
              "--lr_schedule=wsd", "--value_embeds=True", "--unet_skips=True", "--tie_embeddings=False"]
    tiny_train(tiny_data, tmp_path / "once", *common)
    tiny_train(tiny_data, tmp_path / "twice", *common[1:], "--max_iters=20")
    tiny_train(tiny_data, tmp_path / "twice", *common, "--init_from=resume")
    from checkpoint import load_checkpoint
    a, b = load_checkpoint(str(tmp_path / "once")), load_checkpoint(str(tmp_path / "twice"))
    assert a["data"]["epoch"] >= 2 and a["data"] == b["data"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert "momentum_buffer" in a["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]  # Muon's state saved


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_group_with_its_lr():
    import train
    model = gpt_with(n_layer=4, tie_embeddings=False, value_embeds=True, unet_skips=True)
    adamw, muon = train.make_optimizers(model, 1, "ddp", 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", embed_lr=0.05,
                                        head_lr=2e-3, muon_lr=0.03, muon_weight_decay=0.01)
    names = {p: n for n, p in model.named_parameters()}
    in_muon = {names[p] for p in muon.param_groups[0]["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    embed, head, gain = ({names[p] for p in g["params"]} for g in adamw.param_groups)
    assert embed == {"transformer.wte.weight", "transformer.wpe.weight"} | {f"transformer.ve.{i}.weight" for i in range(2)}
    assert head == {"lm_head.weight"} and "skip_weights" in gain and all(model.get_parameter(n).dim() == 1 for n in gain)
    assert len(in_muon | embed | head | gain) == len(names)           # every parameter in exactly one group
    assert [g["lr"] for g in adamw.param_groups] == [0.05, 2e-3, 1e-3] and muon.param_groups[0]["lr"] == 0.03
    assert muon.param_groups[0]["weight_decay"] == 0.01
    train.set_lr([adamw, muon], 0.5)  # the schedule scales every group's own lr
    assert [g["lr"] for g in adamw.param_groups] == [0.025, 1e-3, 5e-4] and muon.param_groups[0]["lr"] == 0.015
    with pytest.raises(SystemExit, match="optimizer='muon' orthogonalises whole matrices.*sharding='ddp'"):
        train.make_optimizers(model, 2, "fsdp", 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    with pytest.raises(SystemExit, match="optimizer must be 'adamw' or 'muon'"):
        train.make_optimizers(model, 1, "ddp", 0.1, 1e-3, (0.9, 0.95), "cpu", "sgd")


def test_a_skipped_update_leaves_muon_and_its_momentum_untouched():
    import train
    model = gpt_with(n_layer=2)
    opts = train.make_optimizers(model, 1, "ddp", 0.0, 1e-2, (0.9, 0.95), "cpu", "muon")
    x = torch.randint(0, 64, (2, 8))
    for bad in (0.0, 1.0):
        model(x, x)[1].backward()
        before = ({k: v.clone() for k, v in model.state_dict().items()},
                  {id(p): {k: v.clone() for k, v in s.items()} for o in opts for p, s in o.state.items()})
        train.apply_update(opts, torch.amp.GradScaler(enabled=False), torch.tensor(bad))
        changed = any(not torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
        assert changed == (bad == 0.0)
        if bad:
            assert all(torch.equal(v, before[1][id(p)][k]) for o in opts for p, s in o.state.items() for k, v in s.items())
        for o in opts:
            o.zero_grad()


def test_wsd_schedule_is_flat_then_linear_to_the_floor():
    from train import get_lr
    lr = lambda it: get_lr(it, 1.0, 10, 110, 0.1, "wsd", cooldown_frac=0.5)
    assert lr(0) == pytest.approx(1 / 11) and lr(10) == lr(55) == 1.0  # warmup, then flat until the cooldown
    assert lr(55 + 27.5) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)  # linear to the floor


def test_modern_switches_keep_generation_with_the_kv_cache_equal_to_the_full_forward():
    for kw in (dict(value_embeds=True), dict(unet_skips=True), dict(logit_softcap=2.0),
               dict(value_embeds=True, unet_skips=True, n_layer=5, pos_encoding="rope", n_kv_head=1)):
        model = gpt_with(spread=0.3, **kw).eval()
        idx = torch.randint(0, 64, (2, 12))
        logits, _ = model(idx)
        cache = model.new_cache(2, 16, torch.float32, "cpu")
        pre = model.forward_cached(idx[:, :7], torch.arange(7), cache)
        step = model.forward_cached(idx[:, 7:8], torch.arange(7, 8), cache)
        torch.testing.assert_close(pre, logits[:, :7], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[:, 0], logits[:, 7], rtol=1e-5, atol=1e-5)
        if "logit_softcap" in kw:
            assert logits.abs().max() < 2.0


def test_zero_init_projections_make_every_block_start_as_the_identity():
    model = gpt_with(zero_init_proj=True, n_layer=3)
    x = torch.randn(2, 5, 32)
    for block in model.transformer.h:
        assert torch.equal(block(x), x)
    assert all(b.mlp.c_proj.weight.abs().sum() == 0 for b in model.transformer.h)


def test_speedrun_bench_times_the_recipe_and_the_baseline_from_launch_on_cpu(tmp_path):
    common = ("device=cpu n_layer=1 n_head=2 n_embd=32 block_size=32 batch_size=4 max_iters=6 lr_decay_iters=6 "
              "eval_interval=3 eval_iters=2 log_interval=3 warmup_iters=0 compile=False")
    p = run("bench.py", "--mode=speedrun", "--speedrun_seeds=2", f"--speedrun_common={common}",
            "--speedrun_variants=unet_skips=False", f"--speedrun_dir={tmp_path / 'sr'}",
            f"--speedrun_data_root={tmp_path / 'data'}", env={"OMP_NUM_THREADS": "1"})
    res = json.load(open(tmp_path / "sr" / "results.json"))
    rows = {r["name"]: r for r in res["table"]}
    assert set(rows) == {"baseline", "recipe", "unet_skips=False"} and all(r["seeds"] == 2 for r in rows.values())
    base_best = [min(r["val_loss"] for r in run["rows"] if "val_loss" in r) for run in res["runs"]["baseline"]]
    assert res["target"] == pytest.approx(sum(base_best) / 2)      # the target: the baseline's mean best
    for r in rows.values():
        assert len(r["time_to_target"]) == r["reached"] and all(0 < t <= w for t, w in zip(r["time_to_target"], r["wall"]))
        assert all(f > 0 for f in r["first_step_s"])
    table = p.stdout[p.stdout.index("s to target"):]
    assert all(name in table for name in rows) and os.path.exists(tmp_path / "sr" / "val_vs_time.png")


# ============================================================ trainux
import re


def trainux_metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trainux_run(tiny_data, tmp_path_factory):
    """A finished tiny run: its out_dir (20 steps, evaluated at step 20) and its stdout."""
    out = tmp_path_factory.mktemp("trainux") / "src"
    p = tiny_train(tiny_data, out, "--max_iters=20", "--eval_interval=20", "--gradient_accumulation_steps=1")
    return out, p.stdout


def test_a_run_ends_with_a_summary_of_best_val_loss_bits_per_byte_tokens_and_time(trainux_run):
    out, stdout = trainux_run
    best = min(r["val_loss"] for r in trainux_metrics(out) if "val_loss" in r)
    bpb = [r["val_bpb"] for r in trainux_metrics(out) if r.get("val_loss") == best][0]
    last = stdout.strip().splitlines()[-1]
    assert re.match(rf"done: 20 steps, 1,280 tokens in \d+s; best val loss {best:.4f} \({bpb:.4f} bits/byte\); "
                    rf"checkpoint in {re.escape(str(out))}$", last), last


def test_a_run_from_scratch_into_a_used_out_dir_is_refused_with_the_fix(tiny_data, trainux_run):
    out, _ = trainux_run
    before = open(out / "metrics.jsonl").read()
    p = tiny_train(tiny_data, out, "--max_iters=20", check=False)
    one_line_error(p, r"already holds a run \(ckpt-0000020\.pt, latest\.json, metrics\.jsonl\); continue it with "
                      r"--init_from=resume, or start this one in another --out_dir$")
    assert open(out / "metrics.jsonl").read() == before  # nothing appended


def test_fine_tune_from_a_run_dir_starts_at_step_0_from_its_weights_with_a_fresh_optimizer(tiny_data, trainux_run,
                                                                                          tmp_path):
    from checkpoint import load_checkpoint
    src, _ = trainux_run
    tiny_train(tiny_data, tmp_path / "ft", f"--init_from={src}", "--max_iters=0")
    (first,) = [r for r in trainux_metrics(tmp_path / "ft") if "val_loss" in r]
    last = [r for r in trainux_metrics(src) if "val_loss" in r][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    a, b = load_checkpoint(str(src)), load_checkpoint(str(tmp_path / "ft"))
    moments = lambda c: [s[k] for s in c["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert b["iter_num"] == 0 and not any(m.any() for m in moments(b)) and all(m.any() for m in moments(a))  # fresh
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fine_tune_from_an_exported_hugging_face_dir_and_a_tokenizer_mismatch_is_refused(tiny_data, trainux_run,
                                                                                        other_data, tmp_path):
    pytest.importorskip("safetensors")
    import bpe
    import export
    from checkpoint import load_checkpoint, model_from_checkpoint
    src, _ = trainux_run
    export.export(model_from_checkpoint(load_checkpoint(str(src))), bpe.Tokenizer.load(str(src / "tokenizer.bpe")),
                  str(tmp_path / "hf"))
    tiny_train(tiny_data, tmp_path / "ft", f"--init_from={tmp_path / 'hf'}", "--max_iters=0")
    (first,) = [r for r in trainux_metrics(tmp_path / "ft") if "val_loss" in r]
    last = [r for r in trainux_metrics(src) if "val_loss" in r][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    for source in (tmp_path / "hf", src):  # data made with another tokenizer than the source's
        with pytest.raises(SystemExit, match=r"^error: .* was trained with another tokenizer than .*other was made "
                                             r"with; fine-tune on data prepared with its tokenizer"):
            fresh_main("train.py", *TINY_TRAIN, f"--data_root={other_data[0]}", f"--dataset={other_data[1]}",
                       f"--out_dir={tmp_path / 'no'}", f"--init_from={source}", "--max_iters=0")


def test_lr_decay_iters_0_follows_max_iters_and_a_longer_one_is_a_one_line_warning(tiny_data, trainux_run, tmp_path):
    from train import get_lr
    out, stdout = trainux_run  # TINY_TRAIN: learning_rate 3e-3, warmup 2; min_lr the default 6e-5
    lrs = [r["lr"] for r in trainux_metrics(out) if "lr" in r]
    assert lrs == pytest.approx([get_lr(i, 3e-3, 2, 20, 6e-5) for i in range(20)]) and lrs[-1] < 1e-4
    assert "lr_decay_iters=" not in stdout
    p = tiny_train(tiny_data, tmp_path, "--max_iters=1", "--lr_decay_iters=100",
                   "--gradient_accumulation_steps=1")
    (line,) = [l for l in p.stdout.splitlines() if "lr_decay_iters=" in l]
    assert line.startswith("warning: lr_decay_iters=100 > max_iters=1: the LR ends at") and \
        line.endswith("set --lr_decay_iters=0 to follow max_iters")


def test_a_one_process_config_runs_on_two_and_says_in_one_line_that_the_global_batch_grew(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path / "a", "--max_iters=2", "--gradient_accumulation_steps=1", torchrun=2)
    assert p.stdout.count("grew") == 1 and "the global batch grew from 64 to 128 tokens per step" in p.stdout
    assert "| 128 tokens/step |" in p.stdout and "done: 2 steps, 256 tokens" in p.stdout
    from train import micro_steps  # the accumulation splits where it divides: the global batch is kept
    assert [micro_steps(g, 2) for g in (1, 2, 3, 8)] == [1, 1, 2, 4]


def test_a_user_error_under_torchrun_is_said_once_by_rank_0_without_a_traceback_from_train_py(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--sharding=zero3", torchrun=2, check=False)
    errors = [l for l in p.stderr.splitlines() if "error: " in l]
    assert p.returncode != 0 and errors == ["error: sharding must be 'ddp', 'zero1' or 'fsdp', got 'zero3'"]
    assert "train.py\", line" not in p.stderr  # (torchrun's own failure report, of the launcher, may follow)


def test_a_gpu_sized_run_on_the_cpu_gets_a_one_line_warning_naming_small_py(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--max_iters=0", "--gradient_accumulation_steps=1601")  # 102,464 tokens/step
    (line,) = [l for l in p.stdout.splitlines() if "warning" in l]
    assert "GPU-sized run on the CPU" in line and "102,464 tokens per step" in line and "config/small.py" in line
    assert "warning" not in tiny_train(tiny_data, tmp_path / "b", "--max_iters=0").stdout


TRAINUX_SLOW_SAVE = r'''
import os, runpy, sys, time
sys.path.insert(0, os.environ["REPO"])
import checkpoint
real = checkpoint.save_checkpoint
def save_checkpoint(*a, **k):  # a slow disk: the stop's save takes seconds, so a second Ctrl-C lands inside it
    time.sleep(5)
    return real(*a, **k)
checkpoint.save_checkpoint = save_checkpoint
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "train.py"), run_name="__main__")
'''


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tiny_data, tmp_path):
    import signal
    import time
    driver = tmp_path / "slow_save.py"
    driver.write_text(TRAINUX_SLOW_SAVE)
    data_root, name, _ = tiny_data
    proc = subprocess.Popen([sys.executable, str(driver), *TINY_TRAIN, f"--data_root={data_root}", f"--dataset={name}",
                             f"--out_dir={tmp_path / 'out'}", "--max_iters=100000", "--eval_interval=100000",
                             "--gradient_accumulation_steps=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env=dict(os.environ, REPO=HERE, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().startswith("SIGINT: finishing this step and saving")
    time.sleep(0.5)  # inside the slow save now
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 3 and proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == [
        f"interrupted: quit without saving; the last checkpoint in {tmp_path / 'out'} is kept"]
    assert not (tmp_path / "out" / "latest.json").exists()


def test_wandb_log_sends_metrics_jsonls_rows_and_wandb_is_imported_only_when_on(tiny_data, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(  # a stand-in for wandb that writes what it is given
        "import json, os\nrows = open(os.environ['WANDB_ROWS'], 'w')\n"
        "def init(project, name, config):\n    rows.write(json.dumps([project, name, config['n_layer']]) + '\\n')\n"
        "def log(row):\n    rows.write(json.dumps(row) + '\\n')\n    rows.flush()\n")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(fake), "WANDB_ROWS": str(tmp_path / "rows.jsonl")}
    data_root, name, _ = tiny_data
    args = ["train.py", *TINY_TRAIN, f"--data_root={data_root}", f"--dataset={name}", "--max_iters=3",
            "--gradient_accumulation_steps=1"]
    run(*args, f"--out_dir={tmp_path / 'on'}", "--wandb_log=True", "--wandb_project=p", "--wandb_run_name=r", env=env)
    sent = [json.loads(l) for l in open(tmp_path / "rows.jsonl")]
    assert sent[0] == ["p", "r", 2] and sent[1:] == trainux_metrics(tmp_path / "on") and len(sent) > 4
    (fake / "wandb.py").write_text("raise ImportError('not installed')\n")
    run(*args, f"--out_dir={tmp_path / 'off'}", env=env)  # off: never imported
    one_line_error(run(*args, f"--out_dir={tmp_path / 'on2'}", "--wandb_log=True", env=env, check=False),
                   r"^error: wandb_log=True needs the wandb package: pip install wandb, or set --wandb_log=False$")
# ============================================================ rlhf
def test_group_advantages_and_rloo_leave_one_out_on_a_hand_worked_case():
    import rlhf
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two prompts, groups of 4; the second all right
    adv = rlhf.group_advantages(r, 4, scale=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    std = (4 * 0.5 ** 2 / 3) ** 0.5  # the group's unbiased std (as TRL): sqrt(1/3)
    scaled = rlhf.group_advantages(r, 4, scale=True)
    assert torch.allclose(scaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + 1e-4))
    loo = rlhf.rloo_advantages(r, 4)  # 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; all-equal groups: 0
    assert torch.allclose(loo, torch.tensor([2, -2, -2, 2, 0, 0, 0, 0]) / 3)
    assert torch.allclose(loo, adv * 4 / 3)  # leave-one-out is the group mean's advantage times G / (G - 1)


def test_grpo_loss_normalisations_clipping_and_k3_kl_on_a_hand_worked_case():
    import math
    import rlhf
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # a 2-token and a 1-token response
    logp = torch.full((2, 4), -1.0)
    adv = torch.tensor([1.0, 3.0])  # at ratio 1 each token's loss is -advantage: -1, -1 and -3
    want = dict(grpo=(-1 + -3) / 2, dapo=(-1 - 1 - 3) / 3, dr_grpo=(-1 - 1 - 3) / (2 * 4))  # max_new = 4
    for loss_type, w in want.items():
        loss, clipfrac, _ = rlhf.grpo_loss(logp, logp, None, adv, mask, 0.2, 0.0, loss_type, 4)
        assert math.isclose(loss.item(), w, rel_tol=1e-6) and clipfrac == 0, loss_type
    # ratio 1.5 with a positive advantage is capped at 1.2; ratio 0.5 is not (the pessimistic min)
    old = logp - torch.tensor([[0.0, math.log(1.5), math.log(0.5), 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss, clipfrac, _ = rlhf.grpo_loss(logp, old, None, adv, mask, 0.2, 0.0, "dapo", 4)
    assert math.isclose(loss.item(), -(1.2 + 0.5 + 3) / 3, rel_tol=1e-6)
    assert math.isclose(clipfrac.item(), 2 / 3, rel_tol=1e-6)  # both ratios are outside [0.8, 1.2]
    # k3 of KL: q = log ref - log pi = log 2 on every token: exp(q) - q - 1 = 1 - log 2 per token, times beta
    loss, _, kl = rlhf.grpo_loss(logp, logp, logp + math.log(2), adv, mask, 0.2, 0.5, "dapo", 4)
    assert math.isclose(kl.item(), 1 - math.log(2), rel_tol=1e-6)
    assert math.isclose(loss.item(), want["dapo"] + 0.5 * (1 - math.log(2)), rel_tol=1e-6)
    with pytest.raises(SystemExit, match="loss_type must be"):
        rlhf.grpo_loss(logp, logp, None, adv, mask, 0.2, 0.0, "sigmoid", 4)


def rlhf_online_args(rlhf_tiny, stage, out_dir, *extra):
    """A tiny ppo, grpo or rloo run of the rlhf.py fixture's SFT model against the judge."""
    d = rlhf_tiny["data"]
    return [f"--stage={stage}", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={out_dir}", f"--data={d}/prompts.jsonl",
            f"--eval_prompts={d}/prompts.jsonl", "--reward_model=task", "--device=cpu", "--warmup_iters=0",
            "--eval_samples=16", "--rollout_batch=4", "--num_generations=8", "--minibatch=16", "--ppo_epochs=2",
            "--max_new_tokens=7", "--learning_rate=3e-3", "--log_interval=1", *extra]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_the_reward_on_the_trivial_task(rlhf_tiny, tmp_path, stage):
    # the fixture's SFT model answers "1+1=" with "1+1=2" or "1+1=3"; the judge rewards the first
    one_update = ["--ppo_epochs=1", "--minibatch=32"] if stage == "grpo" else []  # TRL's default: one update a step
    rlhf_run(rlhf_online_args(rlhf_tiny, stage, tmp_path, "--max_iters=8", "--eval_interval=8", "--beta=0.05",
                              *one_update))
    rows = rlhf_metrics(tmp_path)
    evals, steps = [r for r in rows if "acc_sampled" in r], [r for r in rows if "clipfrac" in r]
    assert evals[-1]["acc_sampled"] > evals[0]["acc_sampled"] + 0.2 and evals[-1]["acc_greedy"] == 1.0
    assert steps[-1]["reward"] > steps[0]["reward"] + 0.2
    assert {"reward", "loss", "clipfrac", "kl", "reward_std", "zero_std_frac", "response_len"} <= set(steps[0])


def rlhf_rewind(out_dir, step):
    """out_dir as a run killed after its step-`step` checkpoint leaves it: latest.json names that one."""
    import hashlib
    from checkpoint import CKPT_FORMAT
    name = f"ckpt-{step:07d}.pt"
    with open(os.path.join(out_dir, name), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(dict(file=name, sha256=sha, format=CKPT_FORMAT, iter_num=step), f)


@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo", "dpo"])
def test_resume_of_an_interrupted_run_is_bit_exact(rlhf_tiny, tmp_path, stage):
    import shutil
    from checkpoint import load_checkpoint
    d = rlhf_tiny["data"]
    args = rlhf_online_args(rlhf_tiny, stage, tmp_path / "once", "--max_iters=4", "--eval_interval=2", "--beta=0.05")
    if stage == "dpo":
        args = ["--stage=dpo", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={tmp_path / 'once'}", "--device=cpu",
                f"--data={d}/prefs.jsonl", "--val_data=", "--eval_prompts=", "--batch_size=4", "--max_iters=4",
                "--eval_interval=2"]
    rlhf_run(args)
    shutil.copytree(tmp_path / "once", tmp_path / "twice")
    rlhf_rewind(tmp_path / "twice", 2)
    rlhf_run([a.replace(str(tmp_path / "once"), str(tmp_path / "twice")) for a in args] + ["--resume=True"])
    a, b = load_checkpoint(str(tmp_path / "once")), load_checkpoint(str(tmp_path / "twice"))
    assert a["iter_num"] == b["iter_num"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]  # AdamW's moments too
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    if stage == "ppo":
        assert all(torch.equal(a["value_head"][k], b["value_head"][k]) for k in a["value_head"])


def test_missing_parents_name_the_command_that_makes_them(rlhf_tiny, tmp_path):
    d = rlhf_tiny["data"]
    with pytest.raises(SystemExit, match=r"^error: no reward model in .*nope.*python rlhf\.py config/rm\.py.*"
                                         r"--reward_model=task"):
        rlhf_run(rlhf_online_args(rlhf_tiny, "ppo", tmp_path / "ppo", f"--reward_model={tmp_path}/nope"))
    with pytest.raises(SystemExit, match=r"^error: data file .*prefs_sft\.jsonl does not exist .*"
                                         r"python rlhf\.py config/label\.py"):  # the rm stage before the label stage
        rlhf_run(["--stage=rm", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={tmp_path}/rm",
                  f"--data={d}/prefs.jsonl,{d}/prefs_sft_missing/prefs_sft.jsonl", "--val_data="])
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in .*python train\.py config/add\.py"):
        rlhf_run(["--stage=sft", "--device=cpu", f"--init_from={tmp_path}/none", f"--out_dir={tmp_path}/sft"])
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in .*python rlhf\.py config/sft\.py"):
        rlhf_run(rlhf_online_args(rlhf_tiny, "grpo", tmp_path / "g", f"--init_from={tmp_path}/none"))


def test_label_stage_that_finds_no_pair_says_so_instead_of_writing_an_empty_file(rlhf_tiny):
    d = rlhf_tiny["data"]  # the untrained base model never answers right: no comparison to make
    with pytest.raises(SystemExit, match=r"^error: no prompt of the 8 got both a right and a wrong answer in 8 "
                                         r"samples; train the SFT model .* longer"):
        rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['base']}", f"--data={d}/prompts.jsonl",
                  f"--label_out={d}/none.jsonl", "--label_prompts=8", "--label_val_prompts=4", "--max_new_tokens=7"])


@pytest.mark.parametrize("args, pattern", [
    (["--stage=grpo", "--loss_type=ipo"], "loss_type for stage grpo must be one of grpo, dapo, dr_grpo"),
    (["--stage=dpo", "--loss_type=dapo"], "loss_type for stage dpo must be one of sigmoid, ipo"),
    (["--stage=rloo", "--beta=-1"], "beta must be a number >= 0"),
    (["--stage=grpo", "--num_generations=1"], "num_generations must be >= 2"),
    (["--stage=gpro"], "stage must be one of task, sft, label, rm, ppo, dpo, grpo, rloo")])
def test_bad_grpo_settings_are_one_line_errors(args, pattern):
    with pytest.raises(SystemExit, match="^error: " + pattern):
        rlhf_run(args + ["--device=cpu", "--init_from=/nonexistent"])
