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
From Python: plot.curves({"baseline": rows, "recipe": rows}, "val.png") draws val loss against wall time.
"""
import json
import os
import sys

from configurator import configure

# -----------------------------------------------------------------------------
out = "curves.png"          # the image file to write (.png, .pdf, .svg: by matplotlib's name for it)
labels = ""                 # comma-separated legend labels, one per run ("" = the runs' directory names)
title = ""                  # the figure's title ("" = none)
# -----------------------------------------------------------------------------


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
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    draw(axes[0, 0], runs, "step", "val_loss", per_step, train="loss")
    draw(axes[0, 1], runs, "tokens", "val_loss", per_step, train="loss")
    draw(axes[1, 0], runs, "elapsed_s", "val_loss", per_step, train="loss", xlabel="wall time (s)")
    draw(axes[1, 1], runs, "step", "lr")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(runs, path, x="elapsed_s", y="val_loss", title=""):
    """One panel: y (default val loss) against x (default wall time, the rows' elapsed_s; or any row key: wall,
    tokens, step) for several runs, {label: list of metrics rows}, e.g. a speedrun's baseline against its recipe.
    Writes the image to path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax, runs, x, y, xlabel="wall time (s)" if x in ("elapsed_s", "wall") else x)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    runs = {name: read_metrics(p) for name, p in zip(names, paths)}
    per_step = {name: tokens_per_step(p) for name, p in zip(names, paths)}
    plot_runs(runs, out, per_step, title)
    print(f"wrote {out}: {', '.join(f'{n} ({len(r)} rows)' for n, r in runs.items())}")


if __name__ == "__main__":
    main()
