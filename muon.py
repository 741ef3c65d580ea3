"""
Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD with Nesterov momentum whose update of
each 2-D weight is replaced by its nearest semi-orthogonal matrix, approximated by a quintic Newton-Schulz
iteration. The same update as torch.optim.Muon (torch >= 2.9: same coefficients, eps, steps, the "original" lr
scaling x sqrt(max(1, rows/cols)), decoupled weight decay) with one difference: the iteration runs in bfloat16 on
CUDA, where tensor cores make it cheap and Jordan found it harmless, and in float32 elsewhere. A CPU without native
bf16 (AVX2 only) emulates every bf16 matmul, which made a Muon step ~3x an AdamW step (issue 36); fp32 is native
there, and closer to the exact math too. The state (one "momentum_buffer" per weight) and the groups' keys are
torch.optim.Muon's, so a checkpoint written by either resumes in the other.
`orthogonalise` is kept apart from the step: a distributed Muon (each rank orthogonalises the whole matrices it
owns) or another iteration (other coefficients) replaces or reuses it without touching the momentum or the update.
"""
import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's: the steepest slope at 0, converging only roughly to 1
NS_STEPS = 5
EPS = 1e-7  # the norm's floor: a zero gradient stays zero


def orthogonalise(g, dtype, *, coefficients=NS_COEFFICIENTS, steps=NS_STEPS, eps=EPS):
    """~U V^T for g = U S V^T (2-D), computed in dtype: g is scaled to spectral norm <= 1 (its Frobenius norm bounds
    it), then each step maps every singular value s to a s + b s^3 + c s^5. The coefficients push small values up
    fast rather than converge: singular values end in ~(0.7, 1.2) (far smaller ones lower), which trains as well.
    The iteration works on the wide orientation (rows <= cols), so its Gram matrix is the smaller one."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # not in place: with dtype == g.dtype, x is g itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights only (embeddings, heads and gains belong to AdamW). ns_dtype: the dtype of the
    Newton-Schulz iteration; None = bfloat16 on CUDA, float32 elsewhere. It is a property of the machine, not of the
    run, so it is not in the groups (nor in checkpoints)."""

    def __init__(self, params, lr=1e-3, *, weight_decay=0.1, momentum=0.95, ns_dtype=None):
        # the groups carry torch.optim.Muon's keys, whose fixed values step honours, so state dicts load both ways
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                        ns_coefficients=NS_COEFFICIENTS, eps=EPS, ns_steps=NS_STEPS, adjust_lr_fn=None)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):  # only from a torch.optim.Muon checkpoint
                raise ValueError(f"Muon: adjust_lr_fn={group['adjust_lr_fn']!r} is not supported, only 'original'")
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
                update = orthogonalise(update, dtype, coefficients=group["ns_coefficients"],
                                       steps=group["ns_steps"], eps=group["eps"])
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, by the unscaled lr (as torch)
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))
        return loss
