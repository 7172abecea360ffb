"""Data helpers shared by the preparation scripts, training and evaluation.

- Reading wiki jsonl robustly: malformed lines are counted and the first few reported with
  file:line, never fatal (`iter_jsonl`, `BadLines`).
- Cleaning a wiki article the same way everywhere (`clean_article`, `split_sentences`), so the text
  the model is pretrained on, the text QA pairs are generated from and the text evaluations prompt
  with all agree.
- The block layout on disk and the loss mask (`loss_mask`, `BlockData`): every block is exactly
  `block_size` tokens, `[tokens..., EOT, PAD...]`, and the model sees `x = block[:-1]`,
  `y = block[1:]`. The mask is computed from the tokens alone (vectorised), so no mask file is
  stored and pretraining and SFT data share one format.
- Writing files atomically (`atomic_write`): a temporary file renamed at the end, so an
  interrupted run never leaves a complete-looking output.
"""
import hashlib
import json
import math
import os
import re
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


def find_jsonl(path, pattern="*.jsonl"):
    """A file, or every matching file under a folder (recursively), in a stable order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(pattern) if p.is_file())


def iter_jsonl(path, bad=None, required=("text",)):
    """Yield (line_number, object) for each well-formed JSON object line that has `required` keys.

    Invalid UTF-8, broken JSON, non-objects and missing keys go to `bad` with file:line.
    """
    bad = bad if bad is not None else BadLines()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            obj = parse_jsonl_line(raw, f"{path}:{lineno}", bad, required)
            if obj is not None:
                yield lineno, obj


def parse_jsonl_line(raw, where, bad, required=("text",)):
    """One raw jsonl line (bytes) -> its object, or None (blank, or malformed: counted in `bad`)."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        bad.add(where, "invalid UTF-8")
        return None
    except json.JSONDecodeError as e:
        bad.add(where, f"invalid JSON ({e.msg})")
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
    digest = hashlib.sha1(f"{salt}\0{key}".encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def article_key(obj):
    """The key an article is split by: its id, else its title, else its text."""
    for field in ("id", "title", "text"):
        if obj.get(field) not in (None, ""):
            return str(obj[field])
    return ""


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


@contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def evaluate_blocks(model, data, indices, tok, batch_size, device, ctx=nullcontext()):
    """Masked mean loss, perplexity and bits per character over the given blocks of `data`.

    Sums over every masked target (not a mean of batch means), so the numbers do not depend on the
    batch size. bits/char = total nats / ln 2 / characters of the masked targets, each row's masked
    targets decoded with `tok.decode` (special tokens count in the loss but have no characters).
    Used by training (val_ppl, val_bpc) and evaluations/perplexity.py alike.
    """
    import torch

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

