"""
LoRA, low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tune a GPT
by freezing every weight and learning, beside each chosen Linear's W (out, in), an update B @ A of rank r
(B: (out, r), A: (r, in)) scaled by alpha / r. B starts at zero, so the adapted model starts as the model it came
from; only A and B (a few percent of the weights) get gradients and optimizer state.

    from lora import add_lora, lora_state_dict, load_lora, merge_lora, merged_state_dict
    add_lora(model, rank=8, alpha=16, targets="all")   # or ("c_attn", "c_fc"): module-name suffixes
    ...train: only lora_A / lora_B have requires_grad...
    sd = merged_state_dict(model)   # a plain GPT's state dict (W + B @ A * scale), the model left as it is
    merge_lora(model)               # in place: back to a plain GPT, adapters folded into the weights

The wrapper keeps nn.Linear's `weight` and `bias` names, so the base weights keep their state-dict keys and a
merged model is a plain GPT: sample.py, eval.py and export.py need nothing new.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """y = x W^T + b + (x A^T) B^T * scale, W and b the frozen Linear's own Parameters (shared, not copied)."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.in_features, self.out_features, self.scale = linear.in_features, linear.out_features, alpha / rank
        self.weight, self.bias = linear.weight, linear.bias
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **kw))
        # nn.Linear's own init, as the paper's loralib and PEFT do; B = 0 makes the update 0 at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **kw))

    def forward(self, x):
        # two thin matmuls, never the (out, in) product: the low-rank path costs r * (in + out) per token
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.size(0)}, " \
               f"scale={self.scale:g}, bias={self.bias is not None}"


def target_names(model, targets):
    """The names of model's Linears that `targets` picks: "all" = every Linear in the blocks; else a tuple (or a
    comma-separated string) of name suffixes, "c_proj" matching attn.c_proj and mlp.c_proj, "attn.c_proj" one."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all":
        return [n for n in linears if n.startswith("transformer.h.")]
    suffixes = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    names = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    known = sorted({n.rsplit(".", 1)[-1] for n in linears})
    for s in suffixes:
        if not any(n == s or n.endswith("." + s) for n in names):
            raise SystemExit(f"error: lora_targets {s!r} names no Linear of the model (its Linears: "
                             f"{', '.join(known)}; or \"all\": every Linear in the blocks)")
    return names


def swap(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model, rank, alpha, targets="all"):
    """Freeze every parameter of model (a GPT) and wrap the Linears `targets` picks (see target_names) in
    LoRALinear adapters of this rank, scaled by alpha / rank. Returns model, changed in place."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)):
        raise SystemExit(f"error: lora_rank must be an integer >= 1 and lora_alpha a number, not {rank!r}, {alpha!r}")
    names = target_names(model, targets)
    if "lm_head" in names and model.config.tie_embeddings:  # merging would change the token embeddings too
        raise SystemExit("error: lora_targets lm_head: its weight is the token embedding (tie_embeddings); "
                         "adapt the blocks' Linears instead")
    model.requires_grad_(False)
    for name in names:
        swap(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return model


def lora_state_dict(model):
    """Only the adapters: {name: tensor} of every lora_A and lora_B, what a LoRA checkpoint needs beyond its parent."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTERS}


def load_lora(model, sd):
    """Copy the adapters sd (lora_state_dict's) into model, which add_lora gave the same targets and rank."""
    own = lora_state_dict(model)
    wrong = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if wrong:
        raise SystemExit(f"error: the saved adapters do not fit this model ({len(wrong)} names or shapes differ, "
                         f"e.g. {wrong[0]}): check lora_rank and lora_targets")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])


def merged_weight(m):
    """W + B @ A * scale of a LoRALinear, summed in at least fp32 and returned in W's dtype."""
    acc = torch.promote_types(m.weight.dtype, torch.float32)
    return (m.weight.to(acc) + (m.lora_B.to(acc) @ m.lora_A.to(acc)) * m.scale).to(m.weight.dtype)


@torch.no_grad()
def merged_state_dict(model):
    """The state dict the merged model would have (a plain GPT's keys and shapes), leaving model's adapters in
    place: what a checkpoint saves mid-run so that sample.py, eval.py and export.py read it as any other."""
    sd = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in ADAPTERS}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = merged_weight(m)
    return sd


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight and put a plain nn.Linear back: model becomes a plain GPT, every
    parameter trainable again as a fresh GPT's. Returns model, changed in place."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")  # no init work
        linear.weight = nn.Parameter(merged_weight(m))
        linear.bias = m.bias
        swap(model, name, linear)
    return model.requires_grad_(True)
