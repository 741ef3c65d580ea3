"""
Checkpoint I/O shared by every script that reads or writes a model: train, sample, rlhf, eval, export, bench.
Also a run's out_dir as a whole: loading a run (checkpoint + tokenizer, checked to belong together: load_run), an
out_dir's life (a new run refuses another's out_dir: check_out_dir; tokenizer and metrics.jsonl: open_out_dir), and
where a training run's model comes from (scratch, its own checkpoint, another run, a Hugging Face directory:
init_model, build_model).

out_dir/ckpt-NNNNNNN.pt are torch.save files; out_dir/latest.json names the newest complete one and its
sha256. Each file is written under a temporary name, fsynced and renamed, and latest.json is replaced
only after that: a kill at any moment leaves latest.json pointing at a whole, verified checkpoint.
Loading verifies the checksum and uses torch.load(weights_only=True): a checkpoint can never run code.

A checkpoint holds whole state dicts whatever the sharding that wrote it (full_state_dicts), the optimizer state
keyed by parameter name, so any run resumes from any other's on any number of processes (load_optimizer_state).
"""
import atexit
import errno
import hashlib
import json
import os
import socket
import sys
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import torch
import torch.distributed as dist

import bpe
from faults import GUARD_FIELDS
from model import GPT, GPTConfig

CKPT_FORMAT = 1


class HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the checksum costs no second read. It keeps the
    OSError of a failed write: torch's writer reports a full disk as a RuntimeError ("unexpected pos")."""

    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, b):
        self.sha.update(b)
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def ckpt_files(out_dir):
    """The checkpoint files of out_dir, newest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted((f for f in names if f.startswith("ckpt-") and f.endswith(".pt")), reverse=True)


def read_manifest(out_dir):
    """latest.json as a dict; None if missing, "corrupt" if it cannot be read as one."""
    try:
        with open(os.path.join(out_dir, "latest.json")) as f:
            m = json.load(f)
        return m if isinstance(m, dict) and isinstance(m.get("file"), str) else "corrupt"
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return "corrupt"


def save_checkpoint(out_dir, state, keep=2):
    name = f"ckpt-{state['iter_num']:07d}.pt"
    path = os.path.join(out_dir, name)
    manifest = os.path.join(out_dir, "latest.json")
    prev = read_manifest(out_dir)
    shas = prev.get("shas", {prev["file"]: prev.get("sha256")}) if isinstance(prev, dict) else {}
    w = None
    try:
        with open(path + ".tmp", "wb") as f:
            w = HashingWriter(f)
            torch.save(dict(state, format=CKPT_FORMAT), w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        kept = [f for f in ckpt_files(out_dir) if f != name][:keep - 1]
        atomic_write_json(manifest, dict(file=name, sha256=w.sha.hexdigest(), format=CKPT_FORMAT,
                                         iter_num=state["iter_num"], model_args=state.get("model_args"),
                                         shas={name: w.sha.hexdigest(), **{f: shas.get(f) for f in kept}}))
    except (OSError, RuntimeError) as e:  # disk full, quota, read-only, I/O error: latest.json is untouched
        if isinstance(e, RuntimeError) and not (w and w.error):
            raise
        e = w.error if w and w.error else e
        for p in (path + ".tmp", manifest + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
        had = f"the previous checkpoint {os.path.join(out_dir, prev['file'])} is intact" if isinstance(prev, dict) \
            else "there is no earlier checkpoint"
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise SystemExit(f"error: could not save checkpoint {path} ({e.strerror or e}); {had}; {fix} or change "
                         f"out_dir, then resume with --init_from=resume") from None
    # keep the newest `keep`; leftovers of a save that was killed (*.tmp) go too. Never the one just named.
    old = ckpt_files(out_dir)[keep:] + [f for f in os.listdir(out_dir) if f.startswith("ckpt-") and
                                        f.endswith(".pt.tmp")]
    for f in old:
        if f != name:
            os.remove(os.path.join(out_dir, f))
    return path


class Unreadable(Exception):
    """A checkpoint file that cannot be used; its message is the one-line reason."""


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path, sha=None):
    """One checkpoint file, verified (sha256, if known) and loaded with weights_only on the CPU."""
    if sha and file_sha256(path) != sha:
        raise Unreadable(f"checkpoint {path} is corrupt or truncated (sha256 mismatch)")
    try:  # on the CPU first: resuming never needs more GPU memory than the run itself
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written by other code, holding pickled code, or (no checksum known) damaged
        raise Unreadable(f"cannot load checkpoint {path} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); only checkpoints written by train.py can be loaded")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise Unreadable(f"{path} is not a format-{CKPT_FORMAT} train.py checkpoint")
    return ckpt


def load_checkpoint(out_dir):
    """The latest checkpoint of out_dir, verified, on the CPU (so resuming needs no extra GPU memory). If the newest
    is damaged, or latest.json is torn or missing, the newest intact one is used, saying so, and latest.json is
    rebuilt to name it: an intact checkpoint is never given up for a damaged neighbour."""
    m, files = read_manifest(out_dir), ckpt_files(out_dir)
    if m is None and not files:
        raise SystemExit(f"error: no checkpoint in {out_dir} (missing latest.json); train one with train.py")
    if isinstance(m, dict) and m.get("format") != CKPT_FORMAT:
        raise SystemExit(f"error: {os.path.join(out_dir, m['file'])} has checkpoint format {m.get('format')}, this "
                         f"code reads {CKPT_FORMAT}")
    shas = dict(m.get("shas") or {}, **{m["file"]: m.get("sha256")}) if isinstance(m, dict) else {}
    order = ([m["file"]] if isinstance(m, dict) else []) + [f for f in files if not isinstance(m, dict) or
                                                            f < m["file"]]
    problems = [] if isinstance(m, dict) else [f"{out_dir}/latest.json is {m or 'missing'}"]
    for name in order:
        path = os.path.join(out_dir, name)
        try:
            if not os.path.isfile(path):
                raise Unreadable(f"checkpoint {path} named by latest.json is missing")
            ckpt = read_checkpoint(path, shas.get(name))
        except Unreadable as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; using {path}, the newest intact checkpoint", file=sys.stderr)
            rebuild_manifest(out_dir, name, ckpt)
        return ckpt
    raise SystemExit(f"error: {'; '.join(problems)}; and {out_dir} holds no older intact checkpoint: restore it, "
                     f"or start the run again in another --out_dir")


def rebuild_manifest(out_dir, name, ckpt):
    """latest.json naming out_dir/name again; a read-only out_dir keeps its damaged one (the loader copes)."""
    sha = file_sha256(os.path.join(out_dir, name))
    try:
        atomic_write_json(os.path.join(out_dir, "latest.json"), dict(
            file=name, sha256=sha, format=CKPT_FORMAT, iter_num=ckpt.get("iter_num"),
            model_args=ckpt.get("model_args"), shas={name: sha}))
    except OSError:
        pass


def manifest_model_args(out_dir):
    """The model_args that out_dir/latest.json names: the model's shape without reading its weights. None if the
    manifest has none (saved by older code) or cannot be read; load_checkpoint says what is wrong with it."""
    try:
        with open(os.path.join(out_dir, "latest.json")) as f:
            args = json.load(f).get("model_args")
    except (OSError, ValueError, AttributeError):
        return None
    return args if isinstance(args, dict) else None


def model_from_checkpoint(ckpt, device="cpu"):
    with torch.device(device):  # built where it will run: on a GPU its random init (overwritten next) is quick
        model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model


def param_names(model, optimizer):
    """The parameter names in the order an optimizer numbers them in its state dicts (that of its param_groups)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def owned_state(model, muon):
    """Muon's state dict under ZeRO-1, keyed by name, whole on rank 0 (empty elsewhere): each weight's momentum (and
    NorMuon's row second moments) from its owner."""
    params = [p for g in muon.param_groups for p in g["params"]]
    stepped = torch.tensor(float(len(muon.state)), device=params[0].device)
    dist.all_reduce(stepped, op=dist.ReduceOp.MAX)  # a process that owns no weight has no state
    sd, names, state = muon.state_dict(), param_names(model, muon), {}
    for name, p in zip(names, params if stepped.item() else []):
        shapes = dict(momentum_buffer=p.shape, **(dict(row_second_moment=p.shape[:1]) if muon.normuon else {}))
        for key, shape in shapes.items():
            buf = muon.state[p][key] if muon.owner[p] == muon.rank else p.new_empty(shape)
            dist.broadcast(buf, src=muon.owner[p])
            if muon.rank == 0:  # the one that writes the checkpoint (as ZeRO's consolidated state above)
                state.setdefault(name, {})[key] = buf.cpu()
    return state, [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]


def full_state_dicts(model, optimizers):
    """The model's and the optimizers' state dicts, whole and on the CPU, whatever the sharding: a checkpoint does
    not depend on how many processes wrote it. The optimizer state is keyed by parameter name, not position, so it
    loads into any sharding (load_optimizer_state). A collective under FSDP and ZeRO: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optimizer = optimizers[0]
    if not hasattr(optimizer, "optim"):  # all but ZeroRedundancyOptimizer (which steps an inner AdamW, .optim)
        return model_state, get_optimizer_state_dict(model, optimizers, options=opts)
    optimizer.consolidate_state_dict(to=0)  # ZeRO's own gather to rank 0 (torch's helper hangs on it)
    sd = optimizer.state_dict() if dist.get_rank() == 0 else dict(state={}, param_groups=[])
    names = param_names(model, optimizer)
    state = {names[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]
    for muon in optimizers[1:]:  # a ZeRO-1 run with optimizer='muon'
        muon_state, muon_groups = owned_state(model, muon)
        state, groups = {**state, **muon_state}, groups + muon_groups
    return model_state, dict(state=state, param_groups=groups)


def load_optimizer_state(model, optimizers, state):
    """Loads full_state_dicts' optimizer state into the optimizers over `model` (plain, DDP'd or FSDP-sharded
    GPT), or into ZeRO, which keeps its rank's part (as Muon under ZeRO-1 does: muon.py)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not hasattr(optimizers[0], "optim"):  # all but ZeroRedundancyOptimizer (which steps an inner AdamW, .optim)
        return set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))
    groups = iter(state["param_groups"])  # the optimizers' groups, one optimizer after the other
    for optimizer in optimizers:
        index = {n: i for i, n in enumerate(param_names(model, optimizer))}
        mine = [next(groups) for _ in optimizer.param_groups]
        optimizer.load_state_dict(dict(state={index[n]: s for n, s in state["state"].items() if n in index},
                                       param_groups=[dict(g, params=[index[n] for n in g["params"]]) for g in mine]))


# ---------------------------------------------------------------------------- a run's out_dir


def find_runs(out_dir):
    """The directories that hold a checkpoint (latest.json) under out_dir, next to it, and under out/
    (two levels deep at most), for the error that says which runs exist."""
    parent = os.path.dirname(os.path.normpath(out_dir)) or "."
    runs = set()
    for root in {out_dir, parent, "out"}:
        if not os.path.isdir(root) or os.path.abspath(root) == os.path.abspath(os.sep):
            continue
        depth = os.path.normpath(root).count(os.sep)
        for d, subdirs, files in os.walk(root):
            if "latest.json" in files:
                rel = os.path.relpath(d)
                runs.add(os.path.abspath(d) if rel.startswith(os.pardir) else rel)
            subdirs[:] = [s for s in subdirs if not s.startswith(".")] if d.count(os.sep) - depth < 2 else []
    return sorted(runs)


def load_tokenizer(out_dir, parent="train one first: python train.py config/small.py"):
    """The tokenizer of a run's out_dir; an out_dir without a checkpoint is an error that lists the runs that have
    one (parent: how such a run is made, when there is none)."""
    if not os.path.isfile(os.path.join(out_dir, "latest.json")):
        runs = find_runs(out_dir)
        if not runs:
            raise SystemExit(f"error: no checkpoint in {out_dir} (missing latest.json), and no run under it or out/ "
                             f"has one; {parent}")
        more = f" and {len(runs) - 8} more" if len(runs) > 8 else ""
        raise SystemExit(f"error: no checkpoint in {out_dir} (missing latest.json); runs with one: "
                         f"{', '.join(runs[:8])}{more}; sample one with: python sample.py --out_dir={runs[0]}")
    return bpe.Tokenizer.load(os.path.join(out_dir, "tokenizer.bpe"))


def load_run(out_dir, device="cpu", tok=None, warm_up=None):
    """Model (eval mode, on device, fp32), tokenizer (tok, or load_tokenizer's), and the checkpoint's other entries
    (its config, stage...) of a run's out_dir, the tokenizer checked to be the checkpoint's. warm_up(model_args),
    if given, runs on this thread while another one reads and verifies the checkpoint (latest.json names
    model_args): sample.py warms the GPU up meanwhile."""
    tok = tok or load_tokenizer(out_dir)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(load_checkpoint, out_dir)  # the checksum and torch.load: disk and CPU
        model_args = manifest_model_args(out_dir)
        if warm_up and model_args:
            warm_up(model_args)
        ckpt = reading.result()
    if tok.hash != ckpt.get("tokenizer_hash"):
        raise SystemExit(f"error: {out_dir}/tokenizer.bpe is not the tokenizer this checkpoint was trained with")
    model = model_from_checkpoint(ckpt, device).eval()
    if model.config.vocab_size < tok.vocab_size:  # the tokenizer could give ids that the model has no row for
        raise SystemExit(f"error: the model in {out_dir} has {model.config.vocab_size} token ids, fewer than its "
                         f"tokenizer's {tok.vocab_size} tokens; the checkpoint is broken: retrain or re-export it "
                         f"with vocab_size >= {tok.vocab_size}")
    return model, tok, {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}


def check_out_dir(out_dir, resume, resume_flag="--init_from=resume"):
    """A run that starts at step 0 (from scratch, or a fine-tune) must not write into another run's out_dir: its
    checkpoints would replace that run's. An out_dir whose run died before its first checkpoint holds nothing to
    keep: starting over there is allowed (open_out_dir restarts its metrics.jsonl)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    if resume or not os.path.isdir(out_dir):
        return
    held = sorted(set(ckpt_files(out_dir)) | ({"latest.json"} & set(os.listdir(out_dir))))
    if held:
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(held[:3])}); continue it with "
                         f"{resume_flag}, or start this one in another --out_dir")


def claim_out_dir(out_dir):
    """One run owns an out_dir at a time: out_dir/lock holds its host and pid. A lock whose process is gone (killed)
    is stale and taken over; the lock goes when this process exits."""
    path, me = os.path.join(out_dir, "lock"), f"{socket.gethostname()} {os.getpid()}"
    try:
        with open(path, "x") as f:
            f.write(me)
    except FileExistsError:
        with open(path) as f:
            other = f.read().strip()
        host, _, pid = other.rpartition(" ")
        if other != me and host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid)):
            raise SystemExit(f"error: {out_dir} is in use by another run (pid {pid}); wait for it to end, or choose "
                             f"another --out_dir") from None
        if other != me and host != socket.gethostname():
            raise SystemExit(f"error: {out_dir} is in use by a run on {host or 'another host'}; if that run is over, "
                             f"delete {path}") from None
        with open(path, "w") as f:
            f.write(me)
    atexit.register(lambda: os.path.exists(path) and open(path).read() == me and os.remove(path))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def open_out_dir(out_dir, tokenizer, resume=True):
    """Makes out_dir and claims it (claim_out_dir), copies the tokenizer file in (as tokenizer.bpe, what load_run
    reads) and returns log(**row), which appends the row to out_dir/metrics.jsonl as one JSON line. A run that
    starts at step 0 (resume=False) starts metrics.jsonl afresh: rows there are of a run that died before saving."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        claim_out_dir(out_dir)
        dst = os.path.join(out_dir, "tokenizer.bpe")
        if not (os.path.exists(dst) and os.path.samefile(tokenizer, dst)):
            shutil.copyfile(tokenizer, dst)
        metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a" if resume else "w")
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir {out_dir} ({e.strerror or e}); make it writable or "
                         f"choose another --out_dir") from None

    def log(**row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    return log


def open_log(cfg, config, tokenizer, world, master):
    """open_out_dir's log(**row) (train.py's) on rank 0 once every rank has checked out_dir, with wandb_log the same
    rows to Weights & Biases too (wandb imported only when asked for); nothing on the other ranks."""
    if world > 1:
        dist.barrier()  # every rank has checked out_dir (check_out_dir) before rank 0 writes into it
    if not master:
        return lambda **row: None
    write = open_out_dir(cfg.out_dir, tokenizer, resume=cfg.init_from == "resume")
    if not cfg.wandb_log:
        return write
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: wandb_log=True needs the wandb package: pip install wandb, or set "
                         "--wandb_log=False") from None
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config)

    def log(**row):
        write(**row)
        wandb.log(row)
    return log



# ---------------------------------------------------------------------------- where a training run's model comes from


def init_model(init_from, out_dir, data_dir, meta, config, *, load_pretrained):
    """Where train.py's model comes from: (model_args, its weights or None, the checkpoint to resume or None).
    scratch: the config's shape, random weights. resume: out_dir's latest checkpoint, optimizer, step and data
    position included. Another run's out_dir (it holds latest.json): that run's weights only, with a fresh
    optimizer and schedule (fine-tuning). A transformers directory, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl:
    the weights of load_pretrained (export.load_pretrained, passed in: export imports this file). The shape comes from the source (a shape key the config sets otherwise is
    refused), the data's tokenizer must be the source's."""
    if init_from == "scratch":
        vocab = config["vocab_size"]
        vocab = -(-meta["vocab_size"] // 128) * 128 if vocab is None else vocab
        if vocab < meta["vocab_size"]:  # (RULES made it an int)
            raise SystemExit(f"error: vocab_size {vocab!r} must be an int >= the tokenizer's {meta['vocab_size']} "
                             f"tokens (or None: the tokenizer's, padded to a multiple of 128)")
        return dict({f.name: config[f.name] for f in fields(GPTConfig)}, vocab_size=vocab), None, None
    if init_from == "resume" and not os.path.isfile(os.path.join(out_dir, "latest.json")) and not ckpt_files(out_dir):
        raise SystemExit(f"error: --init_from=resume, but {out_dir} holds no checkpoint to resume (a run stopped "
                         f"before its first one saved none); start the run without --init_from=resume")
    if init_from == "resume" or os.path.isfile(os.path.join(init_from, "latest.json")):
        ckpt = load_checkpoint(out_dir if init_from == "resume" else init_from)
        if init_from == "resume" and ckpt["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: checkpoint in {out_dir} was trained with another tokenizer than {data_dir}; "
                             f"resume on the same data or start a new out_dir")
        model_args, weights = ckpt["model_args"], ckpt["model"]
        check_shape(model_args, config, out_dir if init_from == "resume" else init_from)
        if init_from == "resume":
            return model_args, weights, ckpt
        same_tokenizer = ckpt["tokenizer_hash"] == meta["tokenizer_hash"]
    else:
        model_args, weights, tok = load_pretrained(init_from)
        check_shape(model_args, config, init_from)
        same_tokenizer = tok.hash == meta["tokenizer_hash"] if tok else assumed_tokenizer(model_args, meta,
                                                                                             init_from, data_dir)
    if not same_tokenizer:
        raise SystemExit(f"error: {init_from} was trained with another tokenizer than {data_dir} was made with; "
                         f"fine-tune on data prepared with its tokenizer (prepare.py --tokenizer=FILE), or pick "
                         f"such a --dataset")
    return dict(model_args, dropout=config["dropout"]), weights, None  # fine-tuning may set its own dropout


def check_shape(model_args, config, source):
    """A shape key (a GPTConfig field but dropout) that the config sets to something else than the source's model
    has is refused: the model cannot take it, and training the source's shape instead would be a silent surprise.
    Keys left at their defaults take the source's values; block_size may be shorter than the model's."""
    differ = {f.name: model_args[f.name] for f in fields(GPTConfig) if f.name not in ("dropout", "block_size") and
              config[f.name] not in (f.default if f.name != "vocab_size" else None, model_args[f.name])}
    if differ:
        raise SystemExit(f"error: the model in {source} has {', '.join(f'{k}={v!r}' for k, v in differ.items())}, "
                         f"not {', '.join(f'{k}={config[k]!r}' for k in differ)} as set; drop "
                         f"{', '.join('--' + k for k in differ)} (the shape comes from {source}) or start a new run "
                         f"in another --out_dir")
    if config["block_size"] > model_args["block_size"]:
        raise SystemExit(f"error: block_size {config['block_size']} > the model's {model_args['block_size']}")


def assumed_tokenizer(model_args, meta, init_from, data_dir):
    """A Hugging Face directory without tokenizer.json: its tokenizer is taken to be the data's if the model's vocab
    is the data's (padded to a multiple of 128 as train.py pads it), saying so; any other vocab cannot be it."""
    vocab, data_vocab = model_args["vocab_size"], meta["vocab_size"]
    if vocab not in (data_vocab, -(-data_vocab // 128) * 128):
        raise SystemExit(f"error: {init_from} has no tokenizer.json, and its {vocab}-token vocab is not that of "
                         f"{data_dir}'s {data_vocab}-token tokenizer; put the tokenizer.json it was trained with in "
                         f"{init_from}, or fine-tune on data prepared with that tokenizer")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"note: {init_from} has no tokenizer.json; assuming it was trained with {data_dir}'s tokenizer "
              f"({meta['tokenizer']}, {data_vocab} tokens), which its {vocab}-token vocab fits")
    return True


def build_model(model_args, weights, seed, device):
    """The GPT of model_args on device: the given weights, or random ones, the same on every rank (seeded)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(device)


def restore_run(run, ckpt, model, optimizers, scaler):
    """The loop's counters on run: from a resumed run's checkpoint (its optimizer and scaler state loaded too), or
    fresh ones for a run that starts at step 0. The guard (faults.py) lives on the device."""
    if ckpt is None:
        run.iter_num, run.best_val_loss, run.data, guard = 0, float("inf"), dict(epoch=0, pos=0), None
        run.end, run.evals_since_best = None, 0
    else:
        load_optimizer_state(model, optimizers, ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_val_loss, run.data, guard = (ckpt["iter_num"], ckpt["best_val_loss"], ckpt["data"],
                                                            ckpt.get("guard"))
        run.end, run.evals_since_best = ckpt.get("end"), ckpt.get("evals_since_best", 0)  # train.plateau_end's
    guard = torch.zeros(len(GUARD_FIELDS)) if guard is None else guard
    run.guard = torch.cat([guard, torch.zeros(len(GUARD_FIELDS) - len(guard))]).to(run.device)  # older: fewer fields
    run.bad_seen, run.start_iter, run.stopped = run.guard[GUARD_FIELDS.index("total")].item(), run.iter_num, False
