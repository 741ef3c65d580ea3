"""
Evaluate a trained checkpoint: HellaSwag, any multiple-choice task of the same shape, bits per byte on a text, or a
chat model on GSM8K, ARC and MMLU.

    python eval.py --out_dir=out/small --task=hellaswag               # HellaSwag val (10,042 rows), downloaded once
    python eval.py --out_dir=out/small --task=mc --data=FILE.jsonl    # multiple-choice rows of your own
    python eval.py --out_dir=out/small --task=bpb --text=FILE         # bits per UTF-8 byte on a text file
    python eval.py --out_dir=out/sft --task=chat --limit=500          # GSM8K, ARC, MMLU: one table (see below)

Multiple choice: a JSONL line {"context": str, "endings": [str, ...], "label": int} is scored the way llm.c scores
GPT-2 on HellaSwag. Each ending's tokens follow the context's (the two encoded separately), the model's loss is taken
over the ending's tokens only, and the prediction is the ending of least summed loss (acc) or of least loss per token
(acc_norm; GPT-2 124M gets 29.55% acc_norm on HellaSwag val this way). All the endings of mc_batch rows go through
one forward. A HellaSwag row becomes this shape with a space before each ending, the space that joins it to "ctx".

Bits per byte: the text, after an end-of-text token (as every training document), is cut into windows of block_size
tokens that start `stride` tokens apart; each window scores only the tokens no earlier window scored, so every token
is scored once, with at least block_size - stride tokens of context past the first window. bpb = the summed loss
in nats / ln 2 / the text's UTF-8 bytes, which compares models with different tokenizers.

Chat (--task=chat) prints one table, appended as a JSON line to out_dir/eval.jsonl, from chat_data.py's files:
- GSM8K pass@1: the question as the user's turn of the chat template, the reply greedy (up to max_new_tokens, ending
  at <|end|>), right when gsm8k.judge finds the answer in its final "#### N". Prompts of one length share a batch
  (model.generate takes one length a batch); gsm8k_data may be gsm8k.py's synthetic test.jsonl as well.
- ARC-Easy, ARC-Challenge, MMLU (test splits) twice: as a chat ("letter_acc": the question and its choices "A. ..."
  as the user's turn, and the model's answer the letter of highest logit right after <|assistant|>, among the
  choices' letters only, as nanochat's chat_eval scores them) and as base-model multiple choice (acc_norm above).
A missing file's row names the command that writes it; a tokenizer without the chat tokens skips the chat rows.

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
from bpe import encode_chat
from checkpoint import load_run
from compute import autocast, pick_device, pick_dtype
from configurator import configure
from gsm8k import canonical, judge
from prepare import download

# -----------------------------------------------------------------------------
out_dir = "out"             # the training run to evaluate: its latest checkpoint and tokenizer.bpe
task = "hellaswag"          # hellaswag | mc | bpb | chat
data = ""                   # --task=mc: a JSONL file of multiple-choice rows
text = ""                   # --task=bpb: a UTF-8 text file
data_root = "data"          # HellaSwag is cached in data_root/downloads/
limit = 0                   # score only the first `limit` rows (0 = all); --task=chat: of each task
mc_batch = 4                # multiple-choice rows per forward (each with all its endings)
chat_data_dir = "data/chat"  # --task=chat: chat_data.py's {arc_easy,arc_challenge,mmlu}_test.jsonl
gsm8k_data = "data/chat/gsm8k_test.jsonl"  # --task=chat: GSM8K rows {"prompt", "answer", ...}
max_new_tokens = 256        # --task=chat: the longest GSM8K reply, in tokens
gen_batch = 32              # --task=chat: GSM8K prompts generated together (prompts of one length share a batch)
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
TASKS = ("hellaswag", "mc", "bpb", "chat")
RULES = dict(task=TASKS, limit=(0, None), mc_batch=(1, None), stride=(0, None), batch_size=(1, None),
             max_new_tokens=(1, None), gen_batch=(1, None))
CHAT_MC = ("arc_easy", "arc_challenge", "mmlu")  # chat_data.py's multiple-choice sets
LETTERS = "ABCDEFGHIJ"

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

# ---------------------------------------------------------------------------- chat: GSM8K, lettered multiple choice


def read_gsm8k(path):
    rows = []
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) \
                or canonical(obj.get("answer", "")) is None:
            raise SystemExit(f'error: {path}:{lineno} is not a GSM8K row {{"prompt": str, "answer": a number}}')
        rows.append(obj)
    return rows


def read_chat_mc(path):
    """chat_data.py's multiple-choice rows: {"question", "choices", "answer"} and eval.py's context/endings/label."""
    rows = []
    for lineno, obj in read_jsonl(path):
        row = check_row(obj, f"{path}:{lineno}")
        choices = row.get("choices")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) \
                or not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices) \
                or type(row.get("answer")) is not int or not 0 <= row["answer"] < len(choices):
            raise SystemExit(f'error: {path}:{lineno} is not a chat multiple-choice row {{"question": str, "choices": '
                             f'[2 to {len(LETTERS)} str], "answer": index of the right choice}}')
        rows.append(row)
    return rows


def chat_prompt(tok, text):
    """The ids of a one-turn chat that asks `text`, ending in the open assistant turn where the model answers."""
    return encode_chat(tok, [dict(role="user", content=text)], add_generation_prompt=True)[0]


def mc_question(row):
    """A multiple-choice row as the user's turn: the question, then one line per choice "A. ...\""""
    lines = [row["question"]] + [f"{letter}. {c}" for letter, c in zip(LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer with the letter of the right choice."


@torch.no_grad()
def letter_choice(model, tok, rows, device, ctx=nullcontext(), *, batch_rows=4):
    """Chat multiple choice, as nanochat's chat_eval scores it: the model's answer to mc_question is the letter of
    highest logit right after <|assistant|>, among the row's choices' letters only (the others can't win).
    Prompts are cut on the left to the model's context. Returns dict(acc=, n=)."""
    block_size = getattr(model, "module", model).config.block_size
    letter_ids = []
    for letter in LETTERS:
        ids = tok.encode_ordinary(letter)
        if len(ids) != 1:
            raise SystemExit(f"error: the tokenizer writes the letter {letter} as {len(ids)} tokens, not one")
        letter_ids.append(ids[0])
    right = 0
    for b in range(0, len(rows), batch_rows):
        batch = rows[b:b + batch_rows]
        seqs = [chat_prompt(tok, mc_question(r))[-block_size:] for r in batch]
        x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right-padded: causal, so unread
        for i, s in enumerate(seqs):
            x[i, :len(s)] = torch.tensor(s)
        with ctx:
            logits = model(x.to(device))[0]
        for i, (r, s) in enumerate(zip(batch, seqs)):
            right += logits[i, len(s) - 1, letter_ids[:len(r["choices"])]].argmax().item() == r["answer"]
    return dict(acc=right / len(rows), n=len(rows))


@torch.no_grad()
def greedy_replies(model, tok, prompts, device, ctx=nullcontext(), *, max_new_tokens=256, batch=32, verbose=False):
    """The greedy reply (ids, without its <|end|>) to each prompt (a list of ids). model.generate takes one prompt
    length a batch, so prompts of equal length go together, `batch` at a time."""
    stop = [tok.special_tokens["<|end|>"], tok.eot]
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    groups = [g[b:b + batch] for _, g in sorted(by_len.items()) for b in range(0, len(g), batch)]
    replies, t0 = [None] * len(prompts), time.time()
    for k, rows in enumerate(groups):
        idx = torch.tensor([prompts[i] for i in rows], device=device)
        with ctx:
            steps = list(model.generate(idx, max_new_tokens, temperature=0.0, stop_ids=stop, n_vocab=tok.vocab_size))
        for i, r in zip(rows, torch.stack(steps, 1).tolist()):
            replies[i] = r[:next((j for j, t in enumerate(r) if t in stop), len(r))]
        if verbose:
            done = sum(map(len, groups[:k + 1]))
            bpe.status(f"gsm8k: {done} replies | {done / max(time.time() - t0, 1e-9):.1f} replies/s",
                       final=k == len(groups) - 1)
    return replies


def gsm8k_pass1(model, tok, rows, device, ctx=nullcontext(), *, max_new_tokens=256, batch=32, verbose=False):
    """GSM8K pass@1: the share of rows whose greedy reply gsm8k.judge finds right. Returns dict(acc=, n=)."""
    replies = greedy_replies(model, tok, [chat_prompt(tok, r["prompt"]) for r in rows], device, ctx,
                             max_new_tokens=max_new_tokens, batch=batch, verbose=verbose)
    right = sum(judge(r, tok.decode(ids, errors="replace")) for r, ids in zip(rows, replies))
    return dict(acc=right / len(rows), n=len(rows))


def chat_data_command(data_dir, which):
    """The command that writes chat_data.py's `which` files into data_dir (data_root/chat/), or None."""
    root, folder = os.path.split(os.path.normpath(data_dir))
    if folder != "chat":
        return None
    return f"python chat_data.py --which={which}" + ("" if root == "data" else f" --data_root={root}")


def missing_note(path, name):
    """What the row of a missing file says: the command that writes it there, where there is one."""
    command = chat_data_command(os.path.dirname(path), name)
    return f"missing: {command}" if command and os.path.basename(path) == f"{name}_test.jsonl" else f"missing: {path}"


def chat_eval(model, tok, device, ctx=nullcontext(), *, data_dir="data/chat", gsm8k_path="data/chat/gsm8k_test.jsonl",
              limit=0, max_new_tokens=256, gen_batch=32, mc_batch=4, verbose=False):
    """The chat table (the docstring at the top says what it scores): {"task/metric": dict(task=, metric=, score=,
    n=, note=)}; a row that could not run has score None and a note saying why."""
    chat = all(s in tok.special_tokens for s in bpe.CHAT_TOKENS + ("<|endoftext|>",))
    skip = None if chat else "skipped: the tokenizer has no chat tokens (a base run)"
    scorers = {  # metric -> (reader of the file, score of its rows, needs the chat template)
        "pass@1": (read_gsm8k, lambda rows: gsm8k_pass1(model, tok, rows, device, ctx, max_new_tokens=max_new_tokens,
                                                        batch=gen_batch, verbose=verbose)["acc"], True),
        "letter_acc": (read_chat_mc, lambda rows: letter_choice(model, tok, rows, device, ctx,
                                                                batch_rows=mc_batch)["acc"], True),
        "acc_norm": (read_chat_mc, lambda rows: multiple_choice(model, tok, rows, device, ctx, batch_rows=mc_batch,
                                                                verbose=verbose)["acc_norm"], False)}
    paths = {"gsm8k/pass@1": gsm8k_path}  # row -> its file
    paths.update({f"{name}/{metric}": os.path.join(data_dir, f"{name}_test.jsonl")
                  for name in CHAT_MC for metric in ("letter_acc", "acc_norm")})
    table = {}
    for key, path in paths.items():
        name, metric = key.split("/")
        note = (skip if scorers[metric][2] else None) or (None if os.path.isfile(path) else missing_note(path, name))
        table[key] = dict(task=name, metric=metric, score=None, n=0, note=note)
    if all(r["note"] for r in table.values()):  # every file missing (a base run: every multiple-choice file)
        why = f"{skip}, and no multiple-choice file in {data_dir}" if skip else \
            f"no file in {data_dir} nor {gsm8k_path}"
        get = chat_data_command(data_dir, "arc,mmlu" if skip else "gsm8k,arc,mmlu")
        raise SystemExit(f"error: nothing to evaluate: {why}" + (f"; get them with {get}" if get else ""))
    # every file read (its rows checked) before the first score: a bad row is not found after an hour's work
    rows = {key: scorers[r["metric"]][0](paths[key])[:limit or None] for key, r in table.items() if not r["note"]}
    for key, some in rows.items():
        if not some:
            raise SystemExit(f"error: {paths[key]} has no rows")
    for key, some in rows.items():
        table[key].update(score=scorers[table[key]["metric"]][1](some), n=len(some))
    return table


def print_table(table):
    print(f"{'task':<14} {'metric':<11} {'score':>7} {'n':>6}")
    for r in table.values():
        score = f"{100 * r['score']:6.2f}% {r['n']:>6,}" if r["score"] is not None else r["note"]
        print(f"{r['task']:<14} {r['metric']:<11} {score}")


# ---------------------------------------------------------------------------- the command line


def main():
    configure(globals())  # RULES: task is one of TASKS
    need = {"mc": ("data", data, "--data=FILE.jsonl"), "bpb": ("text", text, "--text=FILE")}.get(task)
    if need and not os.path.isfile(need[1]):
        raise SystemExit(f"error: --task={task} needs {need[2]}; "
                         + (f"{need[1]} does not exist" if need[1] else f"no {need[0]} file given"))
    dev = pick_device(device)
    ctx = autocast(dev, pick_dtype(dtype, dev))
    model, tok, info = load_run(out_dir, dev)
    if task == "chat":
        table = chat_eval(model, tok, dev, ctx, data_dir=chat_data_dir, gsm8k_path=gsm8k_data, limit=limit,
                          max_new_tokens=max_new_tokens, gen_batch=gen_batch, mc_batch=mc_batch, verbose=True)
        print_table(table)
        with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:  # one line per evaluation, the checkpoint named
            f.write(json.dumps(dict(time=round(time.time()), task=task, iter_num=info.get("iter_num"),
                                    stage=info.get("stage"), limit=limit, table=table)) + "\n")
        return table
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
