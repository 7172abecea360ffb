"""Memory and throughput of data/prepare.py over a corpus bigger than memory, sampled as it runs.

    python bench/make_big_corpus.py --out /work/bigcorpus            # 42 wiki copies, ~5.3 GB of text
    nice -n 10 python bench/bench_corpus.py --input /work/bigcorpus/zst --out /work/bigcorpus/out-zst \
        --log /work/bigcorpus/zst.samples.jsonl -- --tokenizer /work/base/data/tokenizer --shard_tokens 100000000

Starts prepare.py (the arguments after `--` are passed on) and every `--every` seconds records the
resident memory of its whole process tree (the reader and the pool workers, from /proc), the
tokens written so far (the sizes of its shard files) and the input file it is reading. The summary
compares the run's quarters: memory is flat when the RSS of the last quarter is that of the first,
and throughput is flat when its tokens/s are. Linux only (/proc).

    nice -n 10 python bench/bench_corpus.py --reader_only --input /work/bigcorpus/zst --log zst.reader.jsonl

`--reader_only` runs just the reader prepare.py and tokenizer.py share (`data_utils.read_chunks`
and `chunk_records`: decompression or parquet decoding, JSON parsing) over the whole corpus in this
process, without tokenising, sampling its own RSS and MB/s: the part whose memory could depend on
the corpus or file size, at the speed a 2-core machine can cover 5 GB.
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


def reader_only(args):
    sys.path.insert(0, str(ROOT))
    from data_utils import BadLines, chunk_records, find_sources, read_chunks

    files, bad = find_sources(args.input), BadLines()
    t0 = last = time.time()
    samples, records, decoded = [], 0, 0
    with open(args.log, "w") as log:
        for chunk in read_chunks(files, 1 << 20, bad):
            decoded += len(chunk.payload) if chunk.kind == "jsonl" else \
                sum(len((r.get("text") or "").encode()) for r in chunk.payload)  # parquet: the text's bytes
            records += sum(obj is not None for _, obj in chunk_records(chunk, "text", bad))
            if time.time() - last >= args.every:
                last = time.time()
                s = {"t": round(last - t0, 1), "rss_mb": round(tree_rss_mb(os.getpid()), 1), "records": records,
                     "decoded_mb": round(decoded / 1e6, 1), "file": Path(chunk.path).name}
                samples.append(s)
                log.write(json.dumps(s) + "\n")
                log.flush()
    seconds = time.time() - t0
    print(f"{len(files)} files, {records:,} records, {decoded / 1e9:.2f} GB decoded in {seconds:.0f}s "
          f"({decoded / 1e6 / seconds:.1f} MB/s), {bad.count} bad")
    if len(samples) >= 8:
        q = len(samples) // 4
        for name, part in (("first quarter", samples[:q]), ("last quarter", samples[-q:])):
            rss = sorted(x["rss_mb"] for x in part)
            rate = (part[-1]["decoded_mb"] - part[0]["decoded_mb"]) / max(part[-1]["t"] - part[0]["t"], 1e-9)
            print(f"{name}: RSS median {rss[len(rss) // 2]:.0f} MB (max {rss[-1]:.0f}), {rate:.1f} MB/s")
    return 0


def main():
    ap = argparse.ArgumentParser(description="Sample RSS and throughput of data/prepare.py over a big corpus.")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", help="prepare.py's output folder (not with --reader_only)")
    ap.add_argument("--reader_only", action="store_true", help="time the shared reader alone, no tokenising")
    ap.add_argument("--log", required=True, help="jsonl of the samples")
    ap.add_argument("--every", type=float, default=30.0)
    ap.add_argument("rest", nargs="*", help="after --: more prepare.py arguments")
    args = ap.parse_args()
    if args.reader_only:
        return reader_only(args)
    if not args.out:
        ap.error("--out is required")
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
