"""
Draw the learning curves of one or more training runs from their metrics.jsonl, overlaid, one colour per run.

    python plot.py out/small --out=curves.png
    python plot.py out/small out/llama-small --labels=gpt2,llama --out=compare.png   # a baseline against a recipe
    python plot.py out/run/metrics.jsonl --title="my run"                           # a metrics file works too

A run is a directory holding metrics.jsonl (train.py's out_dir) or a .jsonl file; arguments ending in .py are
config files, and --key=value sets a key, as for every script. Panels: loss against steps, tokens and wall time (training loss as a
thin line, evaluations' val loss as dots), and the learning rate. Tokens come from each row's `tokens` or, when the
rows have none, from step x tokens per step of the run's checkpoint config; wall time from each row's `elapsed_s`.
A panel none of the runs has data for says so. Needs matplotlib (pip install matplotlib), imported only here.

    python plot.py --table out/speedrun/*/        # a table instead (no matplotlib needed): mean +- std over seeds

--table groups the runs by name, a directory's name less a seed suffix (recipe-s0, recipe-s1: recipe), and prints
per name: the best val loss, the seconds and steps to `target` (from launch when runs/speedrun.sh wrote the run's
launch time, else from train.py's start), the first step's seconds, the wall time, and the last evaluation's
post-training scores (rlhf.py's acc, reward, KL, a reward model's pairwise accuracy).
"""
import json
import os
import re
import statistics
import sys

from configurator import configure

# -----------------------------------------------------------------------------
out = "curves.png"          # the image file to write (.png, .pdf, .svg: by matplotlib's name for it)
labels = ""                 # comma-separated legend labels, one per run ("" = the runs' directory names)
title = ""                  # the figure's title ("" = none)
table = False               # print a table of the runs instead of drawing them: mean +- std over each name's seeds
target = 0.0                # --table: the val loss to reach; 0 = the mean best val loss of the runs named baseline
# -----------------------------------------------------------------------------
RULES = dict(target=(0.0, None))


def pyplot():
    """matplotlib's pyplot, drawing to files only (no window): an optional dependency, so a one-line error."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot.py needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path):
    """The rows of a metrics.jsonl (or of the one in directory path), in order. A resumed run logs again the
    steps after its checkpoint: of rows of one kind (training or evaluation) with the same steps, the later
    ones are kept. A half-written last line (a run killed mid-write) is left out."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isdir(path) and not path.endswith(".jsonl"):
        raise SystemExit(f"error: {path} is not a directory; a run is a train.py out_dir (out/small) or a .jsonl file")
    if not os.path.isfile(file):
        raise SystemExit(f"error: no metrics in {path} (missing {file}); a run is a train.py out_dir or a .jsonl file")
    with open(file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):
                continue
            raise SystemExit(f"error: {file}:{i} is not valid JSON; fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise SystemExit(f"error: {file}:{i} is not a metrics row (a JSON object with a step)")
        kind = "val_loss" in row
        # a resumed run: drop the earlier rows of this kind that it is about to log again
        rows = [r for r in rows if ("val_loss" in r) != kind or r["step"] < row["step"]]
        rows.append(row)
    return rows


def tokens_per_step(run_dir):
    """Tokens per optimizer step from the run's latest checkpoint config (batch_size x block_size x
    gradient_accumulation_steps, the latter summed over processes), or None when there is none to read."""
    manifest = os.path.join(run_dir, "latest.json") if os.path.isdir(run_dir) else ""
    if not os.path.isfile(manifest):
        return None
    import torch
    try:
        with open(manifest) as f:
            ckpt_path = os.path.join(run_dir, json.load(f)["file"])
        # mmap: only the pages of the config are read, not the weights
        config = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
        return config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
        return None


def x_values(rows, x, per_step=None):
    """(rows that have a value for axis x, their x values). x: 'step', 'tokens' (a row's own, else step x
    per_step) or 'elapsed_s'."""
    if x == "tokens" and per_step and not any("tokens" in r for r in rows):
        return rows, [r["step"] * per_step for r in rows]
    kept = [r for r in rows if x in r]
    return kept, [r[x] for r in kept]


def draw(ax, runs, x, y, per_step=None, train=None, xlabel=None):
    """On ax, y against x for each run ({label: rows}), one colour per run: the evaluation rows (those with y)
    as dots and a line; with train="loss", the training rows' loss too, as a thin line. Returns whether anything
    was drawn; else ax says that none of the runs has x."""
    drawn = False
    for i, (label, rows) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        if train:
            kept, xs = x_values([r for r in rows if train in r], x, (per_step or {}).get(label))
            if kept:
                ax.plot(xs, [r[train] for r in kept], color=colour, lw=0.8, alpha=0.5, label=f"{label} (training {train})")
                drawn = True
        kept, xs = x_values([r for r in rows if y in r], x, (per_step or {}).get(label))
        if kept:
            ax.plot(xs, [r[y] for r in kept], "o-", color=colour, ms=3, lw=1.5, label=f"{label} ({y.replace('_', ' ')})")
            drawn = True
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("loss (nats/token)" if train else y.replace("_", " "))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no run has {x} in its metrics", ha="center", va="center", transform=ax.transAxes)
    return drawn


def plot_runs(runs, path, per_step=None, title=""):
    """The four panels for runs ({label: rows}): loss against steps, tokens and wall time, and the learning rate.
    per_step: {label: tokens per step} for runs whose rows have no `tokens`. Writes the image to path."""
    plt = pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1][1:].lower()
    if ext and ext not in formats:  # (no extension: matplotlib writes a PNG)
        raise SystemExit(f"error: --out={path}: matplotlib cannot write .{ext} images; end the name in one of: "
                         f"{', '.join(sorted(formats))}")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    draw(axes[0, 0], runs, "step", "val_loss", per_step, train="loss")
    draw(axes[0, 1], runs, "tokens", "val_loss", per_step, train="loss")
    draw(axes[1, 0], runs, "elapsed_s", "val_loss", per_step, train="loss", xlabel="wall time (s)")
    draw(axes[1, 1], runs, "step", "lr")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror or e}); give an --out in a directory you can "
                         f"write to") from None
    plt.close(fig)
    return path

# --table's columns after the run's name and seed count: {key: header}; the post-training scores come from the last row
# that has any of them (rlhf.py's final evaluation)
COLUMNS = {"s_to_target": "s to target", "steps_to_target": "steps", "best_val": "best val",
           "first_step_s": "first step s", "wall_s": "wall s", "acc_sampled": "acc(sampled)",
           "acc_greedy": "acc(greedy)", "reward": "reward", "kl": "KL", "val_accuracy": "RM pair acc"}
SCORES = ("acc_sampled", "acc_greedy", "reward", "kl", "val_accuracy")


def mean_std(xs):
    """'mean +- std' of xs; a single value alone; '-' for none."""
    if not xs:
        return "-"
    return f"{xs[0]:.4g}" if len(xs) == 1 else f"{statistics.mean(xs):.4g} +- {statistics.stdev(xs):.2g}"


def run_figures(path, target):
    """One run's figures for --table (a key is left out where the run has no value). Seconds count from the launch
    time in path/launch (unix seconds, as runs/speedrun.sh writes it) when there is one, else from train.py's start."""
    rows = read_metrics(path)
    launch = os.path.join(path, "launch")
    t0 = float(open(launch).read()) if os.path.isfile(launch) else None
    seconds = lambda r: r["time"] - t0 if t0 is not None and "time" in r else r.get("elapsed_s")  # noqa: E731
    evals = [r for r in rows if "val_loss" in r]
    last = next((r for r in reversed(rows) if any(k in r for k in SCORES)), {})
    fig = {k: last[k] for k in SCORES if k in last}
    fig.update(best_val=min((r["val_loss"] for r in evals), default=None), wall_s=seconds(rows[-1]) if rows else None,
               first_step_s=next((r["first_step_s"] for r in rows if "first_step_s" in r), None))
    hit = next((r for r in evals if r["val_loss"] <= target), None) if target else None
    if hit:
        fig.update(s_to_target=seconds(hit), steps_to_target=hit["step"])
    return {k: v for k, v in fig.items() if v is not None}


def print_table(paths, target=0.0):
    """The --table of the runs at paths, one line per name (a directory's name less its -s<seed>), in order; with a
    target (or runs named baseline: their mean best val loss), the time to it and its ratio to the baseline's."""
    names = [re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(p))) for p in paths]
    best = [run_figures(p, 0).get("best_val") for p, n in zip(paths, names) if n == "baseline"]
    if None in best and not target:
        raise SystemExit("error: a baseline run has no val loss to make the target of; pass --target=LOSS")
    if target or best:
        print(f"target val loss {target:.4f}" if target else
              f"target val loss {statistics.mean(best):.4f} (the baseline's best, mean of {len(best)} seeds)")
        target = target or statistics.mean(best)
    groups = {}
    for name, p in zip(names, paths):
        groups.setdefault(name, []).append(run_figures(p, target))
    cols = [k for k in COLUMNS if any(k in f for figs in groups.values() for f in figs) or
            (target and k == "s_to_target")]
    base = [f["s_to_target"] for f in groups.get("baseline", []) if "s_to_target" in f]
    widths = [max(map(len, groups)) + 2, 7] + [16] * len(cols) + [12] * bool(base)

    def line(cells):  # the name left-aligned, the figures right-aligned
        return " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(["run", "seeds", *(COLUMNS[k] for k in cols), "vs baseline"]))
    for name, figs in groups.items():
        hit = [f["s_to_target"] for f in figs if "s_to_target" in f]
        cells = [name, f"{len(hit)}/{len(figs)}" if target else str(len(figs)),
                 *(mean_std([f[k] for f in figs if k in f]) for k in cols)]
        ratio = [f"{statistics.mean(hit) / statistics.mean(base):.2f}x" if hit else "-"] if base else []
        print(line(cells + ratio))


def main():
    # a config file ends in .py; every other bare argument is a run (an out_dir or a .jsonl)
    paths = [a for a in sys.argv[1:] if not a.startswith("-") and not a.endswith(".py")]
    configure(globals(), [a for a in sys.argv[1:] if a not in paths])
    if not paths:
        raise SystemExit("error: give one or more runs: python plot.py out/small [out/other ...] --out=curves.png")
    if labels:
        names = labels.split(",")
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise SystemExit(f"error: --labels={labels} gives {len(names)} labels for {len(paths)} runs; give one "
                             f"distinct label per run, comma-separated")
    else:
        names = [os.path.basename(os.path.normpath(p)) for p in paths]
        names = names if len(set(names)) == len(names) else paths  # runs of the same name: their paths
    if table:
        return print_table(paths, target)
    runs = {name: read_metrics(p) for name, p in zip(names, paths)}
    empty = [p for p, rows in zip(paths, runs.values()) if not rows]
    if empty:  # an empty figure would look like a plotting bug
        raise SystemExit(f"error: {', '.join(empty)} has no metrics rows yet (the run has not logged a step); "
                         f"plot it once it has")
    per_step = {name: tokens_per_step(p) for name, p in zip(names, paths)}
    plot_runs(runs, out, per_step, title)
    print(f"wrote {out}: {', '.join(f'{n} ({len(r)} rows)' for n, r in runs.items())}")


if __name__ == "__main__":
    main()
