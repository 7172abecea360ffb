"""How soon server.py stops generating for a client that hung up: disconnect -> freed slot.

    python bench/bench_disconnect.py [--repeats 10] [--max_new_tokens 1024] [--n_layer 4] [--n_embd 256]

A real waitress server (`server.make_server`) runs in this process on 127.0.0.1, serving a model
with random weights (the speed of a step does not depend on what the weights say) with the
continuous scheduler, so the bench can watch the worker itself. Each trial sends a greedy request
with `ignore_eos` for `--max_new_tokens` tokens over a raw socket (non-streaming `/generate`, or
streaming), waits until its row generates, closes the socket and then polls (every 0.5 ms):
- noticed: waitress's `client_disconnected` for the request turns true (waitress read the hang-up);
- freed: the request has left the engine (its slot is free).
Reported per variant and kind: median and max of close -> noticed and close -> freed, engine steps
between noticed and freed, and tokens generated after the close.

Variants, alternated trial by trial in one run so both see the same machine load:
- `now`: server.py as it is (the worker asks every job's client_disconnected before each step);
- `before`: the jobs are not given client_disconnected (as before issue 22 F1), so only the
  handler notices, and only after POLL_S without a token: a non-streaming request then runs to
  its end (the trial stops waiting after `--give_up_s`).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

from conftest import make_run  # noqa: E402  (the test suite's writer of random-weight run directories)

import server  # noqa: E402
from inference import load_run  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

VARIANTS = ("now", "before")


def send(port, stream, max_new_tokens):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"prompt": "长江", "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def wait_for(condition, timeout_s, every_s=0.0005):
    """The time `condition()` first held, or None after `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter()
        time.sleep(every_s)
    return None


def trial(port, worker, stream, max_new_tokens, give_up_s):
    """One hang-up: (close -> noticed, close -> freed (None: not freed in give_up_s), steps from
    noticed to freed, tokens after the close)."""
    assert wait_for(lambda: not worker.requests and worker.engine.running() == 0, 60), "a previous request lingers"
    sock = send(port, stream, max_new_tokens)
    assert wait_for(lambda: worker.requests and worker.stats["tokens"] > 0, 60)
    (rid, jobs), = list(worker.requests.items())
    assert wait_for(lambda: jobs[0].tokens >= 4, 60)
    channel_gone = jobs[0].bench_client_gone  # waitress's client_disconnected, in both variants
    tokens, closed = worker.stats["tokens"], time.perf_counter()
    sock.close()
    noticed = wait_for(channel_gone, give_up_s)
    steps_at_notice = worker.stats["batches"]
    freed = wait_for(lambda: rid not in worker.requests and worker.engine.running() == 0, give_up_s)
    steps = worker.stats["batches"] - steps_at_notice if freed else None
    return (noticed - closed if noticed else None, freed - closed if freed else None, steps,
            worker.stats["tokens"] - tokens)


def serve(run_dir, variant):
    app = server.create_app(load_run(run_dir), max_batch=16, queue=64, max_new_tokens_cap=100_000)
    http = server.make_server(app, "127.0.0.1", 0, clients=8)
    threading.Thread(target=http.run, daemon=True).start()
    return app, http


def patch_submit():
    """Keep each request's client_disconnected on its jobs as `bench_client_gone`; in the
    `before` variant do not give it to the worker (server.py before issue 22 F1)."""
    original = server.Service.submit

    def submit(self, req, client_gone=None):
        jobs, sources = original(self, req, None if self.bench_variant == "before" else client_gone)
        for job in jobs:
            job.bench_client_gone = client_gone
        return jobs, sources

    server.Service.submit = submit


def fmt(values, unit=1000, suffix=" ms"):
    done = [v for v in values if v is not None]
    if not done:
        return "never"
    text = f"{statistics.median(done) * unit:.1f}{suffix} (max {max(done) * unit:.1f})"
    return text + (f", {len(values) - len(done)} not within the limit" if len(done) < len(values) else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="trials per variant and kind")
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--give_up_s", type=float, default=30, help="how long a trial waits for the slot to be freed")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer if Path(args.tokenizer, "tokenizer.json").exists() else "gpt2")
    patch_submit()
    results = {(v, s): [] for v in VARIANTS for s in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "bench", tok, block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        servers = {}
        for v in VARIANTS:
            app, http = serve(run_dir, v)
            app.extensions["service"].bench_variant = v
            servers[v] = (app, http)
        try:
            for i in range(args.repeats):
                for stream in (False, True):
                    for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                        app, http = servers[v]
                        got = trial(http.effective_port, app.extensions["batcher"], stream, args.max_new_tokens,
                                    args.give_up_s)
                        results[v, stream].append(got)
                        print(v, "stream" if stream else "whole", got, flush=True)
        finally:
            for app, http in servers.values():
                http.close()
                app.extensions["batcher"].close()
    print(f"\nmodel: {args.n_layer} layers, n_embd {args.n_embd}, vocab {tok.n_vocab}, random weights; torch threads "
          f"{args.threads}; requests of {args.max_new_tokens} tokens; {args.repeats} trials each; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| variant | request | close -> waitress noticed | close -> slot freed | engine steps noticed -> freed "
          "| tokens generated after the close |")
    print("|---|---|---|---|---|---|")
    for (v, stream), rows in results.items():
        noticed, freed, steps, tokens = zip(*rows)
        done_steps = [s for s in steps if s is not None]
        print(f"| {v} | {'streaming' if stream else 'non-streaming'} | {fmt(noticed)} | {fmt(freed)} | "
              f"{'max ' + str(max(done_steps)) if done_steps else 'n/a'} | median {statistics.median(tokens):.0f} "
              f"(max {max(tokens)}) |")


if __name__ == "__main__":
    main()
