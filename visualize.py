"""Plot training curves of one or more runs from their `log.jsonl` into a PNG.

    python visualize.py out/pretrain out/sft -o loss.png --smooth 0.9
    python visualize.py out/a out/b --x time     # against training seconds: runs of different speed

Design:
- Panels: loss against iterations (or, with `--x time`, against the training seconds each line's
  `time` field records, so a faster recipe is seen to be faster), loss against tokens seen (when the
  log has a `tokens` field), learning rate against the same x as the first panel. Train loss is
  drawn raw (faint) and EMA-smoothed (solid); val loss as dots joined by a dashed line in the run's
  colour, so several runs overlay readably.
- The EMA is bias-corrected (as TensorBoard's smoothing), so the first points are not dragged
  towards zero.
- A resumed run may log an iteration twice (it restarts from its last checkpoint); the later line
  wins, which is the history the saved model actually has.
- Malformed lines (a half-written last line, broken JSON, non-numeric values) are counted and
  skipped via `data_utils.iter_jsonl`, never fatal; lines that are neither training nor evaluation
  lines (other events) are ignored.
- Agg backend (no display needed) and an atomic write: an interrupted run leaves no half PNG.
  `plot_runs` is the API evaluations/report.py reuses.
"""
import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_utils import BadLines, atomic_write, iter_jsonl  # noqa: E402

TRAIN_FIELDS, EVAL_FIELDS = ("iter", "loss"), ("iter", "val_loss")


def _numeric(obj, fields):
    return all(isinstance(obj.get(f), (int, float)) and not isinstance(obj.get(f), bool)
               and math.isfinite(obj[f]) for f in fields)


def read_log(run_dir, bad=None):
    """(train lines, eval lines) of a run directory (or a log.jsonl path), each sorted by iter."""
    path = Path(run_dir)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no training log at {path}")
    bad = bad if bad is not None else BadLines()
    train, evals = {}, {}
    for lineno, obj in iter_jsonl(path, bad, required=()):
        if "val_loss" in obj:
            target, fields = evals, EVAL_FIELDS
        elif "loss" in obj:
            target, fields = train, TRAIN_FIELDS
        else:
            continue
        if not _numeric(obj, fields):
            bad.add(f"{path}:{lineno}", f"non-numeric {' / '.join(fields)}")
            continue
        target[obj["iter"]] = obj
    return [train[i] for i in sorted(train)], [evals[i] for i in sorted(evals)]


def ema(values, smooth):
    """Bias-corrected exponential moving average; smooth=0 returns the values unchanged."""
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = smooth * avg + (1 - smooth) * v
        out.append(avg / (1 - smooth ** n) if smooth > 0 else v)
    return np.array(out)


def _labels(run_dirs):
    """Directory names, or full paths where two runs share a name."""
    names = [Path(d).resolve().name if Path(d).is_dir() else Path(d).resolve().parent.name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


X_LABELS = {"iter": "iteration", "tokens": "tokens seen", "time": "training seconds"}


def x_values(train, evals, x_kind):
    """(x of the train lines, x of the eval lines) for x_kind 'iter', 'tokens' or 'time'; None when
    the train lines have no such field. An eval line without the field is placed by interpolating
    over the train lines' (iter, x)."""
    iters = np.array([t["iter"] for t in train], dtype=float)
    val_iters = np.array([e["iter"] for e in evals], dtype=float)
    if x_kind == "iter":
        return iters, val_iters
    known = [(t["iter"], t[x_kind]) for t in train if _numeric(t, (x_kind,))]
    if not known:
        return None
    k_iter, k_x = (np.array(v, dtype=float) for v in zip(*known))
    x = np.interp(iters, k_iter, k_x)
    val_x = np.array([e[x_kind] if _numeric(e, (x_kind,)) else np.interp(e["iter"], k_iter, k_x) for e in evals],
                     dtype=float)
    return x, val_x


def plot_runs(run_dirs, path, smooth=0.9, title=None, x="iter"):
    """Draw the runs' curves into the PNG `path`; return {label: {"train", "eval", "skipped"}} counts.
    `x`: 'iter' or 'time', the x axis of the loss and learning-rate panels."""
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), not {smooth}")
    if x not in ("iter", "time"):
        raise ValueError(f"x must be 'iter' or 'time', not {x!r}")
    runs, summary = [], {}
    for label, run_dir in zip(_labels(run_dirs), run_dirs):
        bad = BadLines()
        train, evals = read_log(run_dir, bad)
        runs.append((label, train, evals))
        summary[label] = {"train": len(train), "eval": len(evals), "skipped": bad.count}
    if x == "time" and not any(x_values(train, evals, "time") for _, train, evals in runs):
        raise ValueError("no run's log has a time field to plot against (train.py writes one on every line)")
    with_tokens = any(any("tokens" in t for t in train) for _, train, _ in runs)
    n_panels = 3 if with_tokens else 2
    fig, axes = plt.subplots(n_panels, 1, figsize=(9, 3.2 * n_panels), constrained_layout=True)
    loss_axes = [(axes[0], x)] + ([(axes[1], "tokens")] if with_tokens else [])
    lr_ax = axes[-1]
    for colour, (label, train, evals) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs):
        loss = np.array([t["loss"] for t in train], dtype=float)
        val_loss = np.array([e["val_loss"] for e in evals], dtype=float)
        for ax, x_kind in loss_axes:
            xs = x_values(train, evals, x_kind)
            if xs is None:
                continue
            train_x, val_x = xs
            if len(loss):
                ax.plot(train_x, loss, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(train_x, ema(loss, smooth), color=colour, linewidth=1.6, label=f"{label} train")
            if len(val_loss):
                ax.plot(val_x, val_loss, "o--", color=colour, markersize=3.5, linewidth=1, label=f"{label} val")
        with_lr = [t for t in train if isinstance(t.get("lr"), (int, float))]
        xs = x_values(with_lr, [], x)
        if with_lr and xs is not None:
            lr_ax.plot(xs[0], [t["lr"] for t in with_lr], color=colour, label=label)
    for ax, x_kind in loss_axes:
        ax.set_xlabel(X_LABELS[x_kind])
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    lr_ax.set_xlabel(X_LABELS[x])
    lr_ax.set_ylabel("learning rate")
    lr_ax.grid(alpha=0.3)
    if len(runs) > 1 and lr_ax.has_data():
        lr_ax.legend(fontsize=8)
    axes[0].set_title(title or f"training curves (EMA smoothing {smooth})")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plot loss and learning-rate curves from runs' log.jsonl.")
    ap.add_argument("runs", nargs="+", help="run directories (or log.jsonl files)")
    ap.add_argument("-o", "--out", default="loss.png", help="PNG to write")
    ap.add_argument("--smooth", type=float, default=0.9, help="EMA factor for the train loss, in [0, 1)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--x", choices=("iter", "time"), default="iter",
                    help="x axis: iterations, or training seconds (compares runs of different speed)")
    args = ap.parse_args(argv)
    try:
        summary = plot_runs(args.runs, args.out, args.smooth, args.title, args.x)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    for label, counts in summary.items():
        skipped = f", skipped {counts['skipped']} malformed lines" if counts["skipped"] else ""
        print(f"{label}: {counts['train']} train points, {counts['eval']} eval points{skipped}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
