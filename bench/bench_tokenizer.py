"""Compression of our Chinese BPE against GPT-2 / cl100k / o200k on held-out wiki text, and training time.

    python bench/bench_tokenizer.py --max_chars 8000000,30000000
    python bench/bench_tokenizer.py --patterns han-runs,kimi-k2 --vocab_size 8192   # split patterns side by side

Ours is trained (vocabulary `--vocab_size`) on a sample of every wiki file but the last, at each
sample size given, and all tokenizers are measured on `--articles` cleaned articles of the last file,
which training never saw. chars/token counts every character but newlines (as bits-per-character
does); Han chars/token encodes only the runs of Han characters, the part that matters for Chinese.
`--save DIR` keeps the tokenizer of the largest sample (e.g. as data/tokenizer).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import regex
import tiktoken

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
from data_utils import clean_article, count_chars, find_jsonl, iter_jsonl  # noqa: E402
from tokenizer import DEFAULT_VOCAB_SIZE, SPLIT_PATTERNS, sample_texts, train_tokenizer  # noqa: E402

HAN_RUN = regex.compile(r"\p{Han}+")


def held_out_texts(path, n):
    texts = []
    for _, obj in iter_jsonl(path):
        body = clean_article(obj["text"])
        if len(body) >= 50:
            texts.append(body)
            if len(texts) == n:
                break
    return texts


def measure(encode_batch, texts, han_runs):
    tokens = sum(map(len, encode_batch(texts)))
    han_tokens = sum(map(len, encode_batch(han_runs)))
    chars = sum(map(count_chars, texts))
    return chars / tokens, sum(map(len, han_runs)) / han_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "zhwiki"))
    ap.add_argument("--max_chars", default="8000000", help="comma-separated training sample sizes")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--articles", type=int, default=2000)
    ap.add_argument("--save", help="keep the tokenizer trained on the largest sample here")
    ap.add_argument("--patterns", default="kimi-k2",
                    help=f"comma-separated split patterns to train with, of {', '.join(SPLIT_PATTERNS)}")
    args = ap.parse_args()
    files = find_jsonl(args.input)
    train_files, held_out_file = files[:-1], files[-1]
    texts = held_out_texts(held_out_file, args.articles)
    han_runs = [run for t in texts for run in HAN_RUN.findall(t)]
    print(f"held out: {len(texts)} articles of {held_out_file.name}, {sum(map(count_chars, texts)):,} chars; "
          f"training on {train_files[0].name}..{train_files[-1].name}")
    print(f"{'tokenizer':34s} {'vocab':>7s} {'chars/token':>12s} {'Han chars/token':>16s} {'train s':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        sizes = sorted(int(float(x)) for x in args.max_chars.split(","))
        for max_chars, pattern in [(m, p) for m in sizes for p in args.patterns.split(",")]:
            folder = Path(tmp) / f"tok{max_chars}"
            sample = Path(tmp) / "train_files"
            shutil.rmtree(sample, ignore_errors=True)
            sample.mkdir()
            for f in train_files:
                (sample / f.name).symlink_to(f.resolve())
            t0 = time.perf_counter()
            tok = train_tokenizer(sample_texts(sample, max_chars), folder, args.vocab_size, SPLIT_PATTERNS[pattern])
            seconds = time.perf_counter() - t0
            ratio, han = measure(tok.encode_batch, texts, han_runs)
            print(f"{f'ours ({pattern}), {max_chars / 1e6:g}M chars sample':34s} {tok.n_vocab:7d} {ratio:12.2f} "
                  f"{han:16.2f} {seconds:8.0f}")
        for name in ("gpt2", "cl100k_base", "o200k_base"):
            enc = tiktoken.get_encoding(name)
            ratio, han = measure(enc.encode_ordinary_batch, texts, han_runs)
            print(f"{name:34s} {enc.n_vocab:7d} {ratio:12.2f} {han:16.2f} {'-':>8s}")
        if args.save:
            shutil.rmtree(args.save, ignore_errors=True)
            shutil.copytree(folder, args.save)
            print(f"saved the {folder.name[3:]}-char tokenizer to {args.save}")


if __name__ == "__main__":
    main()
