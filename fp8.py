"""
8-bit float matmuls for the lm_head on H100-class GPUs (compute capability 8.9+), swapped in by train.py at one
call site (`use_fp8_head(model)`, for fp8='head'); the model file knows nothing of it, and evaluation and
generation stay in bf16.

The head and its loss run as one autograd Function: the matmuls in fp8 (e4m3 forward, e5m2 for the gradient,
one scale per tensor; Micikevicius et al. 2022, "FP8 formats for deep learning"), the loss in fp32. The tensor
cores multiply fp8 at twice their bf16 rate and accumulate in fp32; the scales are multiplied back in the
matmul's epilogue. On a CPU the same fp8 values are multiplied in fp32, so the tests run everywhere.
"""
import functools
import types

import torch


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
        lf = logits.float()  # the loss and its gradient in fp32
        lse = torch.logsumexp(lf, dim=-1)
        keep = targets != -1
        tgt = targets.clamp(min=0)
        n = keep.sum()
        loss = torch.where(keep, lse - lf.gather(1, tgt[:, None]).squeeze(1), 0.0).sum() / n
        onehot = torch.arange(logits.size(1), device=logits.device) == tgt[:, None]
        g = ((lf - lse[:, None]).exp() - onehot.float()) * keep[:, None]  # (N, vocab), in [-1, 1]
        g8 = (g * torch.finfo(torch.float8_e5m2).max).to(torch.float8_e5m2)
        ctx.save_for_backward(x8, w8, sx, sw, g8, n)
        ctx.dtypes = x.dtype, w.dtype
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # the logits get no gradient: not even a (N, vocab) fill of zeros
        return loss, logits

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
    """Float8LinearCrossEntropy as a plain function, which torch.compile can wrap (train.parallelize does)."""
    return Float8LinearCrossEntropy.apply(x, w, targets, dtype)


def use_fp8_head(model, loss=fp8_logits_loss):
    """Swap fp8_head_loss in for model.head_loss; `loss` may be a torch.compile of fp8_logits_loss."""
    model.fp8_loss = loss
    model.head_loss = types.MethodType(fp8_head_loss, model)
