"""Memory and throughput of data/prepare.py over a corpus bigger than memory, sampled as it runs.

    python bench/make_big_corpus.py --out /work/bigcorpus            # 42 wiki copies, ~5.3 GB of text
    nice -n 10 python bench/bench_corpus.py --input /work/bigcorpus/zst --out /work/bigcorpus/out-zst \
        --log /work/bigcorpus/zst.samples.jsonl -- --tokenizer /work/base/data/tokenizer --shard_tokens 100000000

Starts prepare.py (the arguments after `--` are passed on) and every `--every` seconds records the
resident memory of its whole process tree (the reader and the pool workers, from /proc), the
tokens written so far (the sizes of its shard files) and the input file it is reading. The summary
compares the run's quarters: memory is flat when the RSS of the last quarter is that of the first,
and throughput is flat when its tokens/s are. Linux only (/proc).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_rss_mb(pid):
    """Resident memory of a process and its descendants, in MB (shared pages counted once per process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


def reading(pid, folder):
    """The input file the reader has open, if any."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith(str(folder) + os.sep):
                return Path(target).name
    except (FileNotFoundError, PermissionError):
        pass
    return None


def written_tokens(out, itemsize=2):
    return sum(p.stat().st_size for p in Path(out).glob("*.bin*") if p.is_file()) // itemsize


def main():
    ap = argparse.ArgumentParser(description="Sample RSS and throughput of data/prepare.py over a big corpus.")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", required=True, help="jsonl of the samples")
    ap.add_argument("--every", type=float, default=30.0)
    ap.add_argument("rest", nargs="*", help="after --: more prepare.py arguments")
    args = ap.parse_args()
    cmd = [sys.executable, str(ROOT / "data" / "prepare.py"), "--input", args.input, "--out", args.out, "--quiet",
           *args.rest]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    samples = []
    with open(args.log, "w") as log:
        while proc.poll() is None:
            time.sleep(args.every)
            s = {"t": round(time.time() - t0, 1), "rss_mb": round(tree_rss_mb(proc.pid), 1),
                 "tokens": written_tokens(args.out), "file": reading(proc.pid, Path(args.input).resolve())}
            samples.append(s)
            log.write(json.dumps(s) + "\n")
            log.flush()
    print(f"prepare.py exited {proc.returncode} after {time.time() - t0:.0f}s")
    summarise(samples)
    return proc.returncode


def summarise(samples):
    if len(samples) < 8:
        print("too few samples for a summary")
        return
    q = len(samples) // 4
    for name, part in (("first quarter", samples[:q]), ("last quarter", samples[-q:])):
        rss = sorted(s["rss_mb"] for s in part)
        rate = (part[-1]["tokens"] - part[0]["tokens"]) / max(part[-1]["t"] - part[0]["t"], 1e-9)
        print(f"{name}: RSS median {rss[len(rss) // 2]:.0f} MB (max {rss[-1]:.0f}), {rate:,.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
