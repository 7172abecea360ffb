"""Which recipe learns most per second: GPT-2 + AdamW against the Qwen3 decoder with AdamW and Muon,
and the default against its fast variants (bf16 autocast, torch.compile) and its next steps (ReLU^2,
batch size / learning rate).

    # a slice of zhwiki with the CPU path's 8k tokenizer, into ignored folders (about 1 minute)
    python tokenizer.py --input ../shared/data/zhwiki/zhwiki-00.jsonl --out data/tokenizer_recipe \\
        --vocab_size 8192 --max_chars 3000000
    python data/prepare.py --input ../shared/data/zhwiki/zhwiki-00.jsonl --out data/processed_recipe \\
        --block_size 256 --tokenizer data/tokenizer_recipe --pack
    python bench/bench_recipe.py --data data/processed_recipe --seconds 150

Design:
- Every recipe trains the CPU preset's model size (config/train_config_cpu.py: 4 layers, 6 heads,
  192 wide, batch 16 x 256 tokens) on the same data in the same order (same seed), through
  train.py's own step (`train_step`, `next_batches`, `lr_at`), and is scored on the same
  validation blocks in bits per character (`data_utils.evaluate_blocks`).
- All recipes train in ONE process, round-robin one step each, and each recipe's clock counts
  only its own steps: load from other processes on a shared machine slows all recipes alike.
  When the machine is so oversubscribed that wall time is mostly waiting for a core, `--clock cpu
  --threads 1` counts the process's CPU time instead: the wall time the step would take alone.
- Each recipe gets the same wall-clock budget of training (`--seconds`). A schedule needs its
  length in advance, so the first `--calibrate` steps of each recipe (trained, and counted in its
  time) measure its step time; its max_iters is then the budget divided by that time.
- Validation every `--eval_every` steps and at the end; evaluation time is not training time.
- Variants with `dtype` train under `torch.autocast` and are validated under it; with `compile`
  they step a `torch.compile`d model (validated eager, same weights). The compiler's warm-up falls
  in the first step and counts in the budget (TORCHINDUCTOR_COMPILE_THREADS=1 keeps it in this
  process, so `--clock cpu` sees it); the budget's steps are planned from the later steps' median.
- Output: a markdown table (final bpc, steps, seconds; the time each recipe first reaches the
  first recipe's final bpc; bpc at the fewest steps any recipe took, i.e. at equal steps), a JSON
  of every curve and a PNG of val bpc against training seconds and against steps.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# torch.compile's workers would run in other processes, out of reach of `--clock cpu`: compile here
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from data_utils import BlockData, atomic_write, evaluate_blocks, load_meta  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SHAPE = dict(n_layer=4, n_head=6, n_embd=192, dropout=0.0)
BASE = dict(batch_size=16, gradient_accumulation_steps=1, sampling="random", learning_rate=2e-3, min_lr=2e-4,
            warmup_iters=10, lr_decay_iters=None, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
            optimizer="adamw", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, lr_schedule="cosine",
            decay_frac=0.3)
DEFAULT = dict(arch="qwen3", optimizer="muon", lr_schedule="wsd", tie_embeddings=False)
RECIPES = {
    "gpt2 + adamw (old default)": dict(arch="gpt2"),
    "qwen3 + adamw": dict(arch="qwen3"),
    "qwen3 + muon": dict(arch="qwen3", optimizer="muon"),
    "qwen3 + muon + wsd + untied": DEFAULT,
    # issue 20: the default with bf16 autocast and/or torch.compile (`dtype`, `compile` are runtime keys)
    "default + bf16": dict(DEFAULT, dtype="bfloat16"),
    "default + compile": dict(DEFAULT, compile=True),
    "default + compile + bf16": dict(DEFAULT, compile=True, dtype="bfloat16"),
    # the next step of the recipe: the MLP, and batch size / learning rate (Muon's and AdamW's scaled together)
    "default + relu2": dict(DEFAULT, mlp_act="relu2"),
    "default batch 8 lr x0.7": dict(DEFAULT, batch_size=8, learning_rate=1.4e-3, muon_lr=0.014, min_lr=1.4e-4),
    "default batch 32 lr x1.4": dict(DEFAULT, batch_size=32, learning_rate=2.8e-3, muon_lr=0.028, min_lr=2.8e-4),
    "default lr x2": dict(DEFAULT, learning_rate=4e-3, muon_lr=0.04, min_lr=4e-4),
}
MODEL_KEYS = ("arch", "tie_embeddings", "n_kv_head", "mlp_act")
RUNTIME_KEYS = ("dtype", "compile")


class Recipe:
    def __init__(self, name, overrides, meta, data_dir, seed):
        self.name = name
        self.cfg = SimpleNamespace(**{**BASE, **{k: v for k, v in overrides.items()
                                                 if k not in MODEL_KEYS + RUNTIME_KEYS}}, max_iters=10**9)
        vocab = math.ceil(meta["vocab_size"] / 64) * 64
        torch.manual_seed(seed)
        model_args = {k: v for k, v in overrides.items() if k in MODEL_KEYS}
        self.model = GPT(GPTConfig(block_size=meta["block_size"], vocab_size=vocab,
                                   bias=model_args.get("arch") != "qwen3", **SHAPE, **model_args))
        c = self.cfg
        self.optimizer = self.model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), "cpu",
                                                         c.optimizer, c.muon_lr, c.muon_momentum, c.muon_weight_decay)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.data = BlockData(data_dir, "train", seed)
        self.rng = np.random.default_rng(seed)  # the same draws for every recipe
        self.steps, self.seconds, self.step_times, self.curve = 0, 0.0, [], []
        self.clock = time.perf_counter
        dtype = overrides.get("dtype", "float32")
        ctx = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=getattr(torch, dtype))
        self.rt = SimpleNamespace(world=1, rank=0, ddp=False, device="cpu", compile=overrides.get("compile", False),
                                  ctx=ctx)
        self.step_model = torch.compile(self.model) if self.rt.compile else self.model

    def step(self):
        lr = train.lr_at(self.steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        start = self.clock()
        batches = train.next_batches(self.data, self.cfg, self.rt, self.rng)
        loss, count, _ = train.train_step(self.step_model, batches, self.optimizer, self.scaler, self.cfg, self.rt)
        loss = float(loss / count)  # a host sync, so the step is over when the clock stops
        elapsed = self.clock() - start
        self.steps += 1
        self.seconds += elapsed
        self.step_times.append(elapsed)
        return loss

    @property
    def done(self):
        return self.steps >= self.cfg.max_iters


def reach_time(curve, target):
    """Training seconds at which the curve first reaches `target` bpc (linear between evaluations)."""
    for (s0, _, b0), (s1, _, b1) in zip(curve, curve[1:]):
        if b1 <= target:
            return s0 + (s1 - s0) * (b0 - target) / (b0 - b1) if b0 > target else s0
    return None


def bpc_at(curve, x, axis=0):
    """Val bpc at `x` training seconds (axis 0) or steps (axis 1), interpolated (None past the curve's end)."""
    xs, ys = [c[axis] for c in curve], [c[2] for c in curve]
    return float(np.interp(x, xs, ys)) if x <= xs[-1] + 1e-9 else None


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for name, curve in results.items():
        axes[0].plot([c[0] for c in curve], [c[2] for c in curve], "o-", markersize=3, label=name)
        axes[1].plot([c[1] for c in curve], [c[2] for c in curve], "o-", markersize=3, label=name)
    for ax, xlabel in zip(axes, ("training seconds (each recipe's own steps)", "steps")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per character")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("same data, model size and time budget (CPU preset)")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compare training recipes at equal wall-clock time on the CPU preset.")
    ap.add_argument("--data", default="data/processed_recipe",
                    help="a data/prepare.py folder (block 256, 8k tokenizer)")
    ap.add_argument("--seconds", type=float, default=150, help="training seconds per recipe (of --clock)")
    ap.add_argument("--calibrate", type=int, default=6, help="steps per recipe that measure its step time")
    ap.add_argument("--eval_every", type=int, default=20, help="steps between validations")
    ap.add_argument("--val_blocks", type=int, default=96)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    ap.add_argument("--out", default="bench/recipe_results.json")
    ap.add_argument("--png", default="docs/recipe_bench.png")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what a recipe's seconds are: wall-clock, or this process's CPU time (with --threads 1, "
                         "the wall time of a quiet machine; use it when the machine is oversubscribed)")
    ap.add_argument("--batch_size", type=int, default=BASE["batch_size"],
                    help="blocks per step (the CPU preset's 16; fewer gives more steps on a crowded machine)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps", type=int, default=None,
                    help="give every recipe this many steps instead of a time budget (equal steps)")
    ap.add_argument("--early_evals", default="",
                    help="comma-separated extra steps to validate at (slow recipes end after few steps)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 avoids waiting on descheduled peers on a crowded machine)")
    args = ap.parse_args(argv)
    args.early_evals = {int(x) for x in args.early_evals.split(",") if x}
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = load_meta(args.data)
    tok = load_tokenizer(meta["tokenizer"])
    val = BlockData(args.data, "val", args.seed)
    val_idx = np.sort(np.random.default_rng(args.seed).choice(val.n_blocks, min(args.val_blocks, val.n_blocks),
                                                              replace=False))
    BASE["batch_size"] = args.batch_size
    recipes = [Recipe(name, RECIPES[name], meta, args.data, args.seed) for name in args.recipes.split(",")]
    for r in recipes:
        r.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"{args.clock} clock; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.data}: block {meta['block_size']}, "
          f"vocab {meta['vocab_size']}; batch {args.batch_size}; {args.seconds:g} s per recipe")

    def evaluate(r):  # the eager model, in the recipe's precision (evaluation is not training time)
        bpc = evaluate_blocks(r.model, val, val_idx, tok, 16, "cpu", r.rt.ctx)["bpc"]
        r.curve.append((round(r.seconds, 2), r.steps, bpc))
        print(f"  {r.name}: step {r.steps}, {r.seconds:.1f} s, val bpc {bpc:.4f}", flush=True)

    for r in recipes:
        evaluate(r)
    for _ in range(args.calibrate):
        for r in recipes:
            r.step()
            if r.steps in args.early_evals:
                evaluate(r)
    for r in recipes:
        # the first step (compilation, warm-up) is spent already and counted; the rest fills the budget
        # at the median of the later steps
        per_step = statistics.median(r.step_times[1:] or r.step_times)
        r.cfg.max_iters = args.steps or r.steps + max(0, int((args.seconds - r.seconds) / per_step))
        print(f"{r.name}: first step {r.step_times[0]:.1f} s, then {per_step:.3f} s/step -> max_iters "
              f"{r.cfg.max_iters}")
        if r.done and r.curve[-1][1] != r.steps:  # the budget went in calibration: its final point now
            evaluate(r)
    while not all(r.done for r in recipes):
        for r in recipes:
            if not r.done:
                loss = r.step()
                if not math.isfinite(loss):
                    raise SystemExit(f"{r.name}: the loss is not finite at step {r.steps}")
                if r.steps % args.eval_every == 0 or r.steps in args.early_evals or r.done:
                    evaluate(r)

    results = {r.name: r.curve for r in recipes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, "w") as f:
        json.dump({"seconds": args.seconds, "steps": args.steps, "clock": args.clock, "data": args.data,
                   "threads": torch.get_num_threads(), "curves": results,
                   "first_step_s": {r.name: r.step_times[0] for r in recipes},
                   "median_step_s": {r.name: statistics.median(r.step_times[1:] or r.step_times) for r in recipes}},
                  f, indent=1)
    plot(results, args.png)
    print_table(recipes, statistics)
    print(f"\nwrote {args.out} and {args.png}")


def print_table(recipes, statistics):
    """The markdown table: against the first recipe's final bpc and time, and at the fewest steps any
    recipe took (equal steps: what a precision or compiler costs in quality, apart from speed)."""
    base = recipes[0]
    target, base_time = base.curve[-1][2], base.seconds
    few = min(r.steps for r in recipes)
    print(f"\n| recipe | steps | first step s | s/step (median) | train s | final val bpc | bpc at step {few} "
          f"| bpc at {base_time:.0f} s | s to reach {target:.3f} bpc ({base.name}'s final) | fraction of its time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recipes:
        reach = reach_time(r.curve, target)
        at, at_step = bpc_at(r.curve, base_time), bpc_at(r.curve, few, axis=1)
        per_step = statistics.median(r.step_times[1:] or r.step_times)
        print(f"| {r.name} | {r.steps} | {r.step_times[0]:.1f} | {per_step:.3f} "
              f"| {r.seconds:.0f} | {r.curve[-1][2]:.4f} | {at_step:.4f} "
              f"| {'-' if at is None else f'{at:.4f}'} | {'not reached' if reach is None else f'{reach:.0f}'} "
              f"| {'-' if reach is None else f'{reach / base_time:.2f}'} |")


if __name__ == "__main__":
    main()
