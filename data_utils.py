"""Data helpers shared by the preparation scripts, training and evaluation.

- Reading wiki jsonl robustly: malformed lines are counted and the first few reported with
  file:line, never fatal (`iter_jsonl`, `BadLines`).
- Cleaning a wiki article the same way everywhere (`clean_article`, `split_sentences`), so the text
  the model is pretrained on, the text QA pairs are generated from and the text evaluations prompt
  with all agree.
- The block layout on disk and the loss mask (`loss_mask`, `BlockData`): every block is exactly
  `block_size` tokens, `[tokens..., EOT, PAD...]` (pretraining rows cut inside an article have
  no EOT: it marks only true document ends), and the model sees `x = block[:-1]`,
  `y = block[1:]`. The mask is computed from the tokens alone (vectorised), so no mask file is
  stored and pretraining and SFT data share one format.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

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


def article_key(obj):
    """The key an article is split by: its id, else its title, else its text."""
    for field in ("id", "title", "text"):
        if obj.get(field) not in (None, ""):
            return str(obj[field])
    return ""


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


class BlockData:
    """Memory-mapped blocks of one split, `(n_blocks, block_size)`, with two ways to draw batches.

    - `random`: each batch draws blocks uniformly with replacement (nanoGPT's way).
    - `sequential`: the original's `if_trav`: an epoch visits every block once, in an order shuffled
      once per epoch from (seed, epoch); `state()` / `load_state()` make the position resumable.
    """

    def __init__(self, data_dir, split, seed=1337):
        self.meta = load_meta(data_dir)
        self.block_size = self.meta["block_size"]
        path = Path(data_dir) / f"{split}.bin"
        if path.stat().st_size == 0:  # np.memmap cannot map an empty file
            raise ValueError(f"{path} holds no blocks (raise --val_fraction when preparing a small corpus)")
        self.data = np.memmap(path, dtype=np.dtype(self.meta["dtype"]), mode="r").reshape(-1, self.block_size)
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


def evaluate_blocks(model, data, indices, tok, batch_size, device, ctx=None):
    """Masked mean loss, perplexity and bits per character over the given blocks of `data`.

    Sums over every masked target (not a mean of batch means), so the numbers do not depend on the
    batch size. bits/char = total nats / ln 2 / characters of the masked targets, each row's masked
    targets decoded with `tok.decode` (special tokens count in the loss but have no characters).
    Used by training (val_ppl, val_bpc) and evaluations/perplexity.py alike. `ctx` is the context
    each forward runs in, e.g. autocast (None: no context).
    """
    import torch

    ctx = nullcontext() if ctx is None else ctx
    indices = list(indices)
    was_training = model.training
    model.eval()
    nats, tokens, chars = 0.0, 0, 0
    for start in range(0, len(indices), batch_size):
        x, y, mask = data.batch(indices[start:start + batch_size], device)
        with ctx, torch.no_grad():
            _, loss = model(x, y, mask)
        n = int(mask.sum())
        nats += float(loss) * n
        tokens += n
        for row, keep in zip(y.cpu(), mask.cpu()):
            chars += count_chars(tok.decode(row[keep].tolist()))
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no target tokens to score in these blocks (all padding, or no answer spans)")
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpc": nats / math.log(2) / chars if chars else None,
            "tokens": tokens, "chars": chars, "blocks": len(indices)}

