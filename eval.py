"""
Evaluate a trained checkpoint: HellaSwag, any multiple-choice task of the same shape, or bits per byte on a text.

    python eval.py --out_dir=out/small --task=hellaswag               # HellaSwag val (10,042 rows), downloaded once
    python eval.py --out_dir=out/small --task=mc --data=FILE.jsonl    # multiple-choice rows of your own
    python eval.py --out_dir=out/small --task=bpb --text=FILE         # bits per UTF-8 byte on a text file

Multiple choice: a JSONL line {"context": str, "endings": [str, ...], "label": int} is scored the way llm.c scores
GPT-2 on HellaSwag. Each ending's tokens follow the context's (the two encoded separately), the model's loss is taken
over the ending's tokens only, and the prediction is the ending of least summed loss (acc) or of least loss per token
(acc_norm; GPT-2 124M gets 29.55% acc_norm on HellaSwag val this way). All the endings of mc_batch rows go through
one forward. A HellaSwag row becomes this shape with a space before each ending, the space that joins it to "ctx".

Bits per byte: the text, after an end-of-text token (as every training document), is cut into windows of block_size
tokens that start `stride` tokens apart; each window scores only the tokens no earlier window scored, so every token
is scored once, with at least block_size - stride tokens of context past the first window. bpb = the summed loss
in nats / ln 2 / the text's UTF-8 bytes, which compares models with different tokenizers.

train.py calls multiple_choice at its evaluations with --eval_mc (with rank and world under torchrun).
"""
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bpe
from checkpoint import load_run
from compute import autocast, pick_device, pick_dtype
from configurator import configure
from prepare import download

# -----------------------------------------------------------------------------
out_dir = "out"             # the training run to evaluate: its latest checkpoint and tokenizer.bpe
task = "hellaswag"          # hellaswag | mc | bpb
data = ""                   # --task=mc: a JSONL file of multiple-choice rows
text = ""                   # --task=bpb: a UTF-8 text file
data_root = "data"          # HellaSwag is cached in data_root/downloads/
limit = 0                   # score only the first `limit` rows (0 = all)
mc_batch = 4                # multiple-choice rows per forward (each with all its endings)
stride = 0                  # --task=bpb: tokens between window starts; 0 = block_size // 2
batch_size = 4              # --task=bpb: windows per forward
device = "auto"             # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"              # auto (bf16 autocast on GPUs that have it, else fp32) | float32 | bfloat16 | float16
# -----------------------------------------------------------------------------

# HellaSwag's val split (Zellers et al. 2019) at a fixed commit of its repository; the file's git blob id (sha1 of
# "blob <size>\0" + its bytes) is checked, and download() pins its sha256 on the first download.
HELLASWAG_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/a29ff8e9a04bba4bd6588223785ce105328adc57/"
                 "data/hellaswag_val.jsonl")
HELLASWAG_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
TASKS = ("hellaswag", "mc", "bpb")

# ---------------------------------------------------------------------------- the rows


def git_blob_id(path):
    with open(path, "rb") as f:
        content = f.read()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def hellaswag_file(data_root):
    """The HellaSwag val JSONL, downloaded into data_root/downloads/ once (resumable, checked)."""
    os.makedirs(os.path.join(data_root, "downloads"), exist_ok=True)
    dest = download(HELLASWAG_URL, os.path.join(data_root, "downloads", "hellaswag_val.jsonl"))
    if git_blob_id(dest) != HELLASWAG_BLOB:
        for p in (dest, dest + ".sha256"):
            os.remove(p)
        raise SystemExit(f"error: {dest} is not HellaSwag's val file (git blob id mismatch); removed it, run again "
                         f"to re-download")
    return dest


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start})") from None


def read_jsonl(path):
    """(line number, object) for every non-blank line of a JSONL file; problems are one-line errors."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; pass an existing JSONL file")
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path}:{lineno} is not valid JSON") from None


def check_row(row, where):
    ok = (isinstance(row, dict) and isinstance(row.get("context"), str) and isinstance(row.get("endings"), list)
          and len(row["endings"]) >= 2 and all(isinstance(e, str) and e for e in row["endings"])
          and type(row.get("label")) is int and 0 <= row["label"] < len(row["endings"]))
    if not ok:
        raise SystemExit(f'error: {where} is not a multiple-choice row {{"context": str, "endings": [2 or more '
                         f'non-empty str], "label": index of the right ending}}')
    return row


def read_mc(path):
    return [check_row(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]


def hellaswag_rows(path):
    """HellaSwag's lines (ctx, endings, label) as multiple-choice rows."""
    rows = []
    for lineno, obj in read_jsonl(path):
        obj = obj if isinstance(obj, dict) and isinstance(obj.get("endings"), list) else {}
        rows.append(check_row(dict(context=obj.get("ctx"), endings=[" " + str(e) for e in obj.get("endings", [])],
                                   label=obj.get("label")), f"{path}:{lineno}"))
    return rows


def mc_rows(source, data_root="data", limit=0):
    """The first `limit` (0: all) multiple-choice rows of source: "hellaswag" (downloaded once into data_root) or
    a JSONL file of rows."""
    rows = hellaswag_rows(hellaswag_file(data_root)) if source == "hellaswag" else read_mc(source)
    return rows[:limit] if limit else rows

# ---------------------------------------------------------------------------- multiple choice


def encode_rows(tok, rows, block_size):
    """Every (row, ending) in order as (tokens, n): the context's tokens then the ending's n tokens, cut on the left
    to the block_size + 1 tokens that one forward can score. An empty context is end-of-text, where documents start."""
    seqs = []
    for r in rows:
        context = tok.encode_ordinary(r["context"]) or [tok.eot]
        for e in r["endings"]:
            ending = tok.encode_ordinary(e)
            if len(ending) > block_size:
                raise SystemExit(f"error: an ending of {len(ending)} tokens does not fit the model's block_size "
                                 f"{block_size}: {e[:60]!r}")
            seqs.append(((context + ending)[-(block_size + 1):], len(ending)))
    return seqs


@torch.no_grad()
def ending_losses(model, seqs, device, ctx):
    """One forward over the sequences (right-padded): each one's summed loss in nats over its last n tokens (the
    ending) and n, as CPU tensors (N,)."""
    T = max(len(s) for s, _ in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)  # -1: not scored (the context, the padding)
    for i, (s, n) in enumerate(seqs):
        s = torch.tensor(s)
        x[i, :len(s) - 1] = s[:-1]
        y[i, len(s) - 1 - n:len(s) - 1] = s[-n:]  # position j predicts token j + 1
    loss = target_losses(model, x, y, device, ctx)
    return loss.view(y.shape).sum(1).cpu(), (y != -1).sum(1).cpu()


def target_losses(model, x, y, device, ctx):
    """One forward over inputs x (B, T): the loss in nats of each target of y (B, T), flattened; 0 where y is -1."""
    with ctx:
        logits = model(x.to(device))[0]
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="none")


def multiple_choice(model, tok, rows, device, ctx=nullcontext(), *, batch_rows=4, rank=0, world=1, verbose=False):
    """acc and acc_norm of the model on multiple-choice rows (the docstring at the top says how they are scored).
    Under torchrun pass rank and world: each process scores every world-th row, all making the same number of
    forwards (as FSDP needs), and the counts are summed over the processes. Returns dict(acc=, acc_norm=, n=)."""
    if not rows:
        raise SystemExit("error: no multiple-choice rows to score")
    block_size = getattr(model, "module", model).config.block_size  # (a DDP-wrapped GPT keeps it in .module)
    was_training = model.training
    model.eval()
    mine = [rank + k * world for k in range(-(-len(rows) // world))]  # indexes past the end repeat rows, uncounted
    counts = torch.zeros(3, dtype=torch.float64)  # right by summed loss, right by loss per token, rows
    t0 = time.time()
    for b in range(0, len(mine), batch_rows):
        idx = mine[b:b + batch_rows]
        batch = [rows[i % len(rows)] for i in idx]
        sums, ns = ending_losses(model, encode_rows(tok, batch, block_size), device, ctx)
        k = 0
        for i, r in zip(idx, batch):
            s, n = sums[k:k + len(r["endings"])], ns[k:k + len(r["endings"])]
            k += len(r["endings"])
            if i < len(rows):
                counts += torch.tensor([s.argmin() == r["label"], (s / n).argmin() == r["label"], 1.0],
                                       dtype=torch.float64)
        if verbose:
            done, rate = b + len(idx), (b + len(idx)) / max(time.time() - t0, 1e-9)
            bpe.status(f"{int(counts[2])} rows | acc {counts[0] / counts[2]:.4f} acc_norm {counts[1] / counts[2]:.4f}"
                       f" | {rate:.1f} rows/s | ETA {(len(mine) - done) / rate:.0f}s", final=done == len(mine))
    if world > 1 and dist.is_initialized():
        summed = counts.to(device)
        dist.all_reduce(summed)
        counts = summed.cpu()
    model.train(was_training)
    return dict(acc=(counts[0] / counts[2]).item(), acc_norm=(counts[1] / counts[2]).item(), n=int(counts[2]))

# ---------------------------------------------------------------------------- bits per byte


@torch.no_grad()
def bits_per_byte(model, tok, text, device, ctx=nullcontext(), *, stride=0, batch_size=4, verbose=False):
    """The model's bits per UTF-8 byte on text (the docstring at the top says how). Returns dict(bpb=, loss= (nats
    per token), tokens= (scored), bytes=)."""
    T = getattr(model, "module", model).config.block_size
    stride = stride or max(T // 2, 1)
    if not 0 < stride <= T:
        raise SystemExit(f"error: stride must be 1 to block_size ({T}), got {stride}")
    ids = torch.tensor([tok.eot] + tok.encode_ordinary(text))
    windows, prev, s = [], 0, 0  # (start, end, prev): inputs ids[start:end], it scores targets ids[prev+1 .. end]
    while prev < len(ids) - 1:
        end = min(s + T, len(ids) - 1)
        windows.append((s, end, prev))
        prev, s = end, s + stride
    was_training = model.training
    model.eval()
    total, n, t0 = 0.0, 0, time.time()
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for j, (s, end, prev) in enumerate(chunk):
            x[j, :end - s] = ids[s:end]
            y[j, prev - s:end - s] = ids[prev + 1:end + 1]
        loss = target_losses(model, x, y, device, ctx)
        total += loss.double().sum().item()
        n += (y != -1).sum().item()
        if verbose:
            done = b + len(chunk)
            bpe.status(f"bpb: {n:,} tokens | {n / max(time.time() - t0, 1e-9):,.0f} tokens/s | ETA "
                       f"{(len(windows) - done) * (time.time() - t0) / done:.0f}s", final=done == len(windows))
    model.train(was_training)
    n_bytes = len(text.encode("utf-8"))
    return dict(bpb=total / math.log(2) / n_bytes, loss=total / n, tokens=n, bytes=n_bytes)

# ---------------------------------------------------------------------------- the command line


def main():
    configure(globals())
    if task not in TASKS:
        raise SystemExit(f"error: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    need = {"mc": ("data", data, "--data=FILE.jsonl"), "bpb": ("text", text, "--text=FILE")}.get(task)
    if need and not os.path.isfile(need[1]):
        raise SystemExit(f"error: --task={task} needs {need[2]}; "
                         + (f"{need[1]} does not exist" if need[1] else f"no {need[0]} file given"))
    dev = pick_device(device)
    ctx = autocast(dev, pick_dtype(dtype, dev))
    model, tok = load_run(out_dir, dev)[:2]
    if task == "bpb":
        content = read_text(text)
        if not content:
            raise SystemExit(f"error: {text} is empty; nothing to score")
        r = bits_per_byte(model, tok, content, dev, ctx, stride=stride, batch_size=batch_size, verbose=True)
        print(f"{text}: {r['bpb']:.4f} bits/byte ({r['loss']:.4f} nats/token over {r['tokens']:,} tokens, "
              f"{r['bytes']:,} bytes)")
        return r
    rows = mc_rows("hellaswag" if task == "hellaswag" else data, data_root, limit)
    r = multiple_choice(model, tok, rows, dev, ctx, batch_rows=mc_batch, verbose=True)
    print(f"{task}: acc {100 * r['acc']:.2f}% | acc_norm {100 * r['acc_norm']:.2f}% ({r['n']:,} rows)")
    return r


if __name__ == "__main__":
    main()
