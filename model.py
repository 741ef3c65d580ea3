"""
The GPT. Default: the classic GPT-2 layout (learned positions, pre-norm LayerNorm blocks, GELU MLP, full
multi-head attention, biases, tied embeddings). Each modern piece is one GPTConfig switch; config/llama_*.py
turn on the Llama-3 / Mistral set (RoPE, RMSNorm, SwiGLU, grouped-query attention, no bias).
No data, no optimizer loop, no files, no training knobs: the network, its initialisation, its AdamW groups,
and generation with a KV cache. (Speed features - fp8.py's fp8 matmuls and chunked loss - are swapped in by
scale.py.)

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=4096, block_size=256))
    logits, loss = model(idx, targets)      # idx, targets: (B, T) int64; logits: (B, T, vocab), detached if targets
    for next_id in model.generate(idx, 100, temperature=0.8, top_k=200): ...   # next_id: (B,)
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GRAPH_MIN_NEW = 32  # generate's CUDA graph (cuda_graph=True) pays from this many new tokens on (see _prefill)


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
    mlp: str = "gelu"         # gelu | swiglu (Shazeer 2020; Llama)
    mlp_hidden: int = 0       # 0 = 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to a multiple of 64
    sliding_window: int = 0   # >0: each token attends to itself and the window-1 tokens before it (Mistral)
    tie_embeddings: bool = True  # lm_head shares wte's weight (Press & Wolf 2017), as GPT-2
    zero_init_proj: bool = False  # the projections into the residual stream start at 0: each block starts as identity
    logit_softcap: float = 0.0    # >0: logits = cap * tanh(logits / cap), bounded (Gemma 2; modded-nanogpt)
    value_embeds: bool = False    # extra token tables added to the values of the first and last 3 layers (modded-nanogpt)
    unet_skips: bool = False      # the first half's block outputs added, weighted, to the second half's inputs
    smear_gate: bool = False      # each token embedding gets a learned, gated share of the one before it
    bigram_embeds: int = 0        # >0: rows of a table of hashed (previous token, token) pairs added to wte's output


def rope_rotations(pos, head_dim, theta):
    """The cosines and sines (2, T, head_dim/2) of the rotations for absolute positions pos (T,), in fp32 whatever
    the model's dtype: channel pair i at position p is rotated by the angle p * theta^(-2i/head_dim)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[:, None] * inv_freq[None, :]
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x, rot):
    """Rotate x (B, T, heads, head_dim), channel pairs (2i, 2i+1) as points of the plane, by rot (2, T, head_dim/2).
    A dot product of two rotated vectors then depends only on the difference of their positions. (Real arithmetic,
    not a complex multiply: torch.compile fuses it into one kernel, while it leaves complex ops to eager kernels.)"""
    cos, sin = rot[0][:, None], rot[1][:, None]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        # q, k, v in one matmul; with grouped-query attention k and v have only n_kv_head heads
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True  # scaled at init, see GPT._init_weights
        self.q_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, cache=None, pos=None, ve=None):
        """x (B, T, C). ve: a value embedding (B, T, n_kv_head * head_dim) added to v, or None. rope: rotations
        (T, head_dim/2) or None. mask: None = causal, else a (G*T, S) "may attend" mask, bool or additive, for
        the G = n_head / n_kv_head query heads that share a kv head: row g*T + t is query t's (GPT.sdpa_mask
        makes it). cache: (k, v) of shape (B, n_kv_head, S, head_dim) each; this call's keys and values are
        written at positions pos (T,), then attention runs over all S cached positions (the mask hides the ones
        not written yet)."""
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
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.kind == "swiglu" else 1) * self.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
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


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        for name, options in (("pos_encoding", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu"))):
            if getattr(cfg, name) not in options:
                raise SystemExit(f"error: {name}={getattr(cfg, name)!r} is not one of {', '.join(options)}")
        if cfg.n_embd % cfg.n_head or cfg.n_head % (cfg.n_kv_head or cfg.n_head):
            raise SystemExit(f"error: n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head}), and "
                             f"n_head of n_kv_head ({cfg.n_kv_head})")
        if cfg.pos_encoding == "rope" and (cfg.n_embd // cfg.n_head) % 2:
            raise SystemExit(f"error: rope needs an even head size, n_embd / n_head is {cfg.n_embd // cfg.n_head}")
        if cfg.bigram_embeds < 0 or cfg.bigram_embeds == 1:
            raise SystemExit(f"error: bigram_embeds={cfg.bigram_embeds} must be 0 (off) or >= 2 (the hashed rows, "
                             f"plus one for position 0); e.g. 65536")
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
        if cfg.smear_gate:  # both zero: the smear starts shut (lambda 0), and the gate learns once lambda moves
            self.smear_gate = nn.Parameter(torch.zeros(min(12, cfg.n_embd)))  # reads the first 12 channels
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.bigram_embeds:  # zeroed below (the model starts as without it); scale 1: it learns as fast as wte
            self.transformer.bigram = nn.Embedding(cfg.bigram_embeds, cfg.n_embd)
            self.bigram_lambda = nn.Parameter(torch.ones(1))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)
        if cfg.bigram_embeds:
            nn.init.zeros_(self.transformer.bigram.weight)

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
        the position table, the bigram table, and the token table when it is not tied to lm_head (tied, it is
        the output matmul too, so it is counted once and it does cost FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for name in ("wpe", "bigram"):
                if name in self.transformer:
                    n -= self.transformer[name].weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the weights plus
        attention's 6 * n_layer * T * n_embd (QK^T and AV, forward 2x, backward 4x)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params() + 6 * cfg.n_layer * T * cfg.n_embd

    def embed(self, idx, pos, prev=None):
        """Token (+ learned position) embeddings (B, T, C) and the RoPE rotations (or None) for positions pos (T,).
        prev (B, 1): the token before idx[:, 0], which smear_gate and bigram_embeds read; None where pos[0] is 0.
        Position 0 gets no previous token (nor does the start of a cut context in generate), whatever prev says."""
        cfg = self.config
        x = self.transformer.wte(idx)
        if cfg.smear_gate or cfg.bigram_embeds:
            prev = idx[:, :1] if prev is None else prev  # a stand-in, masked out at position 0
            later = pos > 0  # (T,); by pos, not by a branch: the same code serves a CUDA graph's every step
            if cfg.smear_gate:
                x = self.smear(x, torch.cat([self.transformer.wte(prev), x[:, :-1]], 1), later)
            if cfg.bigram_embeds:
                rows = bigram_rows(torch.cat([prev, idx[:, :-1]], 1), idx, later, cfg.bigram_embeds)
                x = x + self.bigram_lambda * self.transformer.bigram(rows)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        rope = rope_rotations(pos, cfg.n_embd // cfg.n_head, cfg.rope_theta) if cfg.pos_encoding == "rope" else None
        return self.transformer.drop(x), rope

    def smear(self, x, x_prev, later):
        """x_t + lambda * sigmoid(w . x_t[:12]) * x_{t-1}, for token embeddings x and x_prev (B, T, C), the latter
        shifted one position; later (T,) is False where there is no previous token. A cheap stand-in for the heads
        that learn to attend to the previous token (modded-nanogpt's smear, a record of 2025-09)."""
        gate = self.smear_lambda * torch.sigmoid(x[..., :self.smear_gate.numel()] @ self.smear_gate)
        return x + (gate * later)[..., None] * x_prev

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
        """Logits (B, T, vocab) of idx (B, T), and with targets (B, T) the mean cross-entropy (-1 = no target)."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x, rope = self.embed(idx, pos)  # (B, T, C)
        mask = self.sdpa_mask(pos, pos) if self.config.sliding_window else None  # None: causal kernel
        x = self.blocks(x, rope, mask, idx)
        if targets is None:
            return self.head(x), None
        return self.head_loss(x, targets)

    def head_loss(self, x, targets):
        """(logits, loss) of the final hidden states x (B, T, C) against targets (B, T). The logits come back detached:
        the loss is what trains, and a compiled model gives every returned tensor that needs grad a zero gradient
        in the backward (GPT-2 at 32x1024: a 3.3 GB fill). train.py may swap in a version that never holds all
        the (N, vocab) logits (fp8.py's chunked loss and fp8 head)."""
        logits = self.head(x)  # in fp32 below, whatever the autocast dtype
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits.detach(), loss

    def forward_cached(self, idx, pos, cache, prev=None):
        """Logits (B, T, vocab) for tokens idx (B, T) at absolute positions pos (T,), reading and extending
        the KV cache (one (k, v) pair per layer, see new_cache). Prefill: T = prompt length; decode: T = 1.
        prev (B, 1): the token before idx[:, 0] (smear_gate and bigram_embeds need it), None where pos[0] is 0."""
        x, rope = self.embed(idx, pos, prev)
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, *,
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
            launch instead of hundreds), from GRAPH_MIN_NEW new tokens on. compile: torch.compile the decode
            step (fused kernels; the first call pays the compilation).
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
            step, cache, logits = self._prefill(idx, max_new_tokens, cuda_graph, compile)
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
                logits = step(tokens[:, end - 1:end], pos, cache, tokens[:, end - 2:end - 1])[:, -1]

    def _prefill(self, idx, max_new_tokens, cuda_graph, compile):
        """generate's cached paths: a KV cache for the whole generation, the decode step (plain, compiled or
        CUDA-graphed) and the prompt run through it. Returns (step, cache, the last position's logits)."""
        B, T = idx.shape
        device_type = idx.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else self.lm_head.weight.dtype
        cache = self.new_cache(B, min(self.config.block_size, T + max_new_tokens), dtype, idx.device)
        step = torch.compile(self.forward_cached, dynamic=False) if compile else self.forward_cached
        # a capture costs ~3 eager steps and a replayed step ~1/5 of one: short generations stay eager
        graphed = cuda_graph and device_type == "cuda" and max_new_tokens >= GRAPH_MIN_NEW
        if graphed:
            step = self._graphed_step(step, cache, B)
        if graphed and T <= 32:  # a short prompt goes through the graph token by token: in a fresh process
            for t in range(T):   # that beats loading the prefill's own kernels (bench.py's gen_cold rows)
                pos = torch.full((1,), t, dtype=torch.long, device=idx.device)
                logits = step(idx[:, t:t + 1], pos, cache, idx[:, max(t - 1, 0):max(t, 1)])[:, -1]
        else:
            logits = self.forward_cached(idx, torch.arange(T, device=idx.device), cache)[:, -1]  # prefill
        return step, cache, logits

    def _graphed_step(self, step, cache, B):
        """step(idx (B, 1), pos (1,), cache, prev (B, 1)) captured as one CUDA graph: inputs are copied into
        static tensors, the graph is replayed, the static logits are read. Must run before the prefill: the
        warm-up writes junk into cache position 0, which the prefill then overwrites."""
        device = cache[0][0].device
        static_idx = torch.zeros(B, 1, dtype=torch.long, device=device)
        static_pos = torch.zeros(1, dtype=torch.long, device=device)
        static_prev = torch.zeros(B, 1, dtype=torch.long, device=device)
        reads_prev = self.config.smear_gate or self.config.bigram_embeds
        # autocast's weight cache must be off while capturing: cached casts would live outside the graph
        amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                             enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:  # warm-up off the capture: lazy init, cuBLAS workspaces, compile
            for _ in range(2):
                step(static_idx, static_pos, cache, static_prev)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), amp:
            static_logits = step(static_idx, static_pos, cache, static_prev)

        def replay(idx, pos, cache, prev):
            static_idx.copy_(idx)
            static_pos.copy_(pos)
            if reads_prev:
                static_prev.copy_(prev)
            graph.replay()
            return static_logits
        return replay


def bigram_rows(prev, idx, later, rows):
    """The bigram table's row (B, T) for each pair (prev, idx) of tokens (B, T): a multiplicative hash into
    rows - 1 rows (hash embeddings, Svenstrup et al. 2017, arXiv:1709.03933: a rare collision costs little), and
    the last row where later (T,) is False (no previous token). Large odd multipliers spread nearby ids apart."""
    h = torch.bitwise_xor(prev * 1000003, idx * 2654435761) % (rows - 1)
    return torch.where(later, h, rows - 1)


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
