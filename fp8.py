"""
8-bit float matmuls and the chunked loss. scale.parallelize swaps them in at one call site; the model file knows
nothing of them.

The chunked loss (loss_chunk > 0, LinearCrossEntropy): the cross-entropy of x @ w.T without ever holding the
(N, vocab) logits, a chunk of rows at a time, each chunk's gradient turned at once into those of x and w.

fp8 (H100-class GPUs, compute capability 8.9+): matmuls in 8-bit floats, e4m3 for the forward's operands and
e5m2 for the output's gradient, one scale per tensor (Micikevicius et al. 2022, "FP8 formats for deep learning",
arXiv:2209.05433). The tensor cores multiply fp8 at twice their bf16 rate and accumulate in fp32; the scales are
multiplied back in the matmul's epilogue. On a CPU the same fp8 values are multiplied in fp32, so the tests run
everywhere. The weights stay the model's fp32 Parameters (checkpoints, export and optimizers see no difference);
evaluation and generation stay in bf16.
- fp8='head' (`use_fp8_head`): the lm_head and its loss as one autograd Function, the loss in fp32.
- fp8='mlp' (`use_fp8_mlp`): every block's MLP matmuls (c_fc, c_proj), each an autograd Function, Float8Matmul.
- fp8='both': the two together.

Both losses make the loss and its gradient d loss / d logits in the forward, with cross_entropy_sum.
"""
import functools
import types

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits, targets, grad_scale=None):
    """The cross-entropy of logits (N, vocab) against targets (N,), summed over the rows with a target (-1: none);
    and, given grad_scale, its gradient d sum / d logits = softmax - onehot, times grad_scale on those rows and
    0 on the others (else None). Used by both heads: chunk_loss and Float8LinearCrossEntropy."""
    lse = torch.logsumexp(logits, dim=-1)
    keep = targets != -1
    tgt = targets.clamp(min=0)[:, None]
    loss = torch.where(keep, lse - logits.gather(1, tgt).squeeze(1), 0.0).sum()
    if grad_scale is None:
        return loss, None
    # onehot by comparison, not a scatter: compiled, the gradient comes out of the kernel that reads the logits,
    # with no (N, vocab) fp32 buffer in between (the fp8 head writes it straight to e5m2)
    onehot = torch.arange(logits.size(1), device=logits.device) == tgt
    g = (logits - lse[:, None]).exp() - onehot.to(logits.dtype)  # in [-1, 1]
    return loss, g * (keep.to(logits.dtype) * grad_scale)[:, None]

# ---------------------------------------------------------------------------- the loss without the logits


def chunk_loss(xs, w, ts, n, need_grad):
    """One chunk of LinearCrossEntropy: the summed loss of rows xs (c, C) against targets ts (c,), and, if
    need_grad, d loss / d logits (c, vocab) in xs's dtype, for a loss that is a mean over n rows."""
    acc = torch.promote_types(w.dtype, torch.float32)  # fp32 (fp64 in tests) for logits and sums
    loss, g = cross_entropy_sum((xs @ w.t()).to(acc), ts, 1 / n.to(acc) if need_grad else None)
    return loss, None if g is None else g.to(xs.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ w.T, targets, ignore_index=-1) without ever holding the (N, vocab) logits.

    The plain loss keeps B*T*vocab logits for the backward (3.3 GB in bf16 for GPT-2 at 32x1024, twice that
    once upcast to fp32). Here the rows go through `chunk` at a time: a chunk's logits are made in fp32, its
    loss summed, and its gradient d loss / d logits = (softmax - onehot) / n is turned at once into the
    gradients of x and w (two matmuls the backward would do anyway). Same FLOPs, one chunk of logits alive;
    the backward only scales the stored gradients. x: (N, C), w: (vocab, C), targets: (N,) int64.
    step: chunk_loss, or a torch.compile of it (scale.parallelize): the loop over chunks stays in Python.
    (Traced whole into a compiled model, the chunks' buffers held ~5 GiB more, GPT-2 at 32x1024, H100.)"""

    @staticmethod
    def forward(ctx, x, w, targets, chunk, step=chunk_loss):
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) if need_w else None
        if torch.is_autocast_enabled(x.device.type):  # cast once here, not once per chunk and matmul
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
        n = (targets != -1).sum()  # the mean is over positions with a target, as F.cross_entropy's
        loss = 0.0
        for s in range(0, x.size(0), chunk):
            xs = x[s:s + chunk]
            chunk_sum, g = step(xs, w, targets[s:s + chunk], n, need_x or need_w)
            loss = loss + chunk_sum
            if need_x:
                gx[s:s + chunk] = g @ w
            if need_w:
                gw += g.t() @ xs
        ctx.save_for_backward(gx, gw)
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return (None if gx is None else gx * grad, None if gw is None else gw * grad, None, None, None)


def chunked_head_loss(chunk, step=chunk_loss):
    """A GPT.head_loss for LinearCrossEntropy, `chunk` rows of logits at a time (no logits are returned)."""
    def head_loss(self, x, targets):
        return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), chunk, step)
    return head_loss

# ---------------------------------------------------------------------------- the fp8 head


def to_fp8(t, dtype):
    """t in 8-bit floats with one fp32 scale for the whole tensor, chosen so that its largest magnitude lands on
    dtype's largest finite value (tensorwise dynamic scaling). Returns the fp8 tensor and the inverse scale."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.detach().abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


@torch.library.custom_op("scratchlm::fp8_t", mutates_args=())
def fp8_t(t: torch.Tensor) -> torch.Tensor:
    """t.t().contiguous() for a 2-D fp8 tensor, as an op the compiler cannot fuse into the kernel that made t.
    Fused, that kernel stores each fp8 value twice, as is and transposed, and Triton 3.6 (torch 2.11) miscompiles
    the transposed store for most launch configs on an H100 (triton-lang/triton#11111), which gives NaN
    gradients. The transpose compiled on its own is right, and 6x faster than torch's copy kernel."""
    if t.is_cuda:
        return compiled_transpose()(t)
    return t.t().clone(memory_format=torch.contiguous_format)


@fp8_t.register_fake
def _(t):
    return t.new_empty(t.shape[1], t.shape[0])


@functools.cache
def compiled_transpose():  # once per shape and dtype (dynamic=False): faster than one kernel for any shape
    return torch.compile(lambda t: t.t().contiguous(), dynamic=False)


def scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
    """(a * scale_a) @ (b * scale_b) for fp8 a (N, K) row-major and b (K, M) column-major. On the GPU this is
    torch._scaled_mm. torch's CPU version is a slow reference loop (1.4 s for 1024x64 @ 64x256), so on the CPU
    the same fp8 values are multiplied in fp32: equal up to the order of the sums."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)
    with torch.autocast(a.device.type, enabled=False):  # in fp32 under bf16 autocast too, as the GPU's epilogue
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def fp8_forward(x, w, out_dtype):
    """y = x @ w.T with both operands in e4m3, and those operands (x8, w8 and their scales) for the backward."""
    x8, sx = to_fp8(x, torch.float8_e4m3fn)
    w8, sw = to_fp8(w, torch.float8_e4m3fn)
    return scaled_mm(x8, w8.t(), sx, sw, out_dtype, fast_accum=True), x8, w8, sx, sw


def fp8_grads(g8, sg, x8, w8, sx, sw, dtypes):
    """The gradients of x and w for y = x @ w.T, from y's gradient g8 * sg (e5m2) and the fp8 operands."""
    gx = scaled_mm(g8, fp8_t(w8).t(), sg, sw, dtypes[0])
    gw = scaled_mm(fp8_t(g8), fp8_t(x8).t(), sg, sx, dtypes[1])  # (M, N) @ (N, K)
    return gx, gw


class Float8LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ w.T, targets, ignore_index=-1) with the matmuls in fp8 (the lm_head);
    returns (loss, logits), the logits detached. Scaling a gradient by its largest entry would cost one more
    pass over it: for the (N, vocab) logits, 3.3 GB in bf16 (GPT-2 at 32x1024). Here the bound
    is known: d loss / d logits = (softmax - onehot) * grad / n, and softmax - onehot lies in [-1, 1]. So
    (softmax - onehot) * e5m2's max goes straight to e5m2, with scale grad / (n * max). It is made in the
    forward, by the kernel that reads the logits for the loss anyway, and grad, a scalar, only scales the fp8
    matmuls: so the backward keeps 1.65 GB of e5m2 where it kept 3.3 GB of bf16 logits (GPT-2 at 32x1024)."""

    @staticmethod
    def forward(ctx, x, w, targets, out_dtype):  # x: (N, C), w: (vocab, C), targets: (N,)
        logits, x8, w8, sx, sw = fp8_forward(x, w, out_dtype)  # (N, vocab)
        n = (targets != -1).sum()
        # the loss and its gradient in fp32; the gradient goes straight to e5m2, scaled to its largest value
        loss, g = cross_entropy_sum(logits.float(), targets, torch.finfo(torch.float8_e5m2).max)
        ctx.save_for_backward(x8, w8, sx, sw, g.to(torch.float8_e5m2), n)
        ctx.dtypes = x.dtype, w.dtype
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # the logits get no gradient: not even a (N, vocab) fill of zeros
        return loss / n, logits

    @staticmethod
    def backward(ctx, grad, _):
        x8, w8, sx, sw, g8, n = ctx.saved_tensors
        sg = grad.float() / (n * torch.finfo(torch.float8_e5m2).max)  # may be negative: a scale is a factor
        return *fp8_grads(g8, sg, x8, w8, sx, sw, ctx.dtypes), None, None


def fp8_head_loss(self, x, targets):
    """GPT.head_loss with the head's matmuls in fp8 while training (where every dimension is a multiple of 16, the
    fp8 kernels' rule); otherwise the plain one. Bound to the model by use_fp8_head."""
    w, (B, T, C) = self.lm_head.weight, x.shape
    if not (self.training and torch.is_grad_enabled() and B * T % 16 == 0 and C % 16 == 0 and w.size(0) % 16 == 0):
        return type(self).head_loss(self, x, targets)
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    loss, logits = self.fp8_loss(x.reshape(B * T, C), w, targets.reshape(-1), dt)
    return logits.view(B, T, -1), loss


def fp8_logits_loss(x, w, targets, dtype):
    """Float8LinearCrossEntropy as a plain function, which torch.compile can wrap (scale.parallelize does)."""
    return Float8LinearCrossEntropy.apply(x, w, targets, dtype)


def use_fp8_head(model, loss=fp8_logits_loss):
    """Swap fp8_head_loss in for model.head_loss; `loss` may be a torch.compile of fp8_logits_loss."""
    model.fp8_loss = loss
    model.head_loss = types.MethodType(fp8_head_loss, model)

# ---------------------------------------------------------------------------- the fp8 MLP


class Float8Matmul(torch.autograd.Function):
    """x @ w.T with the forward and both gradients' matmuls in fp8, for a Linear of the MLP: fp8_forward and
    fp8_grads, as the head (the forward with the tensor cores' fast accumulation, the gradients without). The
    backward keeps the forward's e4m3 operands (1 byte a value, where a bf16 Linear keeps x in 2 or 4), and the
    output's gradient is cast to e5m2 with its own scale (its largest magnitude, as the operands'): unlike the
    head's, its bound is not known in advance. x: (N, K), w: (M, K); returns (N, M) in out_dtype, the gradients
    in x's and w's dtypes."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        y, x8, w8, sx, sw = fp8_forward(x, w, out_dtype)
        ctx.save_for_backward(x8, w8, sx, sw)
        ctx.dtypes = x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x8, w8, sx, sw = ctx.saved_tensors
        g8, sg = to_fp8(grad.contiguous(), torch.float8_e5m2)  # row-major, as _scaled_mm's first operand must be
        return *fp8_grads(g8, sg, x8, w8, sx, sw, ctx.dtypes), None


def fp8_linear(self, x):
    """nn.Linear.forward with the matmul in fp8 (Float8Matmul) while training, where every dimension is a multiple
    of 16 (the fp8 kernels' rule); otherwise the plain one. The bias, if any, is added in the output's dtype and
    gets its gradient from autograd. Bound to c_fc and c_proj by use_fp8_mlp."""
    w, K = self.weight, x.size(-1)
    if not (self.training and torch.is_grad_enabled() and x.numel() // K % 16 == 0 and K % 16 == 0
            and w.size(0) % 16 == 0):
        return F.linear(x, w, self.bias)
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    y = Float8Matmul.apply(x.reshape(-1, K), w, dt).view(*x.shape[:-1], w.size(0))
    return y if self.bias is None else y + self.bias.to(dt)


def use_fp8_mlp(model):
    """Swap fp8_linear in for the forward of every block's MLP matmuls: c_fc (for SwiGLU the gate and up
    projections, one matmul twice as wide) and c_proj. The modules and their Parameters stay as they are, so
    state dicts, optimizers, checkpointing and FSDP2 (which shards whole blocks) see the same model."""
    for block in model.transformer.h:
        for linear in (block.mlp.c_fc, block.mlp.c_proj):
            linear.forward = types.MethodType(fp8_linear, linear)
