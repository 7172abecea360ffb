"""One GPU check: training speed and MFU against `transformers`, generation, serving, memory, and the
CUDA correctness tests, in one short command.

    python bench/gpu_check.py             # on one CUDA GPU: about 5-8 minutes
    python bench/gpu_check.py --smoke     # the same code path on CPU with tiny shapes, under 2 minutes

It writes `bench/results/gpu_check.json` and `bench/results/gpu_check.md` (`--out DIR` to change),
and prints the markdown table. Parts:

1. Correctness on the device: the pytest tests marked `gpu` (tests/test_gpu.py: cached vs
   recomputed decoding in bf16, compiled vs eager loss, exact resume), run in a subprocess.
2. Training: tokens/s, MFU and peak memory of a full step (forward, backward, optimizer step) at the
   GPU preset's shape for each architecture (bf16 autocast, torch.compile, fused AdamW), side by
   side with `transformers`' model of the same architecture (GPT2LMHeadModel / Qwen3ForCausalLM,
   sdpa, the same bf16 autocast and AdamW) holding our weights: the first losses must agree, so
   both provably compute the same thing. Steps alternate between the models; medians.
3. Generation: greedy tokens/s of our engine at batch 1 and 32 against `transformers` `generate`
   (KV cache) on the same weights.
4. Serving: 64 concurrent streaming clients against server.py on loopback: completed tokens/s.

Design choices: random weights and tokens (speed does not depend on what a model learnt); no data
or tokenizer download (the serving part trains a small tokenizer on the repository's own text), so
it runs on a machine with no network; every part catches its own failure and records it, so one
broken part still leaves the others' numbers.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine import generate  # noqa: E402
from export import hf_config, hf_model_class, hf_state_dict  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import PEAK_FLOPS  # noqa: E402

ARCHS = ("gpt2", "qwen3")
# the GPU preset's shape (config/train_config.py) and a tiny one for --smoke
FULL = dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=32000, batch=32, steps=10,
            prompt=128, new=128, gen_batches=(1, 32), streams=64, stream_tokens=128)
SMOKE = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, batch=2, steps=3,
             prompt=16, new=8, gen_batches=(1, 4), streams=4, stream_tokens=8)


def model_config(shape, arch):
    extra = dict(n_kv_head=max(1, shape["n_head"] // 3), tie_embeddings=False) if arch == "qwen3" else {}
    return GPTConfig(arch=arch, block_size=shape["block_size"], vocab_size=shape["vocab_size"],
                     n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0,
                     bias=arch == "gpt2", **extra)


def hf_copy(model):
    """transformers' model of the same architecture holding our weights (no download)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    ids = SimpleNamespace(eot=0, pad=0)
    hf = hf_model_class(model.config.arch)._from_config(hf_config(model.config, ids), attn_implementation="sdpa")
    theirs = hf.state_dict()
    state = hf_state_dict(model, theirs)
    hf.load_state_dict({k: torch.zeros_like(theirs[k]) if v is None else v for k, v in state.items()})
    return hf.to(next(model.parameters()).device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_flops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


# ----------------------------------------------------------------------------- the parts

def check_correctness(device, smoke):
    env = {**os.environ, "GPU_CHECK_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"),
           "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120 if smoke else 600)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    return {"returncode": proc.returncode, "summary": tail[0], "passed": proc.returncode == 0}


def bench_train(shape, device, arch):
    torch.manual_seed(0)
    B, T = shape["batch"], shape["block_size"] - 1
    ours = GPT(model_config(shape, arch)).to(device)
    models = {"ours": ours, "transformers": hf_copy(ours)}
    bf16 = device == "cuda"
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda") for name, m in models.items()}
    compiled = torch.compile(ours) if device == "cuda" else ours
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=g).to(device)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def step(name):
        model = models[name].train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = compiled(x, y)[1] if name == "ours" else model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item()

    first = {name: step(name) for name in models}  # also the warm-up (and the compilation)
    agree = abs(first["ours"] - first["transformers"]) < (0.05 if bf16 else 1e-3)
    for name in models:  # a second warm-up step: compiled graphs settle
        step(name)
    times = {name: [] for name in models}
    for _ in range(shape["steps"]):
        for name in models:
            times[name].append(timed(lambda n=name: step(n), device)[0])
    result = {"arch": arch, "params": ours.num_params(), "first_losses": first, "losses_agree": agree}
    peak = peak_flops(device)
    for name, ts in times.items():
        tps = B * T / statistics.median(ts)
        result[name] = {"tokens_per_s": tps, "step_s": statistics.median(ts)}
        if peak:
            result[name]["mfu"] = ours.flops_per_token(T) * tps / peak
    result["speedup"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    if device == "cuda":  # peak memory of our training step alone
        del models["transformers"], opts["transformers"]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step("ours")
        result["ours"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def bench_generate(shape, device, arch):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours = GPT(model_config(shape, arch)).to(device, dtype).eval()
    hf = hf_copy(ours).to(dtype).eval()
    new, results = shape["new"], []
    for batch in shape["gen_batches"]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, shape["vocab_size"], (batch, shape["prompt"]), generator=g)

        def ours_run(prompts=prompts):
            return list(generate(ours, prompts.tolist(), new, temperature=0))

        @torch.no_grad()
        def hf_run(prompts=prompts):
            return hf.generate(prompts.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               use_cache=True, pad_token_id=0)

        ours_run(), hf_run()  # warm-up
        times = {"ours": [], "transformers": []}
        for _ in range(3):
            times["ours"].append(timed(ours_run, device)[0])
            times["transformers"].append(timed(hf_run, device)[0])
        row = {"batch": batch, "new_tokens": new}
        for name, ts in times.items():
            row[name] = {"tokens_per_s": batch * new / statistics.median(ts)}
        row["speedup"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        results.append(row)
    return {"arch": arch, "rows": results}


def bench_server(shape, device, tmp):
    """64 streaming clients at once against server.py (the preset's shape, a small tokenizer)."""
    import requests

    from inference import Run
    from server import create_app, make_server
    from tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "README.md", ROOT / "BENCHMARKS.md")]
    tok = train_tokenizer(texts * 2, Path(tmp) / "tokenizer", vocab_size=2048 if shape is FULL else 400)
    cfg = model_config({**shape, "vocab_size": tok.n_vocab}, "gpt2")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GPT(cfg).to(device, dtype).eval()
    run = Run(model, tok, {"name": "gpu_check", "params": model.num_params(), "block_size": cfg.block_size})
    app = create_app(run, max_batch=shape["streams"], queue=2 * shape["streams"],
                     max_new_tokens_cap=shape["stream_tokens"])
    server = make_server(app, "127.0.0.1", 0, clients=shape["streams"] + 8)
    port = server.effective_port
    threading.Thread(target=server.run, daemon=True).start()
    counts, errors = [], []

    def client(i):
        body = {"prompt": f"第{i}个问题：", "max_new_tokens": shape["stream_tokens"], "temperature": 0,
                "ignore_eos": True, "stream": False}
        try:
            r = requests.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=300)
            r.raise_for_status()
            counts.append(r.json()["tokens"])
        except Exception as e:  # recorded, not fatal: the table shows it
            errors.append(repr(e)[:200])

    try:
        for _warm_up in (True, False):  # a warm-up round, then the measured one
            counts.clear()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(shape["streams"])]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
    finally:
        server.close()
    return {"streams": shape["streams"], "tokens": sum(counts), "seconds": seconds,
            "tokens_per_s": sum(counts) / seconds, "errors": errors[:5], "n_errors": len(errors)}


# ----------------------------------------------------------------------------- report

def markdown(report):
    lines = [f"### GPU check: {report['device_name']} ({report['date']}, torch {report['torch']})", ""]
    c = report.get("correctness", {})
    lines.append(f"Correctness tests (`pytest -m gpu`): {c.get('summary', c.get('error', '?'))}")
    lines += ["", "| training (bf16, compile) | params | ours tokens/s | transformers tokens/s | ratio | ours MFU | "
              "ours peak GiB | first losses agree |", "|---|---|---|---|---|---|---|---|"]
    for r in report.get("train", []):
        if "error" in r:
            lines.append(f"| {r['arch']} | error: {r['error']} | | | | | | |")
            continue
        mfu = r["ours"].get("mfu")
        lines.append(f"| {r['arch']} | {r['params'] / 1e6:.1f}M | {r['ours']['tokens_per_s']:,.0f} | "
                     f"{r['transformers']['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{'-' if mfu is None else f'{mfu:.1%}'} | {r['ours'].get('peak_memory_gib', float('nan')):.1f} | "
                     f"{r['losses_agree']} |")
    lines += ["", "| generation (greedy) | batch | ours tokens/s | transformers generate tokens/s | ratio |",
              "|---|---|---|---|---|"]
    for g in report.get("generate", []):
        if "error" in g:
            lines.append(f"| {g['arch']} | error: {g['error']} | | | |")
            continue
        for row in g["rows"]:
            lines.append(f"| {g['arch']} | {row['batch']} | {row['ours']['tokens_per_s']:,.0f} | "
                         f"{row['transformers']['tokens_per_s']:,.0f} | {row['speedup']:.2f}x |")
    s = report.get("server", {})
    if "error" in s:
        lines.append(f"\nServer: error: {s['error']}")
    elif s:
        lines.append(f"\nServer: {s['streams']} concurrent streams, {s['tokens']} tokens in {s['seconds']:.1f} s = "
                     f"{s['tokens_per_s']:,.0f} tokens/s, {s['n_errors']} errors")
    return "\n".join(lines) + "\n"


def attempt(fn, *args, label):
    try:
        return fn(*args)
    except Exception as e:
        traceback.print_exc()
        return {"arch": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code path in under 2 minutes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check.json/.md")
    ap.add_argument("--skip", nargs="*", default=(), choices=("correctness", "train", "generate", "server"))
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --smoke for the CPU code path", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else FULL
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "smoke": args.smoke,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)", "shape": shape}
    started = time.perf_counter()
    if "correctness" not in args.skip:
        report["correctness"] = attempt(check_correctness, device, args.smoke, label="correctness")
    if "train" not in args.skip:
        report["train"] = [attempt(bench_train, shape, device, arch, label=arch) for arch in ARCHS]
    if "generate" not in args.skip:
        report["generate"] = [attempt(bench_generate, shape, device, arch, label=arch) for arch in ARCHS]
    if "server" not in args.skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report["server"] = attempt(bench_server, shape, device, tmp, label="server")
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"total {report['seconds']:.0f} s; written to {out}/gpu_check.json and .md")
    failed = [k for k in ("correctness",) if not report.get(k, {}).get("passed", True)]
    errors = [r for part in ("train", "generate") for r in report.get(part, []) if "error" in r]
    return 1 if failed or errors or "error" in report.get("server", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
