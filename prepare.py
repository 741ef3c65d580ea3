"""
Turn a corpus into tokenized train/val shards that train.py reads.

    python prepare.py                                  # default corpus: this Python's own stdlib sources, no network
    python prepare.py --input=my_texts/ --vocab_size=8192
    python prepare.py --dataset=shakespeare            # downloads (resumable, checksummed, cached)

Writes data/<dataset>/: tokenizer.bpe, train_000.bin ..., val_000.bin ..., meta.json.
A document is a .py/.txt/.md file, or a "text" field of a .jsonl line (.gz accepted). In a .txt file a line
`<|endoftext|>` separates documents (the TinyStories convention); a corpus of one document is split at blank
lines so that train and val can be split by document. Every document is preceded by the end-of-text token,
so sampling from that token starts a fresh document. Running it again with the same inputs does nothing.
"""
import gzip
import hashlib
import json
import os
import struct
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import numpy as np

import bpe
from configurator import configure

# -----------------------------------------------------------------------------
dataset = "stdlib"          # stdlib | shakespeare | tinystories | any name (with `input`)
input = ""                  # a file or directory of .txt/.md/.py/.jsonl[.gz]; overrides `dataset`'s source
data_root = "data"
vocab_size = 4096           # special tokens included
tokenizer = ""              # path of an existing tokenizer file to reuse instead of training one
tokenizer_max_bytes = 200_000_000  # train the tokenizer on at most this much of the train split
val_fraction = 0.02         # every round(1/val_fraction)-th document goes to val
shard_tokens = 100_000_000  # tokens per shard file
# -----------------------------------------------------------------------------

REMOTE = {  # name -> url, expected size in bytes (None = unknown), sha256 (None = pinned on first download)
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    1115394, None),
    "tinystories": ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
                    None, None),
}

# ---------------------------------------------------------------------------- the shard format
# A shard is a 256-byte header then the raw little-endian token ids. Writer and reader live here, together.
MAGIC, VERSION, HEADER_BYTES = b"SLMSHARD", 1, 256
HEADER = struct.Struct("<8sIIIQ64s")  # magic, version, itemsize, vocab size, token count, tokenizer sha256 (hex)


def write_shard(path, tokens, vocab_size, tokenizer_hash):
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = np.asarray(tokens, dtype=dtype)
    header = HEADER.pack(MAGIC, VERSION, tokens.itemsize, vocab_size, len(tokens), tokenizer_hash.encode())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.tobytes())
    os.replace(tmp, path)  # a shard is either complete or absent


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise SystemExit(f"error: {path} is not a scratchlm shard (bad magic); re-run prepare.py")
    magic, version, itemsize, vocab, count, tok_hash = HEADER.unpack_from(raw)
    if version != VERSION:
        raise SystemExit(f"error: {path} has shard format v{version}, this code reads v{VERSION}; re-run prepare.py")
    expected = HEADER_BYTES + count * itemsize
    if os.path.getsize(path) != expected:
        raise SystemExit(f"error: {path} is truncated or corrupt ({os.path.getsize(path)} bytes, header says "
                         f"{expected}); re-run prepare.py")
    return dict(itemsize=itemsize, vocab_size=vocab, count=count, tokenizer_hash=tok_hash.decode())


def read_shard(path):
    """The shard's tokens as a read-only memory map (no copy, so any corpus size fits)."""
    h = read_header(path)
    dtype = {2: np.uint16, 4: np.uint32}[h["itemsize"]]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(h["count"],))


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        raise SystemExit(f"error: no prepared data in {data_dir} (missing meta.json); run "
                         f"`python prepare.py --dataset={name}` first")
    try:
        with open(path) as f:
            meta = json.load(f)
        missing = [k for k in ("tokenizer", "tokenizer_hash", "vocab_size", "train_shards", "val_shards")
                   if k not in meta]  # the fields every reader needs
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or not UTF-8
        raise SystemExit(f"error: {path} is corrupt ({type(e).__name__}: {e}); re-run prepare.py") from None
    return meta

# ---------------------------------------------------------------------------- reading a corpus


def corpus_files(src):
    """Sorted list of the files that make up a corpus: the stdlib, one file, or a directory."""
    if src == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        return [p for p in walk(root, (".py",)) if "site-packages" not in p and "dist-packages" not in p]
    if os.path.isfile(src):
        return [src]
    if os.path.isdir(src):
        files = walk(src, (".txt", ".md", ".py", ".jsonl", ".txt.gz", ".md.gz", ".jsonl.gz"))
        if not files:
            raise SystemExit(f"error: {src} has no .txt/.md/.py/.jsonl[.gz] files; nothing to prepare")
        return files
    raise SystemExit(f"error: input {src} does not exist; pass --input=FILE_OR_DIR")


def walk(root, suffixes):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(suffixes))


def read_documents(files, strict=True):
    """Yield documents (str). Non-UTF-8 files are an error, or skipped when strict=False (the stdlib has a
    few deliberately mis-encoded test files)."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not strict:
                continue
            raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}); convert it, e.g. "
                             f"`iconv -f latin1 -t utf-8`")
        except (OSError, EOFError) as e:
            raise SystemExit(f"error: cannot read {path}: {e}")
        if path.endswith((".jsonl", ".jsonl.gz")):
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f'error: {path}:{lineno} is not a JSON object with a "text" field')
                yield doc
        elif path.endswith((".txt", ".txt.gz")) and "\n<|endoftext|>\n" in text:
            yield from (d.strip("\n") for d in text.split("\n<|endoftext|>\n") if d.strip())
        elif text.strip():
            yield text


def split_of(i):
    """Deterministic, streamable train/val split by document index: evenly spaced val documents."""
    return "val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"

# ---------------------------------------------------------------------------- downloads


def download(url, dest, size=None, sha256=None):
    """Fetch url to dest, resuming a partial download (HTTP Range) and verifying size and sha256.
    Without a known sha256 the first download's hash is pinned in dest.sha256 and checked on later runs."""
    pin = dest + ".sha256"
    if sha256 is None and os.path.exists(pin):
        sha256 = open(pin).read().strip()
    if not os.path.exists(dest):
        part = dest + ".part"
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            resp = urllib.request.urlopen(req, timeout=60)
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: cannot download {url} ({e}); no network? Download it yourself and "
                             f"run `python prepare.py --input=FILE`")
        if getattr(resp, "status", None) != 206:
            have = 0  # the server ignored the Range request: start over
        total = have + int(resp.headers.get("Content-Length") or 0)
        t0, done = time.time(), have
        with resp, open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                progress(f"downloading {os.path.basename(dest)}", done - have, max(total - have, 0), t0)
        print(file=sys.stderr)
        os.replace(part, dest)
    if size is not None and os.path.getsize(dest) != size:
        os.remove(dest)
        raise SystemExit(f"error: {dest} has {os.path.getsize(dest) if os.path.exists(dest) else 0} bytes, "
                         f"expected {size}; removed it, run again to re-download")
    digest = file_sha256(dest)
    if sha256 is not None and digest != sha256:
        os.remove(dest)
        raise SystemExit(f"error: checksum mismatch for {dest} (got {digest[:12]}..., expected {sha256[:12]}...); "
                         f"removed it, run again to re-download")
    if not os.path.exists(pin):
        with open(pin, "w") as f:
            f.write(digest + "\n")
    return dest


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def progress(label, done, total, t0):
    """One updating line: amount done, rate, ETA."""
    rate = done / max(time.time() - t0, 1e-9)
    eta = f"ETA {(total - done) / rate:5.0f}s" if total and rate > 0 else ""
    pct = f"{100 * done / total:5.1f}% " if total else ""
    print(f"\r{label}: {pct}{done / 1e6:8.1f} MB  {rate / 1e6:6.2f} MB/s  {eta}   ", end="", file=sys.stderr,
          flush=True)

# ---------------------------------------------------------------------------- the job


def source_files():
    if input:
        return corpus_files(input)
    if dataset == "stdlib":
        return corpus_files("stdlib")
    if dataset not in REMOTE:
        raise SystemExit(f"error: unknown dataset '{dataset}'; choose stdlib, {', '.join(REMOTE)}, "
                         f"or pass --input=PATH")
    url, size, sha = REMOTE[dataset]
    os.makedirs(os.path.join(data_root, "downloads"), exist_ok=True)
    return [download(url, os.path.join(data_root, "downloads", os.path.basename(url)), size, sha)]


def documents(files):
    docs = read_documents(files, strict=(dataset != "stdlib" or bool(input)))
    first = next(docs, None)
    if first is None:
        raise SystemExit("error: the corpus is empty (no non-blank documents); check --input")
    second = next(docs, None)
    if second is None:  # one document: split it at blank lines so val can be held out by document
        yield from (d for d in first.split("\n\n") if d.strip())
        return
    yield first
    yield second
    yield from docs


def prepare():
    files = source_files()
    out = os.path.join(data_root, dataset)
    # The fingerprint covers the file list (names, sizes, mtimes) and every setting that changes the output.
    listing = [(os.path.relpath(p, os.path.dirname(files[0])), os.path.getsize(p), os.stat(p).st_mtime_ns)
               for p in files]
    settings = dict(vocab_size=vocab_size, tokenizer=tokenizer and file_sha256(tokenizer),
                    val_fraction=val_fraction, shard_tokens=shard_tokens, tokenizer_max_bytes=tokenizer_max_bytes)
    fingerprint = hashlib.sha256(json.dumps([listing, settings]).encode()).hexdigest()
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == fingerprint:
        print(f"{out} is up to date (same inputs and settings); nothing to do")
        return out
    os.makedirs(out, exist_ok=True)

    # 1) the tokenizer, trained on (a bounded prefix of) the train split only, so val stays held out
    t0 = time.time()
    if tokenizer:
        tok = bpe.Tokenizer.load(tokenizer)
    else:
        def train_texts():
            seen = 0
            for i, doc in enumerate(documents(files)):
                if split_of(i) == "train" and seen < tokenizer_max_bytes:
                    seen += len(doc)
                    yield doc
        print(f"training a {vocab_size}-token BPE tokenizer on {len(files)} files ...", file=sys.stderr)
        tok = bpe.train(train_texts(), vocab_size, verbose=True)
    tok.save(os.path.join(out, "tokenizer.bpe"))
    print(f"tokenizer: {tok.vocab_size} tokens in {time.time() - t0:.1f}s", file=sys.stderr)

    # 2) encode documents in batches and stream them into shards, EOT before every document
    for stale in os.listdir(out):
        if stale.endswith(".bin"):
            os.remove(os.path.join(out, stale))
    buffers = {"train": [], "val": []}
    shards = {"train": [], "val": []}
    counts = {s: dict(docs=0, tokens=0, bytes=0) for s in buffers}

    def flush(split, final=False):
        buf = np.concatenate(buffers[split]) if buffers[split] else np.zeros(0, np.uint32)
        while len(buf) >= shard_tokens or (final and len(buf)):
            path = os.path.join(out, f"{split}_{len(shards[split]):03d}.bin")
            write_shard(path, buf[:shard_tokens], tok.vocab_size, tok.hash)
            shards[split].append(os.path.basename(path))
            buf = buf[shard_tokens:]
        buffers[split] = [buf]

    total_bytes = sum(os.path.getsize(p) for p in files)
    t0, done, batch = time.time(), 0, []

    def encode(batch):
        ids = tok.encode_ordinary_batch([d for _, d in batch])
        for (split, doc), doc_ids in zip(batch, ids):
            buffers[split].append(np.array([tok.eot] + doc_ids, dtype=np.uint32))
            counts[split]["docs"] += 1
            counts[split]["tokens"] += len(doc_ids) + 1
            counts[split]["bytes"] += len(doc.encode("utf-8"))
        for split in buffers:
            if sum(len(b) for b in buffers[split]) >= shard_tokens:
                flush(split)

    for i, doc in enumerate(documents(files)):
        batch.append((split_of(i), doc))
        done += len(doc)
        if len(batch) == 256:
            encode(batch)
            batch = []
            progress("tokenizing", done, total_bytes, t0)
    encode(batch)
    progress("tokenizing", done, total_bytes, t0)
    print(file=sys.stderr)
    if counts["val"]["docs"] == 0:
        raise SystemExit(f"error: no validation documents ({counts['train']['docs']} documents in all, "
                         f"val_fraction={val_fraction}); raise val_fraction or add documents")
    for split in buffers:
        flush(split, final=True)

    meta = dict(dataset=dataset, source=input or dataset, vocab_size=tok.vocab_size, tokenizer="tokenizer.bpe",
                tokenizer_hash=tok.hash, eot=tok.eot, dtype="uint16" if tok.vocab_size <= 2**16 else "uint32",
                python_version=sys.version.split()[0], n_files=len(files),
                file_list_sha256=hashlib.sha256(json.dumps([l[:2] for l in listing]).encode()).hexdigest(),
                fingerprint=fingerprint, **{f"{s}_{k}": v for s in counts for k, v in counts[s].items()},
                train_shards=shards["train"], val_shards=shards["val"])
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)  # written last: its presence means the shards are complete
    print(f"wrote {out}: train {counts['train']['tokens']:,} tokens ({counts['train']['docs']} docs), "
          f"val {counts['val']['tokens']:,} tokens ({counts['val']['docs']} docs), "
          f"{counts['train']['bytes'] / max(counts['train']['tokens'], 1):.2f} bytes/token")
    return out


if __name__ == "__main__":
    configure(globals())
    if input and dataset == "stdlib":  # name the output after the input unless told otherwise
        dataset = os.path.splitext(os.path.basename(os.path.normpath(input)))[0]
    prepare()
