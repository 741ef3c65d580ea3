"""
To and from Hugging Face: a checkpoint of train.py (or rlhf.py) becomes a transformers model directory, and a
transformers directory (or GPT-2 from the Hub) becomes our config and weights.

    python export.py --out_dir=out/small --hf_dir=out/small-hf     # writes the directory, then checks it
    # then, anywhere with transformers:
    #   AutoModelForCausalLM.from_pretrained("out/small-hf", trust_remote_code=True)
    #   AutoTokenizer.from_pretrained("out/small-hf", trust_remote_code=True)  # (trust_remote_code: ScratchLM only)

The directory: model.safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json (and
modeling_scratchlm.py for the ScratchLM layout). Every GPTConfig exports; each model goes to a stock transformers
architecture where one computes exactly the same function, else to ScratchLM (hf_layout decides):
  - learned positions + LayerNorm + GELU (model.py's default): GPT2LMHeadModel. GPT-2's Conv1D stores each
    matrix transposed, and it always has biases: a model with bias=False is written with zero biases (exact:
    adding zero changes nothing) and config.json says "scratchlm_bias": false, so importing drops them again.
  - RoPE + RMSNorm + SwiGLU (+ grouped-query attention): LlamaForCausalLM (bias=True: its attention_bias and
    mlp_bias); q and k rows reordered for its rotate_half RoPE (see rope_order); with sliding_window,
    MistralForCausalLM (the same window: a token sees itself and the window-1 tokens before it); with qk_norm,
    Qwen3ForCausalLM (per-head RMSNorm of q and k before RoPE, as ours). Mistral and Qwen3 have no biases.
  - anything else (value_embeds, unet_skips, logit_softcap, smear_gate, bigram_embeds, RoPE with LayerNorm or
    GELU, ...): ScratchLM, the transformers model in hf_modeling.py, written beside the weights as
    modeling_scratchlm.py; config.json's auto_map names it, so transformers loads it with trust_remote_code=True.
    Its weights are our state dict.
  zero_init_proj and dropout only shape training; they never decide the layout (config.json keeps them).
  A GPTConfig field this file does not know (a future switch) is a one-line error until hf_modeling.py learns it.
The model's vocab_size is the tokenizer's padded up to a multiple of 128: config.json keeps the model's size (HF
allows an embedding larger than the tokenizer) and generation_config.json suppresses the padding ids, as
sample.py does. The tokenizer: byte-level BPE with every merge tiktoken's ranks imply, the same split regex,
the special tokens, and bpe.encode_chat's template as a jinja chat_template.

Import, for train.py / sample.py / rlhf.py (init_from = a transformers directory, or gpt2, gpt2-medium, ...):
    model_args, state_dict, tok = load_pretrained("gpt2")   # tok: a bpe.Tokenizer, or None without tokenizer.json
    model = GPT(GPTConfig(**model_args)); model.load_state_dict(state_dict)
Exporting and importing again gives back the same model_args and a bit-identical state dict.
"""
import json
import os
import shutil
from dataclasses import asdict, fields

import torch

import bpe
from checkpoint import load_run
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config for the command line (python export.py --key=value)
out_dir = "out"     # the training run whose latest checkpoint is exported
hf_dir = ""         # the directory to write; "" = out_dir + "-hf"
dtype = "float32"   # float32 (exact) | bfloat16 | float16: the weights' dtype in model.safetensors
check = True        # reload with transformers (if installed) and compare its logits and token ids with ours
# -----------------------------------------------------------------------------
RULES = dict(dtype=("float32", "bfloat16", "float16"))

HUB_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# The GPTConfig fields this file and hf_modeling.py know; any other field must keep its default (a new switch is
# taught to hf_modeling.py, and here to the stock layouts that can express it).
KNOWN_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "n_kv_head",
                "pos_encoding", "rope_theta", "norm", "qk_norm", "mlp", "mlp_hidden", "sliding_window",
                "tie_embeddings", "zero_init_proj", "logit_softcap", "value_embeds", "unet_skips", "smear_gate",
                "bigram_embeds"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2: (in, out)
HF_MODELING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")
AUTO_MAP = {"AutoConfig": "modeling_scratchlm.ScratchLMConfig",
            "AutoModelForCausalLM": "modeling_scratchlm.ScratchLMForCausalLM"}


# ---------------------------------------------------------------------------- which architecture


def hf_layout(cfg):
    """The transformers architecture that computes exactly what GPT(cfg) computes: a stock class where one does
    ('gpt2', 'llama', 'mistral', 'qwen3'), else 'scratchlm' (hf_modeling.py, written beside the weights). The
    init-only options (zero_init_proj, dropout) never decide it. A field this file does not know is a one-line error."""
    odd = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)
           if f.name not in KNOWN_FIELDS and getattr(cfg, f.name) != f.default]
    if odd:
        raise SystemExit(f"error: export.py does not know the option {', '.join(odd)}; export a model with its "
                         f"default, or teach hf_modeling.py and export.py its math")
    if cfg.value_embeds or cfg.unet_skips or cfg.logit_softcap or cfg.smear_gate or cfg.bigram_embeds:
        return "scratchlm"  # no stock class has them (Gemma 2's soft-cap comes with its other differences)
    layout = (cfg.pos_encoding, cfg.norm, cfg.mlp)
    if layout == ("learned", "layernorm", "gelu") and not cfg.qk_norm and not cfg.sliding_window \
            and (cfg.n_kv_head or cfg.n_head) == cfg.n_head:
        return "gpt2"
    if layout == ("rope", "rmsnorm", "swiglu"):
        if not cfg.qk_norm and not cfg.sliding_window:
            return "llama"  # biases or not: its attention_bias and mlp_bias
        if not cfg.qk_norm and not cfg.bias:
            return "mistral"  # the same window: a token sees itself and the window-1 tokens before it; no biases
        if not cfg.sliding_window and not cfg.bias:
            return "qwen3"  # Llama + per-head RMSNorm of q and k before RoPE, as ours; no MLP bias
    return "scratchlm"


def rope_order(head_dim):
    """Our RoPE rotates channel pairs (2i, 2i+1), HF Llama's rotates (i, i + head_dim/2), both by the angle
    pos * theta^(-2i/head_dim). Reordering each q and k head's channels to 0, 2, 4, ..., 1, 3, 5, ... makes one
    the other; q.k sums over the same products in another order, so attention is unchanged."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def reorder_heads(w, head_dim, order):
    """Rows of w ((heads * head_dim, ...) weight or (heads * head_dim,) bias) reordered within each head."""
    return w.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)



def default_hidden(n_embd, mlp):
    """The MLP width model.py picks when mlp_hidden is 0 (asked of model.py itself, on the meta device)."""
    from model import MLP
    with torch.device("meta"):
        return MLP(GPTConfig(n_embd=n_embd, mlp=mlp)).hidden


# ---------------------------------------------------------------------------- export: weights and config


def gpt2_tensors(sd, cfg):
    """Our state dict -> GPT2LMHeadModel's: the same names, Conv1D matrices transposed, zeros for missing biases."""
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: HF stores only transformer.wte.weight and ties lm_head to it on load
        out[k] = v.t() if k.endswith(CONV1D) else v
    if not cfg.bias:  # GPT-2 always adds a bias: zeros, of the size of each Linear's output and each norm
        for k in [k for k in out if k.startswith("transformer.h.") or k.startswith("transformer.ln_f")]:
            if k.endswith(".weight"):
                out[k[:-len("weight")] + "bias"] = torch.zeros(out[k].shape[-1], dtype=out[k].dtype)
    return out


def llama_tensors(sd, cfg):
    """Our state dict -> LlamaForCausalLM's (and Mistral's, Qwen3's): c_attn split into q, k, v (q and k heads'
    channels reordered for rotate_half RoPE, and so the QK-norm gains), SwiGLU's c_fc split into gate and up."""
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
    order = rope_order(hd)
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = sd[ours + "attn.q_norm.weight"][order]
            out[hf + "self_attn.k_norm.weight"] = sd[ours + "attn.k_norm.weight"][order]
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[ours + "attn.c_attn." + p].split([nh * hd, nkv * hd, nkv * hd])
            out[hf + "self_attn.q_proj." + p] = reorder_heads(q, hd, order)
            out[hf + "self_attn.k_proj." + p] = reorder_heads(k, hd, order)
            out[hf + "self_attn.v_proj." + p] = v
            out[hf + "self_attn.o_proj." + p] = sd[ours + "attn.c_proj." + p]
            gate, up = sd[ours + "mlp.c_fc." + p].chunk(2)
            out[hf + "mlp.gate_proj." + p], out[hf + "mlp.up_proj." + p] = gate, up
            out[hf + "mlp.down_proj." + p] = sd[ours + "mlp.c_proj." + p]
    return out


def hf_config(cfg, layout, tok, dtype_name):
    """config.json for the layout. The special token ids come from the tokenizer. ScratchLM's holds every
    GPTConfig field; the stock ones note zero_init_proj (init only) so that importing gives back the same config."""
    eot = tok.eot if tok is not None else None
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eot,
                  eos_token_id=eot, dtype=dtype_name, torch_dtype=dtype_name)  # dtype: transformers >= 4.56
    if layout == "scratchlm":
        ours = {k: v for k, v in asdict(cfg).items() if k != "tie_embeddings"}
        return dict(architectures=["ScratchLMForCausalLM"], model_type="scratchlm", auto_map=AUTO_MAP,
                    **ours, **{k: v for k, v in common.items() if k not in ours})
    common["scratchlm_zero_init_proj"] = cfg.zero_init_proj
    hidden = default_hidden(cfg.n_embd, cfg.mlp) if not cfg.mlp_hidden else cfg.mlp_hidden
    if layout == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.block_size,
                    n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden or None,
                    activation_function="gelu_new",  # the tanh GELU, as model.py's
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    layer_norm_epsilon=1e-5, scratchlm_bias=cfg.bias, **common)
    arch = dict(llama="LlamaForCausalLM", mistral="MistralForCausalLM", qwen3="Qwen3ForCausalLM")[layout]
    out = dict(architectures=[arch], model_type=layout, hidden_size=cfg.n_embd, intermediate_size=hidden,
               num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
               num_key_value_heads=cfg.n_kv_head or cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
               hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=1e-5,
               rope_theta=cfg.rope_theta,  # transformers < 5 reads this, >= 5 rope_parameters
               rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
               attention_dropout=cfg.dropout, **common)
    if layout == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif layout == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return out


# ---------------------------------------------------------------------------- export: the tokenizer


def byte_chars():
    """GPT-2's byte -> character table, in which HF byte-level BPE writes tokens: the 188 printable Latin-1
    bytes stand for themselves, the other 68 (controls, space, ...) become chr(256), chr(257), ... in byte order,
    so every token is a printable string (the space byte is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def bpe_merges(ranks):
    """All pairs of tokens (a, b) whose concatenation is a token, ordered by that token's rank. tiktoken merges,
    at each step, the adjacent pair whose concatenation has the lowest rank; HF's BPE merges the listed pair that
    comes first in its merge list. Listing every such pair in rank order makes the two take the same steps."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], a, b))
    return [(a, b) for *_, a, b in sorted(merges)]


def chat_template(tok):
    """bpe.encode_chat's format as a jinja template (None if the tokenizer has no chat tokens). The contents
    between {% generation %} and its end are what SFT learns: return_assistant_tokens_mask gives encode_chat's
    mask. (A content that spells a special token, say "<|end|>", becomes that token here: HF templates render text
    and then tokenize it, while encode_chat encodes contents as ordinary text.)"""
    if any(s not in tok.special_tokens for s in bpe.CHAT_TOKENS + ("<|endoftext|>",)):
        return None
    return ("{{- '<|endoftext|>' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
            "{{- raise_exception('a chat message role must be system, user or assistant') -}}{%- endif -%}"
            "{{- '<|' + message['role'] + '|>' -}}"
            "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- message['content'] + '<|end|>' -}}"
            "{%- endgeneration -%}{%- else -%}{{- message['content'] + '<|end|>' -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")


def tokenizer_json(tok):
    """tokenizer.json (the `tokenizers` library's format): split with tok's regex, map bytes to characters
    (ByteLevel without its own regex), BPE with the ranks as ids and every merge they imply, the special tokens
    as added tokens (matched in the text before splitting, as tiktoken's allowed_special="all")."""
    chars = byte_chars()
    text = lambda b: "".join(chars[x] for x in b)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                              special=True) for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a chunk that is a token is taken whole, as tiktoken does
                  "vocab": {text(b): i for b, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])},
                  "merges": [f"{text(a)} {text(b)}" for a, b in bpe_merges(tok.ranks)]},
    }


def tokenizer_config(tok, block_size):
    eot = "<|endoftext|>" if tok.eot is not None else None
    out = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=eot, eos_token=eot, pad_token=None,
               unk_token=None, add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
               model_max_length=block_size)
    template = chat_template(tok)
    if template:
        out["chat_template"] = template
    return out


def generation_config(tok, vocab_size):
    """Stop at <|endoftext|> (and <|end|>, the end of a chat turn); never sample the padding ids."""
    sp = tok.special_tokens
    stops = [sp[s] for s in ("<|endoftext|>", "<|end|>") if s in sp]
    return dict(bos_token_id=tok.eot, eos_token_id=stops or None, pad_token_id=tok.eot,
                suppress_tokens=list(range(tok.vocab_size, vocab_size)) or None)


# ---------------------------------------------------------------------------- export: the directory


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def export(model, tok, hf_dir, dtype_name="float32"):
    """Write model (a GPT) and tok (a bpe.Tokenizer, or None) as a transformers directory hf_dir; -> the layout.
    The scratchlm layout's tensors are our state dict itself (lm_head left out when tied), with hf_modeling.py."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("error: export writes model.safetensors, which needs the safetensors package: "
                         "pip install safetensors") from None
    cfg = model.config
    layout = hf_layout(cfg)
    if dtype_name not in RULES["dtype"]:  # (callers other than the command line)
        raise SystemExit(f"error: dtype={dtype_name!r} is not one of {', '.join(RULES['dtype'])}")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{cfg.vocab_size}: they do not belong together")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "scratchlm":
        tensors = {k: v for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    else:
        tensors = gpt2_tensors(sd, cfg) if layout == "gpt2" else llama_tensors(sd, cfg)
    tensors = {k: v.to(getattr(torch, dtype_name)).contiguous() for k, v in tensors.items()}
    try:
        os.makedirs(hf_dir, exist_ok=True)
    except OSError as e:  # a file of that name, or a place not writable
        raise SystemExit(f"error: cannot make the directory {hf_dir} ({e.strerror or e}); give an --hf_dir that is "
                         f"a directory or does not exist yet") from None
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(hf_dir, "config.json"), hf_config(cfg, layout, tok, dtype_name))
    if layout == "scratchlm":
        shutil.copyfile(HF_MODELING, os.path.join(hf_dir, "modeling_scratchlm.py"))
    if tok is not None:
        write_json(os.path.join(hf_dir, "generation_config.json"), generation_config(tok, cfg.vocab_size))
        write_json(os.path.join(hf_dir, "tokenizer.json"), tokenizer_json(tok))
        write_json(os.path.join(hf_dir, "tokenizer_config.json"), tokenizer_config(tok, cfg.block_size))
    return layout


def compare(hf_dir, model, tok, text):
    """Check an exported directory with transformers itself: (largest |logit difference| / largest |logit| over
    text's tokens, whether HF's tokenizer gives tok's ids for text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids = tok.encode(text, allowed_special="all")[:model.config.block_size]
    hf_ids = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)(text)["input_ids"]  # for ScratchLM's config
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=True).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = model(x)[0]
        theirs = hf(x).logits
    return ((theirs - ours).abs().max() / ours.abs().max()).item(), hf_ids == tok.encode(text, allowed_special="all")


# ---------------------------------------------------------------------------- import


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} does not exist; a Hugging Face model directory has config.json and "
                         f"model.safetensors (or pytorch_model.bin)") from None
    except ValueError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e})") from None


def read_tensors(path):
    """All tensors of a transformers directory: model.safetensors, pytorch_model.bin (loaded with
    weights_only=True: no code runs), or their sharded forms (*.index.json naming the shard files)."""
    from_bin = lambda p: torch.load(p, map_location="cpu", weights_only=True)

    def from_safetensors(p):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"error: reading {p} needs the safetensors package: pip install safetensors") from None
        return load_file(p)

    def read(load, p):
        try:
            return load(p)
        except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError or UnpicklingError, an OSError
            raise SystemExit(f"error: cannot read {p} ({type(e).__name__}: {e}); it is truncated or corrupt: export "
                             f"or download it again") from None

    for name, load in (("model.safetensors", from_safetensors), ("pytorch_model.bin", from_bin)):
        if os.path.isfile(os.path.join(path, name)):
            return read(load, os.path.join(path, name))
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            out = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                out.update(read(load, os.path.join(path, shard)))
            return out
    raise SystemExit(f"error: {path} has no model.safetensors or pytorch_model.bin (nor a sharded index of them)")


def take(tensors, key, path):
    if key not in tensors:
        raise SystemExit(f"error: {path} lacks the weight {key}; it is not a complete checkpoint of its architecture")
    return tensors[key]


def from_gpt2(c, t, path):
    """GPT2LMHeadModel's config and tensors -> our model_args and state dict."""
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise SystemExit(f"error: {path}: activation_function={c['activation_function']!r}; model.py's GELU is the "
                         f"tanh one (gelu_new)")
    for key, value in (("layer_norm_epsilon", 1e-5), ("scale_attn_weights", True),
                       ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if c.get(key, value) != value:
            raise SystemExit(f"error: {path}: {key}={c[key]!r}; model.py computes the GPT-2 layout with {key}={value!r}")
    # Hub files may name tensors without the "transformer." prefix, and may hold the causal-mask buffers attn.bias
    t = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in t.items()
         if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    tie = c.get("tie_word_embeddings", True)
    sd = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in t.items() if k != "lm_head.weight"}
    biases = [k for k in sd if k.endswith(".bias")]
    bias = not (c.get("scratchlm_bias") is False and all(not sd[k].any() for k in biases))
    if not bias:  # the zeros export wrote for a model without biases
        sd = {k: v for k, v in sd.items() if k not in biases}
    sd["lm_head.weight"] = take(sd, "transformer.wte.weight", path) if tie else take(t, "lm_head.weight", path)
    return dict(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                n_embd=c["n_embd"], dropout=float(c.get("resid_pdrop", 0.1)), bias=bias,
                mlp_hidden=c.get("n_inner") or 0, tie_embeddings=tie,
                zero_init_proj=bool(c.get("scratchlm_zero_init_proj"))), sd


def from_llama(c, t, path):
    """LlamaForCausalLM's, MistralForCausalLM's or Qwen3ForCausalLM's config and tensors -> our model_args and
    state dict."""
    C, nh, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or C // nh
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    bias = c.get("attention_bias", False)
    problems = [f"{k}={v!r} (model.py: {want})" for k, v, want in (
        ("hidden_act", c.get("hidden_act", "silu"), "silu"), ("head_dim", hd, C // nh),
        ("rms_norm_eps", c.get("rms_norm_eps", 1e-6), 1e-5), ("mlp_bias", c.get("mlp_bias", False), bias),
        ("rope_type", rope.get("rope_type", rope.get("type", "default")), "default"),
        ("use_sliding_window", c.get("use_sliding_window", False), False)) if v != want]
    if problems:
        raise SystemExit(f"error: {path} has {', '.join(problems)}: model.py cannot compute this model exactly")
    tie = c.get("tie_word_embeddings", False)
    qk_norm = c["model_type"] == "qwen3"
    order = torch.argsort(rope_order(hd))  # HF's channel order back to ours
    get = lambda k: take(t, k, path)
    sd = {"transformer.wte.weight": get("model.embed_tokens.weight"), "transformer.ln_f.weight": get("model.norm.weight")}
    for i in range(L):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[ours + "ln_1.weight"] = get(hf + "input_layernorm.weight")
        sd[ours + "ln_2.weight"] = get(hf + "post_attention_layernorm.weight")
        if qk_norm:
            sd[ours + "attn.q_norm.weight"] = get(hf + "self_attn.q_norm.weight")[order]
            sd[ours + "attn.k_norm.weight"] = get(hf + "self_attn.k_norm.weight")[order]
        for p in ("weight", "bias") if bias else ("weight",):
            sd[ours + "attn.c_attn." + p] = torch.cat([reorder_heads(get(hf + "self_attn.q_proj." + p), hd, order),
                                                       reorder_heads(get(hf + "self_attn.k_proj." + p), hd, order),
                                                       get(hf + "self_attn.v_proj." + p)])
            sd[ours + "attn.c_proj." + p] = get(hf + "self_attn.o_proj." + p)
            sd[ours + "mlp.c_fc." + p] = torch.cat([get(hf + "mlp.gate_proj." + p), get(hf + "mlp.up_proj." + p)])
            sd[ours + "mlp.c_proj." + p] = get(hf + "mlp.down_proj." + p)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if tie else get("lm_head.weight")
    hidden = c["intermediate_size"]
    return dict(block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"], n_layer=L, n_head=nh,
                n_embd=C, dropout=float(c.get("attention_dropout", 0.0)), bias=bias,
                n_kv_head=None if nkv == nh else nkv, pos_encoding="rope", rope_theta=float(theta), norm="rmsnorm",
                qk_norm=qk_norm, mlp="swiglu", mlp_hidden=0 if hidden == default_hidden(C, "swiglu") else hidden,
                sliding_window=c.get("sliding_window", 4096 if c["model_type"] == "mistral" else 0) or 0,
                tie_embeddings=tie, zero_init_proj=bool(c.get("scratchlm_zero_init_proj"))), sd


def from_scratchlm(c, t, path):
    """ScratchLM's config (every GPTConfig field) and tensors (our state dict; lm_head absent when tied) -> ours."""
    args = {f.name: c[f.name] for f in fields(GPTConfig) if f.name in c}
    args["tie_embeddings"] = c.get("tie_word_embeddings", True)
    sd = dict(t)
    if args["tie_embeddings"]:
        sd["lm_head.weight"] = take(t, "transformer.wte.weight", path)
    return args, sd


def load_hf(path):
    """A transformers directory (GPT-2, Llama, Mistral, Qwen3 or ScratchLM) -> (model_args: GPTConfig's fields as
    a dict, state_dict for model.GPT). Every name and shape is checked against the GPT those model_args build."""
    c = read_json(os.path.join(path, "config.json"))
    kind = c.get("model_type")
    readers = dict(gpt2=from_gpt2, llama=from_llama, mistral=from_llama, qwen3=from_llama, scratchlm=from_scratchlm)
    if kind not in readers:
        raise SystemExit(f"error: {path} holds a {kind!r} model; export.py reads gpt2, llama, mistral, qwen3 and "
                         f"scratchlm")
    tensors = read_tensors(path)
    try:
        args, sd = readers[kind](c, tensors, path)
    except KeyError as e:  # the readers' only KeyErrors: config.json fields (weights are looked up with take())
        raise SystemExit(f"error: {path}/config.json has no {e.args[0]!r}, which a {kind} model's config needs; "
                         f"export it again (or add the field)") from None
    args = asdict(GPTConfig(**args))
    with torch.device("meta"):  # the model's own names and shapes, without allocating or initialising anything
        want = {k: v.shape for k, v in GPT(GPTConfig(**args)).state_dict().items()}
    have = {k: v.shape for k, v in sd.items()}
    if have != want:
        bad = sorted(set(have) ^ set(want)) or [k for k in want if have[k] != want[k]]
        raise SystemExit(f"error: {path}'s weights do not fit its config.json (first mismatch: {bad[0]}: "
                         f"{have.get(bad[0])} in the file, {want.get(bad[0])} expected)")
    return args, sd


def tokenizer_from_hf(path):
    """tokenizer.json of a byte-level BPE -> bpe.Tokenizer, when tiktoken's encoding can be the same: a Split
    regex + ByteLevel pre-tokenizer (export.py's, Llama 3's) or GPT-2's ByteLevel alone, no normalizer, and merges
    whose tokens come in id order (the ids are then tiktoken's ranks). Added tokens become special tokens."""
    j = read_json(os.path.join(path, "tokenizer.json"))
    m, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        pattern = bpe.GPT2_PATTERN  # the ByteLevel pre-tokenizer's own regex is GPT-2's
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
          and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        pattern = steps[0]["pattern"]["Regex"]
    else:
        pattern = None
    bytes_of = {c: b for b, c in byte_chars().items()}
    if (pattern is None or any(s.get("add_prefix_space") for s in steps) or m.get("type") != "BPE"
            or j.get("normalizer") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix")
            or m.get("byte_fallback")):
        raise SystemExit(f"error: {path}/tokenizer.json is not a plain byte-level BPE (GPT-2's or a Split regex + "
                         f"ByteLevel, no normalizer), so tiktoken cannot encode exactly as it does")
    special = {a["content"]: a["id"] for a in j.get("added_tokens", [])}
    try:
        ranks = {bytes(bytes_of[ch] for ch in s): i for s, i in m["vocab"].items() if i not in special.values()}
    except KeyError:
        raise SystemExit(f"error: {path}/tokenizer.json has tokens outside the byte-level alphabet") from None
    pairs = [p.split(" ") if isinstance(p, str) else p for p in m.get("merges", [])]
    targets = [m["vocab"].get(a + b) for a, b in pairs]
    if None in targets or any(x > y for x, y in zip(targets, targets[1:])):
        raise SystemExit(f"error: {path}/tokenizer.json's merges do not make its tokens in id order, so the ids "
                         f"are not merge ranks and tiktoken would encode differently")
    try:
        return bpe.Tokenizer(ranks, pattern, special)
    except ValueError as e:
        raise SystemExit(f"error: {path}/tokenizer.json: {e}") from None


def download(name):
    """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) from the Hugging Face Hub (cached after the first time),
    -> the local directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"error: init_from={name!r} downloads from the Hugging Face Hub, which needs "
                         f"huggingface_hub (pip install huggingface_hub); or pass a local model directory") from None
    try:
        return snapshot_download(HUB_NAMES[name], allow_patterns=["config.json", "model.safetensors", "tokenizer.json"])
    except Exception as e:  # offline, no such repo, network error: one line, whatever huggingface_hub raised
        raise SystemExit(f"error: cannot download {HUB_NAMES[name]} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); check the network (or HF_HUB_OFFLINE), or pass "
                         f"a local model directory") from None


def load_pretrained(init_from):
    """init_from: a transformers directory, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl from the Hub ->
    (model_args, state_dict, tokenizer: a bpe.Tokenizer, or None if the directory has no tokenizer.json)."""
    if init_from in HUB_NAMES:
        path = download(init_from)
    elif os.path.isdir(init_from):
        path = init_from
    else:
        raise SystemExit(f"error: init_from={init_from!r} is neither a directory nor one of {', '.join(HUB_NAMES)}")
    args, sd = load_hf(path)
    tok = tokenizer_from_hf(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return args, sd, tok


# -----------------------------------------------------------------------------
# the command line

CHECK_TEXT = "<|endoftext|>def greet(name):\n    return f'Hello, {name}!'  # 42 🎉 東京\r\n\n   x = [1, 2, 3]\n"

if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    hf_dir = hf_dir or out_dir.rstrip("/") + "-hf"
    model, tok, _ = load_run(out_dir)
    layout = export(model, tok, hf_dir, dtype)
    print(f"wrote {hf_dir}: {layout} layout, {model.num_params(False) / 1e6:.2f}M parameters in {dtype}, "
          f"tokenizer of {tok.vocab_size} tokens (model vocab {model.config.vocab_size})")
    if check:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("check skipped: transformers is not installed (pip install transformers)")
        else:
            diff, same_ids = compare(hf_dir, model, tok, CHECK_TEXT)
            print(f"check with transformers: logits differ by {diff:.1e} of their largest value; token ids "
                  f"{'the same' if same_ids else 'DIFFERENT'} on a test text")
            if not same_ids or diff > (1e-4 if dtype == "float32" else 5e-2):
                raise SystemExit(f"error: the export of {out_dir} does not match in transformers; please report it")
