"""
Generate text from a trained checkpoint, streaming tokens to the terminal as they are produced.

    python sample.py --out_dir=out/small
    python sample.py --out_dir=out/small --start="def fib(n):" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/small --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95
"""
import codecs
import os
import sys

import torch

import bpe
from configurator import configure
from train import load_checkpoint, model_from_checkpoint, resolve_dtype, autocast, setup_distributed

# -----------------------------------------------------------------------------
out_dir = "out"
start = "<|endoftext|>"     # the prompt, or FILE:path to read it from a file; special tokens allowed
num_samples = 2
max_new_tokens = 300
temperature = 0.8           # 0 = greedy
top_k = 200                 # 0 = off
top_p = 1.0                 # 1.0 = off
seed = 1337
device = "auto"
dtype = "auto"
chat = False                # interactive chat with the chat template (see chat_loop)
# -----------------------------------------------------------------------------


def load(out_dir, device):
    """Model (eval mode, on device) and tokenizer of a training run's out_dir."""
    ckpt = load_checkpoint(out_dir)
    tok = bpe.Tokenizer.load(os.path.join(out_dir, "tokenizer.bpe"))
    if tok.hash != ckpt["tokenizer_hash"]:
        raise SystemExit(f"error: {out_dir}/tokenizer.bpe is not the tokenizer this checkpoint was trained with")
    model = model_from_checkpoint(ckpt).to(device).eval()
    return model, tok


# ==== chat ====
def chat_loop(model, tok, device, ptdtype):
    raise SystemExit("error: chat mode is not written yet")
# ==== end chat ====


def main():
    global device
    configure(globals())
    _, _, _, device = setup_distributed(device)
    _, ptdtype = resolve_dtype(dtype, device)
    model, tok = load(out_dir, device)
    if chat:
        return chat_loop(model, tok, device, ptdtype)
    prompt = start
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    ids = tok.encode(prompt, allowed_special="all")
    if len(ids) >= model.config.block_size:
        raise SystemExit(f"error: the prompt has {len(ids)} tokens, the model's context is "
                         f"{model.config.block_size}; shorten --start")
    g = torch.Generator(device=device).manual_seed(seed)
    for k in range(num_samples):
        idx = torch.tensor([ids], device=device)
        print(prompt, end="", flush=True)
        # a token can end inside a multi-byte character: the incremental decoder holds such bytes back
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with autocast(device, ptdtype):
            for next_id in model.generate(idx, max_new_tokens, temperature, top_k or None, top_p, generator=g):
                sys.stdout.write(utf8.decode(tok.decode_bytes(next_id.tolist())))
                sys.stdout.flush()
        print("\n" + "-" * 40)


if __name__ == "__main__":
    main()
