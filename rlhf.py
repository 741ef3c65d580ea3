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
bpe.py's chat template. The built-in task needs no download (`python bench.py --mode=rlhf` runs every stage):

    python rlhf.py --stage=task    # writes data/add/: corpus.txt (pretraining), sft, prefs, prompts (+ held-out)
    python prepare.py --input=data/add/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py
    python rlhf.py config/sft.py && python rlhf.py config/label.py && python rlhf.py config/rm.py  # then any stage

The task: two-digit addition ("37+48=" -> "37+48=85"), its corpus and demonstrations written by someone who forgets
the carry half the time, so pretraining and SFT learn the slip with the skill; a labeler only has to *check* answers,
so the preference stages can go past the demonstrators: the case RLHF is made for (Ouyang et al. 2022). The 300
held-out problems are in no training set. An RM on offline pairs alone ranks the SFT model's own answers badly, so,
as InstructGPT did, the label stage has the task's judge (a human's stand-in) compare the SFT model's samples.

Every stage writes out_dir/: checkpoints in train.py's format (sample.py chats with any), tokenizer.bpe, metrics.jsonl;
`--resume=True` continues. `init_from` is the parent run (pretrained for SFT, SFT for the others), also the frozen
reference of PPO, DPO, GRPO and RLOO.
"""
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure
from bpe import encode_chat
from checkpoint import load_checkpoint, load_run, model_from_checkpoint, save_checkpoint
from compute import autocast, pick_device, pick_dtype
from train import get_lr

# -----------------------------------------------------------------------------
stage = "sft"               # task | sft | label | rm | ppo | dpo | grpo | rloo
out_dir = "out/add-sft"
init_from = "out/add"       # the parent run's out_dir: the starting weights, and the reference for ppo/dpo/grpo
resume = False              # continue from out_dir's latest checkpoint
data = "data/add/sft.jsonl"           # training data of this stage; a,b,...: several files, concatenated
val_data = "data/add/sft_val.jsonl"   # held-out data of the same format ("" = none)
drop_val_prompts = False    # drop training rows whose prompt is in val_data: a mix of files then cannot leak them
eval_prompts = "data/add/prompts_val.jsonl"  # held-out prompts scored by the task's judge ("" = none)
reward_model = "out/add-rm"  # ppo/grpo: a reward model's out_dir, or "task" for the programmatic judge (task_reward)
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
kl_coef = 0.05              # per-token KL penalty to the reference
target_kl = 0.0             # > 0: adaptive KL controller (Ziegler et al. 2019) steering the KL towards this
kl_horizon = 10000          # the adaptive controller's time constant, in samples
clip_range = 0.2
clip_range_value = 0.2
vf_coef = 0.1
gamma = 1.0
lam = 0.95
rm_baseline = True          # subtract the reward of the reference's greedy answer to the same prompt
no_end_score = -3.0         # the score of an unfinished response: the reward model's means nothing on such text
# grpo / rloo (as TRL's GRPOConfig / RLOOConfig)
num_generations = 8         # samples per prompt, the group whose other members are each sample's baseline
scale_rewards = True        # grpo: divide the advantages by the group's reward std (Dr. GRPO: False)
# dpo, and the two keys whose meaning (and default) depends on the stage, as in TRL's separate configs
beta = None                 # dpo: the implicit reward's scale (None: 0.1); grpo/rloo: the KL coefficient (None: 0.0)
loss_type = None            # dpo: sigmoid | ipo (None: sigmoid); grpo/rloo: grpo | dapo | dr_grpo (None: dapo)
rpo_alpha = 0.0             # > 0: add this times the chosen responses' NLL to the loss (TRL's rpo_alpha)
# label: on-policy preference pairs, the policy's own samples compared by the task's judge
label_out = "data/add/prefs_sft.jsonl"  # the pairs; held-out pairs (disjoint prompts) go to ..._val.jsonl
label_prompts = 2000        # prompts of `data` to sample for the training pairs
label_val_prompts = 300     # further prompts, none of them among those, for the held-out pairs
label_samples = 8           # responses per prompt (InstructGPT showed labelers K = 4..9)
# the built-in task (stage=task)
task_dir = "data/add"
task_slip = 0.5             # how often the corpus and the demonstrations forget a carry
task_held_out = 300         # problems kept out of every training set
eval_samples = 200          # held-out prompts per evaluation
# system
device = "auto"
dtype = "auto"
seed = 1337
# -----------------------------------------------------------------------------
TASK_HINT = "the built-in task's: python rlhf.py --stage=task"

# ---------------------------------------------------------------------------- the built-in task


def task_answer(a, b, slip=0.0, rng=random):
    """The sum as the sloppy writer writes it: a carry out of the units is forgotten with probability slip."""
    forget = (a % 10 + b % 10) >= 10 and rng.random() < slip
    return a + b - 10 if forget else a + b


def task_reward(prompt, response):
    """The programmatic judge: 1.0 for exactly the right answer ("37+48=" -> "37+48=85"), else 0.0."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt if isinstance(prompt, str) else prompt[-1]["content"])
    return float(m is not None and response.strip() == f"{m[0]}{int(m[1]) + int(m[2])}")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_task(task_dir, slip, n_held, seed):
    rng = random.Random(seed)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    held, rest = problems[:n_held], problems[n_held:]

    def worse(a, b):  # a rejected answer: the demonstrators' slip where there is a carry, else a carry that was not
        s, u = a + b, rng.random()  # there, a wrong digit, a digit too many, no working shown, or cut short
        if (a % 10 + b % 10) >= 10:
            return f"{a}+{b}={s - 10}"
        if u < 0.3:
            return f"{a}+{b}={s + 10}"
        if u < 0.55:
            return f"{a}+{b}={s + rng.choice([-2, -1, 1, 2] if s > 1 else [1, 2])}"
        if u < 0.7:
            return f"{a}+{b}={s}{rng.randrange(10)}"
        return str(s) if u < 0.85 else f"{a}+{b}={str(s)[:-1]}"

    os.makedirs(task_dir, exist_ok=True)
    out = lambda name: os.path.join(task_dir, name)  # noqa: E731
    with open(out("corpus.txt"), "w") as f:  # documents of 40 lines, prepare.py's separator
        for _ in range(3000):
            lines = (f"{a}+{b}={task_answer(a, b, slip, rng)}" for a, b in (rng.choice(rest) for _ in range(40)))
            f.write("\n".join(lines) + "\n<|endoftext|>\n")
    # The answer restates the problem, so its digits follow "=" as in pretraining and the skill learned there carries
    # over; a bare "85" after <|end|><|assistant|> would have to be relearned.
    write_jsonl(out("sft.jsonl"), [dict(prompt=f"{a}+{b}=", response=f"{a}+{b}={task_answer(a, b, slip, rng)}")
                                   for a, b in rest[:2000]])
    write_jsonl(out("sft_val.jsonl"), [dict(prompt=f"{a}+{b}=", response=f"{a}+{b}={a + b}") for a, b in held])
    for suffix, ps in (("", rest), ("_val", held)):
        write_jsonl(out(f"prefs{suffix}.jsonl"), [dict(prompt=f"{a}+{b}=", chosen=f"{a}+{b}={a + b}",
                                                       rejected=worse(a, b)) for a, b in ps])
        write_jsonl(out(f"prompts{suffix}.jsonl"), [dict(prompt=f"{a}+{b}=") for a, b in ps])
    print(f"wrote {task_dir}: corpus.txt, sft, prefs, prompts (.jsonl and held-out _val.jsonl); next: python "
          f"prepare.py --input={task_dir}/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py")

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


def whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


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


def scores(rm, prompts, texts, ids, mask, last, ended, no_end_score):
    """(B,) the reward model's scores of sampled responses (rm = load_reward_model's), or the judge's (rm None);
    a response cut off before its <|end|> gets no_end_score."""
    s = reward_scores(*rm, ids, mask, last) if rm else torch.tensor(
        [task_reward(p, t) for p, t in zip(prompts, texts)], device=ids.device)
    return torch.where(ended, s, torch.full_like(s, no_end_score))

# ---------------------------------------------------------------------------- the losses, side by side


def sft_loss(model, x, y):
    """Next-token cross-entropy on assistant tokens only (targets -1 elsewhere)."""
    return model(x, y)[1]


def reward_loss(r_chosen, r_rejected):
    """Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r); returns (loss, pairwise accuracy)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


def ppo_loss(logp, old_logp, adv, values, old_values, returns, mask, clip, clip_v):
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
        raise SystemExit(f"error: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
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


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip, beta, loss_type, max_new):
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
        raise SystemExit(f"error: loss_type must be 'grpo', 'dapo' or 'dr_grpo', got {loss_type!r}")
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
def evaluate(model, tok, prompts, ctx, max_new, no_end_score, ref=None, rm=None, seed=0):
    """On held-out prompts: the judge's exact-match accuracy, greedy and sampled at temperature 1; the samples' mean
    reward (reward model, or the judge); KL(policy || ref) summed over the response, estimated from the samples."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    texts = rollout(model, tok, prompts, max_new, 0.0, gen, ctx)[3]
    res = dict(acc_greedy=sum(map(task_reward, prompts, texts)) / len(prompts))
    ids, mask, last, texts, ended = rollout(model, tok, prompts, max_new, 1.0, gen, ctx)
    res["acc_sampled"] = sum(map(task_reward, prompts, texts)) / len(prompts)
    with ctx:
        res["reward"] = scores(rm, prompts, texts, ids, mask, last, ended, no_end_score).mean().item() if rm \
            else res["acc_sampled"]
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


def ppo_step(model, head, ref, rm, tok, prompts, opt, ctx, gen, kl_c, *, max_new, temperature, rm_baseline,
             no_end_score, gamma, lam, epochs, minibatch, clip, clip_v, vf_coef, grad_clip):
    """Roll out, score, then `epochs` passes of clipped updates; returns the step's stats. The value head shares the
    policy's trunk: one forward gives logits and values (half the compute of TRL's separate critic, which matters on
    a CPU), and its gradients reach the policy's weights, which vf_coef = 0.1 keeps small."""
    model.eval()  # rollouts and their scoring without dropout
    ids, mask, last, texts, ended = rollout(model, tok, prompts, max_new, temperature, gen, ctx)
    with torch.no_grad(), ctx:
        logits, h = forward_hidden(model, ids)
        old_logp = token_logprobs(logits / temperature, ids)
        old_values = head(h[:, :-1]).squeeze(-1).float() * mask
        ref_logp = token_logprobs(ref(ids)[0] / temperature, ids)
        score = scores(rm, prompts, texts, ids, mask, last, ended, no_end_score)
        if rm and rm_baseline:
            # Bradley-Terry fixes rewards only up to a constant per prompt, which here varies more between prompts
            # than right and wrong answers differ: subtract the score of the reference's greedy answer (a baseline)
            ref_ids, ref_mask, ref_last, _, _ = rollout(ref, tok, prompts, max_new, 0.0, gen, ctx)
            score = torch.where(ended, score - reward_scores(*rm, ref_ids, ref_mask, ref_last), score)
    kl = (old_logp - ref_logp) * mask  # per-token log-ratio on the sampled tokens: a KL estimate
    rewards = -kl_c * kl
    rewards[torch.arange(len(prompts), device=ids.device), last - 1] += score  # on the last response token's slot
    adv, returns = gae(rewards, old_values, mask, gamma, lam)
    adv = whiten(adv, mask)
    model.train()

    def update(mb):
        with ctx:
            logits, h = forward_hidden(model, ids[mb])
            logp = token_logprobs(logits / temperature, ids[mb])
            values = head(h[:, :-1]).squeeze(-1).float()
        pg, vf, cf = ppo_loss(logp, old_logp[mb], adv[mb], values, old_values[mb], returns[mb], mask[mb], clip, clip_v)
        optimize(opt, pg + vf_coef * vf, grad_clip)
        with torch.no_grad():
            lp = F.log_softmax(logits[:, :-1].float() / temperature, -1)
            ent = masked_mean(-(lp.exp() * lp).sum(-1), mask[mb])
        return dict(pg_loss=pg, value_loss=vf, clipfrac=cf, entropy=ent)
    stats = minibatch_updates(update, len(prompts), epochs, minibatch, gen.initial_seed(), ids.device)
    return dict(reward=score.mean().item(), kl=kl.sum(1).mean().item(), **stats,
                response_len=mask.sum(1).mean().item(), kl_coef=kl_c)


def grpo_step(model, ref, rm, tok, prompts, opt, ctx, gen, *, group, leave_one_out, scale_rewards, max_new,
              temperature, no_end_score, beta, loss_type, epochs, minibatch, clip, grad_clip):
    """GRPO (or, leave_one_out, RLOO): `group` samples per prompt, each scored against the others of its group; then
    PPO's clipped updates with no value model. The KL to the reference is, for GRPO, a term of the loss (beta, k3);
    for RLOO, as TRL's RLOOTrainer, a penalty on the reward: beta times the sampled log-ratio summed over the response.
    Returns the step's stats."""
    model.eval()
    prompts = [p for p in prompts for _ in range(group)]  # a prompt's samples are adjacent: the groups are rows
    ids, mask, last, texts, ended = rollout(model, tok, prompts, max_new, temperature, gen, ctx)
    # one update on all the samples (TRL's default): the policy is still the one that sampled, so the ratio is
    # exactly 1 and old_logp is the update's own forward, detached; no extra forward for it
    one_update = epochs == 1 and minibatch >= len(prompts) and not (leave_one_out and beta)
    with torch.no_grad(), ctx:
        old_logp = None if one_update else token_logprobs(model(ids)[0] / temperature, ids)
        ref_logp = token_logprobs(ref(ids)[0] / temperature, ids) if beta else None
        score = scores(rm, prompts, texts, ids, mask, last, ended, no_end_score)
    reward = score - beta * ((old_logp - ref_logp) * mask).sum(1) if leave_one_out and beta else score
    adv = rloo_advantages(reward, group) if leave_one_out else group_advantages(reward, group, scale_rewards)
    model.train()

    def update(mb):
        with ctx:
            logp = token_logprobs(model(ids[mb])[0] / temperature, ids[mb])
        loss, cf, kl = grpo_loss(logp, logp.detach() if one_update else old_logp[mb],
                                 None if ref_logp is None else ref_logp[mb], adv[mb],
                                 mask[mb], clip, 0.0 if leave_one_out else beta, loss_type, max_new)
        optimize(opt, loss, grad_clip)
        return dict(loss=loss, clipfrac=cf, kl=kl) if ref_logp is not None else dict(loss=loss, clipfrac=cf)
    stats = minibatch_updates(update, len(prompts), epochs, minibatch, gen.initial_seed(), ids.device)
    groups = score.view(-1, group)  # stats' kl: the k3 estimate's mean, when there is a reference
    return dict(reward=score.mean().item(), **stats, reward_std=groups.std(1).mean().item(),
                zero_std_frac=(groups.std(1) == 0).float().mean().item(), response_len=mask.sum(1).mean().item())

# ---------------------------------------------------------------------------- on-policy comparisons


@torch.no_grad()
def label_pairs(model, tok, prompts, ctx, gen, k, max_new, temperature, judge=task_reward):
    """InstructGPT's comparison data: k samples per prompt from the policy, and the labeler (here the task's judge,
    standing in for a human) prefers a correct answer to each distinct wrong one: the policy's actual mistakes, the
    answers PPO will see. A prompt with no correct or no wrong sample gives no pair (a labeler writes no answer)."""
    model.eval()
    pairs = []
    for i in range(0, len(prompts), 64):
        batch = prompts[i:i + 64]
        _, _, _, texts, ended = rollout(model, tok, [p for p in batch for _ in range(k)], max_new, temperature,
                                        gen, ctx)
        for j, p in enumerate(batch):  # unfinished samples are left out: PPO scores them no_end_score anyway
            done = [t for t, e in zip(texts[j * k:(j + 1) * k], ended[j * k:(j + 1) * k].tolist()) if e]
            good = [t for t in done if judge(p, t)]
            bad = dict.fromkeys(t for t in done if not judge(p, t))
            pairs += [dict(prompt=p, chosen=good[0], rejected=t) for t in bad] if good else []
    return pairs

# ---------------------------------------------------------------------------- a run's plumbing


def start(out_dir, init_from, stage, resume, model, opt, heads):
    """Resume model, heads ({checkpoint key: module}) and optimizer from out_dir's latest checkpoint, or make sure
    a fresh run overwrites none; out_dir gets the tokenizer. Returns the checkpoint's iter_num and its dict."""
    ckpt = {}
    if resume:
        ckpt = load_checkpoint(out_dir)
        if ckpt.get("stage") != stage:
            raise SystemExit(f"error: {out_dir} holds a {ckpt.get('stage')!r} run, not {stage!r}; check out_dir")
        model.load_state_dict(ckpt["model"])
        for key, head in heads.items():
            head.load_state_dict(ckpt[key])
        opt.load_state_dict(ckpt["optimizer"])
    elif os.path.exists(os.path.join(out_dir, "latest.json")):
        raise SystemExit(f"error: {out_dir} already has a checkpoint; pass --resume=True to continue it, "
                         f"or choose another out_dir")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(os.path.join(init_from, "tokenizer.bpe"), os.path.join(out_dir, "tokenizer.bpe"))
    return ckpt.get("iter_num", 0), ckpt


def save(out_dir, stage, iter_num, model, opt, tok, config, heads=None, **extra):
    save_checkpoint(out_dir, dict(model=model.state_dict(), optimizer=opt.state_dict(), model_args=asdict(
        model.config), tokenizer_hash=tok.hash, iter_num=iter_num, stage=stage, config=config,
        **{k: h.state_dict() for k, h in (heads or {}).items()}, **extra))


class Metrics:
    """out_dir/metrics.jsonl, each row also printed. step() averages the stats of log_interval steps into one
    row, printed with the step rate (evaluations included) and the ETA."""

    def __init__(self, out_dir, stage, iter_num, max_iters, log_interval):
        self.f = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.stage, self.it0, self.max_iters, self.every, self.t0, self.sums = \
            stage, iter_num, max_iters, log_interval, time.time(), {}

    def log(self, step, tail="", **row):
        self.f.write(json.dumps(dict(stage=self.stage, step=step, **row)) + "\n")
        self.f.flush()
        print(f"{self.stage} {step}/{self.max_iters}: " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()) + tail, flush=True)

    def step(self, step, stats, lr):
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / self.every
        if step % self.every == 0:
            dt = (time.time() - self.t0) / (step - self.it0)
            self.log(step, f" | {dt:.3g} s/step, ETA {dt * (self.max_iters - step):.0f}s", **self.sums, lr=lr)
            self.sums = {}

# ---------------------------------------------------------------------------- the stages
# Each run_* is main's own code for one stage, reading the config globals as train.py's main does (and so do the
# few helpers here); every function above takes what it needs as arguments.


def setup(parent="train one with python rlhf.py config/sft.py"):
    """(device, autocast context, model, tokenizer): init_from's run, with the global seed set."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    ctx = autocast(dev, pick_dtype(dtype, dev))
    return (dev, ctx, *load_model(init_from, dev, parent))


def held_out(model, tok, ctx, ref=None, rm=None):
    """The evaluation on eval_prompts, as a function: {} without them."""
    prompts = [r["prompt"] for r in read_jsonl(eval_prompts, [("prompt",)])][:eval_samples] if eval_prompts else []
    return lambda: evaluate(model, tok, prompts, ctx, max_new_tokens, no_end_score, ref, rm, seed) if prompts else {}


def loop(config, model, tok, heads, step, evaluation, state):
    """Every training stage's loop, as train.py's: evaluate (and checkpoint) -> step -> log. step(it, opt) takes the
    step's optimizer steps and returns its stats; heads ({checkpoint key: module}) train with the model; state: more
    values each checkpoint keeps, restored on resume."""
    params = list(model.parameters()) + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
    it, ckpt = start(out_dir, init_from, stage, resume, model, opt, heads)
    state.update({k: ckpt[k] for k in state if k in ckpt})
    metrics, t0 = Metrics(out_dir, stage, it, max_iters, log_interval), time.time()

    def checkpoint():
        metrics.log(it, **evaluation(), elapsed_s=time.time() - t0)
        save(out_dir, stage, it, model, opt, tok, config, heads, **state)

    if it == 0:
        checkpoint()
    while it < max_iters:
        lr = get_lr(it, learning_rate, warmup_iters, max_iters, min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = step(it, opt)
        it += 1
        metrics.step(it, stats, lr)
        if it % eval_interval == 0 or it == max_iters:
            checkpoint()
    print(f"done: {stage} in {time.time() - t0:.0f}s; checkpoint in {out_dir}")


def fit(config, model, tok, ctx, batch_fn, fields, fits, heads=None, ref=None, judge=True, extra=None,
        hint=TASK_HINT):
    """The offline stages (sft, rm, dpo): each step a step of the loss batch_fn(rows) on a batch drawn by the step's
    seed; each evaluation the held-out loss and, if judge, the judge's figures; extra(results, rows): more for the
    checkpoint. With a reference (dpo), each row carries its log-probs."""
    block = model.config.block_size
    rows = fitting_rows(data, fields, lambda r: fits(tok, block, r), block, hint)
    val_rows = fitting_rows(val_data, fields, lambda r: fits(tok, block, r), block, hint)
    if drop_val_prompts:
        held, n = {json.dumps(r.get("prompt")) for r in val_rows}, len(rows)
        rows[:] = [r for r in rows if json.dumps(r.get("prompt")) not in held]
        print(f"dropped {n - len(rows)} training rows whose prompt is in {val_data}")
    for rs in (rows, val_rows) if ref is not None else ():
        for r, lp in zip(rs, sequence_logps(ref, tok, rs, ctx).tolist() if rs else []):
            r["ref_logps"] = lp
    judged, state = held_out(model, tok, ctx, ref) if judge else (lambda: {}), {}

    def evaluation():
        res = mean_over(model, batch_fn, val_rows, batch_size, ctx) if val_rows else {}
        res.update(judged())
        state.update(extra(res, rows) if extra else {})
        return res

    def step(it, opt):
        idx = random.Random(seed + it).sample(range(len(rows)), min(batch_size, len(rows)))  # resumes replay exactly
        with ctx:
            loss, stats = batch_fn([rows[i] for i in idx])
        optimize(opt, loss, grad_clip)
        return dict(loss=loss.item(), **stats)
    loop(config, model, tok, heads or {}, step, evaluation, state)


def sft_fits(tok, block, row):  # the whole example in the model's context, and some assistant tokens to learn
    x, y = sft_example(tok, row)
    return len(x) <= block and any(t != -1 for t in y)


def pair_fits(tok, block, row):
    return max(len(prompt_response(tok, row["prompt"], row[k])[0]) for k in ("chosen", "rejected")) <= block


def run_sft(config):
    _, ctx, model, tok = setup("pretrain one: python train.py config/add.py (the built-in task's)")
    fit(config, model.train(), tok, ctx, lambda rows: sft_batch(model, tok, rows),
        [("messages",), ("prompt", "response")], sft_fits)


def run_rm(config):
    dev, ctx, model, tok = setup()
    head = nn.Linear(model.config.n_embd, 1).to(dev)  # random, so the trunk gets gradients at once
    nn.init.normal_(head.weight, std=model.config.n_embd ** -0.5)
    nn.init.zeros_(head.bias)
    rm_loss = lambda rows: rm_batch(model, head, reward_pool, tok, rows)  # noqa: E731

    def reward_stats(res, rows):  # the scores' mean and std, which load_reward_model normalises away
        if not res:  # no held-out pairs: the training pairs'
            res = mean_over(model, rm_loss, rows[:256], batch_size, ctx)
        m = res["val_reward_mean"]
        return dict(reward_stats=(m, max(res["val_reward_sq"] - m * m, 1e-8) ** 0.5))
    fit(config, model.train(), tok, ctx, rm_loss, [("prompt", "chosen", "rejected")], pair_fits,
        heads=dict(reward_head=head), judge=False, extra=reward_stats,
        hint="on-policy pairs: python rlhf.py config/label.py, after SFT; offline pairs: python rlhf.py --stage=task")


def run_dpo(config):
    dev, ctx, model, tok = setup()
    ref = load_model(init_from, dev)[0].requires_grad_(False)
    fit(config, model.train(), tok, ctx, lambda rows: dpo_batch(model, beta, loss_type, rpo_alpha, tok, rows),
        [("prompt", "chosen", "rejected")], pair_fits, ref=ref)


def run_label(config):
    """On-policy pairs of label_prompts prompts to label_out, and of label_val_prompts other prompts to its _val
    twin (`data` holds training prompts only, so the eval problems stay out of both)."""
    dev, ctx, model, tok = setup()
    gen = torch.Generator(device=dev).manual_seed(seed)
    prompts = [r["prompt"] for r in read_jsonl(data, [("prompt",)])]
    random.Random(seed).shuffle(prompts)
    if label_prompts + label_val_prompts > len(prompts):
        raise SystemExit(f"error: label_prompts + label_val_prompts = {label_prompts + label_val_prompts} but "
                         f"{data} has {len(prompts)} prompts; lower them")
    val_out = re.sub(r"(\.jsonl)?$", "_val.jsonl", label_out, count=1)
    os.makedirs(os.path.dirname(label_out) or ".", exist_ok=True)
    for path, ps in ((label_out, prompts[:label_prompts]), (val_out, prompts[len(prompts) - label_val_prompts:])):
        t0 = time.time()
        pairs = label_pairs(model, tok, ps, ctx, gen, label_samples, max_new_tokens, temperature)
        if ps and not pairs:
            raise SystemExit(f"error: no prompt of the {len(ps)} got both a right and a wrong answer in "
                             f"{label_samples} samples; train the SFT model ({init_from}) longer, or raise label_samples")
        write_jsonl(path, pairs)
        n = len({r["prompt"] for r in pairs})
        print(f"wrote {path}: {len(pairs)} pairs from {len(ps)} prompts x {label_samples} samples ({n} prompts with "
              f"a right and a wrong answer) in {time.time() - t0:.0f}s")


def online_setup(dev, ctx, model, tok):
    """What ppo, grpo and rloo share: the reference, the reward model (None: the judge), the generator, the step's
    prompts (a function of it) among those that fit the context with the longest response, the evaluation."""
    ref = load_model(init_from, dev)[0].requires_grad_(False)
    rm = load_reward_model(reward_model, dev) if reward_model != "task" else None
    block = model.config.block_size
    rows = fitting_rows(data, [("prompt",)], lambda r: len(prompt_response(tok, r["prompt"], "")[0]) +
                        max_new_tokens <= block, block)
    prompts, gen = [r["prompt"] for r in rows], torch.Generator(device=dev)

    def step_prompts(it):  # the prompts and the samples are functions of the step: resumes replay exactly
        gen.manual_seed(seed + it)
        return random.Random(seed + it).sample(prompts, rollout_batch)
    return ref, rm, gen, step_prompts, held_out(model, tok, ctx, ref, rm)


def run_ppo(config):
    dev, ctx, model, tok = setup()
    ref, rm, gen, step_prompts, evaluation = online_setup(dev, ctx, model.train(), tok)
    head = nn.Linear(model.config.n_embd, 1).to(dev)  # the value head, zero: first values of 0 make no noisy first
    nn.init.zeros_(head.weight)  # advantages for the shared trunk to learn from
    nn.init.zeros_(head.bias)
    state = dict(kl_coef=kl_coef)  # restored on resume: the adaptive controller moves it

    def step(it, opt):
        stats = ppo_step(model, head, ref, rm, tok, step_prompts(it), opt, ctx, gen, state["kl_coef"],
                         max_new=max_new_tokens, temperature=temperature, rm_baseline=rm_baseline,
                         no_end_score=no_end_score, gamma=gamma, lam=lam, epochs=ppo_epochs, minibatch=minibatch,
                         clip=clip_range, clip_v=clip_range_value, vf_coef=vf_coef, grad_clip=grad_clip)
        if target_kl > 0:  # adaptive KL controller (Ziegler et al. 2019): nudge kl_coef towards target_kl
            state["kl_coef"] *= 1 + max(-0.2, min(0.2, stats["kl"] / target_kl - 1)) * rollout_batch / kl_horizon
        return stats
    loop(config, model, tok, dict(value_head=head), step, evaluation, state)


def run_grpo(config):
    """stage=grpo or stage=rloo: the same loop, the baseline differs (grpo_step)."""
    if num_generations < 2:
        raise SystemExit(f"error: num_generations must be >= 2 (a group needs others to compare with), got "
                         f"{num_generations}")
    dev, ctx, model, tok = setup()
    ref, rm, gen, step_prompts, evaluation = online_setup(dev, ctx, model.train(), tok)

    def step(it, opt):
        return grpo_step(model, ref, rm, tok, step_prompts(it), opt, ctx, gen, group=num_generations,
                         leave_one_out=stage == "rloo", scale_rewards=scale_rewards, max_new=max_new_tokens,
                         temperature=temperature, no_end_score=no_end_score, beta=beta, loss_type=loss_type,
                         epochs=ppo_epochs, minibatch=minibatch, clip=clip_range, grad_clip=grad_clip)
    loop(config, model, tok, {}, step, evaluation, {})


def main():
    global beta, loss_type
    config = configure(globals())
    stages = dict(task=None, sft=run_sft, label=run_label, rm=run_rm, ppo=run_ppo, dpo=run_dpo, grpo=run_grpo,
                  rloo=run_grpo)
    if stage not in stages:
        raise SystemExit(f"error: stage must be one of {', '.join(stages)}; got {stage!r}")
    if stage == "task":
        return make_task(task_dir, task_slip, task_held_out, seed)
    if beta is None:  # the stage's default, TRL's
        beta = 0.1 if stage == "dpo" else 0.0
    if loss_type is None:
        loss_type = "sigmoid" if stage == "dpo" else "dapo"
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 0:
        raise SystemExit(f"error: beta must be a number >= 0, got {beta!r}")
    allowed = ("sigmoid", "ipo") if stage == "dpo" else ("grpo", "dapo", "dr_grpo")
    if stage in ("dpo", "grpo", "rloo") and loss_type not in allowed:
        raise SystemExit(f"error: loss_type for stage {stage} must be one of {', '.join(allowed)}; got {loss_type!r}")
    stages[stage](dict(config, beta=beta, loss_type=loss_type))


if __name__ == "__main__":
    main()
