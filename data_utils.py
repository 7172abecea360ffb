"""Data helpers shared by the preparation scripts, training and evaluation.

- Reading wiki jsonl robustly: malformed lines are counted and the first few reported with
  file:line, never fatal (`iter_jsonl`, `BadLines`).
- Reading any pretraining corpus (`read_chunks`, the one reader of data/prepare.py and tokenizer.py):
  jsonl plain, .gz or .zst (decompressed as a stream) and parquet (pyarrow, a batch of rows at a
  time, never a whole file), cut into chunks of about a megabyte that carry the position to resume
  from; `chunk_records` parses a chunk in a worker process. `clean_document` is the `--clean` mode:
  the wiki cleaning or `clean_plain` (NFC, control characters, nothing else).
- Cleaning a wiki article the same way everywhere (`clean_article`, `split_sentences`), so the text
  the model is pretrained on, the text QA pairs are generated from and the text evaluations prompt
  with all agree.
- The block layout on disk and the loss mask (`loss_mask`, `BlockData`): every block is exactly
  `block_size` tokens, `[tokens..., EOT, PAD...]` (pretraining rows cut inside an article have
  no EOT: it marks only true document ends), and the model sees `x = block[:-1]`,
  `y = block[1:]`. The mask is computed from the tokens alone (vectorised), so no mask file is
  stored and pretraining and SFT data share one format. A split may be numbered shards (meta.json
  `shards`), memory-mapped and indexed as one array (`ShardedBlocks`).
- Scoring blocks (`evaluate_blocks`): one function for training's validation (shared out to DDP
  ranks, all-reduced exactly) and evaluations/perplexity.py.
- Untrusted input has limits: a line longer than `MAX_LINE_BYTES` is skipped without being read
  into memory (`read_lines`), JSON nested too deeply or holding a lone surrogate ("\\ud800") is a
  malformed line (`load_json`), and paths that are not regular files (FIFOs, symlink loops,
  folders named `*.jsonl`) are reported, never opened (`find_jsonl`).
- One reader per input kind, shared by the preparation scripts and the evaluations: QA jsonl
  objects (`qa_fields`), SQuAD-style JSON (`squad_questions`) and both as evaluation questions
  (`load_qa`). `TRAINING_HELD_OUT` names the files no training set may read (DRCD test).
- Writing files atomically (`atomic_write`): a temporary file renamed at the end, so an
  interrupted run never leaves a complete-looking output; `remove_stale_temporaries` clears the
  temporaries of runs that were killed (`.NAME.tmpPID` files or folders, `.NAME.oldPID` folders
  moved aside; only the caller's NAMEs, only when process PID is gone). Scripts call it at start
  for the names they write, and `atomic_write` for its own name before each write, so a kill -9
  mid-save leaves at most one temporary per name behind, never a pile.
- The token dtype rule (`token_dtype`): uint16 while every id fits, else uint32.
"""
import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
import unicodedata
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np

# ----------------------------------------------------------------------------- reading jsonl


class BadLines:
    """Counts malformed input and remembers the first few places, for the end-of-run summary."""

    def __init__(self, keep=5):
        self.count, self.examples, self.keep = 0, [], keep

    def add(self, where, why):
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {why}")

    def merge(self, other):
        self.count += other.count
        self.examples = (self.examples + other.examples)[: self.keep]

    def report(self, what="malformed lines"):
        if self.count:
            print(f"skipped {self.count} {what}; first ones:")
            for e in self.examples:
                print(f"  {e}")


MAX_LINE_BYTES = 4 << 20  # the longest zhwiki article line is about 0.4 MB
MAX_JSON_FILE_BYTES = 256 << 20  # a SQuAD-style file is read whole (DRCD dev is 8 MB)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadJSON(ValueError):
    """Untrusted JSON that cannot be used; the message says why."""


def find_jsonl(path, pattern="*.jsonl", skipped=None):
    """A file, or every regular file matching `pattern` (or a tuple of them) under a folder
    (recursively), in a stable order.

    Matches that are not regular files (a FIFO, a symlink loop or a broken link, a folder named
    `x.jsonl`) are never opened (a FIFO would hang the reader) but go to `skipped` (a BadLines).
    """
    path, skipped = Path(path), skipped if skipped is not None else BadLines()
    kind = _file_kind(path)
    if kind == "file":
        return [path]
    if kind != "folder":
        skipped.add(str(path), kind)
        return []
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    found = {p for pat in patterns for p in path.rglob(pat)}
    files = []
    for p in sorted(found):
        kind = _file_kind(p)
        if kind == "file":
            files.append(p)
        else:
            skipped.add(str(p), f"{kind}, not a regular file")
    return files


def _file_kind(path):
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else "missing (or a broken link)"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a special file"


def read_lines(path, bad, max_bytes=MAX_LINE_BYTES):
    """Yield (line_number, raw bytes) of a file; a line longer than `max_bytes` is reported to `bad`
    and yielded as None, read in bounded pieces and never held whole in memory."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_bytes + 1):
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                bad.add(f"{path}:{lineno}", f"line longer than {max_bytes} bytes")
                raw = None
            yield lineno, raw


def load_json(raw):
    """Untrusted JSON text (bytes) -> its value; BadJSON for invalid UTF-8, invalid JSON, nesting
    too deep for the parser, or a lone surrogate escape (text that cannot be written as UTF-8)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadJSON("invalid UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadJSON(f"invalid JSON ({e.msg})") from None
    except RecursionError:
        raise BadJSON("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):  # pairs (emoji) escape as \ud83d too
        raise BadJSON("lone surrogate in a string")
    return obj


def _has_lone_surrogate(obj):
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def iter_jsonl(path, bad=None, required=("text",)):
    """Yield (line_number, object) for each well-formed JSON object line that has `required` keys.

    Invalid UTF-8, broken JSON, non-objects, missing keys and over-long lines go to `bad` with file:line.
    """
    bad = bad if bad is not None else BadLines()
    for lineno, raw in read_lines(path, bad):
        obj = parse_jsonl_line(raw, f"{path}:{lineno}", bad, required)
        if obj is not None:
            yield lineno, obj


def parse_jsonl_line(raw, where, bad, required=("text",)):
    """One raw jsonl line (bytes) -> its object, or None (blank, too long, or malformed: counted in `bad`)."""
    if raw is None or not raw.strip():
        return None
    try:
        obj = load_json(raw)
    except BadJSON as e:
        bad.add(where, str(e))
        return None
    if not isinstance(obj, dict):
        bad.add(where, "not a JSON object")
        return None
    missing = [k for k in required if not isinstance(obj.get(k), str)]
    if missing:
        bad.add(where, f"no string field {missing[0]!r}")
        return None
    return obj


def split_of(key, val_fraction, salt="minigpt-split"):
    """'val' or 'train' for an article key (id, title or text), the same on every run and machine.

    A sha1 of salt+key, not Python's salted hash(), so later stages (QA generation, evaluation) can
    tell which articles were held out of pretraining by calling this again.
    """
    # surrogatepass: the same bytes for any valid text, and no crash on a lone surrogate
    digest = hashlib.sha1(f"{salt}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def article_key(obj, text_field="text"):
    """The key an article is split by: its id, else its title, else its text."""
    for field in ("id", "title", text_field):
        if obj.get(field) not in (None, ""):
            return str(obj[field])
    return ""


# ----------------------------------------------------------------------------- corpus sources

CORPUS_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet")
PARQUET_BATCH_ROWS = 1024  # rows pyarrow decodes at a time: a row group is never read whole


class Chunk(NamedTuple):
    """A unit of work read from one corpus file: `kind` 'jsonl' (payload: bytes of whole lines) or
    'rows' (payload: a list of parquet row dicts); `first` is the number of its first line (1-based)
    or row (0-based); `disk_bytes` the bytes of the file read since the previous chunk (progress);
    `resume` where reading continues after it, (file index, offset, line) for `read_chunks(start=)`;
    `source` the index of the input it came from (the mix weight)."""
    path: str
    first: int
    kind: str
    payload: object
    disk_bytes: int
    resume: tuple
    source: int = 0


def source_format(path):
    name = Path(path).name.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl.gz", "gz"), (".jsonl.zst", "zst")):
        if name.endswith(suffix):
            return fmt
    return "jsonl"


def find_sources(path, skipped=None, held_out=None):
    """The corpus files of an input (jsonl, .jsonl.gz, .jsonl.zst, parquet; a file or a folder walked
    recursively), in a stable order, without the files no training set may read
    (`TRAINING_HELD_OUT`), which go to `held_out` (a BadLines) so the caller can say so."""
    files = []
    for p in find_jsonl(path, CORPUS_PATTERNS, skipped):
        if held_out_of_training(p):
            if held_out is not None:
                held_out.add(str(p), "held out of training (data_utils.TRAINING_HELD_OUT)")
        else:
            files.append(p)
    return files


@contextmanager
def open_decoded(path):
    """(decoded byte stream, the raw file under it) of a jsonl file, plain or compressed."""
    fmt = source_format(path)
    with open(path, "rb") as raw:
        if fmt == "gz":
            import gzip
            with gzip.GzipFile(fileobj=raw) as f:
                yield f, raw
        elif fmt == "zst":
            import zstandard
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as f:
                yield f, raw
        else:
            yield raw, raw


def _skip_bytes(f, n):
    """Read past the first `n` decoded bytes (a seek where the stream allows it)."""
    if f.seekable():
        f.seek(n)
        return
    while n > 0:
        got = len(f.read(min(n, 1 << 24)))
        if not got:
            raise ValueError("the file is shorter than when reading stopped")
        n -= got


def _jsonl_chunks(index, path, chunk_bytes, max_line_bytes, bad, offset=0, lineno=1):
    """Chunks of whole lines of one jsonl file (plain or compressed), from decoded byte `offset`.

    A line longer than `max_line_bytes` is dropped as soon as it is known to be too long and the
    rest of it is skipped unread into memory, so one line never takes more than about
    `max_line_bytes + chunk_bytes`; it is reported to `bad` (the caller counts it as malformed)."""
    with open_decoded(path) as (f, raw):
        _skip_bytes(f, offset)
        rest, skipping, disk = b"", False, raw.tell()
        while block := f.read(chunk_bytes):
            offset += len(block)
            if skipping:
                newline = block.find(b"\n")
                if newline < 0:
                    continue
                block, skipping, lineno = block[newline + 1:], False, lineno + 1
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                now = raw.tell()
                yield Chunk(str(path), lineno, "jsonl", block[:cut], now - disk, (index, offset - len(rest),
                                                                                 lineno + block.count(b"\n", 0, cut)))
                lineno, disk = lineno + block.count(b"\n", 0, cut), now
            if len(rest) > max_line_bytes:
                bad.add(f"{path}:{lineno}", f"line longer than {max_line_bytes} bytes")
                rest, skipping = b"", True
        if rest or raw.tell() > disk:
            yield Chunk(str(path), lineno, "jsonl", rest, raw.tell() - disk, (index + 1, 0, 1))


def _parquet_chunks(index, path, chunk_bytes, text_field, bad, row=0):
    """Chunks of parquet rows (the text field, plus id and title when present), decoded
    `PARQUET_BATCH_ROWS` at a time from row `row` on; a chunk closes once its text passes `chunk_bytes`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead the whole file (+63 MB of 63)
        names = pf.schema_arrow.names
        if text_field not in names:
            bad.add(str(path), f"no column {text_field!r} (columns: {', '.join(names[:10])})")
            return
        columns = [text_field] + [c for c in ("id", "title") if c in names and c != text_field]
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        first_group, before = 0, 0
        while first_group < len(sizes) and before + sizes[first_group] <= row:
            before += sizes[first_group]
            first_group += 1
        per_row = Path(path).stat().st_size / max(sum(sizes), 1)  # for the progress bar
        rows, text_bytes, start, drop = [], 0, row, row - before
        # one row group per reader, so nothing beyond the group being decoded is ever buffered
        batches = (batch for group in range(first_group, len(sizes))
                   for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group], columns=columns))
        for batch in batches:
            records = batch.to_pylist()
            if drop:  # resuming inside a row group: skip the rows before the position
                records, drop = records[drop:], max(0, drop - len(records))
            rows.extend(records)
            text_bytes += sum(len(r[text_field]) for r in records if isinstance(r[text_field], str))
            if text_bytes >= chunk_bytes:
                row = start + len(rows)
                yield Chunk(str(path), start, "rows", rows, round(len(rows) * per_row), (index, row, 0))
                rows, text_bytes, start = [], 0, row
        yield Chunk(str(path), start, "rows", rows, round(len(rows) * per_row), (index + 1, 0, 1))
    except (OSError, pa.ArrowException) as e:  # not parquet, truncated, corrupt: the rest of the file is lost
        bad.add(str(path), f"unreadable parquet ({str(e).splitlines()[0][:200]})")


def read_chunks(files, chunk_bytes, bad, text_field="text", max_line_bytes=MAX_LINE_BYTES, start=(0, 0, 1),
                sources=None):
    """Chunks (`Chunk`) of about `chunk_bytes` of records, file by file, from position `start` (a
    chunk's `resume`). The one reader of corpus files: prepare.py tokenises the chunks in a pool,
    tokenizer.py samples from them. Memory is bounded by the chunk size whatever the
    file size: jsonl is streamed (decompressed on the fly), parquet decoded a batch at a time.
    `sources[i]` is the input file i came from, passed on in its chunks; `text_field` is one name or
    one per input."""
    first, offset, lineno = start
    for index in range(first, len(files)):
        path, source = files[index], sources[index] if sources else 0
        field = text_field if isinstance(text_field, str) else text_field[source]
        if source_format(path) == "parquet":
            chunks = _parquet_chunks(index, path, chunk_bytes, field, bad, offset if index == first else 0)
        else:
            at = (offset, lineno) if index == first else (0, 1)
            chunks = _jsonl_chunks(index, path, chunk_bytes, max_line_bytes, bad, *at)
        try:
            for chunk in chunks:
                yield chunk._replace(source=source)
        except (OSError, EOFError, ValueError) as e:  # a truncated or corrupt compressed stream
            bad.add(str(path), f"unreadable ({str(e)[:200]}); the rest of the file is skipped")


def chunk_records(chunk, text_field, bad):
    """(where, object or None) of each non-blank record of a chunk: None for a malformed one,
    reported to `bad` (bad JSON or UTF-8, not an object, no string `text_field`)."""
    if chunk.kind == "jsonl":
        for offset, raw in enumerate(chunk.payload.split(b"\n")):
            if raw.strip():
                where = f"{chunk.path}:{chunk.first + offset}"
                yield where, parse_jsonl_line(raw, where, bad, (text_field,))
        return
    for offset, obj in enumerate(chunk.payload):
        where = f"{chunk.path}:row {chunk.first + offset}"
        if isinstance(obj.get(text_field), str):
            yield where, obj
        else:
            bad.add(where, f"no string field {text_field!r}")
            yield where, None


# ----------------------------------------------------------------------------- QA inputs

# Files no training set may read, whatever folder they are found in: DRCD test is the held-out
# reading-comprehension evaluation (CMRC2018 trial and DRCD dev may be trained on).
TRAINING_HELD_OUT = ("drcd_test*",)


def held_out_of_training(path):
    return any(fnmatch.fnmatch(Path(path).name.lower(), pattern) for pattern in TRAINING_HELD_OUT)


def clean_answers(texts):
    """Stripped, non-empty, distinct answer strings, in order."""
    return list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))


def qa_fields(obj):
    """A QA jsonl object (`{"question", "answer" | "answers", "context"?, "id"?, "title"?}`) as
    {question, answers, context, article}, or None when it is not a QA pair. `answers` may come back
    empty (blank answers); `article` is the key the pair is split by: its id, else title, else question."""
    question = obj.get("question")
    answers = obj.get("answers", [obj.get("answer")])
    if not isinstance(question, str) or not isinstance(answers, list) or not answers \
            or not all(isinstance(a, str) for a in answers):
        return None
    context = obj.get("context")
    return {"question": question.strip(), "answers": clean_answers(answers),
            "context": context if isinstance(context, str) and context.strip() else None,
            "article": str(obj.get("id") or obj.get("title") or question)}


def squad_questions(path, data, bad):
    """Every question of SQuAD-style data (CMRC2018, DRCD, XQuAD) as {id, article, question, answers,
    answer_start, context}: answers cleaned (possibly empty: the caller decides), `answer_start` the
    character offset of answers[0] in the context (None when unknown), `article` the split key (title,
    else id). An article or paragraph of the wrong shape is reported to `bad` and skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} is not SQuAD-style JSON (expected an object with a 'data' list)")
    name = Path(path).name
    for a_index, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            bad.add(f"{path}:article {a_index}", "unexpected SQuAD shape (no 'paragraphs' list)")
            continue
        key = str(article.get("title") or article.get("id") or f"{name}:{a_index}")
        for paragraph in paragraphs:
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list) or not isinstance(context, str):
                bad.add(f"{path}:article {a_index}", "unexpected SQuAD shape (a paragraph without 'context' or 'qas')")
                continue
            for q_index, qa in enumerate(qas):
                if not isinstance(qa, dict):
                    bad.add(f"{path}:article {a_index}", "unexpected SQuAD shape (a question that is not an object)")
                    continue
                golds = [a for a in qa.get("answers", []) if isinstance(a, dict) and isinstance(a.get("text"), str)]
                answers = clean_answers(a["text"] for a in golds)
                start = next((a.get("answer_start") for a in golds if a["text"].strip() == answers[0]), None) \
                    if answers else None
                start = _answer_offset(context, answers[0], start) if answers else None
                yield {"id": str(qa.get("id", f"{key}-{q_index}")), "article": key,
                       "question": qa["question"].strip() if isinstance(qa.get("question"), str) else "",
                       "answers": answers, "answer_start": start, "context": context}


def _answer_offset(context, answer, start):
    """Where `answer` starts in `context`: the given offset when it is right (around leading
    whitespace the gold text had), else the first occurrence, else None."""
    if isinstance(start, int) and not isinstance(start, bool) and 0 <= start <= len(context):
        for s in (start, start + 1, start - 1):
            if context[s:s + len(answer)] == answer:
                return s
    found = context.find(answer)
    return found if found >= 0 else None


def load_qa(path, bad=None):
    """Questions for the evaluations and DPO, as dicts {id, article, question, answers, context}
    (SQuAD-style also `answer_start`): SQuAD-style JSON or QA jsonl.

    jsonl lines hold `question` and `answer` (or a list `answers`), optionally `context`; generated
    pairs share their article's `id`, so ids get a per-article counter (`<article>-<k>`). A question
    without a usable gold answer is reported to `bad`.
    """
    path = Path(path)
    bad = bad if bad is not None else BadLines()
    if not path.is_file():
        raise FileNotFoundError(f"QA input {path} not found")
    if path.suffix == ".json":
        data = read_json_file(path)
        if not isinstance(data, BadJSON):
            examples = []
            for q in squad_questions(path, data, bad):
                if q["question"] and q["answers"]:
                    examples.append(q)
                else:
                    bad.add(f"{path}:{q['id']}", "no question or no gold answer")
            return examples
        # not one JSON document: perhaps one object per line, read as jsonl below
    examples, per_article = [], {}
    for lineno, obj in iter_jsonl(path, bad, required=("question",)):
        q = qa_fields(obj)
        if q is None or not q["answers"]:
            bad.add(f"{path}:{lineno}", "no string answer")
            continue
        prefix = str(obj.get("id", f"{path.name}:{lineno}"))
        per_article[prefix] = per_article.get(prefix, -1) + 1
        examples.append({"id": f"{prefix}-{per_article[prefix]}", **q})
    return examples


def read_json_file(path, max_bytes=MAX_JSON_FILE_BYTES):
    """A whole JSON file's value, or the BadJSON saying why it cannot be used (also: too large)."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        return BadJSON(f"file of {size} bytes, over the {max_bytes}-byte limit for one JSON document")
    try:
        return load_json(Path(path).read_bytes())
    except BadJSON as e:
        return e


# ----------------------------------------------------------------------------- cleaning

# Leftovers of wiki extraction: brackets whose content was a template or a foreign spelling that
# the extractor dropped, possibly with stray separators left inside: （）, （，）, （；）, ()...
_EMPTY_BRACKETS = re.compile(r"[（(]\s*[，,；;、:：\s]*\s*[)）]|「\s*」|《\s*》|〈\s*〉|“\s*”|\[\s*\]|【\s*】")
_MARKUP = re.compile(r"-\{|\}-|</?(?:div|span|br|ref|small|sup|sub|center|p)\b[^>]*>", re.I)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&nbsp;": " "}
_ENTITY = re.compile("|".join(map(re.escape, _ENTITIES)))
# Section headings come out of the extractor as short lines ending in "." ("背景与创作.").
_HEADING = re.compile(r"^[^。！？!?]{1,40}\.$")
SENTENCE_END = "。！？!?…"
# A sentence ends at 。！？ (or ! ? …), optionally followed by closing quotes or brackets.
_SENTENCE = re.compile(r"[^。！？!?…\n]*(?:[。！？!?…]+[”’」』）)]*|$)")


def clean_article(text, drop_title=True):
    """Clean one article's text: drop the title line, extraction leftovers and section headings.

    Returns the body as paragraphs joined by single newlines ('' when nothing is left).
    """
    if drop_title:
        head, sep, body = text.partition("\n\n")
        text = body if sep else ""
    text = _ENTITY.sub(lambda m: _ENTITIES[m.group()], text)
    text = _MARKUP.sub("", text)
    text = _EMPTY_BRACKETS.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if line and not _HEADING.match(line):
            lines.append(line)
    return "\n".join(lines)


# Control characters but tab and newline (C0, DEL, C1): never text, often extraction debris.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
CLEAN_MODES = ("wiki", "none")


def clean_plain(text):
    """What every corpus needs and no more (`--clean none`): Unicode NFC (so one character has one
    encoding and one tokenisation; not NFKC, which would turn full-width ，。 into ASCII), line
    breaks made "\n", control characters dropped, tabs made spaces, lines stripped and blank ones
    dropped (paragraphs joined by single newlines, as `clean_article` returns). No title line is
    assumed and nothing else is removed; the minimum length is the caller's (`--min_chars`)."""
    text = unicodedata.normalize("NFC", _LINE_BREAKS.sub("\n", text))
    text = _CONTROL.sub("", text.replace("\t", " "))
    return "\n".join(line for line in (raw.strip() for raw in text.split("\n")) if line)


def clean_document(text, mode="wiki"):
    """A document's cleaned body by `--clean` mode: 'wiki' (`clean_article`) or 'none' (`clean_plain`)."""
    return clean_article(text) if mode == "wiki" else clean_plain(text)


def split_sentences(text):
    """Split cleaned text into sentences that keep their end punctuation (and newlines as ends).

    Concatenating the result gives back the text without its newlines.
    """
    out = []
    for para in text.split("\n"):
        out.extend(s for s in _SENTENCE.findall(para) if s)
    return out


def count_chars(text):
    """Characters as bits-per-character counts them: every Unicode code point but newlines."""
    return len(text) - text.count("\n")


# ----------------------------------------------------------------------------- files


def token_dtype(n_vocab):
    """The one rule for token files: uint16 while every id fits, else uint32."""
    return np.dtype("uint16" if n_vocab <= 2**16 else "uint32")


def _temporary(path, pid):
    return path.with_name(f".{path.name}.tmp{pid}")


@contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp = _temporary(path, os.getpid())
    remove_stale_temporaries(path.parent, [path.name])  # a killed earlier write of this same file
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder, names, max_age_s=24 * 3600):
    """Remove the temporaries of `names` in `folder` left by killed runs: `.NAME.tmpPID` (files of
    `atomic_write`, folders of retrieval.py) and `.NAME.oldPID` (a folder moved aside while its
    replacement is renamed in), whose process is gone. A pid may have been reused: where the
    process start time is known (Linux) a process that started after the temporary was last
    written is not its maker; elsewhere a temporary older than `max_age_s` counts as stale.
    Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    pattern = re.compile(rf"\.({'|'.join(map(re.escape, names))})\.(?:tmp|old)(\d+)")
    for p in folder.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(2)) == os.getpid():
            continue
        try:
            if not _maker_gone(int(m.group(2)), p.lstat().st_mtime, max_age_s):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:  # another run cleaned it first
            pass
    return removed


def _maker_gone(pid, mtime, max_age_s):
    """Is the process that last wrote a temporary at `mtime` gone?"""
    if not _alive(pid):
        return True
    started = _start_time(pid)
    if started is None:
        return time.time() - mtime > max_age_s
    return started > mtime + 1  # clock-tick resolution; a reused pid started after the write


def _start_time(pid):
    """When process `pid` started (Unix time), from /proc; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in brackets, may hold spaces
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or not a pid this system can have
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run data/prepare.py (or data/prepare_sft.py) first")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- masks and batches


def loss_mask(y, special, kind, mask_eot=False):
    """Which target positions count in the loss, from the target tokens alone (vectorised).

    y: (B, T) integer tensor of targets (block[1:]). PAD never counts.
    - kind='pretrain': every token counts, except EOT when `mask_eot` (the original excluded it).
    - kind='sft': only answer spans count: the tokens after an answer separator (or an assistant
      role token) up to and including the EOT / end-of-turn that closes them. A span that starts
      before the block is cut (the first target) cannot be seen, so SFT blocks always start with
      the prompt, which prepare_sft.py guarantees.
    """
    import torch  # imported here: the data preparation scripts use this module without torch

    pad, eot = special["pad"], special["eot"]
    if kind == "pretrain":
        mask = y != pad
        if mask_eot:
            mask &= y != eot
        return mask
    starts = [special[k] for k in ("answer", "assistant") if k in special]
    stops = [special[k] for k in ("eot", "end") if k in special]
    T = y.shape[1]
    pos = torch.arange(T, device=y.device).expand_as(y)
    none = torch.full_like(y, -1)
    # last position (strictly before t) holding a start token / a stop token
    last_start = torch.where(torch.isin(y, torch.tensor(starts, device=y.device)), pos, none).cummax(1).values
    last_stop = torch.where(torch.isin(y, torch.tensor(stops, device=y.device)), pos, none).cummax(1).values
    last_start = torch.cat([none[:, :1], last_start[:, :-1]], 1)
    last_stop = torch.cat([none[:, :1], last_stop[:, :-1]], 1)
    return (last_start > last_stop) & (y != pad)


class ShardedBlocks:
    """The blocks of numbered shard files (meta.json `shards`), indexed as one `(n_blocks, block_size)`
    array: `blocks[indices]` gathers rows from each shard's memmap, so memory holds only the rows asked."""

    def __init__(self, paths, dtype, block_size):
        self.maps = [np.memmap(p, dtype=np.dtype(dtype), mode="r").reshape(-1, block_size)
                     for p in paths if Path(p).stat().st_size]  # np.memmap cannot map an empty file
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.block_size, self.dtype = block_size, np.dtype(dtype)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim == 0:
            return self[indices[None]][0]
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.block_size), dtype=self.dtype)
        for s in np.unique(shard).tolist():
            take = shard == s
            out[take] = self.maps[s][indices[take] - self.starts[s]]
        return out


class BlockData:
    """Memory-mapped blocks of one split, `(n_blocks, block_size)`, with two ways to draw batches.

    - `random`: each batch draws blocks uniformly with replacement (nanoGPT's way).
    - `sequential`: the original's `if_trav`: an epoch visits every block once, in an order shuffled
      once per epoch from (seed, epoch); `state()` / `load_state()` make the position resumable.
    """

    def __init__(self, data_dir, split, seed=1337):
        self.meta = load_meta(data_dir)
        self.block_size = self.meta["block_size"]
        names = self.meta.get("shards", {}).get(split, [f"{split}.bin"])
        paths = [Path(data_dir) / name for name in names]
        if sum(p.stat().st_size for p in paths) == 0:
            where = paths[0] if len(paths) == 1 else f"{data_dir} ({split} shards)"
            raise ValueError(f"{where} holds no blocks (raise --val_fraction when preparing a small corpus)")
        self.data = ShardedBlocks(paths, self.meta["dtype"], self.block_size)
        if len(self.data.maps) == 1:
            self.data = self.data.maps[0]  # one file: the memmap itself, no gather
        self.n_blocks = len(self.data)
        self.seed, self.epoch, self.cursor = seed, 0, 0
        self._order = None

    def _perm(self):
        if self._order is None:
            g = np.random.default_rng([self.seed, self.epoch])
            self._order = g.permutation(self.n_blocks)
        return self._order

    def next_indices(self, batch_size, sampling, rng):
        if sampling == "random":
            return rng.integers(0, self.n_blocks, size=batch_size)
        idx = []
        while len(idx) < batch_size:
            order = self._perm()
            take = order[self.cursor : self.cursor + batch_size - len(idx)]
            idx.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= self.n_blocks:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return np.array(idx)

    def batch(self, indices, device="cpu", kind=None, mask_eot=False, trim=False):
        """x, y, loss_mask for the given block indices.

        `trim` drops the trailing columns that no row counts in its loss (rounded up to a multiple
        of 64 columns): the model is causal, so earlier positions' outputs, the loss and the
        gradient are exactly the same, and short SFT examples padded to a long block cost a
        fraction of the compute.
        """
        import torch

        blocks = torch.from_numpy(self.data[np.asarray(indices)].astype(np.int64))
        x, y = blocks[:, :-1], blocks[:, 1:]
        mask = loss_mask(y, self.meta["special"], kind or self.meta["kind"], mask_eot)
        if trim:
            counted = mask.any(0).nonzero()
            keep = min(x.size(1), -(-(int(counted.max()) + 1) // 64) * 64) if len(counted) else 1
            x, y, mask = x[:, :keep], y[:, :keep], mask[:, :keep]
        if str(device).startswith("cuda"):
            return [t.pin_memory().to(device, non_blocking=True) for t in (x, y, mask)]
        return x.to(device), y.to(device), mask.to(device)

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state):
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


def evaluate_blocks(model, data, indices, tok, batch_size, device, ctx=None, rank=0, world=1):
    """Masked mean loss, perplexity and bits per character over the given blocks of `data`.

    Sums over every masked target (not a mean of batch means), so the numbers do not depend on the
    batch size. bits/char = total nats / ln 2 / characters of the masked targets, each row's masked
    targets decoded with `tok.decode` (special tokens count in the loss but have no characters).
    Used by training (val_ppl, val_bpc) and evaluations/perplexity.py alike. `ctx` is the context
    each forward runs in, e.g. autocast (None: no context).

    Under DDP (`world` > 1, torch.distributed initialised) the ranks share the work as they share
    a training step: the blocks are cut into global batches of `batch_size * world`, each rank scores
    its interleaved slice, and one all-reduce of the per-(batch, rank) sums (each entry non-zero on
    one rank only, so adding the zeros is exact) gives every rank the same numbers, added in the
    same order. 2 ranks x 8 blocks thus score exactly the blocks 1 x 16 scores (equal to float32
    rounding: the forwards are cut differently).
    """
    import torch

    ctx = nullcontext() if ctx is None else ctx
    indices = list(indices)
    step = batch_size * world
    starts = range(0, len(indices), step)
    sums = torch.zeros(len(starts), world, 3, dtype=torch.float64)  # nats, tokens, chars
    was_training = model.training
    model.eval()
    for j, start in enumerate(starts):
        part = indices[start:start + step][rank::world]
        if not part:
            continue
        x, y, mask = data.batch(part, device)
        with ctx, torch.no_grad():
            _, loss = model(x, y, mask)
        n = int(mask.sum())
        chars = sum(count_chars(tok.decode(row[keep].tolist())) for row, keep in zip(y.cpu(), mask.cpu()))
        sums[j, rank] = torch.tensor([float(loss) * n, n, chars], dtype=torch.float64)
    model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        on_device = sums.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(on_device)
        sums = on_device.cpu()
    sums = sums.reshape(-1, 3)
    nats = sum(sums[:, 0].tolist())  # in batch order, as one process adds them
    tokens, chars = int(sums[:, 1].sum()), int(sums[:, 2].sum())
    if tokens == 0:
        raise ValueError("no target tokens to score in these blocks (all padding, or no answer spans)")
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpc": nats / math.log(2) / chars if chars else None,
            "tokens": tokens, "chars": chars, "blocks": len(indices)}
