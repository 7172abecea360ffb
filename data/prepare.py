"""Pretraining data: wiki jsonl -> `train.bin`, `val.bin`, `meta.json` (the block layout of data_utils).

    python data/prepare.py --input ../shared/data/zhwiki --out data/processed --block_size 512

Design:
- Blocks: every row is exactly `block_size` tokens, `[tokens..., EOT, PAD...]`, made of whole
  sentences (`data_utils.split_sentences`), so a row never ends mid-sentence. A long article goes on
  in further rows, each starting at a sentence start. The EOT rule: EOT follows only the true end
  of an article; a row cut inside an article ends with PAD instead (PAD never counts in the loss),
  so the model never learns "the document ends here" where it goes on, and the file holds exactly
  one EOT per kept article (`eot_train` / `eot_val` in meta.json). A paragraph's last sentence
  keeps its newline, so an article's rows decode back to its cleaned text. A single sentence
  longer than a row (lists, tables) is cut into row-sized pieces at token boundaries (never inside a
  character) and counted as `sentences_split`. `--pack` lets several pieces share a row, each
  article end followed by its EOT; a piece cut inside its article closes its row. The summary
  reports the PAD fraction either way.
- Split: by article, from a sha1 of its id (else title, else text) (`data_utils.split_of`), so it is
  independent of order and worker count, and later stages can tell which articles were pretrained on.
- Streaming and parallel: the main process reads whole lines in chunks of `--chunk_bytes` and a
  process pool turns each chunk into rows; results come back in order with a bounded number in
  flight, so memory stays flat and the output is byte-identical for any `--workers`.
- Speed: tiktoken's BPE is most of the cost, so the gain comes from using every core; around it, no
  Python work per token: sentence and row boundaries are numpy cumsums and searches, and a chunk's
  rows are filled by one fancy-indexed assignment (`fill_rows`).
- Robust and atomic: malformed lines (bad JSON or UTF-8, nesting too deep, lone surrogates, lines
  over `--max_line_bytes`, skipped without being read whole) are counted and the first ones
  reported with file:line; FIFOs, symlink loops and folders named `*.jsonl` are reported and never
  opened. The bins go to temporaries renamed at the end, the old meta.json is removed just before
  and the new one written last, so an interrupted run never looks complete; the temporaries a
  killed run left behind are removed at the next start. Exit 1 only when nothing usable was found.
"""
import argparse
import os
import sys
import time
from bisect import bisect_right
from collections import Counter, deque
from itertools import chain
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

if not __package__:  # run as a script (python data/prepare.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import (  # noqa: E402
    MAX_LINE_BYTES,
    BadLines,
    article_key,
    atomic_write,
    clean_article,
    count_chars,
    find_jsonl,
    parse_jsonl_line,
    remove_stale_temporaries,
    split_of,
    split_sentences,
    token_dtype,
    write_json,
)
from tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer, sample_texts, train_tokenizer  # noqa: E402

SPLITS = ("train", "val")
OUTPUTS = ("train.bin", "val.bin", "meta.json")


def article_sentences(body):
    """Sentences of a cleaned article; the last one of each paragraph but the last keeps its newline."""
    sentences = []
    for para in body.split("\n"):
        parts = split_sentences(para)
        if parts:
            parts[-1] += "\n"
            sentences.extend(parts)
    if sentences:
        sentences[-1] = sentences[-1][:-1]
    return sentences


def read_chunks(files, chunk_bytes, max_line_bytes, bad):
    """(path, first line number, bytes of whole lines), about `chunk_bytes` each, file by file.

    A line longer than `max_line_bytes` is dropped as soon as it is known to be too long and the
    rest of it is skipped unread into memory, so one line can never take more than about
    `max_line_bytes + chunk_bytes`; it is reported to `bad` and counted by the caller."""
    for path in files:
        lineno, rest, skipping = 1, b"", False
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                if skipping:
                    newline = block.find(b"\n")
                    if newline < 0:
                        continue
                    block, skipping, lineno = block[newline + 1:], False, lineno + 1
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if cut:
                    yield str(path), lineno, block[:cut]
                    lineno += block.count(b"\n", 0, cut)
                if len(rest) > max_line_bytes:
                    bad.add(f"{path}:{lineno}", f"line longer than {max_line_bytes} bytes")
                    rest, skipping = b"", True
        if rest:
            yield str(path), lineno, rest


class Worker:
    """Turns one chunk of jsonl lines into the rows of each split (runs in a pool process)."""

    def __init__(self, tokenizer, block_size, val_fraction, min_chars, pack, dtype):
        self.tok = load_tokenizer(tokenizer)
        self.block_size, self.val_fraction, self.min_chars, self.pack = block_size, val_fraction, min_chars, pack
        self.dtype = np.dtype(dtype)
        enc = self.tok.enc
        # tokens that start inside a UTF-8 character: an over-long sentence is not cut before them
        self.mid_character = np.array([not self.tok.is_special(i) and enc.decode_single_token_bytes(i)[0] & 0xC0 == 0x80
                                       for i in range(enc.n_vocab)])

    def __call__(self, chunk):
        path, first_line, blob = chunk
        bad, counts = BadLines(), Counter()
        articles = {split: [] for split in SPLITS}
        for offset, raw in enumerate(blob.split(b"\n")):
            if not raw.strip():
                continue
            counts["articles_read"] += 1
            obj = parse_jsonl_line(raw, f"{path}:{first_line + offset}", bad)
            if obj is None:
                counts["malformed"] += 1
                continue
            body = clean_article(obj["text"])  # parse_jsonl_line refused lone surrogates and deep nesting
            if len(body) < max(self.min_chars, 1):
                counts["too_short"] += 1
                continue
            split = split_of(article_key(obj), self.val_fraction)
            articles[split].append(article_sentences(body))
            counts[f"articles_{split}"] += 1
            counts[f"chars_{split}"] += count_chars(body)
        rows = {split: self.rows(articles[split], split, counts) for split in SPLITS}
        return len(blob), rows, counts, bad

    def rows(self, articles, split, counts):
        """Rows (n, block_size) of this chunk's articles of one split."""
        if not articles:
            return b""
        flat, sentence_ends, article_ends = self.encode_sentences(articles)
        boundaries, n_split = self.cut_long_sentences(flat, sentence_ends)
        counts["sentences_split"] += n_split
        pieces = self.cut_pieces(boundaries, article_ends)
        starts, ends, last = pieces[:, 0], pieces[:, 1], pieces[:, 2].astype(bool)
        out = self.fill_rows(flat, starts, ends, last)
        counts[f"tokens_{split}"] += int(len(flat))
        counts[f"blocks_{split}"] += len(out)
        counts[f"eot_{split}"] += int(last.sum())
        counts[f"pad_{split}"] += int(out.size - (ends - starts).sum() - last.sum())
        return out.tobytes()

    def encode_sentences(self, articles):
        """All ids of the articles' sentences concatenated, with the token offsets where each
        sentence and each article ends. Sentences are encoded one by one, as a row may start at any of
        them: encoding a whole article could join two sentences into one pre-token ("。「", "。Python")."""
        # encode_to_numpy with no special token allowed is encode_ordinary without a Python list per
        # sentence (special spellings stay text); about 10% less work than flattening lists of ints
        ids = [self.tok.enc.encode_to_numpy(s, disallowed_special=()) for s in chain.from_iterable(articles)]
        sentence_ends = np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        flat = np.concatenate(ids)
        article_ends = sentence_ends[np.cumsum([len(sentences) for sentences in articles]) - 1]
        return flat, sentence_ends, article_ends

    def cut_long_sentences(self, flat, sentence_ends):
        """Sentence boundaries plus cuts inside over-long sentences, at most `block_size - 1` tokens
        apart, moved back where needed so that no character is split across two rows."""
        cap = self.block_size - 1
        starts = np.concatenate([[0], sentence_ends[:-1]])
        long = np.flatnonzero(sentence_ends - starts > cap)
        cuts = []
        for i in long.tolist():
            start, end = int(starts[i]), int(sentence_ends[i])
            while end - start > cap:
                cut = start + cap
                while cut > start + 1 and self.mid_character[flat[cut]]:
                    cut -= 1
                cuts.append(cut)
                start = cut
        return np.unique(np.concatenate([sentence_ends, cuts]).astype(np.int64)), len(long)

    def cut_pieces(self, boundaries, article_ends):
        """(start, end, ends_article) of each row piece: the most whole sentences of one article that
        fit a row, and whether the article ends there (only then does an EOT follow)."""
        cap, bounds = self.block_size - 1, boundaries.tolist()
        pieces, start = [], 0
        for article_end in article_ends.tolist():
            while start < article_end:
                end = min(bounds[bisect_right(bounds, start + cap) - 1], article_end)
                pieces.append((start, end, end == article_end))
                start = end
        return np.array(pieces, dtype=np.int64).reshape(-1, 3)

    def fill_rows(self, flat, starts, ends, last):
        """Rows holding each piece, then EOT where its article ends (`last`), padded.

        A piece cut inside its article is followed by PAD and closes its row: the model is never
        taught that a document ends where it does not. With `pack`, pieces share rows greedily; the
        piece after a cut one would not have fitted in its row anyway (that is why it was cut)."""
        lengths = ends - starts + 1  # with the EOT, or the PAD after a cut piece
        if self.pack:
            row_of, col_of, row, col = [], [], 0, 0
            for n, closes in zip(lengths.tolist(), last.tolist()):
                if col + n > self.block_size:
                    row, col = row + 1, 0
                row_of.append(row)
                col_of.append(col)
                col = col + n if closes else self.block_size
            row_of, col_of = np.array(row_of), np.array(col_of)
        else:
            row_of, col_of = np.arange(len(lengths)), np.zeros(len(lengths), dtype=np.int64)
        out = np.full((int(row_of[-1]) + 1, self.block_size), self.tok.pad, dtype=self.dtype)
        n_tokens = lengths - 1
        token_piece = np.repeat(np.arange(len(lengths)), n_tokens)
        within = np.arange(len(token_piece)) - np.repeat(np.cumsum(n_tokens) - n_tokens, n_tokens)
        out[row_of[token_piece], col_of[token_piece] + within] = flat[starts[token_piece] + within]
        out[row_of[last], (col_of + n_tokens)[last]] = self.tok.eot
        return out


_worker = None


def _init_worker(*args):
    global _worker
    _worker = Worker(*args)


def _run_chunk(chunk):
    return _worker(chunk)


def ordered_results(chunks, worker_args, workers):
    """Results of each chunk in input order; at most 2 per worker in flight, so memory stays flat."""
    if workers <= 1:
        worker = Worker(*worker_args)
        yield from map(worker, chunks)
        return
    with Pool(workers, initializer=_init_worker, initargs=worker_args) as pool:
        in_flight = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_run_chunk, (chunk,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def get_tokenizer(spec, input_path, vocab_size):
    """Load the tokenizer, training one on the input first when its folder is absent or empty."""
    if spec != "gpt2" and not (Path(spec).is_dir() and any(Path(spec).iterdir())):
        print(f"no tokenizer at {spec}: training a {vocab_size}-token tokenizer on {input_path} first")
        t0 = time.time()
        tok = train_tokenizer(sample_texts(input_path), spec, vocab_size)
        print(f"trained tokenizer in {time.time() - t0:.0f}s -> {spec}")
        return tok
    try:
        return load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def prepare(args):
    """Run the whole preparation and return the meta dict; SystemExit(1) when nothing usable is found."""
    skipped = BadLines()
    files = find_jsonl(args.input, skipped=skipped)
    skipped.report("paths that are not regular files")
    if not files:
        print(f"error: no .jsonl files under {args.input}", file=sys.stderr)
        raise SystemExit(1)
    tok = get_tokenizer(args.tokenizer, args.input, args.vocab_size)
    dtype = token_dtype(tok.n_vocab).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out, OUTPUTS):
        print(f"removed {stale}, left by a run that was killed")
    bad, counts = BadLines(), Counter()
    counts["skipped_paths"] = skipped.count
    for path in files:
        if path.stat().st_size == 0:
            bad.add(f"{path}:0", "empty file")
            counts["empty_files"] += 1
    worker_args = (tok.identity, args.block_size, args.val_fraction, args.min_chars, args.pack, dtype)
    total_bytes = sum(p.stat().st_size for p in files)
    t0 = time.time()
    with atomic_write(out / "train.bin") as f_train, atomic_write(out / "val.bin") as f_val, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=args.quiet) as bar:
        long_lines = BadLines()
        chunks = read_chunks(files, args.chunk_bytes, args.max_line_bytes, long_lines)
        for n_bytes, rows, chunk_counts, chunk_bad in ordered_results(chunks, worker_args, args.workers):
            f_train.write(rows["train"])
            f_val.write(rows["val"])
            counts.update(chunk_counts)
            bad.merge(chunk_bad)
            bar.update(n_bytes)
        # the over-long lines were never parsed: count them with the malformed ones
        counts.update({"articles_read": long_lines.count, "malformed": long_lines.count})
        bad.merge(long_lines)
        if counts["blocks_train"] + counts["blocks_val"] == 0:
            bad.report()
            print(f"error: no usable article in {args.input} ({counts['articles_read']} lines read)", file=sys.stderr)
            raise SystemExit(1)  # leaves any previous output as it was
        (out / "meta.json").unlink(missing_ok=True)  # the old meta must never describe the new bins
    seconds = time.time() - t0
    meta = build_meta(tok, args, dtype, counts, bad)
    meta["counts"]["seconds"] = round(seconds, 2)
    meta["counts"]["input_mb_per_s"] = round(total_bytes / 1e6 / max(seconds, 1e-9), 2)
    write_json(out / "meta.json", meta)
    print_summary(meta, out, bad)
    return meta


def build_meta(tok, args, dtype, counts, bad):
    rows = counts["blocks_train"] + counts["blocks_val"]
    summary = {
        "articles_read": counts["articles_read"],
        "articles_kept": counts["articles_train"] + counts["articles_val"],
        "dropped": {"malformed": counts["malformed"], "too_short": counts["too_short"]},
        "empty_files": counts["empty_files"],
        "skipped_paths": counts["skipped_paths"],
        "bad_lines": bad.examples,
        "tokens": counts["tokens_train"] + counts["tokens_val"],
        "chars": counts["chars_train"] + counts["chars_val"],
        "pad_fraction": round((counts["pad_train"] + counts["pad_val"]) / max(rows * args.block_size, 1), 4),
        "sentences_split": counts["sentences_split"],
    }
    for split in SPLITS:
        for what in ("articles", "blocks", "tokens", "chars", "eot"):
            summary[f"{what}_{split}"] = counts[f"{what}_{split}"]
    return {"block_size": args.block_size, "dtype": dtype, "vocab_size": tok.n_vocab,
            "tokenizer": tok.identity.to_json(), "schema": 1, "special": tok.special, "kind": "pretrain",
            "pack": args.pack, "val_fraction": args.val_fraction, "counts": summary}


def print_summary(meta, out, bad):
    c = meta["counts"]
    bad.report()
    print(f"articles: {c['articles_read']} read, {c['articles_kept']} kept "
          f"({c['articles_train']} train / {c['articles_val']} val), dropped {c['dropped']}")
    print(f"blocks of {meta['block_size']}: {c['blocks_train']} train / {c['blocks_val']} val; "
          f"{c['tokens']:,} tokens, {c['chars']:,} chars ({c['chars'] / max(c['tokens'], 1):.2f} chars/token), "
          f"pad fraction {c['pad_fraction']:.1%}, {c['sentences_split']} over-long sentences split, "
          f"{c['eot_train'] + c['eot_val']} EOT (one per article end)")
    print(f"{c['input_mb_per_s']} MB/s over {c['seconds']}s -> {out}/train.bin, val.bin, meta.json")
    if c["blocks_val"] == 0:
        print("warning: no validation block (raise --val_fraction for a corpus this small)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Wiki jsonl -> block-aligned train.bin / val.bin / meta.json.")
    ap.add_argument("--input", required=True, help="a folder (walked for *.jsonl) or one jsonl file")
    ap.add_argument("--out", default="data/processed")
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer folder (trained when absent) or gpt2")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="when a tokenizer is trained")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--val_fraction", type=float, default=0.01, help="share of articles held out")
    ap.add_argument("--pack", action="store_true", help="let several article pieces share a block")
    ap.add_argument("--min_chars", type=int, default=50, help="drop articles shorter than this after cleaning")
    ap.add_argument("--chunk_bytes", type=int, default=1 << 20,
                    help="unit of work; the output never depends on --workers (--pack rows stay within a chunk)")
    ap.add_argument("--max_line_bytes", type=int, default=MAX_LINE_BYTES,
                    help="a longer line is skipped unread and counted as malformed (bounds memory)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.block_size < 2:
        ap.error("--block_size must be at least 2")
    prepare(args)


if __name__ == "__main__":
    main()
