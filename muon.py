"""
Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD with Nesterov momentum whose update of
each 2-D weight is replaced by its nearest semi-orthogonal matrix, approximated by a quintic Newton-Schulz
iteration. The same update as torch.optim.Muon (torch >= 2.9: same coefficients, eps, steps, the "original" lr
scaling x sqrt(max(1, rows/cols)), decoupled weight decay) with three differences:
- the iteration runs in bfloat16 on CUDA, where tensor cores make it cheap and Jordan found it harmless, and in
  float32 elsewhere: a CPU without native bf16 (AVX2 only) emulates every bf16 matmul (a Muon step was ~3x an AdamW
  step there, issue 36); fp32 is native there, and closer to the exact math too;
- same-shaped weights are orthogonalised together, as one batch of matrices: a few large kernels instead of
  fifteen small ones per weight;
- a step can be skipped on the device (found_inf, the hook fused AdamW and GradScaler use): the bad-update guard
  needs no host sync a step.
Over processes, each weight has an owner (the i-th weight of a shape belongs to process i % world) that
orthogonalises it whole, as modded-nanogpt and nanochat do: under ZeRO-1 (owners=True) only the owner keeps its
momentum and steps it, then every process gathers the stepped weights; under FSDP2 (DTensor shards of rows) every
process keeps the momentum of its rows, the owner collects the rows of the update (all_to_all), orthogonalises,
and sends each process its rows back. Under DDP every process steps every weight (no communication).
The state (one "momentum_buffer" per weight) and the groups' keys are torch.optim.Muon's, so a checkpoint written by
either resumes in the other.
Variants, each off by default (off, the update is the one above, bit for bit):
- ns="polar_express" (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): each Newton-Schulz step has its own
  quintic, the minimax-optimal odd polynomial for 1 on the interval the singular values lie in at that step (the
  first [PE_LOWER, 1]; each next one is the polynomial's range), computed here by a Remez exchange;
- normuon=True (Li et al. 2025, arXiv 2510.05491): an EMA of each row's (output neuron's) mean square of the
  orthogonalised update divides that row, so no neuron dominates; the result is rescaled to the Frobenius norm of
  the orthogonalised update, so the lr keeps Muon's meaning (the paper rescales to RMS 0.2 to reuse AdamW's lr).
  Its state, one "row_second_moment" vector per weight, sits where the momentum does (rows of it under FSDP2);
- cautious_wd=True (Chen et al. 2025, arXiv 2510.12402): weight decay only where the update and the weight have
  the same sign, i.e. where the decay goes the way the update goes anyway.
They are properties of the run given to the constructor (like ns_dtype), not in the groups, so state dicts still
load both ways. (Momentum warmup is a schedule of the groups' momentum: train.py sets it each step.)
"""
import functools
import math

import numpy as np
import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's: the steepest slope at 0, converging only roughly to 1
NS_STEPS = 5
EPS = 1e-7  # the norm's floor: a zero gradient stays zero
PE_LOWER = 1e-3  # Polar Express: the smallest singular value (of the normalised update) the schedule lifts to ~1
PE_SAFETY = 1.01  # each polynomial but the last is applied to x / 1.01: bf16's rounding, which can push a value
#                   slightly past its interval, where the quintic grows fast, is not blown up (the paper's margin)
NORMUON_BETA2, NORMUON_EPS = 0.95, 1e-8  # the paper's decay of the rows' second moment, and its floor


def minimax_quintic(lo, hi, iters=100):
    """((a, b, c), E): the odd quintic p(x) = a x + b x^3 + c x^5 nearest the constant 1 on [lo, hi] in the max norm,
    and its error E = max |1 - p|. Remez's exchange: by Chebyshev's alternation theorem the optimum's error takes
    +E, -E, +E, -E at lo, p's two critical points inside and hi; solve for that, move the points to the new critical
    points (p' = 0 is a quadratic in x^2), repeat until they stand still."""
    # Chebyshev's points of [lo, hi]: a start near the answer
    x = (lo + hi) / 2 - (hi - lo) / 2 * np.cos(np.arange(4) * np.pi / 3)
    for _ in range(iters):
        a, b, c, err = np.linalg.solve(np.stack([x, x ** 3, x ** 5, [1.0, -1.0, 1.0, -1.0]], 1), np.ones(4))
        y = np.roots([5 * c, 3 * b, a])
        inner = np.sort(np.sqrt(y[(y.imag == 0) & (y.real > 0)].real))
        new = np.array([lo, *inner[(inner > lo) & (inner < hi)], hi])
        if len(new) != 4 or np.array_equal(new, x):
            break
        x = new
    return (float(a), float(b), float(c)), float(err)


@functools.cache
def polar_express(steps=NS_STEPS, lower=PE_LOWER, safety=PE_SAFETY):
    """Polar Express's schedule: per step, the (a, b, c) of minimax_quintic on [l, u], starting from [lower, 1]
    (the input's spectral norm is <= 1); an optimal p maps [l, u] into [1 - E, 1 + E], the next interval. Each
    polynomial but the last is applied to x / safety, and the next l follows from that (p(l / safety))."""
    lo, hi, schedule = lower, 1.0, []
    for t in range(steps):
        (a, b, c), err = minimax_quintic(lo, hi)
        s = safety if t < steps - 1 else 1.0
        schedule.append((a / s, b / s ** 3, c / s ** 5))
        lo, hi = (a * (lo / s) + b * (lo / s) ** 3 + c * (lo / s) ** 5), 1 + err
    return tuple(schedule)


def orthogonalise(g, dtype, *, coefficients=NS_COEFFICIENTS, steps=NS_STEPS, eps=EPS):
    """~U V^T for g = U S V^T, computed in dtype; g is one matrix or a stack of same-shaped ones (b, rows, cols),
    each orthogonalised alone. g is scaled to spectral norm <= 1 (its Frobenius norm bounds it), then each step maps
    every singular value s to a s + b s^3 + c s^5 (coefficients: one (a, b, c) for `steps` steps, or one per step).
    Jordan's coefficients push small values up fast rather than converge: singular values end in ~(0.7, 1.2) (far
    smaller ones lower), which trains as well. The iteration works on the wide orientation (rows <= cols), so its
    Gram matrix is the smaller one."""
    schedule = coefficients if isinstance(coefficients[0], (tuple, list)) else [coefficients] * steps
    x = g.to(dtype) if g.ndim == 3 else g.to(dtype)[None]
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # not in place: with dtype == g.dtype, x may be g
    for a, b, c in schedule:
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.mT if tall else x
    return x if g.ndim == 3 else x[0]


def local(t):
    """A tensor's part on this process: its FSDP2 shard (DTensor), or itself. (Under no_grad, to_local is a view:
    writing into it writes into the DTensor.)"""
    return t.to_local() if hasattr(t, "to_local") else t


def assign(t, new, skip):
    """t = new, unless skip (a 0-d bool on the device): then t keeps its value, even where new is NaN."""
    t.copy_(new if skip is None else torch.where(skip, t, new))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights only (embeddings, heads and gains belong to AdamW). ns_dtype: the dtype of the
    Newton-Schulz iteration; None = bfloat16 on CUDA, float32 elsewhere. It is a property of the machine, not of the
    run, so it is not in the groups (nor in checkpoints). owners: ZeRO-1's way over processes (the docstring at the
    top); FSDP2's DTensor weights are recognised by themselves. ns ("jordan" | "polar_express"), normuon,
    cautious_wd: the variants (the docstring at the top)."""

    def __init__(self, params, lr=1e-3, *, weight_decay=0.1, momentum=0.95, ns_dtype=None, owners=False,
                 ns="jordan", normuon=False, cautious_wd=False):
        # the groups carry torch.optim.Muon's keys, whose fixed values step honours, so state dicts load both ways
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                        ns_coefficients=NS_COEFFICIENTS, eps=EPS, ns_steps=NS_STEPS, adjust_lr_fn=None)
        super().__init__(params, defaults)
        if ns not in ("jordan", "polar_express"):
            raise ValueError(f"Muon: ns={ns!r} is not 'jordan' or 'polar_express'")
        self.ns_dtype, self.found_inf = ns_dtype, None
        self.schedule = polar_express() if ns == "polar_express" else None  # None: the groups' (Jordan's)
        self.normuon, self.cautious_wd = normuon, cautious_wd
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.owners = owners and self.world > 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")
        self.owner = {p: i % self.world for _, same in self.by_shape() for i, p in enumerate(same)}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.owners:  # ZeRO-1: each process keeps the momentum of the weights it owns only
            for p in [p for p in self.state if self.owner[p] != self.rank]:
                del self.state[p]

    def by_shape(self):
        """(group, its weights of one shape), for every group and shape, in a fixed order (the same everywhere)."""
        for group in self.param_groups:  # (load_state_dict replaces the group dicts: never keep them)
            same = {}
            for p in group["params"]:
                same.setdefault(tuple(p.shape), []).append(p)
            yield from ((group, ps) for ps in same.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = None if self.found_inf is None else self.found_inf.bool()
        for group, same in self.by_shape():
            if group["adjust_lr_fn"] not in (None, "original"):  # only from a torch.optim.Muon checkpoint
                raise ValueError(f"Muon: adjust_lr_fn={group['adjust_lr_fn']!r} is not supported, only 'original'")
            if hasattr(same[0], "to_local") or self.owners:  # the owners' layout: all of a shape or none
                if all(p.grad is not None for p in same):
                    (self.step_sharded if hasattr(same[0], "to_local") else self.step_owned)(group, same, skip)
                continue
            same = [p for p in same if p.grad is not None]
            if same:
                self.apply(group, same, self.orthogonalised(group, [self.momentum(group, p, skip) for p in same]),
                           skip)
        return loss

    def momentum(self, group, p, skip):
        """The momentum buffer (of this process's rows, under FSDP2) advanced by p's gradient, and the update:
        Nesterov's look-ahead blend of the two."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        g, buf = local(p.grad), local(state["momentum_buffer"])
        assign(buf, buf.lerp(g, 1 - group["momentum"]), skip)
        return g.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def dtype(self, t):
        return self.ns_dtype or (torch.bfloat16 if t.is_cuda else torch.float32)

    def orthogonalised(self, group, updates):
        return orthogonalise(torch.stack(updates), self.dtype(updates[0]), eps=group["eps"],
                             coefficients=self.schedule or group["ns_coefficients"], steps=group["ns_steps"])

    def row_state(self, p):
        """Zeros, one per row of p: its rows here (a DTensor of p's layout under FSDP2, which checkpoints gather)."""
        rows = torch.zeros(len(local(p)), device=p.device, dtype=p.dtype)
        if not hasattr(p, "to_local"):
            return rows
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(rows, p.device_mesh, p.placements, shape=(p.size(0),), stride=(1,))

    def normalised(self, params, updates, skip):
        """NorMuon: each row of each orthogonalised update (its rows here) divided by the root of the EMA of its mean
        square, then the update rescaled to its Frobenius norm before. Under FSDP2 the norms are summed over the
        processes (one all_reduce), so the result is the whole weight's."""
        rows, sums = [], []
        for p, o in zip(params, updates):
            if "row_second_moment" not in self.state[p]:
                self.state[p]["row_second_moment"] = self.row_state(p)
            v, o = local(self.state[p]["row_second_moment"]), o.float()
            new = v.lerp(o.square().mean(1), 1 - NORMUON_BETA2)
            assign(v, new, skip)
            rows.append(o / (new.sqrt()[:, None] + NORMUON_EPS))
            sums.append(torch.stack([o.square().sum(), rows[-1].square().sum()]))
        sums = torch.stack(sums)
        if hasattr(params[0], "to_local"):
            dist.all_reduce(sums)
        return [r * (s[0] / s[1].clamp(min=1e-30)).sqrt() for r, s in zip(rows, sums)]  # a zero update stays zero

    def apply(self, group, params, updates, skip):
        """Each weight (its rows here) after decoupled weight decay (by the unscaled lr, as torch; with cautious_wd
        only where the update has the weight's sign) and its update (NorMuon's, with normuon)."""
        lr, wd = group["lr"], group["weight_decay"]
        updates = self.normalised(params, updates, skip) if self.normuon else updates
        for p, u in zip(params, updates):
            w, scale = local(p), math.sqrt(max(1, p.size(0) / p.size(1)))
            decayed = w.sub(w * (u * w >= 0), alpha=lr * wd) if self.cautious_wd else w.mul(1 - lr * wd)
            assign(w, decayed.add_(u, alpha=-lr * scale), skip)

    def step_owned(self, group, same, skip):
        """ZeRO-1: this process steps the weights it owns, then each `world` of them are gathered, in place."""
        mine = [p for p in same if self.owner[p] == self.rank]
        if mine:
            self.apply(group, mine, self.orthogonalised(group, [self.momentum(group, p, skip) for p in mine]), skip)
        for i in range(0, len(same), self.world):
            chunk = same[i:i + self.world]
            chunk += [torch.empty_like(same[0]) for _ in range(self.world - len(chunk))]
            dist.all_gather(chunk, chunk[self.rank])

    def step_sharded(self, group, same, skip):
        """FSDP2: rank k holds rows [k*n, (k+1)*n) of every weight (n = ceil(rows/world), torch.chunk's split, the
        last shards shorter or empty), padded here to n rows so that every piece has one size. Each `world` weights,
        one all_to_all sends the owner its rows of the update, another returns the orthogonalised rows."""
        rows, world = same[0].size(0), self.world
        n = -(-rows // world)
        pad = lambda t: torch.cat([t, t.new_zeros(n - len(t), t.size(1))]) if len(t) < n else t
        updates = [pad(self.momentum(group, p, skip)) for p in same]
        chunks = range(0, len(same), world)
        mine = []
        for i in chunks:
            send = updates[i:i + world] + [torch.zeros_like(updates[0])] * (world - len(updates[i:i + world]))
            recv = [torch.empty_like(updates[0]) for _ in range(world)]
            dist.all_to_all(recv, send)
            if i + self.rank < len(same):
                mine.append(torch.cat(recv)[:rows])
        ortho = self.orthogonalised(group, mine) if mine else None
        for j, i in enumerate(chunks):
            if i + self.rank < len(same):
                send = list(torch.cat([ortho[j], ortho.new_zeros(n * world - rows, ortho.size(2))]).split(n))
            else:
                send = [updates[0].new_zeros(n, updates[0].size(1), dtype=self.dtype(updates[0]))] * world
            recv = [torch.empty_like(send[0]) for _ in range(world)]
            dist.all_to_all(recv, send)
            params = same[i:i + world]
            self.apply(group, params, [r[:len(local(p))] for r, p in zip(recv, params)], skip)
