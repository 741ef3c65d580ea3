"""
ScratchLM for transformers: scratchlm's GPT (model.py), every GPTConfig switch included, as a transformers model.
export.py writes this file beside the weights, as modeling_scratchlm.py, when no stock transformers class computes
exactly what the model computes (value embeddings, U-net skips, logit soft-capping, the smear gate, bigram
embeddings, RoPE with LayerNorm or GELU, QK-norm outside Qwen3's layout, ...), and config.json's auto_map points
transformers at it:

    AutoModelForCausalLM.from_pretrained("out/small-hf", trust_remote_code=True)

It imports only torch and transformers, so the directory works where scratchlm is not. The parameters keep
model.py's names and shapes (export and import copy the state dict as it is) and the forward is model.py's math,
so the logits agree to rounding. A new GPTConfig switch is taught here: its default in FIELDS, its math below.
Generation keeps every position in transformers' DynamicCache; the sliding window is the mask's job, as in model.py.
The smear gate and bigram embeddings read the token before each new one: prepare_inputs_for_generation passes it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# model.py's GPTConfig fields and defaults (export.py's tests check that the two agree)
FIELDS = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True,
              n_kv_head=None, pos_encoding="learned", rope_theta=10000.0, norm="layernorm", qk_norm=False, mlp="gelu",
              mlp_hidden=0, sliding_window=0, tie_embeddings=True, zero_init_proj=False, logit_softcap=0.0,
              value_embeds=False, unet_skips=False, smear_gate=False, bigram_embeds=0)
# the KV cache's name in model inputs and outputs: "cache" in newer transformers, "past_key_values" before
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ScratchLMConfig(PretrainedConfig):
    """GPTConfig's fields as attributes; tie_embeddings is stored as transformers' tie_word_embeddings."""
    model_type = "scratchlm"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size", "tie_embeddings": "tie_word_embeddings"}

    def __init__(self, **kwargs):
        values = {k: kwargs.pop(k, v) for k, v in FIELDS.items()}
        values["tie_embeddings"] = kwargs.pop("tie_word_embeddings", values["tie_embeddings"])
        super().__init__(**kwargs)
        for k, v in values.items():
            setattr(self, k, v)
        # every layer caches every position (transformers >= 5 would give a config with sliding_window a cache
        # that drops the old ones); the window is applied by the mask
        self.layer_types = ["full_attention"] * self.n_layer


def rope_rotations(pos, head_dim, theta):
    """Unit complex numbers (T, head_dim/2): channel pair i at position p is rotated by p * theta^(-2i/head_dim)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rot):
    """Rotate x (B, T, heads, head_dim), channels (2i, 2i+1) read as one complex number, by rot (T, head_dim/2)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot[:, None]).flatten(-2).type_as(x)


def bigram_rows(prev, idx, later, rows):
    """Rows (B, T) of the bigram table for the token pairs (prev, idx) (B, T): a hash into rows - 1 rows, and the
    last row where later (T,) is False (no previous token)."""
    h = torch.bitwise_xor(prev * 1000003, idx * 2654435761) % (rows - 1)
    return torch.where(later, h, rows - 1)


class Norm(nn.Module):
    """LayerNorm (bias optional) or RMSNorm (no mean, no bias), eps 1e-5."""

    def __init__(self, ndim, kind, bias):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, cfg.norm, cfg.bias) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache, layer, ve):
        """x (B, T, C); mask: None = causal, else bool "may attend" (T, S) or (B, 1, T, S); cache: a transformers
        Cache (this call's k and v appended at layer) or None; ve: a value embedding (B, T, kv dim) or None."""
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hd)
        qk, v = qkv[:, :, :nh + nkv], qkv[:, :, nh + nkv:]
        if ve is not None:
            v = v + ve.view_as(v)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])], dim=2)
        if rope is not None:
            qk = apply_rope(qk, rope)
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)  # grouped-query attention
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        return F.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp_hidden:
            hidden = cfg.mlp_hidden
        elif cfg.mlp == "swiglu":
            hidden = -(-8 * cfg.n_embd // 3 // 64) * 64
        else:
            hidden = 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.kind == "swiglu" else 1) * hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, ve):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer, ve)
        return x + self.mlp(self.ln_2(x))


class ScratchLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ScratchLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _supports_cache_class = True  # older transformers: generate may hand forward a DynamicCache

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                                              h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                                              ln_f=Norm(cfg.n_embd, cfg.norm, cfg.bias)))
        if cfg.pos_encoding == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.value_embeds:  # layer i and layer n_layer-1-i share table i
            kv_dim = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
            self.transformer.ve = nn.ModuleList([nn.Embedding(cfg.vocab_size, kv_dim)
                                                 for _ in range(min(3, cfg.n_layer // 2))])
        if cfg.unet_skips:  # block n_layer-1-i's input gets skip_weights[i] x block i's output
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        if cfg.smear_gate:  # x_t + lambda * sigmoid(gate . x_t[:12]) * x_{t-1}, on the token embeddings
            self.smear_gate = nn.Parameter(torch.zeros(min(12, cfg.n_embd)))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.bigram_embeds:  # a table of hashed (previous token, token) pairs, added to the token embedding
            self.transformer.bigram = nn.Embedding(cfg.bigram_embeds, cfg.n_embd)
            self.bigram_lambda = nn.Parameter(torch.ones(1))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _init_weights(self, module):
        """GPT-2's N(0, 0.02) (a model made from a config, not loaded); residual projections are not rescaled."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def attention_mask(self, past, T, attention_mask, device):
        """None (plain causal) when it can be, else bool (T, S) or (B, 1, T, S) for the T new queries over all
        S = past + T keys: causal, within the sliding window, not padding (attention_mask (B, S), 1 = token).
        A query always sees itself, so a padding row is not all masked (that would give NaN)."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        window = self.config.sliding_window
        if past == 0 and not window and not padded:
            return None
        q_pos, k_pos = torch.arange(past, past + T, device=device), torch.arange(past + T, device=device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if window:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
        if padded:
            mask = (mask & attention_mask[:, None, None, :].bool()) | (k_pos[None, :] == q_pos[:, None])
        return mask

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' inputs for the next forward, plus prev_ids (B, 1): the token before the new ones, which
        the smear gate and the bigram table read (the cache holds only keys and values)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and input_ids.size(1) > new.size(1):
            inputs["prev_ids"] = input_ids[:, -new.size(1) - 1:-new.size(1)]
        return inputs

    def embed(self, input_ids, pos, prev_ids):
        """The token embeddings (B, T, C), smeared and with the bigram rows added as configured; prev_ids (B, 1):
        the token before input_ids[:, 0], or None at position 0 (which gets no previous token)."""
        cfg, tr = self.config, self.transformer
        x = tr.wte(input_ids)
        if cfg.smear_gate or cfg.bigram_embeds:
            prev = torch.cat([input_ids[:, :1] if prev_ids is None else prev_ids, input_ids[:, :-1]], 1)
            later = pos > 0
            if cfg.smear_gate:
                x_prev = torch.cat([tr.wte(prev[:, :1]), x[:, :-1]], 1)
                gate = self.smear_lambda * torch.sigmoid(x[..., :self.smear_gate.numel()] @ self.smear_gate)
                x = x + (gate * later)[..., None] * x_prev
            if cfg.bigram_embeds:
                x = x + self.bigram_lambda * tr.bigram(bigram_rows(prev, input_ids, later, cfg.bigram_embeds))
        return x

    def forward(self, input_ids, attention_mask=None, labels=None, prev_ids=None, **kwargs):
        """Logits (B, T, vocab) of input_ids (B, T) at positions past, ..., past + T - 1 (past: the length already
        in the cache, kwargs[CACHE], which this call extends); with labels, the mean cross-entropy of each position
        against the next label (-100 = none), as transformers' causal LMs. prev_ids (B, 1): the token before
        input_ids[:, 0] where past > 0 (the smear gate and bigram table read it)."""
        cfg, tr = self.config, self.transformer
        B, T = input_ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if past and prev_ids is None and (cfg.smear_gate or cfg.bigram_embeds):
            raise ValueError("error: with smear_gate or bigram_embeds, a forward that extends a cache needs "
                             "prev_ids, the token before input_ids (generate passes it)")
        pos = torch.arange(past, past + T, device=input_ids.device)
        x = self.embed(input_ids, pos, prev_ids) + (tr.wpe(pos) if cfg.pos_encoding == "learned" else 0)
        x = F.dropout(x, cfg.dropout, self.training)
        hd = cfg.n_embd // cfg.n_head
        rope = rope_rotations(pos, hd, cfg.rope_theta) if cfg.pos_encoding == "rope" else None
        mask = self.attention_mask(past, T, attention_mask, input_ids.device)
        ve = [t(input_ids) for t in tr.ve] if cfg.value_embeds else []
        skips = []
        for i, block in enumerate(tr.h):
            j = cfg.n_layer - 1 - i  # value tables [0, 1, 2, None, ..., None, 2, 1, 0]
            v = ve[i] if i < len(ve) else ve[j] if j < len(ve) else None
            if cfg.unet_skips and i >= cfg.n_layer - len(skips):
                x = x + self.skip_weights[j] * skips.pop()
            x = block(x, rope, mask, cache, i, v)
            if cfg.unet_skips and i < cfg.n_layer // 2:
                skips.append(x)
        logits = self.lm_head(tr.ln_f(x))
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})
