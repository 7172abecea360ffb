"""CPU benchmarks of model.py against Hugging Face `transformers`' GPT2LMHeadModel.

    python bench/bench_model.py                  # both parts: ~3 min on a quiet 2-core machine
    python bench/bench_model.py --part train --repeats 7
    python bench/bench_model.py --part engine --baseline 4e4c31b   # engine.py vs model.py's old generate

- Training: tokens/s of a full step (forward, backward, AdamW step, zero_grad) for the same shapes
  (6 layers, 384 wide, 6 heads, block 256, vocab 32000, batch 8). The transformers model is built
  from `GPT2Config` (no download) and gets a copy of our weights, so the first losses must agree —
  the benchmark checks it, so both provably compute the same thing. Both use the very same optimizer
  construction (`GPT.configure_optimizers`, torch AdamW). Steps alternate between the models, so
  load from other processes on a shared machine hits all of them alike; medians are reported.
- Generation: 256 new tokens after a 256-token prompt, batch 1, greedy. Ours with the KV cache,
  ours recomputing the whole context every step (a fresh cache each step: only the last position
  goes through lm_head, as nanoGPT's uncached `generate` does), and transformers'
  `generate(use_cache=True)` on the same weights — its tokens must equal ours.
- Engine (`--part engine --baseline REV`): engine.py's `generate` against the `generate` that lived
  in model.py at git revision REV (loaded with `git show`, run on the same model object), for
  same-length batches of 1 and 8, greedy and sampled; runs alternate, medians are reported, and
  the greedy tokens must agree.
- `--dtype bfloat16` runs every model's training step under the same CPU bf16 autocast, to see
  what the hardware's bf16 support gives (the default compares in float32).
- Random weights and tokens: speed does not depend on what the model has learnt.
"""
import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import SlotCache, generate  # noqa: E402
from export import hf_state_dict  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = dict(n_layer=6, n_head=6, n_embd=384, vocab_size=32000, dropout=0.0, bias=True)


def hf_copy(model, attn_implementation):
    """transformers' GPT-2 with the same shapes and our weights (export.py's mapping)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = model.config
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)
    hf.load_state_dict(hf_state_dict(model, hf.state_dict()))
    assert hf.lm_head.weight is hf.transformer.wte.weight
    return hf


def median_rate(times, tokens):
    return tokens / statistics.median(times)


def bench_train(args):
    B, T = args.batch_size, 256
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=T, **SHAPES))
    models = {"ours": ours, "transformers sdpa": hf_copy(ours, "sdpa"), "transformers eager": hf_copy(ours, "eager")}
    optimizers = {name: GPT.configure_optimizers(m, 0.1, 6e-4, (0.9, 0.95), "cpu") for name, m in models.items()}
    rows = torch.randint(0, SHAPES["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    bf16 = args.dtype == "bfloat16"

    def step(name):
        model = models[name].train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if name == "ours":
                _, loss = model(x, y)
            else:
                loss = model(input_ids=x, labels=y, shift_labels=y).loss  # y is already shifted
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss.item()

    first = {name: step(name) for name in models}  # also the warm-up
    assert max(first.values()) - min(first.values()) < (0.05 if bf16 else 1e-3), f"the models disagree: {first}"
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    ours_rate = median_rate(times["ours"], B * T)
    print(f"\n### Training step on CPU (B={B}, T={T}, 6x384, vocab 32000, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats})\n")
    print("| model | step s (median) | min..max s | tokens/s | ours / this |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        rate = median_rate(ts, B * T)
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f}..{max(ts):.2f} | {rate:,.0f} | "
              f"{ours_rate / rate:.2f}x |")


def bench_generate(args):
    prompt_len, new = 256, 256
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=prompt_len + new, **SHAPES)).eval()
    hf = hf_copy(ours, "sdpa").eval()
    prompt = torch.randint(0, SHAPES["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    def cached():
        return [t for (t,) in generate(ours, [prompt], new, temperature=0)]

    @torch.no_grad()
    def recompute():
        context = list(prompt)
        for _ in range(new):
            cache = SlotCache(ours.config, 1, "cpu", torch.float32)  # fresh: only the last position's logits
            cache.plan(slice(0, 1), 0, len(context))
            logits, _ = ours(torch.tensor([context]), cache=cache, pos=torch.arange(len(context)))
            context.append(int(logits[0, -1].argmax()))
        return context[prompt_len:]

    @torch.no_grad()
    def transformers_generate():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          use_cache=True, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    # recomputation is an order of magnitude slower: one timed run keeps the benchmark short
    runs = {"ours, KV cache": (cached, args.repeats),
            "transformers generate (sdpa, cache)": (transformers_generate, args.repeats),
            "ours, recompute every step": (recompute, 1)}
    reference = cached()  # also the warm-up
    assert transformers_generate() == reference, "transformers' greedy tokens differ from ours"
    times = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, (fn, repeats) in runs.items():
            if round_ < repeats:
                start = time.perf_counter()
                tokens = fn()
                times[name].append(time.perf_counter() - start)
                assert tokens == reference, f"{name} produced different tokens"
    ours_time = statistics.median(times["ours, KV cache"])
    print(f"\n### Greedy generation on CPU ({new} new tokens after a {prompt_len}-token prompt, batch 1, "
          f"{torch.get_num_threads()} threads)\n")
    print("| generator | seconds (median) | runs | new tokens/s | ours (KV cache) speed-up |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {len(ts)} | {new / t:,.1f} | {t / ours_time:.2f}x |")


def baseline_generate(rev):
    """`generate` as model.py defined it at git revision `rev` (before engine.py existed)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:model.py"], cwd=root, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType("baseline_model")
    exec(compile(source, f"{rev}:model.py", "exec"), module.__dict__)
    return module.generate


def bench_engine(args):
    prompt_len, new = 256, 128
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=512, **SHAPES)).eval()
    old_generate = baseline_generate(args.baseline)
    gen = torch.Generator().manual_seed(1)
    print(f"\n### engine.generate vs model.generate at {args.baseline} ({new} new tokens after {prompt_len}-token "
          f"prompts, same length, {torch.get_num_threads()} threads, median of {args.repeats}, alternating)\n")
    print("| batch | sampling | before s | engine s | before tok/s | engine tok/s | engine / before speed |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        prompts = torch.randint(0, SHAPES["vocab_size"], (batch, prompt_len), generator=gen).tolist()
        for name, sampling in (("greedy", dict(temperature=0)),
                               ("T=0.8, top_k=200", dict(temperature=0.8, top_k=200, seed=1))):
            def run(fn, prompts=prompts, sampling=sampling):
                return list(fn(ours, prompts, new, **sampling))
            if sampling["temperature"] == 0:
                assert run(old_generate) == run(generate), "the engine's greedy tokens differ from before"
            else:
                run(old_generate), run(generate)  # warm-up
            times = {"before": [], "engine": []}
            for _ in range(args.repeats):
                for label, fn in (("before", old_generate), ("engine", generate)):
                    start = time.perf_counter()
                    run(fn)
                    times[label].append(time.perf_counter() - start)
            before, after = statistics.median(times["before"]), statistics.median(times["engine"])
            tokens = batch * new
            print(f"| {batch} | {name} | {before:.2f} | {after:.2f} | {tokens / before:,.0f} | {tokens / after:,.0f} | "
                  f"{before / after:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark model.py against transformers' GPT-2 on CPU.")
    ap.add_argument("--part", choices=("train", "generate", "engine", "all"), default="all",
                    help="all = train and generate; engine needs --baseline")
    ap.add_argument("--baseline", default=None, help="git revision whose model.py generate --part engine compares")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per model (alternating)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="training precision, the same for every model (bfloat16 = CPU autocast)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("train", "all"):
        bench_train(args)
    if args.part in ("generate", "all"):
        bench_generate(args)
    if args.part == "engine":
        if not args.baseline:
            ap.error("--part engine needs --baseline REV (a revision whose model.py still has generate)")
        bench_engine(args)


if __name__ == "__main__":
    main()
