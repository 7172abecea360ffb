"""Throughput of server.py's dynamic batching: N concurrent streaming clients vs one stream.

    python bench/bench_server.py [--clients 16] [--max_new_tokens 128] [--n_layer 4] [--n_embd 256]

The model has random weights (speed does not depend on what the weights say) and the shape of a
small real one; the tokenizer is `data/tokenizer` (32k) when it exists, else GPT-2's (50k: a
slightly heavier output layer). The real server (`python server.py`, waitress + Flask + the
batching worker) runs in its own process on 127.0.0.1, as it would for LAN peers; clients stream
`/generate` greedily with `ignore_eos`, so every request produces exactly `max_new_tokens` tokens.
Single-stream and concurrent runs happen in the same session, one after the other, so they see
the same machine load; `model.generate` alone at batch 1 and at batch N (no HTTP, no threads) is
measured afterwards as the ceiling the server's batching can reach.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

from inference import load_run  # noqa: E402
from conftest import make_run  # noqa: E402  (the test suite's writer of random-weight run directories)
from engine import generate  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["北京是", "上海是中国最大的城市之一，", "长江", "黄河被称为", "故宫位于北京市中心，是", "Python是一种",
           "中华人民共和国的首都", "华北平原", "长江是中国第一长河，全长约", "明清两代的皇家宫殿", "编程语言", "中国第二长河",
           "母亲河", "入海口", "Guido van Rossum", "1991年"]


def stream_once(url, prompt, max_new_tokens):
    """(seconds to the first chunk, seconds to the end) of one streaming request."""
    started = time.perf_counter()
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        first = None
        for _ in r.iter_content(chunk_size=None):
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started


def concurrent(url, clients, max_new_tokens):
    """Per-client (ttft, total) and error count, all clients released at once."""
    barrier, results, errors = threading.Barrier(clients), [None] * clients, []

    def client(i):
        barrier.wait()
        try:
            results[i] = stream_once(url, PROMPTS[i % len(PROMPTS)], max_new_tokens)
        except Exception as e:  # counted: the benchmark's claim is zero errors
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r], errors, time.perf_counter() - started


def generate_alone(run, prompts, max_new_tokens):
    """Tokens per second of `model.generate` itself for this batch of prompts."""
    started = time.perf_counter()
    steps = sum(1 for _ in generate(run.model, [run.tok.encode(p) for p in prompts], max_new_tokens, temperature=0))
    return len(prompts) * steps / (time.perf_counter() - started)


def wait_for_server(port, server, log, timeout=120):
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            requests.get(f"{url}/health", timeout=1).raise_for_status()
            return url
        except requests.RequestException:
            time.sleep(0.2)
    log.seek(0)
    raise SystemExit(f"server.py did not come up on port {port}:\n{log.read()}")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    ap.add_argument("--single_runs", type=int, default=3, help="single-stream requests averaged")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server and here (default: "
                    "torch's choice; 1 is faster on a busy shared machine, where spinning threads fight for cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.tokenizer if Path(args.tokenizer, "tokenizer.json").exists() else "gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "bench", tok, block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
        with open(Path(tmp) / "server.log", "w+") as log:
            server = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--out_dir", str(run_dir), "--port",
                                       str(port), "--max_batch", str(args.clients), "--queue", str(args.clients)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                url = wait_for_server(port, server, log)
                stream_once(url, "预热", 8)  # warm-up: first-call allocations
                singles = [stream_once(url, PROMPTS[i], args.max_new_tokens) for i in range(args.single_runs)]
                results, errors, wall = concurrent(url, args.clients, args.max_new_tokens)
                stats = requests.get(f"{url}/health", timeout=10).json()["queue"]
            finally:
                server.terminate()
                server.wait()
        run = load_run(run_dir)
    single_tps = args.single_runs * args.max_new_tokens / sum(total for _, total in singles)
    aggregate_tps = len(results) * args.max_new_tokens / wall
    batch_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
    alone = {n: generate_alone(run, batch_prompts[:n], args.max_new_tokens) for n in (1, args.clients)}
    print(f"model: {run.info['params'] / 1e6:.1f}M params (random weights), {args.n_layer} layers, n_embd "
          f"{args.n_embd}, vocab {tok.n_vocab}; torch threads {torch.get_num_threads()}; {args.max_new_tokens} "
          f"tokens per request; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    def ms(values, q):
        return f"{percentile(values, q) * 1000:.0f} ms"

    ttft_single, ttft = [first for first, _ in singles], [first for first, _ in results]
    print("\n| clients | requests | errors | tokens/s (aggregate) | tokens/s per stream | TTFT p50 | TTFT p99 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 1 | {args.single_runs} | 0 | {single_tps:.0f} | {single_tps:.0f} | {ms(ttft_single, 50)} | "
          f"{ms(ttft_single, 99)} |")
    print(f"| {args.clients} | {args.clients} | {len(errors)} | {aggregate_tps:.0f} | {aggregate_tps / args.clients:.0f} | "
          f"{ms(ttft, 50)} | {ms(ttft, 99)} |")
    for n, tps in alone.items():
        print(f"| {n}, model.generate alone (no HTTP) | 1 batch | 0 | {tps:.0f} | {tps / n:.0f} | | |")
    print(f"\naggregate / single stream: {aggregate_tps / single_tps:.1f}x (batches {stats['batches']}, largest "
          f"{stats['largest_batch']}, errors {len(errors)}); model.generate alone: {alone[args.clients] / alone[1]:.1f}x")
    for e in errors:
        print("error:", e)


if __name__ == "__main__":
    main()
