"""
The tests of scratchlm. Shared imports, fixtures and helpers first; then one section per script in pipeline order
(configurator, bpe, prepare, model, fp8, muon, checkpoint, train with dataloader, scale, faults, sample, rlhf, eval,
export, plot, bench, runs/*.sh, lora, chat_data and gsm8k), each test in the section of the script whose behaviour it
proves; then repo-wide checks (README.md's commands among them). Tiny models, tiny data, CPU only.
Run: python -m pytest -q test_all.py
Some tests run a function of this file in a fresh interpreter (`python -c "import test_all; test_all.f()"`), so
importing it must stay cheap: torch's compiler and ZeRO, and the optional packages (transformers, safetensors,
tokenizers, matplotlib, pyarrow, huggingface_hub), are imported by the tests that need them.
"""
import ast
import base64
import builtins
import copy
import dataclasses
import errno
import functools
import hashlib
import http.server
import importlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import runpy
import shlex
import shutil
import signal
import string as string_module
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import types

import numpy as np
import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.profiler import profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the scripts under test, wherever pytest is started from
import addition  # noqa: E402
import bench  # noqa: E402
import bpe  # noqa: E402
import chat_data  # noqa: E402
import checkpoint  # noqa: E402
import compute  # noqa: E402
import eval as ev  # noqa: E402
import export  # noqa: E402
import faults  # noqa: E402
import fp8  # noqa: E402
import gsm8k  # noqa: E402
import lora  # noqa: E402
import plot  # noqa: E402
import prepare  # noqa: E402
import rlhf  # noqa: E402
import rollout  # noqa: E402
import sample  # noqa: E402
import scale  # noqa: E402
import train  # noqa: E402
from checkpoint import (CKPT_FORMAT, build_model, load_checkpoint, load_optimizer_state,  # noqa: E402
                        model_from_checkpoint, save_checkpoint)
from configurator import config_keys, configure, source_notes  # noqa: E402
from faults import GUARD_FIELDS, apply_update, guard_update  # noqa: E402
from fp8 import (Float8LinearCrossEntropy, LinearCrossEntropy, chunked_head_loss, fp8_forward, fp8_grads,  # noqa: E402
                 scaled_mm, to_fp8)
from model import GPT, GPTConfig, apply_rope, bigram_rows, rope_rotations, sample_next  # noqa: E402
from muon import Muon, minimax_quintic, orthogonalise, polar_express  # noqa: E402
from scale import checkpoint_blocks, ckpt_interval, micro_steps, parallelize  # noqa: E402
from dataloader import Batches, TokenWindows, split_paths  # noqa: E402
from train import get_lr, make_optimizers, set_lr  # noqa: E402


# ---------------------------------------------------------------------------- running the scripts
TINY_TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.0",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--compile=False"]


def run(*args, cwd=HERE, check=True, env=None):
    """Run a repo script in a subprocess (its own interpreter, like a user would); return the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


def this_file(fn):
    """The interpreter arguments that run test_all.<fn>() in a fresh process (started in HERE); fn reads sys.argv."""
    return ["-c", f"import test_all; test_all.{fn}()"]


def fresh_main(script, *argv):
    """Run script's main() in this process on a fresh copy of its globals (configure() cannot leak)."""
    ns = runpy.run_path(os.path.join(HERE, script))
    saved, sys.argv = sys.argv, [script, *argv]
    try:
        return ns["main"]()
    finally:
        sys.argv = saved


def one_line_error(p, pattern, after_progress=False):
    """A user error: exit code != 0, stderr is one line `error: ...` matching pattern, and no traceback.
    after_progress: prepare.py streams the corpus, so a bad file found mid-way follows its progress lines."""
    assert p.returncode not in (0, None), p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 or after_progress, p.stderr
    assert lines[-1].startswith("error: ") and "Traceback" not in p.stderr and "error" not in "".join(lines[:-1])
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def copy_run(src, dst):
    """A copy of a run's out_dir (or any dir) at dst, for a test that changes or resumes it: dst."""
    shutil.copytree(src, dst)
    return dst


def metrics_rows(out_dir):
    """The rows of a run's metrics.jsonl (train.py and rlhf.py write one)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- tiny data
def tiny_corpus(root):
    """40 small Python-like documents, made fresh (CI has no data/)."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "value", "for", "in", "range", "if", "else", "print", "x", "y"]
    os.makedirs(root, exist_ok=True)
    docs = []
    for i in range(40):
        lines = [f"def f{i}(x):"] + ["    " + " ".join(rng.choice(words, 6)) for _ in range(8)] + ["# ünïcödé ✓"]
        docs.append("\n".join(lines) + "\n")
        with open(os.path.join(root, f"doc{i:02d}.py"), "w", encoding="utf-8") as f:
            f.write(docs[-1])
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared tiny dataset: (data_root, dataset name, the documents)."""
    root = tmp_path_factory.mktemp("tiny")
    docs = tiny_corpus(str(root / "corpus"))
    run("prepare.py", f"--input={root / 'corpus'}", f"--data_root={root / 'data'}", "--dataset=tiny",
        "--vocab_size=300", "--val_fraction=0.2")
    return str(root / "data"), "tiny", docs


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory):
    """The tiny corpus prepared with another tokenizer (vocab 280): data_root, name."""
    data_root, _, _ = tiny_data
    root = tmp_path_factory.mktemp("other")
    run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={root}", "--dataset=other",
        "--vocab_size=280", "--val_fraction=0.2")
    return str(root), "other"


def tiny_train(tiny_data, out_dir, *extra, torchrun=0, check=True, helper=None, env=None):
    """train.py with TINY_TRAIN on tiny_data (under torchrun with that many processes); helper: the name of a
    function of this file that runs train.py its own way, given the same options."""
    data_root, name, _ = tiny_data
    entry = this_file(helper) if helper else ["train.py"]
    args = [*entry, *TINY_TRAIN, f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={out_dir}", *extra]
    if torchrun:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        args = [*launcher, *(["--no-python", sys.executable] if helper else []), *args]
    return run(*args, check=check, env={"OMP_NUM_THREADS": "1", **(env or {})})


# ---------------------------------------------------------------------------- tiny tokenizers
# A small multilingual corpus: a few stdlib modules plus text in other scripts, so merges of multi-byte
# characters get learned too.
BPE_CORPUS = [open(m.__file__, encoding="utf-8").read() for m in (textwrap, string_module, json.encoder)] + [
    "Grüße aus Köln! Ça va très bien. 東京は日本の首都です。 Привет, мир! שלום עולם مرحبا بالعالم 🎉🎉 👍🏽 " * 20]

ADVERSARIAL = ["", " ", "\n", "a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ab" * 50, " " * 100, "\n" * 50,
               "\r\n\r\n  \r\n\t\t\n", "   x   y\n\n\n   ", "1234567890123", "'s's's'S'LL", "naïve café",
               "\u0000\u0001", "🎉" * 30, "😀👍🏽" * 10, "e\u0301\u0301\u0301", "العربية", "<|endoftext|> <|user|>",
               "def f(x):\n    return x  # comment\n", "\u00a0\u00a0 \u3000\u2028", "x" * 2000, "é" * 1000]


def random_unicode(rng, max_len=40):
    """Text from a mix of hard cases: any code point (no surrogates), emoji with modifiers and joiners, CJK,
    combining marks, right-to-left scripts and marks, control characters, whitespace runs, digits, contractions."""
    pools = ["abcXYZ hello world", "0123456789", " \t\n\r\x0b\x0c\u00a0\u2028\u3000", "éüñßøÅ", "東京日本語한국어中文",
             "😀🎉👍🏽👨\u200d👩\u200d👧🇩🇪", "e\u0301a\u0308\u20dd\u0338", "שלום مرحبا\u200f\u200e\u202e",
             "\x00\x01\x1b\x7f\x85", "'s'S'll'VE're", "<|endoftext|>", "!?.,;:(){}[]-_=+*/\\\"'#@$%^&~`"]
    out = []
    for _ in range(rng.randint(0, max_len)):
        if rng.random() < 0.2:
            c = rng.randint(0, 0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe.train(BPE_CORPUS, 1000)


def chat_tokenizer():
    return bpe.train(["12+34=46\n"], 261)  # the 256 bytes and the 5 special tokens, no merges


# ---------------------------------------------------------------------------- tiny models
@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes extra threads spin, not work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt_with(seed=0, spread=0.0, **kw):
    """A 2-layer GPT, vocab 64, context 32. spread > 0 adds N(0, spread) noise to every parameter, so logits
    have clear winners and greedy decoding is not decided by float rounding."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model.eval()


def tiny_gpt(**kw):
    """A 4-layer GPT in training mode (gpt_with's, deeper, so that every-k-th-block checkpointing differs)."""
    return gpt_with(**{**dict(n_layer=4, n_head=2, block_size=16, vocab_size=96), **kw}).train()


def bf16_training_loss(model, step_fn, steps=40):
    """The last loss of `steps` AdamW steps of step_fn (the step module for model) under CPU bf16 autocast, on one
    fixed batch of 16 rows that repeat themselves halfway: something to learn beyond unigram counts."""
    x = torch.randint(0, 96, (16, 17), generator=torch.Generator().manual_seed(0))
    x[:, 8:] = x[:, :9]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16):
            loss = step_fn(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------------------- tiny trained runs
@pytest.fixture(scope="module")
def sample_ckpt(tiny_data, tmp_path_factory):
    """A tiny Llama-style checkpoint (RoPE, RMSNorm, SwiGLU, GQA) trained for a few steps by train.py."""
    out = tmp_path_factory.mktemp("sample_ckpt")
    tiny_train(tiny_data, out, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=20", "--pos_encoding=rope",
               "--norm=rmsnorm", "--mlp=swiglu", "--n_kv_head=1", "--bias=False")
    return str(out)


def rlhf_run(argv):
    """One rlhf.py stage in this process, from freshly reset config globals."""
    importlib.reload(rlhf)
    old, sys.argv = sys.argv, ["rlhf.py"] + argv
    try:
        rlhf.main()
    finally:
        sys.argv = old
    return rlhf


@pytest.fixture(scope="module")
def rlhf_tiny(tmp_path_factory):
    """A trivially learnable task run through every stage on a tiny model: the prompt is always "1+1=", the
    demonstrators answer "1+1=2" or "1+1=3" at random, the labeler prefers the first. Returns the stages' out_dirs."""
    d = tmp_path_factory.mktemp("rlhf")
    tok = chat_tokenizer()
    os.makedirs(d / "base")
    tok.save(str(d / "base" / "tokenizer.bpe"))
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261, dropout=0.0, bias=False)
    torch.manual_seed(0)
    save_checkpoint(str(d / "base"), dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args,
                                           tokenizer_hash=tok.hash, iter_num=0))

    def write(name, rows):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write("sft.jsonl", [dict(prompt="1+1=", response="1+1=" + "23"[i % 2]) for i in range(64)])
    write("prefs.jsonl", [dict(prompt="1+1=", chosen="1+1=2", rejected="1+1=3")] * 16)
    write("prompts.jsonl", [dict(prompt="1+1=")] * 16)
    common = ["--device=cpu", "--warmup_iters=0", "--log_interval=5", "--eval_samples=16",
              f"--eval_prompts={d}/prompts.jsonl", "--batch_size=16"]
    dirs = {s: str(d / s) for s in ("base", "sft", "rm", "ppo", "dpo")}
    rlhf_run(common + ["--stage=sft", f"--init_from={dirs['base']}", f"--out_dir={dirs['sft']}",
                       f"--data={d}/sft.jsonl", f"--val_data={d}/sft.jsonl", "--max_iters=40", "--eval_interval=40",
                       "--learning_rate=1e-2", "--min_lr=1e-2"])
    rlhf_run(common + ["--stage=rm", f"--init_from={dirs['sft']}", f"--out_dir={dirs['rm']}",
                       f"--data={d}/prefs.jsonl", f"--val_data={d}/prefs.jsonl", "--max_iters=10",
                       "--eval_interval=10", "--learning_rate=3e-3"])
    rlhf_run(common + ["--stage=ppo", f"--init_from={dirs['sft']}", f"--out_dir={dirs['ppo']}",
                       f"--data={d}/prompts.jsonl", "--reward_model=task", "--max_iters=10", "--eval_interval=10",
                       "--learning_rate=3e-3", "--rollout_batch=16", "--minibatch=8", "--max_new_tokens=7"])
    rlhf_run(common + ["--stage=ppo", f"--init_from={dirs['sft']}", f"--out_dir={d}/ppo-rm",  # the reward model's path
                       f"--data={d}/prompts.jsonl", f"--reward_model={dirs['rm']}", "--max_iters=2", "--log_interval=1",
                       "--rollout_batch=8", "--minibatch=4", "--max_new_tokens=7"])
    rlhf_run(common + ["--stage=dpo", f"--init_from={dirs['sft']}", f"--out_dir={dirs['dpo']}",
                       f"--data={d}/prefs.jsonl", f"--val_data={d}/prefs.jsonl", "--max_iters=10",
                       "--eval_interval=10", "--learning_rate=1e-3", "--dpo_beta=0.5"])
    return dict(dirs, data=str(d))


# ============================================================================ configurator.py
def conf_defaults():
    return dict(n_layer=12, learning_rate=6e-4, compile=False, out_dir="out", betas=(0.9, 0.95), vocab_size=None)


@pytest.fixture(scope="module")
def train_help():
    """`python train.py --help`: the finished process and its stdout's lines."""
    p = run("train.py", "--help")
    return p, p.stdout.splitlines()


def test_configurator_applies_file_then_flags_in_order_and_types_hold(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 4\nlearning_rate = 1  # an int widens to a float\nimport math\n_private = 3\n")
    ns = conf_defaults()
    out = configure(ns, [str(cfg), "--n_layer=6", "--out_dir=2024", "--betas=[0.8, 0.9]", "--compile"])
    assert out == dict(n_layer=6, learning_rate=1.0, compile=True, out_dir="2024", betas=(0.8, 0.9), vocab_size=None)
    assert type(ns["learning_rate"]) is float and ns["out_dir"] == "2024"  # a str key keeps the text as written


@pytest.mark.parametrize("args, pattern", [
    (["--n_layers=4"], r"^error: unknown config key 'n_layers' \(did you mean n_layer\?\)$"),
    (["--zzz=1"], r"^error: unknown config key 'zzz' \(valid keys: betas, compile, learning_rate, n_layer, out_dir, "),
    (["--n_layer=4.5"], r"^error: config key 'n_layer' expects int \(default 12\), got float 4.5$"),
    (["--n_layer=big"], r"^error: config key 'n_layer' expects int \(default 12\), got str 'big'$"),
    (["--compile=false"], r"^error: config key 'compile' expects bool .*got str 'false'; write True or False$"),
    (["--compile=1"], r"^error: config key 'compile' expects bool"),  # 1 is not a bool, even though it is an int
    (["--n_layer"], r"^error: '--n_layer' has no value; write --n_layer=VALUE$"),
    (["config/nope.py"], r"^error: config file 'config/nope.py' does not exist"),
])
def test_configurator_bad_key_type_or_file_is_a_one_line_error(args, pattern):
    with pytest.raises(SystemExit, match=pattern):
        configure(conf_defaults(), args)


@pytest.mark.parametrize("text, pattern", [
    ("n_layers = 4\n", r"unknown config key 'n_layers' in .*c\.py \(did you mean n_layer\?\)"),
    ("n_layer = 4\nlearning_rate = = 1\n", r"^error: config file .*c\.py line 2: SyntaxError"),
    ("n_layer = 4\n\nout_dir = base + '/x'\n", r"^error: config file .*c\.py line 3: NameError: name 'base'"),
])
def test_configurator_mistakes_in_a_config_file_name_the_file_and_line(tmp_path, text, pattern):
    (tmp_path / "c.py").write_text(text)
    with pytest.raises(SystemExit, match=pattern):
        configure(conf_defaults(), [str(tmp_path / "c.py")])


@pytest.mark.parametrize("case, pattern", [
    ("flag", "did you mean vocab_size"),
    ("file", r"'shard_tokns' in .*c\.py \(did you mean shard_tokens\?\)"),
])
def test_configurator_errors_reach_the_terminal_as_one_line_without_traceback(tmp_path, case, pattern):
    (tmp_path / "c.py").write_text("vocab_size = 300\nval_fraction = 0.1\nshard_tokns = 5\n")
    args = ["--vocab_sise=300"] if case == "flag" else [str(tmp_path / "c.py")]
    one_line_error(run("prepare.py", *args, check=False), pattern)  # prepare.py: the quickest script to start


def test_configurator_keys_are_lowercase_so_config_file_constants_are_allowed(tmp_path):
    (tmp_path / "c.py").write_text("LAYERS = 6  # a constant of the file itself\nn_layer = LAYERS\n")
    ns = conf_defaults() | {"CHAT_TOKENS": ("a",), "REMOTE": "x"}
    assert configure(ns, [str(tmp_path / "c.py")])["n_layer"] == 6


def test_configurator_lists_no_constant_of_the_script_among_the_valid_keys():
    ns = conf_defaults() | {"CHAT_TOKENS": ("a",), "REMOTE": "x"}
    with pytest.raises(SystemExit, match=r"valid keys: betas, compile, learning_rate, n_layer, out_dir, vocab_size\)"):
        configure(ns, ["--zzz=1"])


def test_configurator_help_lists_the_keys_of_a_namespace_without_file_or_doc(capsys):
    with pytest.raises(SystemExit):
        configure(conf_defaults(), ["-h"])
    assert "n_layer = 12" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["bpe.py", "prepare.py", "sample.py", "rlhf.py", "bench.py", "plot.py"])
def test_help_and_h_print_every_key_and_exit_0_on_every_script(script, capsys):
    ns = runpy.run_path(os.path.join(HERE, script))
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            configure(ns, ["--out_dir=x", flag])
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        assert out.startswith(f"{script}: ") and "usage:" in out and f"python {script}" in out
        assert all(f"{k} = {v!r}" in out for k, v in config_keys(ns).items())


def test_train_help_exits_0_with_the_docstring_and_a_usage_line(train_help):
    p, out = train_help
    assert p.returncode == 0 and p.stderr == ""
    assert out[0].startswith("train.py: Pretrain a GPT") and "    python train.py config/small.py" in p.stdout


def test_train_help_lists_every_key_with_its_default(train_help):
    _, out = train_help
    keys = config_keys(vars(train))
    assert {"out_dir", "n_layer", "sharding", "vocab_size", "spike_factor"} <= set(keys)
    assigns = {line.split("  #")[0].rstrip() for line in out}
    assert {f"{k} = {v!r}" for k, v in keys.items()} <= assigns  # every key, with its default


def test_train_help_shows_every_keys_comment_as_written(train_help):
    p, _ = train_help
    keys = config_keys(vars(train))
    notes = source_notes(open(os.path.join(HERE, "train.py")).read())[0]
    fields = source_notes(textwrap.dedent(inspect.getsource(GPTConfig)), in_class=True)[0]
    comments = [c for k in keys for c in (notes.get(k) or fields[k])[2]]
    assert len(comments) > 30 and all(f"# {c}" in p.stdout for c in comments)  # the comments as written
    assert "# fsdp (FSDP2: params, grads, optimizer state sharded)" in p.stdout  # a continuation line, on its own line


def test_train_help_puts_the_keys_under_their_section_headings(train_help):
    _, out = train_help
    sections = [line for line in out if line.startswith("# ")]
    assert sections[:3] == ["# I/O", "# data", "# model: every field of GPTConfig (model.py) is a config key here; "
                                                 "vocab_size comes from the data"] and "# scale" in sections


def test_train_help_lists_no_constants(train_help):
    _, out = train_help
    assert not any(line.split(" = ")[0].isupper() for line in out if " = " in line)  # no GUARD_FIELDS, STOP...


def test_an_unknown_train_key_suggests_every_key_and_no_constant():
    keys = config_keys(vars(train))
    with pytest.raises(SystemExit) as e:
        configure(dict(vars(train)), ["--zzzzzz=1"])
    suggested = str(e.value).split("valid keys: ")[1].rstrip(")").split(", ")
    assert set(suggested) == set(keys) and not any(k.isupper() for k in suggested)


RULED = dict(dropout=0.1, lr_schedule="cosine", batch_size=4, n_kv_head=None, grad_ckpt=None, out_dir="out",
             RULES=dict(lr_schedule=("cosine", "wsd"), dropout=(0.0, 1.0), batch_size=(1, None),
                        n_kv_head=(int, 1, None), grad_ckpt=((str, int),)))


@pytest.mark.parametrize("args, pattern", [
    (["--dropout=2.0"], r"^error: --dropout=2.0 is out of range; give a value in \[0.0, 1.0\]$"),
    (["--lr_schedule=linear"], r"^error: --lr_schedule='linear' is not one of: cosine, wsd$"),
    (["--batch_size=0"], r"^error: --batch_size=0 is out of range; give a value in \[1, inf\)$"),
    (["--n_kv_head=0"], r"^error: --n_kv_head=0 is out of range; give a value in \[1, inf\)$"),
    (["--n_kv_head=two"], r"^error: --n_kv_head='two' is a str; give a value that is int in \[1, inf\), or None$"),
    (["--grad_ckpt=True"], r"^error: --grad_ckpt=True is a bool; give a value that is str or int, or None$"),
    (["--batch_size=0", "--batch_size=2", "--dropout=1.5"], r"^error: --dropout=1.5 "),  # the value in the end counts
])
def test_configurator_rules_refuse_a_value_out_of_range_or_choices_or_type_in_one_line(args, pattern):
    with pytest.raises(SystemExit, match=pattern):
        configure(dict(RULED), args)


def test_configurator_rules_hold_for_the_final_values_and_keep_none_and_empty_paths(tmp_path):
    (tmp_path / "c.py").write_text("batch_size = 0\nn_kv_head = 3\n")  # 0 is refused only if it stays
    out = configure(dict(RULED), [str(tmp_path / "c.py"), "--batch_size=2", "--grad_ckpt=full", "--out_dir="])
    assert out == dict(config_keys(RULED), batch_size=2, n_kv_head=3, grad_ckpt="full", out_dir="")
    assert configure(dict(RULED), ["--n_kv_head=None"])["n_kv_head"] is None  # a None default stays allowed
    assert configure(dict(x=None, RULES=dict(x=(float, 0, 1))), ["--x=1"]) == dict(x=1.0)  # an int widens


def test_configurator_rules_naming_no_key_are_a_mistake_of_the_script():
    with pytest.raises(ValueError, match="RULES names 'dropot'"):
        configure(dict(dropout=0.1, RULES=dict(dropot=(0.0, 1.0))), [])


CONFIGURED = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f not in ("test_all.py",
                    "configurator.py") and "configure(globals()" in open(os.path.join(HERE, f), encoding="utf-8").read())


@pytest.mark.parametrize("name", CONFIGURED)
def test_rules_of_every_script_name_its_keys_and_its_defaults_keep_them(name):
    module = importlib.import_module(name)
    assert set(getattr(module, "RULES", {})) <= set(config_keys(vars(module)))
    configure(dict(vars(module)), [])  # the defaults themselves pass: no rule is stricter than its script


@pytest.mark.parametrize("script, key, rule", [
    ("prepare.py", "shard_tokens", "# tokens per shard file  [1, inf)"),
    ("bench.py", "mode", "# one of: bpe, train, generate, prepare"),
    ("sample.py", "dtype", "CPU fp32)  one of: auto, float32, bfloat16, float16"),
    ("bpe.py", "holdout", "to measure bytes/token  [0.0, 1.0]"),
])
def test_help_shows_each_keys_rule_after_its_comment(script, key, rule):
    p = run(script, "--help")
    assert next(line for line in p.stdout.splitlines() if line.startswith(f"{key} = ")).endswith(rule)


@pytest.mark.parametrize("content, pattern", [
    ("n_layer = 4\n".encode("utf-16"), r"^error: config file .*c\.py is not UTF-8 text \(byte 0\); save it as UTF-8$"),
    (b"vocab_size = 300\x00\n", r"^error: config file .*c\.py: SyntaxError: source code string cannot contain null"),
])
def test_configurator_a_config_file_that_is_not_utf8_text_is_one_line(tmp_path, content, pattern):
    (tmp_path / "c.py").write_bytes(content)
    one_line_error(run("prepare.py", str(tmp_path / "c.py"), check=False), pattern)


# ============================================================================ bpe.py
SPECIAL_TEXT = "hi<|endoftext|>there<|user|>"
CHAT = [dict(role="system", content="be brief"), dict(role="user", content="hi"), dict(role="assistant", content="yo"),
        dict(role="user", content="1+1="), dict(role="assistant", content="2")]


def bare_tiktoken(tok):
    """tiktoken's own Encoding of tok's ranks, pattern and special tokens: the reference."""
    return tiktoken.Encoding("bare", pat_str=tok.pattern, mergeable_ranks=tok.ranks, special_tokens=tok.special_tokens)


def chat_ids_by_hand(tok):
    """CHAT's ids, written out turn by turn."""
    sp, enc = tok.special_tokens, tok.encode_ordinary
    return ([sp["<|endoftext|>"], sp["<|system|>"]] + enc("be brief") + [sp["<|end|>"], sp["<|user|>"]] + enc("hi") +
            [sp["<|end|>"], sp["<|assistant|>"]] + enc("yo") + [sp["<|end|>"], sp["<|user|>"]] + enc("1+1=") +
            [sp["<|end|>"], sp["<|assistant|>"]] + enc("2") + [sp["<|end|>"]])


def status_output(monkeypatch, stream):
    """What bpe.status writes to stream on a fake clock: 10 s of updates, 4 a second, then a final line and the
    first line of a next job."""
    clock = [100.0]
    monkeypatch.setattr(bpe.time, "time", lambda: clock[0])
    monkeypatch.setattr(sys, "stderr", stream)
    bpe._status_last[0] = 0.0
    for i in range(40):
        bpe.status(f"line {i}")
        clock[0] += 0.25
    bpe.status("done", final=True)
    bpe.status("next")  # a new job after a final line: its first line shows at once
    return stream.getvalue()


@pytest.fixture(scope="module")
def bpe_cli(tmp_path_factory):
    """`python bpe.py` on BPE_CORPUS as files, vocab 400, a quarter held out: (the process, the tokenizer file)."""
    d = tmp_path_factory.mktemp("bpe_cli")
    (d / "corpus").mkdir()
    for i, text in enumerate(BPE_CORPUS):
        (d / "corpus" / f"{i}.txt").write_text(text, encoding="utf-8")
    out = d / "tok.bpe"
    r = subprocess.run([sys.executable, os.path.join(HERE, "bpe.py"), f"--input={d / 'corpus'}", "--vocab_size=400",
                        f"--out={out}", "--holdout=0.25"], capture_output=True, text=True, cwd=HERE)
    return r, out


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def test_bpe_known_answer_aaabdaaabac_worked_by_hand():
    # "aaabdaaabac" is one chunk. Pair counts: aa 4, ab 2, bd 1, da 1, ba 1, ac 1 -> merge aa = 256.
    # Left to right, "aaab" becomes [aa, a, b]: now Z=aa, text Z a b d Z a b a c; pairs (Z,a) 2 and (a,b) 2
    # tie, and the smaller pair of ids wins: (97, 98) < (256, 97), so ab = 257. Then (Z, ab) 2 -> aaab = 258.
    tok = bpe.train(["aaabdaaabac"], 256 + 3 + len(bpe.SPECIAL_TOKENS))
    learned = sorted(tok.ranks.items(), key=lambda kv: kv[1])[256:]
    assert learned == [(b"aa", 256), (b"ab", 257), (b"aaab", 258)]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert bpe.encode_reference(tok, "aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_bpe_vocab_size_is_exact_with_special_tokens_last(bpe_tok):
    assert bpe_tok.vocab_size == 1000 and len(bpe_tok.ranks) == 1000 - len(bpe.SPECIAL_TOKENS)
    assert sorted(bpe_tok.ranks.values()) == list(range(1000 - len(bpe.SPECIAL_TOKENS)))
    assert list(bpe_tok.special_tokens) == bpe.SPECIAL_TOKENS
    assert list(bpe_tok.special_tokens.values()) == list(range(995, 1000)) and bpe_tok.eot == 995
    assert bpe_tok.enc.n_vocab == 1000


def test_bpe_smallest_vocab_is_the_256_bytes_and_the_special_tokens():
    smallest = bpe.train(BPE_CORPUS[:1], 256 + 2, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert smallest.vocab_size == 258 and smallest.eot == 256


def test_bpe_without_special_tokens_has_no_eot():
    no_specials = bpe.train(BPE_CORPUS[:1], 300, special_tokens=[])
    assert no_specials.vocab_size == 300 and no_specials.eot is None


def test_bpe_vocab_size_below_the_bytes_and_special_tokens_is_a_clear_error():
    with pytest.raises(SystemExit, match="error: vocab_size=260 is too small"):
        bpe.train(["hello"], 260)


def test_bpe_vocab_size_beyond_the_corpus_merges_is_a_clear_error_naming_the_most_it_allows():
    with pytest.raises(SystemExit, match="error: the corpus has no pairs left.*at most 265"):
        bpe.train(["hello"], 5000)  # 5 bytes in one chunk allow exactly 4 merges: 256 + 4 + 5 specials = 265


def test_bpe_roundtrip_random_unicode_fuzz(bpe_tok):
    rng = random.Random(1234)
    texts = [random_unicode(rng) for _ in range(2000)] + ADVERSARIAL
    for text in texts:
        assert bpe_tok.decode(bpe_tok.encode_ordinary(text)) == text
        assert bpe_tok.decode_bytes(bpe_tok.encode(text, disallowed_special=())) == text.encode("utf-8")
    assert [bpe_tok.decode(ids) for ids in bpe_tok.encode_ordinary_batch(texts)] == texts


@pytest.mark.parametrize("pattern", [bpe.GPT4_PATTERN, bpe.GPT2_PATTERN], ids=["gpt4", "gpt2"])
def test_bpe_reference_encoder_matches_tiktoken_ids(pattern, bpe_tok):
    tok = bpe_tok if pattern == bpe.GPT4_PATTERN else bpe.train(BPE_CORPUS, 700, pattern=pattern)
    rng = random.Random(99)
    texts = [random_unicode(rng, 80) for _ in range(1000)] + ADVERSARIAL + [BPE_CORPUS[0][:5000], BPE_CORPUS[-1]]
    for text in texts:
        assert bpe.encode_reference(tok, text) == tok.encode_ordinary(text), repr(text)


def test_bpe_special_tokens_are_disallowed_by_default(bpe_tok):
    with pytest.raises(ValueError, match="disallowed special token"):
        bpe_tok.encode(SPECIAL_TEXT)  # by default every special token is disallowed: data can't inject them


def test_bpe_allowed_special_tokens_encode_as_tiktoken_does(bpe_tok):
    all_ids = bpe_tok.encode(SPECIAL_TEXT, allowed_special="all")
    assert all_ids == bare_tiktoken(bpe_tok).encode(SPECIAL_TEXT, allowed_special="all")
    assert all_ids.count(bpe_tok.eot) == 1 and bpe_tok.special_tokens["<|user|>"] == all_ids[-1]


def test_bpe_only_the_allowed_special_tokens_become_special_ids(bpe_tok):
    only_eot = bpe_tok.encode(SPECIAL_TEXT, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert bpe_tok.eot in only_eot and bpe_tok.special_tokens["<|user|>"] not in only_eot


def test_bpe_special_token_text_that_is_not_disallowed_encodes_as_ordinary_text(bpe_tok):
    as_text = bpe_tok.encode(SPECIAL_TEXT, disallowed_special=())
    assert as_text == bpe_tok.encode_ordinary(SPECIAL_TEXT) == bare_tiktoken(bpe_tok).encode_ordinary(SPECIAL_TEXT)
    assert not set(as_text) & set(bpe_tok.special_tokens.values())


def test_bpe_decode_gives_the_text_back_with_special_tokens_as_ids_or_as_text(bpe_tok):
    all_ids = bpe_tok.encode(SPECIAL_TEXT, allowed_special="all")
    as_text = bpe_tok.encode(SPECIAL_TEXT, disallowed_special=())
    assert bpe_tok.decode(all_ids) == bpe_tok.decode(as_text) == SPECIAL_TEXT


def test_bpe_encode_batch_follows_the_same_special_token_rules(bpe_tok):
    all_ids = bpe_tok.encode(SPECIAL_TEXT, allowed_special="all")
    assert bpe_tok.encode_batch([SPECIAL_TEXT, "x"], allowed_special="all") == [all_ids, bpe_tok.encode("x")]
    with pytest.raises(ValueError):
        bpe_tok.encode_batch(["ok", SPECIAL_TEXT])


def test_bpe_special_tokens_in_training_text_are_not_learned():
    tok = bpe.train(["<|endoftext|>" * 50 + "ab"], 256 + 1 + len(bpe.SPECIAL_TOKENS))
    assert sorted(tok.ranks.items(), key=lambda kv: kv[1])[256:] == [(b"ab", 256)]


def test_bpe_training_is_deterministic_byte_identical_file(tmp_path, bpe_tok):
    again = bpe.train(iter(BPE_CORPUS), 1000)  # a generator this time
    bpe_tok.save(tmp_path / "a.bpe")
    again.save(tmp_path / "b.bpe")
    assert (tmp_path / "a.bpe").read_bytes() == (tmp_path / "b.bpe").read_bytes()
    assert again.hash == bpe_tok.hash


def test_bpe_parallel_chunk_counting_equals_serial():
    serial = bpe.count_chunks(BPE_CORPUS, bpe.GPT4_PATTERN, bpe.SPECIAL_TOKENS)
    parallel = bpe.count_chunks(BPE_CORPUS, bpe.GPT4_PATTERN, bpe.SPECIAL_TOKENS, chars_per_batch=10_000)
    assert parallel == serial


def test_bpe_save_load_roundtrip_is_identical(tmp_path, bpe_tok):
    path = tmp_path / "tok.bpe"
    bpe_tok.save(path)
    loaded = bpe.Tokenizer.load(path)
    assert (loaded.ranks, loaded.pattern, loaded.special_tokens) == (bpe_tok.ranks, bpe_tok.pattern, bpe_tok.special_tokens)
    assert loaded.hash == bpe_tok.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.encode("héllo wörld 🎉") == bpe_tok.encode("héllo wörld 🎉")


def test_bpe_file_is_a_json_header_then_a_line_of_base64_bytes_and_rank_per_token(tmp_path, bpe_tok):
    path = tmp_path / "tok.bpe"
    bpe_tok.save(path)
    header = json.loads(path.read_text().split("\n")[0])  # human-inspectable: a JSON header, then base64 + rank
    assert header["format"] == "scratchlm-bpe" and header["n_ranks"] == 995
    b64, rank = path.read_text().split("\n")[257].split(" ")
    assert rank == "256" and bpe_tok.ranks[base64.b64decode(b64)] == 256


def test_bpe_save_leaves_no_temporary_file(tmp_path, bpe_tok):
    bpe_tok.save(tmp_path / "tok.bpe")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.bpe"]  # the temporary file of the atomic save is gone


def test_bpe_corrupt_or_truncated_file_is_a_clear_error(tmp_path, bpe_tok):
    path = tmp_path / "tok.bpe"
    bpe_tok.save(path)
    good = path.read_bytes()
    lines = good.split(b"\n")
    swapped = lines[:300] + [lines[301], lines[300]] + lines[302:]
    cases = {"half": good[:len(good) // 2], "last byte": good[:-1], "last line": b"\n".join(lines[:-2]) + b"\n",
             "header": b"{not json\n" + b"\n".join(lines[1:]), "bad base64": good.replace(lines[300], b"@@@ 299"),
             "empty": b"", "binary": bytes(range(256)), "ranks out of order": b"\n".join(swapped)}
    for name, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(SystemExit, match=r"^error: tokenizer file .*tok\.bpe is corrupt: .*; retrain it") as e:
            bpe.Tokenizer.load(path)
        assert "\n" not in str(e.value), name


def test_bpe_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: tokenizer file .*missing\.bpe does not exist"):
        bpe.Tokenizer.load(tmp_path / "missing.bpe")


def test_bpe_lone_surrogate_is_a_clear_error(bpe_tok):
    for call in (bpe_tok.encode, bpe_tok.encode_ordinary, lambda t: bpe_tok.encode_batch([t]),
                 lambda t: bpe_tok.encode_ordinary_batch([t]), lambda t: bpe.train([t], 300)):
        with pytest.raises(ValueError, match="lone surrogate '\\\\udcff' at index 3"):
            call("abc\udcffdef")


def test_bpe_pattern_that_would_drop_characters_is_refused():
    with pytest.raises(SystemExit, match="does not match every character"):
        bpe.train(["hello, world"], 300, pattern=r"\w+")  # would silently drop ", "


def test_bpe_pattern_that_is_no_regex_is_a_clear_error():
    with pytest.raises(SystemExit, match="^error: bad pattern"):
        bpe.train(["hello, world"], 300, pattern=r"(\w+")


def test_bpe_cli_saves_a_tokenizer_of_the_vocab_size_asked_for(bpe_cli):
    r, out = bpe_cli
    assert r.returncode == 0, r.stderr
    assert bpe.Tokenizer.load(out).vocab_size == 400


def test_bpe_cli_summarises_the_tokenizer_and_its_training(bpe_cli):
    r, _ = bpe_cli
    assert "vocab_size 400" in r.stdout and "bytes/token" in r.stdout and "merges/s" in r.stderr


def test_status_lines_rewrite_one_line_on_a_terminal(monkeypatch):
    assert status_output(monkeypatch, Terminal()) == \
        "".join(f"\rline {i}   " for i in range(40)) + "\rdone   \n\rnext   "


def test_status_lines_in_a_log_are_plain_lines_every_few_seconds(monkeypatch):
    assert status_output(monkeypatch, io.StringIO()) == "line 0\nline 20\ndone\nnext\n"  # every 5 s, no \r


def test_chat_template_writes_each_turn_between_its_role_token_and_end():
    tok = chat_tokenizer()
    assert bpe.encode_chat(tok, CHAT)[0] == chat_ids_by_hand(tok)


def test_chat_template_masks_exactly_the_assistant_content_and_its_end():
    tok = chat_tokenizer()
    sp, enc = tok.special_tokens, tok.encode_ordinary
    ids, mask = bpe.encode_chat(tok, CHAT)
    learned = [t for t, m in zip(ids, mask) if m]
    assert learned == enc("yo") + [sp["<|end|>"]] + enc("2") + [sp["<|end|>"]]


def test_chat_template_generation_prompt_ends_in_an_open_assistant_turn():
    tok = chat_tokenizer()
    gen, gmask = bpe.encode_chat(tok, CHAT[:4], add_generation_prompt=True)
    want = chat_ids_by_hand(tok)
    assert gen[-1] == tok.special_tokens["<|assistant|>"] and gen == want[:len(gen)] and not gmask[-1]


def test_chat_template_keeps_typed_special_token_text_as_text():
    # a user cannot close their own turn
    tok = chat_tokenizer()
    assert tok.special_tokens["<|end|>"] not in bpe.encode_chat(tok, [dict(role="user", content="<|end|>")])[0][:-1]


def test_chat_template_needs_a_tokenizer_with_the_chat_tokens():
    plain = bpe.train(["abc"], 257, special_tokens=["<|endoftext|>"])
    with pytest.raises(SystemExit, match="error: the tokenizer lacks the chat tokens"):
        bpe.encode_chat(plain, CHAT)


@pytest.mark.parametrize("case, pattern", [
    ("holdout", r"^error: --holdout=1.5 is out of range; give a value in \[0.0, 1.0\]$"),
    ("out_dir", r"^error: --out=.* is a directory; give the file to write, e.g. --out=.*tok\.bpe$"),
    ("out_missing", r"^error: --out=.*t\.bpe: directory .*missing does not exist; make it first \(mkdir -p "),
])
def test_bpe_cli_bad_holdout_or_out_is_one_line_before_training_and_writes_nothing(tmp_path, case, pattern):
    (tmp_path / "c.txt").write_text("hello world, hello tokens\n" * 20)
    out = {"holdout": tmp_path / "t.bpe", "out_dir": tmp_path, "out_missing": tmp_path / "missing" / "t.bpe"}[case]
    p = run("bpe.py", f"--input={tmp_path / 'c.txt'}", "--vocab_size=270", f"--out={out}",
            *(["--holdout=1.5"] if case == "holdout" else []), check=False)
    one_line_error(p, pattern)
    assert os.listdir(tmp_path) == ["c.txt"]


def test_bpe_save_that_fails_leaves_no_temporary_file(tmp_path, bpe_tok):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        bpe_tok.save(str(tmp_path / "d"))  # os.replace of the temp file onto a directory fails
    assert os.listdir(tmp_path) == ["d"]


# ============================================================================ prepare.py
BAD_JSONL = '{"text": "fine"}\n{"txt": "no"}\n'


def words_docs(n, seed=0):
    rng = random.Random(seed)
    vocab = ["the", "cell", "energy", "water", "plants", "light", "ünï", "school", "of", "and", "is", "läuft"]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 60))) + "." for _ in range(n)]


def write_parquet(path, docs, row_group_size=7):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs, "id": [f"doc{i}" for i in range(len(docs))]}), str(path),
                   row_group_size=row_group_size)


def cached_download(tmp_path):
    """A local file downloaded by prepare.download into tmp_path/cache: (the source, the cached copy's path)."""
    src = tmp_path / "src.txt"
    src.write_text("hello world\n" * 1000)
    dest = str(tmp_path / "cache" / "src.txt")
    os.makedirs(os.path.dirname(dest))
    prepare.download(src.as_uri(), dest, size=12000)
    return src, dest


def words_corpus(tmp_path):
    """40 .txt documents in tmp_path/corpus: (that dir, prepare.py's options for it)."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(words_docs(40)):
        (src / f"a{i:02d}.txt").write_text(d)
    return src, [f"--input={src}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300", "--val_fraction=0.2",
                 "--tokenizer_max_bytes=2000"]  # the tokenizer is made from the first files, before a bad one is read


def test_prepare_meta_and_shard_headers_name_the_tokenizer(tiny_data):
    data_root, name, _ = tiny_data
    meta = json.load(open(os.path.join(data_root, name, "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(data_root, name, "tokenizer.bpe"))
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["tokenizer_hash"] == tok.hash
    for split in ("train", "val"):
        header = prepare.read_header(os.path.join(data_root, name, meta[f"{split}_shards"][0]))
        assert header["itemsize"] == 2 and header["vocab_size"] == 300 and header["tokenizer_hash"] == tok.hash


def test_prepare_shards_decode_to_the_documents_joined_by_eot(tiny_data):
    data_root, name, docs = tiny_data
    meta = json.load(open(os.path.join(data_root, name, "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(data_root, name, "tokenizer.bpe"))
    for split in ("train", "val"):
        ids = np.concatenate([prepare.read_shard(os.path.join(data_root, name, p)) for p in meta[f"{split}_shards"]])
        assert len(ids) == meta[f"{split}_tokens"]
        expected = [d for i, d in enumerate(docs) if prepare.split_of(i, 0.2) == split]
        assert len(expected) == meta[f"{split}_docs"] > 0
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in expected)


def test_prepare_rerun_with_same_inputs_is_a_noop(tiny_data):
    data_root, name, _ = tiny_data
    shard = os.path.join(data_root, name, "train_000.bin")
    before = os.stat(shard).st_mtime_ns
    p = run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={data_root}",
            f"--dataset={name}", "--vocab_size=300", "--val_fraction=0.2")
    assert "up to date" in p.stdout and os.stat(shard).st_mtime_ns == before


def test_prepare_reuses_a_given_tokenizer(tiny_data, tmp_path):
    data_root, name, _ = tiny_data
    tok_file = os.path.join(data_root, name, "tokenizer.bpe")
    run("prepare.py", f"--input={os.path.dirname(data_root)}/corpus", f"--data_root={tmp_path}", "--dataset=again",
        f"--tokenizer={tok_file}", "--val_fraction=0.2")
    meta = json.load(open(tmp_path / "again" / "meta.json"))
    assert meta["tokenizer_hash"] == json.load(open(os.path.join(data_root, name, "meta.json")))["tokenizer_hash"]


def test_prepare_tokenizes_in_processes_exactly_as_in_one(tmp_path, bpe_tok):
    path = str(tmp_path / "tok.bpe")
    bpe_tok.save(path)
    pairs = [("val" if i % 7 == 3 else "train", d) for i, d in enumerate(words_docs(80))]
    serial = list(prepare.encoded_batches(pairs, bpe_tok, path, procs=1))
    parallel = list(prepare.encoded_batches(pairs, bpe_tok, path, procs=2, batch_chars=500))
    assert len(serial) == 1 and len(parallel) > 4
    for split in ("train", "val"):
        docs = [d for s, d in pairs if s == split]
        expected = np.concatenate([np.array([bpe_tok.eot] + bpe_tok.encode_ordinary(d)) for d in docs])
        for results in (serial, parallel):
            got = [r[split] for r in results if split in r]
            assert np.array_equal(np.concatenate([ids for ids, _, _ in got]), expected)
            assert sum(n for _, n, _ in got) == len(docs)
            assert sum(b for _, _, b in got) == sum(len(d.encode()) for d in docs)


def test_download_from_url_copies_the_file_and_pins_its_checksum(tmp_path):
    src, dest = cached_download(tmp_path)
    assert open(dest).read() == src.read_text()
    assert open(dest + ".sha256").read().strip() == prepare.file_sha256(dest)  # pinned on first download


def test_download_refuses_and_removes_a_cached_copy_that_changed(tmp_path):
    src, dest = cached_download(tmp_path)
    with open(dest, "a") as f:  # the cached copy changes behind our back
        f.write("tampered")
    with pytest.raises(SystemExit, match="checksum mismatch"):
        prepare.download(src.as_uri(), dest)
    assert not os.path.exists(dest)


def test_download_of_a_missing_url_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "cache")
    with pytest.raises(SystemExit, match="cannot download"):
        prepare.download((tmp_path / "missing.txt").as_uri(), str(tmp_path / "cache" / "missing.txt"))


def test_download_resumes_a_partial_file_with_an_http_range_request(tmp_path):
    payload = os.urandom(300_000)
    ranges = []

    class RangeHandler(http.server.BaseHTTPRequestHandler):  # a minimal server that honours "Range: bytes=N-"
        def do_GET(self):
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            ranges.append(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = str(tmp_path / "big.bin")
        with open(dest + ".part", "wb") as f:  # an earlier download died a third of the way through
            f.write(payload[:100_000])
        prepare.download(f"http://127.0.0.1:{server.server_port}/big.bin", dest, size=len(payload))
    finally:
        server.shutdown()
    assert ranges == [100_000] and open(dest, "rb").read() == payload


def test_prepare_knows_fineweb_edus_14_published_parquet_shards_and_their_checksums():
    assert len(prepare.REMOTE["fineweb-edu"]) == 14 and prepare.DEFAULT_VOCAB["fineweb-edu"] == 50257
    assert sum(size for _, size, _ in prepare.REMOTE["fineweb-edu"]) == 28_518_193_415  # the sample's published size
    assert all(url.startswith(prepare.FINEWEB_EDU) and len(sha) == 64 for url, _, sha in prepare.REMOTE["fineweb-edu"])


def test_prepare_fineweb_edu_downloads_its_parquet_shards_and_splits_rows_into_documents(tmp_path, monkeypatch):
    docs = words_docs(60)
    write_parquet(tmp_path / "000_00000.parquet", docs[:30] + [None, "   "] + docs[30:])  # null and blank rows: skipped
    src = tmp_path / "000_00000.parquet"
    monkeypatch.setitem(prepare.REMOTE, "fineweb-edu", [(src.as_uri(), src.stat().st_size, prepare.file_sha256(src)),
                                                        ("file:///nonexistent/001_00000.parquet", 1, "0" * 64)])
    for key, value in dict(dataset="fineweb-edu", data_root=str(tmp_path / "data"), vocab_size=300,
                           val_fraction=0.1, fineweb_shards=1, input="").items():
        monkeypatch.setattr(prepare, key, value)
    out = prepare.prepare()  # fineweb_shards=1: the second (unreachable) shard is never asked for
    assert os.path.exists(tmp_path / "data" / "downloads" / "000_00000.parquet.sha256")
    meta = json.load(open(os.path.join(out, "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(out, "tokenizer.bpe"))
    assert meta["train_docs"] + meta["val_docs"] == 60 and meta["val_split"] == "documents"
    for split in ("train", "val"):
        ids = np.concatenate([prepare.read_shard(os.path.join(out, p)) for p in meta[f"{split}_shards"]])
        expected = [d for i, d in enumerate(docs) if prepare.split_of(i, 0.1) == split]
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in expected)


def test_parquet_without_pyarrow_is_a_one_line_error_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow.parquet` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match=r"^error: reading \.parquet files \(fineweb-edu\) needs pyarrow; "
                                         r"`pip install pyarrow`$"):
        prepare.source_files(input="", dataset="fineweb-edu", data_root=str(tmp_path), fineweb_shards=14)
    assert not os.path.exists(tmp_path / "downloads")


def test_prepare_one_file_without_blank_lines_holds_out_its_tail_as_val(tmp_path):
    text = "\n".join(words_docs(120, seed=1)) + "\n"  # one document that no blank line splits
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    run("prepare.py", f"--input={tmp_path / 'one.txt'}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300",
        "--val_fraction=0.1")
    out = tmp_path / "data" / "one"
    meta = json.load(open(out / "meta.json"))
    tok = bpe.Tokenizer.load(str(out / "tokenizer.bpe"))
    decoded = {s: tok.decode(np.concatenate([prepare.read_shard(str(out / p)) for p in meta[f"{s}_shards"]]).tolist())
               for s in ("train", "val")}
    cut = len(text) - round(len(text) * 0.1)
    assert meta["val_split"] == "tail" and meta["train_docs"] == meta["val_docs"] == 1
    assert decoded == {"train": "<|endoftext|>" + text[:cut], "val": "<|endoftext|>" + text[cut:]}
    assert meta["val_bytes"] == len(text[cut:].encode()) and sorted(os.listdir(tmp_path / "data")) == ["one"]


def test_prepare_reads_text_files_without_an_extension_and_names_the_files_it_skips(tmp_path):
    src = tmp_path / "licenses"
    (src / ".git").mkdir(parents=True)
    (src / "GPL").write_text("\n\n".join(words_docs(20, seed=2)))  # extensionless UTF-8 text: a document
    (src / "Apache-2.0").write_text("ünïcödé " + "\n\n".join(words_docs(20, seed=3)))  # ".0" is no extension
    (src / "a.txt").write_text("\n\n".join(words_docs(20, seed=4)))
    (src / "blob").write_bytes(b"\x7fELF\x02\x01" + b"\0" * 64)  # NUL bytes: binary
    (src / "latin").write_bytes("caf\u00e9 au lait".encode("latin-1"))  # invalid UTF-8: not text
    (src / "notes.csv").write_text("x,y\n")  # an extension prepare.py does not read
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: not part of the corpus
    files = [os.path.basename(f) for f in prepare.corpus_files(str(src))]
    assert files == ["Apache-2.0", "GPL", "a.txt"]
    p = run("prepare.py", f"--input={src}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300")
    skipped = [line for line in p.stderr.splitlines() if line.startswith("skipped")]
    assert skipped == ["skipped 4 files of other kinds: .git/HEAD, blob, latin, ..."]
    assert json.load(open(tmp_path / "data" / "licenses" / "meta.json"))["n_files"] == 3


def test_prepare_error_mid_way_leaves_no_output(tmp_path):
    src, common = words_corpus(tmp_path)
    (src / "z_bad.jsonl").write_text(BAD_JSONL)
    one_line_error(run("prepare.py", *common, check=False), r"z_bad\.jsonl:2 is not a JSON object", True)
    assert os.listdir(tmp_path / "data") == []  # no tokenizer, no shards, no .tmp left behind


def test_prepare_error_mid_way_keeps_an_earlier_complete_output(tmp_path):
    src, common = words_corpus(tmp_path)
    run("prepare.py", *common)
    out = tmp_path / "data" / "corpus"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    (src / "z_bad.jsonl").write_text(BAD_JSONL)
    one_line_error(run("prepare.py", *common, check=False), r"z_bad\.jsonl:2 is not a JSON object", True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path / "data") == ["corpus"]


def test_prepare_unknown_dataset_names_the_ones_it_knows_and_how_to_give_a_corpus(tmp_path):
    p = run("prepare.py", "--dataset=nosuch", f"--data_root={tmp_path}", check=False)
    one_line_error(p, r"^error: unknown dataset 'nosuch'; prepare.py knows stdlib, sitepackages, shakespeare, "
                      r"tinystories, fineweb-edu; for a corpus of your own pass --input=PATH \(then --dataset names its output\)$")


def test_prepare_near_miss_dataset_name_suggests_the_right_one(tmp_path):
    one_line_error(run("prepare.py", "--dataset=fineweb", f"--data_root={tmp_path}", check=False),
                   r"unknown dataset 'fineweb'; did you mean --dataset=fineweb-edu\?")


def test_missing_data_of_a_known_dataset_names_the_command_that_prepares_it(tmp_path):
    with pytest.raises(SystemExit, match=r"run `python prepare.py --dataset=shakespeare --data_root=\S+` first$"):
        prepare.load_meta(str(tmp_path / "shakespeare"))


def test_missing_data_of_ones_own_dataset_suggests_a_command_that_works(tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.load_meta(str(tmp_path / "mine"))
    command = re.search(r"`python (prepare\.py [^`]*)`", str(e.value)).group(1).split()
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(words_docs(30)))
    run(*[a.replace("PATH", str(src)) for a in command], "--vocab_size=300")  # the suggested command works
    assert prepare.load_meta(str(tmp_path / "mine"))["vocab_size"] == 300


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"input .*missing does not exist; pass --input="),
    ("empty", r"the corpus is empty"),
    ("no_text", r"has no \.txt/\.md/\.py/\.jsonl\[\.gz\] or \.parquet files, nor text files without an extension; "
                r"nothing to prepare \(skipped 2 files of other kinds: a\.csv, blob\)$"),
    ("latin1", r"latin1\.txt is not UTF-8 text \(byte 3\); convert it"),
    ("not_json", r"bad\.jsonl:2 is not a JSON object with a \"text\" field"),
    ("no_field", r"bad\.jsonl:3 is not a JSON object with a \"text\" field"),
    ("tokenizer", r"tokenizer file .*corrupt\.bpe is corrupt"),
])
def test_bad_corpus_or_tokenizer_given_to_prepare_is_a_one_line_error(tmp_path, case, pattern):
    src, extra = tmp_path / case, []
    if case != "missing":
        src.mkdir()
    if case == "empty":
        (src / "a.txt").write_text("  \n\n")
    elif case == "no_text":
        (src / "a.csv").write_text("x,y\n")
        (src / "blob").write_bytes(b"\x7fELF\0\0")  # no extension, but binary
    elif case == "latin1":
        (src / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))  # \xe9 at byte 3
    elif case in ("not_json", "no_field"):
        lines = ['{"text": "one"}', '{"text": "two"' if case == "not_json" else '{"text": "two"}', '{"txt": "3"}']
        (src / "bad.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "tokenizer":
        (src / "a.txt").write_text("hello\n\nworld\n")
        (tmp_path / "corrupt.bpe").write_text('{"format": "scratchlm-bpe"\nAAAA 0\n')
        extra = [f"--tokenizer={tmp_path / 'corrupt.bpe'}"]
    p = run("prepare.py", f"--input={src}", f"--data_root={tmp_path / 'data'}", "--vocab_size=300", *extra,
            check=False)
    one_line_error(p, pattern, after_progress=True)


def test_prepare_progress_line_shows_the_amount_rate_share_and_eta(monkeypatch):
    monkeypatch.setattr(prepare.time, "time", lambda: 120.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bpe._status_last[0] = 0.0
    prepare.progress("tokenizing", 50e6, 110.0, frac=0.25)  # prepare.py's lines go through bpe.status
    assert sys.stderr.getvalue() == "tokenizing: 50.0 MB | 5.0 MB/s | 25.0% | ETA 30s\n"


@pytest.mark.parametrize("case, args, pattern", [
    ("shard_tokens", ["--shard_tokens=0"], r"^error: --shard_tokens=0 is out of range; give a value in \[1, inf\)$"),
    ("escape", ["--dataset=../escape"], r"^error: --dataset='\.\./escape' is not a plain name; .*--data_root$"),
    ("num_proc", ["--num_proc=-2"], r"^error: --num_proc=-2 is out of range; give a value in \[0, inf\)$"),
    ("jsonl", [], r'^error: .*rows\.jsonl:2: "text" is int 42, not a string; every line must be a JSON object'),
    ("tokenizer", ["--tokenizer=nope.bpe"], r"^error: --tokenizer=nope\.bpe does not exist; give a tokenizer file"),
    ("data_root", [], r"^error: --data_root=.*afile is a file, not a directory; give a directory"),
])
def test_prepare_bad_settings_and_rows_are_one_line_errors_that_write_nothing(tmp_path, case, args, pattern):
    src, base = words_corpus(tmp_path)
    if case == "jsonl":
        (src / "rows.jsonl").write_text('{"text": "hello world"}\n{"text": 42}\n')
    if case == "data_root":
        (tmp_path / "afile").write_text("x")
        args = [f"--data_root={tmp_path / 'afile'}"]
    p = run("prepare.py", *base, *args, check=False)
    one_line_error(p, pattern, after_progress=case == "jsonl")
    assert not [f for _, _, files in os.walk(tmp_path / "data") for f in files]  # no data: a temp dir is removed
    assert sorted(os.listdir(tmp_path)) == ["afile"] * (case == "data_root") + ["corpus"] + ["data"] * (case == "jsonl")


def test_prepare_shard_writer_refuses_a_shard_size_that_would_never_empty_its_buffer():
    with pytest.raises(ValueError, match="shard_tokens must be >= 1, got 0"):
        prepare.write_shards([], None, "", "", val_fraction=0.1, strict=True, shard_tokens=0, num_proc=1)


def read_only_prepare():
    """prepare.py's command line (sys.argv) where writing under --data_root fails as on a read-only disk: chmod does
    not stop root, so open() refuses instead."""
    root = os.path.abspath(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--data_root=")))
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kw):
        if set(mode) & set("wax+") and os.path.abspath(str(file)).startswith(root):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kw)
    builtins.open = refusing_open
    sys.argv = ["prepare.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(HERE, "prepare.py"), run_name="__main__")


def test_prepare_into_a_read_only_data_root_is_one_line_and_leaves_no_temp_dir(tmp_path):
    _, args = words_corpus(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    if os.geteuid() == 0:
        entry = this_file("read_only_prepare")
    else:
        root.chmod(0o555)
        entry = ["prepare.py"]
    p = run(*entry, *args, check=False)
    one_line_error(p, r"^error: cannot write .*data.* \(Permission denied\); give a --data_root you can write to",
                   after_progress=True)
    assert os.listdir(root) == []


# ---- --dataset=sitepackages, on a fake site-packages (never this Python's real one)
def fake_site_packages(root):
    """Two listed packages (numpy, torch; torch with a subpackage and a non-.py file) and an unlisted one, 6 tiny
    .py files each: (root, {package: its documents in file order})."""
    docs = {}
    for pkg in ("numpy", "torch", "notlisted"):
        docs[pkg] = []
        for i in range(6):
            path = os.path.join(root, pkg, "sub" if pkg == "torch" and i >= 3 else "", f"m{i}.py")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            docs[pkg].append(f"def {pkg}_{i}(x):\n    return x + {i}  # ünï\n")
            with open(path, "w", encoding="utf-8") as f:
                f.write(docs[pkg][-1])
    with open(os.path.join(root, "torch", "table.json"), "w") as f:
        f.write("{}")
    return str(root), docs


def sitepackages_prepare(monkeypatch, site, data_root):
    for key, value in dict(dataset="sitepackages", site_packages=site, data_root=str(data_root), vocab_size=270,
                           val_fraction=0.2, input="", tokenizer="", num_proc=1).items():
        monkeypatch.setattr(prepare, key, value)
    return prepare.prepare()


def test_sitepackages_reads_only_the_listed_packages_in_the_lists_order_and_names_the_absent(tmp_path, monkeypatch,
                                                                                             capsys):
    site, _ = fake_site_packages(tmp_path)
    monkeypatch.setattr(prepare, "SITE_PACKAGES", ("torch", "nosuch", "numpy", "alsonot"))  # not alphabetical
    files = [os.path.relpath(f, site) for f in prepare.site_packages_files(site)]
    assert files == ["torch/m0.py", "torch/m1.py", "torch/m2.py", "torch/sub/m3.py", "torch/sub/m4.py",
                     "torch/sub/m5.py"] + [f"numpy/m{i}.py" for i in range(6)]
    assert capsys.readouterr().err == f"sitepackages: 2 of 4 packages not in {site}: nosuch, alsonot\n"
    assert prepare.source_files(input="", dataset="sitepackages", data_root="", fineweb_shards=1,
                                site_packages=site) == [os.path.join(site, f) for f in files]


def test_sitepackages_with_none_of_the_packages_is_one_error_line(tmp_path):
    (tmp_path / "notlisted").mkdir()
    p = run("prepare.py", "--dataset=sitepackages", f"--site_packages={tmp_path}", f"--data_root={tmp_path / 'd'}",
            check=False)
    one_line_error(p, rf"^error: none of SITE_PACKAGES \(\w+, \w+, \w+, \.\.\.\) is in {re.escape(str(tmp_path))}; "
                      r"point --site_packages at a site-packages that has them")
    assert not os.path.exists(tmp_path / "d" / "sitepackages")


def test_sitepackages_writes_shards_and_a_val_split_byte_identical_on_a_rerun(tmp_path, monkeypatch):
    site, docs = fake_site_packages(tmp_path / "site")
    listed = [d for pkg in prepare.SITE_PACKAGES if pkg in docs for d in docs[pkg]]  # numpy's, then torch's
    outs = [sitepackages_prepare(monkeypatch, site, tmp_path / name) for name in ("a", "b")]
    meta = json.load(open(os.path.join(outs[0], "meta.json")))
    tok = bpe.Tokenizer.load(os.path.join(outs[0], "tokenizer.bpe"))
    assert meta["val_split"] == "documents" and meta["n_files"] == 12 and meta["vocab_size"] == 270
    for split in ("train", "val"):
        ids = np.concatenate([prepare.read_shard(os.path.join(outs[0], p)) for p in meta[f"{split}_shards"]])
        expected = [d for i, d in enumerate(listed) if prepare.split_of(i, 0.2) == split]
        assert len(expected) == meta[f"{split}_docs"] > 0
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in expected)
    assert sorted(os.listdir(outs[0])) == sorted(os.listdir(outs[1]))
    for f in os.listdir(outs[0]):
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read(), f


def test_sitepackages_defaults_to_a_32768_token_vocabulary_and_this_pythons_site_packages(monkeypatch):
    assert prepare.DEFAULT_VOCAB["sitepackages"] == 32768 and prepare.site_packages == ""
    monkeypatch.setattr(prepare, "SITE_PACKAGES", ("nosuch",))  # so nothing real is read: the error names the place
    with pytest.raises(SystemExit, match=re.escape(f"is in {sysconfig.get_paths()['purelib']};")):
        prepare.site_packages_files("")


# ============================================================================ model.py
MODEL_OPTIONS = {  # each switch alone, then combinations
    "gpt2": {}, "rope": dict(pos_encoding="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"), "gqa": dict(n_kv_head=2), "mqa": dict(n_kv_head=1),
    "window": dict(sliding_window=5), "no_bias_untied": dict(bias=False, tie_embeddings=False),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "mistral_qk_untied": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, qk_norm=True,
                              sliding_window=6, rope_theta=5e5, tie_embeddings=False, mlp_hidden=96),
    "window_gqa_dropout": dict(sliding_window=4, n_kv_head=2, qk_norm=True, dropout=0.1),
    "smear": dict(smear_gate=True), "bigram": dict(bigram_embeds=50),
    "smear_bigram_llama": dict(smear_gate=True, bigram_embeds=50, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                               n_kv_head=2, bias=False, sliding_window=6),
}
GQA_OPTIONS = [dict(), dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)]
MODERN_SWITCHES = [dict(value_embeds=True), dict(unet_skips=True), dict(logit_softcap=2.0),
                   dict(value_embeds=True, unet_skips=True, n_layer=5, pos_encoding="rope", n_kv_head=1)]


def expected_params(cfg):
    """Parameter count written out from the architecture, independently of the model code."""
    C, V, L, b = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.bias
    hd = C // cfg.n_head
    kv = (cfg.n_kv_head or cfg.n_head) * hd
    per_norm = 2 if cfg.norm == "layernorm" and b else 1  # weight (+ bias)
    hidden = cfg.mlp_hidden or (64 * math.ceil(8 * C / 3 / 64) if cfg.mlp == "swiglu" else 4 * C)
    fc = 2 * hidden if cfg.mlp == "swiglu" else hidden
    attn = C * (C + 2 * kv) + C * C + ((C + 2 * kv) + C if b else 0) + (2 * hd * per_norm if cfg.qk_norm else 0)
    mlp = C * fc + hidden * C + (fc + C if b else 0)
    n = V * C + L * (attn + mlp + 2 * C * per_norm) + C * per_norm
    n += C * cfg.block_size if cfg.pos_encoding == "learned" else 0
    n += (min(12, C) + 1 if cfg.smear_gate else 0) + (cfg.bigram_embeds * C + 1 if cfg.bigram_embeds else 0)
    return n + (0 if cfg.tie_embeddings else V * C)


def forward_and_loss(name):
    """MODEL_OPTIONS[name] in training mode, a batch of 3 x 20 and its forward: (model, idx, logits, loss)."""
    model = gpt_with(**MODEL_OPTIONS[name]).train()
    idx, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    logits, loss = model(idx, targets)
    return model, idx, logits, loss


def gqa_and_mha_with_copied_kv_heads(kw):
    """A GQA model (2 kv heads for 4 query heads) and an MHA model that gets two copies of each of its kv heads."""
    gqa = gpt_with(spread=0.1, n_kv_head=2, **kw)
    mha = gpt_with(n_kv_head=4, **kw)
    sd, hd = gqa.state_dict(), 8
    for name in list(sd):
        if name.endswith("c_attn.weight") or name.endswith("c_attn.bias"):
            q, k, v = sd[name].split([4 * hd, 2 * hd, 2 * hd])
            # kv head j serves query heads 2j and 2j+1: give MHA two copies of it
            dup = lambda t: t.view(2, hd, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hd, *t.shape[1:])
            sd[name] = torch.cat([q, dup(k), dup(v)])
    mha.load_state_dict(sd)
    return gqa, mha


def windowed(n_kv_head, w=3, T=12):
    """A 1-layer model with a sliding window of w, the band of w positions written out entry by entry, an input
    to its attention layer and a row of T tokens."""
    model = gpt_with(spread=0.1, n_layer=1, sliding_window=w, n_kv_head=n_kv_head)
    band = torch.tensor([[0 <= i - j < w for j in range(T)] for i in range(T)])
    x = torch.randn(2, T, 32)
    idx = torch.randint(0, 64, (1, T))
    return model, band, x, idx


def top_k_logits():
    return torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)  # probabilities, as log-probabilities


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_logits_have_the_input_shape_and_start_near_uniform(name, one_thread):
    _, _, logits, loss = forward_and_loss(name)
    assert logits.shape == (3, 20, 64)
    assert abs(loss.item() - math.log(64)) < 0.1  # small init: near-uniform predictions


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_backward_gives_every_parameter_a_finite_gradient(name, one_thread):
    model, _, _, loss = forward_and_loss(name)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_ties_the_head_and_has_a_position_table_only_as_configured(name, one_thread):
    model = gpt_with(**MODEL_OPTIONS[name])
    cfg = model.config
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg.tie_embeddings
    assert ("wpe" in model.transformer) == (cfg.pos_encoding == "learned")  # RoPE: no position table


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_without_targets_returns_no_loss(name, one_thread):
    model, idx, _, _ = forward_and_loss(name)
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_parameter_count_matches_the_formula(name, one_thread):
    model = gpt_with(**MODEL_OPTIONS[name])
    cfg = model.config
    n = expected_params(cfg)
    assert model.num_params(non_embedding=False) == n
    lookups = (cfg.n_embd * cfg.block_size if cfg.pos_encoding == "learned" else 0) + \
        (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd) + cfg.bigram_embeds * cfg.n_embd  # wpe, wte untied
    assert model.num_params() == n - lookups


def test_model_llama_small_config_has_the_gpt2_small_configs_parameter_count(one_thread):
    counts = []
    for name in ("small_gpt2", "llama_small"):
        c = runpy.run_path(os.path.join(HERE, "config", f"{name}.py"))
        cfg = GPTConfig(**{k: v for k, v in c.items() if k in GPTConfig.__dataclass_fields__}, vocab_size=4096)
        model = GPT(cfg)
        assert model.num_params(non_embedding=False) == expected_params(cfg)
        counts.append(model.num_params())
    assert counts[0] == counts[1]  # equal non-embedding parameters: a fair comparison


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_causality_a_future_token_cannot_change_earlier_logits(name, one_thread):
    model = gpt_with(spread=0.1, **MODEL_OPTIONS[name])
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (idx[:, 12] + 1) % 64
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-3  # and the changed position itself does see it


def test_model_rope_scores_depend_only_on_relative_position(one_thread):
    torch.manual_seed(0)
    q, k = torch.randn(2, 10, 3, 16), torch.randn(2, 10, 3, 16)  # (B, T, heads, head_dim)
    pos = torch.arange(10)

    def scores(qpos, kpos):  # (B, heads, Tq, Tk)
        return (apply_rope(q, rope_rotations(qpos, 16, 1e4)).transpose(1, 2) @
                apply_rope(k, rope_rotations(kpos, 16, 1e4)).permute(0, 2, 3, 1))
    torch.testing.assert_close(scores(pos, pos), scores(pos + 37, pos + 37), rtol=0, atol=1e-4)  # all shifted
    assert (scores(pos, pos) - scores(pos, pos + 3)).abs().max() > 0.1  # a relative shift does change them
    assert (scores(pos, pos) - q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).abs().max() > 0.1  # not a no-op


def test_model_rope_rotates_each_channel_pair_as_a_complex_number_in_float64(one_thread):
    torch.manual_seed(0)
    x, pos = torch.randn(2, 7, 3, 16), torch.arange(5, 12)
    angles = pos.double()[:, None] * 1e4 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rope_rotations(pos, 16, 1e4)).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", GQA_OPTIONS)
def test_model_gqa_with_copied_kv_heads_equals_mha(kw, one_thread):
    gqa, mha = gqa_and_mha_with_copied_kv_heads(kw)
    idx = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)  # causal kernel path


@pytest.mark.parametrize("kw", GQA_OPTIONS)
def test_model_gqa_cached_forward_with_copied_kv_heads_equals_mha(kw, one_thread):
    # the cached path folds query heads into the query axis instead of copying k/v
    gqa, mha = gqa_and_mha_with_copied_kv_heads(kw)
    idx = torch.randint(0, 64, (2, 20))
    a, b = (m.forward_cached(idx, torch.arange(20), m.new_cache(2, 20, torch.float32, "cpu")) for m in (gqa, mha))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_sliding_window_mask_is_the_band_of_the_last_w_positions(n_kv_head, one_thread):
    model, band, _, _ = windowed(n_kv_head)
    pos = torch.arange(12)
    assert torch.equal(model.attn_mask(pos, pos), band)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_sliding_window_attention_equals_banded_softmax_attention_by_hand(n_kv_head, one_thread):
    model, band, x, _ = windowed(n_kv_head)
    T, pos, attn = 12, torch.arange(12), model.transformer.h[0].attn
    q, k, v = attn.c_attn(x).split([32, 8 * n_kv_head, 8 * n_kv_head], dim=2)
    q, k, v = (t.view(2, T, -1, 8).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(4 // n_kv_head, dim=1) for t in (k, v))
    att = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~band, float("-inf")).softmax(-1)
    ref = attn.c_proj((att @ v).transpose(1, 2).reshape(2, T, 32))  # plain softmax attention, by hand
    torch.testing.assert_close(attn(x, None, model.sdpa_mask(pos, pos)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_sliding_window_lets_a_position_see_only_the_last_w_tokens(n_kv_head, one_thread):
    model, _, _, idx = windowed(n_kv_head)  # one layer: position 9 sees tokens 7..9 and nothing earlier
    logits = model(idx)[0]
    for j, seen in ((6, False), (7, True)):
        changed = idx.clone()
        changed[0, j] = (idx[0, j] + 1) % 64
        assert ((model(changed)[0][0, 9] - logits[0, 9]).abs().max() > 1e-4) == seen


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_kv_cache_logits_equal_full_forward_logits(name, one_thread):
    model = gpt_with(spread=0.1, **MODEL_OPTIONS[name])
    idx = torch.randint(0, 64, (3, 25))
    full = model(idx)[0]
    cache = model.new_cache(3, 32, torch.float32, "cpu")
    steps = [model.forward_cached(idx[:, :7], torch.arange(7), cache)]  # prefill 7, then one token at a time
    steps += [model.forward_cached(idx[:, t:t + 1], torch.tensor([t]), cache, idx[:, t - 1:t]) for t in range(7, 25)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_greedy_generation_is_identical_with_and_without_cache(name, one_thread):
    model = gpt_with(spread=0.3, **MODEL_OPTIONS[name])
    prompt = torch.randint(0, 64, (3, 5))
    # 70 new tokens with a context of 32: the context is cut (and the cache re-prefilled) twice on the way
    gen = lambda **kw: torch.stack(list(model.generate(prompt, 70, temperature=0, **kw)), dim=1)
    with_cache = gen()
    assert with_cache.shape == (3, 70)
    assert torch.equal(with_cache, gen(use_cache=False))


def test_model_generate_stop_ids_end_rows_and_then_generation(one_thread):
    model = gpt_with(spread=0.3, **MODEL_OPTIONS["llama"])
    prompt = torch.randint(0, 64, (3, 5))
    free = torch.stack(list(model.generate(prompt, 40, temperature=0)), dim=1)
    stop = int(free[0, 3])
    out = torch.stack(list(model.generate(prompt, 40, temperature=0, stop_ids=[stop])), dim=1)
    for row, o in zip(free, out):
        hits = (row == stop).nonzero()
        first = int(hits[0]) if len(hits) else None
        if first is None:  # a row that never stops runs to the end as before, so generation did too
            assert out.shape[1] == 40 and torch.equal(o, row)
        else:  # identical up to its stop id, then only that stop id
            assert torch.equal(o[:first + 1], row[:first + 1]) and (o[first:] == stop).all()
    assert out.shape[1] == 40 or (out[:, -1] == stop).all()  # it ends early only once every row has stopped


def test_model_top_k_and_top_p_keep_the_right_tokens(one_thread):
    logits = top_k_logits()
    g = torch.Generator().manual_seed(0)
    kept = lambda **kw: set(sample_next(logits, generator=g, **kw).tolist())
    assert kept() == {0, 1, 2, 3}
    assert kept(top_k=2) == {0, 1}
    assert kept(top_p=0.45) == {0}            # 0.5 alone reaches 0.45
    assert kept(top_p=0.7) == {0, 1}          # 0.5 + 0.3 reaches 0.7
    assert kept(top_p=0.9) == {0, 1, 2}
    assert kept(top_k=3, top_p=0.7) == {0, 1}
    assert kept(temperature=0) == {0}         # greedy


def test_model_top_k_renormalises_over_the_kept_tokens(one_thread):
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(top_k_logits(), top_k=2, generator=g), minlength=4).float() / 4000
    assert abs(counts[0] - 0.5 / 0.8) < 0.03


def test_model_bad_options_are_one_line_errors(one_thread):
    for kw, word in ((dict(mlp="swish"), "mlp"), (dict(norm="batchnorm"), "norm"), (dict(n_kv_head=3), "n_kv_head"),
                     (dict(pos_encoding="alibi"), "pos_encoding")):
        with pytest.raises(SystemExit, match=f"error: .*{word}"):
            gpt_with(**kw)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128))
    x = torch.randint(0, 128, (4, 33))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ln(128) = 4.85: it has memorised the batch


@pytest.mark.parametrize("kw", MODERN_SWITCHES)
def test_model_modern_switches_keep_the_kv_cache_logits_equal_to_the_full_forward(kw):
    model = gpt_with(spread=0.3, **kw).eval()
    idx = torch.randint(0, 64, (2, 12))
    logits, _ = model(idx)
    cache = model.new_cache(2, 16, torch.float32, "cpu")
    pre = model.forward_cached(idx[:, :7], torch.arange(7), cache)
    step = model.forward_cached(idx[:, 7:8], torch.arange(7, 8), cache)
    torch.testing.assert_close(pre, logits[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], logits[:, 7], rtol=1e-5, atol=1e-5)


def test_model_switches_off_keep_the_state_dict_keys_and_on_add_only_their_own():
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    off = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
           "lm_head.weight"} | {f"transformer.h.{i}.{k}" for i in range(2) for k in block}
    assert set(gpt_with(smear_gate=False, bigram_embeds=0).state_dict()) == off
    on = set(gpt_with(smear_gate=True, bigram_embeds=50).state_dict())
    assert on - off == {"smear_gate", "smear_lambda", "transformer.bigram.weight", "bigram_lambda"} and off <= on


def test_model_smear_gate_and_bigram_embeds_start_as_the_model_without_them_bit_for_bit():
    off = gpt_with()
    on = gpt_with(smear_gate=True, bigram_embeds=50)  # smear_lambda 0 and a zero table at init
    on.load_state_dict(off.state_dict(), strict=False)
    idx = torch.randint(0, 64, (2, 20))
    assert torch.equal(on(idx)[0], off(idx)[0])


def test_model_smear_and_bigram_embeddings_equal_a_naive_loop_in_float64():
    model = gpt_with(spread=0.3, smear_gate=True, bigram_embeds=50).double()
    idx = torch.randint(0, 64, (2, 9))
    wte, wpe, table = (model.transformer[k].weight for k in ("wte", "wpe", "bigram"))
    ref = torch.zeros(2, 9, 32, dtype=torch.float64)
    for b in range(2):
        for t in range(9):
            e = wte[idx[b, t]].clone()
            if t:  # x_t + lambda * sigmoid(w . x_t[:12]) * x_{t-1}
                e += model.smear_lambda[0] * torch.sigmoid(wte[idx[b, t], :12] @ model.smear_gate) * wte[idx[b, t - 1]]
            row = bigram_rows(idx[b, t - 1].view(1, 1), idx[b, t].view(1, 1), torch.tensor([t > 0]), 50)[0, 0]
            ref[b, t] = e + model.bigram_lambda[0] * table[row] + wpe[t]
    torch.testing.assert_close(model.embed(idx, torch.arange(9))[0], ref, rtol=0, atol=1e-12)


def test_model_bigram_rows_hash_each_pair_into_the_table_and_position_0_into_the_last_row():
    prev, idx = torch.randint(0, 50304, (2, 4096)), torch.randint(0, 50304, (2, 4096))
    later = torch.arange(4096) > 0
    rows = bigram_rows(prev, idx, later, 65536)
    assert (rows[:, 0] == 65535).all() and (rows[:, 1:] < 65535).all() and (rows >= 0).all()
    assert torch.equal(bigram_rows(prev.flip(1), idx.flip(1), later.flip(0), 65536), rows.flip(1))  # by pair only
    assert rows[:, 1:].unique().numel() > 0.9 * 2 * 4095  # 8k random pairs, 64k rows: few collisions


def test_model_cached_decode_needs_the_previous_token_with_smear_and_bigram():
    model = gpt_with(spread=0.3, smear_gate=True, bigram_embeds=50)
    idx = torch.randint(0, 64, (2, 9))
    full = model(idx)[0][:, -1]
    for prev, same in ((idx[:, 7:8], True), ((idx[:, 7:8] + 1) % 64, False)):
        cache = model.new_cache(2, 16, torch.float32, "cpu")
        model.forward_cached(idx[:, :8], torch.arange(8), cache)
        step = model.forward_cached(idx[:, 8:], torch.tensor([8]), cache, prev)[:, -1]
        assert torch.allclose(step, full, rtol=1e-5, atol=1e-5) == same


def test_model_smear_and_bigram_parameters_go_to_adamws_embed_and_gain_groups_not_muon():
    model = gpt_with(smear_gate=True, bigram_embeds=50, tie_embeddings=False)
    adamw, muon = make_optimizers(model, world=1, sharding="ddp", weight_decay=0.1, learning_rate=1e-3,
                                  betas=(0.9, 0.95), device="cpu", kind="muon", embed_lr=0.05)
    names = {p: n for n, p in model.named_parameters()}
    embed, head, gain = ({names[p] for p in g["params"]} for g in adamw.param_groups)
    assert "transformer.bigram.weight" in embed and {"smear_gate", "smear_lambda", "bigram_lambda"} <= gain
    assert not {"transformer.bigram.weight", "smear_gate"} & {names[p] for p in muon.param_groups[0]["params"]}


def test_model_bigram_embeds_of_1_is_a_one_line_error():
    with pytest.raises(SystemExit, match="error: bigram_embeds=1 must be 0"):
        gpt_with(bigram_embeds=1)


def test_train_py_with_smear_gate_and_bigram_embeds_lowers_the_loss_and_trains_both(tiny_data, tmp_path):
    tiny_train(tiny_data, tmp_path, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=30",
               "--smear_gate=True", "--bigram_embeds=1024", "--optimizer=muon")
    evals = [r for r in metrics_rows(tmp_path) if "val_loss" in r]
    assert evals[-1]["val_loss"] < np.log(300) - 1.0
    sd = final_params(tmp_path)
    assert sd["smear_lambda"].abs().item() > 0 and sd["smear_gate"].abs().sum() > 0  # the gate opened and learned
    assert sd["transformer.bigram.weight"].abs().sum(1).count_nonzero() > 100  # rows of seen pairs moved


def test_model_logit_softcap_bounds_the_logits():
    model = gpt_with(spread=0.3, logit_softcap=2.0).eval()
    assert model(torch.randint(0, 64, (2, 12)))[0].abs().max() < 2.0


def test_zero_init_projections_make_every_block_start_as_the_identity():
    model = gpt_with(zero_init_proj=True, n_layer=3)
    x = torch.randn(2, 5, 32)
    for block in model.transformer.h:
        assert torch.equal(block(x), x)
    assert all(b.mlp.c_proj.weight.abs().sum() == 0 for b in model.transformer.h)


# ============================================================================ fp8.py
rel_error = lambda a, b: ((a.double() - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def fp8_matmul():
    """fp8_forward and fp8_grads on a (64, 32) x (48, 32)^T product, with a gradient at a gradient's scale (1e-4:
    far below e5m2's range without scaling): the fp32 inputs, the fp8 operands and scales, the results."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    w = 0.02 * torch.randn(48, 32, generator=gen)
    g = 1e-4 * torch.randn(64, 48, generator=gen)
    y, x8, w8, sx, sw = fp8_forward(x, w, torch.float32)
    g8, sg = to_fp8(g, torch.float8_e5m2)
    gx, gw = fp8_grads(g8, sg, x8, w8, sx, sw, (torch.float32, torch.float32))
    return types.SimpleNamespace(x=x, w=w, g=g, y=y, x8=x8, w8=w8, g8=g8, sx=sx, sw=sw, sg=sg, gx=gx, gw=gw)


@pytest.fixture(scope="module")
def fp8_head():
    """Float8LinearCrossEntropy on 64 rows (every 7th without a target) and 80 ids, its loss backpropagated
    times -2.5 (any upstream gradient, negative included): the inputs with their grads, the loss and logits."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen).requires_grad_()
    w = (0.3 * torch.randn(80, 32, generator=gen)).requires_grad_()
    t = torch.randint(0, 80, (64,), generator=gen)
    t[::7] = -1                                        # positions without a target
    loss, logits = Float8LinearCrossEntropy.apply(x, w, t, torch.float32)
    (-2.5 * loss).backward()
    (x8, sx), (w8, sw) = to_fp8(x, torch.float8_e4m3fn), to_fp8(w, torch.float8_e4m3fn)
    xd, wd = x8.double() * sx.double(), w8.double() * sw.double()  # the fp8 operands, exactly, in fp64
    return types.SimpleNamespace(x=x, w=w, t=t, loss=loss, logits=logits, xd=xd, wd=wd)


@pytest.fixture(scope="module")
def fp8_vs_bf16():
    """40 bf16 AdamW steps of tiny_gpt with fp8='none', 'head' and 'mlp': {fp8: (the last loss, whether parallelize
    gave the model fp8's head loss, whether it gave every MLP Linear fp8's forward)}."""
    out = {}
    for fp8_mode in ("none", "head", "mlp"):
        torch.manual_seed(0)
        model = tiny_gpt(bias=False)
        loss = bf16_training_loss(model, parallelize(model, "cpu", 1, loss_chunk=0, fp8=fp8_mode))
        linears = [lin for b in model.transformer.h for lin in (b.mlp.c_fc, b.mlp.c_proj)]
        out[fp8_mode] = (loss, getattr(model.head_loss, "__func__", None) is fp8.fp8_head_loss,
                         all(getattr(lin.forward, "__func__", None) is fp8.fp8_linear for lin in linears))
    return out


def test_fp8_casts_put_the_largest_magnitude_on_fp8s_max(fp8_matmul):
    assert fp8_matmul.x8.float().abs().max() == 448 and fp8_matmul.g8.float().abs().max() == 57344


def test_fp8_matmul_is_exact_on_its_fp8_operands(fp8_matmul):
    m = fp8_matmul
    xd, wd, gd = (t.double() * s.double() for t, s in ((m.x8, m.sx), (m.w8, m.sw), (m.g8, m.sg)))
    for got, want in ((m.y, xd @ wd.t()), (m.gx, gd @ wd), (m.gw, gd.t() @ xd)):   # fp64 on the same fp8 values
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fp8_matmul_is_close_to_the_real_product(fp8_matmul):
    m = fp8_matmul
    X, W, G = m.x.double(), m.w.double(), m.g.double()
    assert rel_error(m.y, X @ W.t()) < 0.06 and rel_error(m.gx, G @ W) < 0.1 and rel_error(m.gw, G.t() @ X) < 0.1


def test_fp8_scaled_mm_emulated_on_the_cpu_gives_torchs_own_fp8_matmul(fp8_matmul):
    m = fp8_matmul
    torch.testing.assert_close(scaled_mm(m.g8, m.w8.t().contiguous().t(), m.sg, m.sw, torch.float32),
                               torch._scaled_mm(m.g8, m.w8.t().contiguous().t(), scale_a=m.sg, scale_b=m.sw,
                                                out_dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_fp8_head_returns_logits_that_need_no_gradient(fp8_head):
    assert not fp8_head.logits.requires_grad


def test_fp8_head_logits_are_the_product_of_the_fp8_operands(fp8_head):
    h = fp8_head
    torch.testing.assert_close(h.logits.double(), h.xd @ h.wd.t(), rtol=1e-5, atol=1e-5)


def test_fp8_head_loss_is_the_cross_entropy_on_the_fp8_operands(fp8_head):
    h = fp8_head
    want_loss = F.cross_entropy(h.xd @ h.wd.t(), h.t, ignore_index=-1)  # fp64, same fp8 operands
    torch.testing.assert_close(h.loss.double(), want_loss, rtol=1e-5, atol=1e-6)


def test_fp8_head_gradients_are_the_cross_entropys_up_to_fp8_rounding(fp8_head):
    h = fp8_head
    X, W = h.x.detach().double().requires_grad_(), h.w.detach().double().requires_grad_()
    (-2.5 * F.cross_entropy(X @ W.t(), h.t, ignore_index=-1)).backward()
    assert rel_error(h.x.grad, X.grad) < 0.1 and rel_error(h.w.grad, W.grad) < 0.1   # not a wrong scale or sign


@pytest.mark.parametrize("function", ["head", "mlp"])
def test_fp8_is_transposed_only_by_fp8_t_which_the_compiler_cannot_fuse_into_the_cast(function):
    # a kernel that stores an fp8 value both as is and transposed is miscompiled by Triton (see fp8.fp8_t):
    # fp8 -> fp8 ops may only be views and fp8_t, never a copy that the compiler could fuse into the cast

    def step(x, w, t):
        if function == "mlp":
            return torch.autograd.grad(fp8.Float8Matmul.apply(x, w, torch.float32), (x, w), torch.ones(64, 80))
        loss, _ = Float8LinearCrossEntropy.apply(x, w, t, torch.float32)
        return torch.autograd.grad(loss, (x, w))

    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(80, 32, requires_grad=True)
    graph = make_fx(step, tracing_mode="fake")(x, w, torch.randint(-1, 80, (64,))).graph
    is_fp8 = lambda n: isinstance(n, torch.fx.Node) and getattr(n.meta.get("val"), "dtype", None) in (
        torch.float8_e4m3fn, torch.float8_e5m2)
    fp8_to_fp8 = [str(n.target) for n in graph.nodes if is_fp8(n) and any(map(is_fp8, n.args))]
    assert set(fp8_to_fp8) == {"aten.t.default", "scratchlm.fp8_t.default"}, fp8_to_fp8
    assert fp8_to_fp8.count("scratchlm.fp8_t.default") == 3  # x8, w8 and g8 in the backward


def test_fp8_head_keeps_no_16_or_32_bit_logits_for_the_backward():
    # the gradient is made in the forward, in e5m2: the backward holds 1 byte per logit, not the 2-4 of the logits
    saved = []
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(80, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, logits = Float8LinearCrossEntropy.apply(x, w, torch.randint(0, 80, (64,)), torch.bfloat16)
    big = [t for t in saved if t.numel() == logits.numel()]
    assert [t.dtype for t in big] == [torch.float8_e5m2]


def test_parallelize_gives_the_model_fp8s_head_loss_or_mlp_linears_only_as_asked(fp8_vs_bf16):
    assert [fp8_vs_bf16[m][1:] for m in ("none", "head", "mlp")] == [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("fp8_mode", ["head", "mlp"])
def test_fp8_training_tracks_bf16_training(fp8_vs_bf16, fp8_mode):
    none, fp8_loss = fp8_vs_bf16["none"][0], fp8_vs_bf16[fp8_mode][0]
    assert none < 3.0  # from ln(96) = 4.6
    assert abs(fp8_loss - none) < 0.05 * none


# ---- the fp8 MLP
@pytest.fixture(scope="module")
def fp8_linear_case():
    """A Linear(32, 48) with a bias and fp8_linear's forward, on x (4, 16, 32), backpropagated from a gradient at a
    gradient's scale (1e-4): the inputs with their grads, the output, and the same fp8 operands exactly in fp64
    (x, w and the output's gradient g rounded to fp8 with the scales fp8.py chooses)."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(48, 32, generator=gen))
        lin.bias.copy_(torch.randn(48, generator=gen))
    lin.forward = types.MethodType(fp8.fp8_linear, lin)
    x = torch.randn(4, 16, 32, generator=gen).requires_grad_()
    g = 1e-4 * torch.randn(4, 16, 48, generator=gen)
    y = lin(x)
    y.backward(g)
    return types.SimpleNamespace(lin=lin, x=x, g=g, y=y, xd=fp8_exact(x.detach().reshape(64, 32), torch.float8_e4m3fn),
                                 wd=fp8_exact(lin.weight.detach(), torch.float8_e4m3fn),
                                 gd=fp8_exact(g.reshape(64, 48), torch.float8_e5m2))


def fp8_exact(t, dtype):
    """t rounded to fp8 with the scale fp8.py chooses, then scaled back, exactly, in fp64."""
    t8, inv_scale = to_fp8(t, dtype)
    return t8.double() * inv_scale.double()


def test_fp8_mlp_linear_and_its_gradients_are_exact_on_the_fp8_operands(fp8_linear_case):
    c = fp8_linear_case
    b = c.lin.bias.detach().double()
    for got, want in ((c.y.reshape(64, 48), c.xd @ c.wd.t() + b), (c.x.grad.reshape(64, 32), c.gd @ c.wd),
                      (c.lin.weight.grad, c.gd.t() @ c.xd), (c.lin.bias.grad, c.g.double().sum((0, 1)))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_fp8_mlp_linear_is_the_fp32_linear_up_to_fp8_rounding(fp8_linear_case):
    c = fp8_linear_case
    X, W = c.x.detach().double().reshape(64, 32), c.lin.weight.detach().double()
    G = c.g.double().reshape(64, 48)
    assert rel_error(c.y.reshape(64, 48) - c.lin.bias, X @ W.t()) < 0.06
    assert rel_error(c.x.grad.reshape(64, 32), G @ W) < 0.1 and rel_error(c.lin.weight.grad, G.t() @ X) < 0.1


def test_fp8_mlp_linear_is_the_plain_linear_in_eval_and_without_grad(fp8_linear_case):
    lin, x = fp8_linear_case.lin, fp8_linear_case.x.detach()
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # no_grad: evaluation and generation
    lin.eval()
    try:
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    finally:
        lin.train()


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_fp8_mlp_keeps_e4m3_operands_of_every_blocks_c_fc_and_c_proj_and_nothing_else(mlp):
    model = tiny_gpt(bias=False, mlp=mlp)
    parallelize(model, "cpu", 1, fp8="mlp")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16)))
    shapes = [tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn]
    fc, proj = model.transformer.h[0].mlp.c_fc.weight.shape, model.transformer.h[0].mlp.c_proj.weight.shape
    # per block: c_fc's input (64 rows of n_embd) and weight, c_proj's input (64 rows of hidden) and weight
    assert shapes == [(64, fc[1]), tuple(fc), (64, proj[1]), tuple(proj)] * 4
    assert fc[0] == (2 if mlp == "swiglu" else 1) * proj[1]  # SwiGLU's gate and up: one matmul twice as wide


@pytest.fixture(scope="module")
def fp8_mlp_grads(tmp_path_factory):
    """One bf16 step's gradients of a 4-layer SwiGLU GPT with biases (the Parameters in order), fp8='mlp' alone,
    under FSDP2 (one process: each block sharded, gathered for its forward), with gradient checkpointing, and
    fp8='none'."""
    base, x = tiny_gpt(mlp="swiglu"), torch.randint(0, 96, (4, 17))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'pg'}", rank=0,
                            world_size=1)
    grads = {}
    try:
        for name, kw in [("alone", {}), ("fsdp", dict(sharding="fsdp")), ("grad_ckpt", dict(grad_ckpt="full")),
                         ("none", dict(fp8="none"))]:
            model = copy.deepcopy(base)
            step_fn = parallelize(model, "cpu", 2 if name == "fsdp" else 1, **{"fp8": "mlp", **kw})
            with torch.autocast("cpu", torch.bfloat16):
                step_fn(x[:, :-1], x[:, 1:])[1].backward()
            grads[name] = [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in model.parameters()]
            if name == "fsdp":  # the Linear keeps fp8's forward while FSDP2 swaps its weight for a DTensor shard
                assert type(model.transformer.h[0].mlp.c_fc.weight).__name__ == "DTensor"
                assert model.transformer.h[0].mlp.c_fc.forward.__func__ is fp8.fp8_linear
    finally:
        dist.destroy_process_group()
    return grads


@pytest.mark.parametrize("way", ["fsdp", "grad_ckpt"])
def test_fp8_mlp_gives_the_same_gradients_under_fsdp2_and_gradient_checkpointing(fp8_mlp_grads, way):
    g = fp8_mlp_grads
    assert all(torch.equal(a, b) for a, b in zip(g[way], g["alone"]))
    assert not all(torch.equal(a, b) for a, b in zip(g["none"], g["alone"]))  # fp8 did run


def test_fp8_mlp_goes_with_the_logit_softcap_and_the_chunked_loss_where_the_fp8_head_cannot():
    parallelize(tiny_gpt(logit_softcap=30.0), "cpu", 1, fp8="mlp")  # the MLP does not touch the logits
    parallelize(tiny_gpt(), "cpu", 1, loss_chunk=8, fp8="mlp")
    with pytest.raises(SystemExit, match="logit_softcap needs loss_chunk=0 and fp8='none' or 'mlp'"):
        parallelize(tiny_gpt(logit_softcap=30.0), "cpu", 1, fp8="both")


@pytest.fixture(scope="module")
def fp8_train_runs(tiny_data, tmp_path_factory):
    """10 steps of train.py (fp32 on the CPU) with fp8='none', 'mlp' and 'both': {fp8: out_dir}."""
    d = tmp_path_factory.mktemp("fp8_runs")
    for fp8_mode in ("none", "mlp", "both"):
        tiny_train(tiny_data, d / fp8_mode, "--max_iters=10", "--lr_decay_iters=10", "--eval_interval=10",
                   f"--fp8={fp8_mode}")
    return {m: d / m for m in ("none", "mlp", "both")}


@pytest.mark.parametrize("fp8_mode", ["mlp", "both"])
def test_train_with_fp8_mlp_lowers_the_loss_and_saves_the_same_checkpoint_keys(fp8_train_runs, fp8_mode):
    losses = [r["loss"] for r in metrics_rows(fp8_train_runs[fp8_mode]) if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3  # from ln(300) = 5.7
    plain, ckpt = load_checkpoint(str(fp8_train_runs["none"])), load_checkpoint(str(fp8_train_runs[fp8_mode]))
    assert ckpt["model"].keys() == plain["model"].keys()
    assert all(ckpt["model"][k].dtype == torch.float32 for k in ckpt["model"])  # fp32 master weights, as saved
    assert not all(torch.equal(ckpt["model"][k], plain["model"][k]) for k in plain["model"])  # fp8 did run


# ============================================================================ muon.py
MUON_SHAPES = ((32, 32), (48, 16), (16, 40))  # square, tall, wide
MUON_HYPER = dict(lr=0.02, weight_decay=0.1, momentum=0.95)


def muon_run(make, steps=4, params=None, resume_from=None, start=0):
    """Optimizer make(params) over `steps` steps of fixed random gradients (step i's are seeded by i, whatever the
    params): the params and the optimizer. Starts from MUON_SHAPES' seeded params unless given params (and
    resume_from, a state dict to load, and start, the first step's number)."""
    if params is None:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape) * 0.1) for shape in MUON_SHAPES]
    opt = make(params)
    if resume_from is not None:
        opt.load_state_dict(resume_from)
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def muon_reference(steps=4, lr=0.02, weight_decay=0.1, momentum=0.95, ns="jordan", normuon=False,
                   cautious_wd=False):
    """The same run as muon_run, written out in float64: Nesterov momentum, 5 quintic Newton-Schulz steps on the
    wide orientation, decoupled weight decay, lr x sqrt(max(1, rows/cols)); and the variants: Polar Express's
    quintic per step, NorMuon's rows (an EMA of each row's mean square divides it; the Frobenius norm is kept),
    cautious weight decay (only where update and weight have one sign)."""
    torch.manual_seed(0)
    params = [(torch.randn(*shape) * 0.1).double() for shape in MUON_SHAPES]
    bufs, rows = [torch.zeros_like(p) for p in params], [torch.zeros(p.shape[0]).double() for p in params]
    schedule = polar_express() if ns == "polar_express" else [(3.4445, -4.7750, 2.0315)] * 5
    for i in range(steps):
        gen = torch.Generator().manual_seed(1000 + i)
        for p, buf, v in zip(params, bufs, rows):
            g = torch.randn(p.shape, generator=gen).double()
            buf.mul_(momentum).add_((1 - momentum) * g)
            x = momentum * buf + (1 - momentum) * g
            x = x.T if p.shape[0] > p.shape[1] else x
            x = x / x.norm()
            for a, b, c in schedule:
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if p.shape[0] > p.shape[1] else x
            if normuon:
                v.mul_(0.95).add_(0.05 * (x ** 2).mean(1))
                y = x / (v.sqrt()[:, None] + 1e-8)
                x = y * x.norm() / y.norm()
            decay = lr * weight_decay * p * ((x * p >= 0) if cautious_wd else 1)
            p.sub_(decay + lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * x)
    return params


@pytest.fixture(scope="module")
def muon_runs():
    """{name: params after 4 steps}: torch.optim.Muon, ours in bf16, fp32 and ns_dtype=None (on this CPU), the
    fp64 reference; and the initial params."""
    runs = {"torch": muon_run(lambda ps: torch.optim.Muon(ps, **MUON_HYPER))[0]}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("none", None)):
        runs[name] = muon_run(lambda ps: Muon(ps, **MUON_HYPER, ns_dtype=dtype))[0]
    runs["fp64"] = muon_reference()
    runs["start"] = muon_reference(steps=0)
    return runs


def test_muon_in_bf16_is_torchs_muon_bit_for_bit(muon_runs):
    for ours, theirs in zip(muon_runs["bf16"], muon_runs["torch"]):
        assert torch.equal(ours, theirs)


def test_muon_in_fp32_is_the_exact_math_up_to_fp32_rounding(muon_runs):
    # compared on the updates (the params moved), not the params, which would hide them
    err = lambda name: max(rel_error(p - p0.float(), q - p0) for p, q, p0 in
                           zip(muon_runs[name], muon_runs["fp64"], muon_runs["start"]))
    assert err("fp32") < 1e-5 and err("bf16") > 100 * err("fp32")  # bf16's rounding is far larger


def test_muon_orthogonalises_in_fp32_on_the_cpu_by_default(muon_runs):
    for a, b in zip(muon_runs["none"], muon_runs["fp32"]):
        assert torch.equal(a, b)


def test_muon_orthogonalise_leaves_its_input_alone():
    # in fp32 the cast is a no-op: an in-place scaling would corrupt the momentum buffer (nesterov=False passes it)
    g = torch.randn(8, 12)
    g0 = g.clone()
    orthogonalise(g, torch.float32)
    assert torch.equal(g, g0)


def test_muon_resumes_from_torchs_muon_and_torchs_from_ours_bit_for_bit(muon_runs):
    ours = lambda ps: Muon(ps, **MUON_HYPER, ns_dtype=torch.bfloat16)
    theirs = lambda ps: torch.optim.Muon(ps, **MUON_HYPER)
    for first, second in ((theirs, ours), (ours, theirs)):
        params, opt = muon_run(first, steps=2)
        params, _ = muon_run(second, steps=2, params=params, resume_from=opt.state_dict(), start=2)
        for a, b in zip(params, muon_runs["torch"]):
            assert torch.equal(a, b)


def test_muon_state_dict_round_trips_through_torchs_muon():
    _, opt = muon_run(lambda ps: Muon(ps, **MUON_HYPER, ns_dtype=torch.float32), steps=2)
    sd = opt.state_dict()
    theirs = torch.optim.Muon([torch.nn.Parameter(torch.zeros(*shape)) for shape in MUON_SHAPES])
    theirs.load_state_dict(copy.deepcopy(sd))
    back = Muon([torch.nn.Parameter(torch.zeros(*shape)) for shape in MUON_SHAPES])
    back.load_state_dict(theirs.state_dict())
    got = back.state_dict()
    assert got["param_groups"] == sd["param_groups"] and got["state"].keys() == sd["state"].keys()
    for i, state in sd["state"].items():
        assert state.keys() == {"momentum_buffer"} and torch.equal(got["state"][i]["momentum_buffer"],
                                                                    state["momentum_buffer"])


MUON_VARIANTS = dict(ns="polar_express", normuon=True, cautious_wd=True)


@pytest.mark.parametrize("lo, hi", [(1e-3, 1.0), (0.1, 1.9), (0.8, 1.2)])
def test_polar_express_quintics_equioscillate_so_are_minimax(lo, hi):
    # Chebyshev: an error that reaches its max with alternating signs at 4 points (3 coefficients + 1) is optimal
    (a, b, c), err = minimax_quintic(lo, hi)
    x = np.concatenate([np.geomspace(lo, hi, 100_001), np.linspace(lo, hi, 100_001)])
    e = 1 - (a * x + b * x ** 3 + c * x ** 5)
    assert abs(np.abs(e).max() - err) < 1e-9 * err and 0 < err < 1
    signs, x = [], np.sort(x)
    e = 1 - (a * x + b * x ** 3 + c * x ** 5)
    for sign in np.sign(e[np.abs(e) > (1 - 1e-6) * err]):  # the points where |error| = E, left to right
        signs += [sign] if not signs or signs[-1] != sign else []
    assert signs == [1, -1, 1, -1]


def test_polar_express_5_steps_end_nearer_1_than_jordans():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    s = torch.cat([torch.ones(1, dtype=torch.float64), torch.logspace(-2.9, -1, 15, dtype=torch.float64)])
    g = u[:, :16] @ torch.diag(s) @ v.T  # divided by its Frobenius norm: singular values from 1.2e-3 to 0.99
    err = lambda coefficients: (1 - torch.linalg.svdvals(orthogonalise(g, torch.float64, coefficients=coefficients))
                                ).abs().max().item()
    jordan, pe = err((3.4445, -4.7750, 2.0315)), err(polar_express())
    assert pe < 0.125 and jordan > 3 * pe  # the schedule's own bound after 5 steps from 1e-3: 0.122; Jordan's: 0.42


def test_orthogonalise_with_polar_express_is_its_schedule_in_float64():
    torch.manual_seed(0)
    for g in (torch.randn(12, 20, dtype=torch.float64), torch.randn(20, 12, dtype=torch.float64)):
        x = (g if g.shape[0] <= g.shape[1] else g.T) / g.norm()
        for a, b, c in polar_express():
            x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
        want = x if g.shape[0] <= g.shape[1] else x.T
        torch.testing.assert_close(orthogonalise(g, torch.float64, coefficients=polar_express()), want, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("variant", [dict(ns="polar_express"), dict(normuon=True), dict(cautious_wd=True),
                                     MUON_VARIANTS])
def test_muon_variants_in_fp32_are_their_exact_math_up_to_fp32_rounding(variant):
    ours = muon_run(lambda ps: Muon(ps, **MUON_HYPER, ns_dtype=torch.float32, **variant))[0]
    start = muon_reference(steps=0)
    for p, q, p0 in zip(ours, muon_reference(**variant), start):  # on the updates, as the plain fp32 test
        assert rel_error(p - p0.float(), q - p0) < 1e-5


def test_muon_variants_change_the_update_and_each_alone_is_not_plain_muon():
    plain = muon_reference()
    for variant in (dict(ns="polar_express"), dict(normuon=True), dict(cautious_wd=True)):
        assert all(rel_error(p, q) > 1e-4 for p, q in zip(muon_reference(**variant), plain))


def test_muon_with_its_variants_resumes_from_its_state_dict_bit_for_bit():
    make = lambda ps: Muon(ps, **MUON_HYPER, ns_dtype=torch.float32, **MUON_VARIANTS)
    once, _ = muon_run(make)
    params, opt = muon_run(make, steps=2)
    sd = copy.deepcopy(opt.state_dict())
    assert all(s.keys() == {"momentum_buffer", "row_second_moment"} for s in sd["state"].values())
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    params, _ = muon_run(make, steps=2, params=params, resume_from=sd, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, once))


def test_muon_refuses_a_non_matrix_with_torchs_message():
    messages = []
    for make in (Muon, torch.optim.Muon):
        with pytest.raises(ValueError, match="Muon only supports 2D parameters") as e:
            make([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))])
        messages.append(str(e.value))
    assert messages[0] == messages[1]


# ============================================================================ checkpoint.py
def disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


def socket_hostname():
    import socket
    return socket.gethostname()


def step_state(it):
    return dict(iter_num=it, model={"w": torch.full((4,), float(it))})


@pytest.fixture
def saved_ckpt(tmp_path):
    """tmp_path with one checkpoint saved by save_checkpoint: (its dir, the checkpoint file, latest.json's dict)."""
    save_checkpoint(str(tmp_path), dict(iter_num=1, model={"w": torch.ones(1000)}))
    return tmp_path, tmp_path / "ckpt-0000001.pt", json.loads((tmp_path / "latest.json").read_text())


def test_disk_full_at_the_first_save_says_there_is_no_earlier_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit, match=r"^error: could not save .*No space left on device.*no earlier checkpoint"):
        save_checkpoint(str(tmp_path), step_state(10))
    assert os.listdir(tmp_path) == []  # no half-written leftovers


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), step_state(10))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit, match=r"No space left on device\); the previous checkpoint .*ckpt-0000010.pt is "
                                         r"intact; free disk space"):
        save_checkpoint(str(tmp_path), step_state(20))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000010.pt", "latest.json"]  # no half-written leftovers
    assert torch.equal(load_checkpoint(str(tmp_path))["model"]["w"], torch.full((4,), 10.0))


@pytest.mark.parametrize("damage", ["truncated", "one bit flipped"])
def test_a_truncated_or_bit_flipped_checkpoint_is_refused_as_corrupt(saved_ckpt, damage):
    d, path, _ = saved_ckpt
    good = path.read_bytes()
    flipped = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    path.write_bytes(good[:len(good) // 2] if damage == "truncated" else flipped)
    with pytest.raises(SystemExit, match="^error: checkpoint .* is corrupt or truncated"):
        load_checkpoint(str(d))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(saved_ckpt):
    d, path, manifest = saved_ckpt

    class Payload:  # a pickle that would run code when loaded: weights_only refuses it
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    evil = pickle.dumps({"format": CKPT_FORMAT, "x": Payload()}, protocol=2)
    path.write_bytes(evil)
    (d / "latest.json").write_text(json.dumps(dict(manifest, sha256=hashlib.sha256(evil).hexdigest())))
    with pytest.raises(SystemExit, match="^error: cannot load checkpoint .*only checkpoints written by train.py"):
        load_checkpoint(str(d))


@pytest.mark.parametrize("manifest", ['{"file": "ckpt-0000001.pt", "sha', None])
def test_a_torn_or_missing_latest_json_is_rebuilt_from_the_checkpoint_files(saved_ckpt, manifest, capsys):
    d, _, before = saved_ckpt
    if manifest is None:
        os.remove(d / "latest.json")
    else:
        (d / "latest.json").write_text(manifest)
    assert torch.equal(load_checkpoint(str(d))["model"]["w"], torch.ones(1000))
    assert "the newest intact checkpoint" in capsys.readouterr().err
    after = json.loads((d / "latest.json").read_text())
    assert (after["file"], after["sha256"]) == (before["file"], before["sha256"])


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_intact_one_saying_so(tmp_path, capsys):
    save_checkpoint(str(tmp_path), step_state(10))
    save_checkpoint(str(tmp_path), step_state(20))
    newest = tmp_path / "ckpt-0000020.pt"
    newest.write_bytes(newest.read_bytes()[:50])
    assert torch.equal(load_checkpoint(str(tmp_path))["model"]["w"], torch.full((4,), 10.0))
    err = capsys.readouterr().err
    assert "ckpt-0000020.pt is corrupt or truncated" in err and "ckpt-0000010.pt, the newest intact" in err
    assert json.loads((tmp_path / "latest.json").read_text())["file"] == "ckpt-0000010.pt"


def test_a_damaged_older_checkpoint_is_caught_by_its_own_recorded_checksum(tmp_path):
    save_checkpoint(str(tmp_path), step_state(10))
    save_checkpoint(str(tmp_path), step_state(20))
    shas = json.loads((tmp_path / "latest.json").read_text())["shas"]
    assert set(shas) == {"ckpt-0000010.pt", "ckpt-0000020.pt"} and all(shas.values())


def test_a_checkpoint_of_another_format_is_refused(saved_ckpt):
    d, _, manifest = saved_ckpt
    (d / "latest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(SystemExit, match="checkpoint format 99"):
        load_checkpoint(str(d))


def test_a_dir_without_latest_json_or_checkpoint_files_has_no_checkpoint(saved_ckpt):
    d, path, _ = saved_ckpt
    os.remove(d / "latest.json")
    os.remove(path)
    with pytest.raises(SystemExit, match="no checkpoint in"):
        load_checkpoint(str(d))


def test_disk_full_reported_by_torchs_writer_as_a_runtime_error_is_the_same_one_line(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), step_state(10))
    real_write = checkpoint.HashingWriter.write
    monkeypatch.setattr(checkpoint.HashingWriter, "write", lambda self, b: real_write(self, b) if len(b) < 64 else
                        (setattr(self, "error", OSError(errno.ENOSPC, "No space left on device")),
                         (_ for _ in ()).throw(RuntimeError("unexpected pos")))[1])
    with pytest.raises(SystemExit, match=r"No space left on device\); the previous checkpoint .*ckpt-0000010.pt"):
        save_checkpoint(str(tmp_path), step_state(20))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000010.pt", "latest.json"]


def test_a_read_only_out_dir_is_one_line_that_says_make_it_writable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(SystemExit, match=r"^error: could not save .*; make it writable or change out_dir"):
            save_checkpoint(str(tmp_path), step_state(10))
    finally:
        os.chmod(tmp_path, 0o700)


def test_an_out_dir_in_use_by_a_live_run_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    tok = tmp_path / "t.bpe"
    tok.write_text("x")
    host = socket_hostname()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lock").write_text(f"{host} {os.getppid()}")  # a live process that is not this one
    with pytest.raises(SystemExit, match=r"^error: .*run is in use by another run \(pid \d+\); wait"):
        checkpoint.open_out_dir(str(tmp_path / "run"), str(tok))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / "lock").write_text(f"{host} {dead.pid}")
    checkpoint.open_out_dir(str(tmp_path / "run"), str(tok))
    assert (tmp_path / "run" / "lock").read_text() == f"{host} {os.getpid()}"


def test_a_fresh_run_may_start_over_an_out_dir_whose_run_died_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    checkpoint.check_out_dir(str(tmp_path), resume=False)
    tok = tmp_path / "t.bpe"
    tok.write_text("x")
    checkpoint.open_out_dir(str(tmp_path), str(tok), resume=False)(step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match=r"^error: out_dir .*f is a file, not a directory"):
        checkpoint.check_out_dir(str(tmp_path / "f"), resume=False)


def test_latest_json_names_the_model_args_so_a_reader_knows_the_shape_before_the_weights(tmp_path):
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64)
    save_checkpoint(str(tmp_path), dict(iter_num=1, model={}, model_args=args))
    assert checkpoint.manifest_model_args(str(tmp_path)) == args


@pytest.mark.parametrize("manifest", ['{"file": "ckpt-0000001.pt"}', '{"file": "ckpt', "[]"])
def test_a_manifest_without_model_args_or_torn_names_none(tmp_path, manifest):
    (tmp_path / "latest.json").write_text(manifest)  # written by older code, or torn
    assert checkpoint.manifest_model_args(str(tmp_path)) is None


def test_load_checkpoint_reads_onto_the_cpu_with_weights_only(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(str(tmp_path), dict(iter_num=3, model={"w": torch.arange(5.0)}))
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    ckpt = checkpoint.load_checkpoint(str(tmp_path))
    assert seen == [dict(map_location="cpu", weights_only=True)] and ckpt["model"]["w"].device.type == "cpu"


# ============================================================================ train.py
# Faults are injected for real: train.py runs in its own process through faults_driver, which can SIGKILL it
# half-way through writing a checkpoint, or make the loss NaN / a spike, or raise a CUDA OOM, at chosen steps.
FAULTS_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.1",
                "--gradient_accumulation_steps=1", "--max_iters=200", "--lr_decay_iters=200", "--warmup_iters=5",
                "--learning_rate=1e-2", "--eval_interval=10", "--eval_iters=1", "--log_interval=5"]


def faults_driver():
    """train.py (argv: its options) with the fault of $FAULT injected; $PID_DIR: where each rank writes its pid,
    so that a test can signal one rank of a torchrun job."""
    torch.set_num_threads(1)
    fault, _, arg = os.environ.get("FAULT", "").partition(":")
    if os.environ.get("PID_DIR"):
        with open(os.path.join(os.environ["PID_DIR"], "pid-" + os.environ.get("RANK", "0")), "w") as f:
            f.write(str(os.getpid()))
    saves, calls = [0], [0]
    real_save, real_replace, real_forward = torch.save, os.replace, GPT.forward

    def save(obj, f, *a, **k):  # FAULT=mid_save:N: the N-th checkpoint gets half its bytes written, then SIGKILL
        saves[0] += 1
        if fault == "mid_save" and saves[0] == int(arg):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    def replace(src, dst):  # FAULT=before_manifest:N: the N-th checkpoint is renamed into place, latest.json not yet
        real_replace(src, dst)
        if fault == "before_manifest" and saves[0] == int(arg) and dst.endswith(".pt"):
            os.kill(os.getpid(), signal.SIGKILL)

    def forward(self, idx, targets=None):  # FAULT=nan:A-B / spike:A-B / gradnan:A-B / gradspike:A-B: steps A..B-1
        if fault == "oom":  # (1 micro-step each); FAULT=evalnan: every evaluation's loss is NaN
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        logits, loss = real_forward(self, idx, targets)
        if fault == "evalnan" and not self.training and targets is not None:
            loss = loss * float("nan")
        if self.training and targets is not None:
            calls[0] += 1
            a, b = map(int, arg.split("-")) if "-" in arg else (0, 0)
            if a <= calls[0] - 1 < b:
                if fault in ("gradnan", "gradspike"):  # a finite loss whose gradients are NaN, or 1000x too big
                    loss.register_hook(lambda g: g * (float("nan") if fault == "gradnan" else 1000.0))
                else:
                    loss = loss * float("nan") if fault == "nan" else loss * 10
        return logits, loss

    torch.save, os.replace, GPT.forward = save, replace, forward
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")


def faults_cmd(tiny_data, out_dir, *extra, torchrun=0):
    data_root, name, _ = tiny_data
    cmd = [sys.executable, *this_file("faults_driver"), *FAULTS_TRAIN, f"--data_root={data_root}",
           f"--dataset={name}", f"--out_dir={out_dir}", *extra]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "--no-python", *cmd]
    return cmd


def faults_env(**kw):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)


def faults_run(tiny_data, out_dir, *extra, **env):
    return subprocess.run(faults_cmd(tiny_data, out_dir, *extra), capture_output=True, text=True, timeout=300,
                          env=faults_env(**env), cwd=HERE)


def faults_popen(tiny_data, out_dir, *extra, torchrun=0, **env):
    return subprocess.Popen(faults_cmd(tiny_data, out_dir, *extra, torchrun=torchrun), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=faults_env(**env), cwd=HERE)


def faults_ckpt(out_dir, name=None):
    """The checkpoint named (ckpt-NNNNNNN.pt) or the verified latest one."""
    if name:
        return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=True)
    return load_checkpoint(str(out_dir))


def faults_same_state(a, b):
    """Bit-identical weights, optimizer state and data position."""
    assert a["iter_num"] == b["iter_num"] and a["data"] == b["data"]
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    return True


def train_on_a_fake_clock():
    """train.py's main (argv: its options) on a fake clock in train.py: every training step takes 1 s, every
    evaluation 1000 s. (The matmul timing for MFU keeps the real perf_counter.)"""
    clock = [0.0]

    def taking(seconds, f):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return f(*args, **kwargs)
        return timed
    train.time = types.SimpleNamespace(time=lambda: clock[0], perf_counter=time.perf_counter)
    train.train_step, train.evaluate = taking(1.0, train.train_step), taking(1000.0, train.evaluate)
    sys.argv = ["train.py"] + sys.argv[1:]
    train.main()


def train_with_a_save_that_never_ends():
    """train.py (argv: its options) on a disk where every checkpoint save hangs: it touches $SAVE_STARTED first,
    so a test knows a second Ctrl-C lands inside the save."""
    def save_checkpoint(*args, **kwargs):
        open(os.environ["SAVE_STARTED"], "w").close()
        time.sleep(3600)
    checkpoint.save_checkpoint = save_checkpoint
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")


def train_with_a_stand_in_wandb():
    """train.py (argv: its options) with a stand-in wandb module that writes what it is given to $WANDB_ROWS, or
    with none importable if $WANDB_ROWS is not set."""
    wandb = None  # in sys.modules, None makes `import wandb` raise ImportError
    if os.environ.get("WANDB_ROWS"):
        rows = open(os.environ["WANDB_ROWS"], "w")

        def send(row):
            rows.write(json.dumps(row) + "\n")
            rows.flush()
        wandb = types.SimpleNamespace(init=lambda project, name, config: send([project, name, config["n_layer"]]),
                                      log=send)
    sys.modules["wandb"] = wandb
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")


def final_params(out_dir):
    return load_checkpoint(str(out_dir))["model"]


def windows_of(tiny_data, split="train", block_size=8):
    data_root, name, _ = tiny_data
    data_dir = os.path.join(data_root, name)
    return TokenWindows(split_paths(data_dir, prepare.load_meta(data_dir), split), block_size)


def copy_data(tiny_data, tmp_path):
    data_root, name, _ = tiny_data
    shutil.copytree(os.path.join(data_root, name), tmp_path / name)
    return tmp_path / name, [f"--data_root={tmp_path}", f"--dataset={name}", f"--out_dir={tmp_path / 'out'}",
                             *FAULTS_TRAIN]


def muon_model():
    return gpt_with(n_layer=4, tie_embeddings=False, value_embeds=True, unet_skips=True)


def muon_and_adamw(model):
    return make_optimizers(model, world=1, sharding="ddp", weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                           device="cpu", kind="muon", embed_lr=0.05, head_lr=2e-3, muon_lr=0.03, muon_weight_decay=0.01)


@pytest.fixture(scope="module")
def faults_clean(tiny_data, tmp_path_factory):
    """One uninterrupted run of FAULTS_TRAIN: (its final checkpoint, seconds from its first line (set-up done)
    to its exit, out_dir)."""
    out = tmp_path_factory.mktemp("faults") / "clean"
    proc = faults_popen(tiny_data, out)
    proc.stdout.readline()
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "done: 200 steps" in stdout, stdout + stderr
    return faults_ckpt(out), time.time() - t0, str(out)


@pytest.fixture(scope="module")
def run_30_steps(tiny_data, tmp_path_factory):
    """30 steps of TINY_TRAIN, evaluated at the end: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("run_30_steps")
    p = tiny_train(tiny_data, out, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=30")
    return out, p.stdout


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished tiny run: its out_dir (20 steps, evaluated at step 20) and its stdout."""
    out = tmp_path_factory.mktemp("finished") / "src"
    p = tiny_train(tiny_data, out, "--max_iters=20", "--eval_interval=20", "--gradient_accumulation_steps=1")
    return out, p.stdout


@pytest.fixture(scope="module")
def fine_tuned(tiny_data, finished_run, tmp_path_factory):
    """finished_run's out_dir as init_from of a 0-step run: that run's out_dir."""
    out = tmp_path_factory.mktemp("fine_tuned")
    tiny_train(tiny_data, out, f"--init_from={finished_run[0]}", "--max_iters=0")
    return out


@pytest.fixture(scope="module")
def exported_run(finished_run, tmp_path_factory):
    """finished_run exported by export.py to a Hugging Face directory: that directory."""
    pytest.importorskip("safetensors")
    src, _ = finished_run
    out = tmp_path_factory.mktemp("exported") / "hf"
    export.export(model_from_checkpoint(load_checkpoint(str(src))), bpe.Tokenizer.load(str(src / "tokenizer.bpe")),
                  str(out))
    return out


@pytest.fixture(scope="module")
def epoch_on_two_ranks(tiny_data):
    """One epoch of 3-window batches dealt to 2 ranks: (the windows, each rank's window ids, each rank's first
    batch)."""
    ds = windows_of(tiny_data)
    seen, first = [], []
    for rank in range(2):
        b = Batches(ds, 3, rank, 2, seed=0)
        seen.append(torch.cat([b.order[i * 3:(i + 1) * 3] for i in range(b.per_epoch)]).tolist())
        first.append(next(b))
    return ds, seen, first


@pytest.fixture(scope="module")
def shifted_epochs(tiny_data):
    """4 shifted epochs of 3-window batches on 2 ranks: the windows, and per epoch per rank its Batches, grid
    offset, window ids and first batch."""
    ds = windows_of(tiny_data)
    epochs = []
    for epoch in range(4):
        ranks = []
        for rank in range(2):
            b = Batches(ds, 3, rank, 2, seed=0, epoch=epoch, shift=True)
            offset, windows = b.offset, b.order[:b.per_epoch * 3].tolist()
            ranks.append(types.SimpleNamespace(batches=b, offset=offset, windows=windows, first=next(b)))
        epochs.append(ranks)
    return ds, epochs


@pytest.fixture(scope="module")
def muon_resumed(tiny_data, tmp_path_factory):
    """40 Muon steps with shifted epochs run once, and run as 20 then resumed to 40: both final checkpoints."""
    # 40 steps of 4 x 16 tokens run several epochs of the tiny corpus, so the resume crosses shifted grids
    d = tmp_path_factory.mktemp("muon")
    common = ["--max_iters=40", "--lr_decay_iters=40", "--eval_interval=20", "--optimizer=muon", "--log_interval=10",
              "--lr_schedule=wsd", "--value_embeds=True", "--unet_skips=True", "--tie_embeddings=False"]
    tiny_train(tiny_data, d / "once", *common)
    tiny_train(tiny_data, d / "twice", *common[1:], "--max_iters=20")
    tiny_train(tiny_data, d / "twice", *common, "--init_from=resume")
    return load_checkpoint(str(d / "once")), load_checkpoint(str(d / "twice"))


# the Muon variants of issue 33 that act over processes or through checkpoints (cautious weight decay is a mask of
# each element: a sum over processes rounded otherwise can flip one, so it is tested against float64 alone)
TRAIN_VARIANTS = ["--muon_ns=polar_express", "--muon_normuon=True", "--muon_weight_decay=0.1",
                  "--muon_momentum_warmup=6"]


def optimizer_args(optimizer):
    """train.py's options for an optimizer of the SHARDED lists: "muon-variants" is Muon with TRAIN_VARIANTS."""
    return ["--optimizer=muon", *TRAIN_VARIANTS] if optimizer == "muon-variants" else [f"--optimizer={optimizer}"]


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory):
    """sharded(s, optimizer): 4 steps of a 2-process torchrun run with sharding s next to the same run in one
    process, made once per sharding and optimizer: its dirs, its stdout and both checkpoints."""
    d = tmp_path_factory.mktemp("sharded")
    common = ["--max_iters=4", "--lr_decay_iters=6", "--eval_interval=4", "--gradient_accumulation_steps=2"]

    @functools.cache
    def run_single(optimizer):
        tiny_train(tiny_data, d / f"single-{optimizer}", *common, *optimizer_args(optimizer))
        return d / f"single-{optimizer}"

    @functools.cache
    def run_sharded(sharding, optimizer):
        out = d / f"{sharding}-{optimizer}"
        p = tiny_train(tiny_data, out, *common, *optimizer_args(optimizer), f"--sharding={sharding}", torchrun=2)
        single = run_single(optimizer)
        return types.SimpleNamespace(single_dir=single, dir=out, stdout=p.stdout, single=load_checkpoint(str(single)),
                                     sharded=load_checkpoint(str(out)))
    return lambda sharding, optimizer="adamw": run_sharded(sharding, optimizer)


# ---- the learning-rate schedule and the data order (dataloader.py)
def test_lr_schedule_warmup_cosine_and_floor():
    lr = lambda it: get_lr(it, learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert lr(0) == pytest.approx(1 / 11)                # linear warmup starts near 0, not at 0
    assert lr(10) == pytest.approx(1.0)                  # end of warmup: the peak
    assert lr(60) == pytest.approx(0.55)                 # half-way through the cosine: the mean of peak and floor
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)  # the floor, and it stays there


def test_wsd_schedule_is_flat_then_linear_to_the_floor():
    lr = lambda it: get_lr(it, 1.0, 10, 110, 0.1, "wsd", cooldown_frac=0.5)
    assert lr(0) == pytest.approx(1 / 11) and lr(10) == lr(55) == 1.0  # warmup, then flat until the cooldown
    assert lr(55 + 27.5) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)  # linear to the floor


def test_short_block_steps_train_on_each_window_cut_into_shorter_sequences(tiny_data, tmp_path):
    tiny_train(tiny_data, tmp_path, "--max_iters=1", "--short_block_size=4", "--short_block_iters=1", "--seed=3",
               "--gradient_accumulation_steps=1")
    ckpt = load_checkpoint(str(tmp_path))
    model = build_model(ckpt["model_args"], None, 3, "cpu")  # the run's initial weights: same seed
    x, y = next(Batches(windows_of(tiny_data, block_size=16), 4, 0, 1, seed=3, shift=True))
    _, loss = model(x.view(-1, 4), y.view(-1, 4))  # 16 sequences of 4 tokens: RoPE-free GPT-2 layout, positions 0-3
    assert metrics_rows(tmp_path)[1]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    _, full = model(x, y)
    assert abs(full.item() - loss.item()) > 1e-4  # the cut is real: a shorter context gives another loss
    p = tiny_train(tiny_data, tmp_path / "bad", "--short_block_size=5", "--short_block_iters=2", check=False)
    assert p.stderr.strip() == ("error: short_block_size=5 does not divide block_size=16; give a divisor, e.g. 4")
    p = tiny_train(tiny_data, tmp_path / "bad", "--short_block_iters=2", check=False)
    assert p.stderr.strip().startswith("error: short_block_size and short_block_iters go together")


def test_cooldown_patience_starts_the_cooldown_at_a_plateau_for_cooldown_frac_of_the_run():
    from train import plateau_end
    cfg = types.SimpleNamespace(cooldown_patience=3, cooldown_frac=0.4, max_iters=1000, warmup_iters=10)
    at = lambda it, since, end=None: plateau_end(types.SimpleNamespace(iter_num=it, evals_since_best=since, end=end),
                                                 cfg)
    assert at(300, 2) is None and at(300, 3, end=700) is None and at(5, 3) is None and at(600, 3) is None
    end = at(300, 3)  # stalled at 300: flat until 300, then the cooldown, 40% of the run (499 - int(0.4 * 499) = 300)
    lr = lambda it: get_lr(it, 1.0, 10, end, 0.0, "wsd", 0.4)
    assert end == 499 and lr(299) == lr(300) == 1.0 and lr(301) < 1.0 and lr(end) == 0.0
    for it in range(10, 599, 7):  # any step: the flat phase ends exactly there, never a step before
        end = at(it, 3)
        assert end - max(int(0.4 * end), 1) == it


def test_a_run_whose_val_loss_stalls_ends_early_and_stays_ended_when_resumed(tiny_data, tmp_path):
    out = tmp_path / "run"  # lr 1e-12: the weights, so the val loss, never change; evaluations at 2, 4, 6 -> stalled
    common = ["--learning_rate=1e-12", "--warmup_iters=0", "--lr_schedule=wsd", "--cooldown_frac=0.5",
              "--max_iters=40", "--eval_interval=2", "--cooldown_patience=2"]
    p = tiny_train(tiny_data, out, *common)
    assert "has not improved for 2 evaluations: the cooldown starts now, the run ends at step 11" in p.stdout
    assert max(r["step"] for r in metrics_rows(out)) == 11
    p = tiny_train(tiny_data, out, *common, "--init_from=resume")
    assert "nothing to do: the checkpoint in" in p.stdout and "at step 11, max_iters=11" in p.stdout
    p = tiny_train(tiny_data, tmp_path / "x", "--cooldown_patience=2", "--lr_schedule=cosine", check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: cooldown_patience needs lr_schedule='wsd'")


def test_batches_targets_are_the_inputs_shifted_by_one(epoch_on_two_ranks):
    for x, y in epoch_on_two_ranks[2]:
        assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


def test_an_epoch_gives_no_window_to_both_ranks(epoch_on_two_ranks):
    _, seen, _ = epoch_on_two_ranks
    assert not set(seen[0]) & set(seen[1])


def test_an_epoch_deals_no_window_twice(epoch_on_two_ranks):
    _, seen, _ = epoch_on_two_ranks
    assert len(set(seen[0])) == len(seen[0])  # no replacement


def test_an_epoch_deals_every_window_but_the_ragged_tail(epoch_on_two_ranks):
    ds, seen, _ = epoch_on_two_ranks
    assert len(seen[0]) + len(seen[1]) >= len(ds) - 2 * 3 * 2


def test_batches_resumed_at_a_saved_position_give_the_very_next_batch(tiny_data):
    ds = windows_of(tiny_data)
    fresh, resumed = Batches(ds, 3, 0, 2, seed=0, epoch=1), Batches(ds, 3, 0, 2, seed=0, epoch=1, pos=1)
    next(fresh)
    assert torch.equal(next(fresh)[0], next(resumed)[0])


def test_shifted_batch_rows_are_windows_of_the_shifted_grid(shifted_epochs):
    ds, epochs = shifted_epochs
    for r in (r for ranks in epochs for r in ranks):
        b, (x, y) = r.batches, r.first
        first = int(b.order[0])  # the batch's first row is window `first` of the shifted grid
        shard = int(np.searchsorted(b.starts, first, side="right")) - 1
        s = b.offset + (first - b.starts[shard]) * 8
        assert torch.equal(x[0], torch.from_numpy(ds.shards[shard][s:s + 8].astype(np.int64)))
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_shifted_epochs_still_deal_every_window_once_to_one_rank(shifted_epochs):
    _, epochs = shifted_epochs
    for ranks in epochs:
        starts = [r.windows for r in ranks]
        assert not set(starts[0]) & set(starts[1])                       # no window on both ranks
        assert all(len(set(s)) == len(s) for s in starts)                # no window twice in an epoch
        assert len(starts[0]) + len(starts[1]) >= int(ranks[-1].batches.starts[-1]) - 2 * 3 * 2


def test_shifted_epochs_move_the_window_grid_after_epoch_0(shifted_epochs):
    offsets = [r.offset for ranks in shifted_epochs[1] for r in ranks]
    assert offsets[0] == offsets[1] == 0 and len(set(offsets[2::2])) > 1  # epoch 0 unshifted, later ones move
    assert all(0 <= o < 8 for o in offsets)


def test_evaluation_batches_stay_the_same_from_eval_to_eval(tiny_data):
    ds = windows_of(tiny_data, "val")
    a, b = Batches(ds, 2, 0, 1, seed=1), Batches(ds, 2, 0, 1, seed=1)
    for _ in range(3):
        assert torch.equal(next(a)[0], next(b)[0])
    assert a.offset == 0


# ---- a training run
def test_training_logs_a_row_of_metrics_at_every_step(run_30_steps):
    out, stdout = run_30_steps
    steps = [r for r in metrics_rows(out) if "loss" in r]
    assert len(steps) == 30 and {"step", "loss", "lr", "tokens_per_s", "mfu", "mem_gib"} <= set(steps[0])
    assert "step 30" in stdout


def test_training_lowers_val_loss(run_30_steps):
    evals = [r for r in metrics_rows(run_30_steps[0]) if "val_loss" in r]
    assert evals[-1]["val_loss"] < np.log(300) - 1.0 and evals[-1]["val_bpb"] > 0


def test_training_copies_the_tokenizer_into_the_run_dir(run_30_steps):
    assert os.path.exists(run_30_steps[0] / "tokenizer.bpe")


def test_eval_mc_scores_multiple_choice_at_each_evaluation_as_eval_py_scores_the_checkpoint(tiny_data, tmp_path):
    docs = tiny_data[2]
    rows = [dict(context=d[:30], endings=[d[30:60], docs[(i + 7) % 40][30:60], docs[(i + 13) % 40][30:60]], label=0)
            for i, d in enumerate(docs[:16])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = tiny_train(tiny_data, tmp_path / "run", "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=True",
                   f"--eval_mc={tmp_path / 'rows.jsonl'}", "--eval_mc_rows=12")
    evals = [r for r in metrics_rows(tmp_path / "run") if "val_loss" in r]
    assert [(r["step"], r["mc_n"]) for r in evals] == [(2, 12), (4, 12)]
    model, tok = checkpoint.load_run(str(tmp_path / "run"), "cpu")[:2]  # the checkpoint of the last evaluation
    r = ev.multiple_choice(model, tok, rows[:12], "cpu")
    assert (evals[-1]["mc_acc"], evals[-1]["mc_acc_norm"]) == (r["acc"], r["acc_norm"])
    assert f"multiple choice acc_norm {r['acc_norm']:.4f} (12 rows)" in p.stdout


def test_logged_step_rate_leaves_evaluation_out(tiny_data, tmp_path):
    # on train_on_a_fake_clock a step takes 1 s and the evaluation at step 8 1000 s, in the log window of steps 9-12
    tiny_train(tiny_data, tmp_path, "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=8", "--log_interval=4",
               "--gradient_accumulation_steps=1", helper="train_on_a_fake_clock")
    ms = {r["step"]: r["ms_per_step"] for r in metrics_rows(tmp_path) if "loss" in r}
    assert ms == pytest.approx({4: 1000.0, 8: 1000.0, 12: 1000.0})


def test_a_run_ends_with_a_summary_of_best_val_loss_bits_per_byte_tokens_and_time(finished_run):
    out, stdout = finished_run
    best = min(r["val_loss"] for r in metrics_rows(out) if "val_loss" in r)
    bpb = [r["val_bpb"] for r in metrics_rows(out) if r.get("val_loss") == best][0]
    last = stdout.strip().splitlines()[-1]
    assert re.match(rf"done: 20 steps, 1,280 tokens in \d+s; best val loss {best:.4f} \({bpb:.4f} bits/byte\); "
                    rf"checkpoint in {re.escape(str(out))}$", last), last


def test_lr_decay_iters_0_follows_max_iters(finished_run):
    out, stdout = finished_run  # TINY_TRAIN: learning_rate 3e-3, warmup 2; min_lr the default 6e-5
    lrs = [r["lr"] for r in metrics_rows(out) if "lr" in r]
    assert lrs == pytest.approx([get_lr(i, 3e-3, 2, 20, 6e-5) for i in range(20)]) and lrs[-1] < 1e-4
    assert "lr_decay_iters=" not in stdout


def test_lr_decay_iters_longer_than_max_iters_is_a_one_line_warning(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--max_iters=1", "--lr_decay_iters=100", "--gradient_accumulation_steps=1")
    (line,) = [l for l in p.stdout.splitlines() if "lr_decay_iters=" in l]
    assert line.startswith("warning: lr_decay_iters=100 > max_iters=1: the LR ends at") and \
        line.endswith("set --lr_decay_iters=0 to follow max_iters")


def test_a_gpu_sized_run_on_the_cpu_gets_a_one_line_warning_naming_small_py(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--max_iters=0", "--gradient_accumulation_steps=1601")  # 102,464 tokens/step
    (line,) = [l for l in p.stdout.splitlines() if "warning" in l]
    assert "GPU-sized run on the CPU" in line and "102,464 tokens per step" in line and "config/small.py" in line


def test_a_cpu_sized_run_on_the_cpu_gets_no_warning(tiny_data, tmp_path):
    assert "warning" not in tiny_train(tiny_data, tmp_path, "--max_iters=0").stdout


def test_wandb_log_sends_metrics_jsonls_rows(tiny_data, tmp_path):
    rows = tmp_path / "rows.jsonl"
    tiny_train(tiny_data, tmp_path / "on", "--max_iters=3", "--gradient_accumulation_steps=1", "--wandb_log=True",
               "--wandb_project=p", "--wandb_run_name=r", helper="train_with_a_stand_in_wandb",
               env={"WANDB_ROWS": str(rows)})
    sent = [json.loads(line) for line in open(rows)]
    assert sent[0] == ["p", "r", 2] and sent[1:] == metrics_rows(tmp_path / "on") and len(sent) > 4


def test_wandb_is_not_imported_when_wandb_log_is_off(tiny_data, tmp_path):
    # no wandb importable: the run only succeeds if it never imports it
    tiny_train(tiny_data, tmp_path, "--max_iters=3", "--gradient_accumulation_steps=1",
               helper="train_with_a_stand_in_wandb")


def test_wandb_log_without_the_wandb_package_is_a_one_line_error(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--max_iters=3", "--gradient_accumulation_steps=1", "--wandb_log=True",
                   helper="train_with_a_stand_in_wandb", check=False)
    one_line_error(p, r"^error: wandb_log=True needs the wandb package: pip install wandb, or set --wandb_log=False$")


# ---- resuming and fine-tuning
@pytest.mark.parametrize("extra", [[], ["--short_block_size=8", "--short_block_iters=6"]], ids=["plain", "short_block"])
def test_resume_is_bit_exact(tiny_data, tmp_path, extra):
    common = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", *extra]  # dropout: RNG too
    tiny_train(tiny_data, tmp_path / "once", *common)
    tiny_train(tiny_data, tmp_path / "twice", *common[1:], "--max_iters=4")
    tiny_train(tiny_data, tmp_path / "twice", *common, "--init_from=resume")
    a, b = final_params(tmp_path / "once"), final_params(tmp_path / "twice")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact_with_muon_and_shifted_epochs(muon_resumed):
    a, b = muon_resumed
    assert a["data"]["epoch"] >= 2 and a["data"] == b["data"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_muon_saves_its_momentum_in_the_checkpoint(muon_resumed):
    assert "momentum_buffer" in muon_resumed[0]["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]


def test_resume_is_bit_exact_with_the_muon_variants(sharded, tiny_data, tmp_path):
    """sharded's one-process run of 4 steps with TRAIN_VARIANTS, run again as 2 steps, then resumed to 4."""
    once = sharded("fsdp", "muon-variants").single
    common = ["--lr_decay_iters=6", "--eval_interval=4", "--gradient_accumulation_steps=2",
              *optimizer_args("muon-variants")]
    tiny_train(tiny_data, tmp_path, *common, "--max_iters=2")
    tiny_train(tiny_data, tmp_path, *common, "--max_iters=4", "--init_from=resume")
    twice = load_checkpoint(str(tmp_path))
    assert all(torch.equal(once["model"][k], twice["model"][k]) for k in once["model"])
    v = once["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]["row_second_moment"]
    assert v.shape == (3 * 32,) and v.min() > 0  # NorMuon's state, one per row, saved


def test_muon_momentum_warmup_reaches_the_muon_group_in_training(sharded):
    # the last of 4 steps (step 3 of the 6 of the warmup) set it; each checkpoint saved the group with it
    r = sharded("fsdp", "muon-variants")
    for ckpt in (r.single, r.sharded):
        assert ckpt["optimizer"]["param_groups"][-1]["momentum"] == 0.85 + (0.95 - 0.85) * 3 / 6


def test_a_run_from_scratch_into_a_used_out_dir_is_refused_with_the_fix(tiny_data, finished_run):
    out, _ = finished_run
    before = open(out / "metrics.jsonl").read()
    p = tiny_train(tiny_data, out, "--max_iters=20", check=False)
    one_line_error(p, r"already holds a run \(ckpt-0000020\.pt, latest\.json\); continue it with "
                      r"--init_from=resume, or start this one in another --out_dir$")
    assert open(out / "metrics.jsonl").read() == before  # nothing appended


def test_fine_tune_from_a_run_dir_starts_at_step_0_at_the_runs_val_loss(finished_run, fine_tuned):
    (first,) = [r for r in metrics_rows(fine_tuned) if "val_loss" in r]
    last = [r for r in metrics_rows(finished_run[0]) if "val_loss" in r][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_fine_tune_from_a_run_dir_takes_its_weights(finished_run, fine_tuned):
    a, b = load_checkpoint(str(finished_run[0])), load_checkpoint(str(fine_tuned))
    assert b["iter_num"] == 0 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fine_tune_from_a_run_dir_starts_with_a_fresh_optimizer(finished_run, fine_tuned):
    a, b = load_checkpoint(str(finished_run[0])), load_checkpoint(str(fine_tuned))
    moments = lambda c: [s[k] for s in c["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert not any(m.any() for m in moments(b)) and all(m.any() for m in moments(a))


def test_fine_tune_from_an_exported_hugging_face_dir_starts_at_the_runs_val_loss(tiny_data, finished_run,
                                                                                  exported_run, tmp_path):
    tiny_train(tiny_data, tmp_path / "ft", f"--init_from={exported_run}", "--max_iters=0")
    (first,) = [r for r in metrics_rows(tmp_path / "ft") if "val_loss" in r]
    last = [r for r in metrics_rows(finished_run[0]) if "val_loss" in r][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


@pytest.mark.parametrize("source", ["hugging_face_dir", "run_dir"])
def test_fine_tune_on_data_of_another_tokenizer_is_refused(source, finished_run, other_data, tmp_path, request):
    src = request.getfixturevalue("exported_run") if source == "hugging_face_dir" else finished_run[0]
    with pytest.raises(SystemExit, match=r"^error: .* was trained with another tokenizer than .*other was made "
                                         r"with; fine-tune on data prepared with its tokenizer"):
        fresh_main("train.py", *TINY_TRAIN, f"--data_root={other_data[0]}", f"--dataset={other_data[1]}",
                   f"--out_dir={tmp_path / 'no'}", f"--init_from={src}", "--max_iters=0")


# ---- more than one process
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    common = ["--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    tiny_train(tiny_data, tmp_path / "single", *common)
    tiny_train(tiny_data, tmp_path / "ddp", *common, torchrun=2)
    a, b = final_params(tmp_path / "single"), final_params(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


SHARDED = [("fsdp", "adamw"), ("zero1", "adamw"), ("fsdp", "muon"), ("zero1", "muon")]
SHARDED_VARIANTS = SHARDED + [("fsdp", "muon-variants"), ("zero1", "muon-variants")]  # NorMuon's state too


@pytest.mark.parametrize("sharding, optimizer", SHARDED_VARIANTS)
def test_sharded_two_processes_match_one_process_with_the_same_global_batch(sharded, sharding, optimizer):
    r = sharded(sharding, optimizer)
    for k in r.single["model"]:  # FSDP2 or ZeRO-1 over 2 processes = one process with the same global batch
        torch.testing.assert_close(r.single["model"][k], r.sharded["model"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharding, optimizer", SHARDED_VARIANTS)
def test_sharded_optimizer_state_is_saved_whole_and_keyed_by_name(sharded, sharding, optimizer):
    r = sharded(sharding, optimizer)
    sa, sb = r.single["optimizer"], r.sharded["optimizer"]
    assert set(sa["state"]) == set(sb["state"]) and "transformer.h.0.mlp.c_fc.weight" in sb["state"]  # by name, whole
    for k in sa["state"]:
        for name in sa["state"][k]:
            torch.testing.assert_close(sa["state"][k][name], sb["state"][k][name], rtol=1e-3, atol=1e-6)
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]


def test_zero1_keeps_adamw_state_for_about_half_the_parameters_in_each_process(sharded):
    mine, total = re.search(r"zero1: AdamW state for ([\d,]+) of the ([\d,]+)", sharded("zero1").stdout).groups()
    assert 0.4 < int(mine.replace(",", "")) / int(total.replace(",", "")) < 0.6


@pytest.mark.parametrize("sharding", ["fsdp", "zero1"])
def test_a_sharded_checkpoint_loads_into_one_process_for_sampling_and_adamw(sharded, sharding):
    b = sharded(sharding).sharded  # a plain checkpoint: the model loads for sampling, AdamW's state in one process
    model = model_from_checkpoint(b)
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape[:2] == (1, 4)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    load_optimizer_state(model, [opt], b["optimizer"])
    p = model.transformer.h[0].mlp.c_fc.weight
    saved = b["optimizer"]["state"]["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(opt.state[p]["exp_avg_sq"], saved["exp_avg_sq"])


MORE_STEPS = ["--max_iters=6", "--lr_decay_iters=6", "--eval_interval=2", "--gradient_accumulation_steps=2",
              "--init_from=resume"]


@pytest.mark.parametrize("sharding, optimizer", SHARDED)
def test_a_sharded_run_goes_on_in_one_process(sharded, sharding, optimizer, tiny_data, tmp_path):
    out = copy_run(sharded(sharding, optimizer).dir, tmp_path / "out")
    p = tiny_train(tiny_data, out, *MORE_STEPS, *optimizer_args(optimizer))
    assert "step 6/6" in p.stdout and load_checkpoint(str(out))["iter_num"] == 6


@pytest.mark.parametrize("sharding, optimizer", SHARDED + [("fsdp", "muon-variants")])  # NorMuon's rows, spread
def test_a_one_process_run_goes_on_sharded(sharded, sharding, optimizer, tiny_data, tmp_path):
    out = copy_run(sharded(sharding, optimizer).single_dir, tmp_path / "out")
    p = tiny_train(tiny_data, out, *MORE_STEPS, *optimizer_args(optimizer), f"--sharding={sharding}", torchrun=2)
    assert "step 6/6" in p.stdout and load_checkpoint(str(out))["iter_num"] == 6


def test_a_one_process_config_runs_on_two_and_says_in_one_line_that_the_global_batch_grew(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path / "a", "--max_iters=2", "--gradient_accumulation_steps=1", torchrun=2)
    assert p.stdout.count("grew") == 1 and "the global batch grew from 64 to 128 tokens per step" in p.stdout
    assert "| 128 tokens/step |" in p.stdout and "done: 2 steps, 256 tokens" in p.stdout


def test_a_user_error_under_torchrun_is_said_once_by_rank_0_without_a_traceback_from_train_py(tiny_data, tmp_path):
    p = tiny_train(tiny_data, tmp_path, "--sharding=zero3", torchrun=2, check=False)
    errors = [l for l in p.stderr.splitlines() if "error: " in l]
    assert p.returncode != 0 and errors == ["error: --sharding='zero3' is not one of: ddp, zero1, fsdp"]
    assert "train.py\", line" not in p.stderr  # (torchrun's own failure report, of the launcher, may follow)


# ---- Muon
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = muon_model()
    adamw, muon = muon_and_adamw(model)
    names = {p: n for n, p in model.named_parameters()}
    in_muon = {names[p] for p in muon.param_groups[0]["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    embed, head, gain = ({names[p] for p in g["params"]} for g in adamw.param_groups)
    assert embed == {"transformer.wte.weight", "transformer.wpe.weight"} | {f"transformer.ve.{i}.weight" for i in range(2)}
    assert head == {"lm_head.weight"} and "skip_weights" in gain and all(model.get_parameter(n).dim() == 1 for n in gain)
    assert len(in_muon | embed | head | gain) == len(names)           # every parameter in exactly one group


def test_each_optimizer_group_gets_its_own_lr_and_muon_its_weight_decay():
    adamw, muon = muon_and_adamw(muon_model())
    assert [g["lr"] for g in adamw.param_groups] == [0.05, 2e-3, 1e-3] and muon.param_groups[0]["lr"] == 0.03
    assert muon.param_groups[0]["weight_decay"] == 0.01


def test_muon_momentum_warmup_rises_linearly_from_0_85_in_muons_groups_only():
    adamw, muon = muon_and_adamw(muon_model())
    got = []
    for it in (0, 5, 10, 30):
        train.set_muon_momentum([adamw, muon], it, 0.95, 10)
        got.append(muon.param_groups[0]["momentum"])
    assert got == pytest.approx([0.85, 0.90, 0.95, 0.95], abs=1e-15) and got[-1] == 0.95
    assert all("momentum" not in g for g in adamw.param_groups)


def test_set_lr_scales_every_groups_own_lr():
    adamw, muon = muon_and_adamw(muon_model())
    set_lr([adamw, muon], 0.5)
    assert [g["lr"] for g in adamw.param_groups] == [0.025, 1e-3, 5e-4] and muon.param_groups[0]["lr"] == 0.015


@pytest.mark.parametrize("sharding", ["fsdp", "zero1"])
def test_muon_sharded_resumes_exactly_as_it_would_have_gone_on(sharded, sharding, tiny_data, tmp_path):
    """4 steps, saved (each weight's momentum gathered from its owner), resumed to 6: the same weights as 6 steps
    in one go, bit for bit, on the same 2 processes."""
    out = copy_run(sharded(sharding, "muon").dir, tmp_path / "resumed")
    args = ["--optimizer=muon", f"--sharding={sharding}"]
    tiny_train(tiny_data, out, *MORE_STEPS, *args, torchrun=2)
    tiny_train(tiny_data, tmp_path / "once", *MORE_STEPS[:4], *args, torchrun=2)
    a, b = final_params(out), final_params(tmp_path / "once")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(SystemExit, match="optimizer must be 'adamw' or 'muon'"):
        make_optimizers(muon_model(), world=1, sharding="ddp", weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                        device="cpu", kind="sgd")


def test_a_skipped_update_leaves_muon_and_its_momentum_untouched():
    model = gpt_with(n_layer=2)
    opts = make_optimizers(model, world=1, sharding="ddp", weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.95),
                           device="cpu", kind="muon")
    x = torch.randint(0, 64, (2, 8))
    for bad in (0.0, 1.0):
        model(x, x)[1].backward()
        before = ({k: v.clone() for k, v in model.state_dict().items()},
                  {id(p): {k: v.clone() for k, v in s.items()} for o in opts for p, s in o.state.items()})
        apply_update(opts, torch.amp.GradScaler(enabled=False), torch.tensor(bad))
        changed = any(not torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
        assert changed == (bad == 0.0)
        if bad:
            assert all(torch.equal(v, before[1][id(p)][k]) for o in opts for p, s in o.state.items() for k, v in s.items())
        for o in opts:
            o.zero_grad()


# ---- bad inputs: each a one-line `error: ...` that names the problem and the fix (through the real command line
# where that is the point: exit code, stderr, no traceback; else in-process on a fresh copy of the script)
def test_missing_data_dir_says_which_command_prepares_it(tmp_path):
    p = run("train.py", f"--data_root={tmp_path}", "--dataset=nope", check=False, env={"OMP_NUM_THREADS": "1"})
    one_line_error(p, r"no prepared data in .*nope \(missing meta.json\); run `python prepare.py --input=PATH "
                      r"--dataset=nope --data_root=.*` first \(PATH: your corpus\), or use a dataset prepare.py knows: "
                      r"stdlib, sitepackages, shakespeare, tinystories, fineweb-edu$")


@pytest.mark.parametrize("case, pattern", [
    ("magic", r"train_000\.bin is not a scratchlm shard \(bad magic\); re-run prepare\.py"),
    ("truncated", r"train_000\.bin is truncated or corrupt \(\d+ bytes, header says \d+\); re-run prepare\.py"),
    ("shard_tokenizer", r"train_000\.bin was made with another tokenizer than .*meta\.json says; re-run prepare"),
    ("tokenizer_file", r"tokenizer\.bpe is not the tokenizer .*meta\.json and the shards were made with; re-run"),
    ("tokenizer_corrupt", r"tokenizer file .*tokenizer\.bpe is corrupt"),
    ("meta", r"meta\.json is corrupt \(JSONDecodeError.*\); re-run prepare\.py"),
    ("vocab", r"vocab_size 256 must be an int >= the tokenizer's 300 tokens"),
    ("vocab_type", r"--vocab_size='big' is a str; give a value that is int in \[1, inf\), or None$"),
    ("block_size", r"block_size 100000 is longer than the data in .*train_000\.bin's split"),
])
def test_bad_data_dir_is_refused_before_training(tiny_data, other_data, tmp_path, case, pattern):
    d, args = copy_data(tiny_data, tmp_path)
    other = os.path.join(*other_data)
    if case == "magic":
        with open(d / "train_000.bin", "r+b") as f:
            f.write(b"NOTSHARD")
    elif case == "truncated":
        with open(d / "train_000.bin", "r+b") as f:
            f.truncate(os.path.getsize(d / "train_000.bin") - 3)
    elif case == "shard_tokenizer":
        shutil.copy(os.path.join(other, "train_000.bin"), d / "train_000.bin")
    elif case == "tokenizer_file":
        shutil.copy(os.path.join(other, "tokenizer.bpe"), d / "tokenizer.bpe")
    elif case == "tokenizer_corrupt":
        (d / "tokenizer.bpe").write_text((d / "tokenizer.bpe").read_text()[:-30])
    elif case == "meta":
        (d / "meta.json").write_text((d / "meta.json").read_text()[:50])
    args += {"vocab": ["--vocab_size=256"], "vocab_type": ["--vocab_size=big"],
             "block_size": ["--block_size=100000"]}.get(case, [])
    with pytest.raises(SystemExit, match="^error: " + ".*" + pattern):
        fresh_main("train.py", *args)
    assert not (tmp_path / "out" / "latest.json").exists()


@pytest.mark.parametrize("args, pattern", [(["--sharding=zero3"], r"--sharding='zero3' is not one of: ddp, zero1, fsdp$"),
                                           (["--sharding=zero1", "--dtype=float16"], r"sharding='zero1' needs dtype"),
                                           (["--bf16_residual=True"], r"bf16_residual needs dtype bfloat16 .* float32")])
def test_unknown_sharding_and_precision_settings_that_cannot_go_together_are_refused(tiny_data, tmp_path, args,
                                                                                   pattern):
    _, base = copy_data(tiny_data, tmp_path)
    with pytest.raises(SystemExit, match="^error: " + pattern):
        fresh_main("train.py", *base, *args)


@pytest.mark.parametrize("arg, pattern", [
    ("--max_bad_steps=0", r"--max_bad_steps=0 is out of range; give a value in \[1, inf\)$"),
    ("--spike_factor=0.5", r"max_bad_steps must be >= 1 .* and spike_factor 0 \(off\) or > 1")])
def test_guard_settings_that_would_skip_every_update_are_refused(tiny_data, tmp_path, arg, pattern):
    _, args = copy_data(tiny_data, tmp_path)
    with pytest.raises(SystemExit, match=r"^error: " + pattern):
        fresh_main("train.py", *args, arg)


@pytest.mark.parametrize("case, pattern", [
    ("other_tokenizer", r"checkpoint in .* was trained with another tokenizer than .*other; resume on the same data"),
    ("block_size", r"block_size 32 > the model's 16"),
])
def test_resume_on_data_or_block_size_the_checkpoint_does_not_match_is_refused(tiny_data, other_data, faults_clean,
                                                                               tmp_path, case, pattern):
    shutil.copytree(faults_clean[2], tmp_path / "out")
    data_root, name = other_data if case == "other_tokenizer" else tiny_data[:2]
    extra = ["--block_size=32"] if case == "block_size" else []
    with pytest.raises(SystemExit, match="^error: " + pattern):
        fresh_main("train.py", *FAULTS_TRAIN, f"--data_root={data_root}", f"--dataset={name}",
                   f"--out_dir={tmp_path / 'out'}", "--init_from=resume", *extra)


@pytest.mark.parametrize("args, pattern", [  # issue 34's probes: each was a traceback or a silent wrong run
    (["--loss_chunk=-5"], r"--loss_chunk=-5 is out of range; give a value in \[0, inf\)$"),
    (["--lr_schedule=linear"], r"--lr_schedule='linear' is not one of: cosine, wsd$"),
    (["--sliding_window=-4"], r"--sliding_window=-4 is out of range; give a value in \[0, inf\)$"),
    (["--n_layer=-1"], r"--n_layer=-1 is out of range; give a value in \[1, inf\)$"),
    (["--n_embd=0", "--n_head=1"], r"--n_embd=0 is out of range; give a value in \[1, inf\)$"),
    (["--n_kv_head=0"], r"--n_kv_head=0 is out of range; give a value in \[1, inf\)$"),
    (["--n_kv_head={1:2}"], r"--n_kv_head=\{1: 2\} is a dict; give a value that is int in \[1, inf\), or None$"),
    (["--eval_iters=0"], r"--eval_iters=0 is out of range; give a value in \[1, inf\)$"),
    (["--max_iters=-1"], r"--max_iters=-1 is out of range; give a value in \[0, inf\)$"),
    (["--block_size=0"], r"--block_size=0 is out of range; give a value in \[1, inf\)$"),
    (["--batch_size=0"], r"--batch_size=0 is out of range; give a value in \[1, inf\)$"),
    (["--eval_interval=0"], r"--eval_interval=0 is out of range; give a value in \[1, inf\)$"),
    (["--dropout=2.0"], r"--dropout=2.0 is out of range; give a value in \[0.0, 1.0\]$"),
    (["--dtype=float8"], r"--dtype='float8' is not one of: auto, float32, bfloat16, float16$"),
    (["--learning_rate=-1e-3"], r"--learning_rate=-0.001 is out of range; give a value in \[0.0, inf\)$"),
    (["--learning_rate=0"], r"--learning_rate=0.0 is out of range; give a value > 0$"),
    (["--beta2=1.0"], r"--beta2=1.0 is out of range; give a value in \[0, 1\)$"),
    (["--rope_theta=0"], r"--rope_theta=0.0 is out of range; give a value > 0$"),
    (["--out_dir="], r"--out_dir is empty; give the directory the run writes to"),
    (["--muon_normuon=True"], r"--muon_normuon is a Muon setting and optimizer='adamw'; set --optimizer=muon$"),
    (["--batch_size=20"], r"13 windows of block_size 64 are too few for batch_size 20 x 1 processes; lower batch_size "
                          r"or block_size \(the val split: 13 windows\)$"),  # before step 1, not at the first evaluation
])
def test_train_settings_outside_their_rules_are_one_line_errors_before_step_1(tiny_data, tmp_path, args, pattern):
    p = tiny34(tiny_data, tmp_path / "out", *args)
    one_line_error(p, "^error: " + pattern)
    assert "step 1" not in p.stdout and not (tmp_path / "out" / "latest.json").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--n_layer=3"], r"the model in .*out has n_layer=2, not n_layer=3 as set; drop --n_layer \(the shape comes "
                      r"from .*out\) or start a new run in another --out_dir$"),
    (["--n_embd=32", "--mlp=swiglu"], r"the model in .*out has n_embd=64, mlp='gelu', not n_embd=32, mlp='swiglu' as set; drop --n_embd, "
                                      r"--mlp "),
])
def test_resume_or_fine_tune_with_another_model_shape_is_refused_naming_the_checkpoints_values(tiny_data, tmp_path,
                                                                                           extra, pattern):
    assert tiny34(tiny_data, tmp_path / "out", "--max_iters=2").returncode == 0
    one_line_error(tiny34(tiny_data, tmp_path / "out", "--init_from=resume", *extra), "^error: " + pattern)
    one_line_error(tiny34(tiny_data, tmp_path / "ft", f"--init_from={tmp_path / 'out'}", *extra), "^error: " + pattern)


def test_resume_without_a_checkpoint_says_to_start_without_it(tiny_data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint
    one_line_error(tiny34(tiny_data, tmp_path / "out", "--init_from=resume"),
                   r"^error: --init_from=resume, but .*out holds no checkpoint to resume .*; start the run without "
                   r"--init_from=resume$")


@pytest.mark.parametrize("vocab, refused", [(4096, True), (384, False), (300, False)])
def test_checkpoint_takes_a_hf_dir_without_tokenizer_json_to_use_the_datas_tokenizer_or_refuses(vocab, refused, capsys):
    meta = dict(vocab_size=300, tokenizer="tokenizer.bpe")
    if refused:
        with pytest.raises(SystemExit, match=r"^error: hf has no tokenizer.json, and its 4096-token vocab is not that "
                                             r"of data/x's 300-token tokenizer; put the tokenizer.json"):
            checkpoint.assumed_tokenizer(dict(vocab_size=vocab), meta, "hf", "data/x")
    else:
        assert checkpoint.assumed_tokenizer(dict(vocab_size=vocab), meta, "hf", "data/x")
        assert capsys.readouterr().out.startswith("note: hf has no tokenizer.json; assuming it was trained with "
                                                  "data/x's tokenizer (tokenizer.bpe, 300 tokens)")


def test_evaluation_without_eval_train_prints_only_the_val_loss(tiny_data, tmp_path):
    p = tiny34(tiny_data, tmp_path / "out", "--eval_train=False", "--max_iters=2")
    assert p.returncode == 0 and "step 2: val loss " in p.stdout and "train loss" not in p.stdout, p.stdout


def test_a_second_ctrl_c_names_the_checkpoint_it_keeps(faults_clean):
    assert faults.interrupted_note(faults_clean[2]) == f"the last checkpoint in {faults_clean[2]} (step 200) is kept"


# ============================================================================ scale.py
def linear_ce_case():
    """37 rows in chunks of 8 (a ragged last one), every 5th target ignored, in fp64: x, w, targets, and the
    cross-entropy on the logits x @ w^T."""
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = -1
    return x, w, t, F.cross_entropy(x @ w.t(), t, ignore_index=-1)


@pytest.fixture(scope="module")
def grad_ckpt_results():
    """Loss, grads and state-dict names of one forward-backward of tiny_gpt with dropout, for grad_ckpt off,
    "full" and 2 (every 2nd block)."""
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    results = {}
    for setting in (None, "full", 2):
        model = tiny_gpt(dropout=0.1)  # dropout: the recomputed forward must replay the same random masks
        if ckpt_interval(setting):
            checkpoint_blocks(model, ckpt_interval(setting))
        torch.manual_seed(1)
        _, loss = model(x, y)
        loss.backward()
        results[setting] = loss, [p.grad for p in model.parameters()], list(model.state_dict())
    return results


@pytest.fixture(scope="module")
def grad_ckpt_compiled():
    """Traced into a compiled graph, a checkpoint is only a hint, and the partitioner kept 3x what eager keeps
    here; scale.parallelize compiles checkpointed blocks alone instead. (The chunked loss runs compiled too.)
    {plain, eager, compiled}: (loss, grads, bytes the forward saved for the backward) without checkpointing,
    with grad_ckpt=full, and with grad_ckpt=full compiled."""
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))

    def measure(compile, grad_ckpt):
        torch.manual_seed(0)
        raw = tiny_gpt()
        model = parallelize(raw, "cpu", 1, compile=compile, grad_ckpt=grad_ckpt, loss_chunk=16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        return loss, [p.grad for p in raw.parameters()], sum(saved)
    return dict(plain=measure(False, None), eager=measure(False, "full"), compiled=measure(True, "full"))


@pytest.fixture(scope="module")
def grad_ckpt_plain_logits():
    """With loss_chunk=0 the loss on the logits is compiled on its own too. Run eagerly between compiled blocks it
    kept fp32 log-probabilities of the bf16 logits: more memory than no checkpointing at all.
    {compile: (bytes saved for the backward, loss)} under bf16 autocast with grad_ckpt=full."""
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    out = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = parallelize(tiny_gpt(), "cpu", 1, compile=compile, grad_ckpt="full", loss_chunk=0)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16):
                _, loss = model(x, y)
        loss.backward()
        out[compile] = sum(saved), loss
    return out


@pytest.fixture(scope="module")
def compiled_step():
    """A compiled model gives each returned tensor that needs grad a zero gradient in the backward: for the
    logits a (B, T, vocab) fill per step (3.3 GB at GPT-2 32x1024). With targets the model returns them detached.
    The second compiled step's logits, the shapes its profile filled, its grads, and eager's grads."""
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    torch.manual_seed(0)
    model = tiny_gpt()
    compiled = torch.compile(model)
    for _ in range(2):  # compile, then the run we look at
        with profile(record_shapes=True) as prof:
            logits, loss = compiled(x, y)
            loss.backward()
    grads = [p.grad.clone() / 2 for p in model.parameters()]
    filled = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")]
    model.zero_grad()
    model(x, y)[1].backward()
    return logits, filled, grads, [p.grad for p in model.parameters()]


@pytest.fixture(scope="module")
def bf16_train_steps():
    """12 train.train_step calls of tiny_gpt under CPU bf16 autocast (grad_ckpt=2, loss_chunk=8) on 8 fixed rows:
    the model and the losses."""
    model = tiny_gpt()
    step_fn = parallelize(model, "cpu", 1, grad_ckpt=2, loss_chunk=8)
    opt = [model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")]
    scaler = torch.amp.GradScaler(enabled=False)
    guard = torch.zeros(len(GUARD_FIELDS))
    w = torch.randint(0, 96, (2, 4, 17))
    batches = itertools.cycle([(b[:, :-1], b[:, 1:]) for b in w])
    ctx = compute.autocast("cpu", torch.bfloat16)
    return model, [train.train_step(step_fn, opt, scaler, batches, grad_accum=2, ctx=ctx, device="cpu", guard=guard,
                                    grad_clip=1.0, spike_factor=0.0, max_bad_steps=5).item() for _ in range(12)]


@pytest.fixture(scope="module")
def bf16_residual_runs():
    """40 bf16 steps of tiny_gpt compiled with and without bf16_residual: {flag: (last loss, the dtype that entered
    block 1 last, the parameters' dtypes)}."""
    out = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = tiny_gpt(bias=False)
        step_fn = parallelize(model, "cpu", 1, compile=True, loss_chunk=0, bf16_residual=flag)
        seen = []
        model.transformer.h[1].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].dtype))
        loss = bf16_training_loss(model, step_fn)
        out[flag] = loss, seen[-1], {p.dtype for p in model.parameters()}
    return out


# ---- memory and speed: checkpointing, compilation, the chunked loss, bf16
def test_grad_ckpt_full_and_every_2nd_block_give_identical_loss_and_grads(grad_ckpt_results):
    loss0, grads0, _ = grad_ckpt_results[None]
    for setting in ("full", 2):
        loss, grads, _ = grad_ckpt_results[setting]
        assert torch.equal(loss, loss0)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0)), setting


def test_grad_ckpt_keeps_the_state_dicts_names(grad_ckpt_results):
    assert grad_ckpt_results["full"][2] == grad_ckpt_results[2][2] == grad_ckpt_results[None][2]


def test_grad_ckpt_that_is_neither_full_nor_a_block_interval_is_refused():
    with pytest.raises(SystemExit, match="grad_ckpt"):
        ckpt_interval("sometimes")


def test_grad_ckpt_under_compile_keeps_as_little_as_eager(grad_ckpt_compiled):
    r = grad_ckpt_compiled
    assert r["compiled"][2] <= 1.05 * r["eager"][2] < r["plain"][2] / 3


def test_grad_ckpt_under_compile_gives_the_loss_and_grads_without_checkpointing(grad_ckpt_compiled):
    (loss0, grads0, _), (loss, grads, _) = grad_ckpt_compiled["plain"], grad_ckpt_compiled["compiled"]
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


def test_grad_ckpt_under_compile_with_plain_logits_keeps_no_fp32_copy_of_them(grad_ckpt_plain_logits):
    fp32_logits = 3 * 16 * 96 * 4
    assert grad_ckpt_plain_logits[True][0] + fp32_logits <= grad_ckpt_plain_logits[False][0]


def test_grad_ckpt_under_compile_with_plain_logits_gives_eagers_loss(grad_ckpt_plain_logits):
    torch.testing.assert_close(grad_ckpt_plain_logits[True][1], grad_ckpt_plain_logits[False][1], rtol=1e-3, atol=1e-3)


def test_compiled_training_step_makes_no_zero_gradient_for_the_logits(compiled_step):
    logits, filled, _, _ = compiled_step
    assert not logits.requires_grad and [3, 16, 96] not in filled


def test_compiled_training_step_gives_eagers_grads(compiled_step):
    _, _, grads, eager = compiled_step
    for g, g0 in zip(grads, eager):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fp8_mode", ["none", "head", "both"])
def test_compiled_training_forward_and_backward_are_one_graph(fp8_mode):
    # a graph break runs the rest eagerly, which is slower (and torch 2.11 broke on an autograd Function's .apply)
    from torch._dynamo.utils import counters
    x = torch.randint(0, 96, (2, 17))
    torch._dynamo.reset()
    counters.clear()
    step_fn = parallelize(tiny_gpt(bias=False, n_layer=1), "cpu", 1, compile=True, loss_chunk=0, fp8=fp8_mode)
    with torch.autocast("cpu", torch.bfloat16):
        loss = step_fn(x[:, :-1], x[:, 1:])[1]
    loss.backward()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters)


def test_linear_cross_entropy_equals_cross_entropy_on_logits_in_loss_and_grads():
    x, w, t, ref = linear_ce_case()
    gx, gw = torch.autograd.grad(3 * ref, (x, w))
    loss = LinearCrossEntropy.apply(x, w, t, 8)
    fx, fw = torch.autograd.grad(3 * loss, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_without_grad_gives_the_loss_alone():
    x, w, t, ref = linear_ce_case()
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        torch.testing.assert_close(LinearCrossEntropy.apply(x, w, t, 8), ref, rtol=1e-12, atol=1e-12)


def test_chunked_head_loss_gives_the_models_loss_and_returns_no_logits():
    model = tiny_gpt()  # the tied head
    idx, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits, plain = model(idx, y)
    model.head_loss = types.MethodType(chunked_head_loss(7), model)
    none, fused = model(idx, y)
    assert logits.shape == (2, 16, 96) and none is None
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_trains_through_train_step(bf16_train_steps):
    _, losses = bf16_train_steps
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0  # from ln(96) = 4.6, memorising 8 rows


def test_bf16_autocast_keeps_fp32_master_weights(bf16_train_steps):
    assert bf16_train_steps[0].transformer.h[0].attn.c_attn.weight.dtype == torch.float32


def test_bf16_residual_keeps_the_stream_between_blocks_in_bf16(bf16_residual_runs):
    assert bf16_residual_runs[True][1] == torch.bfloat16 and bf16_residual_runs[False][1] == torch.float32


def test_bf16_residual_keeps_fp32_master_weights(bf16_residual_runs):
    assert bf16_residual_runs[True][2] == bf16_residual_runs[False][2] == {torch.float32}


def test_bf16_residual_trains_like_fp32(bf16_residual_runs):
    plain, bf16 = bf16_residual_runs[False][0], bf16_residual_runs[True][0]
    assert plain < 3.0 and abs(bf16 - plain) < 0.05 * plain


@pytest.mark.parametrize("device, kw, pattern", [
    ("cpu", dict(loss_chunk=8, fp8="head"), "fp8='head' needs loss_chunk=0"),
    ("cpu", dict(loss_chunk=8, fp8="both"), r"fp8='both' needs loss_chunk=0 .*, or fp8='mlp'$"),
    ("cpu", dict(fp8=True), "fp8 must be 'none', 'head', 'mlp' or 'both', got True$"),
    ("mps", dict(loss_chunk=0, fp8="head"), "fp8 needs an NVIDIA GPU with fp8 tensor cores"),
    ("mps", dict(fp8="mlp"), "fp8 needs an NVIDIA GPU with fp8 tensor cores"),
], ids=["chunked_loss", "chunked_loss_both", "not_a_mode", "no_nvidia_gpu", "no_nvidia_gpu_mlp"])
def test_fp8_is_refused_where_it_cannot_apply(device, kw, pattern):
    with pytest.raises(SystemExit, match=pattern):
        parallelize(tiny_gpt(), device, 1, **kw)


# ---- the micro-steps of each process
def test_micro_steps_split_the_accumulation_where_it_divides():
    assert [micro_steps(g, 2) for g in (1, 2, 3, 8)] == [1, 1, 2, 4]  # where it divides the global batch is kept


# ---- MFU's reference
@pytest.mark.parametrize("cores, ghz, flags, flops, words", [
    (2, 2.45, {"avx2", "fma", "sse"}, 156.8e9, "nominal 157 GFLOP/s: 2 core(s) x 2.45 GHz x 32 FLOP/cycle (AVX2 FMA)"),
    (8, 3.0, {"avx512f", "avx2", "fma"}, 1536e9, "x 64 FLOP/cycle (AVX-512)"),
    (1, 2.0, {"sse"}, 16e9, "nominal 16 GFLOP/s: 1 core(s) x 2.00 GHz x 8 FLOP/cycle (SSE)")])
def test_mfu_on_a_cpu_is_against_cores_times_clock_times_its_vector_units_flops(cores, ghz, flags, flops, words):
    got, text = scale.cpu_peak(cores, ghz, flags)
    assert got == pytest.approx(flops) and words in text


@pytest.mark.parametrize("name, dtype, tflops", [("NVIDIA H100 80GB HBM3", "bfloat16", 989),
                                                ("NVIDIA H100 PCIe", "bfloat16", 756), ("NVIDIA H200", "bfloat16", 989),
                                                ("NVIDIA A100-SXM4-80GB", "float32", 156), ("NVIDIA L4", "float16", 121),
                                                ("NVIDIA GeForce RTX 4090", "bfloat16", 165)])
def test_mfu_on_a_gpu_is_against_its_nominal_dense_peak_tf32_for_fp32(name, dtype, tflops):
    got, text = scale.gpu_peak(name, dtype)
    assert got == tflops * 1e12 and text.startswith(f"nominal {tflops} TFLOP/s: {name}")


def test_mfu_of_an_unknown_gpu_falls_back_to_the_measured_rate_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    monkeypatch.setattr(scale, "peak_flops", lambda device, dtype: 5e14)
    assert scale.reference_flops("cuda", torch.bfloat16) == (
        5e14, "measured 500 TFLOP/s (a matmul at start-up; Some Future GPU is not in scale.NOMINAL_TFLOPS)")


def test_a_runs_first_line_names_what_mfu_is_against(run_30_steps):
    assert re.search(r"train windows \| mfu vs (nominal \d+ GFLOP/s: 1 core\(s\) x [0-9.]+ GHz x (8|32|64) FLOP/cycle"
                     r"|measured .* the CPU's clock is unknown\))", run_30_steps[1].splitlines()[0])


# ============================================================================ faults.py
# the guard's optimizers: AdamW; fused AdamW, whose device-side skip (found_inf) CUDA uses (on a CPU, the CPU kernel);
# and fused AdamW inside ZeRO-1: name -> (device, fused, zero1)
GUARD_VARIANTS = {"cpu": ("cpu", False, False), "cpu-fused": ("cpu", True, False), "cpu-zero1": ("cpu", True, True),
                  "cpu-muon": ("cpu", False, "muon"),  # Muon for the block's matrices, which skips on the device
                  **({"cuda": ("cuda", False, False), "cuda-fused": ("cuda", True, False)} if torch.cuda.is_available()
                     else {})}


@pytest.fixture(scope="module", params=list(GUARD_VARIANTS), ids=list(GUARD_VARIANTS))
def guarded_steps(request, tmp_path_factory):
    """12 good steps, then a NaN, an Inf and a 10x loss, then one more good one, through guard_update and
    apply_update on a tiny GPT (GUARD_VARIANTS: device, fused AdamW, inside ZeRO-1): what each step's guard said,
    the weights and Adam's state before the bad steps and after them, the guard's counters, the weights at the end."""
    device, fused, zero = GUARD_VARIANTS[request.param]
    scaler = torch.amp.GradScaler(enabled=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)).to(device)
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)]
    if zero == "muon":
        matrix = lambda n, p: n.startswith("transformer.h.") and p.dim() == 2
        opts = [torch.optim.AdamW([p for n, p in model.named_parameters() if not matrix(n, p)], lr=1e-2),
                Muon([p for n, p in model.named_parameters() if matrix(n, p)], lr=0.02)]
        zero = False
    if zero:  # a one-process group is enough to build it
        from torch.distributed.optim import ZeroRedundancyOptimizer
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'pg'}", rank=0,
                                world_size=1)
    try:
        if zero:
            opts = [ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, fused=True)]
        g = torch.zeros(len(GUARD_FIELDS), device=device)
        x, y = torch.randint(0, 32, (2, 8), device=device), torch.randint(0, 32, (2, 8), device=device)

        def step(scale=1.0):
            _, loss = model(x, y)
            (loss * scale).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            bad = guard_update(g, loss * scale, norm, 2.0, 3)
            apply_update(opts, scaler, bad)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            return bad.item()

        states = [getattr(opt, "optim", opt).state for opt in opts]
        snapshot = lambda: ({k: v.clone() for k, v in model.state_dict().items()},
                            [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                             for st in states for s in st.values()])
        good = [step() for _ in range(12)]  # 12 good steps: the spike check is armed
        before = snapshot()
        bad = (step(float("nan")), step(float("inf")), step(10.0))
        after = snapshot()
        state = dict(zip(GUARD_FIELDS, g.tolist()))
        tripped = step()
        return types.SimpleNamespace(good=good, bad=bad, before=before, after=after, state=state, tripped=tripped,
                                     end=snapshot()[0])
    finally:
        if zero:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def killed_while_saving(tiny_data, tmp_path_factory):
    """killed_while_saving(fault): a FAULTS_TRAIN run SIGKILLed while saving its 3rd checkpoint (step 30), by
    faults_driver's mid_save or before_manifest, made once per fault: (the process, its out_dir)."""
    @functools.cache
    def kill(fault):
        out = tmp_path_factory.mktemp(fault) / "out"
        return faults_run(tiny_data, out, FAULT=f"{fault}:3"), out  # saves at steps 10, 20, then killed saving 30
    return kill


@pytest.fixture(scope="module")
def preempted(tiny_data, tmp_path_factory):
    """preempted(sig): a FAULTS_TRAIN run sent SIGTERM (a preemption) or SIGINT (Ctrl-C) once it trains, made once
    per signal: its returncode, stdout, stderr and out_dir."""
    @functools.cache
    def stop(sig):
        out = tmp_path_factory.mktemp(sig) / "out"
        proc = faults_popen(tiny_data, out)
        for line in proc.stdout:  # wait until it trains, then preempt it
            if line.startswith("step 5/"):
                break
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
        return types.SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr, out=out)
    return stop


@pytest.fixture(scope="module")
def nan_from_step_30(tiny_data, tmp_path_factory):
    """A FAULTS_TRAIN run whose loss is NaN from step 30 on, with max_bad_steps=3: (the process, its out_dir)."""
    out = tmp_path_factory.mktemp("nan") / "out"
    return faults_run(tiny_data, out, "--max_bad_steps=3", FAULT="nan:30-1000"), out


@pytest.fixture(scope="module", params=["nan", "spike"])
def few_bad_steps(request, tiny_data, tmp_path_factory):
    """40 FAULTS_TRAIN steps whose loss is NaN or a 10x spike at steps 30 and 31: (the process, its out_dir)."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    return faults_run(tiny_data, out, "--max_iters=40", FAULT=f"{request.param}:30-32"), out


# ---- bad updates: the guard
def test_guard_lets_good_steps_through_and_flags_nan_inf_and_a_10x_spike(guarded_steps):
    assert guarded_steps.good == [0.0] * 12 and guarded_steps.bad == (1.0, 1.0, 1.0)


def test_guard_applies_nothing_of_a_flagged_update(guarded_steps):
    (w0, adam0), (w1, adam1) = guarded_steps.before, guarded_steps.after
    assert all(torch.equal(w0[k], v) for k, v in w1.items())  # nothing was applied: not the weights,
    assert all(torch.equal(a[k], b[k]) for a, b in zip(adam0, adam1) for k in a)  # nor Adam's state


def test_guard_counts_bad_updates_in_a_row_and_in_all_and_trips_at_max_bad_steps(guarded_steps):
    state = guarded_steps.state
    assert state["in_row"] == state["total"] == 3 and state["tripped"] == 1 and state["good"] == 12


def test_a_tripped_guard_holds_back_even_a_good_step(guarded_steps):
    # until the host stops the run
    assert guarded_steps.tripped == 1.0
    assert all(torch.equal(guarded_steps.before[0][k], v) for k, v in guarded_steps.end.items())


def test_max_bad_steps_in_a_row_stop_the_run_with_a_one_line_error_naming_the_fix(nan_from_step_30):
    one_line_error(nan_from_step_30[0], r"^error: 3 bad updates in a row from step 30 \(loss nan\);"
                                        r".*--init_from=resume$")


def test_max_bad_steps_in_a_row_save_the_weights_and_adam_state_from_before_them(nan_from_step_30):
    out = nan_from_step_30[1]
    stop, pre = faults_ckpt(out), faults_ckpt(out, "ckpt-0000030.pt")  # saved at 35 (a log step), and before step 30
    assert stop["iter_num"] == 35 and pre["iter_num"] == 30
    assert all(torch.equal(stop["model"][k], pre["model"][k]) for k in pre["model"])
    for sa, sb in zip(stop["optimizer"]["state"].values(), pre["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_stopped_by_bad_steps_resumes_once_the_fault_is_gone(nan_from_step_30, tiny_data, tmp_path):
    out = copy_run(nan_from_step_30[1], tmp_path / "out")
    p = faults_run(tiny_data, out, "--init_from=resume", "--max_iters=50")
    assert p.returncode == 0 and faults_ckpt(out)["iter_num"] == 50, p.stderr


def test_non_finite_gradients_from_the_first_step_stop_with_an_error_naming_them(tiny_data, tmp_path):
    # the loss is finite: the error must not call it a spike (and there is no running average yet to compare with)
    p = faults_run(tiny_data, tmp_path / "out", "--max_bad_steps=3", FAULT="gradnan:0-1000")
    one_line_error(p, r"^error: 3 bad updates in a row from step 0 \(non-finite gradients at loss [0-9.]+\);")


def test_a_few_bad_steps_are_skipped_and_reported(few_bad_steps):
    p, _ = few_bad_steps
    assert p.returncode == 0 and "step 35: skipped 2 bad update(s) (2 in all)" in p.stdout, p.stdout + p.stderr


def test_a_few_bad_steps_are_counted_in_the_checkpoint(few_bad_steps):
    guard = faults_ckpt(few_bad_steps[1])["guard"]
    assert guard[2] == 0 and guard[3] == 2  # none in a row now, 2 in all (kept across resumes)


def test_training_goes_on_with_finite_weights_after_a_few_bad_steps(few_bad_steps):
    p, out = few_bad_steps
    assert p.returncode == 0 and all(torch.isfinite(v).all() for v in faults_ckpt(out)["model"].values())


@pytest.mark.parametrize("sharding", ["zero1", "fsdp"])
def test_muon_sharded_skips_nan_steps_on_every_rank_and_goes_on(sharding, tiny_data, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(faults_cmd(tiny_data, out, "--max_iters=40", "--optimizer=muon", f"--sharding={sharding}",
                                  torchrun=2), capture_output=True, text=True, timeout=300,
                       env=faults_env(FAULT="nan:30-32"), cwd=HERE)
    assert p.returncode == 0 and "step 35: skipped 2 bad update(s) (2 in all)" in p.stdout, p.stdout + p.stderr
    assert all(torch.isfinite(v).all() for v in faults_ckpt(out)["model"].values())


TINY34 = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4",
          "--gradient_accumulation_steps=1", "--eval_iters=2", "--eval_interval=2", "--log_interval=1", "--max_iters=4",
          "--warmup_iters=0", "--device=cpu"]  # issue 34's probe runs


def tiny34(tiny_data, out_dir, *extra):
    data_root, name, _ = tiny_data
    return run("train.py", *TINY34, f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={out_dir}", *extra,
               check=False, env={"OMP_NUM_THREADS": "1"})


def test_guard_refuses_an_update_that_blows_the_weights_up_and_saves_the_weights_from_before_it(tiny_data, tmp_path):
    # lr 1e6: the first update's loss and gradients are ordinary, the update itself is not
    p = tiny34(tiny_data, tmp_path / "blown", "--learning_rate=1e6", "--max_iters=12", "--eval_interval=4")
    one_line_error(p, r"^error: 5 bad updates in a row from step 0 \(an update that blew the weights up .*\); "
                      r"skipped them all and saved the weights from before step 0 in ")
    assert tiny34(tiny_data, tmp_path / "before", "--max_iters=0").returncode == 0  # stopped just before step 0
    blown, before = faults_ckpt(tmp_path / "blown"), faults_ckpt(tmp_path / "before")
    moments = [s[k] for s in blown["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert blown["iter_num"] == 5 and not any(m.any() for m in moments)  # AdamW holds nothing of the refused steps
    assert all(torch.isfinite(v).all() and torch.equal(v, before["model"][k]) for k, v in blown["model"].items())


@pytest.fixture(scope="module")
def grad_norm_spikes(tiny_data, tmp_path_factory):
    """FAULTS_TRAIN runs whose gradients are 1000x too big (a finite loss) at steps 30-31 (then fine, 40 steps), and
    from step 30 on (max_bad_steps=3): (process, out_dir) each."""
    out = tmp_path_factory.mktemp("gradspike")
    few = faults_run(tiny_data, out / "few", "--max_iters=40", FAULT="gradspike:30-32")
    trip = faults_run(tiny_data, out / "trip", "--max_bad_steps=3", FAULT="gradspike:30-1000")
    return (few, out / "few"), (trip, out / "trip")


def test_guard_skips_a_gradient_norm_spike_before_stepping(grad_norm_spikes):
    (p, out), _ = grad_norm_spikes
    assert p.returncode == 0 and "step 35: skipped 2 bad update(s) (2 in all)" in p.stdout, p.stdout + p.stderr
    assert all(torch.isfinite(v).all() for v in faults_ckpt(out)["model"].values())


def test_guard_stops_gradient_norm_spikes_in_a_row_with_the_weights_and_adam_state_from_before_them(grad_norm_spikes):
    _, (p, out) = grad_norm_spikes
    one_line_error(p, r"^error: 3 bad updates in a row from step 30 \(gradient norm > 10 x its running average at "
                      r"loss [0-9.]+\);")
    assert faults_same_state(dict(faults_ckpt(out), iter_num=30, data=None),
                             dict(faults_ckpt(out, "ckpt-0000030.pt"), data=None))


def test_a_non_finite_val_loss_is_a_fault_that_stops_the_run_without_saving_it(tiny_data, tmp_path):
    p = faults_run(tiny_data, tmp_path / "out", FAULT="evalnan")
    one_line_error(p, r"^error: val loss nan at step 10: the weights are broken, so they were not saved")
    assert not (tmp_path / "out" / "latest.json").exists()


def test_a_guard_saved_by_older_code_with_fewer_fields_resumes(faults_clean, tiny_data, tmp_path):
    out = copy_run(faults_clean[2], tmp_path / "out")
    ckpt = faults_ckpt(out)
    save_checkpoint(str(out), dict(ckpt, guard=ckpt["guard"][:6], iter_num=190))
    p = faults_run(tiny_data, out, "--init_from=resume")
    assert p.returncode == 0 and len(faults_ckpt(out)["guard"]) == len(GUARD_FIELDS), p.stderr


def test_cuda_oom_at_the_first_step_is_a_one_line_hint(tiny_data, tmp_path):
    p = faults_run(tiny_data, tmp_path / "out", FAULT="oom")
    one_line_error(p, r"out of GPU memory.*lower batch_size and raise gradient_accumulation_steps.*grad_ckpt")


# ---- kills and signals
@pytest.mark.parametrize("fault", ["mid_save", "before_manifest"])
def test_kill9_while_saving_keeps_the_previous_checkpoint(killed_while_saving, fault):
    p, out = killed_while_saving(fault)
    assert p.returncode == -9
    assert faults_ckpt(out)["iter_num"] == 20  # latest.json still names the previous, whole checkpoint
    assert os.path.exists(out / ("ckpt-0000030.pt.tmp" if fault == "mid_save" else "ckpt-0000030.pt"))


@pytest.mark.parametrize("fault", ["mid_save", "before_manifest"])
def test_resume_after_kill9_while_saving_is_bit_exact_and_cleans_up_the_torn_file(killed_while_saving, faults_clean,
                                                                                  tiny_data, tmp_path, fault):
    out = copy_run(killed_while_saving(fault)[1], tmp_path / "out")
    p = faults_run(tiny_data, out, "--init_from=resume")
    assert p.returncode == 0, p.stderr
    assert faults_same_state(faults_ckpt(out), faults_clean[0])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_kill9_at_random_moments_soak_ends_bit_identical_to_a_clean_run(tiny_data, faults_clean, tmp_path):
    """For SOAK_SECONDS (default 20): a run is SIGKILLed at random moments and resumed until it finishes, then
    compared with the clean run; then the next run (round) starts. Prints how many kills were survived."""
    budget = float(os.environ.get("SOAK_SECONDS", 20))
    seed = int(os.environ.get("SOAK_SEED", time.time()))
    rng, t_end = random.Random(seed), time.time() + budget
    kills, rounds, lost = 0, 0, []
    while rounds == 0 or time.time() < t_end:
        out = tmp_path / f"round{rounds}"
        while True:
            before = json.load(open(out / "latest.json"))["iter_num"] if (out / "latest.json").exists() else None
            extra = [] if before is None else ["--init_from=resume"]
            if before is None:  # killed before its first checkpoint: nothing to resume, so start over afresh
                shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.Popen(faults_cmd(tiny_data, out, *extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=faults_env(), cwd=HERE)
            if time.time() < t_end:
                try:  # a random moment once set up: a step, an evaluation, a checkpoint write, the exit
                    proc.stdout.readline()
                    proc.wait(timeout=rng.uniform(0, faults_clean[1]))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    kills += 1
                    after = json.load(open(out / "latest.json"))["iter_num"] if (out / "latest.json").exists() else 0
                    lost.append(after - (before or 0))
                    continue
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stdout + stderr
            break
        assert faults_same_state(faults_ckpt(out), faults_clean[0]), f"round {rounds}, SOAK_SEED={seed}"
        rounds += 1
    print(f"soak: survived {kills} SIGKILLs in {rounds} runs, each ending bit-identical to the clean run "
          f"({budget:.0f}s, SOAK_SEED={seed}; steps saved between kills: {lost})")
    assert kills >= 1


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_finishes_the_step_saves_and_exits_0(preempted, sig):
    r = preempted(sig)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    stopped = faults_ckpt(r.out)["iter_num"]
    assert last.startswith(f"stopped by {sig} at step {stopped}") and last.endswith("--init_from=resume")
    assert 5 <= stopped < 200 and f"{sig}: finishing this step" in r.stderr


def test_resume_after_sigterm_is_bit_exact(preempted, faults_clean, tiny_data, tmp_path):
    # the checkpoint is at a step boundary: resuming replays the rest exactly
    out = copy_run(preempted("SIGTERM").out, tmp_path / "out")
    assert faults_run(tiny_data, out, "--init_from=resume").returncode == 0
    assert faults_same_state(faults_ckpt(out), faults_clean[0])


def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = faults_popen(tiny_data, out, "--gradient_accumulation_steps=2", torchrun=2, PID_DIR=str(tmp_path))
    for line in proc.stdout:
        if line.startswith("step 5/"):
            break
    while not (tmp_path / "pid-1").exists():
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only: rank 0 learns it by all-reduce
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    stopped = faults_ckpt(out)["iter_num"]
    assert f"stopped by a signal on another rank at step {stopped};" in stdout and stopped % 5 == 0  # a log step
    assert "SIGTERM: finishing this step" in stderr and "done:" not in stdout


def test_sigterm_to_every_torchrun_rank_saves_and_torchrun_exits_0(tiny_data, tmp_path):
    """What a scheduler should signal (README): the ranks, not torchrun, which would exit 1 by its own design."""
    out = tmp_path / "out"
    proc = faults_popen(tiny_data, out, torchrun=2, PID_DIR=str(tmp_path))
    for line in proc.stdout:
        if line.startswith("step 5/"):
            break
    while not all((tmp_path / f"pid-{r}").exists() for r in (0, 1)):
        time.sleep(0.05)
    for r in (0, 1):
        os.kill(int((tmp_path / f"pid-{r}").read_text()), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"stopped by SIGTERM at step {faults_ckpt(out)['iter_num']};" in stdout, stderr


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tiny_data, tmp_path):
    # the stop's save never ends: exiting proves the second Ctrl-C did not wait for it
    data_root, name, _ = tiny_data
    started = tmp_path / "save_started"
    proc = subprocess.Popen([sys.executable, *this_file("train_with_a_save_that_never_ends"), *TINY_TRAIN,
                             f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={tmp_path / 'out'}",
                             "--max_iters=100000", "--eval_interval=100000", "--gradient_accumulation_steps=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env=dict(os.environ, SAVE_STARTED=str(started), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        proc.send_signal(signal.SIGINT)
        assert proc.stderr.readline().startswith("SIGINT: finishing this step and saving")
        while not started.exists():  # inside the save now
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines() == [  # (the save that never ended left none)
        f"interrupted: quit without saving; no checkpoint was saved in {tmp_path / 'out'} yet: start the run again "
        f"(without --init_from=resume)"]
    assert not (tmp_path / "out" / "latest.json").exists()


# ============================================================================ sample.py
RULE = "-" * 40 + "\n"  # sample.py closes each sample with it


def run_sample(out_dir, *extra, check=True):
    return run("sample.py", f"--out_dir={out_dir}", "--device=cpu", *extra, check=check, env={"OMP_NUM_THREADS": "1"})


def chat_ckpt(out, vocab_size=261, stage=None):
    """A tiny checkpoint in out/ with the chat tokenizer; stage: as rlhf.py records it (None: pretraining)."""
    tok = chat_tokenizer()
    os.makedirs(out, exist_ok=True)
    tok.save(str(out / "tokenizer.bpe"))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size, bias=False)
    torch.manual_seed(0)
    state = dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args, tokenizer_hash=tok.hash, iter_num=0)
    save_checkpoint(str(out), dict(state, stage=stage) if stage else state)
    return str(out)


@pytest.fixture(scope="module")
def chat_session(rlhf_tiny):
    """`sample.py --chat` on the rlhf.py fixture's SFT model, greedy, fed "1+1=", /reset, "1+1=", /quit and a line
    after it: the finished process."""
    # that model answers "1+1=" with "1+1=2" (or the demonstrators' "1+1=3")
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={rlhf_tiny['sft']}", "--chat=True",
                           "--temperature=0", "--max_new_tokens=8", "--device=cpu"],
                          input="1+1=\n/reset\n1+1=\n/quit\nnever read\n", capture_output=True, text=True, cwd=HERE,
                          timeout=60)


@pytest.fixture(scope="module")
def three_samples(sample_ckpt, tmp_path_factory):
    """sample.py's options for 3 seeded samples of 30 tokens after a prompt file "def f(x):\n", and its stdout."""
    prompt = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    prompt.write_text("def f(x):\n")
    args = [f"--start=FILE:{prompt}", "--num_samples=3", "--max_new_tokens=30", "--seed=1"]
    return args, run_sample(sample_ckpt, *args).stdout


def test_sample_py_prints_num_samples_each_after_the_prompt_and_closed_by_a_rule(three_samples):
    samples = three_samples[1].split(RULE)
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each closed by a rule
    assert all(s.startswith("def f(x):\n") and len(s) > len("def f(x):\n") + 5 for s in samples[:3])


def test_sample_py_samples_of_one_batch_differ(three_samples):
    assert len(set(three_samples[1].split(RULE)[:3])) > 1  # sampled, not one sample printed three times


def test_sample_py_seed_fixes_the_samples(sample_ckpt, three_samples):
    args, stdout = three_samples
    assert run_sample(sample_ckpt, *args).stdout == stdout


def test_sample_py_stops_just_before_the_stop_string_and_hides_it(sample_ckpt):
    common = ["--start=def", "--num_samples=2", "--max_new_tokens=40", "--temperature=0"]
    free = run_sample(sample_ckpt, *common).stdout.split(RULE)[0]
    stop = free[len("def") + 4:len("def") + 7]  # a piece of the greedy continuation
    cut = run_sample(sample_ckpt, *common, f"--stop={stop!r}").stdout.split(RULE)[0]
    assert cut == free[:free.index(stop, len("def"))] + "\n"


def test_sample_py_end_of_text_ends_a_sample_unprinted(sample_ckpt):
    eot = run_sample(sample_ckpt, "--start=<|endoftext|>", "--max_new_tokens=200", "--num_samples=4").stdout
    assert eot.count("<|endoftext|>") == 4  # the 4 prompts; an end-of-text the model samples ends it, unprinted


def test_sample_py_prompt_longer_than_context_is_a_one_line_error(sample_ckpt):
    p = run_sample(sample_ckpt, "--start=" + "x y " * 200, check=False)
    assert p.returncode != 0 and p.stderr.strip().startswith("error: the prompt has")
    assert len(p.stderr.strip().splitlines()) == 1


def test_sample_py_empty_prompt_is_a_one_line_error(sample_ckpt):
    with pytest.raises(SystemExit, match=r"^error: the prompt has 0 tokens; give a --start of 1 token or more$"):
        fresh_main("sample.py", f"--out_dir={sample_ckpt}", "--start=", "--device=cpu")


@pytest.mark.parametrize("case, pattern", [
    ("prompt_file", r"cannot read the prompt file .*prompt\.txt .*invalid continuation byte.*give a UTF-8 text file"),
    ("tokenizer_corrupt", r"tokenizer file .*tokenizer\.bpe is corrupt: .*truncated"),
    ("tokenizer_other", r"tokenizer\.bpe is not the tokenizer this checkpoint was trained with"),
    ("no_checkpoint", r"no checkpoint in .* \(missing latest\.json\)"),
])
def test_sample_refuses_bad_prompt_files_tokenizers_and_missing_checkpoints(sample_ckpt, other_data, tmp_path,
                                                                            case, pattern):
    out = copy_run(sample_ckpt, tmp_path / "out")
    start = "the"
    if case == "prompt_file":
        (tmp_path / "prompt.txt").write_bytes(b"caf\xe9 au lait")
        start = f"FILE:{tmp_path / 'prompt.txt'}"
    elif case == "tokenizer_corrupt":
        (out / "tokenizer.bpe").write_text((out / "tokenizer.bpe").read_text()[:-1])
    elif case == "tokenizer_other":
        shutil.copy(os.path.join(*other_data, "tokenizer.bpe"), out / "tokenizer.bpe")
    elif case == "no_checkpoint":
        os.remove(out / "latest.json")
    with pytest.raises(SystemExit, match="^error: .*" + pattern):
        fresh_main("sample.py", f"--out_dir={out}", f"--start={start}", "--max_new_tokens=2", "--device=cpu")


@pytest.mark.parametrize("arg, pattern", [
    ("--num_samples=0", r"--num_samples=0 is out of range; give a value in \[1, inf\)$"),
    ("--max_new_tokens=-3", r"--max_new_tokens=-3 is out of range; give a value in \[1, inf\)$"),
    ("--temperature=-1", r"--temperature=-1.0 is out of range; give a value in \[0.0, inf\)$"),
    ("--top_p=0", r"--top_p=0.0 is out of range; give a value in \(0, 1\] \(1 = off\)$"),
    ("--top_p=1.5", r"--top_p=1.5 is out of range"),
    ("--top_k=-1", r"--top_k=-1 is out of range"),
    ("--device=gpu", r"unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps$"),
    ("--dtype=fp8", r"--dtype='fp8' is not one of: auto, float32, bfloat16, float16$"),
])
def test_sample_bad_settings_are_one_line_errors_before_loading(arg, pattern, tmp_path):
    with pytest.raises(SystemExit, match="^error: " + pattern) as e:
        fresh_main("sample.py", f"--out_dir={tmp_path / 'none'}", arg)  # no checkpoint: refused before loading
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_sample_device_cuda_on_a_cpu_build_is_a_one_line_error_without_traceback(tmp_path):
    p = run("sample.py", f"--out_dir={tmp_path}", "--device=cuda", check=False)
    one_line_error(p, r"^error: --device=cuda, but this torch \(.*\) is a CPU build; use --device=cpu \(or auto\)$")


def test_sample_refuses_a_model_with_fewer_token_ids_than_its_tokenizer(tmp_path):
    out = chat_ckpt(tmp_path / "run", vocab_size=256)
    with pytest.raises(SystemExit, match=r"^error: the model in .*run has 256 token ids, fewer than its tokenizer's "
                                         r"261 tokens; .*vocab_size >= 261$"):
        fresh_main("sample.py", f"--out_dir={out}", "--device=cpu")


def test_sample_without_any_run_names_the_command_that_trains_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in out \(missing latest\.json\), and no run under "
                                         r".*python train\.py config/small\.py$"):
        fresh_main("sample.py")


def runs_to_sample(tmp_path, monkeypatch):
    """tmp_path as the working directory, with runs out/small and out/sweep/lr3 and an empty out/empty."""
    monkeypatch.chdir(tmp_path)
    chat_ckpt(tmp_path / "out" / "small")
    chat_ckpt(tmp_path / "out" / "sweep" / "lr3")
    os.makedirs(tmp_path / "out" / "empty")


def test_sample_without_a_checkpoint_lists_the_runs_and_the_command_to_sample_one(tmp_path, monkeypatch):
    runs_to_sample(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        fresh_main("sample.py")  # out_dir = "out", as after README command 1
    assert str(e.value) == ("error: no checkpoint in out (missing latest.json); runs with one: out/small, "
                            "out/sweep/lr3; sample one with: python sample.py --out_dir=out/small")


def test_sample_with_a_mistyped_out_dir_lists_the_runs_next_to_it(tmp_path, monkeypatch):
    runs_to_sample(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match=r"no checkpoint in out/smal \(missing latest\.json\); runs with one: "
                                         r"out/small, out/sweep/lr3;"):
        fresh_main("sample.py", "--out_dir=out/smal")


@pytest.mark.parametrize("stage", [None, "sft"])
def test_sample_chat_warns_once_on_a_model_never_fine_tuned_then_chats(stage, tmp_path, monkeypatch, capsys):
    out = chat_ckpt(tmp_path / "run", stage=stage)
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1=\n/quit\n"))
    fresh_main("sample.py", f"--out_dir={out}", "--chat", "--device=cpu", "--max_new_tokens=3", "--temperature=0")
    captured = capsys.readouterr()
    assert captured.out.startswith("chat: type a message") and captured.out.count("> ") == 2  # it went on
    if stage:
        assert captured.err == ""  # rlhf.py's checkpoints record their stage
    else:
        warning, = captured.err.strip().splitlines()
        assert warning.startswith(f"warning: {out} holds a pretrained model that was never fine-tuned for chat")
        assert f"python rlhf.py config/sft.py --init_from={out}" in warning


def test_chat_loop_replies_to_a_message(chat_session):
    assert chat_session.returncode == 0, chat_session.stderr
    assert chat_session.stdout.split("> ")[1].strip() in ("1+1=2", "1+1=3")


def test_chat_loop_reset_clears_the_history(chat_session):
    turns = chat_session.stdout.split("> ")
    assert "(history cleared)" in turns[2]
    assert turns[3].strip() == turns[1].strip()  # greedy, and the history was reset: the same reply


def test_chat_loop_quit_ends_it_before_the_next_line(chat_session):
    turns = chat_session.stdout.split("> ")
    assert chat_session.returncode == 0 and len(turns) == 5 and turns[4] == ""


def test_sample_load_run_warms_up_on_the_manifests_model_args_while_the_weights_load(sample_ckpt):
    seen = []
    model, _, info = checkpoint.load_run(sample_ckpt, "cpu", warm_up=seen.append)
    assert seen == [info["model_args"]] and model.config == GPTConfig(**info["model_args"])


def test_sample_warm_up_runs_a_two_layer_twin_on_the_coming_calls_cache_shape(sample_ckpt, monkeypatch):
    args = dict(checkpoint.manifest_model_args(sample_ckpt), n_layer=4)
    caches, real = [], GPT.new_cache
    monkeypatch.setattr(GPT, "new_cache", lambda self, B, T, *a: caches.append((self.config.n_layer, B, T)) or
                        real(self, B, T, *a))
    sample.warm_up(args, "cpu", torch.float32, (3, 5), 40, temperature=0.8, top_k=200, top_p=0.9, n_vocab=100)
    assert caches == [(2, 3, min(args["block_size"], 5 + 40))]


def test_sample_py_prints_the_same_samples_after_a_warm_up(sample_ckpt, three_samples, one_thread, monkeypatch,
                                                          capsys):
    args, expected = three_samples
    importlib.reload(sample)  # fresh config globals
    real = checkpoint.load_run  # sample.py warms up on CUDA only: here the warm-up is forced onto the CPU
    monkeypatch.setattr(sample, "load_run", lambda out_dir, device, tok, warm_up: real(
        out_dir, device, tok, lambda a: sample.warm_up(a, "cpu", torch.float32, (3, 4), 30, temperature=0.8)))
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={sample_ckpt}", "--device=cpu", *args])
    try:
        sample.main()
    finally:
        importlib.reload(sample)
    assert capsys.readouterr().out == expected


def test_sample_imports_no_training_code():
    p = run("-c", "import sys, sample; print(sorted(m for m in ('train', 'rlhf', 'prepare') if m in sys.modules))")
    assert p.stdout.strip() == "[]"


# ============================================================================ rlhf.py
GROUP_REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two prompts, groups of 4; the second all right


def rlhf_online_args(rlhf_tiny, stage, out_dir, *extra):
    """A tiny ppo, grpo or rloo run of the rlhf.py fixture's SFT model against the judge."""
    d = rlhf_tiny["data"]
    return [f"--stage={stage}", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={out_dir}", f"--data={d}/prompts.jsonl",
            f"--eval_prompts={d}/prompts.jsonl", "--reward_model=task", "--device=cpu", "--warmup_iters=0",
            "--eval_samples=16", "--rollout_batch=4", "--num_generations=8", "--minibatch=16", "--ppo_epochs=2",
            "--max_new_tokens=7", "--learning_rate=3e-3", "--log_interval=1", *extra]


def rlhf_rewind(out_dir, step):
    """out_dir as a run killed after its step-`step` checkpoint leaves it: latest.json names that one."""
    name = f"ckpt-{step:07d}.pt"
    with open(os.path.join(out_dir, name), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(dict(file=name, sha256=sha, format=CKPT_FORMAT, iter_num=step), f)


def held_out_reward_scores(rlhf_tiny):
    """The trained reward model's scores of prefs.jsonl's 16 pairs: 16 chosen, then 16 rejected."""
    rm = rollout.load_reward_model(rlhf_tiny["rm"], "cpu")
    tok = checkpoint.load_run(rlhf_tiny["rm"], "cpu")[1]
    rows = rollout.read_jsonl(os.path.join(rlhf_tiny["data"], "prefs.jsonl"), [("prompt",)])
    ids, mask, last = rollout.pair_batch(tok, rows)
    with torch.no_grad():
        return rollout.reward_scores(*rm, ids, mask, last)


def dpo_resume_args(rlhf_tiny, out):
    d = rlhf_tiny["data"]
    return ["--stage=dpo", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={out}", f"--data={d}/prefs.jsonl",
            "--val_data=", "--eval_prompts=", "--device=cpu", "--log_interval=1"]


def sft_chat():
    msgs = [dict(role="user", content="hi"), dict(role="assistant", content="yo"),
            dict(role="user", content="1+1="), dict(role="assistant", content="2")]
    return chat_tokenizer(), msgs


def ppo_loss_on_a_known_case():
    ratio = torch.tensor([[1.5, 0.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    values, old_values, returns = torch.tensor([[1.5] * 3]), torch.ones(1, 3), torch.full((1, 3), 2.0)
    return rlhf.ppo_loss(ratio.log(), old, adv, values, old_values, returns, torch.ones(1, 3), clip=0.2, clip_v=0.2)


def dpo_at_init():
    """A policy at init, its own reference: the log-probabilities of 2 chosen and 2 rejected answers under both."""
    torch.manual_seed(0)
    tok = chat_tokenizer()
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    rows = [dict(prompt="1+1=", chosen="2", rejected="3"), dict(prompt="9+9=", chosen="18", rejected="8")]
    ref = rollout.sequence_logps(m, tok, rows, torch.no_grad())  # the reference is the policy at init
    ids, mask, _ = rollout.pair_batch(tok, rows)
    lp = (rollout.token_logprobs(m(ids)[0], ids) * mask).sum(1)
    return lp, ref


def pooled_rewards():
    """A model, a reward head and 2 padded pairs: the model's hidden states, its mean- and last-pooled rewards."""
    torch.manual_seed(0)
    tok = chat_tokenizer()
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261)).eval()
    head = torch.nn.Linear(32, 1)
    rows = [dict(prompt="1+1=", chosen="1+1=2", rejected="1+1=23"), dict(prompt="9+9=", chosen="18", rejected="8")]
    ids, mask, last = rollout.pair_batch(tok, rows)  # padded: the sequences differ in length
    with torch.no_grad():
        return types.SimpleNamespace(tok=tok, rows=rows, head=head, last=last, h=rollout.forward_hidden(m, ids)[1],
                                     mean=rollout.reward_scores(m, head, "mean", ids, mask, last),
                                     last_token=rollout.reward_scores(m, head, "last", ids, mask, last))


def grpo_case():
    """A 2-token and a 1-token response at log-probability -1, with advantages 1 and 3: (mask, logp, adv, the loss
    of each loss_type at ratio 1, where each token's loss is -advantage: -1, -1 and -3)."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    logp = torch.full((2, 4), -1.0)
    adv = torch.tensor([1.0, 3.0])
    return mask, logp, adv, dict(grpo=(-1 + -3) / 2, dapo=(-1 - 1 - 3) / 3, dr_grpo=(-1 - 1 - 3) / (2 * 4))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    addition.make_task(str(d), slip=0.5, n_held=300, seed=0)
    return d, {r["prompt"] for r in rollout.read_jsonl(str(d / "prompts_val.jsonl"), [("prompt",)])}


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def online_run(request, rlhf_tiny, tmp_path_factory):
    """8 steps of grpo or rloo on the trivial task: its evaluation rows and its step rows."""
    # the fixture's SFT model answers "1+1=" with "1+1=2" or "1+1=3"; the judge rewards the first
    stage, out = request.param, tmp_path_factory.mktemp(request.param)
    one_update = ["--ppo_epochs=1", "--minibatch=32"] if stage == "grpo" else []  # TRL's default: one update a step
    rlhf_run(rlhf_online_args(rlhf_tiny, stage, out, "--max_iters=8", "--eval_interval=8", "--grpo_beta=0.05",
                              *one_update))
    rows = metrics_rows(out)
    return [r for r in rows if "acc_sampled" in r], [r for r in rows if "clipfrac" in r]


def test_sft_learns_the_format_and_the_answer(rlhf_tiny):
    evals = [r for r in metrics_rows(rlhf_tiny["sft"]) if "acc_sampled" in r]
    assert evals[0]["acc_sampled"] == 0 and evals[-1]["acc_sampled"] > 0.2
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] / 2


def test_reward_model_learns_to_score_every_chosen_answer_above_its_rejected_one(rlhf_tiny):
    rm = [r for r in metrics_rows(rlhf_tiny["rm"]) if "val_accuracy" in r]
    assert rm[-1]["val_accuracy"] == 1.0 and rm[-1]["val_loss"] < rm[0]["val_loss"]


def test_ppo_raises_the_accuracy_of_sampled_answers(rlhf_tiny):
    evals = [r for r in metrics_rows(rlhf_tiny["ppo"]) if "acc_sampled" in r]
    assert evals[-1]["acc_sampled"] > evals[0]["acc_sampled"] + 0.2


def test_ppo_logs_reward_kl_entropy_clipfrac_value_loss_and_response_length(rlhf_tiny):
    steps = [r for r in metrics_rows(rlhf_tiny["ppo"]) if "clipfrac" in r]
    assert {"reward", "kl", "entropy", "clipfrac", "value_loss", "response_len"} <= set(steps[0])


def test_ppo_against_a_trained_reward_model_gets_finite_rewards_and_kl(rlhf_tiny):
    ppo_rm = [r for r in metrics_rows(os.path.join(rlhf_tiny["data"], "ppo-rm")) if "clipfrac" in r]
    assert len(ppo_rm) == 2 and all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in ppo_rm)


def test_dpo_rewards_the_chosen_answers_above_the_rejected_ones(rlhf_tiny):
    dpo = [r for r in metrics_rows(rlhf_tiny["dpo"]) if "acc_sampled" in r]
    assert dpo[-1]["val_reward_acc"] == 1.0 and dpo[-1]["val_chosen_reward"] > 0 > dpo[-1]["val_rejected_reward"]


def test_dpo_moves_the_greedy_answer_to_the_preferred_one(rlhf_tiny):
    dpo = [r for r in metrics_rows(rlhf_tiny["dpo"]) if "acc_sampled" in r]
    assert dpo[0]["acc_greedy"] == 0 and dpo[-1]["acc_greedy"] == 1.0


def test_every_stages_checkpoint_loads_in_sample_py(rlhf_tiny):
    for s in ("sft", "rm", "ppo", "dpo"):
        assert checkpoint.load_run(rlhf_tiny[s], "cpu")[0].config.n_layer == 1


def test_label_writes_on_policy_pairs_with_chosen_judged_right_and_rejected_wrong(rlhf_tiny):
    d = rlhf_tiny["data"]  # the tiny SFT model answers "1+1=2" or "1+1=3": both kinds turn up in 8 samples
    rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--data={d}/prompts.jsonl",
              f"--label_out={d}/prefs_sft.jsonl", "--label_prompts=8", "--label_val_prompts=4", "--max_new_tokens=7"])
    for name, n_prompts in (("prefs_sft.jsonl", 8), ("prefs_sft_val.jsonl", 4)):
        pairs = rollout.read_jsonl(os.path.join(d, name), [("prompt", "chosen", "rejected")])
        assert 0 < len(pairs) <= n_prompts * 7  # at most k - 1 wrong answers per prompt
        assert all(addition.task_reward(r["prompt"], r["chosen"]) == 1.0 for r in pairs)
        assert all(addition.task_reward(r["prompt"], r["rejected"]) == 0.0 for r in pairs)


def test_label_asked_for_more_prompts_than_the_file_has_is_refused(rlhf_tiny):
    d = rlhf_tiny["data"]
    with pytest.raises(SystemExit, match="label_prompts"):
        rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--data={d}/prompts.jsonl",
                  f"--label_out={d}/x.jsonl", "--label_prompts=16"])


def test_label_stage_that_finds_no_pair_says_so_instead_of_writing_an_empty_file(rlhf_tiny):
    d = rlhf_tiny["data"]  # the untrained base model never answers right: no comparison to make
    with pytest.raises(SystemExit, match=r"^error: no prompt of the 8 got both a right and a wrong answer in 8 "
                                         r"samples; train the SFT model .* longer"):
        rlhf_run(["--stage=label", "--device=cpu", f"--init_from={rlhf_tiny['base']}", f"--data={d}/prompts.jsonl",
                  f"--label_out={d}/none.jsonl", "--label_prompts=8", "--label_val_prompts=4", "--max_new_tokens=7"])


def test_reward_model_scores_are_normalised_on_held_out_pairs(rlhf_tiny):
    r = held_out_reward_scores(rlhf_tiny)
    assert abs(r.mean().item()) < 1e-3 and abs(r.std(unbiased=False).item() - 1) < 1e-3


def test_normalised_reward_model_scores_keep_every_chosen_answer_ahead(rlhf_tiny):
    r = held_out_reward_scores(rlhf_tiny)
    assert (r[:16] > r[16:]).all()


def test_rlhf_into_a_dir_with_a_checkpoint_is_refused_without_resume(rlhf_tiny, tmp_path):
    out = copy_run(rlhf_tiny["dpo"], tmp_path / "dpo")
    with pytest.raises(SystemExit, match="already holds a run"):
        rlhf_run(dpo_resume_args(rlhf_tiny, out) + ["--max_iters=12"])


def test_rlhf_resume_continues_from_the_checkpoint(rlhf_tiny, tmp_path):
    out = copy_run(rlhf_tiny["dpo"], tmp_path / "dpo")
    rlhf_run(dpo_resume_args(rlhf_tiny, out) + ["--max_iters=12", "--resume=True"])
    steps = [r["step"] for r in metrics_rows(out) if "loss" in r and "val_loss" not in r]
    assert steps[-2:] == [11, 12]  # continued at step 10, did not start over


@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo", "dpo"])
def test_resume_of_an_interrupted_run_is_bit_exact(rlhf_tiny, tmp_path, stage):
    d = rlhf_tiny["data"]
    args = rlhf_online_args(rlhf_tiny, stage, tmp_path / "once", "--max_iters=4", "--eval_interval=2", "--grpo_beta=0.05")
    if stage == "dpo":
        args = ["--stage=dpo", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={tmp_path / 'once'}", "--device=cpu",
                f"--data={d}/prefs.jsonl", "--val_data=", "--eval_prompts=", "--batch_size=4", "--max_iters=4",
                "--eval_interval=2"]
    rlhf_run(args)
    shutil.copytree(tmp_path / "once", tmp_path / "twice")
    rlhf_rewind(tmp_path / "twice", 2)
    rlhf_run([a.replace(str(tmp_path / "once"), str(tmp_path / "twice")) for a in args] + ["--resume=True"])
    a, b = load_checkpoint(str(tmp_path / "once")), load_checkpoint(str(tmp_path / "twice"))
    assert a["iter_num"] == b["iter_num"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]  # AdamW's moments too
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    if stage == "ppo":
        assert all(torch.equal(a["value_head"][k], b["value_head"][k]) for k in a["value_head"])


def test_sft_targets_mask_exactly_the_non_assistant_tokens():
    tok, msgs = sft_chat()
    x, y = rollout.sft_example(tok, dict(messages=msgs))
    ids, mask = bpe.encode_chat(tok, msgs)
    assert x == ids[:-1] and [t for t in y if t != -1] == [t for t, m in zip(ids, mask) if m]
    assert all((t == -1) != m for t, m in zip(y, mask[1:]))  # target i is token i+1, kept iff it is learned


def test_sft_prompt_response_rows_are_the_same_chat_as_messages():
    tok, msgs = sft_chat()
    assert rollout.sft_example(tok, dict(prompt="1+1=", response="2")) == rollout.sft_example(tok, dict(messages=msgs[2:]))


def test_sft_loss_is_the_mean_cross_entropy_over_exactly_the_kept_targets():
    tok, msgs = sft_chat()
    x, y = rollout.sft_example(tok, dict(messages=msgs))
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    X, Y = torch.tensor([x]), torch.tensor([y])
    logits = m(X)[0][0]
    keep = Y[0] != -1
    want = F.cross_entropy(logits[keep], Y[0][keep])
    assert torch.allclose(rlhf.sft_loss(m, X, Y), want)


def test_reward_loss_and_accuracy_on_a_hand_made_batch():
    loss, acc = rlhf.reward_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    want = sum(math.log1p(math.exp(-m)) for m in (2.0, -1.0, 0.0)) / 3  # -log sigmoid(m)
    assert abs(loss.item() - want) < 1e-6 and abs(acc.item() - 1 / 3) < 1e-6


def test_ppo_policy_equal_to_reference_gives_zero_kl_and_unit_ratio():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=261))
    ref = copy.deepcopy(policy)
    ids = torch.randint(0, 261, (3, 10))
    mask = torch.ones(3, 9)
    logp, ref_logp = rollout.token_logprobs(policy(ids)[0], ids), rollout.token_logprobs(ref(ids)[0], ids)
    assert ((logp - ref_logp) * mask).sum(1).abs().max() == 0
    adv, v = torch.randn(3, 9), torch.randn(3, 9)
    pg, vf, clipfrac = rlhf.ppo_loss(logp, ref_logp, adv, v, v, v, mask, clip=0.2, clip_v=0.2)
    assert torch.allclose(pg, -adv.mean()) and vf == 0 and clipfrac == 0  # ratio 1: the plain policy gradient


def test_gae_against_a_hand_computed_example():
    # row 0: a 3-token response; row 1: a prompt slot, a 1-token response, then padding with junk values
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [9.0, 0.4, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a2 = 1.0 - 0.7                      # delta_2 = r_2 - V_2, last token
    a1 = (0.0 + 0.7 - 0.6) + 0.95 * a2  # delta_1 + gamma lam A_2
    a0 = (0.0 + 0.6 - 0.5) + 0.95 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [0.0, 2.0 - 0.4, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7], [0.0, 2.0, 0.0]]))


def test_ppo_clipped_objective_takes_the_pessimistic_min_on_a_known_case():
    pg, _, clipfrac = ppo_loss_on_a_known_case()
    # the pessimistic min of (r A, clip(r) A): 1.5 -> capped at 1.2; 0.5 with A<0 -> 0.8 counts; 0.5 with A>0 stays
    assert math.isclose(pg.item(), -(1.2 - 0.8 + 0.5) / 3, rel_tol=1e-6) and clipfrac.item() == 1.0


def test_ppo_clipped_value_loss_takes_the_further_of_the_clipped_and_unclipped_values():
    _, vf, _ = ppo_loss_on_a_known_case()
    assert math.isclose(vf.item(), 0.5 * (1.2 - 2.0) ** 2, rel_tol=1e-6)  # the clipped value (1.2) is further


def test_dpo_loss_at_init_equals_log_2():
    lp, ref = dpo_at_init()
    loss, rc, rr = rlhf.dpo_loss(lp[:2], lp[2:], ref[:, 0], ref[:, 1], beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and rc.abs().max() < 1e-6


def test_ipo_loss_at_init_equals_the_squared_inverse_of_twice_beta():
    lp, ref = dpo_at_init()
    ipo, _, _ = rlhf.dpo_loss(lp[:2], lp[2:], ref[:, 0], ref[:, 1], beta=0.1, loss_type="ipo")
    assert math.isclose(ipo.item(), (1 / 0.2) ** 2, rel_tol=1e-5)


def test_mean_pooled_reward_averages_the_head_over_the_response_tokens_only():
    r = pooled_rewards()
    for i, (p, resp) in enumerate([(x["prompt"], x[k]) for k in ("chosen", "rejected") for x in r.rows]):
        seq, n = rollout.prompt_response(r.tok, p, resp)  # the response's tokens and its <|end|>: seq[n:]
        with torch.no_grad():
            assert torch.isclose(r.mean[i], r.head(r.h[i, n:len(seq)]).mean(), atol=1e-5)


def test_last_token_reward_reads_the_head_at_the_last_token():
    r = pooled_rewards()
    with torch.no_grad():
        assert torch.allclose(r.last_token, r.head(r.h[range(4), r.last])[:, 0])


@pytest.mark.parametrize("name, content, fields, pattern", [
    ("d.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n', ("prompt", "chosen", "rejected"),
     r"PATH:2 is not valid JSON"),
    ("d.jsonl", b'\n{"prompt": "a", "chosen": "b"}\n', ("prompt", "chosen", "rejected"),
     r'PATH:2 lacks the fields \{"prompt", "chosen", "rejected"\}'),
    ("sft.jsonl", b'{"prompt": "1+1=", "response": "2"}\n\n{"prompt": "2+2=", \n', ("prompt", "response"),
     r"sft\.jsonl:3 is not valid JSON \(.*\); fix or remove that line"),
    ("sft.jsonl", b'{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "answer": "4"}\n', ("prompt", "response"),
     r'sft\.jsonl:2 lacks the fields \{"prompt", "response"\}'),
    ("sft.jsonl", b'{"prompt": "caf\xe9", "response": "2"}\n', ("prompt", "response"),  # latin-1, not UTF-8
     r"sft\.jsonl is not UTF-8 text \(byte 15\)"),
], ids=["not_json", "lacks_fields", "not_json_after_a_blank_line", "lacks_a_field", "not_utf8"])
def test_rlhf_jsonl_errors_name_the_file_and_line(tmp_path, name, content, fields, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit, match="^error: .*" + pattern.replace("PATH", re.escape(str(path)))):
        rollout.read_jsonl(str(path), [fields])


def test_task_holds_its_val_problems_out_of_every_training_file(task_files):
    d, val = task_files
    assert len(val) == 300
    for name in ("sft", "prefs", "prompts"):
        rows = rollout.read_jsonl(str(d / f"{name}.jsonl"), [("prompt",)])
        assert not val & {r["prompt"] for r in rows}


def test_task_holds_its_val_problems_out_of_the_pretraining_corpus(task_files):
    d, val = task_files
    corpus = (d / "corpus.txt").read_text()
    assert not val & {l.split("=")[0] + "=" for l in corpus.splitlines() if "+" in l}


def test_task_val_preferences_pair_a_right_answer_with_a_wrong_one(task_files):
    prefs = rollout.read_jsonl(str(task_files[0] / "prefs_val.jsonl"), [("prompt",)])
    assert all(addition.task_reward(r["prompt"], r["chosen"]) == 1 and addition.task_reward(r["prompt"], r["rejected"]) == 0
               for r in prefs)


def test_addition_py_alone_writes_what_make_task_writes(task_files, tmp_path):
    run("addition.py", f"--task_dir={tmp_path}", "--seed=0")  # task_files: make_task(slip 0.5, 300 held out, seed 0)
    names = sorted(os.listdir(task_files[0]))
    assert names == sorted(os.listdir(tmp_path)) and "corpus.txt" in names
    assert all((tmp_path / n).read_bytes() == (task_files[0] / n).read_bytes() for n in names)


def test_addition_py_help_lists_its_keys():
    p = run("addition.py", "--help")
    assert all(f"{k} = " in p.stdout for k in ("task_dir", "task_slip", "task_held_out", "seed"))


def test_group_advantages_subtract_the_group_mean():
    adv = rlhf.group_advantages(GROUP_REWARDS, 4, scale=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_scaled_group_advantages_divide_by_the_groups_unbiased_std():
    std = (4 * 0.5 ** 2 / 3) ** 0.5  # the group's unbiased std (as TRL): sqrt(1/3)
    scaled = rlhf.group_advantages(GROUP_REWARDS, 4, scale=True)
    assert torch.allclose(scaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + 1e-4))


def test_rloo_advantages_leave_one_out():
    loo = rlhf.rloo_advantages(GROUP_REWARDS, 4)  # 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; all equal: 0
    assert torch.allclose(loo, torch.tensor([2, -2, -2, 2, 0, 0, 0, 0]) / 3)
    # leave-one-out is the group mean's advantage times G / (G - 1)
    assert torch.allclose(loo, rlhf.group_advantages(GROUP_REWARDS, 4, scale=False) * 4 / 3)


def test_grpo_loss_types_normalise_per_response_per_token_or_per_max_length():
    mask, logp, adv, want = grpo_case()
    for loss_type, w in want.items():
        loss, clipfrac, _ = rlhf.grpo_loss(logp, logp, None, adv, mask, clip=0.2, beta=0.0, loss_type=loss_type, max_new=4)
        assert math.isclose(loss.item(), w, rel_tol=1e-6) and clipfrac == 0, loss_type


def test_grpo_loss_clips_the_ratio_pessimistically():
    mask, logp, adv, _ = grpo_case()
    # ratio 1.5 with a positive advantage is capped at 1.2; ratio 0.5 is not (the pessimistic min)
    old = logp - torch.tensor([[0.0, math.log(1.5), math.log(0.5), 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss, clipfrac, _ = rlhf.grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0, loss_type="dapo", max_new=4)
    assert math.isclose(loss.item(), -(1.2 + 0.5 + 3) / 3, rel_tol=1e-6)
    assert math.isclose(clipfrac.item(), 2 / 3, rel_tol=1e-6)  # both ratios are outside [0.8, 1.2]


def test_grpo_loss_adds_beta_times_the_k3_estimate_of_the_kl():
    mask, logp, adv, want = grpo_case()
    # k3 of KL: q = log ref - log pi = log 2 on every token: exp(q) - q - 1 = 1 - log 2 per token, times beta
    loss, _, kl = rlhf.grpo_loss(logp, logp, logp + math.log(2), adv, mask, clip=0.2, beta=0.5, loss_type="dapo",
                                   max_new=4)
    assert math.isclose(kl.item(), 1 - math.log(2), rel_tol=1e-6)
    assert math.isclose(loss.item(), want["dapo"] + 0.5 * (1 - math.log(2)), rel_tol=1e-6)


def test_grpo_loss_of_an_unknown_type_is_refused():
    mask, logp, adv, _ = grpo_case()
    with pytest.raises(SystemExit, match="loss_type must be"):
        rlhf.grpo_loss(logp, logp, None, adv, mask, clip=0.2, beta=0.0, loss_type="sigmoid", max_new=4)


def test_grpo_groups_of_alike_rewards_add_no_gradient_so_filtering_them_only_rescales_the_loss():
    # DAPO's dynamic sampling drops all-right / all-wrong groups: under one update their advantage is 0, so the
    # gradient is the same direction with or without them, only dapo's token count differs (Adam undoes the scale)
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    ids, mask = torch.randint(0, 64, (8, 9)), torch.ones(8, 8)
    mask[:, :3] = 0  # the prompt's predictions
    adv = rlhf.group_advantages(GROUP_REWARDS, 4)  # the second group is all right: advantage 0

    def grad(rows):
        m.zero_grad()
        logp = rollout.token_logprobs(m(ids[rows])[0], ids[rows])
        rlhf.grpo_loss(logp, logp.detach(), None, adv[rows], mask[rows], clip=0.2, beta=0.0, loss_type="dapo",
                       max_new=8)[0].backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    everything, informative = grad(torch.arange(8)), grad(torch.arange(4))
    assert informative.abs().sum() > 0 and torch.allclose(everything * 2, informative, atol=1e-7)


def test_a_judged_unfinished_answer_at_no_end_score_0_is_wrong_and_a_wrong_one_no_better():
    # a response cut off before <|end|> scores no_end_score even with the right "#### N" in it; below 0 (the
    # default -3, for reward models), a group's finished wrong answers get a positive advantage next to it
    tok, rows = chat_tokenizer(), [dict(prompt="q", answer="7")] * 4
    texts, ended = ["#### 7 and on", "#### 5", "#### 6", "#### 8"], torch.tensor([False, True, True, True])
    ids, mask, last = rollout.response_batch([[1, 2, 3]] * 4, [2] * 4, tok.eot)
    s0 = rollout.scores(None, gsm8k.judge, rows, texts, ids, mask, last, ended, no_end_score=0.0)
    assert s0.tolist() == [0.0] * 4 and rlhf.group_advantages(s0, 4).tolist() == [0.0] * 4
    s3 = rollout.scores(None, gsm8k.judge, rows, texts, ids, mask, last, ended, no_end_score=-3.0)
    assert (rlhf.group_advantages(s3, 4)[1:] > 0).all()


def test_grpo_and_rloo_raise_the_accuracy_on_the_trivial_task(online_run):
    evals, _ = online_run
    assert evals[-1]["acc_sampled"] > evals[0]["acc_sampled"] + 0.2 and evals[-1]["acc_greedy"] == 1.0


def test_grpo_and_rloo_raise_the_reward_on_the_trivial_task(online_run):
    _, steps = online_run
    assert steps[-1]["reward"] > steps[0]["reward"] + 0.2


def test_grpo_and_rloo_log_reward_loss_clipfrac_kl_and_the_spread_within_groups(online_run):
    _, steps = online_run
    assert {"reward", "loss", "clipfrac", "kl", "reward_std", "zero_std_frac", "response_len"} <= set(steps[0])


def test_ppo_without_its_reward_model_names_the_command_that_trains_it(rlhf_tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no reward model in .*nope.*python rlhf\.py config/rm\.py.*"
                                         r"--reward_model=task"):
        rlhf_run(rlhf_online_args(rlhf_tiny, "ppo", tmp_path / "ppo", f"--reward_model={tmp_path}/nope"))


def test_rm_before_the_label_stage_names_the_command_that_makes_its_pairs(rlhf_tiny, tmp_path):
    d = rlhf_tiny["data"]
    with pytest.raises(SystemExit, match=r"^error: data file .*prefs_sft\.jsonl does not exist .*"
                                         r"python rlhf\.py config/label\.py"):
        rlhf_run(["--stage=rm", "--device=cpu", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={tmp_path}/rm",
                  f"--data={d}/prefs.jsonl,{d}/prefs_sft_missing/prefs_sft.jsonl", "--val_data="])


def test_sft_without_a_pretrained_checkpoint_names_the_command_that_trains_one(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in .*python train\.py config/add\.py"):
        rlhf_run(["--stage=sft", "--device=cpu", f"--init_from={tmp_path}/none", f"--out_dir={tmp_path}/sft"])


def test_grpo_without_an_sft_checkpoint_names_the_command_that_makes_it(rlhf_tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no checkpoint in .*python rlhf\.py config/sft\.py"):
        rlhf_run(rlhf_online_args(rlhf_tiny, "grpo", tmp_path / "g", f"--init_from={tmp_path}/none"))


def rules_enforced():
    """Whether configurator.configure checks a script's RULES (rules.md) yet; the tests of rlhf.py's RULES skip
    until it does (the configurator's own tests prove the mechanism)."""
    try:
        configure(dict(x=1, RULES=dict(x=(1, None))), ["--x=0"])
    except SystemExit:
        return True
    return False


@pytest.mark.skipif(not rules_enforced(), reason="configurator.configure does not check RULES yet")
@pytest.mark.parametrize("args, pattern", [
    (["--stage=grpo", "--grpo_loss_type=ipo"], r"grpo_loss_type='ipo' is not one of: grpo, dapo, dr_grpo"),
    (["--stage=dpo", "--dpo_loss_type=dapo"], r"dpo_loss_type='dapo' is not one of: sigmoid, ipo"),
    (["--stage=rloo", "--grpo_beta=-1"], r"grpo_beta=-1(\.0)? is out of range"),
    (["--stage=grpo", "--num_generations=1"], r"num_generations=1 is out of range"),
    (["--stage=grpo", "--minibatch=0"], r"minibatch=0 is out of range"),
    (["--stage=sft", "--lora_rank=-4"], r"lora_rank=-4 is out of range"),
    (["--stage=grpo", "--task=math"], r"task='math' is not one of: add, gsm8k"),
    (["--stage=gpro"], r"stage='gpro' is not one of: sft, label, rm, ppo, dpo, grpo, rloo"),
    (["--stage=task"], r"stage='task' is not one of: sft, label, rm, ppo, dpo, grpo, rloo")])
def test_rlhf_settings_outside_their_rules_are_one_line_errors(args, pattern):
    with pytest.raises(SystemExit, match="^error: --" + pattern) as e:
        rlhf_run(args + ["--device=cpu", "--init_from=/nonexistent"])
    assert "\n" not in str(e.value)


def test_rlhf_dpo_beta_of_zero_is_a_one_line_error():  # an open bound, which RULES cannot say: checked in main
    with pytest.raises(SystemExit, match=r"^error: --dpo_beta=0(\.0)? is out of range; give a value > 0$"):
        rlhf_run(["--stage=dpo", "--dpo_beta=0", "--device=cpu", "--init_from=/nonexistent"])


@pytest.mark.parametrize("content, fields, pattern", [
    (b'{"prompt": "a", "chosen": null, "rejected": "c"}\n', ("prompt", "chosen", "rejected"),
     r'PATH:1: "chosen" must be a string, not null'),
    (b'{"prompt": "1+1=", "response": "2"}\n{"prompt": 12}\n', ("prompt",),
     r'PATH:2: "prompt" must be a string or a list of \{"role", "content"\} messages, not 12'),
    (b'{"messages": [{"role": "user", "content": 3}]}\n', ("messages",), r'PATH:1: "messages" must be a list'),
    (b'{"prompt": "q", "answer": [7]}\n', ("prompt", "answer"), r'PATH:1: "answer" must be a number'),
], ids=["chosen_null", "prompt_a_number", "messages_content_a_number", "answer_a_list"])
def test_rlhf_jsonl_rows_of_the_wrong_types_name_the_file_and_line(tmp_path, content, fields, pattern):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match="^error: " + pattern.replace("PATH", re.escape(str(path)))) as e:
        rollout.read_jsonl(str(path), [fields])
    assert "\n" not in str(e.value)


def test_rlhf_prompt_rows_of_the_wrong_type_stop_a_stage_before_it_trains(rlhf_tiny, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"prompt": 12}\n')
    with pytest.raises(SystemExit, match=rf'^error: {re.escape(str(bad))}:2: "prompt" must be a string'):
        rlhf_run(rlhf_online_args(rlhf_tiny, "grpo", tmp_path / "g", f"--data={bad}"))
    assert not os.path.exists(tmp_path / "g" / "latest.json")


def test_rlhf_rollout_batch_above_the_usable_prompts_says_how_many_there_are(rlhf_tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: rollout_batch=17 but .*prompts\.jsonl has 16 usable prompts .*; "
                                         r"lower rollout_batch$"):
        rlhf_run(rlhf_online_args(rlhf_tiny, "rloo", tmp_path / "r", "--rollout_batch=17"))


def test_rlhf_gsm8k_task_needs_the_answer_of_each_prompt_row_up_front(rlhf_tiny, tmp_path):
    with pytest.raises(SystemExit, match=r'^error: .*prompts\.jsonl:1 lacks the fields \{"prompt", "answer"\}'):
        rlhf_run(rlhf_online_args(rlhf_tiny, "grpo", tmp_path / "g", "--task=gsm8k"))


def test_every_tasks_judge_reads_a_row_and_a_response():
    assert [rlhf.TASKS[t][0](row, r) for t, row, r in [
        ("add", dict(prompt="37+48="), "37+48=85"), ("add", dict(prompt="37+48="), "37+48=75"),
        ("gsm8k", dict(prompt="q", answer="72"), "24 + 48 = 72\n#### 72"),
        ("gsm8k", dict(prompt="q", answer=7), "#### 8")]
    ] == [1.0, 0.0, 1.0, 0.0]
    assert addition.judge(dict(prompt="37+48="), "37+48=85") == addition.task_reward("37+48=", "37+48=85") == 1.0


# ---------------------------------------------------------------------------- the chat recipe (runs/chat.sh)
def test_chat_recipe_offline_chain_sft_grpo_pass_at_1_and_a_chat_turn(tmp_path, monkeypatch, capsys):
    """runs/chat.sh's OFFLINE chain, tiny: a byte-level GPT -> SFT on gsm8k.py's synthetic problems -> GRPO judged by
    gsm8k.judge -> pass@1 (acc_greedy) on the test problems by rlhf.py's held-out evaluation -> one sample.py chat turn."""
    wp, base = tmp_path / "wordprob", tmp_path / "base"
    gsm8k.write_synthetic(str(wp), dict(train=32, val=4, test=4), seed=0)
    tok = chat_tokenizer()
    os.makedirs(base)
    tok.save(str(base / "tokenizer.bpe"))
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=384, vocab_size=261, dropout=0.0, bias=False)
    torch.manual_seed(0)  # byte-level: a problem and its worked solution are up to ~360 tokens
    save_checkpoint(str(base), dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args,
                                    tokenizer_hash=tok.hash, iter_num=0))
    common = ["--device=cpu", "--task=gsm8k", f"--eval_prompts={wp}/test.jsonl", "--eval_samples=4",
              "--max_new_tokens=8", "--max_iters=2", "--eval_interval=2", "--log_interval=1", "--warmup_iters=0"]
    rlhf_run(["--stage=sft", f"--init_from={base}", f"--out_dir={tmp_path}/sft", f"--data={wp}/train.jsonl",
              f"--val_data={wp}/val.jsonl", "--batch_size=4", *common])
    rlhf_run(["--stage=grpo", "--reward_model=task", f"--init_from={tmp_path}/sft", f"--out_dir={tmp_path}/grpo",
              f"--data={wp}/train.jsonl", "--rollout_batch=2", "--num_generations=2", "--minibatch=4",
              "--ppo_epochs=1", *common])
    for stage in ("sft", "grpo"):
        evals = [r for r in metrics_rows(tmp_path / stage) if "acc_greedy" in r]
        assert [r["step"] for r in evals] == [0, 2] and all(0.0 <= r["acc_greedy"] <= 1.0 for r in evals)
    assert load_checkpoint(str(tmp_path / "grpo"))["config"]["task"] == "gsm8k"
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(read_rows(wp / "test.jsonl")[0]["prompt"] + "\n/quit\n"))
    fresh_main("sample.py", f"--out_dir={tmp_path}/grpo", "--chat", "--device=cpu", "--max_new_tokens=8")
    captured = capsys.readouterr()
    assert captured.out.startswith("chat: type a message") and captured.out.count("> ") == 2 and not captured.err


def test_chat_recipe_configs_are_valid_for_their_scripts_and_chat_sh_names_them(tmp_path):
    for name, script in (("wordprob_base", train), ("wordprob_sft", rlhf), ("wordprob_grpo", rlhf),
                         ("chat_sft", rlhf), ("chat_grpo", rlhf)):
        path = os.path.join(HERE, "config", name + ".py")
        cfg = configure(dict(config_keys(vars(script))), [path])  # unknown keys exit
        if name == "wordprob_grpo":  # judged: an unfinished answer is wrong, not worse than wrong (see the test above)
            assert cfg["no_end_score"] == 0.0
    sh = open(os.path.join(HERE, "runs", "chat.sh")).read()
    assert subprocess.run(["bash", "-n", os.path.join(HERE, "runs", "chat.sh")]).returncode == 0
    named = set(re.findall(r"config/\w+\.py", sh))
    assert {"config/wordprob_base.py", "config/wordprob_sft.py", "config/wordprob_grpo.py", "config/chat_sft.py",
            "config/chat_grpo.py", "config/gpt2_124m.py"} <= named
    assert all(os.path.isfile(os.path.join(HERE, n)) for n in named)


# ---------------------------------------------------------------------------- rlhf.py with LoRA
def lora_sft_args(rlhf_tiny, out, *extra):
    d = rlhf_tiny["data"]
    return ["--stage=sft", f"--init_from={rlhf_tiny['base']}", f"--out_dir={out}", f"--data={d}/sft.jsonl",
            f"--val_data={d}/sft.jsonl", f"--eval_prompts={d}/prompts.jsonl", "--eval_samples=4", "--device=cpu",
            "--batch_size=8", "--max_iters=4", "--eval_interval=2", "--warmup_iters=0", "--learning_rate=1e-2",
            "--log_interval=1", "--lora_rank=4", *extra]


@pytest.fixture(scope="module")
def lora_sft(rlhf_tiny, tmp_path_factory):
    """A 4-step LoRA SFT of the rlhf.py fixture's base model, its checkpoint at steps 2 and 4: its out_dir."""
    out = tmp_path_factory.mktemp("lora") / "sft"
    rlhf_run(lora_sft_args(rlhf_tiny, out))
    return out


def test_lora_sft_trains_only_the_adapters_and_saves_them_with_the_merged_weights(rlhf_tiny, lora_sft):
    ckpt, base = load_checkpoint(str(lora_sft)), load_checkpoint(rlhf_tiny["base"])
    assert set(ckpt["model"]) == set(base["model"]) and ckpt["lora"]  # a plain GPT's keys, and the adapters
    assert {k.rsplit(".", 1)[-1] for k in ckpt["lora"]} == {"lora_A", "lora_B"}
    changed = {k for k in base["model"] if not torch.equal(ckpt["model"][k], base["model"][k])}
    assert changed and all(k.endswith(".weight") and ".h." in k for k in changed)  # only the adapted Linears
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["lora"])  # AdamW's moments of the adapters alone
    losses = [r["loss"] for r in metrics_rows(lora_sft) if "loss" in r and "val_loss" not in r]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_lora_sft_checkpoint_loads_as_a_plain_gpt_in_load_run_and_sample_py(lora_sft, monkeypatch, capsys):
    model, tok, _ = checkpoint.load_run(str(lora_sft), "cpu")
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1=\n/quit\n"))
    fresh_main("sample.py", f"--out_dir={lora_sft}", "--chat", "--device=cpu", "--max_new_tokens=4", "--temperature=0")
    captured = capsys.readouterr()
    assert captured.out.startswith("chat: type a message") and captured.out.count("> ") == 2 and not captured.err


def test_lora_sft_resume_is_bit_exact(rlhf_tiny, lora_sft, tmp_path):
    twice = copy_run(lora_sft, tmp_path / "twice")
    rlhf_rewind(twice, 2)
    rlhf_run(lora_sft_args(rlhf_tiny, twice, "--resume=True"))
    a, b = load_checkpoint(str(lora_sft)), load_checkpoint(str(twice))
    assert a["iter_num"] == b["iter_num"] == 4
    for key in ("model", "lora"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_lora_resume_onto_another_init_from_or_rank_is_a_one_line_error(rlhf_tiny, lora_sft, tmp_path):
    other = copy_run(lora_sft, tmp_path / "other")
    with pytest.raises(SystemExit, match=r"^error: .*adapters on .* do not give its saved weights: init_from changed"):
        rlhf_run(lora_sft_args(rlhf_tiny, other, "--resume=True", f"--init_from={rlhf_tiny['sft']}"))
    with pytest.raises(SystemExit, match=r"^error: .* was trained with lora_rank=4; resume it with the same"):
        rlhf_run(lora_sft_args(rlhf_tiny, other, "--resume=True", "--lora_rank=0"))


@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_lora_online_and_preference_stages_run_and_save_a_plain_gpt(rlhf_tiny, tmp_path, stage):
    d = rlhf_tiny["data"]
    args = rlhf_online_args(rlhf_tiny, stage, tmp_path / stage, "--max_iters=2", "--eval_interval=2", "--lora_rank=2",
                            "--lora_targets=c_attn")
    if stage == "dpo":
        args = ["--stage=dpo", f"--init_from={rlhf_tiny['sft']}", f"--out_dir={tmp_path / stage}", "--device=cpu",
                f"--data={d}/prefs.jsonl", "--val_data=", "--eval_prompts=", "--batch_size=4", "--max_iters=2",
                "--lora_rank=2", "--lora_targets=c_attn"]
    rlhf_run(args)
    ckpt = load_checkpoint(str(tmp_path / stage))
    assert ckpt["iter_num"] == 2 and all(".attn.c_attn." in k for k in ckpt["lora"])
    assert checkpoint.load_run(str(tmp_path / stage), "cpu")[0].config.n_layer == 1


# ============================================================================ eval.py
class Unigram(torch.nn.Module):
    """A model whose loss for token t is exactly -log p[t] whatever the context: the same logits, log p, at every
    position (tokens outside p get none of the probability)."""

    def __init__(self, p, vocab, block_size=64):
        super().__init__()
        self.logp = torch.full((vocab,), -1e4)
        for t, v in p.items():
            self.logp[t] = math.log(v)
        self.config = type("Config", (), dict(block_size=block_size))

    def forward(self, idx, targets=None):
        return self.logp.expand(*idx.shape, -1), None


def eval_gpt(tok, block_size=16):
    torch.manual_seed(0)
    vocab = -(-tok.vocab_size // 64) * 64
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab))


HELLASWAG_LINES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_test"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "she",
     "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["lifts it over her head.", "sings.", "walks away from it.", "sits on the bar."],
     "source_id": "activitynet~v_test2"},
]


def unigram_case():
    """A byte tokenizer, a Unigram model over "zcabd" and 3 rows (labels 0, 1, 1) of 4 endings after "zzzzzzzzzz",
    with each ending's summed loss worked out by hand."""
    tok = bpe.train(["abcdz"], 256 + len(bpe.SPECIAL_TOKENS))  # bytes only: one token per character
    p = {"z": 0.5, "c": 0.3, "a": 0.08, "b": 0.08, "d": 0.04}
    model = Unigram({ord(k): v for k, v in p.items()}, tok.vocab_size)
    endings = ["d", "ccc", "ab", "aaaa"]
    sums = [-math.log(0.04), -3 * math.log(0.3), -2 * math.log(0.08), -4 * math.log(0.08)]  # 3.22 3.61 5.05 10.10
    # per token: 3.22, 1.20, 2.53, 2.53. Least summed loss: ending 0; least per token: ending 1
    rows = [dict(context="zzzzzzzzzz", endings=endings, label=label) for label in (0, 1, 1)]
    return tok, model, rows, sums


def hellaswag_source(tmp_path, monkeypatch):
    """HELLASWAG_LINES as the file eval.py downloads, with its git blob id: that file's bytes."""
    src = tmp_path / "hellaswag_val.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in HELLASWAG_LINES))
    content = src.read_bytes()
    monkeypatch.setattr(ev, "HELLASWAG_URL", src.as_uri())
    monkeypatch.setattr(ev, "HELLASWAG_BLOB", hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest())
    return content


@pytest.fixture(scope="module")
def mc_naive(bpe_tok):
    """9 random multiple-choice rows scored by a tiny GPT one ending at a time, unpadded (contexts longer than the
    model cut on the left): the model, the rows, per row (naive summed losses, token counts, ending_losses' sums and
    counts), and how many rows acc and acc_norm get right."""
    model = eval_gpt(bpe_tok).eval()
    rng = random.Random(0)
    rows = [dict(context=" ".join(rng.choice(["def", "x", "return", "(", "):"]) for _ in range(rng.randint(0, 12))),
                 endings=[" " + " ".join(rng.choice(["y", "1", "self", "+"]) for _ in range(rng.randint(1, 5)))
                          for _ in range(rng.choice([2, 4]))], label=0) for _ in range(9)]
    for r in rows:
        r["label"] = rng.randrange(len(r["endings"]))
    right, per_row = torch.zeros(2), []
    for r in rows:
        losses = []
        for e in r["endings"]:
            end = bpe_tok.encode_ordinary(e)
            seq = torch.tensor(((bpe_tok.encode_ordinary(r["context"]) or [bpe_tok.eot]) + end)[-17:])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[None, :-1])[0][0].float(), -1)
            losses.append((-logp[range(len(seq) - 1), seq[1:]][-len(end):].sum(), len(end)))
        s = torch.tensor([l for l, _ in losses])
        n = torch.tensor([k for _, k in losses])
        per_row.append((s, n, *ev.ending_losses(model, ev.encode_rows(bpe_tok, [r], 16), "cpu", ev.nullcontext())))
        right += torch.tensor([s.argmin() == r["label"], (s / n).argmin() == r["label"]])
    return model, rows, per_row, right


@pytest.fixture(scope="module")
def eval_run(bpe_tok, tmp_path_factory):
    """An out_dir with an untrained tiny checkpoint and its tokenizer, as train.py leaves them."""
    out = tmp_path_factory.mktemp("eval_run")
    model = eval_gpt(bpe_tok, block_size=32)
    args = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    bpe_tok.save(str(out / "tokenizer.bpe"))
    save_checkpoint(str(out), dict(model=model.state_dict(), model_args=args, iter_num=0, tokenizer_hash=bpe_tok.hash))
    return out, model


def test_mc_scores_only_the_endings_tokens():
    tok, model, rows, sums = unigram_case()
    got, counts = ev.ending_losses(model, ev.encode_rows(tok, rows[:1], 64), "cpu", ev.nullcontext())
    assert torch.allclose(got, torch.tensor(sums)) and counts.tolist() == [1, 3, 2, 4]  # the context is not scored


def test_mc_acc_takes_the_least_summed_loss_and_acc_norm_the_least_per_token():
    tok, model, rows, _ = unigram_case()
    r = ev.multiple_choice(model, tok, rows, "cpu", batch_rows=2)
    assert r == dict(acc=pytest.approx(1 / 3), acc_norm=pytest.approx(2 / 3), n=3)


def test_mc_batched_ending_losses_equal_a_naive_loop_over_the_endings(mc_naive):
    for s, n, sums, counts in mc_naive[2]:
        assert torch.allclose(sums, s, atol=1e-4) and torch.equal(counts, n)


def test_mc_accuracy_equals_the_naive_loops(mc_naive, bpe_tok):
    model, rows, _, right = mc_naive
    got = ev.multiple_choice(model, bpe_tok, rows, "cpu", batch_rows=4)
    assert (got["acc"], got["acc_norm"], got["n"]) == (pytest.approx(right[0] / 9), pytest.approx(right[1] / 9), 9)


def test_mc_ranks_score_every_world_th_row_and_their_counts_add_up(mc_naive, bpe_tok):
    # under torchrun each rank scores every world-th row, all ranks the same number of forwards
    model, rows, _, right = mc_naive
    parts = [ev.multiple_choice(model, bpe_tok, rows, "cpu", batch_rows=2, rank=k, world=2) for k in (0, 1)]
    assert [p["n"] for p in parts] == [5, 4]
    assert sum(p["acc"] * p["n"] for p in parts) == pytest.approx(right[0].item())
    assert sum(p["acc_norm"] * p["n"] for p in parts) == pytest.approx(right[1].item())


def test_bits_per_byte_scores_every_token_once_and_equals_a_direct_computation(bpe_tok):
    model = eval_gpt(bpe_tok).eval()
    text = BPE_CORPUS[0][:400]
    ids = [bpe_tok.eot] + bpe_tok.encode_ordinary(text)
    T = 16
    for stride in (5, 16):
        total = 0.0
        for t in range(1, len(ids)):  # token t is scored in the first window that holds it: start k*stride
            s = max(0, -(-(t - T) // stride)) * stride
            with torch.no_grad():
                logits = model(torch.tensor([ids[s:t]]))[0][0, -1].float()
            total += (torch.logsumexp(logits, -1) - logits[ids[t]]).item()
        r = ev.bits_per_byte(model, bpe_tok, text, "cpu", stride=stride, batch_size=3)
        assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode())
        assert r["bpb"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)


def test_hellaswag_download_is_checked_and_its_checksum_pinned(tmp_path, monkeypatch):
    content = hellaswag_source(tmp_path, monkeypatch)
    dest = ev.hellaswag_file(str(tmp_path / "data"))
    assert dest == str(tmp_path / "data" / "downloads" / "hellaswag_val.jsonl") and open(dest, "rb").read() == content
    assert open(dest + ".sha256").read().strip() == hashlib.sha256(content).hexdigest()


def test_hellaswag_rows_get_the_joining_space(tmp_path, monkeypatch):
    hellaswag_source(tmp_path, monkeypatch)
    rows = ev.hellaswag_rows(ev.hellaswag_file(str(tmp_path / "data")))
    assert rows[0] == dict(context="A man is sitting on a roof. he", label=3,
                           endings=[" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                    " is holding a cube.", " starts pulling up roofing on a roof."])


def test_hellaswag_file_that_is_not_hellaswags_is_refused_and_removed(tmp_path, monkeypatch):
    hellaswag_source(tmp_path, monkeypatch)
    dest = ev.hellaswag_file(str(tmp_path / "data"))
    monkeypatch.setattr(ev, "HELLASWAG_BLOB", "0" * 40)
    with pytest.raises(SystemExit, match=r"is not HellaSwag's val file \(git blob id mismatch\); removed it"):
        ev.hellaswag_file(str(tmp_path / "data"))
    assert not os.path.exists(dest) and not os.path.exists(dest + ".sha256")


def test_hellaswag_download_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "HELLASWAG_URL", (tmp_path / "offline.jsonl").as_uri())
    with pytest.raises(SystemExit, match=r"^error: cannot download .*; no network\? Fetch it yourself to "
                                         r".*hellaswag_val\.jsonl \(it is checked all the same\)$"):
        ev.hellaswag_file(str(tmp_path / "data"))


def test_eval_cli_mc_prints_acc_and_acc_norm(eval_run, bpe_tok, tmp_path):
    out, model = eval_run
    data = tmp_path / "rows.jsonl"
    rows = [dict(context=l["ctx"], endings=[" " + e for e in l["endings"]], label=l["label"]) for l in HELLASWAG_LINES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run("eval.py", f"--out_dir={out}", "--task=mc", f"--data={data}", "--device=cpu")
    r = ev.multiple_choice(model.eval(), bpe_tok, rows, "cpu")
    assert p.stdout.strip() == f"mc: acc {100 * r['acc']:.2f}% | acc_norm {100 * r['acc_norm']:.2f}% (2 rows)"


def test_eval_cli_bpb_prints_bits_per_byte_nats_per_token_and_the_counts(eval_run, tmp_path, capsys):
    out, _ = eval_run
    (tmp_path / "t.txt").write_text(BPE_CORPUS[1][:300])
    r = fresh_main("eval.py", f"--out_dir={out}", "--task=bpb", f"--text={tmp_path / 't.txt'}", "--device=cpu")
    assert r["bytes"] == 300 and capsys.readouterr().out == (
        f"{tmp_path / 't.txt'}: {r['bpb']:.4f} bits/byte ({r['loss']:.4f} nats/token over {r['tokens']:,} tokens, "
        f"300 bytes)\n")


def test_eval_cli_without_a_checkpoint_is_a_one_line_error(tmp_path):
    one_line_error(run("eval.py", f"--out_dir={tmp_path / 'none'}", check=False),
                   r"no checkpoint in .*none \(missing latest\.json\)[,;] .*(train one|runs with one)")


@pytest.mark.parametrize("case, pattern", [
    ("mc_missing", r"--task=mc needs --data=FILE\.jsonl; .*missing\.jsonl does not exist$"),
    ("bpb_no_text", r"--task=bpb needs --text=FILE; no text file given$"),
    ("mc_bad_row", r"bad\.jsonl:1 is not a multiple-choice row"),
    ("no_such_task", r"--task='nosuch' is not one of: hellaswag, mc, bpb, chat$"),
])
def test_eval_cli_bad_task_inputs_are_one_line_errors(eval_run, tmp_path, case, pattern):
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "endings": ["b"], "label": 0}\n')
    args = {"mc_missing": ["--task=mc", f"--data={tmp_path / 'missing.jsonl'}"], "bpb_no_text": ["--task=bpb"],
            "mc_bad_row": ["--task=mc", f"--data={tmp_path / 'bad.jsonl'}"], "no_such_task": ["--task=nosuch"]}[case]
    with pytest.raises(SystemExit, match="^error: .*" + pattern):
        fresh_main("eval.py", f"--out_dir={eval_run[0]}", "--device=cpu", *args)


# ---------------------------------------------------------------------------- eval.py --task=chat
class LetterLogits(torch.nn.Module):
    """A model whose logits are `after_assistant` at every position whose input is <|assistant|> and favour "A" by
    far everywhere else (the padding included): only the answer position can make another letter win."""

    def __init__(self, tok, after_assistant, block_size=256):
        super().__init__()
        self.assistant = tok.special_tokens["<|assistant|>"]
        self.elsewhere = torch.zeros(tok.vocab_size)
        self.elsewhere[ord("A")] = 100.0
        self.after = torch.zeros(tok.vocab_size)
        for letter, v in after_assistant.items():
            self.after[ord(letter)] = v
        self.config = type("Config", (), dict(block_size=block_size))

    def forward(self, idx, targets=None):
        at = (idx == self.assistant)[..., None]
        return torch.where(at, self.after, self.elsewhere), None


def chat_mc_rows(n_choices_and_answers):
    """chat_data.py-shaped multiple-choice rows (both forms), questions of different lengths."""
    rows = []
    for i, (k, answer) in enumerate(n_choices_and_answers):
        question, choices = "Which one?" + " really" * i, [f"choice {j}" for j in range(k)]
        rows.append(chat_data.mc_row(question, choices, answer))
    return rows


def test_chat_eval_letter_choice_picks_the_highest_logit_valid_letter():
    tok = chat_tokenizer()
    model = LetterLogits(tok, {"A": 1.0, "B": 2.0, "C": 3.0, "D": 0.5, "E": 9.0})  # E wins where it is a choice
    rows = chat_mc_rows([(4, 2), (5, 2), (2, 1), (3, 0), (5, 4)])  # the picks: C, E, B, C, E
    assert ev.letter_choice(model, tok, rows, "cpu", batch_rows=2) == dict(acc=3 / 5, n=5)
    assert ev.letter_choice(model, tok, rows, "cpu", batch_rows=5) == dict(acc=3 / 5, n=5)  # padding is not read


def test_chat_eval_asks_the_question_and_its_lettered_choices_in_the_chat_template():
    tok = chat_tokenizer()
    row = chat_mc_rows([(3, 0)])[0]
    text = "Which one?\nA. choice 0\nB. choice 1\nC. choice 2\nAnswer with the letter of the right choice."
    assert ev.mc_question(row) == text
    assert ev.chat_prompt(tok, text) == bpe.encode_chat(tok, [dict(role="user", content=text)], True)[0]


GSM8K_FIXTURE = [  # (question, answer, the stub model's reply): right, wrong, no "####", right as "1,000", too long
    ("Q one?", "12", "6+6=12\n#### 12"), ("Q two?", "7", "#### 8"), ("Q six?", "5", "5"),
    ("Q three?", "1000", "#### 1,000"), ("Q four??", "3", "1 + 1 + 1 = 3, so\n#### 3")]


def gsm8k_stub(tok, max_new, seen):
    """A stand-in for model.generate: each row's scripted reply to its chat prompt, then <|end|> repeated; the batch
    shapes it was called with go to `seen`."""
    replies = {tuple(ev.chat_prompt(tok, q)): tok.encode_ordinary(r) for q, _, r in GSM8K_FIXTURE}
    end = tok.special_tokens["<|end|>"]

    def generate(idx, max_new_tokens, temperature=1.0, **kw):
        assert temperature == 0.0 and max_new_tokens == max_new and end in kw["stop_ids"]
        seen.append(tuple(idx.shape))
        rows = [replies[tuple(r)] + [end] * max_new for r in idx.tolist()]
        for i in range(max_new):
            yield torch.tensor([r[i] for r in rows])
    return generate


def test_gsm8k_pass1_on_stub_replies_is_exact_and_batches_prompts_of_one_length(monkeypatch):
    tok, seen = chat_tokenizer(), []
    model = gpt_with(vocab_size=261)
    monkeypatch.setattr(model, "generate", gsm8k_stub(tok, 16, seen))
    rows = [dict(prompt=q, response="", answer=a) for q, a, _ in GSM8K_FIXTURE]
    # 16 new tokens cut the last reply before its "####": right are Q one and Q three
    assert ev.gsm8k_pass1(model, tok, rows, "cpu", max_new_tokens=16, batch=2) == dict(acc=2 / 5, n=5)
    assert sorted(seen) == [(1, 10), (2, 10), (2, 12)]  # prompts of one length together, at most 2 a batch
    replies = ev.greedy_replies(model, tok, [ev.chat_prompt(tok, "Q one?")], "cpu", max_new_tokens=16)
    assert replies == [tok.encode_ordinary("6+6=12\n#### 12")]  # cut before its <|end|>


def test_gsm8k_pass1_greedy_replies_equal_unbatched_generation():
    tok = chat_tokenizer()
    model = gpt_with(vocab_size=261, spread=0.5)
    prompts = [ev.chat_prompt(tok, q) for q, _, _ in GSM8K_FIXTURE]
    batched = ev.greedy_replies(model, tok, prompts, "cpu", max_new_tokens=6, batch=3)
    for p, r in zip(prompts, batched):
        one = ev.greedy_replies(model, tok, [p], "cpu", max_new_tokens=6)[0]
        assert r == one and not {tok.special_tokens["<|end|>"], tok.eot} & set(r)


def write_chat_data(root, names=("arc_easy", "mmlu"), gsm8k=True):
    """Fixture files as chat_data.py writes them under root/chat/: the test split of each name, and gsm8k's."""
    os.makedirs(root / "chat", exist_ok=True)
    for name in names:
        rows = chat_mc_rows([(4, 1), (3, 2), (4, 0)] if name == "mmlu" else [(4, 3), (5, 0)])
        (root / "chat" / f"{name}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if gsm8k:
        (root / "chat" / "gsm8k_test.jsonl").write_text(
            "".join(json.dumps(dict(prompt=q, response=r, answer=a)) + "\n" for q, a, r in GSM8K_FIXTURE))
    return str(root / "chat")


def test_chat_eval_table_prints_every_row_and_the_missing_file_row(tmp_path, capsys):
    tok = chat_tokenizer()
    model = gpt_with(vocab_size=261, block_size=64, spread=0.3)
    data = write_chat_data(tmp_path)
    table = ev.chat_eval(model, tok, "cpu", data_dir=data, gsm8k_path=f"{data}/gsm8k_test.jsonl", max_new_tokens=4)
    ev.print_table(table)
    lines = capsys.readouterr().out.splitlines()
    assert list(table) == ["gsm8k/pass@1", "arc_easy/letter_acc", "arc_easy/acc_norm", "arc_challenge/letter_acc",
                           "arc_challenge/acc_norm", "mmlu/letter_acc", "mmlu/acc_norm"]
    assert lines[0].split() == ["task", "metric", "score", "n"] and len(lines) == 1 + len(table)
    for line, r in zip(lines[1:], table.values()):
        assert line.split()[:2] == [r["task"], r["metric"]]
    mmlu = ev.read_chat_mc(f"{data}/mmlu_test.jsonl")
    assert table["mmlu/letter_acc"] == dict(task="mmlu", metric="letter_acc", n=3, note=None,
                                            score=ev.letter_choice(model, tok, mmlu, "cpu")["acc"])
    assert table["mmlu/acc_norm"]["score"] == ev.multiple_choice(model, tok, mmlu, "cpu")["acc_norm"]
    assert lines[2].split()[2:] == [f"{100 * table['arc_easy/letter_acc']['score']:.2f}%", "2"]
    missing = f"missing: python chat_data.py --which=arc_challenge --data_root={tmp_path}"
    assert table["arc_challenge/acc_norm"]["note"] == missing and lines[4].endswith(" " + missing)
    assert table["arc_challenge/letter_acc"]["score"] is None and table["gsm8k/pass@1"]["n"] == 5


def test_chat_eval_limit_scores_the_first_rows_and_a_base_tokenizer_skips_the_chat_rows(tmp_path):
    tok = bpe.train(["Which one? choice 0 1 2 3"], 257, special_tokens=["<|endoftext|>"])
    model = gpt_with(vocab_size=320, block_size=64)
    data = write_chat_data(tmp_path)
    table = ev.chat_eval(model, tok, "cpu", data_dir=data, gsm8k_path=f"{data}/gsm8k_test.jsonl", limit=2)
    skipped = "skipped: the tokenizer has no chat tokens (a base run)"
    assert {k: r["note"] for k, r in table.items()} == {
        "gsm8k/pass@1": skipped, "arc_easy/letter_acc": skipped, "arc_easy/acc_norm": None,
        "arc_challenge/letter_acc": skipped, "arc_challenge/acc_norm": f"missing: python chat_data.py --which=arc_challenge --data_root={tmp_path}",
        "mmlu/letter_acc": skipped, "mmlu/acc_norm": None}
    mmlu = ev.read_chat_mc(f"{data}/mmlu_test.jsonl")[:2]
    assert table["mmlu/acc_norm"]["n"] == 2 and table["mmlu/acc_norm"]["score"] == \
        ev.multiple_choice(model, tok, mmlu, "cpu")["acc_norm"]


@pytest.mark.parametrize("case, pattern", [
    ("all_missing", r"nothing to evaluate: no file in .*chat nor .*gsm8k_test\.jsonl; get them with python "
                    r"chat_data\.py --which=gsm8k,arc,mmlu --data_root=.*$"),
    ("bad_gsm8k_row", r'gsm8k_test\.jsonl:2 is not a GSM8K row \{"prompt": str, "answer": a number\}$'),
    ("bad_mc_row", r"arc_easy_test\.jsonl:1 is not a chat multiple-choice row"),
])
def test_chat_eval_missing_data_or_bad_rows_are_one_line_errors(eval_run, tmp_path, case, pattern):
    data = write_chat_data(tmp_path, names=() if case == "all_missing" else ("arc_easy",), gsm8k=case != "all_missing")
    if case == "bad_gsm8k_row":
        open(f"{data}/gsm8k_test.jsonl", "w").write('{"prompt": "Q?", "answer": "1"}\n{"prompt": "Q?"}\n')
    if case == "bad_mc_row":
        open(f"{data}/arc_easy_test.jsonl", "w").write(json.dumps(dict(context="Q", endings=[" a", " b"], label=0)))
    with pytest.raises(SystemExit, match="^error: .*" + pattern):
        fresh_main("eval.py", f"--out_dir={eval_run[0]}", "--device=cpu", "--task=chat", f"--chat_data_dir={data}",
                   f"--gsm8k_data={data}/gsm8k_test.jsonl", "--max_new_tokens=2")


def test_eval_cli_chat_on_a_fine_tuned_run_prints_the_table_and_appends_it_to_eval_jsonl(rlhf_tiny, tmp_path):
    out = copy_run(rlhf_tiny["sft"], tmp_path / "sft")
    data = write_chat_data(tmp_path, names=("arc_easy", "arc_challenge", "mmlu"))
    args = ["eval.py", f"--out_dir={out}", "--task=chat", f"--chat_data_dir={data}", "--max_new_tokens=8",
            f"--gsm8k_data={data}/gsm8k_test.jsonl", "--device=cpu", "--limit=2"]
    p = run(*args, env={"OMP_NUM_THREADS": "1"})
    lines = p.stdout.strip().splitlines()
    rows = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert len(rows) == 1 and rows[0]["task"] == "chat" and rows[0]["stage"] == "sft" and rows[0]["limit"] == 2
    table = rows[0]["table"]
    assert len(lines) == 8 and all(r["score"] is not None and r["n"] == 2 for r in table.values())
    for line, r in zip(lines[1:], table.values()):
        assert line.split() == [r["task"], r["metric"], f"{100 * r['score']:.2f}%", "2"]
    run(*args, env={"OMP_NUM_THREADS": "1"})
    assert [json.loads(line)["table"] for line in open(out / "eval.jsonl")] == [table, table]  # appended, greedy


# ============================================================================ export.py
# A GPT to a transformers directory and back, checked against transformers' own forward, generate, tokenizer and
# chat template. Needs transformers and safetensors (test-only dependencies).
EXPORT_LAYOUTS = {  # layout name -> GPTConfig options; each exercises a different mapping
    "gpt2": {},  # biases, tied
    "gpt2_no_bias_untied": dict(bias=False, tie_embeddings=False, mlp_hidden=96),  # config/small.py's kind
    "llama_gqa": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, rope_theta=5e5,
                      zero_init_proj=True),  # init only: kept in config.json, round trip included
    "llama_mqa_bias_untied": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=True,
                                  tie_embeddings=False, mlp_hidden=96),
    "mistral_window": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                           sliding_window=5, tie_embeddings=False),
    "qwen3_qk_norm": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, qk_norm=True),
    "scratchlm_speedrun": dict(n_layer=4, pos_encoding="rope", norm="rmsnorm", mlp="gelu", qk_norm=True, bias=False,
                               tie_embeddings=False, zero_init_proj=True, logit_softcap=15.0, value_embeds=True,
                               unet_skips=True, dropout=0.2),  # config/speedrun_small.py's options
    "scratchlm_every_switch": dict(n_layer=4, mlp="swiglu", qk_norm=True, n_kv_head=2, sliding_window=5,
                                   logit_softcap=30.0, value_embeds=True, unet_skips=True, smear_gate=True,
                                   bigram_embeds=500),  # learned, biases, tied
    "scratchlm_llama_smear_bigram": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                                         smear_gate=True, bigram_embeds=500),  # Llama, but for the two switches
}


HF_CLASS = dict(gpt2="GPT2LMHeadModel", llama="LlamaForCausalLM", mistral="MistralForCausalLM",
                qwen3="Qwen3ForCausalLM", scratchlm="ScratchLMForCausalLM")
SHAPE_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"}
PRETRAIN_RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "config"))
                          if re.search(r"^n_layer\s*=", open(os.path.join(HERE, "config", f)).read(), re.M))
RECIPE_LAYOUTS = dict(small="scratchlm", speedrun_small="scratchlm", speedrun_124m="scratchlm", llama_small="llama",
                      llama_124m="llama", gpt2_124m="gpt2", small_gpt2="gpt2", add="gpt2")


def load_exported(hf, path):
    """An exported directory loaded by transformers (trust_remote_code: ScratchLM's class is in the directory)."""
    return hf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def hf():
    """transformers, imported once for the whole block (the import alone takes seconds)."""
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def export_gpt(seed=0, **kw):
    """A random 2-layer GPT of width 64 over bpe_tok's 1000 ids padded to 1024, with N(0, 0.05) noise on every
    parameter so that biases and norm gains are not left at their 0 / 1 init (a lost bias would go unseen)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1024, block_size=64), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "mistral_window", "scratchlm_every_switch"])
def hf_greedy(request, hf, bpe_tok, tmp_path_factory):
    """A layout's model exported and loaded by transformers: (our 24 greedy tokens after a prompt, the new tokens of
    transformers' generate with its cache)."""
    model = export_gpt(**EXPORT_LAYOUTS[request.param])
    out = tmp_path_factory.mktemp(request.param)
    export.export(model, bpe_tok, str(out))
    theirs = load_exported(hf, out)
    prompt = torch.tensor([bpe_tok.encode("def main():\n    x = 1")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread does
    try:
        ours = torch.stack(list(model.generate(prompt, 24, temperature=0, n_vocab=bpe_tok.vocab_size)), 1)[0].tolist()
        new = theirs.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.size(1):].tolist()
    finally:
        torch.set_num_threads(threads)
    return ours, new


@pytest.fixture(scope="module")
def hf_tokenizer(hf, bpe_tok, tmp_path_factory):
    """bpe_tok exported with a model and loaded by transformers' AutoTokenizer."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    export.export(export_gpt(), bpe_tok, str(out))
    return hf.AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("name", EXPORT_LAYOUTS)
def test_export_transformers_forward_gives_our_logits(name, hf, bpe_tok, tmp_path, one_thread):
    model = export_gpt(**EXPORT_LAYOUTS[name])
    layout = export.export(model, bpe_tok, str(tmp_path))
    theirs = load_exported(hf, tmp_path)
    assert type(theirs).__name__ == HF_CLASS[layout] and layout == name.split("_")[0]
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))  # 48 > the window of 5
    with torch.no_grad():
        ours, hf_logits = model(x)[0], theirs(x).logits
    assert (hf_logits - ours).abs().max() <= 1e-5 * ours.abs().max()
    if layout == "scratchlm":  # transformers' labels convention (shifted inside) gives our loss: it fine-tunes the same
        with torch.no_grad():
            assert torch.allclose(theirs(x, labels=x).loss, model(x[:, :-1], x[:, 1:])[1], rtol=1e-5)


def test_export_transformers_generate_with_its_cache_gives_our_greedy_tokens(hf_greedy, bpe_tok):
    ours, new = hf_greedy
    stops = {bpe_tok.eot, bpe_tok.special_tokens["<|end|>"]}  # generation_config.json's eos_token_id
    assert new == ours[:len(new)] and (len(new) == 24 or new[-1] in stops)


def test_export_generation_never_samples_a_padding_id(hf_greedy, bpe_tok):
    ours, new = hf_greedy
    assert max(ours) < bpe_tok.vocab_size and max(new) < bpe_tok.vocab_size


@pytest.mark.parametrize("name", EXPORT_LAYOUTS)
def test_export_then_import_gives_back_the_same_config_and_bits(name, bpe_tok, tmp_path):
    pytest.importorskip("safetensors")
    model = export_gpt(**EXPORT_LAYOUTS[name])
    export.export(model, bpe_tok, str(tmp_path))
    args, sd = export.load_hf(str(tmp_path))
    assert args == dataclasses.asdict(model.config)
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) and sd[k].dtype == ref[k].dtype for k in ref)


def test_export_then_import_gives_back_the_same_tokenizer(bpe_tok, tmp_path):
    pytest.importorskip("safetensors")
    export.export(export_gpt(), bpe_tok, str(tmp_path))
    assert export.tokenizer_from_hf(str(tmp_path)).hash == bpe_tok.hash


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_export_tokenizer_json_gives_tiktokens_ids_on_adversarial_text(pattern, hf, bpe_tok, tmp_path):
    import tokenizers
    tok = bpe_tok if pattern == "gpt4" else bpe.train(BPE_CORPUS, 600, pattern=bpe.GPT2_PATTERN)
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(export.tokenizer_json(tok), f)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    specials = "<|endoftext|>x<|user|> hi<|end|>\n<|assistant|><|system|><|endoftext|><|endoftext|>"
    texts = ADVERSARIAL + [random_unicode(rng, 60) for _ in range(500)] + [BPE_CORPUS[0][:4000], BPE_CORPUS[-1],
                                                                          specials, " <|end|> " * 3 + "1,234.5e6\r\n"]
    for text in texts:
        ids = tok.encode(text, allowed_special="all")  # HF matches special tokens anywhere in the text
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids, skip_special_tokens=False) == text


def test_export_autotokenizer_gives_our_ids(hf_tokenizer, bpe_tok):
    text = "x = 3  # 東京 🎉\r\n\n\n   <|endoftext|>  y"
    assert hf_tokenizer(text)["input_ids"] == bpe_tok.encode(text, allowed_special="all")


def test_export_chat_template_gives_encode_chats_ids_and_mask(hf_tokenizer, bpe_tok):
    chat = [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "What is 12+30?  🎉"},
            {"role": "assistant", "content": " 42\n\n  done"}, {"role": "user", "content": "東京 again\r\n"}]
    for messages, gen in ((chat, True), (chat[:3], False), (chat[:1], True)):
        ids, mask = bpe.encode_chat(bpe_tok, messages, add_generation_prompt=gen)
        out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert [bool(m) for m in out["assistant_masks"]] == mask


def test_export_tokenizer_json_in_gpt2s_own_form_imports_exactly(hf, tmp_path):
    """GPT-2's tokenizer.json has a ByteLevel pre-tokenizer with its built-in regex, not a Split: importing it
    must give a tiktoken encoding with the same ids as HF's."""
    import tokenizers
    tok = bpe.train(BPE_CORPUS, 600, pattern=bpe.GPT2_PATTERN, special_tokens=["<|endoftext|>"])
    j = export.tokenizer_json(tok)
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(j, f)
    theirs, ours = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), export.tokenizer_from_hf(str(tmp_path))
    rng = random.Random(1)
    for text in ADVERSARIAL + [random_unicode(rng, 60) for _ in range(300)]:
        assert theirs.encode(text).ids == ours.encode(text, allowed_special="all"), text


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_bin", "qwen3"])
def test_export_imports_models_saved_by_transformers(kind, hf, tmp_path, one_thread):
    torch.manual_seed(0)
    if kind == "gpt2":
        theirs = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64))
    elif kind == "qwen3":  # QK-norm
        theirs = hf.Qwen3ForCausalLM(hf.Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    hidden_size=64, head_dim=16, intermediate_size=96, vocab_size=300,
                                                    max_position_embeddings=64, rms_norm_eps=1e-5))
    else:
        theirs = hf.LlamaForCausalLM(hf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    hidden_size=64, intermediate_size=96, vocab_size=300,
                                                    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e5))
    with torch.no_grad():  # noise: transformers initialises GPT-2's biases to zero
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.eval().save_pretrained(str(tmp_path))
    if kind == "llama_bin":  # the older pytorch_model.bin form, read with weights_only=True
        os.remove(tmp_path / "model.safetensors")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    args, sd = export.load_hf(str(tmp_path))
    ours = GPT(GPTConfig(**args)).eval()
    ours.load_state_dict(sd)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = theirs(x).logits, ours(x)[0]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_export_every_pretraining_recipes_model_options_give_our_logits_and_bits_back(name, hf, tmp_path, one_thread):
    """Each config/*.py recipe's model options (shapes shrunk) export; transformers computes our logits, and
    importing gives back the same config and state dict."""
    c = runpy.run_path(os.path.join(HERE, "config", f"{name}.py"))
    opts = {k: v for k, v in c.items() if k in GPTConfig.__dataclass_fields__ and k not in SHAPE_FIELDS}
    if (c.get("n_kv_head") or c.get("n_head")) != c.get("n_head"):
        opts["n_kv_head"] = 2  # grouped-query attention as the recipe has it, at the tiny model's 4 heads
    model = export_gpt(n_layer=4, **opts)
    layout = export.export(model, None, str(tmp_path))
    assert layout == RECIPE_LAYOUTS.get(name, layout)
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[0], load_exported(hf, tmp_path)(x).logits
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()
    args, sd = export.load_hf(str(tmp_path))
    ref = model.state_dict()
    assert args == dataclasses.asdict(model.config)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("kw, layout", [
    (dict(qk_norm=True), "scratchlm"),
    (dict(value_embeds=True), "scratchlm"),
    (dict(unet_skips=True), "scratchlm"),
    (dict(logit_softcap=30.0), "scratchlm"),
    (dict(smear_gate=True), "scratchlm"),
    (dict(bigram_embeds=4096), "scratchlm"),
    (dict(pos_encoding="rope"), "scratchlm"),  # rope with GPT-2's LayerNorm and GELU
    (dict(n_kv_head=2), "scratchlm"),
    (dict(sliding_window=8), "scratchlm"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", sliding_window=8, bias=True), "scratchlm"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True), "scratchlm"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, sliding_window=8, bias=False), "scratchlm"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False), "qwen3"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", sliding_window=8, bias=False), "mistral"),
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=True, value_embeds=True), "scratchlm"),
    (dict(zero_init_proj=True, dropout=0.2), "gpt2"),  # init-only options never block a stock class
    (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", zero_init_proj=True, dropout=0.1), "llama"),
])
def test_export_layout_is_a_stock_class_only_where_its_math_is_ours(kw, layout):
    assert export.hf_layout(GPTConfig(**kw)) == layout


def test_export_scratchlm_file_knows_every_gptconfig_field_with_model_pys_default():
    pytest.importorskip("transformers")
    hf_modeling = importlib.import_module("hf_modeling")
    assert hf_modeling.FIELDS == {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    assert export.KNOWN_FIELDS == set(hf_modeling.FIELDS)


def test_export_scratchlm_file_imports_only_torch_and_transformers():
    """The directory must work where scratchlm is not: hf_modeling.py imports no script of this repo."""
    tree = ast.parse(open(os.path.join(HERE, "hf_modeling.py"), encoding="utf-8").read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"torch", "transformers"}


def test_export_refuses_a_gptconfig_field_it_does_not_know():
    """A field added to GPTConfig later is refused once it leaves its default, until export.py learns it."""

    @dataclasses.dataclass
    class FutureConfig(GPTConfig):
        attn_softcap: float = 0.0

    assert export.hf_layout(FutureConfig()) == "gpt2"
    with pytest.raises(SystemExit, match=r"^error: export.py does not know the option attn_softcap=30.0"):
        export.hf_layout(FutureConfig(attn_softcap=30.0))


def test_export_load_pretrained_from_nowhere_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="is neither a directory nor one of gpt2"):
        export.load_pretrained(str(tmp_path / "nowhere"))


def test_export_load_pretrained_of_a_model_type_it_cannot_read_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit, match="holds a 'bert' model; export.py reads gpt2, llama, mistral, qwen3 and "
                                         "scratchlm"):
        export.load_pretrained(str(tmp_path))


def test_export_load_pretrained_by_name_without_huggingface_hub_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(SystemExit, match="needs huggingface_hub"):
        export.load_pretrained("gpt2")


def test_export_offline_download_is_a_one_line_error(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network, and an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: cannot download openai-community/gpt2-medium \(") as e:
        export.load_pretrained("gpt2-medium")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["llama_gqa", "scratchlm_speedrun"])
def test_export_cli_exports_a_checkpoint_and_checks_it_with_transformers(name, hf, bpe_tok, tmp_path, monkeypatch,
                                                                         capsys):
    model = export_gpt(**EXPORT_LAYOUTS[name])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bpe_tok.save(str(run_dir / "tokenizer.bpe"))
    save_checkpoint(str(run_dir), dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config),
                                       tokenizer_hash=bpe_tok.hash, iter_num=0))
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={run_dir}"])
    runpy.run_path(os.path.join(HERE, "export.py"), run_name="__main__")
    out = capsys.readouterr().out
    layout = name.split("_")[0]
    assert f"wrote {run_dir}-hf: {layout} layout" in out and "token ids the same" in out
    assert sorted(os.listdir(f"{run_dir}-hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                  *(["modeling_scratchlm.py"] if layout == "scratchlm" else []),
                                                  "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("case, pattern", [
    ("hf_dir_file", r"^error: cannot make the directory .*hf \(File exists\); give an --hf_dir that is a directory"),
    ("truncated", r"^error: cannot read .*model\.safetensors \(SafetensorError: .*\); it is truncated or corrupt"),
    ("no_n_layer", r"^error: .*config\.json has no 'n_layer', which a gpt2 model's config needs; export it again"),
])
def test_export_into_a_file_or_import_of_truncated_weights_or_an_incomplete_config_is_one_line(tmp_path, case,
                                                                                              pattern):
    pytest.importorskip("safetensors")
    hf_dir = tmp_path / "hf"
    if case == "hf_dir_file":
        hf_dir.write_text("a file")
        one_line_error(run("export.py", f"--out_dir={chat_ckpt(tmp_path / 'run')}", f"--hf_dir={hf_dir}", check=False),
                       pattern)
        return
    export.export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64)), None, str(hf_dir))
    if case == "truncated":
        (hf_dir / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:100])
    else:
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(SystemExit, match=pattern) as e:
        export.load_pretrained(str(hf_dir))
    assert "\n" not in str(e.value)


# ============================================================================ plot.py
def fake_metrics(path, steps, k=1.0, elapsed=True, resumed_from=None):
    """A tiny metrics.jsonl as train.py writes it: training rows every 10 steps, evaluations every 50."""
    rows = []
    for s in range(0, steps + 1, 10):
        extra = dict(elapsed_s=s * 0.5) if elapsed else {}
        if s:
            rows.append(dict(step=s, loss=2 + 5 * math.exp(-k * s / 80), lr=1e-3 * min(1, s / 50), tokens_per_s=1e3,
                             **extra))
        if s % 50 == 0:
            rows.append(dict(step=s, train_loss=2 + 5 * math.exp(-k * s / 80), val_loss=2.1 + 5 * math.exp(-k * s / 80),
                             val_bpb=1.0, **extra))
    if resumed_from is not None:  # killed, then resumed from the checkpoint at resumed_from: those steps again
        rows += [dict(r, **{"loss": r["loss"] - 0.5} if "loss" in r else {}) for r in rows if r["step"] > resumed_from]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 3')  # a half-written last line
    return str(path)


def assert_png(path, min_side=300):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= min_side
    return img


def test_plot_draws_several_runs_overlaid_into_a_landscape_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_metrics(tmp_path / "baseline", 200)
    b = fake_metrics(tmp_path / "recipe", 150, k=1.5, elapsed=False)
    fresh_main("plot.py", a, b, f"--out={tmp_path / 'curves.png'}", "--title=baseline vs recipe")
    img = assert_png(tmp_path / "curves.png")
    assert img.shape[1] > img.shape[0]  # the 2 x 2 panels, landscape


def test_plot_with_fewer_labels_than_runs_is_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = fake_metrics(tmp_path / "baseline", 200), fake_metrics(tmp_path / "recipe", 150, k=1.5, elapsed=False)
    with pytest.raises(SystemExit, match=r"^error: --labels=x gives 1 labels for 2 runs"):
        fresh_main("plot.py", a, b, "--labels=x")


def test_plot_of_a_missing_metrics_file_is_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match=r"^error: no metrics in .*nope"):
        fresh_main("plot.py", str(tmp_path / "nope.jsonl"))


def test_plot_reads_a_resumed_run_once_keeping_the_resumed_rows(tmp_path):
    rows = plot.read_metrics(fake_metrics(tmp_path / "r", 100, resumed_from=50))  # the torn last line: left out
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(10, 101, 10)) and [r["step"] for r in rows if "val_loss" in r] == [0, 50, 100]
    assert [r["loss"] for r in rows if "loss" in r][5:] == pytest.approx(  # steps 60..100: the resumed run's rows
        [r["loss"] - 0.5 for r in plot.read_metrics(fake_metrics(tmp_path / "s", 100)) if "loss" in r][5:])


def test_plot_takes_the_tokens_per_step_from_the_checkpoint_config(tmp_path, sample_ckpt):
    config = load_checkpoint(sample_ckpt)["config"]
    per_step = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    assert plot.tokens_per_step(sample_ckpt) == per_step
    assert plot.tokens_per_step(fake_metrics(tmp_path / "r", 100, resumed_from=50)) is None  # no checkpoint


def test_plot_x_values_in_tokens_are_the_steps_times_the_tokens_per_step(sample_ckpt):
    per_step = plot.tokens_per_step(sample_ckpt)
    kept, xs = plot.x_values(plot.read_metrics(sample_ckpt), "tokens", per_step)
    assert xs and xs == [r["step"] * per_step for r in kept]


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then raises ImportError
    with pytest.raises(SystemExit, match=r"^error: plot\.py needs matplotlib, which is not installed: "
                                         r"pip install matplotlib$"):
        plot.pyplot()


def table_runs(tmp_path, launch=False):
    """Fixture runs for plot.py --table: baseline-s0/-s1 and recipe-s0/-s1 (the recipe's loss falls faster), as
    train.py logs them; with launch, each run's launch file 2 s before its rows' clock starts."""
    paths = [fake_metrics(tmp_path / f"{name}-s{s}", 200, k=k + 0.1 * s) for name, k in (("baseline", 1.0),
                                                                                          ("recipe", 2.0)) for s in (0, 1)]
    for p in paths if launch else ():
        rows = plot.read_metrics(p)
        with open(os.path.join(p, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(r, time=1000.0 + r["elapsed_s"])) + "\n" for r in rows)
        with open(os.path.join(p, "launch"), "w") as f:
            f.write("998.0\n")
    return paths


def table_lines(capsys, paths, *args):
    fresh_main("plot.py", "--table", *args, *paths)
    return capsys.readouterr().out.splitlines()


def test_plot_table_prints_mean_std_over_seeds_and_the_time_to_the_baselines_best(tmp_path, capsys):
    paths = table_runs(tmp_path)
    best = {p: min(r["val_loss"] for r in plot.read_metrics(p) if "val_loss" in r) for p in paths}
    target = (best[paths[0]] + best[paths[1]]) / 2
    first = {p: next((r for r in plot.read_metrics(p) if r.get("val_loss", 9) <= target), None) for p in paths}
    assert first[paths[0]] is None and first[paths[1]]  # of the baseline's seeds, the better one reaches the mean
    lines = table_lines(capsys, paths)
    assert lines[0] == f"target val loss {target:.4f} (the baseline's best, mean of 2 seeds)"
    assert lines[1].split()[:3] == ["run", "seeds", "s"] and lines[1].endswith("vs baseline")
    base, recipe = lines[2], lines[3]
    assert base.startswith("baseline ") and base.split()[1] == "1/2" and recipe.split()[1] == "2/2"
    recipe_s = [first[p]["elapsed_s"] for p in paths[2:]]
    assert plot.mean_std(recipe_s) in recipe and plot.mean_std([best[p] for p in paths[2:]]) in recipe
    assert " +- " in plot.mean_std(recipe_s)
    assert recipe.endswith(f"{sum(recipe_s) / 2 / first[paths[1]]['elapsed_s']:.2f}x") and base.endswith("1.00x")


def test_plot_table_counts_seconds_from_the_launch_file_and_takes_a_given_target(tmp_path, capsys):
    paths = table_runs(tmp_path, launch=True)
    figs = plot.run_figures(paths[2], 3.0)
    hit = next(r for r in plot.read_metrics(paths[2]) if r.get("val_loss", 9) <= 3.0)
    assert figs["s_to_target"] == pytest.approx(hit["elapsed_s"] + 2) and figs["steps_to_target"] == hit["step"]
    assert figs["wall_s"] == pytest.approx(plot.read_metrics(paths[2])[-1]["elapsed_s"] + 2)
    lines = table_lines(capsys, paths, "--target=3.0")
    assert lines[0] == "target val loss 3.0000" and lines[2].split()[1] == "2/2"


def test_plot_table_of_post_training_runs_shows_each_stages_last_evaluation(tmp_path, capsys):
    paths = []
    for stage in ("sft", "rm"):
        for s, acc in ((1, 0.5), (2, 0.7)):
            rows = [dict(stage=stage, step=0, acc_greedy=0.0, acc_sampled=0.0, reward=0.0, elapsed_s=1.0),
                    dict(stage=stage, step=10, loss=0.3, lr=1e-3),
                    dict(stage=stage, step=20, acc_greedy=acc, acc_sampled=acc - 0.1, reward=acc, kl=0.1,
                         elapsed_s=9.0)] if stage == "sft" else \
                [dict(stage=stage, step=20, val_loss=0.2, val_accuracy=acc, elapsed_s=5.0)]
            paths.append(str(tmp_path / f"{stage}-s{s}"))
            os.makedirs(paths[-1])
            with open(os.path.join(paths[-1], "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    header, sft, rm = table_lines(capsys, paths)
    assert "acc(greedy)" in header and "RM pair acc" in header and "target" not in header
    assert plot.mean_std([0.5, 0.7]) in sft and plot.mean_std([0.4, 0.6]) in sft and sft.split()[1] == "2"
    assert plot.mean_std([0.5, 0.7]) in rm and rm.split()[2] == "0.2"  # best val, then the figures rm lacks: "-"


@pytest.mark.parametrize("case, pattern", [
    ("empty", r"^error: .*empty\.jsonl has no metrics rows yet \(the run has not logged a step\)"),
    ("xyz", r"^error: --out=.*x\.xyz: matplotlib cannot write \.xyz images; end the name in one of: .*pdf, .*png"),
])
def test_plot_an_empty_metrics_file_or_an_unknown_image_format_is_one_line(tmp_path, case, pattern):
    if case == "xyz":
        pytest.importorskip("matplotlib")
    (tmp_path / "empty.jsonl").write_text("" if case == "empty" else '{"step": 1, "loss": 2.0}\n')
    p = run("plot.py", str(tmp_path / "empty.jsonl"), f"--out={tmp_path / ('x.' + case)}", check=False)
    one_line_error(p, pattern)
    assert os.listdir(tmp_path) == ["empty.jsonl"]


# ============================================================================ bench.py
# bench.py's train_common for a model that it times in seconds on a CPU
TINY_BENCH = "n_layer=2 n_head=2 n_embd=32 block_size=16 batch_size=4 vocab_size=384"


@pytest.fixture(scope="module")
def bench_generate(tmp_path_factory):
    """bench.py --mode=generate, tiny, on the CPU: its stdout and generate.json's rows."""
    out = tmp_path_factory.mktemp("bench_generate")
    p = run("bench.py", "--mode=generate", "--gen_tiny=True", "--gen_new_tokens=6", "--gen_batches=(1, 3)",
            "--gen_device=cpu", f"--gen_out_dir={out}", env={"OMP_NUM_THREADS": "1"})
    return p.stdout, json.load(open(out / "generate.json"))["rows"]


@pytest.fixture(scope="module")
def bench_generate_cold(tmp_path_factory):
    """bench.py --mode=generate timing a fresh process's first and second call (prompt_len=1, with the warm-up that
    sample.py makes on CUDA only, profiled), and `python sample.py` once: its stdout, its cold row, the sample.py row."""
    out = tmp_path_factory.mktemp("bench_cold")
    p = run("bench.py", "--mode=generate", "--gen_tiny=True", "--gen_new_tokens=5", "--gen_batches=(1,)",
            "--gen_no_cache=False", "--gen_device=cpu", "--gen_cold_variants=prompt_len=1 warm_up=True",
            "--gen_cold_profile=True", "--gen_sample_runs=1", f"--gen_out_dir={out}", env={"OMP_NUM_THREADS": "1"})
    row, sample_py = json.load(open(out / "generate.json"))["cold"]
    return p.stdout, row, sample_py


@pytest.fixture(scope="module")
def bench_train_variants(tiny_data, tmp_path_factory):
    """bench.py --mode=train on the common settings and one variant, on random and on real data: its options, its
    stdout and b.json's rows."""
    data_root, name, _ = tiny_data
    out = tmp_path_factory.mktemp("bench_train")
    common = f"{TINY_BENCH} gradient_accumulation_steps=2 compile=False data_root={data_root} dataset={name}"
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=; grad_ckpt=full loss_chunk=0",
            "--train_steps=2", "--train_warmup=1", "--train_data=both", f"--train_json={out / 'b.json'}")
    return common, p.stdout, json.load(open(out / "b.json"))["rows"]


@pytest.fixture(scope="module")
def bench_train_profile(tmp_path_factory):
    """bench.py --mode=train profiling 2 steps of the common settings: its stdout and the row's profile."""
    out = tmp_path_factory.mktemp("bench_profile")
    p = run("bench.py", "--mode=train", f"--train_common={TINY_BENCH} compile=False", "--train_steps=2",
            "--train_warmup=1", "--train_profile=2", f"--train_json={out / 'b.json'}")
    return p.stdout, json.load(open(out / "b.json"))["rows"][0]["profile"]


def test_bench_generate_writes_a_row_per_model_batch_and_cache_setting(bench_generate):
    _, rows = bench_generate
    assert len(rows) == 8 and all(r["warm_tok_s"] > 0 and r["warm_s"] > 0 for r in rows)
    assert {(r["model"], r["batch"], r["path"]) for r in rows} == \
        {(m, b, c) for m in ("gpt2-tiny", "llama-tiny") for b in (1, 3) for c in ("cache", "no cache")}


def test_bench_generate_prints_its_table(bench_generate):
    assert "llama-tiny" in bench_generate[0].splitlines()[-2]


def test_bench_generate_times_the_first_and_second_call_of_a_fresh_process(bench_generate_cold):
    _, row, _ = bench_generate_cold
    assert row["variant"] == "prompt_len=1 warm_up=True" and row["prompt_len"] == 1 and row["batch"] == 1
    assert row["first_s"] > 0 and row["second_s"] > 0 and row["ratio"] == pytest.approx(row["first_s"] / row["second_s"])


def test_bench_generate_times_python_sample_py_from_launch_to_exit_on_the_same_checkpoint(bench_generate_cold):
    _, row, sample_py = bench_generate_cold
    assert sample_py["variant"] == "python sample.py" and len(sample_py["seconds"]) == 1
    assert sample_py["seconds"][0] > row["import_s"] and "--max_new_tokens=5" in sample_py["cmd"]


def test_bench_generate_fresh_process_loads_a_checkpoint_and_totals_import_load_and_first_call(bench_generate_cold):
    _, row, _ = bench_generate_cold
    assert row["load_s"] > 0 and row["total_s"] == pytest.approx(row["import_s"] + row["load_s"] + row["first_s"])


def test_bench_generate_times_each_calls_first_token_within_the_call(bench_generate_cold):
    _, row, _ = bench_generate_cold
    assert all(0 < t <= s for t, s in zip(row["first_token_s"], (row["first_s"], row["second_s"])))


def test_bench_generate_times_the_imports_and_profiles_the_first_call(bench_generate_cold):
    _, row, _ = bench_generate_cold
    prof = row["profile"]  # profile_steps' figures, as the train mode's: the ops' own CPU time on a CPU
    assert row["import_s"] > 0 and any(op.startswith("aten::addmm") for op, _, _ in prof["top"])
    assert prof["kinds"]["matmul"] > 0 and sum(prof["kinds"].values()) == pytest.approx(prof["busy_ms"])


def test_bench_generate_prints_the_fresh_process_table_and_its_most_expensive_ops(bench_generate_cold):
    stdout, _, _ = bench_generate_cold
    assert "fresh process" in stdout and "prompt_len=1" in stdout
    assert "where the first call's time goes, prompt_len=1 warm_up=True:" in stdout and "aten::addmm" in stdout


def test_bench_generate_refuses_a_bad_cold_variant_in_one_line_before_any_row(tmp_path):
    p = run("bench.py", "--mode=generate", "--gen_tiny=True", "--gen_device=cpu", f"--gen_out_dir={tmp_path}",
            "--gen_cold_variants=; prompt_len=2; shape=gpt3", check=False, env={"OMP_NUM_THREADS": "1"})
    one_line_error(p, r"^error: --shape='gpt3' is not one of: gpt2-tiny, llama-tiny$")
    assert not os.listdir(tmp_path) and not p.stdout  # no checkpoint written, no table begun


def test_bench_train_runs_every_variant_on_random_and_real_data(bench_train_variants):
    _, _, rows = bench_train_variants
    assert [(r["variant"], r["data"]) for r in rows] == [("(common)", "random"), ("(common)", "real"),
                                                         ("grad_ckpt=full loss_chunk=0", "random"),
                                                         ("grad_ckpt=full loss_chunk=0", "real")]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows)


def test_bench_train_prints_its_table_last(bench_train_variants):
    assert "tok/s" in bench_train_variants[1].splitlines()[-5]


def test_bench_train_refuses_a_variant_as_train_py_does(bench_train_variants):
    common, _, _ = bench_train_variants
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=bf16_residual=True",
            check=False)
    assert p.returncode and "error: bf16_residual needs dtype bfloat16" in p.stderr


def test_bench_train_flags_a_variant_whose_updates_the_guard_skipped(tmp_path):
    # a skipped update leaves AdamW out of the step, so its time is not that of training: the bench must say so
    common = f"{TINY_BENCH} compile=False"
    p = run("bench.py", "--mode=train", f"--train_common={common}", "--train_variants=; learning_rate=1e30 grad_clip=0",
            "--train_steps=2", "--train_warmup=1", f"--train_json={tmp_path / 'b.json'}")
    fine, diverged = json.load(open(tmp_path / "b.json"))["rows"]
    # lr 1e30 blows the weights up: the guard refuses the judged warm-up update, then skips the timed steps' NaNs
    assert fine["skipped"] == 0 and diverged["skipped"] >= 2
    assert "warning: learning_rate=1e30 grad_clip=0 (random): the guard skipped" in p.stdout
    assert "warning: (common)" not in p.stdout


def test_bench_train_profile_splits_a_step_into_kinds_of_kernel(bench_train_profile):
    prof = bench_train_profile[1]
    assert prof["busy_ms"] > 0 and prof["kinds"]["matmul"] > 0 and prof["kinds"]["optimizer"] > 0
    assert sum(prof["kinds"].values()) == pytest.approx(prof["busy_ms"])  # every op in exactly one kind


def test_bench_train_profile_lists_the_12_costliest_ops_costliest_first(bench_train_profile):
    prof = bench_train_profile[1]
    times = [ms for *_, ms in prof["top"]]
    assert len(times) == 12 and times == sorted(times, reverse=True) and times[0] <= prof["busy_ms"]


def test_bench_train_profile_prints_where_a_steps_time_goes(bench_train_profile):
    stdout = bench_train_profile[0]
    assert "where a step's time goes" in stdout and "aten::mm" in stdout


def test_bench_train_under_torchrun_reports_scaling_against_each_rank_alone(tmp_path):
    common = f"{TINY_BENCH} gradient_accumulation_steps=2"
    p = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "bench.py", "--mode=train",
            f"--train_common={common}", "--train_steps=3", "--train_warmup=1", f"--train_json={tmp_path / 'b.json'}",
            env={"OMP_NUM_THREADS": "1"})
    (row,) = json.load(open(tmp_path / "b.json"))["rows"]
    assert row["world"] == 2 and len(row["alone_ms"]) == 2 and min(row["alone_ms"]) > 0
    assert row["scaling"] == pytest.approx(sum(row["alone_ms"]) / row["ms_per_step"])
    assert f"{row['scaling']:.3f}x" in p.stdout.splitlines()[-1]


def test_prepare_bench_reports_the_tokenizing_rate_and_the_same_shards_at_every_process_count(tmp_path):
    pytest.importorskip("pyarrow")
    p = run("bench.py", "--mode=prepare", "--prepare_mb=1", "--prepare_procs=(1, 2)", "--prepare_vocab=300",
            f"--prepare_dir={tmp_path / 'bench'}")
    res = json.load(open(tmp_path / "bench" / "results.json"))
    assert [r["procs"] for r in res["rows"]] == [1, 2]
    assert all(r["mb_per_s"] > 0 and r["wall_s"] > 0 for r in res["rows"])
    table = p.stdout.splitlines()
    for r in res["rows"]:  # a row per process count: processes, tokenizing MB/s, wall s
        assert any(line.split()[:2] == [str(r["procs"]), f"{r['mb_per_s']:.1f}"] for line in table), p.stdout
    assert res["same_shards"] is True and "the same shards from every number of processes" in p.stdout
    assert res["mb"] >= 1  # MB of text, at least prepare_mb


@pytest.mark.parametrize("args, pattern", [
    (["--mode=trian"], r"^error: --mode='trian' is not one of: bpe, train, generate, prepare$"),
    (["--mode=train", "--train_steps=0"], r"^error: --train_steps=0 is out of range; give a value in \[1, inf\)$"),
    (["--mode=train", "--train_common=compile=False n_layer=1 n_head=2 n_embd=32 block_size=16 batch_size=2"],
     r"^error: variant '\(common\)' of --mode=train has no vocab_size; add one to --train_common, e\.g\. vocab_size="),
])
def test_bench_bad_keys_and_a_train_config_without_vocab_size_are_one_line_errors(tmp_path, args, pattern):
    p = run("bench.py", *args, f"--train_json={tmp_path / 'b.json'}", check=False, env={"OMP_NUM_THREADS": "1"})
    one_line_error(p, pattern)
    assert not os.listdir(tmp_path)


# ============================================================================ runs/*.sh
def run_sh(script, *args, env=None, check=True):
    """bash runs/<script> with the scripts run by this interpreter; returns the CompletedProcess."""
    p = subprocess.run(["bash", os.path.join(HERE, "runs", script), *args], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"runs/{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def speedrun_sh(tmp_path_factory):
    """runs/speedrun.sh with 2 seeds of baseline, recipe and one variant, tiny, on the CPU: its stdout and dir."""
    d = tmp_path_factory.mktemp("speedrun_sh")
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--eval_iters=2", "--log_interval=3",
            "--warmup_iters=0", "--compile=False"]
    p = run_sh("speedrun.sh", *tiny, env=dict(SEEDS="2", VARIANTS=" n_embd=48;", DIR=str(d / "sr"),
                                              DATA=str(d / "data")))
    return p.stdout, d / "sr"


def test_speedrun_sh_runs_the_baseline_the_recipe_and_each_variant_with_every_seed(speedrun_sh):
    _, d = speedrun_sh
    runs = {n for n in os.listdir(d) if os.path.isdir(d / n)}
    assert runs == {f"{n}-s{s}" for n in ("baseline", "recipe", "n_embd-48") for s in (0, 1)}
    assert all((d / n / "launch").exists() and plot.read_metrics(d / n) for n in runs)
    first_loss = {n: next(r["loss"] for r in plot.read_metrics(d / n) if "loss" in r) for n in runs}
    assert first_loss["recipe-s0"] != first_loss["recipe-s1"]  # seeds 1337 and 1338
    size = {n: open(d / n / "train.log").readline().split()[0] for n in runs}  # "0.02M parameters | ..."
    assert size["n_embd-48-s0"] == size["n_embd-48-s1"] != size["recipe-s0"]  # the variant: the recipe overridden


def test_speedrun_sh_target_is_the_baselines_mean_best_val_loss(speedrun_sh):
    stdout, d = speedrun_sh
    best = [min(r["val_loss"] for r in plot.read_metrics(d / f"baseline-s{s}") if "val_loss" in r) for s in (0, 1)]
    assert f"target val loss {sum(best) / 2:.4f} (the baseline's best, mean of 2 seeds)" in stdout


def test_speedrun_sh_times_to_target_from_launch_within_each_runs_wall_time(speedrun_sh):
    _, d = speedrun_sh
    best = [min(r["val_loss"] for r in plot.read_metrics(d / f"baseline-s{s}") if "val_loss" in r) for s in (0, 1)]
    for n in os.listdir(d):
        if os.path.isdir(d / n):
            f = plot.run_figures(str(d / n), sum(best) / 2)
            rows = plot.read_metrics(d / n)  # the launch precedes train.py's own start
            assert f["wall_s"] > rows[-1]["elapsed_s"] and f["first_step_s"] > 0
            assert "s_to_target" not in f or 0 < f["s_to_target"] <= f["wall_s"]


def test_speedrun_sh_prints_the_table_of_every_row(speedrun_sh):
    stdout, d = speedrun_sh
    table = stdout[stdout.index("s to target"):].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["baseline", "recipe", "n_embd-48"]
    assert all(" +- " in line for line in table[2:4])  # the recipe reaches the target on both seeds


def test_speedrun_sh_corpus_readmes_runs_every_row_on_the_installed_packages_readmes(tmp_path):
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=0"]
    env = dict(SEEDS="1", BASE="", TARGET="9", DIR=str(tmp_path / "sr"), DATA=str(tmp_path / "data"))
    run_sh("speedrun.sh", *tiny, env=dict(env, CORPUS="readmes-1mb"))
    docs = (tmp_path / "data" / "readmes-1mb.txt").read_text().split("\n<|endoftext|>\n")[:-1]
    assert len(docs) >= 5 and all(len(d) >= 2000 for d in docs) and sum(len(d.encode()) for d in docs) >= 300_000
    meta = prepare.load_meta(str(tmp_path / "data" / "readmes-1mb"))
    windows = (meta["train_tokens"] - 1) // 32  # one train shard, block_size 32: the run read this corpus
    log = open(tmp_path / "sr" / "recipe-s0" / "train.log").read()
    assert meta["val_tokens"] > 0 and f" {windows:,} train windows" in log
    p = run_sh("speedrun.sh", *tiny, env=dict(env, CORPUS="nope"), check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: CORPUS=nope is not in")


def test_speedrun_sh_draws_val_loss_against_time(speedrun_sh):
    pytest.importorskip("matplotlib")
    assert_png(speedrun_sh[1] / "curves.png")


def test_speedrun_sh_without_a_baseline_needs_a_target(tmp_path):
    p = run_sh("speedrun.sh", env=dict(BASE="", DIR=str(tmp_path)), check=False)
    assert p.returncode == 1 and p.stderr == "error: BASE= (no baseline) needs a TARGET, the val loss to reach\n"
    assert not os.listdir(tmp_path)


# Stands in for python in runs/posttrain.sh: refuses to start a stage whose inputs (any path under the run's folder
# named by its config file or arguments, other than its own outputs) are not there yet, logs each call with its
# start and end, makes the stage's outputs (metrics.jsonl: a final evaluation whose accuracy depends on the seed)
# after FAKE_SLEEP seconds, and fails the stage named by FAKE_FAIL. plot.py runs for real.
FAKE_PYTHON = r'''
import json, os, sys, time
script, args = sys.argv[1], sys.argv[2:]
if script == "plot.py":
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
root, t0 = os.environ["DIR"], time.time()
kv = {}
for a in args:
    if a.endswith(".py"):
        scope = {}
        exec(open(a).read(), scope)
        kv.update({k: str(v) for k, v in scope.items() if not k.startswith("_")})
    else:
        kv.__setitem__(*a[2:].split("=", 1))
own = {"out_dir", "label_out", "task_dir"} | ({"data_root"} if script == "prepare.py" else set())
paths = {k: v for k, v in kv.items() if k in ("init_from", "reward_model", "data", "val_data", "eval_prompts",
                                               "input", "data_root", "out_dir", "label_out", "task_dir")}
outside = [f"{k}={v}" for k, v in paths.items() if v != "task" and not v.startswith(root)]
missing = [p for k, v in paths.items() if k not in own and v != "task" for p in v.split(",") if not os.path.exists(p)]
if script == "train.py" and not os.path.exists(os.path.join(kv["data_root"], kv["dataset"], "meta.json")):
    missing.append("meta.json")
out = kv.get("out_dir") or (os.path.dirname(kv["label_out"]) if "label_out" in kv else kv.get("task_dir") or
                            kv["data_root"])
name = os.path.basename(out)
if outside or missing:
    sys.exit(f"{name}: outside the run's folder: {outside}; not there yet: {missing}")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if os.environ.get("FAKE_FAIL") == name:
    sys.exit(3)
made = {"addition.py": [os.path.join(out, f) for f in ("corpus.txt", "sft.jsonl", "sft_val.jsonl", "prefs.jsonl",
                                                        "prefs_val.jsonl", "prompts.jsonl", "prompts_val.jsonl")],
        "prepare.py": [os.path.join(out, kv.get("dataset", ""), "meta.json")]}.get(script, [])
made += [kv["label_out"], kv["label_out"].replace(".jsonl", "_val.jsonl")] if "label_out" in kv else []
for p in made:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "w").close()
if "out_dir" in kv:
    open(os.path.join(out, "latest.json"), "w").close()
    acc = 0.5 + 0.1 * (kv["seed"] == "2")
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(dict(step=1, val_loss=1.0, acc_greedy=acc, elapsed_s=1.0)) + "\n")
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(dict(name=name, script=script, args=args, start=t0, end=time.time())) + "\n")
'''
POSTTRAIN_STAGES = ("base", "sft", "rm", "ppo", "ppo-judge", "dpo", "grpo", "rloo", "label", "rm-onpol", "ppo-onpol")


def posttrain_sh(d, **env):
    """runs/posttrain.sh for seeds 1 and 2 in d with FAKE_PYTHON: the process and the calls it made, in order."""
    fake = d / "fake_python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {d / 'fake.py'} \"$@\"\n")
    fake.chmod(0o755)
    (d / "fake.py").write_text(FAKE_PYTHON)
    run_dir = d / "run"
    calls = run_dir / "calls.jsonl"
    if calls.exists():
        calls.unlink()
    p = run_sh("posttrain.sh", "--device=cpu", env=dict(SEEDS="1 2", DIR=str(run_dir), PYTHON=str(fake), **env),
               check=False)
    return p, [json.loads(line) for line in open(calls)] if calls.exists() else []


@pytest.fixture(scope="module")
def posttrain_done(tmp_path_factory):
    d = tmp_path_factory.mktemp("posttrain_sh")
    return d, *posttrain_sh(d)


def test_posttrain_sh_runs_every_stage_of_every_seed_after_the_stages_it_reads(posttrain_done):
    _, p, calls = posttrain_done  # the fake python refuses a stage whose inputs are not there yet
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(c["name"] for c in calls) == sorted(["task", "data"] + [f"{n}-s{s}" for n in POSTTRAIN_STAGES
                                                                          for s in (1, 2)])
    assert all("--device=cpu" in c["args"] for c in calls if c["script"] == "rlhf.py")  # the script's arguments
    assert all("--device=cpu" not in c["args"] for c in calls if c["script"] != "rlhf.py")


def test_posttrain_sh_prints_the_table_of_every_stage_mean_and_std_over_the_seeds(posttrain_done):
    _, p, _ = posttrain_done
    table = p.stdout[p.stdout.index("acc(greedy)"):].splitlines()[1:]
    assert [line.split()[0] for line in table] == [n for n in POSTTRAIN_STAGES if n != "label"]
    assert all(plot.mean_std([0.5, 0.6]) in line for line in table)


def test_posttrain_sh_keeps_finished_stages_and_runs_again_only_a_deleted_one(posttrain_done):
    d, _, _ = posttrain_done
    p, calls = posttrain_sh(d)
    assert p.returncode == 0 and calls == [] and "rm-s1: done before" in p.stdout
    shutil.rmtree(d / "run" / "rm-s1")
    p, calls = posttrain_sh(d)
    assert p.returncode == 0 and [c["name"] for c in calls] == ["rm-s1"]


def test_posttrain_sh_names_the_failed_stage_and_runs_none_that_read_it(tmp_path):
    p, calls = posttrain_sh(tmp_path, FAKE_FAIL="rm-s1")
    assert p.returncode == 1 and f"error: stage rm-s1 failed (see {tmp_path / 'run' / 'rm-s1.log'})" in p.stderr
    names = [c["name"] for c in calls]
    assert "sft-s1" in names and "ppo-s1" not in names and not (tmp_path / "run" / "rm-s1" / "done").exists()


def test_posttrain_sh_with_par_runs_sibling_stages_together_each_after_what_it_reads(tmp_path):
    p, calls = posttrain_sh(tmp_path, PAR="1", FAKE_SLEEP="0.5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(calls) == 2 + 2 * len(POSTTRAIN_STAGES)
    span = {c["name"]: (c["start"], c["end"]) for c in calls}
    assert span["dpo-s1"][0] < span["grpo-s1"][1] and span["grpo-s1"][0] < span["dpo-s1"][1]  # siblings overlap
    assert span["sft-s1"][0] < span["base-s2"][1] and span["base-s2"][0] < span["sft-s1"][1] or \
        span["base-s1"][0] < span["base-s2"][1]  # and so do the seeds


# ============================================================================ lora.py
LORA_LAYOUTS = {  # layout name -> GPTConfig options: GPT-2's Linears with biases, and Llama's fused GQA and SwiGLU
    "gpt2": {},
    "llama_gqa_untied": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                             tie_embeddings=False),
}
LORA_X = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
LORA_Y = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


def lora_gpt(layout="gpt2", dtype=torch.float64, b_spread=0.05):
    """gpt_with's GPT (N(0, 0.05) noise on every weight) in dtype with rank-4, alpha-8 adapters on every Linear of
    the blocks, B filled with N(0, b_spread) noise as after some training (b_spread=0: B = 0, as add_lora leaves
    it). Returns (the plain model it was made from, the LoRA model)."""
    base = gpt_with(spread=0.05, **LORA_LAYOUTS[layout]).to(dtype)
    model = lora.add_lora(copy.deepcopy(base), 4, 8, "all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and b_spread:
                p.normal_(0.0, b_spread)
    return base, model


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_lora_starts_as_the_model_it_adapts_exactly(layout, one_thread):
    base, model = lora_gpt(layout, torch.float32, b_spread=0)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 8 and all(n.startswith("transformer.h.") for n in wrapped)  # 2 layers x 4 Linears
    with torch.no_grad():
        assert torch.equal(model(LORA_X)[0], base(LORA_X)[0])
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(model(LORA_X)[0], base(LORA_X)[0])


def test_lora_targets_pick_linears_by_name_suffix_and_bad_ones_are_one_line_errors():
    base = gpt_with(**LORA_LAYOUTS["llama_gqa_untied"])
    picked = lambda t: sorted(n for n, m in lora.add_lora(copy.deepcopy(base), 2, 2, t).named_modules()
                              if isinstance(m, lora.LoRALinear))
    assert picked(("c_attn", "mlp.c_proj")) == picked("c_attn,mlp.c_proj") == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_proj"]
    assert len(picked(("c_proj",))) == 4 and picked(("lm_head",)) == ["lm_head"]  # untied: lm_head is its own
    for args, pattern in [((4, 8, ("q_proj",)), "lora_targets 'q_proj' names no Linear .* c_attn, c_fc, c_proj,"),
                          ((0, 8, "all"), "lora_rank must be an integer >= 1"),
                          ((4, 8, ("lm_head",)), "lora_targets lm_head: .*tie_embeddings")]:
        with pytest.raises(SystemExit, match=f"^error: {pattern}") as e:
            lora.add_lora(gpt_with(), *args)  # gpt_with(): tied embeddings
        assert "\n" not in str(e.value)


def test_lora_trains_only_the_adapters(one_thread):
    _, model = lora_gpt(dtype=torch.float32, b_spread=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_state_dict(model)) and len(trainable) == 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    for _ in range(2):  # the first step moves only B (A's gradient is B^T (...) = 0), the second A too
        model.train()(LORA_X, LORA_Y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_lora_step_is_the_full_steps_math_on_the_low_rank_factors(layout, one_thread):
    # W' = W + s B A, so dL/dB = s dL/dW' A^T and dL/dA = s B^T dL/dW': the full model's weight gradient at W'
    _, model = lora_gpt(layout)
    full = lora.merge_lora(copy.deepcopy(model))
    model(LORA_X, LORA_Y)[1].backward()
    full(LORA_X, LORA_Y)[1].backward()
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            g = full.get_submodule(name).weight.grad
            torch.testing.assert_close(m.lora_B.grad, g @ m.lora_A.T * m.scale, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(m.lora_A.grad, m.lora_B.T @ g * m.scale, rtol=1e-10, atol=1e-14)
            assert m.weight.grad is None


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_lora_merged_is_a_plain_gpt_with_the_adapters_logits(layout, dtype, tol, one_thread):
    base, model = lora_gpt(layout, dtype)
    with torch.no_grad():
        ours = model(LORA_X)[0]
        sd = lora.merged_state_dict(model)  # mid-run: the model keeps its adapters
        assert len(lora.lora_state_dict(model)) == 16 and torch.equal(model(LORA_X)[0], ours)
        merged = lora.merge_lora(model)
        assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
        assert list(merged.state_dict()) == list(sd) == list(base.state_dict())
        assert all(torch.equal(v, sd[k]) for k, v in merged.state_dict().items())
        assert all(p.requires_grad for p in merged.parameters())
        plain = GPT(base.config).to(dtype).eval()
        plain.load_state_dict(sd)  # strict: a normal checkpoint's state dict
        for m in (merged, plain):
            assert (m(LORA_X)[0] - ours).abs().max() <= tol * ours.abs().max()
        assert (merged(LORA_X)[0] - base(LORA_X)[0]).abs().max() > 100 * tol * ours.abs().max()  # B did something


def test_lora_generates_with_the_kv_cache_as_its_merged_model(one_thread):
    _, model = lora_gpt("llama_gqa_untied")
    merged = lora.merge_lora(copy.deepcopy(model))
    greedy = [torch.stack(list(m.generate(LORA_X[:, :5], 12, temperature=0)), 1) for m in (model, merged)]
    assert torch.equal(*greedy)


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_lora_merged_and_exported_gives_the_adapters_logits_in_transformers(layout, hf, tmp_path, one_thread):
    _, model = lora_gpt(layout, torch.float32)
    with torch.no_grad():
        ours = model(LORA_X)[0]
    export.export(lora.merge_lora(model), None, str(tmp_path))
    theirs = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(LORA_X).logits - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_lora_state_dict_holds_only_the_adapters_and_round_trips(one_thread):
    _, model = lora_gpt("llama_gqa_untied")
    sd = lora.lora_state_dict(model)
    assert len(sd) == 16 and {k.rsplit(".", 1)[-1] for k in sd} == {"lora_A", "lora_B"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = gpt_with(spread=0.05, **LORA_LAYOUTS["llama_gqa_untied"]).double()  # the same base
    torch.manual_seed(1)  # another A, and B = 0
    lora.add_lora(other, 4, 8, "all")
    assert not torch.equal(other.transformer.h[0].attn.c_attn.lora_A, sd["transformer.h.0.attn.c_attn.lora_A"])
    lora.load_lora(other, torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(other(LORA_X)[0], model(LORA_X)[0])
    for wrong in (lora.add_lora(gpt_with(**LORA_LAYOUTS["llama_gqa_untied"]), 2, 8, "all"),  # rank 2
                  lora.add_lora(gpt_with(**LORA_LAYOUTS["llama_gqa_untied"]), 4, 8, ("c_attn",))):
        with pytest.raises(SystemExit, match=r"^error: the saved adapters do not fit this model .*lora_rank"):
            lora.load_lora(wrong, sd)


def test_lora_compiles_without_graph_breaks_and_trains_under_autocast(one_thread):
    torch._dynamo.reset()  # earlier tests' compiled frames and caches: this test compiles afresh
    _, model = lora_gpt(dtype=torch.float32)
    grads = {}
    for compiled in (False, True):
        step = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        with torch.autocast("cpu", torch.bfloat16):
            logits, loss = step(LORA_X, LORA_Y)
        loss.backward()
        assert logits.dtype == torch.bfloat16
        grads[compiled] = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 for g in grads[compiled])
        model.zero_grad(set_to_none=True)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * a.abs().max().item())


# ============================================================================ chat_data.py and gsm8k.py
GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72")


def chat(*turns):  # [("user", "hi"), ...] -> messages as the Hub's parquet files hold them: structs (content, role)
    return [dict(content=c, role=r) for r, c in turns]


def hub_tables():
    """{name: {split: pyarrow table}} shaped exactly like the real files: their column names, types and nesting."""
    pa = pytest.importorskip("pyarrow")
    msgs = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    gsm8k = pa.table({"question": [f"Natalia sold clips to {n} of her friends in April, and then she sold half as "
                                   f"many clips in May. How many clips did Natalia sell altogether?"
                                   for n in range(40)],
                      "answer": [GSM8K_SOLUTION] * 39 + ["no final line"]})
    smoltalk = pa.table({"full_topic": ["Greetings", "Weather", "Bad"],
                         "messages": pa.array([chat(("user", "Hi"), ("assistant", "Hello! How can I help?")),
                                               chat(("system", "Be brief."), ("user", "Rain?"), ("assistant", "Yes.")),
                                               chat(("user", "Hi"), ("tool", "42"))], msgs)})
    prefs = dict(prompt=["What is 2+2?", "Tell a joke", "Tie"], prompt_id=["a", "b", "c"],
                 chosen=pa.array([chat(("user", "What is 2+2?"), ("assistant", "4")),
                                  chat(("user", "Tell a joke"), ("assistant", "Knock knock."), ("user", "Who?"),
                                       ("assistant", "Lettuce.")),
                                  chat(("user", "Tie"), ("assistant", "same"))], msgs),
                 rejected=pa.array([chat(("user", "What is 2+2?"), ("assistant", "5")),
                                    chat(("user", "Tell a joke"), ("assistant", "Knock knock."), ("user", "Who?"),
                                         ("assistant", "No.")),
                                    chat(("user", "Tie"), ("assistant", "same"))], msgs),
                 score_chosen=[9.0, 8.0, 5.0], score_rejected=[2.0, 3.0, 5.0])
    prefs["messages"] = prefs["chosen"]
    choices = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])
    arc = pa.table({"id": ["Mercury_1", "NYSEDREGENTS_2", "X_3"],
                    "question": ["Which is a gas?", "Which is a metal?", "Broken?"],
                    "choices": pa.array([dict(text=["rock", "steam", "wood"], label=["A", "B", "C"]),
                                         dict(text=["iron", "salt", "sand", "glass"], label=["1", "2", "3", "4"]),
                                         dict(text=["a", "b"], label=["A", "B"])], choices),
                    "answerKey": ["B", "1", "E"]})
    mmlu = pa.table({"question": ["2+2?", "Capital of France?"], "subject": ["elementary_mathematics", "geography"],
                     "choices": [["3", "4", "5", "6"], ["Paris", "Rome", "Bern", "Oslo"]],
                     "answer": pa.array([1, 0], pa.int64())})
    prefs = pa.table(prefs)
    return dict(gsm8k=dict(train=gsm8k, test=gsm8k.slice(0, 3)),
                smoltalk=dict(train=pa.concat_tables([smoltalk] * 4), test=smoltalk),
                ultrafeedback=dict(train=pa.concat_tables([prefs] * 4), test=prefs),
                arc_easy=dict(train=arc, val=arc, test=arc), arc_challenge=dict(train=arc, val=arc, test=arc),
                mmlu=dict(train=mmlu, val=mmlu, test=mmlu))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for the Hub serving the fixtures (with Range requests); chat_data.SOURCES points at it, with
    the size and sha256 given for some files and pinned on first download for the others. Yields (requests, root)."""
    pq = pytest.importorskip("pyarrow.parquet")
    files, requests = {}, []
    sources = {}
    for name, splits in hub_tables().items():
        sources[name] = {}
        for split, table in splits.items():
            path = tmp_path / "hub" / f"{name}-{split}.parquet"
            os.makedirs(path.parent, exist_ok=True)
            pq.write_table(table, str(path))
            files[f"/{name}/{split}.parquet"] = path.read_bytes()
            known = name in ("gsm8k", "arc_challenge")  # the ones chat_data.py knows the size or sha256 of
            sources[name][split] = (f"/{name}/{split}.parquet", path.stat().st_size if known else None,
                                    prepare.file_sha256(path) if known else None)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(chat_data, "SOURCES", {n: {s: (base + u, size, sha) for s, (u, size, sha) in splits.items()}
                                               for n, splits in sources.items()})
    for key in ("which", "data_root", "smoltalk_subset", "val_every"):  # main() sets them: restored after the test
        monkeypatch.setattr(chat_data, key, getattr(chat_data, key))
    yield requests, tmp_path / "data"
    server.shutdown()


def chat_data_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["chat_data.py", *args])
    chat_data.main()


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_chat_data_downloads_each_file_once_and_writes_every_split(hub, monkeypatch, capsys):
    requests, root = hub
    chat_data_main(monkeypatch, f"--data_root={root}", "--val_every=4")
    out = capsys.readouterr().out
    expected = {f"{n}_{s}.jsonl" for n in chat_data.SOURCES for s in ("train", "val", "test")}
    assert set(os.listdir(root / "chat")) == expected
    for name in expected:  # the printed report: rows and bytes of every file
        path = root / "chat" / name
        assert f"{path}: {len(read_rows(path))} rows, {path.stat().st_size} bytes" in out
    assert sorted(requests) == sorted(f"/{n}/{s}.parquet" for n, splits in chat_data.SOURCES.items() for s in splits)
    downloads = os.listdir(root / "downloads")  # every file's sha256 pinned, whether known or not
    assert all(f"{n}.sha256" in downloads for n in downloads if n.endswith(".parquet"))
    before, n_requests = {n: (root / "chat" / n).read_bytes() for n in expected}, len(requests)
    assert all(before.values())  # no split is empty
    chat_data_main(monkeypatch, f"--data_root={root}", "--val_every=4")
    assert len(requests) == n_requests and {n: (root / "chat" / n).read_bytes() for n in expected} == before


def test_chat_data_gsm8k_rows_are_sft_rows_and_rl_prompts_with_their_answer(hub, monkeypatch):
    _, root = hub
    chat_data_main(monkeypatch, f"--data_root={root}", "--which=gsm8k", "--val_every=4")
    train, val, test = (read_rows(root / "chat" / f"gsm8k_{s}.jsonl") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (30, 9, 3)  # 39 usable train rows (one has no "####"): 1 in 4 to val
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert train[0]["response"] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                    "altogether in April and May.\n#### 72")  # no calculator annotations
    assert all(r["answer"] == "72" and gsm8k.judge(r, r["response"]) == 1.0 for r in train + val + test)
    for fields in ([("messages",), ("prompt", "response")], [("prompt",)]):  # rlhf.py's SFT and RL prompt files
        assert len(rollout.read_jsonl(str(root / "chat" / "gsm8k_train.jsonl"), fields)) == 30


def test_chat_data_smoltalk_and_ultrafeedback_become_rlhf_sft_and_preference_rows(hub, monkeypatch):
    _, root = hub
    chat_data_main(monkeypatch, f"--data_root={root}", "--which=smoltalk,ultrafeedback", "--val_every=4")
    sft = read_rows(root / "chat" / "smoltalk_test.jsonl")  # the row with a "tool" turn is left out
    assert sft == [dict(messages=[dict(role="user", content="Hi"), dict(role="assistant", content="Hello! How can I "
                                                                                                  "help?")]),
                   dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content="Rain?"),
                                  dict(role="assistant", content="Yes.")])]
    prefs = read_rows(root / "chat" / "ultrafeedback_test.jsonl")  # the tie is left out
    assert prefs == [dict(prompt="What is 2+2?", chosen="4", rejected="5"),
                     dict(prompt=[dict(role="user", content="Tell a joke"), dict(role="assistant", content="Knock "
                                  "knock."), dict(role="user", content="Who?")], chosen="Lettuce.", rejected="No.")]
    assert len(rollout.read_jsonl(str(root / "chat" / "smoltalk_train.jsonl"), [("messages",)])) == 6  # 8 usable, 2 to val
    assert len(rollout.read_jsonl(str(root / "chat" / "ultrafeedback_test.jsonl"),
                               [("prompt", "chosen", "rejected")])) == 2
    assert [m["role"] for m in rollout.as_messages(prefs[1]["prompt"])] == ["user", "assistant", "user"]


def test_chat_data_arc_and_mmlu_rows_are_multiple_choice_rows_eval_py_scores(hub, monkeypatch):
    _, root = hub
    chat_data_main(monkeypatch, f"--data_root={root}", "--which=arc,mmlu")
    arc = ev.read_mc(str(root / "chat" / "arc_challenge_test.jsonl"))  # eval.py's reader accepts them as they are
    assert [(r["question"], r["choices"], r["answer"]) for r in arc] == [
        ("Which is a gas?", ["rock", "steam", "wood"], 1), ("Which is a metal?", ["iron", "salt", "sand", "glass"], 0)]
    assert arc[0]["context"] == "Question: Which is a gas?\nAnswer:"
    assert arc[0]["endings"] == [" rock", " steam", " wood"]
    assert all(r["label"] == r["answer"] for r in arc)  # the answerKey "E" that is no label is left out
    mmlu = ev.read_mc(str(root / "chat" / "mmlu_val.jsonl"))
    assert [(r["subject"], r["choices"][r["label"]]) for r in mmlu] == [("elementary_mathematics", "4"),
                                                                         ("geography", "Paris")]


def test_chat_data_a_changed_file_on_the_hub_is_a_checksum_error_and_is_removed(hub, monkeypatch):
    _, root = hub
    url, size, sha = chat_data.SOURCES["gsm8k"]["test"]
    monkeypatch.setitem(chat_data.SOURCES["gsm8k"], "test", (url, None, "0" * 64))
    with pytest.raises(SystemExit, match="^error: checksum mismatch"):
        chat_data_main(monkeypatch, f"--data_root={root}", "--which=gsm8k")
    assert not os.path.exists(root / "downloads" / "gsm8k-test.parquet")


def test_chat_data_offline_unknown_names_and_missing_pyarrow_are_one_line_errors(hub, monkeypatch, tmp_path):
    _, root = hub
    with pytest.raises(SystemExit, match=r"^error: unknown dataset hellaswag in --which; choose from gsm8k, "):
        chat_data_main(monkeypatch, "--which=gsm8k,hellaswag")
    monkeypatch.setitem(chat_data.SOURCES, "mmlu", {"test": ("http://127.0.0.1:9/mmlu.parquet", None, None)})
    with pytest.raises(SystemExit, match=r"^error: cannot download http://127.0.0.1:9/mmlu.parquet .*no network\?"):
        chat_data_main(monkeypatch, f"--data_root={root}", "--which=mmlu")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow.parquet` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match=r"^error: reading the datasets' \.parquet files needs pyarrow; "
                                         r"`pip install pyarrow`$"):
        chat_data_main(monkeypatch, f"--data_root={tmp_path / 'fresh'}", "--which=gsm8k")
    assert not os.path.exists(tmp_path / "fresh")  # found before any download


@pytest.mark.parametrize("text, number", [
    (GSM8K_SOLUTION, "72"), ("So the total is 1,000 + 234 = 1,234.\n#### 1,234", "1234"),
    ("#### $1,000.", "1000"), ("#### 3.50", "3.5"), ("#### -5", "-5"), ("#### -$5", "-5"), ("#### .5", "0.5"),
    ("#### 5 apples and 6 pears", "5"), ("#### 3\nno, wait\n#### 4", "4"), ("#### 1,2,3", "1"), ("#### 0.0", "0"),
    ("The answer is 72.", None), ("", None), ("####", None), ("#### seventy-two", None), (None, None)])
def test_gsm8k_answer_is_the_first_number_after_the_last_hashes_or_none(text, number):
    assert gsm8k.gsm8k_answer(text) == number


def test_gsm8k_reward_compares_numbers_not_strings_and_the_judge_reads_the_rows_answer():
    assert gsm8k.gsm8k_reward("q", "#### 1,000", "1000") == 1.0 and gsm8k.gsm8k_reward("q", "#### 3.5", "3.50") == 1.0
    assert gsm8k.gsm8k_reward("q", "#### 1001", "1000") == 0.0 and gsm8k.gsm8k_reward("q", "1000", "1000") == 0.0
    assert gsm8k.gsm8k_reward(dict(prompt="q"), "#### -7", -7) == 1.0
    assert gsm8k.judge(dict(prompt="q", answer="72"), "24 + 48 = 72\n#### 72") == 1.0
    assert gsm8k.judge(dict(prompt="q", answer="72"), "#### 71") == 0.0
    with pytest.raises(SystemExit, match='^error: a GSM8K row needs "answer", a number'):
        gsm8k.judge(dict(prompt="q"), "#### 72")


def test_gsm8k_synthetic_problems_are_deterministic_distinct_and_their_worked_answers_right(tmp_path):
    for d, n_rl in (("a", 200), ("b", 200), ("c", 0)):
        run("gsm8k.py", "--synthetic", f"--out={tmp_path / d}", "--n_train=300", "--n_val=50", "--n_test=100",
            f"--n_rl={n_rl}")
    splits = {s: read_rows(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "val", "test", "rl")}
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in os.listdir(tmp_path / "a"))
    # the RL split comes last: without it, the other splits are the same files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()
               for f in ("train.jsonl", "val.jsonl", "test.jsonl"))
    assert [len(r) for r in splits.values()] == [300, 50, 100, 200]
    rows = [r for rs in splits.values() for r in rs]
    assert len({r["prompt"] for r in rows}) == 650  # no problem in two splits: RL's are unseen by SFT
    step = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    for r in rows:  # recompute: every step's operands come from the question or earlier steps, its result is right
        known, last = set(re.findall(r"\d+", r["prompt"])), None
        steps = step.findall(r["response"])
        assert 2 <= len(steps) <= 4 and r["response"].endswith(f"#### {r['answer']}")
        for a, op, b, c in steps:
            assert a in known and b in known, (r, a, b)
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                              "/": int(a) / int(b) if int(b) else None}[op] and int(c) > 0
            known.add(c)
            last = c
        assert r["answer"] == last and gsm8k.judge(r, r["response"]) == 1.0
    assert run("gsm8k.py", check=False).stderr.strip().startswith("error: nothing to do; pass --synthetic")


# ============================================================================ repo-wide
def test_scripts_import_each_other_without_a_cycle():
    scripts = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f != "test_all.py"}
    graph = {}
    for s in scripts:  # every import, at the top or inside a function
        names = set()
        for node in ast.walk(ast.parse(open(os.path.join(HERE, s + ".py"), encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[s] = (names & scripts) - {s}
    state = {}

    def visit(s, path):
        assert state.get(s) != "open", f"import cycle: {' -> '.join(path + [s])}"
        if state.get(s) is None:
            state[s] = "open"
            for t in sorted(graph[s]):
                visit(t, path + [s])
            state[s] = "done"
    for s in sorted(scripts):
        visit(s, [])
    assert "prepare" not in graph["bpe"] and "prepare" in graph["eval"] and "train" not in graph["eval"]


# ---- README.md: every command block runs as written, after the ones before it (issue 35)
README_MARKS = ("GPU", "network", "long", "your files")  # a command whose comment starts so is only checked
README_TINY = dict(  # appended to every command run, where the script has the key: tiny, CPU, seconds
    device="cpu", compile=False, max_iters=2, eval_interval=2, eval_iters=1, log_interval=1, warmup_iters=0,
    lr_decay_iters=2, n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=2,
    gradient_accumulation_steps=1, num_samples=1, max_new_tokens=4, eval_samples=2, rollout_batch=2, minibatch=2,
    num_generations=2, ppo_epochs=1, label_prompts=4, label_val_prompts=2, label_samples=2, limit=2, mc_batch=1,
    n_train=20, n_val=5, n_test=5, n_rl=5)


def readme_commands(text):
    """README's ```bash blocks as commands, in order: dicts of words (env assignments dropped), env, mark (the first
    of README_MARKS that the line's trailing comment starts with, else None) and line (for messages)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            quote, cut = None, len(line)
            for i, ch in enumerate(line):  # the comment: a "#" outside quotes, after a space
                if ch in "'\"" and quote in (None, ch):
                    quote = None if quote else ch
                elif ch == "#" and not quote and (i == 0 or line[i - 1].isspace()):
                    cut = i
                    break
            mark = next((m for m in README_MARKS if line[cut:].lstrip("# ").startswith(m)), None)
            lex = shlex.shlex(line[:cut], posix=True, punctuation_chars="&|;")
            lex.whitespace_split = True
            words = []
            for t in list(lex) + [";"]:
                if t not in ("&&", ";", "||", "|", "&"):
                    words.append(t)
                    continue
                env = dict(w.split("=", 1) for w in itertools.takewhile(lambda w: re.match(r"\w+=", w), words))
                if words[len(env):]:
                    commands.append(dict(words=words[len(env):], env=env, mark=mark, line=line.strip()))
                words = []
    return commands


def readme_script(words):
    """(script, args) of `python X.py ...` or `torchrun ... X.py ...`, or (runs/X.sh, args) of `bash runs/X.sh ...`;
    None for anything else (pip, python -m pytest)."""
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[i], words[i + 1:]
    if words[0] == "bash" and words[1].startswith("runs/"):
        return words[1], words[2:]
    return None


def readme_check(script, args, env):
    """The static check: the script and every config file named exist, and the keys and values pass configure
    (every --key one of the script's, of its type, within its RULES). runs/*.sh: their configs and overrides."""
    assert os.path.isfile(os.path.join(HERE, script)), script
    if script.startswith("runs/"):
        target = "rlhf" if script == "runs/posttrain.sh" else "train"
        configs = [v for v in env.values() if v.endswith(".py")]
        for c in configs:
            assert os.path.isfile(os.path.join(HERE, c)), c
        variants = [v.split() for v in env.get("VARIANTS", "").split(";") if v.strip()]
        for extra in [[]] + [["--" + kv for kv in v] for v in variants]:
            configure(dict(vars(importlib.import_module(target))), configs[:1] + args + extra)
        return
    for a in args:
        if not a.startswith("-") and a.endswith(".py"):
            assert os.path.isfile(os.path.join(HERE, a)), a
    cwd = os.getcwd()
    try:
        os.chdir(HERE)  # config files are named from the repo root
        configure(dict(vars(importlib.import_module(script[:-3]))),  # (plot.py's runs are its other arguments)
                  [a for a in args if a.startswith("-") or a.endswith(".py")])
    finally:
        os.chdir(cwd)


def test_readme_commands_are_valid_and_the_offline_ones_run(tmp_path):
    """Issue 35: every command of README.md's ```bash blocks names a script and config files that exist, and keys
    and values its configure accepts; and, in a copy of the repo, every command that needs no GPU, no network and
    no long run runs as written after the ones before it, with README_TINY appended (prepare.py reads a tiny corpus
    instead of the stdlib)."""
    commands = readme_commands(open(os.path.join(HERE, "README.md"), encoding="utf-8").read())
    repo = tmp_path / "repo"
    shutil.copytree(HERE, repo, ignore=shutil.ignore_patterns(".git", "out", "data", "__pycache__", "*.png", "docs"))
    tiny_corpus(str(tmp_path / "stdlib"))  # data/stdlib, named after its directory
    ran = []
    for c in commands:
        found = readme_script(c["words"])
        if found is None:
            continue
        script, args = found
        try:
            readme_check(script, args, c["env"])
        except SystemExit as e:
            raise AssertionError(f"README: {c['line']}: {e}") from None
        if c["mark"]:
            if args == ["config/label.py"]:  # its pairs, which the RM reads, stood in for by the offline pairs
                for name in ("", "_val"):
                    shutil.copy(repo / f"data/add/prefs{name}.jsonl", repo / f"data/add/prefs_sft{name}.jsonl")
            continue
        assert not script.startswith("runs/"), f"README: a whole pipeline runs long; mark it: {c['line']}"
        keys = config_keys(vars(importlib.import_module(script[:-3])))
        tiny = [f"--{k}={v}" for k, v in README_TINY.items() if k in keys]
        if script == "prepare.py" and not any(a.startswith("--input=") for a in args):
            tiny += [f"--input={tmp_path / 'stdlib'}", "--vocab_size=300", "--val_fraction=0.2"]  # not 31 MB of it
        p = run(script, *args, *tiny, cwd=repo, check=False, env={"OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, f"README: {c['line']}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        ran.append(script)
    assert {"prepare.py", "train.py", "sample.py", "addition.py", "rlhf.py", "eval.py", "export.py"} <= set(ran)


def test_readme_file_table_names_every_file():
    """README's table of files has a row for every file of the top directory and of runs/ (config/*.py: one row)."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    table = re.search(r"\| file \| what it does \|\n(.*?)\n\n", text, re.S)[1]
    rows = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    files = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    tops = {f for f in files if "/" not in f and not f.startswith(".") and f != "README.md"}
    tops |= {f for f in files if f.startswith("runs/")}
    assert tops <= rows, sorted(tops - rows)
    assert {"config/*.py", "docs/"} <= rows
