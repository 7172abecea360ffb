"""Throughput of data/prepare.py against a straightforward single-process loop, side by side.

    python bench/bench_prepare.py --files 4 --workers 2 --repeats 2

The baseline is a straightforward single-process loop, as the original prepared data: read a line,
parse it, clean it, encode it sentence by sentence, append tokens to Python lists, write at the end.
It applies the same rules (cleaning, sentence-aligned rows, the split) through the same helpers, so
its output must be byte-identical to prepare.py's, which the benchmark checks. Each side runs as its
own process (start-up included for both), alternating, `--repeats` times; medians are reported with
MB/s of input, the speed-up, CPU seconds (which a loaded machine distorts less than wall time) and
the peak resident memory of each run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data.prepare import article_sentences, get_tokenizer  # noqa: E402
from data_utils import article_key, clean_article, find_jsonl, iter_jsonl, split_of, token_dtype  # noqa: E402
from tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer  # noqa: E402


def baseline(input_dir, out, tokenizer, block_size, val_fraction, min_chars):
    """The straightforward loop: line -> json -> clean -> encode -> append, rows kept in lists."""
    tok = load_tokenizer(tokenizer)
    cap = block_size - 1
    rows = {"train": [], "val": []}

    def starts_mid_character(token):
        return tok.enc.decode_single_token_bytes(token)[0] & 0xC0 == 0x80

    for path in find_jsonl(input_dir):
        for _, obj in iter_jsonl(path):
            body = clean_article(obj["text"])
            if len(body) < min_chars:
                continue
            split = split_of(article_key(obj), val_fraction)
            row = []
            for sentence in article_sentences(body):
                ids = tok.encode(sentence)
                pieces = []
                while len(ids) > cap:
                    cut = cap
                    while cut > 1 and starts_mid_character(ids[cut]):
                        cut -= 1
                    pieces.append(ids[:cut])
                    ids = ids[cut:]
                pieces.append(ids)
                for piece in pieces:
                    if len(row) + len(piece) > cap:
                        rows[split].append(row + [tok.eot] + [tok.pad] * (cap - len(row)))
                        row = []
                    row.extend(piece)
            rows[split].append(row + [tok.eot] + [tok.pad] * (cap - len(row)))
    dtype = token_dtype(tok.n_vocab).name
    for split, split_rows in rows.items():
        np.array(split_rows, dtype=dtype).reshape(-1, block_size).tofile(Path(out) / f"{split}.bin")


def timed(cmd):
    """Wall seconds, CPU seconds (with its worker processes) and peak RSS (MB, its largest process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "zhwiki"))
    ap.add_argument("--files", type=int, default=4, help="use the first N jsonl files (0: all)")
    ap.add_argument("--tokenizer", default="data/tokenizer", help="trained on the input first when absent")
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline_into", help=argparse.SUPPRESS)  # internal: run the baseline into this folder
    args = ap.parse_args()
    val_fraction, min_chars = 0.01, 50
    if args.baseline_into:
        return baseline(args.input, args.baseline_into, args.tokenizer, args.block_size, val_fraction, min_chars)

    files = find_jsonl(args.input)[: args.files or None]
    with tempfile.TemporaryDirectory() as tmp:
        sliced = Path(tmp) / "input"
        sliced.mkdir()
        for f in files:
            (sliced / f.name).symlink_to(f.resolve())
        tok = get_tokenizer(args.tokenizer, args.input, DEFAULT_VOCAB_SIZE)
        tokenizer = "gpt2" if tok.identity.is_gpt2 else str(Path(tok.identity.path).resolve())
        mb = sum(f.stat().st_size for f in files) / 1e6
        common = ["--input", str(sliced), "--tokenizer", tokenizer, "--block_size", str(args.block_size)]
        commands = {
            "baseline (1 process)": [sys.executable, "bench/bench_prepare.py", *common,
                                     "--baseline_into", f"{tmp}/base"],
            f"prepare.py --workers {args.workers}": [sys.executable, "data/prepare.py", *common, "--out", f"{tmp}/fast",
                                                     "--workers", str(args.workers), "--quiet",
                                                     "--val_fraction", str(val_fraction),
                                                     "--min_chars", str(min_chars)],
        }
        Path(f"{tmp}/base").mkdir()
        runs = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                runs[name].append(timed(cmd))
        identical = all((Path(f"{tmp}/base") / f"{s}.bin").read_bytes()
                        == (Path(f"{tmp}/fast") / f"{s}.bin").read_bytes()
                        for s in ("train", "val"))
        counts = json.loads(Path(f"{tmp}/fast/meta.json").read_text())["counts"]
    print(f"input: {len(files)} files, {mb:.1f} MB, {counts['articles_read']} articles -> "
          f"{counts['blocks_train'] + counts['blocks_val']} blocks of {args.block_size}; cpu cores: {os.cpu_count()}")
    medians = {}
    for name, results in runs.items():
        seconds, cpu = (statistics.median(r[i] for r in results) for i in (0, 1))
        medians[name] = seconds
        print(f"{name:28s} {seconds:7.1f} s  {mb / seconds:6.2f} MB/s  {cpu:7.1f} cpu s  "
              f"peak RSS {max(r[2] for r in results):5.0f} MB  (wall: {', '.join(f'{r[0]:.1f}' for r in results)} s)")
    base, fast = medians.values()
    print(f"speed-up: {base / fast:.2f}x; outputs byte-identical: {identical}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
