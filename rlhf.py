"""
Post-training: SFT, a reward model, PPO, DPO, GRPO and RLOO, one loss function each, side by side:

    python rlhf.py config/sft.py   # supervised fine-tuning on chat demonstrations (loss on assistant tokens only)
    python rlhf.py config/label.py # on-policy preference pairs: the SFT model's samples, compared by the judge
    python rlhf.py config/rm.py    # a reward model: GPT trunk + scalar head, Bradley-Terry loss on preference pairs
    python rlhf.py config/ppo.py   # PPO against the reward model, per-token KL penalty to the frozen SFT model
    python rlhf.py config/dpo.py   # DPO on the same preference pairs, no reward model, no sampling
    python rlhf.py config/grpo.py  # GRPO: groups of samples per prompt, each scored against its group's mean
    python rlhf.py config/rloo.py  # RLOO: the same, each sample scored against the mean of the others

Data is JSONL: SFT `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`; preferences
`{"prompt", "chosen", "rejected"}`; PPO / GRPO / RLOO prompts `{"prompt"}`, a string (one user turn) or messages, in
bpe.py's chat template (rollout.py reads, samples and scores them). `task` picks the judge that scores a response to
a row: "add", the built-in two-digit addition (addition.py: its data and its judge, no download; runs/posttrain.sh
runs every stage on it), or "gsm8k", word problems whose rows carry their "answer" (gsm8k.py; runs/chat.sh):

    python addition.py             # writes data/add/: corpus.txt (pretraining), sft, prefs, prompts (+ held-out)
    python prepare.py --input=data/add/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py
    python rlhf.py config/sft.py && python rlhf.py config/label.py && python rlhf.py config/rm.py  # then any stage

Every stage writes out_dir/: checkpoints in train.py's format (sample.py chats with any), tokenizer.bpe, metrics.jsonl;
`--resume=True` continues. `init_from` is the parent run (pretrained for SFT, SFT for the others), also the frozen
reference of PPO, DPO, GRPO and RLOO. lora_rank > 0 trains LoRA adapters (lora.py) instead of every weight (sft, dpo,
ppo, grpo, rloo); a checkpoint then holds the merged weights as "model", a plain GPT, and the adapters as "lora".
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

import addition
import gsm8k
from checkpoint import check_out_dir, load_checkpoint, open_out_dir, save_checkpoint
from compute import autocast, pick_device, pick_dtype
from configurator import configure
from lora import add_lora, load_lora, lora_state_dict, merged_state_dict
from rollout import (TASK_HINT, evaluate, fitting_rows, forward_hidden, label_pairs, load_model, load_reward_model,
                     pad, pair_batch, pair_fits, prompt_response, read_jsonl, reward_scores, rollout, scores,
                     sequence_logps, sft_example, sft_fits, token_logprobs)
from train import get_lr

# -----------------------------------------------------------------------------
stage = "sft"               # sft | label | rm | ppo | dpo | grpo | rloo
task = "add"                # the judge of responses: add (addition.py) | gsm8k (gsm8k.py: rows carry "answer")
out_dir = "out/add-sft"
init_from = "out/add"       # the parent run's out_dir: the starting weights, and the reference for ppo/dpo/grpo
resume = False              # continue from out_dir's latest checkpoint
data = "data/add/sft.jsonl"           # training data of this stage; a,b,...: several files, concatenated
val_data = "data/add/sft_val.jsonl"   # held-out data of the same format ("" = none)
drop_val_prompts = False    # drop training rows whose prompt is in val_data: a mix of files then cannot leak them
eval_prompts = "data/add/prompts_val.jsonl"  # held-out prompts scored by the task's judge ("" = none)
eval_samples = 200          # held-out prompts per evaluation
reward_model = "out/add-rm"  # ppo/grpo/rloo: a reward model's out_dir, or "task" for the task's judge
reward_pool = "last"        # rm: the head reads the last token (<|end|>), or "mean": its mean over the response
# lora (sft, dpo, ppo, grpo, rloo): train low-rank adapters instead of every weight
lora_rank = 0               # 0 = off: every weight trains
lora_alpha = 16.0           # the update's scale is lora_alpha / lora_rank
lora_targets = "all"        # "all": every Linear in the blocks; or name suffixes, e.g. "c_attn,c_fc"
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
RULES = dict(  # checked by configurator.configure (rules.md); dpo_beta > 0 is checked in main (an open bound)
    stage=("sft", "label", "rm", "ppo", "dpo", "grpo", "rloo"), task=("add", "gsm8k"), reward_pool=("last", "mean"),
    grpo_loss_type=("grpo", "dapo", "dr_grpo"), dpo_loss_type=("sigmoid", "ipo"), eval_samples=(1, None),
    batch_size=(1, None), max_iters=(0, None), learning_rate=(0.0, None), min_lr=(0.0, None), warmup_iters=(0, None),
    weight_decay=(0.0, None), beta1=(0.0, 1.0), beta2=(0.0, 1.0), grad_clip=(0.0, None), eval_interval=(1, None),
    log_interval=(1, None), rollout_batch=(1, None), ppo_epochs=(1, None), minibatch=(1, None),
    max_new_tokens=(1, None), kl_coef=(0.0, None), clip_range=(0.0, None), clip_range_value=(0.0, None),
    vf_coef=(0.0, None), gamma=(0.0, 1.0), lam=(0.0, 1.0), num_generations=(2, None), grpo_beta=(0.0, None),
    rpo_alpha=(0.0, None), label_prompts=(0, None), label_val_prompts=(0, None), label_samples=(1, None),
    lora_rank=(0, None))
TASKS = dict(add=(addition.judge, ("prompt",)), gsm8k=(gsm8k.judge, ("prompt", "answer")))  # judge, a prompt's keys

# ---------------------------------------------------------------------------- the losses, side by side


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


def ppo_step(cfg, run, head, rows, opt, kl_c):
    """Roll out, score, then ppo_epochs passes of clipped updates; returns the step's stats. The value head shares the
    policy's trunk: one forward gives logits and values (half the compute of TRL's separate critic, which matters on
    a CPU), and its gradients reach the policy's weights, which vf_coef = 0.1 keeps small."""
    model, ctx, temp, prompts = run.model, run.ctx, cfg.temperature, [r["prompt"] for r in rows]
    model.eval()  # rollouts and their scoring without dropout
    ids, mask, last, texts, ended = rollout(model, run.tok, prompts, cfg.max_new_tokens, temp, run.gen, ctx)
    with torch.no_grad(), ctx:
        logits, h = forward_hidden(model, ids)
        old_logp = token_logprobs(logits / temp, ids)
        old_values = head(h[:, :-1]).squeeze(-1).float() * mask
        ref_logp = token_logprobs(run.ref(ids)[0] / temp, ids)
        score = scores(run.rm, run.judge, rows, texts, ids, mask, last, ended, no_end_score=cfg.no_end_score)
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


def grpo_step(cfg, run, rows, opt):
    """GRPO (or, stage=rloo, RLOO): num_generations samples per prompt, each scored against the others of its group;
    then PPO's clipped updates with no value model. The KL to the reference is, for GRPO, a term of the loss
    (grpo_beta, k3); for RLOO, as TRL's RLOOTrainer, a penalty on the reward: grpo_beta times the sampled log-ratio
    summed over the response. Returns the step's stats."""
    model, ctx, group, beta, loo = run.model, run.ctx, cfg.num_generations, cfg.grpo_beta, cfg.stage == "rloo"
    model.eval()
    rows = [r for r in rows for _ in range(group)]  # a prompt's samples are adjacent: the groups are rows
    ids, mask, last, texts, ended = rollout(model, run.tok, [r["prompt"] for r in rows], cfg.max_new_tokens,
                                            cfg.temperature, run.gen, ctx)
    # one update on all the samples (TRL's default): the policy is still the one that sampled, so the ratio is
    # exactly 1 and old_logp is the update's own forward, detached; no extra forward for it
    one_update = cfg.ppo_epochs == 1 and cfg.minibatch >= len(rows) and not (loo and beta)
    with torch.no_grad(), ctx:
        old_logp = None if one_update else token_logprobs(model(ids)[0] / cfg.temperature, ids)
        ref_logp = token_logprobs(run.ref(ids)[0] / cfg.temperature, ids) if beta else None
        score = scores(run.rm, run.judge, rows, texts, ids, mask, last, ended, no_end_score=cfg.no_end_score)
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
    stats = minibatch_updates(update, len(rows), cfg.ppo_epochs, cfg.minibatch, run.gen.initial_seed(), ids.device)
    groups = score.view(-1, group)  # stats' kl: the k3 estimate's mean, when there is a reference
    return dict(reward=score.mean().item(), **stats, reward_std=groups.std(1).mean().item(),
                zero_std_frac=(groups.std(1) == 0).float().mean().item(), response_len=mask.sum(1).mean().item())

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
    """init_from's run, with the seed set and LoRA adapters added if lora_rank: run = (dev, ctx, model, tok, judge,
    fields: the keys a prompt row of the task needs) as a namespace."""
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ctx = autocast(dev, pick_dtype(cfg.dtype, dev))
    model, tok = load_model(cfg.init_from, dev, parent)
    if cfg.lora_rank and cfg.stage != "label":
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    judge, fields = TASKS[cfg.task]
    return types.SimpleNamespace(dev=dev, ctx=ctx, model=model, tok=tok, judge=judge, fields=fields)


def held_out(cfg, run, ref=None, rm=None):
    """The evaluation on eval_prompts, as a function: {} without them."""
    rows = read_jsonl(cfg.eval_prompts, [run.fields])[:cfg.eval_samples] if cfg.eval_prompts else []
    return lambda: evaluate(run.model, run.tok, rows, run.ctx, cfg.max_new_tokens, cfg.no_end_score, ref=ref,
                            rm=rm, seed=cfg.seed, judge=run.judge) if rows else {}


def resume_from(cfg, model, opt, heads):
    """Load out_dir's latest checkpoint into model, opt and heads; returns its step. With LoRA the adapters go onto
    init_from's weights, which must give the checkpoint's merged weights again."""
    ckpt = load_checkpoint(cfg.out_dir)
    if ckpt.get("stage") != cfg.stage:
        raise SystemExit(f"error: {cfg.out_dir} holds a {ckpt.get('stage')!r} run, not {cfg.stage!r}; check out_dir")
    if bool(cfg.lora_rank) != ("lora" in ckpt):
        raise SystemExit(f"error: {cfg.out_dir} was trained with lora_rank={ckpt.get('config', {}).get('lora_rank')}"
                         f"; resume it with the same lora_rank")
    if cfg.lora_rank:
        load_lora(model, ckpt["lora"])
        if not all(torch.equal(v.cpu(), ckpt["model"][k].cpu()) for k, v in merged_state_dict(model).items()):
            raise SystemExit(f"error: {cfg.out_dir}'s adapters on {cfg.init_from} do not give its saved weights: "
                             f"init_from changed since the run began; point init_from at the run it started from")
    else:
        model.load_state_dict(ckpt["model"])
    for key, module in dict(optimizer=opt, **heads).items():
        module.load_state_dict(ckpt[key])
    return ckpt.get("iter_num", 0)


def loop(cfg, run, heads, step, evaluation, state):
    """Every training stage's loop, as train.py's: evaluate (and checkpoint) -> step -> log. step(it, opt) takes the
    step's optimizer steps and returns its stats; heads ({checkpoint key: module}) train with the model; state: more
    values each checkpoint keeps (evaluation() fills it)."""
    model = run.model
    params = [p for p in model.parameters() if p.requires_grad] + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    it = resume_from(cfg, model, opt, heads) if cfg.resume else 0
    log = open_out_dir(cfg.out_dir, os.path.join(cfg.init_from, "tokenizer.bpe"), resume=cfg.resume)
    metrics, t0 = Metrics(log, cfg, it), time.time()

    def checkpoint():
        metrics.log(it, **evaluation(), elapsed_s=time.time() - t0)
        weights = dict(model=merged_state_dict(model), lora=lora_state_dict(model)) if cfg.lora_rank else dict(
            model=model.state_dict())  # with LoRA, "model" is merged: a plain GPT that every script reads
        save_checkpoint(cfg.out_dir, dict(
            **weights, optimizer=opt.state_dict(), model_args=asdict(model.config),
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
    rows = read_jsonl(cfg.data, [run.fields])
    random.Random(cfg.seed).shuffle(rows)
    n, n_val, k = cfg.label_prompts, cfg.label_val_prompts, cfg.label_samples
    if n + n_val > len(rows):
        raise SystemExit(f"error: label_prompts + label_val_prompts = {n + n_val} but {cfg.data} has {len(rows)} "
                         f"prompts; lower them")
    val_out = re.sub(r"(\.jsonl)?$", "_val.jsonl", cfg.label_out, count=1)
    os.makedirs(os.path.dirname(cfg.label_out) or ".", exist_ok=True)
    for path, rs in ((cfg.label_out, rows[:n]), (val_out, rows[len(rows) - n_val:])):
        t0 = time.time()
        pairs = label_pairs(run, rs, gen, samples=k, max_new=cfg.max_new_tokens, temperature=cfg.temperature)
        if rs and not pairs:
            raise SystemExit(f"error: no prompt of the {len(rs)} got both a right and a wrong answer in {k} samples; "
                             f"train the SFT model ({cfg.init_from}) longer, or raise label_samples")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in pairs)
        n_right = len({json.dumps(r["prompt"]) for r in pairs})
        print(f"wrote {path}: {len(pairs)} pairs from {len(rs)} prompts x {k} samples ({n_right} prompts with a right "
              f"and a wrong answer) in {time.time() - t0:.0f}s")


def online_setup(cfg, run):
    """What ppo, grpo and rloo share: run gets the reference, the reward model (None: the judge) and the generator;
    returns the step's prompt rows (a function of it) among those that fit the context with the longest response,
    and the evaluation."""
    run.ref = load_model(cfg.init_from, run.dev)[0].requires_grad_(False)
    run.rm = load_reward_model(cfg.reward_model, run.dev) if cfg.reward_model != "task" else None
    block = run.model.config.block_size
    rows = fitting_rows(cfg.data, [run.fields], lambda r: len(prompt_response(run.tok, r["prompt"], "")[0]) +
                        cfg.max_new_tokens <= block, block)
    if cfg.rollout_batch > len(rows):
        raise SystemExit(f"error: rollout_batch={cfg.rollout_batch} but {cfg.data} has {len(rows)} usable prompts "
                         f"(that fit the context with max_new_tokens={cfg.max_new_tokens}); lower rollout_batch")
    run.gen = torch.Generator(device=run.dev)

    def step_rows(it):  # the prompts and the samples are functions of the step: resumes replay exactly
        run.gen.manual_seed(cfg.seed + it)
        return random.Random(cfg.seed + it).sample(rows, cfg.rollout_batch)
    return step_rows, held_out(cfg, run, run.ref, run.rm)


def run_ppo(cfg):
    run = setup(cfg)
    run.model.train()
    step_rows, evaluation = online_setup(cfg, run)
    head = nn.Linear(run.model.config.n_embd, 1).to(run.dev)  # the value head, zero: first values of 0 make no noisy
    nn.init.zeros_(head.weight)  # first advantages for the shared trunk to learn from
    nn.init.zeros_(head.bias)
    loop(cfg, run, dict(value_head=head), lambda it, opt: ppo_step(cfg, run, head, step_rows(it), opt, cfg.kl_coef),
         evaluation, {})


def run_grpo(cfg):
    """stage=grpo or stage=rloo: the same loop, the baseline differs (grpo_step)."""
    run = setup(cfg)
    run.model.train()
    step_rows, evaluation = online_setup(cfg, run)
    loop(cfg, run, {}, lambda it, opt: grpo_step(cfg, run, step_rows(it), opt), evaluation, {})


def main():
    cfg = types.SimpleNamespace(**configure(globals()))  # RULES checked there; what they cannot say, here
    if cfg.dpo_beta <= 0:
        raise SystemExit(f"error: --dpo_beta={cfg.dpo_beta} is out of range; give a value > 0")
    if cfg.stage != "label":  # the label stage writes files of data, no run
        check_out_dir(cfg.out_dir, cfg.resume, resume_flag="--resume=True")
    stages = dict(sft=run_sft, label=run_label, rm=run_rm, ppo=run_ppo, dpo=run_dpo, grpo=run_grpo, rloo=run_grpo)
    stages[cfg.stage](cfg)


if __name__ == "__main__":
    main()
