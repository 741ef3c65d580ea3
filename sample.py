"""
Generate text from a trained checkpoint, streaming tokens to the terminal as they are produced.

    python sample.py --out_dir=out/small
    python sample.py --out_dir=out/small --start="def fib(n):" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/small --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95 --stop='"\\n\\n"'

The num_samples samples are one batch through model.generate (KV cache; on CUDA the decode step is replayed as a
CUDA graph). The first sample streams as it is produced; the others are printed whole once generation ends.
A sample ends at <|endoftext|>, at the stop string (which is not printed), or after max_new_tokens.
"""
import codecs
import os
import sys

import torch

import bpe
from configurator import configure
from bpe import encode_chat
from checkpoint import load_checkpoint, model_from_checkpoint
from train import resolve_dtype, autocast, setup_distributed

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
stop = ""                   # a sample also ends where this text appears ("" = only at <|endoftext|>)
compile = False             # torch.compile the decode step (pays off for long generations)
# -----------------------------------------------------------------------------


def load(out_dir, device):
    """Model (eval mode, on device) and tokenizer of a training run's out_dir."""
    ckpt = load_checkpoint(out_dir)
    tok = bpe.Tokenizer.load(os.path.join(out_dir, "tokenizer.bpe"))
    if tok.hash != ckpt["tokenizer_hash"]:
        raise SystemExit(f"error: {out_dir}/tokenizer.bpe is not the tokenizer this checkpoint was trained with")
    model = model_from_checkpoint(ckpt).to(device).eval()
    return model, tok


# ---------------------------------------------------------------------------- chat


def chat_loop(model, tok, device, ptdtype):
    """Interactive chat: the whole history is the prompt of each reply; the reply streams until <|end|>.
    /reset forgets the history, /quit (or end of input) exits. Replies sample with --temperature, --top_k,
    --top_p, at most --max_new_tokens tokens; the oldest turns are dropped when the context is full."""
    # A tokenizer trained without the chat tokens can get them safely: give them new ids after its vocab
    # (bpe.Tokenizer(tok.ranks, tok.pattern, {**tok.special_tokens, "<|user|>": tok.vocab_size, ...})) and
    # resize the model's token embedding rows to the new vocab (copy the old rows, init the new ones), then
    # fine-tune (rlhf.py's SFT) so the model learns what they mean.
    encode_chat(tok, [])  # fails here, with the fix, when the tokenizer has no chat tokens
    end = tok.special_tokens["<|end|>"]
    g = torch.Generator(device=device).manual_seed(seed)
    history = []
    print("chat: type a message; /reset clears the history, /quit exits", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        history.append(dict(role="user", content=line))
        ids, _ = encode_chat(tok, history, add_generation_prompt=True)
        while len(ids) + max_new_tokens > model.config.block_size and len(history) > 1:
            history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
            ids, _ = encode_chat(tok, history, add_generation_prompt=True)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = []
        with autocast(device, ptdtype):
            for next_id in model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature,
                                          top_k or None, top_p, generator=g, stop_ids=[end, tok.eot],
                                          n_vocab=tok.vocab_size):
                t = next_id.item()
                if t in (end, tok.eot):
                    break
                reply.append(t)
                sys.stdout.write(utf8.decode(tok.decode_bytes([t])))
                sys.stdout.flush()
        print(utf8.decode(b"", final=True), flush=True)
        history.append(dict(role="assistant", content=tok.decode(reply, errors="replace")))


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
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read the prompt file {prompt[5:]} ({e}); give a UTF-8 text file") from None
    ids = tok.encode(prompt, allowed_special="all")
    if not ids or len(ids) >= model.config.block_size:
        raise SystemExit(f"error: the prompt has {len(ids)} tokens, the model's context is "
                         f"{model.config.block_size}; give a --start of 1 to {model.config.block_size - 1} tokens")
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, device=device)  # (num_samples, T): one batch
    # a token can end inside a multi-byte character: each row's incremental decoder holds such bytes back
    utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    texts, done, shown = [""] * num_samples, [False] * num_samples, 0  # shown: characters of sample 0 printed
    print(prompt, end="", flush=True)
    with autocast(device, ptdtype):
        for next_id in model.generate(idx, max_new_tokens, temperature, top_k or None, top_p, generator=g,
                                      stop_ids=None if tok.eot is None else [tok.eot], n_vocab=tok.vocab_size,
                                      compile=compile):
            for r, t in enumerate(next_id.tolist()):
                if done[r]:
                    continue
                done[r] = t == tok.eot
                texts[r] += "" if done[r] else utf8[r].decode(tok.decode_bytes([t]))
                if stop and stop in texts[r]:
                    texts[r], done[r] = texts[r][:texts[r].index(stop)], True
            # stream sample 0, holding back a tail that could still turn out to be the start of the stop string
            safe = len(texts[0]) if done[0] or not stop else max(len(texts[0]) - len(stop) + 1, shown)
            sys.stdout.write(texts[0][shown:safe])
            sys.stdout.flush()
            shown = safe
            if all(done):
                break
    print(texts[0][shown:] + ("" if done[0] else utf8[0].decode(b"", final=True)))
    for r in range(1, num_samples):
        print("-" * 40 + "\n" + prompt + texts[r] + ("" if done[r] else utf8[r].decode(b"", final=True)))
    print("-" * 40)


if __name__ == "__main__":
    main()
