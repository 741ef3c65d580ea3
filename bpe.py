"""
Byte-level BPE: train a tokenizer on a corpus, save/load it, encode/decode text.

Training is the classic algorithm (as in minbpe), made fast the way the Rust trainers do it:
  1. split every document with the regex pattern (in parallel processes) and count each distinct
     chunk once: ~30 MB of Python source is only ~120k distinct chunks;
  2. repeatedly merge the most frequent adjacent pair of tokens, updating pair counts incrementally:
     an index pair -> chunks that contain it says which chunks to rewrite, and a heap with lazy
     invalidation finds the most frequent pair without re-counting everything.
Tie-break: among equally frequent pairs the one with the smallest (left id, right id) wins, so the same
corpus and settings give the same tokenizer file, byte for byte, on any machine.

Encoding goes through a `tiktoken.Encoding` built from the learned ranks (same Rust core as GPT-4's
tokenizer); `encode_reference` is the textbook merge loop in pure Python, for reading and for tests.
Every str round-trips (decode(encode(s)) == s) except one with lone surrogates, which has no UTF-8 bytes:
that raises ValueError (tiktoken alone would silently turn it into U+FFFD).

File format (human-readable, like tiktoken's own files): one JSON header line (format, version, pattern,
special tokens, number of ranks), then one line per token: `<base64 of its bytes> <rank>`.

Run:  python bpe.py --input=PATH --vocab_size=32000 --out=tok.bpe
      (PATH: a text file, or a directory whose .txt/.md/.py files are one document each; empty: the Python
      standard library sources. prepare.py trains its tokenizers itself, from every corpus format it reads.)
"""
import base64
import contextlib
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import sys
import sysconfig
import time
from collections import Counter, defaultdict

import regex
import tiktoken

# The split patterns: text is first cut into chunks (words, numbers, punctuation runs, whitespace) and
# merges never cross a chunk boundary. GPT-2's original and GPT-4's (cl100k), which also caps digit runs
# at 3 and keeps newlines out of word chunks.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
FORMAT = "scratchlm-bpe"
VERSION = 1

# -----------------------------------------------------------------------------
# config for the command line (python bpe.py --key=value)
input = ""  # a text file or a directory of .txt/.md/.py files; "" = the stdlib sources
vocab_size = 32000  # includes the 256 byte tokens and the special tokens
pattern = "gpt4"  # "gpt4", "gpt2", or a regex of your own
out = "tok.bpe"
holdout = 0.05  # fraction of files (the last ones) kept out of training to measure bytes/token
# -----------------------------------------------------------------------------
RULES = dict(vocab_size=(256 + len(SPECIAL_TOKENS), None), holdout=(0.0, 1.0))


def check_utf8(text):
    """Lone surrogates (e.g. from surrogateescape decoding) have no UTF-8 bytes: refuse them clearly."""
    if not text.isascii():  # O(1) in CPython: plain ASCII text costs nothing
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text has a lone surrogate {text[e.start]!r} at index {e.start}, which is not "
                             "valid Unicode and cannot be UTF-8 encoded; clean it first, e.g. "
                             "text.encode('utf-8', 'replace').decode('utf-8')") from None


class Tokenizer:
    """ranks: {token bytes: id}, lower id = merged earlier; special_tokens: {str: id}. Encoding is tiktoken's."""

    def __init__(self, ranks, pattern, special_tokens):
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError("ranks must contain all 256 single bytes, or some text could not be encoded")
        ids = list(ranks.values()) + list(special_tokens.values())
        if len(set(ids)) != len(ids):
            raise ValueError("token ids must be unique across ranks and special tokens")
        self.ranks, self.pattern, self.special_tokens = ranks, pattern, dict(special_tokens)
        self.vocab_size = max(ids) + 1
        self.eot = self.special_tokens.get("<|endoftext|>")
        self.hash = hashlib.sha256(self._serialize().encode("utf-8")).hexdigest()
        try:
            self.enc = tiktoken.Encoding(f"scratchlm-{self.hash[:16]}", pat_str=pattern,
                                         mergeable_ranks=ranks, special_tokens=self.special_tokens)
        except Exception as e:  # tiktoken's Rust regex engine rejected the pattern
            raise ValueError(f"tiktoken cannot use the pattern {pattern!r}: {e}") from None

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        check_utf8(text)
        return self.enc.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def encode_ordinary(self, text):
        check_utf8(text)
        return self.enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts, num_threads=8):
        texts = list(texts)  # (a generator would be used up by the check)
        for text in texts:
            check_utf8(text)
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_batch(self, texts, num_threads=8, allowed_special=frozenset(), disallowed_special="all"):
        texts = list(texts)
        for text in texts:
            check_utf8(text)
        return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special=allowed_special,
                                     disallowed_special=disallowed_special)

    def decode(self, ids, errors="strict"):
        return self.enc.decode(ids, errors=errors)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def _serialize(self):
        header = dict(format=FORMAT, version=VERSION, pattern=self.pattern,
                      special_tokens=dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
                      n_ranks=len(self.ranks))
        lines = [json.dumps(header)]
        lines += [f"{base64.b64encode(tok).decode('ascii')} {rank}"
                  for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        return "\n".join(lines) + "\n"

    def save(self, path):
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(self._serialize())
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path):
        fix = f"retrain it (python bpe.py --out={path}, or rerun prepare.py for a data set) or restore a good copy"
        try:
            with open(path, encoding="utf-8", newline="") as f:
                content = f.read()
        except FileNotFoundError:
            raise SystemExit(f"error: tokenizer file {path} does not exist; train one with "
                             f"`python bpe.py --out={path}`") from None
        except UnicodeDecodeError:
            raise SystemExit(f"error: tokenizer file {path} is corrupt: it is not UTF-8 text; {fix}") from None
        except OSError as e:
            raise SystemExit(f"error: cannot read tokenizer file {path} ({e})") from None
        try:
            if not content.endswith("\n"):
                raise ValueError("it does not end with a newline (truncated?)")
            header_line, *lines = content[:-1].split("\n")
            header = json.loads(header_line)
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise ValueError(f"its header is not {FORMAT} version {VERSION}")
            if len(lines) != header["n_ranks"]:
                raise ValueError(f"header says {header['n_ranks']} tokens, file has {len(lines)} (truncated?)")
            items = [line.split(" ") for line in lines]
            ranks = {base64.b64decode(b64, validate=True): int(rank) for b64, rank in items}
            in_file = [int(rank) for _, rank in items]
            if len(ranks) != len(items) or in_file != sorted(set(in_file)):
                raise ValueError("its tokens or ranks are repeated or out of order")
            tok = cls(ranks, header["pattern"], header["special_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # (binascii and JSON errors are ValueErrors)
            raise SystemExit(f"error: tokenizer file {path} is corrupt: {e}; {fix}") from None
        return tok


# -----------------------------------------------------------------------------
# progress lines, for training here and for prepare.py's downloads and tokenizing
STATUS_EVERY = 5.0  # seconds between progress lines when stderr is a log file rather than a terminal
_status_last = [0.0]  # when the last such line was printed


def status(text, final=False):
    """A progress line on stderr. On a terminal, one line rewritten in place (carriage return); in a log file
    (CI, nohup, a pipe) a plain line every STATUS_EVERY seconds and the final one, not thousands of \r updates."""
    if sys.stderr.isatty():
        print(f"\r{text}   ", end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or time.time() - _status_last[0] >= STATUS_EVERY:
        print(text, file=sys.stderr, flush=True)
        _status_last[0] = 0.0 if final else time.time()  # after a final line the next job's first line shows at once


# -----------------------------------------------------------------------------
# training


def _count_chunks(job):
    """Worker: split a batch of documents into chunks and count each distinct chunk."""
    pattern, special_pattern, docs = job
    split = regex.compile(pattern).findall  # regex caches compiled patterns, so this is cheap per batch
    counts, n_chars = Counter(), 0
    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"train() wants str documents, got {type(doc).__name__}; decode bytes first")
        check_utf8(doc)
        # special tokens are never learned from: cut them out of the training text
        for piece in (regex.split(special_pattern, doc) if special_pattern else (doc,)):
            counts.update(split(piece))
            n_chars += len(piece)
    return counts, n_chars


def batches(items, chars_per_batch, length=len):
    """Consecutive lists of items holding ~chars_per_batch characters each (length: an item's); prepare.py's too."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += length(item)
        if size >= chars_per_batch:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def usable_cores():
    """The cores this process may run on (a container's or taskset's share, not the machine's); prepare.py's too."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def count_chunks(texts, pattern, special_tokens, chars_per_batch=1 << 20):
    """{chunk bytes: count} over all documents; batches of ~1M characters are split in parallel processes."""
    special_pattern = "|".join(regex.escape(s) for s in special_tokens)
    jobs = ((pattern, special_pattern, batch) for batch in batches(texts, chars_per_batch))
    head = list(itertools.islice(jobs, 2))
    jobs = itertools.chain(head, jobs)
    n_procs = usable_cores()
    counts, n_chars = Counter(), 0
    parallel = len(head) > 1 and n_procs > 1  # for one batch, starting processes costs more than it saves
    with multiprocessing.Pool(n_procs) if parallel else contextlib.nullcontext() as pool:
        for c, n in (pool.imap_unordered if parallel else map)(_count_chunks, jobs):
            counts.update(c)
            n_chars += n
    if sum(len(chunk) * n for chunk, n in counts.items()) != n_chars:
        raise SystemExit(f"error: the pattern {pattern!r} does not match every character of the text, so "
                         "some text would be lost; add a catch-all alternative such as |\\s+|.")
    return {chunk.encode("utf-8"): n for chunk, n in counts.items()}


def train(texts, vocab_size, pattern=GPT4_PATTERN, special_tokens=SPECIAL_TOKENS, verbose=False):
    """Learn a byte-level BPE with exactly `vocab_size` ids: 256 bytes + merges + special tokens (last)."""
    special_tokens = list(special_tokens)
    n_ranks = vocab_size - len(special_tokens)
    check_train_args(texts, vocab_size, pattern, special_tokens)
    t0 = time.time()
    words, freqs = chunk_words(texts, pattern, special_tokens)
    if verbose:
        print(f"split the corpus into {len(words):,} distinct chunks in {time.time() - t0:.1f}s", file=sys.stderr)
    pair_counts, where = count_pairs(words, freqs)
    # heap of (-count, pair): the top is the most frequent pair, smallest ids first on ties. A pair's count
    # only goes down once it exists, so an entry may be stale (too high): it is fixed when it surfaces.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {tok: i for i, tok in enumerate(vocab)}  # bytes -> id (the rank is the id)
    t1, last_print, n_merges = time.time(), 0.0, n_ranks - 256
    while len(ranks) < n_ranks:
        if not heap:
            raise SystemExit(f"error: the corpus has no pairs left to merge after {len(ranks)} tokens, so it "
                             f"cannot fill vocab_size={vocab_size}; use more text or a vocab_size of at most "
                             f"{len(ranks) + len(special_tokens)}")
        neg, pair = heapq.heappop(heap)
        n = pair_counts[pair]
        if n != -neg:  # stale entry: put it back with its true count
            if n > 0:
                heapq.heappush(heap, (-n, pair))
            continue
        new_bytes = vocab[ord(pair[0])] + vocab[ord(pair[1])]
        # Two different pairs can spell the same bytes ("ab"+"c", "a"+"bc"): reuse the existing token then,
        # since a tiktoken vocabulary maps each byte string to one rank (HF tokenizers does the same).
        if new_bytes not in ranks:
            ranks[new_bytes] = len(vocab)
            vocab.append(new_bytes)
        for p in merge(pair, chr(ranks[new_bytes]), words, freqs, pair_counts, where):
            heapq.heappush(heap, (-pair_counts[p], p))  # the pairs with the new token enter with their full count
        if verbose and (time.time() - last_print > 0.5 or len(ranks) == n_ranks):
            last_print, done = time.time(), len(ranks) - 256
            rate = done / (last_print - t1 + 1e-9)
            eta = (n_merges - done) / (rate + 1e-9)
            status(f"merges {done:,}/{n_merges:,} | {rate:,.0f} merges/s | ETA {eta:.0f}s", final=len(ranks) == n_ranks)
    if verbose:
        print(f"trained {vocab_size:,} tokens in {time.time() - t0:.1f}s", file=sys.stderr)
    specials = {s: n_ranks + i for i, s in enumerate(special_tokens)}
    return Tokenizer(ranks, pattern, specials)


def check_train_args(texts, vocab_size, pattern, special_tokens):
    """train()'s arguments, checked before the long part."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("train() wants an iterable of documents, not one string: wrap it in a list")
    if vocab_size - len(special_tokens) < 256:
        raise SystemExit(f"error: vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and "
                         f"{len(special_tokens)} special tokens, so use at least {256 + len(special_tokens)}")
    if len(set(special_tokens)) != len(special_tokens):
        raise SystemExit(f"error: special tokens {special_tokens} contain duplicates; list each once")
    try:  # the training splits with `regex`, encoding with tiktoken: both must take the pattern
        regex.compile(pattern)
        tiktoken.Encoding("check", pat_str=pattern, mergeable_ranks={bytes([0]): 0}, special_tokens={})
    except Exception as e:
        raise SystemExit(f"error: bad pattern {pattern!r} ({e}); fix the regex or use a built-in one (gpt4, gpt2)") from None


def chunk_words(texts, pattern, special_tokens):
    """(words, freqs): the distinct chunks of 2+ bytes (only they can hold a pair), sorted, and their counts.
    Each chunk becomes a str whose characters are token ids (chr(id); bytes decode to latin-1 as chr(byte)).
    Then a merge is word.replace(pair, chr(new_id)), which runs in C and follows BPE's rule exactly (left to
    right, non-overlapping), a pair is a 2-char str, and comparing pairs as strs compares (left id, right id)."""
    chunks = sorted(count_chunks(texts, pattern, special_tokens).items())  # sorted: deterministic order
    words = [chunk.decode("latin-1") for chunk, _ in chunks if len(chunk) > 1]
    freqs = [n for chunk, n in chunks if len(chunk) > 1]
    return words, freqs


def count_pairs(words, freqs):
    """(pair -> occurrences in the corpus, pair -> indices of words that contain it (may be stale or repeated))."""
    pair_counts = defaultdict(int)
    where = defaultdict(list)
    for w, word in enumerate(words):
        f = freqs[w]
        for i in range(len(word) - 1):
            pair = word[i:i + 2]
            pair_counts[pair] += f
            where[pair].append(w)
    return pair_counts, where


def merge(pair, t, words, freqs, pair_counts, where):
    """Replace pair by the token t in every word that holds it, updating pair_counts and where in place.
    Returns the pairs with t whose counts changed (they go on the heap)."""
    touched = set()
    for w in where.pop(pair):
        word = words[w]
        if pair not in word:
            continue  # stale index entry: this word was already rewritten
        new = words[w] = word.replace(pair, t)
        f = freqs[w]
        if len(new) == len(word) - 1:  # fast path, most words: one occurrence, only its neighbours change
            i = word.find(pair)
            pair_counts[pair] -= f
            new_pairs = []
            if i > 0:
                pair_counts[word[i - 1:i + 1]] -= f
                new_pairs.append(new[i - 1:i + 1])
            if i + 2 < len(word):
                pair_counts[word[i + 1:i + 3]] -= f
                new_pairs.append(new[i:i + 2])
        else:  # general case: the counts change by (pairs of new word) - (pairs of old word)
            for i in range(len(word) - 1):
                pair_counts[word[i:i + 2]] -= f
            new_pairs = [new[i:i + 2] for i in range(len(new) - 1)]
        for p in new_pairs:
            pair_counts[p] += f
            if t in p:
                where[p].append(w)
                touched.add(p)
    return touched


# ---------------------------------------------------------------------------- the chat template
# The chat template: a conversation is rendered as
#     <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|user|>...
# The leading <|endoftext|> starts a fresh document, as every pretraining document does. Contents are encoded
# as ordinary text, so a user who types "<|end|>" gets those characters, never the control token.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def encode_chat(tok, messages, add_generation_prompt=False):
    """messages [{"role": "system"|"user"|"assistant", "content": str}] -> (ids, mask). mask is True exactly on
    the tokens SFT learns: each assistant content and its closing <|end|>. add_generation_prompt appends
    <|assistant|>, where the model takes over."""
    missing = [s for s in CHAT_TOKENS + ("<|endoftext|>",) if s not in tok.special_tokens]
    if missing:
        raise SystemExit(f"error: the tokenizer lacks the chat tokens {' '.join(missing)}; re-run prepare.py, "
                         f"whose bpe.py tokenizers have them (see the note under sample.chat_loop for an old tokenizer)")
    sp = tok.special_tokens
    ids, mask = [sp["<|endoftext|>"]], [False]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise SystemExit(f"error: a chat message must be {{'role': system|user|assistant, 'content': str}}, "
                             f"got {str(m)[:80]}")
        body = tok.encode_ordinary(m["content"]) + [sp["<|end|>"]]
        ids += [sp[f"<|{m['role']}|>"]] + body
        mask += [False] + [m["role"] == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        mask.append(False)
    return ids, mask



def encode_reference(tok, text):
    """The textbook BPE encoder, in pure Python: gives the same ids as tok.enc (tiktoken), only slower."""
    check_utf8(text)
    ids = []
    for chunk in regex.findall(tok.pattern, text):
        chunk = chunk.encode("utf-8")
        if chunk in tok.ranks:  # a whole chunk that is a token is taken as is (tiktoken does the same)
            ids.append(tok.ranks[chunk])
            continue
        parts = [bytes([b]) for b in chunk]
        while True:
            # merge the adjacent pair whose concatenation is the token of lowest rank, leftmost on ties
            candidates = [(tok.ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in tok.ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(tok.ranks[p] for p in parts)
    return ids


# -----------------------------------------------------------------------------
# the command line


def cli_documents(path):
    """The command line's corpus: the one text file given, or each .txt/.md/.py file of a directory as a document;
    "" = the standard library's .py files (minus site-packages, whose few mis-encoded test files are skipped)."""
    if not path:
        root = sysconfig.get_paths()["stdlib"]
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.endswith(".py") and "site-packages" not in d and "dist-packages" not in d)
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith((".txt", ".md", ".py")))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise SystemExit(f"error: input {path} does not exist; pass --input=FILE_OR_DIR")
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                docs.append(fh.read())
        except UnicodeDecodeError:
            if path:
                raise SystemExit(f"error: {f} is not UTF-8 text; convert it, e.g. `iconv -f latin1 -t utf-8`")
    if not any(d.strip() for d in docs):
        raise SystemExit(f"error: {path or 'the stdlib'} has no .txt/.md/.py text to train on; check --input")
    return docs


if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    if os.path.isdir(out):  # both known before the training, rather than after it
        raise SystemExit(f"error: --out={out} is a directory; give the file to write, e.g. "
                         f"--out={os.path.join(out, 'tok.bpe')}")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise SystemExit(f"error: --out={out}: directory {os.path.dirname(out)} does not exist; make it first "
                         f"(mkdir -p {os.path.dirname(out)}) or write elsewhere")
    docs = cli_documents(input)
    n_held = min(int(len(docs) * holdout), len(docs) - 1)  # holdout=1.0 still leaves one document to train on
    train_docs, held = docs[:len(docs) - n_held], docs[len(docs) - n_held:]
    pat = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}.get(pattern, pattern)
    t0 = time.time()
    tok = train(train_docs, vocab_size, pattern=pat, verbose=True)
    seconds = time.time() - t0
    try:
        tok.save(out)
    except OSError as e:
        raise SystemExit(f"error: cannot write {out} ({e.strerror or e}); give an --out you can write to") from None
    summary = f"trained on {len(train_docs)} documents in {seconds:.1f}s | vocab_size {tok.vocab_size:,} | saved {out}"
    if held:
        n_tokens = sum(map(len, tok.encode_ordinary_batch(held)))
        summary += f" | {sum(len(t.encode()) for t in held) / n_tokens:.3f} bytes/token on {len(held)} held-out documents"
    print(summary)
