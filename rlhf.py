"""
Post-training: SFT, a reward model, PPO, DPO, GRPO and RLOO, one loss function each, side by side:

    python rlhf.py config/sft.py   # supervised fine-tuning on chat demonstrations (loss on assistant tokens only)
    python rlhf.py config/label.py # on-policy preference pairs: the SFT model's samples, compared by a labeler
    python rlhf.py config/rm.py    # a reward model: GPT trunk + scalar head, Bradley-Terry loss on preference pairs
    python rlhf.py config/ppo.py   # PPO against the reward model, per-token KL penalty to the frozen SFT model
    python rlhf.py config/dpo.py   # DPO on the same preference pairs, no reward model, no sampling
    python rlhf.py config/grpo.py  # GRPO: groups of samples per prompt, each scored against its group's mean
    python rlhf.py config/rloo.py  # RLOO: the same, each sample scored against the mean of the others

Data is JSONL: SFT `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`; preferences
`{"prompt", "chosen", "rejected"}`; PPO / GRPO / RLOO prompts `{"prompt"}`, a string (one user turn) or messages, in
bpe.py's chat template. The built-in task, two-digit addition (addition.py: its data and its judge), needs no
download (`python bench.py --mode=rlhf` runs every stage):

    python addition.py             # writes data/add/: corpus.txt (pretraining), sft, prefs, prompts (+ held-out)
    python prepare.py --input=data/add/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py
    python rlhf.py config/sft.py && python rlhf.py config/label.py && python rlhf.py config/rm.py  # then any stage

An RM on offline pairs alone ranks the SFT model's own answers badly, so, as InstructGPT did, the label stage has
the task's judge (a human's stand-in) compare the SFT model's samples.

Every stage writes out_dir/: checkpoints in train.py's format (sample.py chats with any), tokenizer.bpe, metrics.jsonl;
`--resume=True` continues. `init_from` is the parent run (pretrained for SFT, SFT for the others), also the frozen
reference of PPO, DPO, GRPO and RLOO.
"""
import json
import os
import random
import re
import time
import types
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from addition import task_reward
from bpe import encode_chat
from checkpoint import (check_out_dir, load_checkpoint, load_run, model_from_checkpoint, open_out_dir,
                        save_checkpoint)
from compute import autocast, pick_device, pick_dtype
from configurator import configure
from train import get_lr

# -----------------------------------------------------------------------------
stage = "sft"               # sft | label | rm | ppo | dpo | grpo | rloo
out_dir = "out/add-sft"
init_from = "out/add"       # the parent run's out_dir: the starting weights, and the reference for ppo/dpo/grpo
resume = False              # continue from out_dir's latest checkpoint
data = "data/add/sft.jsonl"           # training data of this stage; a,b,...: several files, concatenated
val_data = "data/add/sft_val.jsonl"   # held-out data of the same format ("" = none)
drop_val_prompts = False    # drop training rows whose prompt is in val_data: a mix of files then cannot leak them
eval_prompts = "data/add/prompts_val.jsonl"  # held-out prompts scored by the task's judge ("" = none)
eval_samples = 200          # held-out prompts per evaluation
reward_model = "out/add-rm"  # ppo/grpo/rloo: a reward model's out_dir, or "task" for the task's judge (addition.py)
reward_pool = "last"        # rm: the head reads the last token (<|end|>), or "mean": its mean over the response
# optimisation
batch_size = 32
max_iters = 200
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 100
log_interval = 10
# ppo, and the sampling and update loop that grpo / rloo share with it (defaults as TRL's where it has one)
rollout_batch = 64          # prompts per step (grpo / rloo: each sampled num_generations times)
ppo_epochs = 4              # passes over each step's samples (TRL's GRPO calls it num_iterations, default 1)
minibatch = 16              # samples per update
max_new_tokens = 12         # response length cap; a response without <|end|> by then scores no_end_score
temperature = 1.0
kl_coef = 0.05              # ppo: per-token KL penalty to the reference
clip_range = 0.2
clip_range_value = 0.2
vf_coef = 0.1
gamma = 1.0
lam = 0.95
no_end_score = -3.0         # the score of an unfinished response: the reward model's means nothing on such text
# grpo / rloo (as TRL's GRPOConfig / RLOOConfig)
num_generations = 8         # samples per prompt, the group whose other members are each sample's baseline
scale_rewards = True        # grpo: divide the advantages by the group's reward std (Dr. GRPO: False)
grpo_beta = 0.0             # the KL coefficient: grpo, k3 in the loss; rloo, a penalty on the reward (TRL's beta)
grpo_loss_type = "dapo"     # grpo | dapo | dr_grpo: how token losses become one number (grpo_loss)
# dpo (as TRL's DPOConfig)
dpo_beta = 0.1              # the implicit reward's scale (TRL's beta)
dpo_loss_type = "sigmoid"   # sigmoid | ipo
rpo_alpha = 0.0             # > 0: add this times the chosen responses' NLL to the loss (TRL's rpo_alpha)
# label: on-policy preference pairs, the policy's own samples compared by the task's judge
label_out = "data/add/prefs_sft.jsonl"  # the pairs; held-out pairs (disjoint prompts) go to ..._val.jsonl
label_prompts = 2000        # prompts of `data` to sample for the training pairs
label_val_prompts = 300     # further prompts, none of them among those, for the held-out pairs
label_samples = 8           # responses per prompt (InstructGPT showed labelers K = 4..9)
# system
device = "auto"
dtype = "auto"
seed = 1337
# -----------------------------------------------------------------------------
TASK_HINT = "the built-in task's: python addition.py"
DPO_LOSS_TYPES = ("sigmoid", "ipo")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")

# ---------------------------------------------------------------------------- data


def read_jsonl(path, fields, hint=TASK_HINT):
    """Rows of a JSONL file, each an object with all the keys of one of `fields` (tuples of keys).
    hint: where such a file comes from, for the error when it is missing."""
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
        if not isinstance(row, dict) or not any(all(k in row for k in alt) for alt in fields):
            want = " or ".join("{" + ", ".join(f'"{k}"' for k in alt) + "}" for alt in fields)
            raise SystemExit(f"error: {path}:{lineno} lacks the fields {want}")
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

# ---------------------------------------------------------------------------- model pieces


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


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def load_reward_model(path, device):
    """(model, head, pool) of an rm run, frozen: what reward_scores takes first."""
    if not os.path.isfile(os.path.join(path, "latest.json")):
        raise SystemExit(f"error: no reward model in {path} (missing latest.json); train one with python rlhf.py "
                         f"config/rm.py, or score with the built-in task's judge: --reward_model=task")
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


def scores(rm, judge, prompts, texts, ids, mask, last, ended, *, no_end_score):
    """(B,) the reward model's scores of sampled responses (rm = load_reward_model's), or the judge's (rm None);
    a response cut off before its <|end|> gets no_end_score."""
    s = reward_scores(*rm, ids, mask, last) if rm else torch.tensor(
        [judge(p, t) for p, t in zip(prompts, texts)], device=ids.device)
    return torch.where(ended, s, torch.full_like(s, no_end_score))

# ---------------------------------------------------------------------------- the losses, side by side


def sft_loss(model, x, y):
    """Next-token cross-entropy on assistant tokens only (targets -1 elsewhere)."""
    return model(x, y)[1]


def reward_loss(r_chosen, r_rejected):
    """Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r); returns (loss, pairwise accuracy)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


def ppo_loss(logp, old_logp, adv, values, old_values, returns, mask, *, clip, clip_v):
    """PPO's clipped surrogate (Schulman et al. 2017) and the clipped value loss; token-level masked means.
    Returns (policy loss, value loss, clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-clip_v, clip_v)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return masked_mean(pg, mask), masked_mean(vf, mask), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) on (B, T) grids whose masked runs are the responses:
    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, V and A zero past a response's end.
    Returns (advantages, returns = advantages + values)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        next_v = values[:, t + 1] * nxt if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last * nxt
        adv[:, t] = last
    adv = adv * mask
    return adv, adv + values * mask


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type="sigmoid"):
    """DPO: beta * log(pi / ref) is an implicit reward; the loss is Bradley-Terry on it (sigmoid), or IPO's squared
    distance of the log-ratio margin to 1 / (2 beta). Returns (loss, chosen rewards, rejected rewards)."""
    logits = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        loss = (logits - 1 / (2 * beta)) ** 2
    else:
        raise SystemExit(f"error: dpo_loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return loss.mean(), beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def group_advantages(rewards, group, scale=True):
    """GRPO's advantage (Shao et al. 2024): each reward minus the mean of its group (a prompt's `group` samples,
    adjacent), divided by the group's std if scale (as TRL: unbiased, + 1e-4). An all-alike group teaches nothing."""
    r = rewards.view(-1, group)
    adv = r - r.mean(1, keepdim=True)
    return (adv / (r.std(1, keepdim=True) + 1e-4) if scale else adv).flatten()


def rloo_advantages(rewards, group):
    """REINFORCE leave-one-out (Kool et al. 2019, Ahmadian et al. 2024): each reward minus the mean of the other
    group - 1 samples of its prompt, a baseline that does not depend on the sample itself."""
    r = rewards.view(-1, group)
    return (r - (r.sum(1, keepdim=True) - r) / (group - 1)).flatten()


def grpo_loss(logp, old_logp, ref_logp, adv, mask, *, clip, beta, loss_type, max_new):
    """PPO's clipped surrogate with one advantage per sequence (B,), no value model; + beta times the k3 estimate of
    KL(policy || ref) per token, exp(q) - q - 1 with q = log ref - log pi (unbiased, never negative; Schulman 2020).
    loss_type: how the (B, T) token losses become one number: grpo: mean per sequence, then over sequences (a long
    response's tokens weigh less); dapo: mean over the batch's tokens (Yu et al. 2025); dr_grpo: their sum over
    B * max_new, a constant (Liu et al. 2025). Returns (loss, clip fraction, mean per-token KL)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    loss = torch.max(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    q = (ref_logp - logp) if ref_logp is not None else torch.zeros_like(logp)
    kl = torch.exp(q) - q - 1
    if beta:
        loss = loss + beta * kl
    if loss_type == "grpo":
        loss = ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = masked_mean(loss, mask)
    elif loss_type == "dr_grpo":
        loss = (loss * mask).sum() / (mask.shape[0] * max_new)
    else:
        raise SystemExit(f"error: grpo_loss_type must be 'grpo', 'dapo' or 'dr_grpo', got {loss_type!r}")
    return loss, masked_mean(((ratio - 1).abs() > clip).float(), mask), masked_mean(kl, mask)

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
        with ctx:  # responses of a few tokens: capturing a CUDA graph per call would cost more than it saves
            steps = list(model.generate(idx, max_new, temp, generator=gen, stop_ids=[end, tok.eot], cuda_graph=False))
        for i, r in zip(rows, torch.stack(steps, 1).tolist()):
            out[i] = r[:next((k + 1 for k, t in enumerate(r) if t in (end, tok.eot)), len(r))]
    ids, mask, last = response_batch([p + r for p, r in zip(encoded, out)], [len(p) for p in encoded], tok.eot,
                                     gen.device)
    # ids past the tokenizer's vocab (the model's is padded to a multiple of 128) decode to nothing
    texts = [tok.decode([t for t in r if t < tok.vocab_size and t not in (end, tok.eot)], errors="replace")
             for r in out]
    return ids, mask, last, texts, torch.tensor([bool(r) and r[-1] == end for r in out], device=gen.device)


@torch.no_grad()
def evaluate(model, tok, prompts, ctx, max_new, no_end_score, *, ref=None, rm=None, seed=0, judge=task_reward):
    """On held-out prompts: the judge's exact-match accuracy, greedy and sampled at temperature 1; the samples' mean
    reward (reward model, or the judge); KL(policy || ref) summed over the response, estimated from the samples."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    texts = rollout(model, tok, prompts, max_new, 0.0, gen, ctx)[3]
    res = dict(acc_greedy=sum(map(judge, prompts, texts)) / len(prompts))
    ids, mask, last, texts, ended = rollout(model, tok, prompts, max_new, 1.0, gen, ctx)
    res["acc_sampled"] = sum(map(judge, prompts, texts)) / len(prompts)
    with ctx:
        s = scores(rm, judge, prompts, texts, ids, mask, last, ended, no_end_score=no_end_score) if rm else None
        res["reward"] = s.mean().item() if rm else res["acc_sampled"]
        if ref is not None:
            kl = (token_logprobs(model(ids)[0], ids) - token_logprobs(ref(ids)[0], ids)) * mask
            res["kl"] = kl.sum(1).mean().item()
    res["response_len"] = mask.sum(1).mean().item()
    model.train()
    return res

# ---------------------------------------------------------------------------- batches of the offline stages


def sft_batch(model, tok, rows):
    xs, ys = zip(*(sft_example(tok, r) for r in rows))
    dev = next(model.parameters()).device
    return sft_loss(model, pad(xs, tok.eot).to(dev), pad(ys, -1).to(dev)), {}


def rm_batch(model, head, pool, tok, rows):
    ids, mask, last = pair_batch(tok, rows, next(model.parameters()).device)
    r = reward_scores(model, head, pool, ids, mask, last)
    loss, acc = reward_loss(r[:len(rows)], r[len(rows):])
    return loss, dict(accuracy=acc.item(), margin=(r[:len(rows)] - r[len(rows):]).mean().item(),
                      reward_mean=r.mean().item(), reward_sq=(r ** 2).mean().item())


def dpo_batch(model, beta, loss_type, rpo_alpha, tok, rows):
    """DPO on rows that carry their reference log-probs, row["ref_logps"] = [chosen, rejected] (sequence_logps')."""
    dev = next(model.parameters()).device
    ids, mask, _ = pair_batch(tok, rows, dev)
    ref = torch.tensor([r["ref_logps"] for r in rows], device=dev)
    logp = (token_logprobs(model(ids)[0], ids) * mask).sum(1)
    B = len(rows)
    loss, rc, rr = dpo_loss(logp[:B], logp[B:], ref[:, 0], ref[:, 1], beta, loss_type)
    if rpo_alpha:  # + the chosen responses' per-token NLL (RPO, Pang et al. 2024): DPO alone can lower both
        loss = loss - rpo_alpha * (logp[:B] / mask[:B].sum(1)).mean()  # answers' likelihood, the good one too
    return loss, dict(reward_acc=(rc > rr).float().mean().item(), margin=(rc - rr).mean().item(),
                      chosen_reward=rc.mean().item(), rejected_reward=rr.mean().item())


@torch.no_grad()
def sequence_logps(model, tok, rows, ctx):
    """(N, 2) summed log-probs of each row's chosen and rejected response: DPO's reference, computed once."""
    out = []
    for i in range(0, len(rows), 64):
        ids, mask, _ = pair_batch(tok, rows[i:i + 64], next(model.parameters()).device)
        with ctx:
            out.append((token_logprobs(model(ids)[0], ids) * mask).sum(1).view(2, -1).T)
    return torch.cat(out)


@torch.no_grad()
def mean_over(model, batch_fn, rows, batch_size, ctx):
    """Held-out loss and stats of batch_fn(rows) -> (loss, stats), averaged over all rows."""
    model.eval()
    sums, n = {}, 0
    for i in range(0, len(rows), batch_size):
        with ctx:
            loss, st = batch_fn(rows[i:i + batch_size])
        k = len(rows[i:i + batch_size])
        for key, v in dict(loss=loss.item(), **st).items():
            sums[key] = sums.get(key, 0.0) + v * k
        n += k
    model.train()
    return {f"val_{k}": v / n for k, v in sums.items()}

# ---------------------------------------------------------------------------- one step of each online stage


def optimize(opt, loss, grad_clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()


def minibatch_updates(update, B, epochs, minibatch, seed, device):
    """`epochs` passes over a step's B samples in shuffled minibatches (the shuffles seeded by the step's seed, so
    resumes replay them); update(mb) takes one optimizer step and returns its stats. Returns their means."""
    sums, n = {}, 0
    for _ in range(epochs):
        for mb in torch.randperm(B, generator=torch.Generator().manual_seed(seed + n)).split(minibatch):
            for k, v in update(mb.to(device)).items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
    return {k: v / n for k, v in sums.items()}



def ppo_step(cfg, run, head, prompts, opt, kl_c):
    """Roll out, score, then ppo_epochs passes of clipped updates; returns the step's stats. The value head shares the
    policy's trunk: one forward gives logits and values (half the compute of TRL's separate critic, which matters on
    a CPU), and its gradients reach the policy's weights, which vf_coef = 0.1 keeps small."""
    model, ctx, temp = run.model, run.ctx, cfg.temperature
    model.eval()  # rollouts and their scoring without dropout
    ids, mask, last, texts, ended = rollout(model, run.tok, prompts, cfg.max_new_tokens, temp, run.gen, ctx)
    with torch.no_grad(), ctx:
        logits, h = forward_hidden(model, ids)
        old_logp = token_logprobs(logits / temp, ids)
        old_values = head(h[:, :-1]).squeeze(-1).float() * mask
        ref_logp = token_logprobs(run.ref(ids)[0] / temp, ids)
        score = scores(run.rm, run.judge, prompts, texts, ids, mask, last, ended, no_end_score=cfg.no_end_score)
        if run.rm:  # Bradley-Terry fixes rewards only up to a constant per prompt, which here varies more between
            # prompts than right and wrong answers differ: subtract the score of the reference's greedy answer
            ref_ids, ref_mask, ref_last, _, _ = rollout(run.ref, run.tok, prompts, cfg.max_new_tokens, 0.0, run.gen,
                                                        ctx)
            score = torch.where(ended, score - reward_scores(*run.rm, ref_ids, ref_mask, ref_last), score)
    kl = (old_logp - ref_logp) * mask  # per-token log-ratio on the sampled tokens: a KL estimate
    rewards = -kl_c * kl
    rewards[torch.arange(len(prompts), device=ids.device), last - 1] += score  # on the last response token's slot
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    mean = masked_mean(adv, mask)  # whitened advantages
    adv = (adv - mean) * torch.rsqrt(masked_mean((adv - mean) ** 2, mask) + 1e-8) * mask
    model.train()

    def update(mb):
        with ctx:
            logits, h = forward_hidden(model, ids[mb])
            logp = token_logprobs(logits / temp, ids[mb])
            values = head(h[:, :-1]).squeeze(-1).float()
        pg, vf, cf = ppo_loss(logp, old_logp[mb], adv[mb], values, old_values[mb], returns[mb], mask[mb],
                              clip=cfg.clip_range, clip_v=cfg.clip_range_value)
        optimize(opt, pg + cfg.vf_coef * vf, cfg.grad_clip)
        with torch.no_grad():
            lp = F.log_softmax(logits[:, :-1].float() / temp, -1)
            ent = masked_mean(-(lp.exp() * lp).sum(-1), mask[mb])
        return dict(pg_loss=pg, value_loss=vf, clipfrac=cf, entropy=ent)
    stats = minibatch_updates(update, len(prompts), cfg.ppo_epochs, cfg.minibatch, run.gen.initial_seed(), ids.device)
    return dict(reward=score.mean().item(), kl=kl.sum(1).mean().item(), **stats,
                response_len=mask.sum(1).mean().item(), kl_coef=kl_c)


def grpo_step(cfg, run, prompts, opt):
    """GRPO (or, stage=rloo, RLOO): num_generations samples per prompt, each scored against the others of its group;
    then PPO's clipped updates with no value model. The KL to the reference is, for GRPO, a term of the loss
    (grpo_beta, k3); for RLOO, as TRL's RLOOTrainer, a penalty on the reward: grpo_beta times the sampled log-ratio
    summed over the response. Returns the step's stats."""
    model, ctx, group, beta, loo = run.model, run.ctx, cfg.num_generations, cfg.grpo_beta, cfg.stage == "rloo"
    model.eval()
    prompts = [p for p in prompts for _ in range(group)]  # a prompt's samples are adjacent: the groups are rows
    ids, mask, last, texts, ended = rollout(model, run.tok, prompts, cfg.max_new_tokens, cfg.temperature, run.gen, ctx)
    # one update on all the samples (TRL's default): the policy is still the one that sampled, so the ratio is
    # exactly 1 and old_logp is the update's own forward, detached; no extra forward for it
    one_update = cfg.ppo_epochs == 1 and cfg.minibatch >= len(prompts) and not (loo and beta)
    with torch.no_grad(), ctx:
        old_logp = None if one_update else token_logprobs(model(ids)[0] / cfg.temperature, ids)
        ref_logp = token_logprobs(run.ref(ids)[0] / cfg.temperature, ids) if beta else None
        score = scores(run.rm, run.judge, prompts, texts, ids, mask, last, ended, no_end_score=cfg.no_end_score)
    reward = score - beta * ((old_logp - ref_logp) * mask).sum(1) if loo and beta else score
    adv = rloo_advantages(reward, group) if loo else group_advantages(reward, group, cfg.scale_rewards)
    model.train()

    def update(mb):
        with ctx:
            logp = token_logprobs(model(ids[mb])[0] / cfg.temperature, ids[mb])
        loss, cf, kl = grpo_loss(logp, logp.detach() if one_update else old_logp[mb],
                                 None if ref_logp is None else ref_logp[mb], adv[mb], mask[mb], clip=cfg.clip_range,
                                 beta=0.0 if loo else beta, loss_type=cfg.grpo_loss_type, max_new=cfg.max_new_tokens)
        optimize(opt, loss, cfg.grad_clip)
        return dict(loss=loss, clipfrac=cf, kl=kl) if ref_logp is not None else dict(loss=loss, clipfrac=cf)
    stats = minibatch_updates(update, len(prompts), cfg.ppo_epochs, cfg.minibatch, run.gen.initial_seed(), ids.device)
    groups = score.view(-1, group)  # stats' kl: the k3 estimate's mean, when there is a reference
    return dict(reward=score.mean().item(), **stats, reward_std=groups.std(1).mean().item(),
                zero_std_frac=(groups.std(1) == 0).float().mean().item(), response_len=mask.sum(1).mean().item())

# ---------------------------------------------------------------------------- on-policy comparisons


@torch.no_grad()
def label_pairs(cfg, run, prompts, gen):
    """InstructGPT's comparison data: label_samples samples per prompt from the policy, and the labeler (here the
    task's judge, standing in for a human) prefers a correct answer to each distinct wrong one: the policy's actual
    mistakes, the answers PPO will see. A prompt with no correct or no wrong sample gives no pair (a labeler writes
    no answer)."""
    run.model.eval()
    pairs, k = [], cfg.label_samples
    for i in range(0, len(prompts), 64):
        batch = prompts[i:i + 64]
        _, _, _, texts, ended = rollout(run.model, run.tok, [p for p in batch for _ in range(k)], cfg.max_new_tokens,
                                        cfg.temperature, gen, run.ctx)
        for j, p in enumerate(batch):  # unfinished samples are left out: PPO scores them no_end_score anyway
            done = [t for t, e in zip(texts[j * k:(j + 1) * k], ended[j * k:(j + 1) * k].tolist()) if e]
            good = [t for t in done if run.judge(p, t)]
            bad = dict.fromkeys(t for t in done if not run.judge(p, t))
            pairs += [dict(prompt=p, chosen=good[0], rejected=t) for t in bad] if good else []
    return pairs

# ---------------------------------------------------------------------------- the loop and the stages
# Each run_* is main's own code for one stage: cfg, the config as a namespace, is passed down, as in train.py;
# run, a namespace of what setup (and online_setup) loaded: device, autocast context, model, tokenizer, judge...


class Metrics:
    """Each row written through log (open_out_dir's, to metrics.jsonl) and printed. step() averages the stats of
    log_interval steps into one row, printed with the step rate (evaluations included) and the ETA."""

    def __init__(self, log, cfg, iter_num):
        self.write, self.stage, self.it0, self.max_iters, self.every = \
            log, cfg.stage, iter_num, cfg.max_iters, cfg.log_interval
        self.t0, self.sums = time.time(), {}

    def log(self, step, tail="", **row):
        self.write(stage=self.stage, step=step, **row)
        print(f"{self.stage} {step}/{self.max_iters}: " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()) + tail, flush=True)

    def step(self, step, stats, lr):
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / self.every
        if step % self.every == 0:
            dt = (time.time() - self.t0) / (step - self.it0)
            self.log(step, f" | {dt:.3g} s/step, ETA {dt * (self.max_iters - step):.0f}s", **self.sums, lr=lr)
            self.sums = {}


def setup(cfg, parent="train one with python rlhf.py config/sft.py"):
    """init_from's run, with the seed set: run = (dev, ctx, model, tok, judge) as a namespace."""
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ctx = autocast(dev, pick_dtype(cfg.dtype, dev))
    model, tok = load_model(cfg.init_from, dev, parent)
    # the built-in task's judge; another task's (a key such as judge = "gsm8k") would be picked here
    return types.SimpleNamespace(dev=dev, ctx=ctx, model=model, tok=tok, judge=task_reward)


def held_out(cfg, run, ref=None, rm=None):
    """The evaluation on eval_prompts, as a function: {} without them."""
    prompts = [r["prompt"] for r in read_jsonl(cfg.eval_prompts, [("prompt",)])][:cfg.eval_samples] \
        if cfg.eval_prompts else []
    return lambda: evaluate(run.model, run.tok, prompts, run.ctx, cfg.max_new_tokens, cfg.no_end_score, ref=ref,
                            rm=rm, seed=cfg.seed, judge=run.judge) if prompts else {}


def loop(cfg, run, heads, step, evaluation, state):
    """Every training stage's loop, as train.py's: evaluate (and checkpoint) -> step -> log. step(it, opt) takes the
    step's optimizer steps and returns its stats; heads ({checkpoint key: module}) train with the model; state: more
    values each checkpoint keeps (evaluation() fills it)."""
    model = run.model
    params = list(model.parameters()) + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    it = 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.out_dir)
        if ckpt.get("stage") != cfg.stage:
            raise SystemExit(f"error: {cfg.out_dir} holds a {ckpt.get('stage')!r} run, not {cfg.stage!r}; check "
                             f"out_dir")
        for key, module in dict(model=model, optimizer=opt, **heads).items():
            module.load_state_dict(ckpt[key])
        it = ckpt.get("iter_num", 0)
    log = open_out_dir(cfg.out_dir, os.path.join(cfg.init_from, "tokenizer.bpe"), resume=cfg.resume)
    metrics, t0 = Metrics(log, cfg, it), time.time()

    def checkpoint():
        metrics.log(it, **evaluation(), elapsed_s=time.time() - t0)
        save_checkpoint(cfg.out_dir, dict(
            model=model.state_dict(), optimizer=opt.state_dict(), model_args=asdict(model.config),
            tokenizer_hash=run.tok.hash, iter_num=it, stage=cfg.stage, config=vars(cfg),
            **{k: h.state_dict() for k, h in heads.items()}, **state))

    if it == 0:
        checkpoint()
    while it < cfg.max_iters:
        lr = get_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = step(it, opt)
        it += 1
        metrics.step(it, stats, lr)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            checkpoint()
    print(f"done: {cfg.stage} in {time.time() - t0:.0f}s; checkpoint in {cfg.out_dir}")


def fit(cfg, run, batch_fn, fields, fits, *, heads=None, ref=None, judged=True, extra=None, hint=TASK_HINT):
    """The offline stages (sft, rm, dpo): each step a step of the loss batch_fn(rows) on a batch drawn by the step's
    seed; each evaluation the held-out loss and, if judged, the judge's figures; extra(results, rows): more for the
    checkpoint. With a reference (dpo), each row carries its log-probs."""
    block, tok = run.model.config.block_size, run.tok
    rows = fitting_rows(cfg.data, fields, lambda r: fits(tok, block, r), block, hint)
    val_rows = fitting_rows(cfg.val_data, fields, lambda r: fits(tok, block, r), block, hint)
    if cfg.drop_val_prompts:
        held, n = {json.dumps(r.get("prompt")) for r in val_rows}, len(rows)
        rows[:] = [r for r in rows if json.dumps(r.get("prompt")) not in held]
        print(f"dropped {n - len(rows)} training rows whose prompt is in {cfg.val_data}")
    for rs in (rows, val_rows) if ref is not None else ():
        for r, lp in zip(rs, sequence_logps(ref, tok, rs, run.ctx).tolist() if rs else []):
            r["ref_logps"] = lp
    judge_eval, state = held_out(cfg, run, ref) if judged else (lambda: {}), {}

    def evaluation():
        res = mean_over(run.model, batch_fn, val_rows, cfg.batch_size, run.ctx) if val_rows else {}
        res.update(judge_eval())
        state.update(extra(res, rows) if extra else {})
        return res

    def step(it, opt):
        idx = random.Random(cfg.seed + it).sample(range(len(rows)), min(cfg.batch_size, len(rows)))  # resumes replay
        with run.ctx:
            loss, stats = batch_fn([rows[i] for i in idx])
        optimize(opt, loss, cfg.grad_clip)
        return dict(loss=loss.item(), **stats)
    loop(cfg, run, heads or {}, step, evaluation, state)


def sft_fits(tok, block, row):  # the whole example in the model's context, and some assistant tokens to learn
    x, y = sft_example(tok, row)
    return len(x) <= block and any(t != -1 for t in y)


def pair_fits(tok, block, row):
    return max(len(prompt_response(tok, row["prompt"], row[k])[0]) for k in ("chosen", "rejected")) <= block


def run_sft(cfg):
    run = setup(cfg, "pretrain one: python train.py config/add.py (the built-in task's)")
    run.model.train()
    fit(cfg, run, lambda rows: sft_batch(run.model, run.tok, rows), [("messages",), ("prompt", "response")], sft_fits)


def run_rm(cfg):
    run = setup(cfg)
    model = run.model
    head = nn.Linear(model.config.n_embd, 1).to(run.dev)  # random, so the trunk gets gradients at once
    nn.init.normal_(head.weight, std=model.config.n_embd ** -0.5)
    nn.init.zeros_(head.bias)
    rm_loss = lambda rows: rm_batch(model, head, cfg.reward_pool, run.tok, rows)  # noqa: E731

    def reward_stats(res, rows):  # the scores' mean and std, which load_reward_model normalises away
        if not res:  # no held-out pairs: the training pairs'
            res = mean_over(model, rm_loss, rows[:256], cfg.batch_size, run.ctx)
        m = res["val_reward_mean"]
        return dict(reward_stats=(m, max(res["val_reward_sq"] - m * m, 1e-8) ** 0.5))
    model.train()
    fit(cfg, run, rm_loss, [("prompt", "chosen", "rejected")], pair_fits, heads=dict(reward_head=head), judged=False,
        extra=reward_stats, hint=f"on-policy pairs: python rlhf.py config/label.py, after SFT; offline pairs: "
                                 f"python addition.py")


def run_dpo(cfg):
    run = setup(cfg)
    ref = load_model(cfg.init_from, run.dev)[0].requires_grad_(False)
    run.model.train()
    fit(cfg, run, lambda rows: dpo_batch(run.model, cfg.dpo_beta, cfg.dpo_loss_type, cfg.rpo_alpha, run.tok, rows),
        [("prompt", "chosen", "rejected")], pair_fits, ref=ref)


def run_label(cfg):
    """On-policy pairs of label_prompts prompts to label_out, and of label_val_prompts other prompts to its _val
    twin (`data` holds training prompts only, so the eval problems stay out of both)."""
    run = setup(cfg)
    gen = torch.Generator(device=run.dev).manual_seed(cfg.seed)
    prompts = [r["prompt"] for r in read_jsonl(cfg.data, [("prompt",)])]
    random.Random(cfg.seed).shuffle(prompts)
    n, n_val, k = cfg.label_prompts, cfg.label_val_prompts, cfg.label_samples
    if n + n_val > len(prompts):
        raise SystemExit(f"error: label_prompts + label_val_prompts = {n + n_val} but {cfg.data} has {len(prompts)} "
                         f"prompts; lower them")
    val_out = re.sub(r"(\.jsonl)?$", "_val.jsonl", cfg.label_out, count=1)
    os.makedirs(os.path.dirname(cfg.label_out) or ".", exist_ok=True)
    for path, ps in ((cfg.label_out, prompts[:n]), (val_out, prompts[len(prompts) - n_val:])):
        t0 = time.time()
        pairs = label_pairs(cfg, run, ps, gen)
        if ps and not pairs:
            raise SystemExit(f"error: no prompt of the {len(ps)} got both a right and a wrong answer in {k} samples; "
                             f"train the SFT model ({cfg.init_from}) longer, or raise label_samples")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in pairs)
        n_right = len({r["prompt"] for r in pairs})
        print(f"wrote {path}: {len(pairs)} pairs from {len(ps)} prompts x {k} samples ({n_right} prompts with a right "
              f"and a wrong answer) in {time.time() - t0:.0f}s")


def online_setup(cfg, run):
    """What ppo, grpo and rloo share: run gets the reference, the reward model (None: the judge) and the generator;
    returns the step's prompts (a function of it) among those that fit the context with the longest response, and
    the evaluation."""
    run.ref = load_model(cfg.init_from, run.dev)[0].requires_grad_(False)
    run.rm = load_reward_model(cfg.reward_model, run.dev) if cfg.reward_model != "task" else None
    block = run.model.config.block_size
    rows = fitting_rows(cfg.data, [("prompt",)], lambda r: len(prompt_response(run.tok, r["prompt"], "")[0]) +
                        cfg.max_new_tokens <= block, block)
    prompts, run.gen = [r["prompt"] for r in rows], torch.Generator(device=run.dev)

    def step_prompts(it):  # the prompts and the samples are functions of the step: resumes replay exactly
        run.gen.manual_seed(cfg.seed + it)
        return random.Random(cfg.seed + it).sample(prompts, cfg.rollout_batch)
    return step_prompts, held_out(cfg, run, run.ref, run.rm)


def run_ppo(cfg):
    run = setup(cfg)
    run.model.train()
    step_prompts, evaluation = online_setup(cfg, run)
    head = nn.Linear(run.model.config.n_embd, 1).to(run.dev)  # the value head, zero: first values of 0 make no noisy
    nn.init.zeros_(head.weight)  # first advantages for the shared trunk to learn from
    nn.init.zeros_(head.bias)
    loop(cfg, run, dict(value_head=head), lambda it, opt: ppo_step(cfg, run, head, step_prompts(it), opt, cfg.kl_coef),
         evaluation, {})


def run_grpo(cfg):
    """stage=grpo or stage=rloo: the same loop, the baseline differs (grpo_step)."""
    run = setup(cfg)
    run.model.train()
    step_prompts, evaluation = online_setup(cfg, run)
    loop(cfg, run, {}, lambda it, opt: grpo_step(cfg, run, step_prompts(it), opt), evaluation, {})


def main():
    cfg = types.SimpleNamespace(**configure(globals()))
    stages = dict(sft=run_sft, label=run_label, rm=run_rm, ppo=run_ppo, dpo=run_dpo, grpo=run_grpo, rloo=run_grpo)
    if cfg.stage not in stages:  # then the keys that configure's types do not vouch for, before anything loads
        raise SystemExit(f"error: stage must be one of {', '.join(stages)}; got {cfg.stage!r}")
    for key, allowed in (("dpo_loss_type", DPO_LOSS_TYPES), ("grpo_loss_type", GRPO_LOSS_TYPES)):
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"error: {key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    if cfg.dpo_beta <= 0 or cfg.grpo_beta < 0:
        raise SystemExit(f"error: dpo_beta must be > 0 and grpo_beta >= 0; got dpo_beta={cfg.dpo_beta}, grpo_beta="
                         f"{cfg.grpo_beta}")
    if cfg.stage in ("grpo", "rloo") and cfg.num_generations < 2:
        raise SystemExit(f"error: num_generations must be >= 2 (a group needs others to compare with), got "
                         f"{cfg.num_generations}")
    if cfg.stage != "label":  # the label stage writes files of data, no run
        check_out_dir(cfg.out_dir, cfg.resume, resume_flag="--resume=True")
    stages[cfg.stage](cfg)


if __name__ == "__main__":
    main()
