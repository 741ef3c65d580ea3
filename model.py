"""
The GPT. Default: the classic GPT-2 layout (learned positions, pre-norm LayerNorm blocks, GELU MLP, full
multi-head attention, biases, tied embeddings). Each modern piece is one GPTConfig switch; config/llama_*.py
turn on the Llama-3 / Mistral set (RoPE, RMSNorm, SwiGLU, grouped-query attention, no bias).
No data, no optimizer loop, no files: the network, its initialisation, its optimizer groups, and generation
with a KV cache.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=4096, block_size=256))
    logits, loss = model(idx, targets)      # idx, targets: (B, T) int64; logits: (B, T, vocab), detached if targets
    for next_id in model.generate(idx, 100, temperature=0.8, top_k=200): ...   # next_id: (B,)
"""
import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304   # GPT-2's 50257 padded up to a multiple of 128: faster matmuls, same model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True         # biases in Linear and LayerNorm, as GPT-2
    n_kv_head: int = None     # key/value heads: None = n_head (MHA), 1 = multi-query, between = grouped-query
    pos_encoding: str = "learned"  # learned (a wpe table, GPT-2) | rope (rotary, Su et al. 2021; no wpe)
    rope_theta: float = 10000.0    # RoPE base: 10k in the paper and Llama 2, 500k in Llama 3 (longer contexts)
    norm: str = "layernorm"   # layernorm | rmsnorm (Zhang & Sennrich 2019: no mean, no bias; Llama)
    qk_norm: bool = False     # normalise each head's q and k before attention (Dehghani et al. 2023; OLMo 2)
    mlp: str = "gelu"         # gelu | swiglu (Shazeer 2020; Llama) | relu2 (squared ReLU, So et al. 2021)
    mlp_hidden: int = 0       # 0 = 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to a multiple of 64
    sliding_window: int = 0   # >0: each token attends to itself and the window-1 tokens before it (Mistral)
    tie_embeddings: bool = True  # lm_head shares wte's weight (Press & Wolf 2017), as GPT-2
    zero_init_proj: bool = False  # the projections into the residual stream start at 0: each block starts as identity
    logit_softcap: float = 0.0    # >0: logits = cap * tanh(logits / cap), bounded (Gemma 2; modded-nanogpt)
    value_embeds: bool = False    # extra token tables added to the values of the first and last 3 layers (modded-nanogpt)
    unet_skips: bool = False      # the first half's block outputs added, weighted, to the second half's inputs


def rope_rotations(pos, head_dim, theta):
    """Unit complex numbers (T, head_dim/2) for absolute positions pos (T,), in fp32 whatever the model's
    dtype: channel pair i at position p is rotated by the angle p * theta^(-2i/head_dim)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rot):
    """Rotate x (B, T, heads, head_dim), channels (2i, 2i+1) read as one complex number, by rot (T, head_dim/2).
    A dot product of two rotated vectors then depends only on the difference of their positions. (One
    complex multiply: a few kernels, which counts when a decode step is hundreds of tiny ones.)"""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, head_dim/2) complex
    return torch.view_as_real(xc * rot[:, None]).flatten(-2).type_as(x)


class Norm(nn.Module):
    """LayerNorm, or RMSNorm (x / rms(x) * weight: no mean subtraction, no bias). The bias is optional
    because torch's own LayerNorm cannot drop only the bias."""

    def __init__(self, ndim, kind, bias):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            # the gain in x's dtype: under autocast, QK-norm gets bf16 heads, and mixed dtypes miss the fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


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
    the transposed store for 97 of the 147 launch configs we tried on an H100 (the bug of triton-lang/triton
    #11111). Inductor autotunes the config, so some compiles trained on NaN gradients (every update skipped)."""
    if t.is_cuda:  # compiled on its own (right in all 147 configs), 6x faster than torch's copy kernel
        # once per shape and dtype (GPT-2's g8: 1.17 ms, against 1.79 compiled for any shape, H100): fp8='all'
        # transposes more shapes than dynamo's default limit of 8 compiles per function
        with torch._dynamo.config.patch(cache_size_limit=64):
            return compiled_transpose()(t)
    return t.t().clone(memory_format=torch.contiguous_format)


@fp8_t.register_fake
def _(t):
    return t.new_empty(t.shape[1], t.shape[0])


@functools.cache
def compiled_transpose():
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


class Float8Matmul(torch.autograd.Function):
    """x @ w.T for x (N, K) and w (M, K), with both operands and the output's gradient in 8-bit floats: e4m3
    (more precision) forward, e5m2 (more range) for the gradient (Micikevicius et al. 2022, "FP8 formats for
    deep learning"). The tensor cores multiply fp8 at twice their bf16 rate and accumulate in fp32; the scales
    are multiplied back in the matmul's epilogue. Only x8 and w8 are kept for the backward: half the bytes of
    bf16 activations. The fp8 matmul takes its first operand row-major and its second column-major, hence
    the transposed copies in the backward."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        y, x8, w8, sx, sw = fp8_forward(x, w, out_dtype)
        ctx.save_for_backward(x8, w8, sx, sw)
        ctx.dtypes = x.dtype, w.dtype  # the gradients come back in these
        return y

    @staticmethod
    def backward(ctx, g):  # g: (N, M)
        x8, w8, sx, sw = ctx.saved_tensors
        return *fp8_grads(*to_fp8(g, torch.float8_e5m2), x8, w8, sx, sw, ctx.dtypes), None


class Float8LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ w.T, targets, ignore_index=-1) with the matmuls in fp8 (lm_head, fp8='head' or 'all');
    returns (loss, logits), the logits detached. Float8Matmul scales a gradient by its largest entry, which
    costs one more pass over it: for the (N, vocab) logits, 3.3 GB in bf16 (GPT-2 at 32x1024). Here the bound
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


def fp8_logits_loss(x, w, targets, dtype):
    """Float8LinearCrossEntropy as a plain function: GPT keeps it as self.fp8_loss (train.parallelize may swap in
    its torch.compile), and a Function's own .apply kept there broke torch 2.11's graph (112 ms/step, not 58.5)."""
    return Float8LinearCrossEntropy.apply(x, w, targets, dtype)


class Linear(nn.Linear):
    """nn.Linear. With fp8 set (train.py's fp8 option), its matmul runs through Float8Matmul while training,
    where every dimension is a multiple of 16 (the fp8 kernels' rule); evaluation stays in bf16."""
    fp8 = False

    def fp8_dtype(self, x):
        """The matmul's output dtype if it runs in fp8 for this x, else None."""
        if not (self.fp8 and self.training and torch.is_grad_enabled() and x.numel() // x.size(-1) % 16 == 0
                and self.in_features % 16 == 0 and self.out_features % 16 == 0):
            return None
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def forward(self, x):
        dt = self.fp8_dtype(x)
        if dt is None:
            return super().forward(x)
        y = Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight, dt).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(dt)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        # q, k, v in one matmul; with grouped-query attention k and v have only n_kv_head heads
        self.c_attn = Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True  # scaled at init, see GPT._init_weights
        self.q_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, cache=None, pos=None, ve=None):
        """x (B, T, C). ve: a value embedding (B, T, n_kv_head * head_dim) added to v, or None. rope: rotations (T, head_dim/2) or None. mask: None = causal, else a (G*T, S) "may
        attend" mask, bool or additive, for the G = n_head / n_kv_head query heads that share a kv head: row
        g*T + t is query t's (GPT.sdpa_mask makes it). cache: (k, v) of shape (B, n_kv_head, S, head_dim) each;
        this call's keys and values are written at positions pos (T,), then attention runs over all S cached
        positions (the mask hides the ones not written yet)."""
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hd)  # (B, T, heads, hd): the q heads, k heads, v heads
        qk, v = qkv[:, :, :nh + nkv], qkv[:, :, nh + nkv:]
        if ve is not None:
            v = v + ve.view_as(v)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])], dim=2)
        if rope is not None:  # q and k rotated together: one set of kernels, not two
            qk = apply_rope(qk, rope)
        # (B, T, heads, hd) -> (B, heads, T, hd): heads become a batch dimension for attention
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)
        v = v.transpose(1, 2)
        if cache is not None:
            cache[0].index_copy_(2, pos, k.to(cache[0].dtype))  # in place, same shapes every decode step
            cache[1].index_copy_(2, pos, v.to(cache[1].dtype))
            k, v = cache
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # flash attention where the device has it; causal mask and GQA inside the kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=nkv != nh)
        else:
            # The G = nh / nkv query heads that share a kv head are folded into the query axis,
            # (B, nh, T, hd) -> (B, nkv, G*T, hd) with row g*T + t, so K and V are never copied G times.
            y = F.scaled_dot_product_attention(q.reshape(B, nkv, -1, hd), k, v, attn_mask=mask,
                                               dropout_p=dropout).reshape(B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp_hidden:
            self.hidden = cfg.mlp_hidden
        elif cfg.mlp == "swiglu":  # 3 matrices instead of 2: 2/3 of 4x keeps the parameter count of GELU's
            self.hidden = -(-8 * cfg.n_embd // 3 // 64) * 64
        else:
            self.hidden = 4 * cfg.n_embd
        # SwiGLU's gate and up projections are one matmul of twice the width, split in forward
        self.c_fc = Linear(cfg.n_embd, (2 if self.kind == "swiglu" else 1) * self.hidden, bias=cfg.bias)
        self.c_proj = Linear(self.hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, mask=None, cache=None, pos=None, ve=None):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, pos, ve)
        return x + self.mlp(self.ln_2(x))


def logits_loss(logits, targets):
    """Mean cross-entropy, in fp32, of logits (..., vocab) against targets (...); -1 marks positions without a
    target (padding, prompt tokens in SFT)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def chunk_loss(xs, w, ts, n, need_grad):
    """One chunk of LinearCrossEntropy: the summed loss of rows xs (c, C) against targets ts (c,), and, if
    need_grad, d loss / d logits (c, vocab) in xs's dtype, for a loss that is a mean over n rows."""
    acc = torch.promote_types(w.dtype, torch.float32)  # fp32 (fp64 in tests) for logits and sums
    logits = (xs @ w.t()).to(acc)  # (c, vocab)
    lse = torch.logsumexp(logits, dim=-1)
    keep = ts != -1
    tgt = ts.clamp(min=0)[:, None]
    loss = torch.where(keep, lse - logits.gather(1, tgt).squeeze(1), 0.0).sum()
    if not need_grad:
        return loss, None
    g = (logits - lse[:, None]).exp().scatter_add(1, tgt, torch.full_like(lse[:, None], -1.0))  # softmax - onehot
    return loss, (g * (keep.to(acc) / n)[:, None]).to(xs.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ w.T, targets, ignore_index=-1) without ever holding the (N, vocab) logits.

    The plain loss keeps B*T*vocab logits for the backward (3.3 GB in bf16 for GPT-2 at 32x1024, twice that
    once upcast to fp32). Here the rows go through `chunk` at a time: a chunk's logits are made in fp32, its
    loss summed, and its gradient d loss / d logits = (softmax - onehot) / n is turned at once into the
    gradients of x and w (two matmuls the backward would do anyway). Same FLOPs, one chunk of logits alive;
    the backward only scales the stored gradients. x: (N, C), w: (vocab, C), targets: (N,) int64.
    step: chunk_loss, or a torch.compile of it (train.parallelize): the loop over chunks stays in Python.
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


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        for name, options in (("pos_encoding", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu", "relu2"))):
            if getattr(cfg, name) not in options:
                raise SystemExit(f"error: {name}={getattr(cfg, name)!r} is not one of {', '.join(options)}")
        if cfg.n_embd % cfg.n_head or cfg.n_head % (cfg.n_kv_head or cfg.n_head):
            raise SystemExit(f"error: n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head}), and "
                             f"n_head of n_kv_head ({cfg.n_kv_head})")
        if cfg.pos_encoding == "rope" and (cfg.n_embd // cfg.n_head) % 2:
            raise SystemExit(f"error: rope needs an even head size, n_embd / n_head is {cfg.n_embd // cfg.n_head}")
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=Norm(cfg.n_embd, cfg.norm, cfg.bias),
        ))
        if cfg.pos_encoding == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.value_embeds:  # layer i and layer n_layer-1-i share table i (the U-net pattern of modded-nanogpt)
            kv_dim = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
            self.transformer.ve = nn.ModuleList([nn.Embedding(cfg.vocab_size, kv_dim)
                                                 for _ in range(min(3, cfg.n_layer // 2))])
        if cfg.unet_skips:  # one weight per skip: block n_layer-1-i's input gets skip_weights[i] x block i's output
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)
        # training knobs that are not part of the architecture (train.py sets them; checkpoints don't store them)
        self.grad_ckpt = 0      # recompute every k-th block's activations in the backward instead of storing them
        self.loss_chunk = 0     # >0: loss through LinearCrossEntropy, this many rows of logits at a time; no logits
        self.residual_dtype = None  # torch.bfloat16: the residual stream between blocks in 16 bits, not fp32
        self.loss_step = chunk_loss  # or its torch.compile
        self.logits_loss = logits_loss  # or its torch.compile
        self.fp8_loss = fp8_logits_loss  # or its torch.compile

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by 1/sqrt(2*n_layer)
        # because each block adds two of them, so the stream's variance stays ~constant with depth.
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.0 if residual and self.config.zero_init_proj else std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the tables that are only looked up and cost no FLOPs:
        the position table, and the token table when it is not tied to lm_head (tied, it is the output
        matmul too, so it is counted once and it does cost FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the weights plus
        attention's 6 * n_layer * T * n_embd (QK^T and AV, forward 2x, backward 4x)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params() + 6 * cfg.n_layer * T * cfg.n_embd

    def embed(self, idx, pos):
        """Token (+ learned position) embeddings (B, T, C) and the RoPE rotations (or None) for positions pos (T,)."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        cfg = self.config
        rope = rope_rotations(pos, cfg.n_embd // cfg.n_head, cfg.rope_theta) if cfg.pos_encoding == "rope" else None
        return self.transformer.drop(x), rope

    def attn_mask(self, q_pos, k_pos):
        """(Tq, Tk) bool, True where query position q may attend key position k: k <= q, and within the
        sliding window if there is one."""
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.config.sliding_window:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - self.config.sliding_window)
        return mask

    def sdpa_mask(self, q_pos, k_pos, dtype=None):
        """attn_mask as the attention layers take it, made once per forward rather than in every layer:
        repeated for the G query heads that share a kv head, (G*Tq, Tk), and additive (0 / -inf) in dtype if
        given (SDPA would otherwise convert a bool mask in each layer: a kernel per layer per decode step)."""
        mask = self.attn_mask(q_pos, k_pos)
        if dtype is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        cfg = self.config
        return mask.repeat(cfg.n_head // (cfg.n_kv_head or cfg.n_head), 1)

    def blocks(self, x, rope, mask, idx, cache=None, pos=None):
        """The residual stream x (B, T, C) through every block, then the final norm. idx: the tokens, for the
        value embeddings. With unet_skips, block i's output is kept and added (weighted) to block
        n_layer-1-i's input, as a U-net's encoder feeds its decoder."""
        cfg, h = self.config, self.transformer.h
        ve = [t(idx) for t in self.transformer.ve] if cfg.value_embeds else []
        skips = []
        for i, block in enumerate(h):
            j = len(h) - 1 - i  # value tables: [0, 1, 2, None, ..., None, 2, 1, 0]... mirrored at the end
            v = ve[i] if i < len(ve) else ve[j] if j < len(ve) else None
            if cfg.unet_skips and i >= len(h) - len(skips):
                x = x + self.skip_weights[j] * skips.pop()
            if self.grad_ckpt and i % self.grad_ckpt == 0 and torch.is_grad_enabled() and cache is None:
                # gradient checkpointing (Chen et al. 2016): keep only the block's input, rerun it in the backward
                x = checkpoint(block, x, rope, mask, None, None, v, use_reentrant=False)
            else:
                x = block(x, rope, mask, None if cache is None else cache[i], pos, v)
            if cfg.unet_skips and i < len(h) // 2:
                skips.append(x)
        return self.transformer.ln_f(x)

    def head(self, x):
        """Logits (..., vocab) of the final hidden states, soft-capped if logit_softcap."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x, rope = self.embed(idx, pos)  # (B, T, C)
        if self.residual_dtype is not None:  # bf16: LayerNorms and residual adds move half the bytes (Megatron's way)
            x = x.to(self.residual_dtype)
        mask = self.sdpa_mask(pos, pos) if self.config.sliding_window else None  # None: causal kernel
        x = self.blocks(x, rope, mask, idx)
        if targets is not None and self.loss_chunk:  # training: the loss without the (B, T, vocab) logits
            return None, LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                                  self.loss_chunk, self.loss_step)
        # fp8 lm_head while training: the head and the loss in one Function, which scales the gradient for free
        dt = self.lm_head.fp8_dtype(x) if targets is not None else None
        if dt is not None:
            loss, logits = self.fp8_loss(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), dt)
            return logits.view(B, T, -1), loss
        logits = self.head(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = self.logits_loss(logits, targets)
        # With targets the loss is what trains, and the logits come back detached: a compiled model gives every
        # returned tensor that needs grad a zero gradient in the backward (GPT-2 at 32x1024: a 3.3 GB fill, ~1 ms)
        return logits.detach(), loss

    def forward_cached(self, idx, pos, cache):
        """Logits (B, T, vocab) for tokens idx (B, T) at absolute positions pos (T,), reading and extending
        the KV cache (one (k, v) pair per layer, see new_cache). Prefill: T = prompt length; decode: T = 1."""
        x, rope = self.embed(idx, pos)
        mask = self.sdpa_mask(pos, torch.arange(cache[0][0].size(2), device=idx.device), cache[0][0].dtype)
        return self.head(self.blocks(x, rope, mask, idx, cache, pos))

    def new_cache(self, B, S, dtype, device):
        """Per layer, zeroed k and v of shape (B, n_kv_head, S, head_dim): allocated once for the whole
        generation, so every decode step has the same shapes. Zeros, not empty: masked slots get weight 0,
        and 0 * NaN would still be NaN."""
        cfg = self.config
        shape = (B, cfg.n_kv_head or cfg.n_head, S, cfg.n_embd // cfg.n_head)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(cfg.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay only 2-D tensors (matmul weights, embeddings); biases and norm gains are left alone
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 use_cache=True, stop_ids=None, n_vocab=None, cuda_graph=True, compile=False):
        """Sample max_new_tokens after idx (B, T) long (all rows one length); yields the new tokens (B,)
        one step at a time, on idx's device, without a host sync unless stop_ids is given.

        use_cache: prefill the prompt in one forward into a KV cache preallocated for the whole generation,
            then feed one token per step. False: a full forward over the context every step (the reference).
        stop_ids: token ids (e.g. [tok.eot]) that end a row. A finished row keeps yielding its stop id, so
            a caller cuts each row at its first stop id; generation ends once every row has stopped.
        n_vocab: sample only ids < n_vocab, the tokenizer's vocabulary (the model's is padded up to a multiple
            of 128, and those padding ids are not tokens).
        cuda_graph: on CUDA, capture the decode step once as a CUDA graph and replay it each step (one
            launch instead of hundreds). compile: torch.compile the decode step (fused kernels; the first
            call pays the compilation).
        Context longer than block_size: when the next token would not fit, the context is cut to its last
        block_size // 2 tokens and (with the cache) re-prefilled, positions restarting at 0; both paths do
        the same, so they agree token for token. A prompt longer than block_size is cut the same way."""
        B, T = idx.shape
        block_size, keep = self.config.block_size, self.config.block_size // 2
        if T > block_size:
            idx, T = idx[:, -keep:], keep
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # context + new
        tokens[:, :T] = idx
        start, end = 0, T  # the model sees tokens[:, start:end]
        stop = torch.tensor(list(stop_ids or []), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        if use_cache:
            device_type = idx.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
                else self.lm_head.weight.dtype
            cache = self.new_cache(B, min(block_size, T + max_new_tokens), dtype, idx.device)
            step = torch.compile(self.forward_cached, dynamic=False) if compile else self.forward_cached
            if cuda_graph and device_type == "cuda":
                step = self._graphed_step(step, cache, B)
            logits = self.forward_cached(idx, torch.arange(T, device=idx.device), cache)[:, -1]  # prefill
        for i in range(max_new_tokens):
            if not use_cache:
                logits = self(tokens[:, start:end])[0][:, -1]
            next_id = sample_next(logits[:, :n_vocab], temperature, top_k, top_p, generator)  # (B,)
            if len(stop):
                next_id = torch.where(done, tokens[:, end - 1], next_id)  # a finished row repeats its stop id
                done |= torch.isin(next_id, stop)
            tokens[:, end] = next_id
            end += 1
            yield next_id
            if i == max_new_tokens - 1 or (len(stop) and bool(done.all())):
                return
            if end - start > block_size:  # context full: keep its last half
                start = end - keep
                if use_cache:
                    logits = self.forward_cached(tokens[:, start:end], torch.arange(keep, device=idx.device),
                                                 cache)[:, -1]
                    continue
            if use_cache:
                pos = torch.full((1,), end - 1 - start, dtype=torch.long, device=idx.device)
                logits = step(tokens[:, end - 1:end], pos, cache)[:, -1]

    def _graphed_step(self, step, cache, B):
        """step(idx (B, 1), pos (1,), cache) captured as one CUDA graph: inputs are copied into static
        tensors, the graph is replayed, the static logits are read. Must run before the prefill: the
        warm-up writes junk into cache position 0, which the prefill then overwrites."""
        device = cache[0][0].device
        static_idx = torch.zeros(B, 1, dtype=torch.long, device=device)
        static_pos = torch.zeros(1, dtype=torch.long, device=device)
        # autocast's weight cache must be off while capturing: cached casts would live outside the graph
        amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                             enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:  # warm-up off the capture: lazy init, cuBLAS workspaces, compile
            for _ in range(2):
                step(static_idx, static_pos, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), amp:
            static_logits = step(static_idx, static_pos, cache)

        def replay(idx, pos, cache):
            static_idx.copy_(idx)
            static_pos.copy_(pos)
            graph.replay()
            return static_logits
        return replay


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, vocab): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    ids = None  # with top_k, the vocabulary ids of the candidates (B, k); None = all of the vocabulary
    if top_k:
        # sample among the k best only: softmax and draw over (B, k), not the whole vocabulary (at batch 1
        # the vocabulary-wide ops cost more than the decode step's matmuls). topk returns them sorted.
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))
    if top_p is not None and top_p < 1.0:
        # nucleus (Holtzman et al. 2019): keep the smallest set of tokens whose probability sums to top_p
        if ids is None:
            logits, ids = torch.sort(logits, descending=True)
        probs = logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # drop a token once the ones before it reach top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)
