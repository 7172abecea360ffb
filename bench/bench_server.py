"""server.py under Poisson load: the continuous scheduler against the static batcher, same model.

    python bench/bench_server.py [--rates 0.5,1.5,4] [--duration 15] [--threads 1] [--n_layer 4] [--n_embd 256]

The model has random weights (speed does not depend on what the weights say); the tokenizer is
`data/tokenizer` when it exists, else GPT-2's. Two real servers run as their own processes on
127.0.0.1, one `--scheduler static` (the previous batcher: a batch runs until its longest row ends)
and one `--scheduler continuous` (server.py's default), both `--max_batch 16`. They are started
together and the load runs against one, then the other, alternating per rate, so both see the same
machine load.

Load: for each rate (requests/s), a seeded Poisson schedule of `rate * duration` requests with
output lengths drawn log-uniformly from 8 to 256 tokens (the same schedule for both servers);
each request streams `/generate` greedily with `ignore_eos`, so it produces exactly its length.
Reported per run: completed tokens/s (tokens of finished requests over the time from the first
arrival to the last completion), time to first token p50/p99, per-token latency p50/p99 (a
request's (end - first token) / (tokens - 1)), and errors. TTFT is also given in decode steps (its
p99 over the per-token latency p50 of the same run). Then a scenario: a 256-token request, and
0.5 s later an 8-token one: which finishes first.
"""
import argparse
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

from conftest import make_run  # noqa: E402  (the test suite's writer of random-weight run directories)

from tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["北京是", "上海是中国最大的城市之一，", "长江", "黄河被称为", "故宫位于北京市中心，是", "Python是一种",
           "中华人民共和国的首都", "华北平原", "长江是中国第一长河，全长约", "明清两代的皇家宫殿", "编程语言",
           "中国第二长河", "母亲河", "入海口", "Guido van Rossum", "1991年"]
SCHEDULERS = ("static", "continuous")


def stream_once(url, prompt, max_new_tokens):
    """(arrival, first chunk, end) times of one greedy streaming request."""
    started = time.perf_counter()
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        first = None
        for _ in r.iter_content(chunk_size=None):
            first = first or time.perf_counter()
    return started, first, time.perf_counter()


def schedule(rate, duration, seed):
    """[(arrival offset s, prompt, tokens)]: Poisson arrivals, log-uniform lengths in [8, 256]."""
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(max(1, round(rate * duration))):
        t += rng.expovariate(rate)
        out.append((t, PROMPTS[i % len(PROMPTS)], round(math.exp(rng.uniform(math.log(8), math.log(256))))))
    return out


def run_load(url, plan):
    """Send `plan` at its arrival times; per request (arrival, first, end, tokens), and errors."""
    results, errors, threads = [], [], []
    origin = time.perf_counter()

    def client(prompt, tokens):
        try:
            results.append((*stream_once(url, prompt, tokens), tokens))
        except Exception as e:  # counted: the benchmark's claim is zero errors
            errors.append(repr(e))

    for at, prompt, tokens in plan:
        time.sleep(max(0.0, origin + at - time.perf_counter()))
        thread = threading.Thread(target=client, args=(prompt, tokens))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results, errors


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def summary(results, errors):
    start, end = min(r[0] for r in results), max(r[2] for r in results)
    ttft = [r[1] - r[0] for r in results]
    per_token = [(r[2] - r[1]) / (r[3] - 1) for r in results if r[3] > 1]
    return {"tokens_s": sum(r[3] for r in results) / (end - start), "ttft50": percentile(ttft, 50),
            "ttft99": percentile(ttft, 99), "tok50": percentile(per_token, 50), "tok99": percentile(per_token, 99),
            "errors": len(errors), "done": len(results)}


def short_after_long(url):
    """Which of a 256-token request and an 8-token one sent 0.5 s later finishes first."""
    ends = {}

    def client(name, tokens, delay):
        time.sleep(delay)
        ends[name] = stream_once(url, "长江", tokens)[2]

    threads = [threading.Thread(target=client, args=a) for a in (("long", 256, 0), ("short", 8, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "short" if ends["short"] < ends["long"] else "long", ends["long"] - ends["short"]


def start_server(run_dir, scheduler, threads, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    server = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--out_dir", str(run_dir), "--port", str(port),
                               "--max_batch", "16", "--queue", "400", "--scheduler", scheduler],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            requests.get(f"{url}/health", timeout=1).raise_for_status()
            return server, url
        except requests.RequestException:
            time.sleep(0.2)
    server.terminate()
    log.seek(0)
    raise SystemExit(f"server.py --scheduler {scheduler} did not come up:\n{log.read()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.5,1.5,4", help="request rates (per second), comma-separated")
    ap.add_argument("--duration", type=float, default=15, help="seconds of arrivals per rate")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the servers (1 is faster on a busy "
                    "shared machine)")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    tok = load_tokenizer(args.tokenizer if Path(args.tokenizer, "tokenizer.json").exists() else "gpt2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "bench", tok, block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        servers = {}
        logs = {s: open(Path(tmp) / f"{s}.log", "w+") for s in SCHEDULERS}
        try:
            for s in SCHEDULERS:
                servers[s] = start_server(run_dir, s, args.threads, logs[s])
            for s in SCHEDULERS:
                stream_once(servers[s][1], "预热", 8)  # warm-up: first-call allocations
            for i, rate in enumerate(rates):
                plan = schedule(rate, args.duration, seed=i)
                order = SCHEDULERS if i % 2 == 0 else SCHEDULERS[::-1]  # alternate who goes first
                for s in order:
                    row = summary(*run_load(servers[s][1], plan)) | {"rate": rate, "scheduler": s}
                    rows.append(row)
                    print(f"rate {rate:g}/s {s}: {row['tokens_s']:.0f} tokens/s, TTFT p99 {row['ttft99'] * 1000:.0f} "
                          f"ms, errors {row['errors']}", flush=True)
            order_results = {s: short_after_long(servers[s][1]) for s in SCHEDULERS}
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait()
            for log in logs.values():
                log.close()
    print(f"\nmodel: {args.n_layer} layers, n_embd {args.n_embd}, vocab {tok.n_vocab}, random weights; "
          f"torch threads {args.threads or 'default'}; {args.duration:g} s of arrivals per rate; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| rate (req/s) | scheduler | completed | errors | completed tokens/s | TTFT p50 | TTFT p99 | TTFT p99 in "
          "decode steps | per-token p50 | per-token p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:g} | {r['scheduler']} | {r['done']} | {r['errors']} | {r['tokens_s']:.0f} | "
              f"{r['ttft50'] * 1000:.0f} ms | {r['ttft99'] * 1000:.0f} ms | {r['ttft99'] / r['tok50']:.1f} | "
              f"{r['tok50'] * 1000:.1f} ms | {r['tok99'] * 1000:.1f} ms |")
    for rate in rates:
        pair = {r["scheduler"]: r["tokens_s"] for r in rows if r["rate"] == rate}
        print(f"rate {rate:g}/s: continuous / static completed tokens/s = {pair['continuous'] / pair['static']:.2f}x")
    for s, (first, margin) in order_results.items():
        print(f"{s}: a 256-token request, then an 8-token one 0.5 s later: the {first} one finishes first "
              f"({margin:+.2f} s)")


if __name__ == "__main__":
    main()
