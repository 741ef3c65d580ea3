"""
Generate text from a trained checkpoint, streaming tokens to the terminal as they are produced.

    python sample.py --out_dir=out/small
    python sample.py --out_dir=out/small --start="def fib(n):" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/small --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95 --stop='"\\n\\n"'
    python sample.py --out_dir=out/add-sft --chat      # chat with a model fine-tuned by rlhf.py

The num_samples samples are one batch through model.generate (KV cache; on CUDA the decode step is replayed as a
CUDA graph). On CUDA the GPU's lazy set-up is paid while the checkpoint is read (warm_up), so the first sample runs
as fast as a second would. The first sample streams as it is produced; the others are printed whole at the end.
A sample ends at <|endoftext|>, at the stop string (which is not printed), or after max_new_tokens.
An out_dir without a checkpoint is an error that lists the runs that have one. Needs no training code: only
model.py, checkpoint.py, compute.py and bpe.py.
"""
import codecs
import sys

import torch

from bpe import encode_chat
from checkpoint import load_run, load_tokenizer
from compute import DTYPES, pick_device, pick_dtype
from configurator import configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = "out"
start = "<|endoftext|>"     # the prompt, or FILE:path to read it from a file; special tokens allowed
num_samples = 2
max_new_tokens = 300
temperature = 0.8           # 0 = greedy
top_k = 200                 # 0 = off
top_p = 1.0                 # 1.0 = off; else in (0, 1): sample from the smallest set of tokens this likely
seed = 1337
device = "auto"             # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, else fp16; CPU fp32)
chat = False                # interactive chat with the chat template (see chat_loop)
stop = ""                   # a sample also ends where this text appears ("" = only at <|endoftext|>)
compile = False             # torch.compile the decode step (pays off for long generations)
# -----------------------------------------------------------------------------
RULES = dict(num_samples=(1, None), max_new_tokens=(1, None), temperature=(0.0, None), top_k=(0, None),
             dtype=("auto", *DTYPES))  # top_p's (0, 1] excludes 0: checked in main


def warm_up(model_args, device, dtype, shape, max_new_tokens, **sampling):
    """Two tokens of model.generate through a twin of the model: its widths and options, at most 2 layers, random
    weights, the batch and prompt length of the coming call (shape), the same sampling. A fresh process's first
    sample otherwise pays the GPU's lazy set-up itself (kernel loading, the cuBLAS handle, cuDNN's attention plans
    for these shapes: about the sample's own time again on an H200); load_run runs this while the weights are read."""
    with torch.device(device):
        twin = GPT(GPTConfig(**dict(model_args, n_layer=min(2, model_args["n_layer"]))))
    twin.to(dtype).eval()
    idx = torch.zeros(shape, dtype=torch.long, device=device)
    for i, next_id in enumerate(twin.generate(idx, max_new_tokens, **sampling)):  # the whole cache: its shapes
        next_id.tolist()
        if i == 1:
            break


def read_prompt(start):
    """--start as text: FILE:path is read from that UTF-8 file."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the prompt file {start[5:]} ({e}); give a UTF-8 text file") from None


def print_samples(model, tok, prompt, ids, device, *, num_samples, seed, stop, max_new_tokens, compile, **gen):
    """num_samples samples after the prompt's ids, as one batch: the first streams to stdout as it is produced, the
    others are printed whole at the end, each closed by a rule. gen: model.generate's sampling options."""
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, device=device)  # (num_samples, T): one batch
    # a token can end inside a multi-byte character: each row's incremental decoder holds such bytes back
    utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    texts, done, shown = [""] * num_samples, [False] * num_samples, 0  # shown: characters of sample 0 printed
    print(prompt, end="", flush=True)
    for next_id in model.generate(idx, max_new_tokens, generator=g, compile=compile, **gen):
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


# ---------------------------------------------------------------------------- chat


def chat_loop(model, tok, device, *, seed, max_new_tokens, temperature, top_k, top_p):
    """Interactive chat: the whole history is the prompt of each reply; the reply streams until <|end|>.
    /reset forgets the history, /quit (or end of input) exits. Replies sample with temperature, top_k (0 = off),
    top_p, at most max_new_tokens tokens; the oldest turns are dropped when the context is full."""
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
    configure(globals())
    if not 0 < top_p <= 1:
        raise SystemExit(f"error: --top_p={top_p} is out of range; give a value in (0, 1] (1 = off)")
    dev = pick_device(device)
    ptdtype = pick_dtype(dtype, dev)
    prompt = "" if chat else read_prompt(start)
    tok = load_tokenizer(out_dir)
    ids = tok.encode(prompt, allowed_special="all")
    if not ids and not chat:
        raise SystemExit("error: the prompt has 0 tokens; give a --start of 1 token or more")
    gen = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, n_vocab=tok.vocab_size,
               stop_ids=None if chat or tok.eot is None else [tok.eot])
    shape = (1, 1) if chat else (num_samples, len(ids))  # a chat's prompts are not known yet
    warm = (lambda args: warm_up(args, dev, ptdtype, shape, max_new_tokens, **gen)) if dev.startswith("cuda") else None
    model, tok, info = load_run(out_dir, dev, tok, warm)
    model.to(ptdtype)
    if chat:
        if info.get("stage") is None:  # rlhf.py records its stage in every checkpoint; train.py has none
            print(f"warning: {out_dir} holds a pretrained model that was never fine-tuned for chat: its replies will "
                  f"read like its training text; fine-tune it first with python rlhf.py config/sft.py "
                  f"--init_from={out_dir} (and your chat data as --data)", file=sys.stderr, flush=True)
        return chat_loop(model, tok, dev, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p)
    if len(ids) >= model.config.block_size:
        raise SystemExit(f"error: the prompt has {len(ids)} tokens, the model's context is "
                         f"{model.config.block_size}; give a --start of 1 to {model.config.block_size - 1} tokens")
    print_samples(model, tok, prompt, ids, dev, num_samples=num_samples, seed=seed, stop=stop,
                  max_new_tokens=max_new_tokens, compile=compile, **gen)


if __name__ == "__main__":
    main()
