"""Training tokens/s of the CPU preset's model: eager or compiled, float32 or bf16 autocast.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/bench_speed.py --rounds 5 --steps 4 --threads 1

Design:
- One process, one torch thread, the four variants built from the same seed and stepped in turn
  (`--steps` steps of each variant per round, `--rounds` rounds), so load from other processes on a
  shared machine falls on all of them alike; tokens/s is the median over rounds.
- Each step is train.py's own (`train_step` with the masked loss, Muon + AdamW as the preset), on
  random token ids of the data's shape (block 256, vocabulary 8192): speed does not depend on
  what the tokens are, so no data set is needed.
- The clock is the process's CPU time (`--clock cpu`, the default): on a machine shared with other
  jobs it is the time the step would take on a quiet core. With TORCHINDUCTOR_COMPILE_THREADS=1 the
  compiler works in this process, so its warm-up is counted too (its worker processes are not).
- "warm-up" is the time of each variant's first `--warmup` steps (compilation for the compiled
  ones); those steps are not in the median.
- `--generation RUN`: instead, the run's greedy generation in bf16 (weights cast, as
  `load_run(dtype="bfloat16")`) against float32: whether the tokens agree, and the largest
  |logprob difference| of the bf16 engine's chosen tokens against a float32 forward over the same text.
- Output: a markdown table (tokens/s, ratio to eager fp32, warm-up) and a JSON
  (bench/speed_results.json). The table in BENCHMARKS.md ("bf16 and torch.compile on the CPU") came
  from bench_recipe.py instead, whose run also gives the learning curves.
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from data_utils import atomic_write  # noqa: E402
from inference import cpu_bf16_native  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

VARIANTS = {  # name -> (compile, dtype)
    "eager fp32": (False, "float32"),
    "eager bf16 autocast": (False, "bfloat16"),
    "compile fp32": (True, "float32"),
    "compile + bf16": (True, "bfloat16"),
}


def make_variant(name, shape, block, vocab, batch, seed):
    compiled, dtype = VARIANTS[name]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_vocab=vocab, arch=shape["arch"], bias=False,
                          tie_embeddings=False, n_layer=shape["n_layer"], n_head=shape["n_head"],
                          n_embd=shape["n_embd"], mlp_act=shape.get("mlp_act", "swiglu")))
    opt = model.configure_optimizers(0.1, 2e-3, (0.9, 0.95), "cpu", "muon", 0.02, 0.95, 0.0)
    ctx = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    rt = SimpleNamespace(world=1, rank=0, ddp=False, device="cpu", compile=compiled, ctx=ctx)
    cfg = SimpleNamespace(grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    step_model = torch.compile(model) if compiled else model
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step():
        x = torch.randint(0, vocab, (batch, block - 1), generator=gen)
        y = torch.randint(0, vocab, (batch, block - 1), generator=gen)
        mask = torch.ones_like(x, dtype=torch.bool)
        loss, count, _ = train.train_step(step_model, [(x, y, mask)], opt, scaler, cfg, rt)
        return float(loss / count)

    return step


def compare_generation(run_dir, prompts, n_tokens):
    """bf16 vs float32 greedy generation of a trained run (see the module docstring)."""
    from torch.nn import functional as F

    from engine import Engine
    from inference import load_run

    runs = {d: load_run(run_dir, device="cpu", dtype=d) for d in ("float32", "bfloat16")}
    rows = [runs["float32"].prompt_ids(p) for p in prompts]
    chosen = {}
    for dtype, run in runs.items():
        engine = Engine(run.model, max_batch=len(rows))
        ids = [engine.add(r, n_tokens, temperature=0, logprobs=1) for r in rows]
        events = {i: [] for i in ids}
        while engine.has_work():
            for e in engine.step():
                events[e.request].append(e)
        chosen[dtype] = [events[i] for i in ids]
    worst, same = 0.0, 0
    for row, ev16, ev32 in zip(rows, chosen["bfloat16"], chosen["float32"]):
        same += [e.token for e in ev16] == [e.token for e in ev32]
        seq = torch.tensor([row + [e.token for e in ev16]])
        with torch.no_grad():
            ref = F.log_softmax(runs["float32"].model(seq)[0][0].float(), -1)
        worst = max([worst] + [abs(e.logprob - float(ref[len(row) - 1 + k, e.token])) for k, e in enumerate(ev16)])
    print(f"{run_dir}: {len(rows)} prompts x {n_tokens} greedy tokens; bf16 tokens equal float32's in {same} of "
          f"{len(rows)} rows; largest |bf16 logprob - float32 logprob| of the chosen tokens: {worst:.4f} nats")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Training tokens/s of eager/compiled, fp32/bf16 on the CPU preset.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps of each variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each variant, timed apart")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=6)
    ap.add_argument("--n_embd", type=int, default=192)
    ap.add_argument("--mlp_act", default="swiglu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--out", default="bench/speed_results.json")
    ap.add_argument("--generation", default=None, metavar="RUN", help="compare bf16 and float32 generation of RUN")
    ap.add_argument("--tokens", type=int, default=32, help="--generation: greedy tokens per prompt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.generation:
        compare_generation(args.generation, ["长江是中国", "北京大学", "数学是", "他出生于"], args.tokens)
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shape = dict(arch="qwen3", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, mlp_act=args.mlp_act)
    names = args.variants.split(",")
    steps = {n: make_variant(n, shape, args.block, args.vocab, args.batch_size, 1337) for n in names}
    tokens = args.batch_size * (args.block - 1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_bf16_native()[0]}; {args.threads} thread(s), {args.clock} clock; {shape}, batch {args.batch_size} x "
          f"{args.block}; compile threads {os.environ.get('TORCHINDUCTOR_COMPILE_THREADS', 'default')}", flush=True)
    warm, rates = {}, {n: [] for n in names}
    for n in names:
        t = clock()
        for _ in range(args.warmup):
            steps[n]()
        warm[n] = clock() - t
        print(f"  {n}: first {args.warmup} steps {warm[n]:.1f} s", flush=True)
    for r in range(args.rounds):
        for n in names:
            t = clock()
            for _ in range(args.steps):
                steps[n]()
            rates[n].append(tokens * args.steps / (clock() - t))
        print(f"  round {r}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in names), flush=True)
    med = {n: statistics.median(rates[n]) for n in names}
    base = med[names[0]]
    print(f"\n| variant | tokens/s (median of {args.rounds}) | x {names[0]} | first {args.warmup} steps (warm-up) |")
    print("|---|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:,.0f} | {med[n] / base:.2f} | {warm[n]:.1f} s |")
    result = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_native": cpu_bf16_native()[0], "threads": args.threads, "clock": args.clock, "shape": shape,
              "batch": [args.batch_size, args.block], "tokens_per_s": med, "rounds": rates,
              "warmup_s": warm, "warmup_steps": args.warmup,
              "median_step_s": {n: tokens / med[n] for n in names}}
    with atomic_write(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
