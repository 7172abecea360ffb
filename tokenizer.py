"""The one tokenizer wrapper: a byte-level BPE trained with `tokenizers`, run with `tiktoken`.

Design:
- Training uses the Rust `tokenizers` trainer (minutes on 2 cores for 32k merges); encoding and
  decoding use `tiktoken`, which is faster and has a tiny on-disk format. Both split text with the
  same regex (`PATTERN`) and the trained merges become tiktoken ranks, so the two give identical
  ids (tests/test_tokenizer.py checks it on held-out wiki text).
- `PATTERN` keeps runs of Han characters together (so BPE can learn multi-character words, which
  is where the characters-per-token gain on Chinese comes from), separates them from Latin
  letters, digits (1-3 at a time) and punctuation. It is llama.cpp's "kimi-k2" pre-tokenizer
  written as a regex, so a GGUF export splits text exactly as we do (export.py); tokenizers
  trained earlier keep their own pattern (`HAN_RUNS_PATTERN`, recorded in their tokenizer.json).
- Special tokens sit after the BPE ids. Only code inserts them (by id): user text is always
  encoded as ordinary text, so typing "<|endoftext|>" cannot end a document or fake a role.
- A tokenizer is a folder: `ranks.tiktoken` (base64 token, rank) + `tokenizer.json` (pattern,
  special tokens, and a sha256 of both). Its identity is a `TokenizerId`: the sha256 of its content
  (the folder may be copied anywhere), or GPT-2's. Every "same tokenizer?" check in the project is
  `TokenizerId` equality; meta.json and checkpoints hold its `to_json()` form.
- `gpt2` stays available for compatibility: GPT-2's ranks with EOT 50256, our other special tokens
  appended from 50257.
"""
import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import gpt2 as tiktoken_gpt2

# The split pattern of tokenizers trained before llama.cpp export existed (their tokenizer.json keeps it,
# so they load and encode as before): Han runs by Unicode script, contractions split off words.
HAN_RUNS_PATTERN = (
    r"\p{Han}+"
    r"|'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})\p{L})+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# llama.cpp's "kimi-k2" pre-tokenizer (src/unicode.cpp, unicode_regex_split_custom_kimi_k2) written as
# the regex it computes: Han is its list of CJK blocks (not the Unicode script: 〇 and 々 are not in
# it), a word of other letters keeps a trailing English contraction, and the rest is our old pattern.
_HAN_BLOCKS = "".join(f"{chr(a)}-{chr(b)}" for a, b in (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF),
    (0x2F800, 0x2FA1F)))
KIMI_K2_PATTERN = (
    f"[{_HAN_BLOCKS}]+"
    f"|[^\\r\\n\\p{{L}}\\p{{N}}]?(?:(?![{_HAN_BLOCKS}])\\p{{L}})+(?:'[sStTmMdD]|'[rR][eE]|'[vV][eE]|'[lL][lL])?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# the pattern new tokenizers are trained with; a tokenizer's own is in its tokenizer.json
PATTERN = KIMI_K2_PATTERN
SPLIT_PATTERNS = {"kimi-k2": KIMI_K2_PATTERN, "han-runs": HAN_RUNS_PATTERN}  # by name, for benchmarks
# llama.cpp's name (GGUF `tokenizer.ggml.pre`) of each split pattern it computes exactly
LLAMA_CPP_PRE_TOKENIZERS = {KIMI_K2_PATTERN: "kimi-k2"}
# name -> spelling; the order fixes their ids after the BPE vocabulary
SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "pad": "<|pad|>",
    "answer": "<|answer|>",  # separates question and answer (the original design's "##")
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",  # end of a chat turn
}
DEFAULT_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class TokenizerId:
    """Which tokenizer ids belong to: GPT-2's (`sha256` None) or a trained one, named by the sha256 of
    its ranks and pattern. `path` records where it was found, a hint for loading it again; it is not
    part of the identity, so equality (`==`) is the one "same tokenizer?" check.

    On disk (meta.json, checkpoints) it is `"gpt2"` or `{"path": ..., "sha256": ...}`: `to_json`,
    `from_json`.
    """

    sha256: str | None = None
    path: str | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, value):
        if isinstance(value, cls):
            return value
        if value == "gpt2":
            return cls()
        if isinstance(value, dict) and isinstance(value.get("sha256"), str):
            path = value.get("path")
            return cls(value["sha256"], None if path is None else str(path))
        raise ValueError(f"not a tokenizer identity: {value!r} (expected \"gpt2\" or {{\"path\", \"sha256\"}})")

    def to_json(self):
        return "gpt2" if self.is_gpt2 else {"path": self.path, "sha256": self.sha256}

    @property
    def is_gpt2(self):
        return self.sha256 is None

    def short(self):
        """For messages and tables: 'gpt2' or 'sha256 0123456789ab'."""
        return "gpt2" if self.is_gpt2 else f"sha256 {self.sha256[:12]}"

    def load(self, *folders):
        """The tokenizer this names: the first of `folders` (then the recorded path) holding it."""
        if self.is_gpt2:
            return load_tokenizer("gpt2")
        candidates = [Path(f) for f in folders] + ([Path(self.path)] if self.path else [])
        for folder in candidates:
            if (folder / "tokenizer.json").exists():
                tok = load_tokenizer(folder)
                if tok.identity == self:
                    return tok
        raise FileNotFoundError(f"the tokenizer {self.short()} is in none of: {', '.join(map(str, candidates))}")


def _bytes_to_unicode():
    """GPT-2's map from bytes to printable characters, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def passage_qa_prompt(passage, question):
    """The one passage + question prompt (SFT --with_context, DPO --with_context, qa_eval --with_context):
    the passage, a newline, the question. Text, because evaluations send text prompts to `Run`."""
    return passage.strip() + "\n" + question.strip()


class Tokenizer:
    """Encode/decode text; knows the special token ids as attributes (tok.eot, tok.pad, ...)."""

    def __init__(self, enc, special, identity):
        self.enc = enc
        self.special = special  # name -> id
        self.identity = identity
        for name, idx in special.items():
            setattr(self, name, idx)
        self.n_vocab = enc.n_vocab
        self._special_ids = frozenset(special.values())

    def encode(self, text):
        """Ordinary text only: special-token spellings inside `text` stay plain text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        """Text of the ordinary tokens; special tokens are dropped."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return self.enc.decode_bytes([i for i in ids if i not in self._special_ids])

    def is_special(self, idx):
        return idx in self._special_ids

    # -- prompt layouts shared by data preparation, sampling, serving and evaluation --

    def encode_qa(self, question, answer=None):
        """question <|answer|> [answer <|endoftext|>] — the SFT layout; without answer, a prompt."""
        ids = self.encode(question) + [self.answer]
        if answer is not None:
            ids += self.encode(answer) + [self.eot]
        return ids

    def encode_passage_qa(self, passage, question, answer=None):
        """The reading-comprehension layout: `passage_qa_prompt` then the SFT layout (`encode_qa`)."""
        return self.encode_qa(passage_qa_prompt(passage, question), answer)

    def encode_chat(self, messages, add_generation_prompt=True):
        """<|role|> content <|end|> per message; a prompt ends with <|assistant|>.

        A finished conversation (training data) ends with <|endoftext|> instead.
        """
        ids = []
        for m in messages:
            role = m["role"]
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r} (expected system, user or assistant)")
            ids += [self.special[role]] + self.encode(m["content"]) + [self.end]
        return ids + ([self.assistant] if add_generation_prompt else [self.eot])

    def stop_ids(self, mode):
        return {self.eot, self.end} if mode == "chat" else {self.eot}

    def save(self, folder):
        """Write this tokenizer's folder (used to keep a copy inside each run directory)."""
        src = self.identity.path
        if src is None:
            return
        folder = Path(folder)
        if folder.resolve() == Path(src).resolve():
            return
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


class StreamDecoder:
    """Token ids in, text out, never a U+FFFD for a character split across tokens.

    Bytes of an incomplete UTF-8 sequence at the end are held back until the next token completes
    them; `flush()` returns what is left (invalid bytes then become U+FFFD, as they must).
    """

    def __init__(self, tok):
        self.tok, self.pending = tok, b""

    def push(self, idx):
        if self.tok.is_special(idx):
            return ""
        self.pending += self.tok.enc.decode_single_token_bytes(idx)
        # keep at most the last 3 bytes if they start an unfinished multi-byte sequence
        cut = len(self.pending)
        for back in range(1, min(4, len(self.pending)) + 1):
            b = self.pending[-back]
            if b & 0xC0 == 0x80:  # continuation byte: look further back
                continue
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            if need > back:
                cut = len(self.pending) - back
            break
        text = self.pending[:cut].decode("utf-8", errors="replace")
        self.pending = self.pending[cut:]
        return text

    def flush(self):
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def file_sha256(path, chunk=1 << 20):
    """The sha256 of a file, read in chunks (checkpoints may be larger than memory allows twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(spec="data/tokenizer"):
    """A tokenizer folder path, 'gpt2', a `TokenizerId`, or its JSON form from meta.json / a checkpoint."""
    if isinstance(spec, (dict, TokenizerId)):
        ident = TokenizerId.from_json(spec)
        if not ident.is_gpt2 and ident.path is None:
            raise FileNotFoundError(f"the tokenizer {ident.short()} has no recorded path to load it from")
        spec = "gpt2" if ident.is_gpt2 else ident.path
    if spec == "gpt2":
        # offline: the course's cached GPT-2 files, unless the user pointed tiktoken elsewhere
        shared_cache = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"
        if shared_cache.is_dir():
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_cache))
        # tiktoken's own public constructor of the encoding (its plugin module), not the private
        # attributes of an Encoding: GPT-2's pattern and ranks plus our special tokens after them
        base = tiktoken_gpt2()
        n_base = base["explicit_n_vocab"]
        special = {"eot": base["special_tokens"]["<|endoftext|>"]}
        extra = {}
        for i, name in enumerate(n for n in SPECIAL_TOKENS if n != "eot"):
            special[name] = n_base + i
            extra[SPECIAL_TOKENS[name]] = n_base + i
        enc = tiktoken.Encoding("gpt2-minigpt", pat_str=base["pat_str"], mergeable_ranks=base["mergeable_ranks"],
                                special_tokens={**base["special_tokens"], **extra})
        return Tokenizer(enc, special, TokenizerId())
    folder = Path(spec)
    config_path, ranks_path = folder / "tokenizer.json", folder / "ranks.tiktoken"
    if not config_path.exists() or not ranks_path.exists():
        raise FileNotFoundError(f"no tokenizer at {folder} (expected tokenizer.json and ranks.tiktoken); "
                                "train one with `python tokenizer.py --input DIR` or let data/prepare.py do it")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    ranks = {}
    for line in ranks_path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    digest = hashlib.sha256(ranks_path.read_bytes() + config["pattern"].encode()).hexdigest()
    if digest != config["sha256"]:
        raise ValueError(f"tokenizer at {folder} is corrupt: its files do not match the recorded sha256")
    specials = config["special_tokens"]  # name -> [spelling, id]
    enc = tiktoken.Encoding(f"minigpt-{digest[:8]}", pat_str=config["pattern"], mergeable_ranks=ranks,
                            special_tokens={s: i for s, i in specials.values()})
    identity = TokenizerId(digest, str(folder))
    return Tokenizer(enc, {name: i for name, (_, i) in specials.items()}, identity)


def train_bpe(texts, n_merged_vocab, pattern=PATTERN):
    """The `tokenizers` byte-level BPE trained on `texts`, splitting with `pattern` (tests compare it with tiktoken)."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_merged_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    hf.train_from_iterator(texts, trainer)
    return hf


def train_tokenizer(texts, folder, vocab_size=DEFAULT_VOCAB_SIZE, pattern=PATTERN):
    """Train byte-level BPE on an iterable of strings and write the tokenizer folder atomically."""
    n_special = len(SPECIAL_TOKENS)
    ranks = ranks_from_hf(train_bpe(texts, vocab_size - n_special, pattern))
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ranks_text = "".join(f"{base64.b64encode(t).decode()} {r}\n"
                         for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    (tmp / "ranks.tiktoken").write_text(ranks_text)
    digest = hashlib.sha256(ranks_text.encode() + pattern.encode()).hexdigest()
    specials = {name: [s, len(ranks) + i] for i, (name, s) in enumerate(SPECIAL_TOKENS.items())}
    config = {"pattern": pattern, "special_tokens": specials, "vocab_size": len(ranks) + n_special, "sha256": digest}
    (tmp / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return load_tokenizer(folder)


def ranks_from_hf(hf):
    """tiktoken ranks from a trained `tokenizers` BPE: bytes first, then merges in merge order.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, which replays the
    trainer's merge list exactly when rank = position of the merge that created the token.
    """
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    to_bytes = lambda s: bytes(byte_of[c] for c in s)  # noqa: E731
    ranks = {bytes([b]): b for b in range(256)}
    merges = json.loads(hf.to_str())["model"]["merges"]
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = to_bytes(left) + to_bytes(right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def sample_texts(inputs, max_chars=16_000_000, text_field="text", clean="wiki", min_chars=50):
    """Cleaned document bodies, about `max_chars` in total, spread over all files of the inputs (a
    path or a list of them; any corpus format data/prepare.py reads, through the same reader
    `data_utils.read_chunks`, and never the files held out of training)."""
    from data_utils import BadLines, chunk_records, clean_document, find_sources, read_chunks

    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = [f for path in paths for f in find_sources(path)]
    per_file = max_chars // max(len(files), 1)
    bad = BadLines()
    for path in files:
        got = 0
        records = (obj for chunk in read_chunks([path], 1 << 20, bad, text_field)
                   for _, obj in chunk_records(chunk, text_field, bad) if obj is not None)
        for obj in records:
            body = clean_document(obj[text_field], clean)
            if len(body) >= min_chars:
                yield body
                got += len(body)
                if got >= per_file:
                    break
    bad.report()


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Train the Chinese byte-level BPE tokenizer on a corpus.")
    ap.add_argument("--input", required=True, nargs="+",
                    help="files or folders (walked for *.jsonl, *.jsonl.gz, *.jsonl.zst, *.parquet)")
    ap.add_argument("--text_field", default="text", help="the field (jsonl) or column (parquet) holding the text")
    ap.add_argument("--clean", choices=("wiki", "none"), default="wiki", help="as data/prepare.py --clean")
    ap.add_argument("--out", default="data/tokenizer")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--max_chars", type=int, default=16_000_000, help="characters sampled for training")
    args = ap.parse_args()
    t0 = time.time()
    tok = train_tokenizer(sample_texts(args.input, args.max_chars, args.text_field, args.clean), args.out,
                          args.vocab_size)
    print(f"trained {tok.n_vocab}-token tokenizer in {time.time() - t0:.0f}s -> {args.out} ({tok.identity.short()})")
