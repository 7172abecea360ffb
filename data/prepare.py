"""Pretraining data: a corpus -> `train.bin`, `val.bin`, `meta.json` (the block layout of data_utils).

    python data/prepare.py --input ../shared/data/zhwiki --out data/processed --block_size 512
    python data/prepare.py --input data/raw/fineweb2 ../shared/data/zhwiki:2 --clean none wiki \
        --out data/web --shard_tokens 500000000          # parquet web text mixed with the wiki, sharded

Inputs (`data_utils.read_chunks`, the one reader, which tokenizer.py samples through too): jsonl,
.jsonl.gz, .jsonl.zst and parquet (decoded a batch of rows at a time), files or folders; the text
is in `--text_field`; `--clean wiki` is the wiki cleaning, `--clean none` only NFC, control
characters and the minimum length (web text has no title line to drop). Several inputs are mixed by
weight, `PATH:WEIGHT`: each article is taken WEIGHT times on average (`mix_copies`: floor(WEIGHT)
copies plus one for a sha1-chosen share, so the mix is deterministic); each input's tokens and share
go to meta.json `sources`. Files no training set may read (`data_utils.TRAINING_HELD_OUT`: DRCD
test, which pipeline.py writes into data/) are reported and never read.

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
- Shards and resume: `--shard_tokens` cuts each split into numbered shards of whole blocks
  (`SplitWriter`), listed in meta.json `shards` and read as one array by data_utils.BlockData.
  Each completed shard is a checkpoint (`PROGRESS`: the reader's position, the counts, the open
  shard's length), so a killed run, started again with the same settings and files, truncates the
  open shard to its checkpointed length and goes on: at most one shard is done twice.
- Robust and atomic: malformed lines (bad JSON or UTF-8, nesting too deep, lone surrogates, lines
  over `--max_line_bytes`, skipped without being read whole) are counted and the first ones
  reported with file:line; FIFOs, symlink loops and folders named `*.jsonl` are reported and never
  opened; a corrupt parquet file or a truncated compressed stream is reported and the rest of that
  file skipped. The bins are written as hidden `.NAME.part` files renamed at the end, the old
  meta.json is removed just before and the new one written last, so an interrupted run never looks
  complete; parts that no checkpoint can resume are removed at the next start. Exit 1 only when
  nothing usable was found.
"""
import argparse
import json
import os
import re
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
    CLEAN_MODES,
    MAX_LINE_BYTES,
    BadLines,
    article_key,
    chunk_records,
    clean_document,
    count_chars,
    find_sources,
    read_chunks,
    remove_stale_temporaries,
    split_of,
    split_sentences,
    token_dtype,
    write_json,
)
from tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer, sample_texts, train_tokenizer  # noqa: E402

SPLITS = ("train", "val")
OUTPUTS = ("train.bin", "val.bin", "meta.json")
PROGRESS = ".prepare-progress.json"  # a sharded run's last checkpoint


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


def mix_copies(key, rate, split):
    """How many times an article of an input with mix weight `rate` is taken: floor(rate), plus one
    more for a deterministic share frac(rate) of the articles (a sha1 of its key, as the split is),
    so the mix is the same on every run. A validation article is taken at most once: repeating it
    would only weight it, and the val set keeps measuring distinct text."""
    whole, frac = divmod(rate, 1)
    n = int(whole) + (frac > 0 and split_of(key, frac, salt="minigpt-mix") == "val")
    return min(n, 1) if split == "val" else n


class Worker:
    """Turns one chunk of records into the rows of each split (runs in a pool process)."""

    def __init__(self, tokenizer, block_size, val_fraction, min_chars, pack, dtype, text_fields=("text",),
                 cleans=("wiki",), rates=(1.0,)):
        self.tok = load_tokenizer(tokenizer)
        self.block_size, self.val_fraction, self.min_chars, self.pack = block_size, val_fraction, min_chars, pack
        self.dtype, self.text_fields, self.cleans, self.rates = np.dtype(dtype), text_fields, cleans, rates
        enc = self.tok.enc
        # tokens that start inside a UTF-8 character: an over-long sentence is not cut before them
        self.mid_character = np.array([not self.tok.is_special(i) and enc.decode_single_token_bytes(i)[0] & 0xC0 == 0x80
                                       for i in range(enc.n_vocab)])

    def __call__(self, chunk):
        bad, counts = BadLines(), Counter()
        articles = {split: [] for split in SPLITS}
        rate, field, clean = self.rates[chunk.source], self.text_fields[chunk.source], self.cleans[chunk.source]
        for _, obj in chunk_records(chunk, field, bad):
            counts["articles_read"] += 1
            if obj is None:
                counts["malformed"] += 1
                continue
            body = clean_document(obj[field], clean)  # lone surrogates were refused on parsing
            if len(body) < max(self.min_chars, 1):
                counts["too_short"] += 1
                continue
            key = article_key(obj, field)
            split = split_of(key, self.val_fraction)
            copies = mix_copies(key, rate, split)
            if not copies:
                counts["mixed_out"] += 1
                continue
            articles[split].extend([article_sentences(body)] * copies)
            counts[f"articles_{split}"] += copies
            counts[f"chars_{split}"] += copies * count_chars(body)
        rows = {split: self.rows(articles[split], split, counts) for split in SPLITS}
        return (chunk.disk_bytes, chunk.source, chunk.resume), rows, counts, bad

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


class SplitWriter:
    """One split's output: blocks appended to `.NAME.part` files. Without a limit there is one file,
    `train.bin`; with `limit` blocks per shard, numbered shards `train-00000.bin`, ... of exactly
    `limit` blocks (the last one shorter), so shard boundaries depend only on the data. Completed
    shards stay parts until the whole run is done (`finish`), so a killed run never looks complete;
    `state` is what a resumed run needs: the completed shards and the length of the open one."""

    def __init__(self, out, split, row_bytes, limit, state=None):
        self.out, self.split, self.row_bytes, self.limit = out, split, row_bytes, limit
        self.done = list(state["done"]) if state else []
        self.size = state["part_bytes"] if state else 0
        self.f = open(self.part(len(self.done)), "r+b" if state else "wb")
        self.f.truncate(self.size)  # a resumed run drops what the killed one wrote after its last checkpoint
        self.f.seek(self.size)

    def name(self, i):
        return f"{self.split}-{i:05d}.bin" if self.limit else f"{self.split}.bin"

    def part(self, i):
        return self.out / f".{self.name(i)}.part"

    def write(self, data):
        """Append whole rows; returns how many shards this completed."""
        view, completed = memoryview(data), 0
        while len(view):
            room = self.limit * self.row_bytes - self.size if self.limit else len(view)
            self.f.write(view[:room])
            self.size += min(room, len(view))
            view = view[room:]
            if self.limit and self.size == self.limit * self.row_bytes:
                self.sync()
                self.f.close()
                self.done.append(self.name(len(self.done)))
                self.f, self.size, completed = open(self.part(len(self.done)), "wb"), 0, completed + 1
        return completed

    def sync(self):
        self.f.flush()
        os.fsync(self.f.fileno())

    def state(self):
        return {"done": self.done, "part_bytes": self.size}

    def finish(self):
        """Close; rename every part to its shard name (an empty last part is dropped unless it is
        the only one) and return the shard names in order."""
        self.sync()
        self.f.close()
        names = self.done + ([self.name(len(self.done))] if self.size or not self.done else [])
        if len(names) == len(self.done):
            self.part(len(self.done)).unlink()
        for i, name in enumerate(names):
            os.replace(self.part(i), self.out / name)
        return names


def remove_parts(out):
    for p in out.glob(".*.bin.part"):
        p.unlink()
    (out / PROGRESS).unlink(missing_ok=True)


def remove_old_shards(out, split, keep):
    """Shards of an earlier run that the new one did not write (it may have had more, or none)."""
    pattern = re.compile(rf"{split}(-\d{{5}})?\.bin")
    for p in out.iterdir():
        if pattern.fullmatch(p.name) and p.name not in keep:
            p.unlink()


def parse_inputs(specs):
    """`PATH[:WEIGHT]` specs -> [(path, weight)]; a weight is how many times each article is taken
    on average (0.3: a deterministic 30% of them; 2: each twice)."""
    inputs = []
    for spec in specs:
        m = re.fullmatch(r"(.+):([0-9]*\.?[0-9]+)", spec)
        path, weight = (m.group(1), float(m.group(2))) if m and not Path(spec).exists() else (spec, 1.0)
        if not 0 < weight <= 100:
            raise SystemExit(f"error: the weight of {path} must be in (0, 100], not {weight:g}")
        inputs.append((path, weight))
    return inputs


def get_tokenizer(spec, inputs, vocab_size, text_fields, cleans):
    """Load the tokenizer, training one on the inputs first when its folder is absent or empty."""
    if spec != "gpt2" and not (Path(spec).is_dir() and any(Path(spec).iterdir())):
        paths = [path for path, _ in inputs]
        print(f"no tokenizer at {spec}: training a {vocab_size}-token tokenizer on {', '.join(paths)} first")
        t0 = time.time()
        texts = chain.from_iterable(sample_texts(path, 16_000_000 // len(paths), field, clean)
                                    for path, field, clean in zip(paths, text_fields, cleans))
        tok = train_tokenizer(texts, spec, vocab_size)
        print(f"trained tokenizer in {time.time() - t0:.0f}s -> {spec}")
        return tok
    try:
        return load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def find_inputs(inputs):
    """(files, the input index of each): held-out files (DRCD test) and non-files are reported, not read."""
    skipped, held_out, files, sources = BadLines(), BadLines(), [], []
    for i, (path, _) in enumerate(inputs):
        found = find_sources(path, skipped, held_out)
        files += found
        sources += [i] * len(found)
        if not found and len(inputs) > 1:  # a mistyped input would silently change the mix
            skipped.report("paths that are not regular files")
            print(f"error: no corpus files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) in {path}", file=sys.stderr)
            raise SystemExit(1)
    skipped.report("paths that are not regular files")
    held_out.report("files held out of training (evaluation data)")
    return files, sources, skipped.count + held_out.count


def settings_of(args, inputs, files, tok):
    """Everything the output depends on: a killed run resumes only when all of it is unchanged."""
    keys = ("block_size", "val_fraction", "pack", "min_chars", "chunk_bytes", "max_line_bytes", "text_field",
            "clean", "shard_tokens")
    return {**{k: getattr(args, k) for k in keys}, "inputs": inputs, "tokenizer": tok.identity.to_json(),
            "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def load_progress(out, settings):
    path = out / PROGRESS
    if not path.exists():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("settings") == json.loads(json.dumps(settings)):
        return progress
    print("the settings or inputs changed since the killed run: starting over")
    return None


def prepare(args):
    """Run the whole preparation and return the meta dict; SystemExit(1) when nothing usable is found."""
    inputs = parse_inputs(args.input)
    files, sources, skipped = find_inputs(inputs)
    if not files:
        print(f"error: no corpus files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) in {' '.join(args.input)}",
              file=sys.stderr)
        raise SystemExit(1)
    tok = get_tokenizer(args.tokenizer, inputs, args.vocab_size, args.text_field, args.clean)  # one per input
    dtype = token_dtype(tok.n_vocab).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out, OUTPUTS):
        print(f"removed {stale}, left by a run that was killed")
    settings = settings_of(args, inputs, files, tok)
    progress = load_progress(out, settings)
    if progress is None:
        remove_parts(out)
    else:
        print(f"resuming the killed run at {progress['done_bytes'] / 1e6:,.0f} MB of {len(files)} files")
    row_bytes = args.block_size * np.dtype(dtype).itemsize
    limit = -(-args.shard_tokens // args.block_size) if args.shard_tokens else 0
    writers = {split: SplitWriter(out, split, row_bytes, limit, progress and progress["writers"][split])
               for split in SPLITS}
    result = stream(args, files, sources, inputs, tok, dtype, writers, settings, progress)
    counts, per_source, bad, seconds, total_bytes = result
    counts["skipped_paths"] += skipped
    if counts["blocks_train"] + counts["blocks_val"] == 0:
        bad.report()
        for writer in writers.values():
            writer.f.close()
        remove_parts(out)
        print(f"error: no usable article in {' '.join(args.input)} ({counts['articles_read']} lines read)",
              file=sys.stderr)
        raise SystemExit(1)  # leaves any previous output as it was
    (out / "meta.json").unlink(missing_ok=True)  # the old meta must never describe the new bins
    shards = {split: writer.finish() for split, writer in writers.items()}
    for split in SPLITS:
        remove_old_shards(out, split, shards[split])
    meta = build_meta(tok, args, dtype, counts, bad, inputs, per_source)
    if args.shard_tokens:
        meta["shards"] = shards
    meta["counts"]["seconds"] = round(seconds, 2)
    meta["counts"]["input_mb_per_s"] = round(total_bytes / 1e6 / max(seconds, 1e-9), 2)
    write_json(out / "meta.json", meta)
    (out / PROGRESS).unlink(missing_ok=True)
    print_summary(meta, out, bad)
    return meta


def stream(args, files, sources, inputs, tok, dtype, writers, settings, progress):
    """Read, tokenise in the pool and write, in input order; a checkpoint (`PROGRESS`) whenever a
    shard is completed, so a killed run re-does at most the one shard it was writing."""
    bad, counts = BadLines(), Counter()
    per_source = [Counter() for _ in inputs]
    start, done_bytes, seconds = (0, 0, 1), 0, 0.0
    if progress:
        counts.update(progress["counts"])
        per_source = [Counter(c) for c in progress["sources"]]
        bad.count, bad.examples = progress["bad"]["count"], progress["bad"]["examples"]
        start, done_bytes, seconds = tuple(progress["resume"]), progress["done_bytes"], progress["seconds"]
    else:
        for path in files:
            if path.stat().st_size == 0:
                bad.add(f"{path}:0", "empty file")
                counts["empty_files"] += 1
    worker_args = (tok.identity, args.block_size, args.val_fraction, args.min_chars, args.pack, dtype,
                   tuple(args.text_field), tuple(args.clean), tuple(weight for _, weight in inputs))
    total_bytes = sum(p.stat().st_size for p in files)
    t0 = time.time() - seconds
    read_bad = BadLines()  # over-long lines and unreadable files, found by the reader in this process
    with tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="prepare",
              disable=args.quiet) as bar:
        chunks = read_chunks(files, args.chunk_bytes, read_bad, args.text_field, args.max_line_bytes, start, sources)
        for (disk_bytes, source, resume), rows, chunk_counts, chunk_bad in ordered_results(chunks, worker_args,
                                                                                           args.workers):
            completed = sum(writers[split].write(rows[split]) for split in SPLITS)
            counts.update(chunk_counts)
            per_source[source].update(chunk_counts)
            bad.merge(chunk_bad)
            done_bytes += disk_bytes
            bar.update(disk_bytes)
            if completed:
                for writer in writers.values():
                    writer.sync()
                unparsed = Counter({"articles_read": read_bad.count, "malformed": read_bad.count})
                write_json(Path(args.out) / PROGRESS, {
                    "settings": settings, "resume": resume, "done_bytes": done_bytes, "seconds": time.time() - t0,
                    "writers": {split: w.state() for split, w in writers.items()}, "counts": counts + unparsed,
                    "sources": per_source, "bad": {"count": bad.count + read_bad.count,
                                                   "examples": (bad.examples + read_bad.examples)[:bad.keep]}})
    # the over-long lines were never parsed: count them with the malformed ones
    counts.update({"articles_read": read_bad.count, "malformed": read_bad.count})
    bad.merge(read_bad)
    return counts, per_source, bad, time.time() - t0, total_bytes


def build_meta(tok, args, dtype, counts, bad, inputs, per_source):
    rows = counts["blocks_train"] + counts["blocks_val"]
    summary = {
        "articles_read": counts["articles_read"],
        "articles_kept": counts["articles_train"] + counts["articles_val"],
        "dropped": {"malformed": counts["malformed"], "too_short": counts["too_short"],
                    "mixed_out": counts["mixed_out"]},
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
    total_train = max(counts["tokens_train"], 1)
    sources = [{"input": path, "weight": weight, "text_field": field, "clean": clean,
                "articles_read": c["articles_read"], "articles_train": c["articles_train"],
                "tokens_train": c["tokens_train"],
                "share_of_train_tokens": round(c["tokens_train"] / total_train, 4)}
               for (path, weight), field, clean, c in zip(inputs, args.text_field, args.clean, per_source)]
    return {"block_size": args.block_size, "dtype": dtype, "vocab_size": tok.n_vocab,
            "tokenizer": tok.identity.to_json(), "schema": 1, "special": tok.special, "kind": "pretrain",
            "pack": args.pack, "val_fraction": args.val_fraction, "sources": sources, "counts": summary}


def print_summary(meta, out, bad):
    c = meta["counts"]
    bad.report()
    print(f"articles: {c['articles_read']} read, {c['articles_kept']} kept "
          f"({c['articles_train']} train / {c['articles_val']} val), dropped {c['dropped']}")
    if len(meta["sources"]) > 1:
        for s in meta["sources"]:
            print(f"  {s['input']} x{s['weight']:g}: {s['articles_train']} train articles, "
                  f"{s['tokens_train']:,} train tokens ({s['share_of_train_tokens']:.1%})")
    print(f"blocks of {meta['block_size']}: {c['blocks_train']} train / {c['blocks_val']} val; "
          f"{c['tokens']:,} tokens, {c['chars']:,} chars ({c['chars'] / max(c['tokens'], 1):.2f} chars/token), "
          f"pad fraction {c['pad_fraction']:.1%}, {c['sentences_split']} over-long sentences split, "
          f"{c['eot_train'] + c['eot_val']} EOT (one per article end)")
    files = ", ".join(f"{len(v)} {k} shards" for k, v in meta["shards"].items()) if "shards" in meta \
        else "train.bin, val.bin"
    print(f"{c['input_mb_per_s']} MB/s over {c['seconds']}s -> {out}/{files}, meta.json")
    if c["blocks_val"] == 0:
        print("warning: no validation block (raise --val_fraction for a corpus this small)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Corpus (jsonl, .jsonl.gz, .jsonl.zst, parquet) -> block-aligned "
                                             "train.bin / val.bin (or shards) / meta.json.")
    ap.add_argument("--input", required=True, nargs="+", metavar="PATH[:WEIGHT]",
                    help="files or folders (walked for *.jsonl, *.jsonl.gz, *.jsonl.zst, *.parquet); several are "
                         "mixed, each article of one taken WEIGHT times on average (default 1; 0.3 keeps 30%%)")
    ap.add_argument("--out", default="data/processed")
    ap.add_argument("--text_field", nargs="+", default=["text"],
                    help="the field (jsonl) or column (parquet) holding the text: one for all inputs, or one per input")
    ap.add_argument("--clean", nargs="+", choices=CLEAN_MODES, default=["wiki"],
                    help="wiki: drop the title line, headings and extraction leftovers; none: only Unicode NFC, "
                         "control characters and --min_chars (web corpora); one for all inputs, or one per input")
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer folder (trained when absent) or gpt2")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="when a tokenizer is trained")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--val_fraction", type=float, default=0.01, help="share of articles held out")
    ap.add_argument("--pack", action="store_true", help="let several article pieces share a block")
    ap.add_argument("--min_chars", type=int, default=50, help="drop articles shorter than this after cleaning")
    ap.add_argument("--shard_tokens", type=int, default=0,
                    help="write numbered shards of this many tokens (whole blocks) instead of one file per split; "
                         "a killed run then resumes at its last completed shard (0: one file)")
    ap.add_argument("--chunk_bytes", type=int, default=1 << 20,
                    help="unit of work; the output never depends on --workers (--pack rows stay within a chunk)")
    ap.add_argument("--max_line_bytes", type=int, default=MAX_LINE_BYTES,
                    help="a longer line is skipped unread and counted as malformed (bounds memory)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.block_size < 2:
        ap.error("--block_size must be at least 2")
    if args.shard_tokens < 0 or args.chunk_bytes < 1:
        ap.error("--shard_tokens must be >= 0 and --chunk_bytes >= 1")
    for name in ("text_field", "clean"):
        values = getattr(args, name)
        if len(values) not in (1, len(args.input)):
            ap.error(f"--{name}: give one value for all inputs or one per input ({len(args.input)}), not {len(values)}")
        setattr(args, name, values * len(args.input) if len(values) == 1 else values)
    prepare(args)


if __name__ == "__main__":
    main()
