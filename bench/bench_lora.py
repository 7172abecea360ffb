"""Peak training memory and step time of LoRA against full fine-tuning, on the same model.

    python bench/bench_lora.py                     # 6 layers, 384 wide, vocab 32000, block 256, batch 8
    python bench/bench_lora.py --device cuda --n_layer 12 --n_embd 768

Design choices:
- Each variant runs in a fresh subprocess, so one variant's allocations (and the allocator's
  cached memory) cannot hide or inflate the other's. On CPU the peak is the process's high-water
  resident set (`VmHWM` in /proc/self/status) minus its resident set after the imports: tracemalloc
  does not see torch's allocations, and this needs no extra package. The children run with
  MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every block of 64 KiB or more on its own and
  returns it on free, instead of keeping freed activations in its heap (its default threshold
  grows with the tensors freed), which made the resident set track the allocator rather than the
  tensors alive. On CUDA the peak is `torch.cuda.max_memory_allocated`.
- The state column is computed, not measured: 4 bytes per weight, plus 4 (gradient) + 8 (AdamW
  moments) per trainable weight, in float32. The rest of the peak is activations, which LoRA does
  not shrink (gradients still flow back through every layer); at this size the 32000-way output
  layer's logits dominate them.
- A step is what train.py does: forward with targets, backward, AdamW step (train.py's optimizer
  set-up, which skips frozen parameters), zero_grad. The first step (allocator warm-up, AdamW
  state creation) is left out of the timing but counts for the memory peak, as it does in training.
- Random tokens: memory and speed do not depend on what the tokens are.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (the CPU measurement needs Linux)")


def run_variant(args):
    """Child process: build the model, train `steps` steps, print one JSON line."""
    import torch

    from lora import apply_lora
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    baseline = 0.0 if cuda else rss_mb("VmRSS")
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=True)
    model = GPT(config).to(args.device)
    if args.variant == "lora":
        apply_lora(model, rank=args.rank, alpha=2 * args.rank, targets="attn,mlp")
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), args.device.split(":")[0])
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=args.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - baseline
    print(json.dumps({"variant": args.variant, "params": sum(p.numel() for p in model.parameters()),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "peak_mb": round(peak), "step_s": round(statistics.median(times), 4)}))


def main():
    ap = argparse.ArgumentParser(description="Peak memory and step time: LoRA vs full fine-tuning.")
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--n_head", type=int, default=6)
    ap.add_argument("--n_embd", type=int, default=384)
    ap.add_argument("--vocab_size", type=int, default=32000)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)  # set for the child processes
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)

    rows = []
    for variant in ("full", "lora"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True,
                               text=True, check=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"command: python bench/bench_lora.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"model: {args.n_layer} layers, {args.n_embd} wide, vocab {args.vocab_size}, block {args.block_size}, "
          f"batch {args.batch_size}, LoRA rank {args.rank} on attn+mlp, device {args.device}, "
          f"median of {args.steps} steps\n")
    print("| variant | trainable params | weights + grads + AdamW state (MB) | peak training memory (MB) "
          "| step time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = f" ({r['trainable'] / full['trainable']:.1%})" if r is not full else ""
        state_mb = (4 * r["params"] + 12 * r["trainable"]) / 2**20
        print(f"| {r['variant']} | {r['trainable']:,}{share} | {state_mb:,.0f} | {r['peak_mb']:,} "
              f"| {r['step_s']:.3f} |")


if __name__ == "__main__":
    main()
