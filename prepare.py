"""
Turn a corpus into tokenized train/val shards that train.py reads.

    python prepare.py                                  # default corpus: this Python's own stdlib sources, no network
    python prepare.py --input=my_texts/ --vocab_size=8192
    python prepare.py --dataset=shakespeare            # downloads (resumable, checksummed, cached)
    python prepare.py --dataset=fineweb-edu            # FineWeb-Edu's 10B-token sample (28.5 GB parquet; pyarrow)
    python prepare.py --dataset=sitepackages           # the sources of SITE_PACKAGES installed here, no network

Writes data/<dataset>/: tokenizer.bpe, train_000.bin ..., val_000.bin ..., meta.json, built in data/<dataset>.tmp and
moved into place only when complete, meta.json last: an error never leaves half of it behind. A rerun on the same
inputs does nothing. Documents, each preceded by the end-of-text token (so sampling from it starts a fresh one): a .py
or .md file; a .txt file, or its parts between lines `<|endoftext|>` (TinyStories'); a .jsonl line's "text" field; a
.parquet row's "text" column (FineWeb's); the same in .gz files; a file without an extension (LICENSE, Apache-2.0)
whose first 4 KB are UTF-8 without NUL bytes. A directory's other files are skipped and named in one line. A corpus
of one document is split at blank lines into paragraphs. Every round(1/val_fraction)-th document goes to val; a corpus
with fewer documents (one file without blank lines, say) holds out its last val_fraction of characters instead, as
nanoGPT holds out the last 10% of a text. The tokenizer is trained on the train split only.
"""
import codecs
import collections
import difflib
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
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
dataset = "stdlib"          # stdlib | sitepackages | shakespeare | tinystories | fineweb-edu | any name (with `input`)
input = ""                  # a corpus file or directory (the docstring says what is read); overrides `dataset`'s source
site_packages = ""          # --dataset=sitepackages: another Python's site-packages (a venv's); "" = this Python's
data_root = "data"
vocab_size = 0              # special tokens included; 0 = the dataset's (DEFAULT_VOCAB), else 4096
tokenizer = ""              # path of an existing tokenizer file to reuse instead of training one
tokenizer_max_bytes = 200_000_000  # train the tokenizer on at most this much of the train split
val_fraction = 0.02         # every round(1/val_fraction)-th document goes to val
shard_tokens = 100_000_000  # tokens per shard file
fineweb_shards = 14         # --dataset=fineweb-edu: use the first N of its 14 parquet files (~0.75B tokens each)
num_proc = 0                # processes that tokenize; 0 = one per core
# -----------------------------------------------------------------------------
RULES = dict(vocab_size=(0, None), tokenizer_max_bytes=(1, None), shard_tokens=(1, None), fineweb_shards=(1, 14),
             num_proc=(0, None))  # val_fraction's (0, 1) excludes its ends: checked in prepare()

# FineWeb-Edu's sample/10BT (HuggingFaceFW/fineweb-edu, ~10B GPT-2 tokens) at a fixed revision, so the bytes never
# change: (file, bytes, sha256) as the Hub's LFS index lists them for that revision.
FINEWEB_EDU = ("https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/"
               "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9/sample/10BT/")
FINEWEB_EDU_FILES = [
    ("000_00000.parquet", 2152819114, "b1ba7b2ce4cb5ea6ef42dca40263eabb85f37700d01693a68e9b30a31d78e871"),
    ("001_00000.parquet", 2152222432, "3fcf2dc69cd52503986276d3d2d26a8c356d0f2ea28a0de4fdbda8cf87755693"),
    ("002_00000.parquet", 2151796315, "547ae182d132c9f06b6ce63149567208ea9f57630bfd9b1a2938e504f0c9ebd7"),
    ("003_00000.parquet", 2152437524, "22184e6eb25759ddd97783751ffc73e1705dfa2542e630dae1f2a8bac8ee6ddb"),
    ("004_00000.parquet", 2152338550, "33557ddd87a07a4ae6fcaf7a4789c7b484e5cc0c273ca12a65b74200e6d8748b"),
    ("005_00000.parquet", 2152189947, "e08d79927ecb377786572cd854817c748ceb8880878b1a0eb91abf8c85d505ea"),
    ("006_00000.parquet", 2152689867, "554fa2613c9261d6c9c396caab881de3160175794c6c3e1856bf28a0e9cb9b76"),
    ("007_00000.parquet", 2150686637, "4b7d1f697d4afff7f5f65cb7aa4d83acc6db716da4d46ea23399d0c50608c6e3"),
    ("008_00000.parquet", 2151274846, "a6d9dcc0c72ecd7c7f0173c2d06b3a4249a2ccaa94961469d1a522ca689bbf1a"),
    ("009_00000.parquet", 2151913277, "f836cd3c70b95776699eb6c356b2dbf702816e25dcf39992f5c80a29029d23c3"),
    ("010_00000.parquet", 2152798864, "e5a2eae25f057f0856a10bfae314c6ca8ea8bb08456d2131e9e89b2b8305e2f6"),
    ("011_00000.parquet", 2152323681, "db71cf0425bb3d1813a09f12ff1acd6dabdfb91a2e4f141960254ee5a7f036e7"),
    ("012_00000.parquet", 2152069689, "08b47a3e1c25161f796d2f8dbf99ccf60affdebdcea4910833d0d5783315551f"),
    ("013_00000.parquet", 540632672, "b393f51fefab26cd6f4c8f65707c1924f6666c4961a0ebebe04bb57f7ec832de"),
]
REMOTE = {  # name -> its files: (url, expected size in bytes or None, sha256 or None = pinned on first download)
    "shakespeare": [("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                     1115394, None)],
    "tinystories": [("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
                     None, None)],
    "fineweb-edu": [(FINEWEB_EDU + name, size, sha) for name, size, sha in FINEWEB_EDU_FILES],
}
# --dataset=sitepackages: the source files (SOURCE) of these packages (import names) wherever installed, in this order
# (by name, so the tokenizer's first 200 MB span many): big, mostly code. Left out: pip and setuptools (their _vendor copies
# repeat other packages), jaxlib (generated MLIR bindings).
SITE_PACKAGES = tuple("""
_pytest accelerate botorch cupy cupyx Cython diffrax equinox flax fontTools gpytorch huggingface_hub hypothesis
imageio jax joblib lightning linear_operator llvmlite matplotlib mesonbuild mpmath narwhals networkx numba numba_cuda
numpy numpyro onnx onnx_ir onnxscript optax orbax pandas peft PIL pyarrow pygments pytorch_lightning rich scipy
seaborn sentence_transformers skimage sklearn statsmodels sympy tensorboard tifffile timm torch torch_geometric
torchaudio torchgen torchmetrics torchvision transformers treescope triton xarray""".split())
DATASETS = ["stdlib", "sitepackages", *REMOTE]  # the names prepare.py can prepare without --input
# fineweb-edu: GPT-2's (config/gpt2_124m.py); sitepackages: a multiple of 64, 2.5% more tokens than 50,257 would give
DEFAULT_VOCAB = {"fineweb-edu": 50257, "sitepackages": 32768}
SOURCE = (".py", ".pyi", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")  # Python, and the C++/CUDA they ship
SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet", ".txt.gz", ".md.gz", ".jsonl.gz")  # what a corpus dir holds

# ---------------------------------------------------------------------------- the shard format
# A shard is a 256-byte header then the raw little-endian token ids. Writer and reader live here, together.
MAGIC, VERSION, HEADER_BYTES = b"SLMSHARD", 1, 256
HEADER = struct.Struct("<8sIIIQ64s")  # magic, version, itemsize, vocab size, token count, tokenizer sha256 (hex)


def shard_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, vocab_size, tokenizer_hash):
    tokens = np.asarray(tokens, dtype=shard_dtype(vocab_size))
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
    if not os.path.isfile(path):  # name the command that makes data_dir: a known dataset's, else a corpus of yours
        name, root = os.path.basename(os.path.normpath(data_dir)), os.path.dirname(os.path.normpath(data_dir))
        flags = f" --data_root={root}" if root != "data" else ""
        hint = (f"run `python prepare.py --dataset={name}{flags}` first" if name in DATASETS else
                f"run `python prepare.py --input=PATH --dataset={name}{flags}` first (PATH: your corpus), or use a "
                f"dataset prepare.py knows: {', '.join(DATASETS)}")
        raise SystemExit(f"error: no prepared data in {data_dir} (missing meta.json); {hint}")
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
    """Sorted list of the files that make up a corpus: the stdlib, one file, or a directory. A directory's files of
    other kinds are skipped and named in one line on stderr."""
    if src == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        return [p for p in walk(root) if p.endswith(".py") and "site-packages" not in p and "dist-packages" not in p]
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise SystemExit(f"error: input {src} does not exist; pass --input=FILE_OR_DIR")
    files, skipped = [], []
    for p in walk(src):
        (files if p.endswith(SUFFIXES) or plain_text_file(src, p) else skipped).append(p)
    if skipped:
        names = ", ".join(os.path.relpath(p, src) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        note = f"skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} of other kinds: {names}"
    if not files:
        raise SystemExit(f"error: {src} has no .txt/.md/.py/.jsonl[.gz] or .parquet files, nor text files without "
                         f"an extension; nothing to prepare" + (f" ({note})" if skipped else ""))
    if skipped:
        print(note, file=sys.stderr)
    return files


def site_packages_files(root):
    """The SOURCE files of SITE_PACKAGES under root (this Python's site-packages when empty), package by package in
    SITE_PACKAGES' order. The absent ones are named in one line on stderr."""
    root = root or sysconfig.get_paths()["purelib"]
    present = [p for p in SITE_PACKAGES if os.path.isdir(os.path.join(root, p))]
    if not present:
        raise SystemExit(f"error: none of SITE_PACKAGES ({', '.join(SITE_PACKAGES[:3])}, ...) is in {root}; point "
                         f"--site_packages at a site-packages that has them (a venv's, say)")
    absent = [p for p in SITE_PACKAGES if p not in present]
    if absent:
        print(f"sitepackages: {len(absent)} of {len(SITE_PACKAGES)} packages not in {root}: {', '.join(absent)}",
              file=sys.stderr)
    return [f for p in present for f in walk(os.path.join(root, p)) if f.endswith(SOURCE)]


def walk(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def plain_text_file(root, path, probe=4096):
    """A file without an extension (LICENSE, GPL-2; a version number such as Apache-2.0's is no extension) whose
    first `probe` bytes are UTF-8 without NUL bytes. Hidden files and folders (.git's HEAD) are not corpus."""
    rel = os.path.relpath(path, root)
    if any(c.isalpha() for c in os.path.splitext(path)[1]) or any(p.startswith(".") for p in rel.split(os.sep)):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(probe)
        codecs.getincrementaldecoder("utf-8")().decode(head)  # not final: a character cut at `probe` is fine
    except (OSError, UnicodeDecodeError):  # unreadable counts as not text: skipped, and named as such
        return False
    return b"\0" not in head


def parquet_module():
    try:
        import pyarrow.parquet  # optional: only parquet corpora (FineWeb) need it
    except ImportError:
        raise SystemExit("error: reading .parquet files (fineweb-edu) needs pyarrow; `pip install pyarrow`") from None
    return pyarrow.parquet


def parquet_texts(path):
    """Yield (document, fraction of the file's rows read) for each non-blank "text" of a parquet file."""
    pq = parquet_module()
    try:
        f = pq.ParquetFile(path)
        if "text" not in f.schema_arrow.names:
            raise SystemExit(f'error: {path} has no "text" column (columns: {", ".join(f.schema_arrow.names)})')
        n, rows = max(f.metadata.num_rows, 1), 0
        for batch in f.iter_batches(batch_size=1024, columns=["text"]):
            rows += batch.num_rows
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text, rows / n
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
        raise SystemExit(f"error: cannot read {path} as parquet ({type(e).__name__}: {e})") from None


def read_documents(files, strict=True, info=None):
    """Yield documents (str). Non-UTF-8 files are an error, or skipped when strict=False (the stdlib has a
    few deliberately mis-encoded test files). info: a dict whose "bytes" follows how much of the files is read."""
    done, info = 0, {} if info is None else info
    for path in files:
        size = os.path.getsize(path)
        if path.endswith(".parquet"):
            for doc, frac in parquet_texts(path):
                info["bytes"] = done + frac * size
                yield doc
            done += size
            continue
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            if not strict:
                continue
            raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}); convert it, e.g. "
                             f"`iconv -f latin1 -t utf-8`")
        except (OSError, EOFError) as e:
            raise SystemExit(f"error: cannot read {path}: {e}")
        done += size
        info["bytes"] = done
        if path.endswith((".jsonl", ".jsonl.gz")):
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f'error: {path}:{lineno} is not a JSON object with a "text" field')
                if not isinstance(doc, str):
                    raise SystemExit(f'error: {path}:{lineno}: "text" is {type(doc).__name__} {doc!r}, not a string; '
                                     f'every line must be a JSON object with a "text" string')
                yield doc
        elif path.endswith((".txt", ".txt.gz")) and "\n<|endoftext|>\n" in text:
            yield from (d.strip("\n") for d in text.split("\n<|endoftext|>\n") if d.strip())
        elif text.strip():
            yield text


def split_of(i, val_fraction):
    """Deterministic, streamable train/val split by document index: evenly spaced val documents."""
    return "val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"


def split_documents(files, info, *, val_fraction, strict):
    """Yield (split, document): by document index (split_of), or, for a corpus with fewer documents than the first
    val index, every document to train but the tail: its last val_fraction of characters, one val document.
    Sets info["val_split"] to "documents" or "tail". strict: as read_documents'."""
    docs = read_documents(files, strict, info)
    first = next(docs, None)
    if first is None:
        raise SystemExit("error: the corpus is empty (no non-blank documents); check --input")
    second = next(docs, None)  # one document: split it at blank lines so val can be held out by document
    docs = (d for d in first.split("\n\n") if d.strip()) if second is None else itertools.chain([first, second], docs)
    first_val = next(i for i in itertools.count() if split_of(i, val_fraction) == "val")
    head = list(itertools.islice(docs, first_val + 1))
    if len(head) > first_val:
        info["val_split"] = "documents"
        yield from ((split_of(i, val_fraction), d) for i, d in enumerate(itertools.chain(head, docs)))
        return
    info["val_split"] = "tail"
    total = sum(map(len, head))
    if total < 2:
        raise SystemExit(f"error: the corpus has {total} character(s), too few to hold out a validation split")
    cut, pos = total - min(max(1, round(total * val_fraction)), total - 1), 0  # characters before `cut`: train
    for d in head:
        if pos + len(d) <= cut:
            yield "train", d
        elif pos >= cut:
            yield "val", d
        else:
            yield "train", d[:cut - pos]
            yield "val", d[cut - pos:]
        pos += len(d)

# ---------------------------------------------------------------------------- downloads


def download(url, dest, size=None, sha256=None):
    """Fetch url to dest, resuming a partial download (HTTP Range) and verifying size and sha256.
    Without a known sha256 the first download's hash is pinned in dest.sha256 and checked on later runs."""
    pin = dest + ".sha256"
    if sha256 is None and os.path.exists(pin):
        sha256 = open(pin).read().strip()
    offline = f"no network? Fetch it yourself to {dest} (it is checked all the same)"
    if not os.path.exists(dest):
        part = dest + ".part"
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            resp = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:
                raise SystemExit(f"error: cannot download {url} ({e}); {offline}") from None
            resp = None  # 416, range not satisfiable: the partial file is already whole (killed before its rename)
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: cannot download {url} ({e}); {offline}") from None
        if resp is not None:
            if getattr(resp, "status", None) != 206:
                have = 0  # the server ignored the Range request: start over
            total = have + int(resp.headers.get("Content-Length") or 0)
            t0, done, label = time.time(), have, f"downloading {os.path.basename(dest)}"
            try:
                with resp, open(part, "ab" if have else "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        progress(label, done - have, t0, done / total if total else None, have / max(total, 1))
            except OSError as e:  # the connection dropped (or the disk filled) mid-way: the .part file stays
                raise SystemExit(f"error: download of {url} interrupted ({e}); run again to resume it") from None
            progress(label, done - have, t0, 1.0 if total else None, have / max(total, 1), final=True)
        os.replace(part, dest)
    if size is not None and os.path.getsize(dest) != size:
        got = os.path.getsize(dest)
        os.remove(dest)
        raise SystemExit(f"error: {dest} has {got} bytes, expected {size}; removed it, run again to re-download")
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


def progress(label, amount, t0, frac=None, frac0=0.0, final=False):
    """A progress line: `amount` bytes processed since t0 and their rate; with frac (the fraction of the job done
    now, frac0 of it at t0) the percentage and the ETA."""
    dt = max(time.time() - t0, 1e-9)
    line = f"{label}: {amount / 1e6:,.1f} MB | {amount / 1e6 / dt:.1f} MB/s"
    if frac is not None and frac > frac0:
        line += f" | {100 * frac:.1f}% | ETA {dt * (1 - frac) / (frac - frac0):.0f}s"
    bpe.status(line, final)

# ---------------------------------------------------------------------------- tokenizing, in parallel
# tiktoken's batch encoder runs threads that release the GIL only inside the Rust encoder; the rest (making Python
# lists of ids, numpy arrays) holds it. Processes, each encoding whole batches, scale with the cores instead.
_worker = {}  # this process's tokenizer


def _init_worker(tok_path):
    _worker["tok"] = bpe.Tokenizer.load(tok_path)


def encode_job(pairs):
    """Worker: a batch of (split, document) -> {split: (ids with EOT before every document, documents, UTF-8 bytes)}."""
    tok = _worker["tok"]
    ids = tok.encode_ordinary_batch([d for _, d in pairs], num_threads=1)
    out = {}
    for split in ("train", "val"):
        picked = [i for i, (s, _) in enumerate(pairs) if s == split]
        if not picked:
            continue
        arr = np.empty(sum(len(ids[i]) + 1 for i in picked), shard_dtype(tok.vocab_size))
        pos = 0
        for i in picked:
            arr[pos] = tok.eot
            arr[pos + 1:pos + 1 + len(ids[i])] = ids[i]
            pos += len(ids[i]) + 1
        out[split] = (arr, len(picked), sum(len(pairs[i][1].encode("utf-8")) for i in picked))
    return out


def encoded_batches(pairs, tok, tok_path, procs, batch_chars=1 << 22):
    """encode_job's results for consecutive batches of ~batch_chars characters of `pairs`, in order, encoded by
    `procs` processes; at most 2 batches per process are in flight, so memory stays bounded on any corpus."""
    jobs = bpe.batches(pairs, batch_chars, length=lambda pair: len(pair[1]))
    head = list(itertools.islice(jobs, 2))
    if procs <= 1 or len(head) < 2:  # a single batch: starting processes would cost more than it saves
        _worker["tok"] = tok
        yield from map(encode_job, itertools.chain(head, jobs))
        return
    with multiprocessing.Pool(procs, initializer=_init_worker, initargs=(tok_path,)) as pool:
        pending = collections.deque()
        for job in itertools.chain(head, jobs):
            pending.append(pool.apply_async(encode_job, (job,)))
            if len(pending) >= 2 * procs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

# ---------------------------------------------------------------------------- the job


def source_files(*, input, dataset, data_root, fineweb_shards, site_packages=""):
    """The corpus's files: the input's, the installed sources', or a known dataset's, downloaded into data_root."""
    if input:
        return corpus_files(input)
    if dataset in ("stdlib", "sitepackages"):
        return corpus_files("stdlib") if dataset == "stdlib" else site_packages_files(site_packages)
    if dataset not in REMOTE:
        close = difflib.get_close_matches(dataset, DATASETS, n=1, cutoff=0.6)
        hint = f"did you mean --dataset={close[0]}? " if close else ""
        raise SystemExit(f"error: unknown dataset '{dataset}'; {hint}prepare.py knows {', '.join(DATASETS)}; for a "
                         f"corpus of your own pass --input=PATH (then --dataset names its output)")
    entries = REMOTE[dataset]
    if dataset == "fineweb-edu":
        parquet_module()  # before downloading 28 GB that could not be read
        entries = entries[:fineweb_shards]
    os.makedirs(os.path.join(data_root, "downloads"), exist_ok=True)
    return [download(url, os.path.join(data_root, "downloads", os.path.basename(url)), size, sha)
            for url, size, sha in entries]


def train_tokenizer(pairs, vocab, max_bytes):
    """A BPE tokenizer trained on (a bounded prefix of) the train split only, so val stays held out.
    pairs: split_documents' (split, document)."""
    def train_texts():
        seen = 0
        for split, doc in pairs:
            if seen >= max_bytes:
                return  # stop reading: a 10B-token corpus needs only its first 200 MB for this
            if split == "train":
                seen += len(doc)
                yield doc
    return bpe.train(train_texts(), vocab, verbose=True)


def write_shards(files, tok, tok_path, out, *, val_fraction, strict, shard_tokens, num_proc):
    """Encode every document, EOT first, and stream the ids into out/{train,val}_NNN.bin; split_documents' options.
    Returns (shard names per split, counts per split, how val was split)."""
    if shard_tokens < 1:  # every shard written must take tokens out of the buffer, or flush() never ends
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    buffers, pending, shards = {"train": [], "val": []}, {"train": 0, "val": 0}, {"train": [], "val": []}
    counts = {s: dict(docs=0, tokens=0, bytes=0) for s in buffers}

    def flush(split, final=False):
        buf = np.concatenate(buffers[split]) if buffers[split] else np.zeros(0, np.uint32)
        while len(buf) and (len(buf) >= shard_tokens or final):  # each pass writes 1 to shard_tokens tokens
            path = os.path.join(out, f"{split}_{len(shards[split]):03d}.bin")
            write_shard(path, buf[:shard_tokens], tok.vocab_size, tok.hash)
            shards[split].append(os.path.basename(path))
            buf = buf[shard_tokens:]
        buffers[split], pending[split] = [buf], len(buf)

    info, t0, text_bytes = {"bytes": 0}, time.time(), 0
    total = max(sum(os.path.getsize(p) for p in files), 1)
    procs = num_proc or bpe.usable_cores()
    label = f"tokenizing ({procs} process{'es' if procs > 1 else ''})"
    pairs = split_documents(files, info, val_fraction=val_fraction, strict=strict)
    for result in encoded_batches(pairs, tok, tok_path, procs):
        for split, (ids, n_docs, n_bytes) in result.items():
            buffers[split].append(ids)
            pending[split] += len(ids)
            for key, n in (("docs", n_docs), ("tokens", len(ids)), ("bytes", n_bytes)):
                counts[split][key] += n
            text_bytes += n_bytes
            if pending[split] >= shard_tokens:
                flush(split)
        progress(label, text_bytes, t0, info["bytes"] / total)
    progress(label, text_bytes, t0, 1.0, final=True)
    for split in buffers:
        flush(split, final=True)
    return shards, counts, info["val_split"]


def check_settings(*, dataset, data_root, tokenizer, val_fraction):
    """The settings RULES cannot check, each a one-line error naming the fix."""
    if not 0 < val_fraction < 1:
        raise SystemExit(f"error: val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if dataset in ("", ".", "..") or any(sep and sep in dataset for sep in (os.sep, os.altsep)):
        raise SystemExit(f"error: --dataset={dataset!r} is not a plain name; the output goes to data_root/<dataset>, "
                         f"so give a name without path separators (e.g. --dataset=mydata) and the place as --data_root")
    if os.path.exists(data_root) and not os.path.isdir(data_root):
        raise SystemExit(f"error: --data_root={data_root} is a file, not a directory; give a directory (made if "
                         f"needed)")
    if tokenizer and not os.path.isfile(tokenizer):
        raise SystemExit(f"error: --tokenizer={tokenizer} does not exist; give a tokenizer file (python bpe.py "
                         f"--out=FILE makes one) or leave --tokenizer empty to train one")


def prepare():
    check_settings(dataset=dataset, data_root=data_root, tokenizer=tokenizer, val_fraction=val_fraction)
    files = source_files(input=input, dataset=dataset, data_root=data_root, fineweb_shards=fineweb_shards,
                         site_packages=site_packages)
    strict = bool(input) or dataset not in ("stdlib", "sitepackages")  # installed test files may be mis-encoded
    out = os.path.join(data_root, dataset)
    vocab = vocab_size or DEFAULT_VOCAB.get(dataset, 4096)
    # The fingerprint covers the file list (names, sizes, mtimes) and every setting that changes the output.
    listing = [(os.path.relpath(p, os.path.dirname(files[0])), os.path.getsize(p), os.stat(p).st_mtime_ns)
               for p in files]
    settings = dict(vocab_size=vocab, tokenizer=tokenizer and file_sha256(tokenizer),
                    val_fraction=val_fraction, shard_tokens=shard_tokens, tokenizer_max_bytes=tokenizer_max_bytes)
    fingerprint = hashlib.sha256(json.dumps([listing, settings]).encode()).hexdigest()
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == fingerprint:
        print(f"{out} is up to date (same inputs and settings); nothing to do")
        return out

    tmp = out + ".tmp"  # everything is built here; on any error it goes, and `out` is left as it was
    shutil.rmtree(tmp, ignore_errors=True)  # (left behind by a run that was killed)
    try:
        os.makedirs(tmp)
        t0 = time.time()
        if tokenizer:
            tok = bpe.Tokenizer.load(tokenizer)
        else:
            print(f"training a {vocab}-token BPE tokenizer on {len(files)} files ...", file=sys.stderr)
            pairs = split_documents(files, {}, val_fraction=val_fraction, strict=strict)
            tok = train_tokenizer(pairs, vocab, tokenizer_max_bytes)
        tok_path = os.path.join(tmp, "tokenizer.bpe")
        tok.save(tok_path)
        print(f"tokenizer: {tok.vocab_size} tokens in {time.time() - t0:.1f}s", file=sys.stderr)
        shards, counts, val_split = write_shards(files, tok, tok_path, tmp, val_fraction=val_fraction, strict=strict,
                                                 shard_tokens=shard_tokens, num_proc=num_proc)
        meta = dict(dataset=dataset, source=input or dataset, vocab_size=tok.vocab_size, tokenizer="tokenizer.bpe",
                    tokenizer_hash=tok.hash, eot=tok.eot, dtype=np.dtype(shard_dtype(tok.vocab_size)).name,
                    python_version=sys.version.split()[0], n_files=len(files), val_split=val_split,
                    file_list_sha256=hashlib.sha256(json.dumps([l[:2] for l in listing]).encode()).hexdigest(),
                    fingerprint=fingerprint, **{f"{s}_{k}": v for s in counts for k, v in counts[s].items()},
                    train_shards=shards["train"], val_shards=shards["val"])
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        publish(tmp, out)
    except BaseException as e:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a read-only data_root, a full disk
            raise SystemExit(f"error: cannot write {e.filename or tmp} ({e.strerror or e}); give a --data_root you "
                             f"can write to, with room for the shards") from None
        raise
    print(f"wrote {out}: train {counts['train']['tokens']:,} tokens ({counts['train']['docs']} docs), "
          f"val {counts['val']['tokens']:,} tokens ({counts['val']['docs']} docs, by {val_split}), "
          f"{counts['train']['bytes'] / max(counts['train']['tokens'], 1):.2f} bytes/token")
    return out


def publish(tmp, out):
    """Move a finished build from tmp into out. out may hold other files (rlhf.py's task data sits next to its
    shards), so only prepare.py's own files are replaced: the old meta.json goes first and the new one comes last,
    so at every moment out is either complete or has no meta.json (which readers take as "not prepared")."""
    os.makedirs(out, exist_ok=True)
    old = [f for f in os.listdir(out) if f.endswith(".bin") and f.startswith(("train_", "val_"))]
    for f in ["meta.json", "tokenizer.bpe"] + old:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    for f in sorted(os.listdir(tmp), key=lambda f: f == "meta.json"):
        os.replace(os.path.join(tmp, f), os.path.join(out, f))
    os.rmdir(tmp)


if __name__ == "__main__":
    configure(globals())
    if input and dataset == "stdlib":  # name the output after the input unless told otherwise
        dataset = os.path.splitext(os.path.basename(os.path.normpath(input)))[0]
    prepare()
