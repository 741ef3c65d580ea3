"""
Sampling responses and scoring them: what rlhf.py's stages feed their losses with.

- rows: JSONL rows read and checked (read_jsonl names the file and line of a bad one), kept if they fit the context;
- batches: a row's chat in bpe.py's template as ids, padded into batches whose masks pick the response tokens;
- rollout: responses sampled with model.py's KV cache; scores: a reward model's, or the task's judge(row, response);
- evaluate: the held-out figures every stage logs; label_pairs: on-policy preference pairs judged by the task.

A row travels with its data: the judge reads the row a prompt came from (gsm8k.judge its "answer"), not the prompt.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import encode_chat
from checkpoint import load_checkpoint, load_run, model_from_checkpoint

TASK_HINT = "the built-in task's: python addition.py"
TEXT_FIELDS = ("response", "chosen", "rejected")  # must be strings; "prompt" may be messages too

# ---------------------------------------------------------------------------- rows


def field_error(row, keys):
    """Why row's fields `keys` are not what the stages read, or None: texts are strings, a prompt a string or
    messages, messages a list of {"role", "content": str}, an answer a number or a string."""
    def is_messages(v):
        return isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                                  isinstance(m.get("content"), str) for m in v)
    for k in keys:
        v, shown = row[k], json.dumps(row[k])[:40]
        if k in TEXT_FIELDS and not isinstance(v, str):
            return f'"{k}" must be a string, not {shown}'
        if k == "prompt" and not (isinstance(v, str) or is_messages(v)):
            return f'"prompt" must be a string or a list of {{"role", "content"}} messages, not {shown}'
        if k == "messages" and not is_messages(v):
            return f'"messages" must be a list of {{"role", "content"}} messages with string content, not {shown}'
        if k == "answer" and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            return f'"answer" must be a number or a string of one, not {shown}'
    return None


def read_jsonl(path, fields, hint=TASK_HINT):
    """Rows of a JSONL file, each an object with all the keys of one of `fields` (tuples of keys), of the types
    field_error checks. hint: where such a file comes from, for the error when it is missing."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file {path} does not exist ({hint})")
    rows = []
    try:
        with open(path, "rb") as f:  # decoded whole, so a bad byte's offset is its offset in the file
            lines = f.read().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t utf-8`")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line")
        alt = next((alt for alt in fields if all(k in row for k in alt)), None) if isinstance(row, dict) else None
        if alt is None:
            want = " or ".join("{" + ", ".join(f'"{k}"' for k in alt) + "}" for alt in fields)
            raise SystemExit(f"error: {path}:{lineno} lacks the fields {want}")
        why = field_error(row, alt)
        if why:
            raise SystemExit(f"error: {path}:{lineno}: {why}; fix or remove that line")
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    return rows


def fitting_rows(paths, fields, fits, block, hint=TASK_HINT):
    """The rows of the comma-separated JSONL files `paths` that fits(row) keeps, with a warning for the others."""
    rows = [r for path in paths.split(",") if path for r in read_jsonl(path, fields, hint)]
    kept = [r for r in rows if fits(r)]
    if len(kept) < len(rows):
        print(f"warning: skipped {len(rows) - len(kept)} of {len(rows)} rows of {paths} that do not fit the model's "
              f"context of {block} tokens (or have no assistant turn to learn)")
    if rows and not kept:
        raise SystemExit(f"error: no row of {paths} fits the model's context of {block} tokens")
    return kept

# ---------------------------------------------------------------------------- batches


def as_messages(prompt):
    return [dict(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)


def prompt_ids(tok, prompt):
    return encode_chat(tok, as_messages(prompt), add_generation_prompt=True)[0]


def prompt_response(tok, prompt, response):
    """(ids, n_prompt): the chat up to `<|assistant|>`, then the response and its `<|end|>`."""
    p = prompt_ids(tok, prompt)
    return p + tok.encode_ordinary(response) + [tok.special_tokens["<|end|>"]], len(p)


def pad(rows, value):
    """List of lists -> (B, T) long tensor, right-padded with value."""
    T = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows], dtype=torch.long)


def response_batch(seqs, n_prompts, pad_id, device=None):
    """ids (B, T) right-padded, the responses' mask (B, T-1) on the prediction grid (the logit at position j predicts
    token j+1), and each sequence's last index (where the reward model reads)."""
    ids = pad(seqs, pad_id).to(device)
    mask = torch.zeros(len(seqs), ids.shape[1] - 1, device=device)
    for i, (s, n) in enumerate(zip(seqs, n_prompts)):
        mask[i, n - 1:len(s) - 1] = 1.0
    return ids, mask, torch.tensor([len(s) - 1 for s in seqs], device=device)


def sft_example(tok, row):
    """(ids, targets) with targets -1 (no loss) everywhere but the assistant tokens, shifted by one."""
    messages = row["messages"] if "messages" in row else as_messages(row["prompt"]) + [
        dict(role="assistant", content=row["response"])]
    ids, mask = encode_chat(tok, messages)
    return ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def pair_batch(tok, rows, device=None):
    """Chosen rows then rejected rows: response_batch's ids (2B, T), mask (2B, T-1) and last indices."""
    seqs = [prompt_response(tok, r["prompt"], r[k]) for k in ("chosen", "rejected") for r in rows]
    return response_batch([s for s, _ in seqs], [n for _, n in seqs], tok.eot, device)


def sft_fits(tok, block, row):  # the whole example in the model's context, and some assistant tokens to learn
    x, y = sft_example(tok, row)
    return len(x) <= block and any(t != -1 for t in y)


def pair_fits(tok, block, row):
    return max(len(prompt_response(tok, row["prompt"], row[k])[0]) for k in ("chosen", "rejected")) <= block

# ---------------------------------------------------------------------------- models and scores


def load_model(path, device, parent="train one with python rlhf.py config/sft.py"):
    """(model, tokenizer) of the run in `path`; parent: how that run is made, for the error when it is missing."""
    if not os.path.isfile(os.path.join(path, "latest.json")):
        raise SystemExit(f"error: no checkpoint in {path} (missing latest.json); {parent}")
    return load_run(path, device)[:2]


def forward_hidden(model, idx):
    """(logits, hidden): hidden (B, T, C) is what lm_head reads, caught by a hook, so the reward and value
    heads sit on top of whatever blocks model.py has."""
    box = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        logits, _ = model(idx)
    finally:
        hook.remove()
    return logits, box[0]


def token_logprobs(logits, ids):
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1)."""
    return torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, ids[:, 1:, None]).squeeze(2)


def load_reward_model(path, device):
    """(model, head, pool) of an rm run, frozen: what reward_scores takes first."""
    if not os.path.isfile(os.path.join(path, "latest.json")):
        raise SystemExit(f"error: no reward model in {path} (missing latest.json); train one with python rlhf.py "
                         f"config/rm.py, or score with the task's judge: --reward_model=task")
    ckpt = load_checkpoint(path)
    if "reward_head" not in ckpt:
        raise SystemExit(f"error: {path} is not a reward model (no reward_head); train one with python rlhf.py "
                         f"config/rm.py")
    model = model_from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    head = nn.Linear(model.config.n_embd, 1).to(device).requires_grad_(False)
    head.load_state_dict(ckpt["reward_head"])
    # normalised to mean 0, std 1 on held-out answers: PPO's KL coefficient assumes rewards of about unit scale, and a
    # raw Bradley-Terry head's scale is arbitrary (margins of 20 here), which lets the policy buy reward with any KL
    mean, std = ckpt.get("reward_stats", (0.0, 1.0))
    with torch.no_grad():
        head.weight /= std
        head.bias.sub_(mean).div_(std)
    return model, head, ckpt.get("config", {}).get("reward_pool", "last")


def reward_scores(model, head, pool, ids, mask, last):
    """(B,) rewards: the scalar head on the hidden state of each sequence's last real token (its <|end|>), or
    (pool="mean") its mean over the response's tokens; mask is the response's on the prediction grid (B, T-1)."""
    _, h = forward_hidden(model, ids)
    if pool == "mean":  # the hidden state at token j reads token j itself: the response's tokens are mask's, shifted
        r = head(h[:, 1:]).squeeze(-1).float()
        return (r * mask).sum(1) / mask.sum(1).clamp(min=1)
    return head(h[torch.arange(len(ids)), last]).squeeze(-1).float()


def scores(rm, judge, rows, texts, ids, mask, last, ended, *, no_end_score):
    """(B,) the reward model's scores of sampled responses (rm = load_reward_model's), or judge(row, text)'s (rm
    None); a response cut off before its <|end|> gets no_end_score."""
    s = reward_scores(*rm, ids, mask, last) if rm else torch.tensor(
        [judge(r, t) for r, t in zip(rows, texts)], device=ids.device)
    return torch.where(ended, s, torch.full_like(s, no_end_score))


@torch.no_grad()
def sequence_logps(model, tok, rows, ctx):
    """(N, 2) summed log-probs of each row's chosen and rejected response: DPO's reference, computed once."""
    out = []
    for i in range(0, len(rows), 64):
        ids, mask, _ = pair_batch(tok, rows[i:i + 64], next(model.parameters()).device)
        with ctx:
            out.append((token_logprobs(model(ids)[0], ids) * mask).sum(1).view(2, -1).T)
    return torch.cat(out)

# ---------------------------------------------------------------------------- generation and evaluation


@torch.no_grad()
def rollout(model, tok, prompts, max_new, temp, gen, ctx):
    """Sample a response to each prompt with the KV cache, grouping prompts by length (generate takes one length a
    batch). Returns response_batch's (ids, mask, last), the texts, and whether each response reached its <|end|>."""
    end, out = tok.special_tokens["<|end|>"], [None] * len(prompts)
    encoded = [prompt_ids(tok, p) for p in prompts]
    by_len = {}
    for i, p in enumerate(encoded):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        idx = torch.tensor([encoded[i] for i in rows], device=gen.device)
        with ctx:
            steps = list(model.generate(idx, max_new, temp, generator=gen, stop_ids=[end, tok.eot]))
        for i, r in zip(rows, torch.stack(steps, 1).tolist()):
            out[i] = r[:next((k + 1 for k, t in enumerate(r) if t in (end, tok.eot)), len(r))]
    ids, mask, last = response_batch([p + r for p, r in zip(encoded, out)], [len(p) for p in encoded], tok.eot,
                                     gen.device)
    # ids past the tokenizer's vocab (the model's is padded to a multiple of 128) decode to nothing
    texts = [tok.decode([t for t in r if t < tok.vocab_size and t not in (end, tok.eot)], errors="replace")
             for r in out]
    return ids, mask, last, texts, torch.tensor([bool(r) and r[-1] == end for r in out], device=gen.device)


@torch.no_grad()
def evaluate(model, tok, rows, ctx, max_new, no_end_score, *, judge, ref=None, rm=None, seed=0):
    """On held-out rows: the judge's accuracy, greedy (pass@1) and sampled at temperature 1; the samples' mean reward
    (reward model, or the judge); KL(policy || ref) summed over the response, estimated from the samples."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [r["prompt"] for r in rows]
    texts = rollout(model, tok, prompts, max_new, 0.0, gen, ctx)[3]
    res = dict(acc_greedy=sum(map(judge, rows, texts)) / len(rows))
    ids, mask, last, texts, ended = rollout(model, tok, prompts, max_new, 1.0, gen, ctx)
    res["acc_sampled"] = sum(map(judge, rows, texts)) / len(rows)
    with ctx:
        s = scores(rm, judge, rows, texts, ids, mask, last, ended, no_end_score=no_end_score) if rm else None
        res["reward"] = s.mean().item() if rm else res["acc_sampled"]
        if ref is not None:
            kl = (token_logprobs(model(ids)[0], ids) - token_logprobs(ref(ids)[0], ids)) * mask
            res["kl"] = kl.sum(1).mean().item()
    res["response_len"] = mask.sum(1).mean().item()
    model.train()
    return res


@torch.no_grad()
def label_pairs(run, rows, gen, *, samples, max_new, temperature):
    """InstructGPT's comparison data: `samples` samples per prompt from the policy, and the labeler (here the
    task's judge, standing in for a human) prefers a correct answer to each distinct wrong one: the policy's actual
    mistakes, the answers PPO will see. A prompt with no correct or no wrong sample gives no pair (a labeler writes
    no answer). run: rlhf.py's (model, tok, ctx, judge)."""
    run.model.eval()
    pairs, k = [], samples
    for i in range(0, len(rows), 64):
        batch = rows[i:i + 64]
        _, _, _, texts, ended = rollout(run.model, run.tok, [r["prompt"] for r in batch for _ in range(k)], max_new,
                                        temperature, gen, run.ctx)
        for j, row in enumerate(batch):  # unfinished samples are left out: PPO scores them no_end_score anyway
            done = [t for t, e in zip(texts[j * k:(j + 1) * k], ended[j * k:(j + 1) * k].tolist()) if e]
            good = [t for t in done if run.judge(row, t)]
            bad = dict.fromkeys(t for t in done if not run.judge(row, t))
            pairs += [dict(prompt=row["prompt"], chosen=good[0], rejected=t) for t in bad] if good else []
    return pairs
