"""BM25 retrieval over the Chinese Wikipedia corpus, and the RAG prompt that feeds its passages to the model.

    python retrieval.py --input ../shared/data/zhwiki --out data/index     # build (minutes)
    python retrieval.py --index data/index --query "长江全长多少公里？" --k 5   # search from the terminal

A small model cannot store Wikipedia but can learn to read: retrieval hands it the passage.

Design:
- Passages: each article is cleaned like the pretraining data (`data_utils.clean_article`), cut into
  sentences (`split_sentences`) and packed greedily into passages of at most `passage_chars` characters
  (default 250: a few passages fit a 512-token prompt). A sentence longer than that is cut into
  pieces. Every passage keeps its article's title and id (`data_utils.article_key`).
- Terms (`analyze`): Latin/digit runs are lowercased words; Han runs become character unigrams plus
  bigrams (`bigram`, the default) or jieba words (`jieba`). BENCHMARKS.md compares the two: about
  the same recall on CMRC2018 / DRCD (jieba a little ahead on one, bigrams on the other), but
  bigrams need no dictionary and build 3.4x faster; jieba's index needs half the memory. The title is
  indexed with its passage (questions name the entity).
- Scoring: `bm25s` (Lucene BM25, k1=1.5, b=0.75) builds a sparse term x passage score matrix, so a
  query is a sum of a few matrix columns. Terms are turned into ids here, through one vocabulary dict
  whose int objects every passage's id list shares, which keeps memory at one pointer per term.
- On disk (a folder): bm25s' arrays (memory-mapped on load), the vocabulary as sorted 64-bit term
  hashes (`term_hashes.npy`, `term_ids.npy`: parsing bm25s' JSON vocabulary took 3-4 s), `passages.jsonl`
  with a byte offset per passage in `offsets.npy` (a hit's text is read with one pread, nothing is
  parsed at load), and `meta.json` (settings, counts, malformed lines). It is written to a temporary folder and renamed,
  so an interrupted build leaves the previous index intact (the next build removes what a killed one left behind:
  `data_utils.remove_stale_temporaries`); loading takes about a second.
- Input is untrusted: bad JSON, invalid UTF-8, JSON nested too deeply, a missing `text`, lone
  surrogates and over-long lines are counted and reported like data/prepare.py does, never fatal.
- `rag_prompt` packs as many passages as fit the window before the question, in the one
  passage + question layout (`Tokenizer.encode_passage_qa`, as data/prepare_sft.py --with_context
  trains it), cutting the last one. `inference.Run.rag_prompt_ids` is the one RAG path of the
  front ends (sample.py, the arena, qa_eval.py): search, then this. `fit_passage` cuts one given
  passage to the window around the sentences that match the question (qa_eval.py --with_context).
- `recall_at_k`: a question counts as found when a top-k passage contains a gold answer, comes from a
  gold article, or has a gold title (evaluations may import this module; never the reverse).
"""
import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import data_utils
from data_utils import BadLines, article_key, clean_article, find_jsonl, parse_jsonl_line, split_sentences, write_json

ANALYZERS = ("bigram", "jieba")
DEFAULT_PASSAGE_CHARS = 250
MAX_LINE_BYTES = 16 * 2**20  # the largest zhwiki article is well under 1 MB
MAX_QUERY_CHARS = 4096
MAX_K = 1000
FORMAT = 1

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# a run of Han characters, else a run of letters/digits that are not Han
_TERM = re.compile(rf"[{_HAN}]+|(?:(?![{_HAN}])[^\W_])+")


class IndexFolderError(Exception):
    """An index folder that cannot be read (absent, or written by another format)."""


class IndexNotFound(IndexFolderError, FileNotFoundError):
    pass


class PromptTooLong(ValueError):
    """The question alone does not fit the window (block_size - max_new_tokens)."""


# ----------------------------------------------------------------------------- terms


def analyze(text, how="bigram"):
    """The BM25 terms of a text: Han unigrams+bigrams (or jieba words) and lowercased Latin/digit words."""
    text = text.lower()
    if how == "bigram":
        terms = []
        for run in _TERM.findall(text):
            if _is_han(run[0]):
                terms.extend(run)
                terms.extend(run[i:i + 2] for i in range(len(run) - 1))
            else:
                terms.append(run)
        return terms
    if how == "jieba":
        return [w for w in _jieba().lcut(text) if _TERM.fullmatch(w)]
    raise ValueError(f"analyzer must be one of {ANALYZERS}, not {how!r}")


def _is_han(ch):
    return "\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on every start
    return jieba


# ----------------------------------------------------------------------------- passages


def chunk_passages(body, passage_chars=DEFAULT_PASSAGE_CHARS):
    """A cleaned article body -> passages of whole sentences, each at most `passage_chars` characters."""
    if passage_chars < 1:
        raise ValueError("passage_chars must be at least 1")
    passages, current = [], ""
    for sentence in split_sentences(body):
        sentence = sentence.strip()
        while len(sentence) > passage_chars:  # a list or a table: cut into pieces
            if current:
                passages.append(current)
                current = ""
            passages.append(sentence[:passage_chars])
            sentence = sentence[passage_chars:]
        if not sentence:
            continue
        if len(current) + len(sentence) > passage_chars:
            passages.append(current)
            current = ""
        current += sentence
    if current:
        passages.append(current)
    return passages


def read_articles(inputs, bad, counts):
    """(article id, title, cleaned body) of each usable wiki jsonl line under the input paths."""
    for given in inputs:
        files = find_jsonl(given)
        if not files:
            bad.add(str(given), "no .jsonl file here")
        for path in files:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    article = _parse_article(raw, f"{path}:{lineno}", bad)
                    if article is False:
                        counts["malformed"] += 1
                    elif article == ():
                        counts["empty"] += 1
                    elif article is not None:
                        counts["articles"] += 1
                        yield article


def _parse_article(raw, where, bad):
    """One raw line -> (id, title, body); None for a blank line, () for an article with no body
    left after cleaning (a title-only stub), False when malformed."""
    if not raw.strip():
        return None
    if len(raw) > MAX_LINE_BYTES:
        bad.add(where, f"line longer than {MAX_LINE_BYTES} bytes")
        return False
    try:
        obj = parse_jsonl_line(raw, where, bad)
    except RecursionError:
        bad.add(where, "JSON nested too deeply")
        return False
    if obj is None:
        return False
    title = obj.get("title") if isinstance(obj.get("title"), str) else ""
    body = clean_article(obj["text"])
    try:
        (title + body).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        bad.add(where, "lone surrogate in text")
        return False
    if not body:
        return ()
    return article_key(obj), title, body


# ----------------------------------------------------------------------------- building


def build_index(inputs, out, analyzer="bigram", passage_chars=DEFAULT_PASSAGE_CHARS, quiet=False):
    """Index the wiki jsonl under `inputs` into the folder `out` (atomically); returns (meta, BadLines)."""
    import bm25s

    if analyzer not in ANALYZERS:
        raise ValueError(f"analyzer must be one of {ANALYZERS}, not {analyzer!r}")
    out = Path(out)
    # a build killed with -9 left `.NAME.tmpPID` (the half-built index) or `.NAME.oldPID` (the
    # previous one, moved aside between the two renames of _replace_dir): clear those of dead pids
    for stale in data_utils.remove_stale_temporaries(out.parent, [out.name]):
        if not quiet:
            print(f"removed {stale}, left by a build that was killed")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.time()
        bad, counts = BadLines(), {"articles": 0, "empty": 0, "malformed": 0}
        vocab, doc_ids, offsets = {}, [], [0]
        with open(tmp / "passages.jsonl", "wb") as f:
            for article_id, title, body in read_articles(inputs, bad, counts):
                for text in chunk_passages(body, passage_chars):
                    # setdefault hands back the dict's own int object: one pointer per term, no new ints
                    doc_ids.append([vocab.setdefault(t, len(vocab)) for t in analyze(title + "\n" + text, analyzer)])
                    line = json.dumps({"title": title, "article_id": article_id, "text": text}, ensure_ascii=False)
                    f.write(line.encode("utf-8") + b"\n")
                    offsets.append(f.tell())
        if not doc_ids:
            raise ValueError(f"no usable article in {', '.join(map(str, inputs))} "
                             f"({counts['malformed']} malformed lines)" + _first(bad))
        t_read = time.time() - t0
        bm25 = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        bm25.index((doc_ids, vocab), show_progress=not quiet)
        n_terms = sum(map(len, doc_ids))
        del doc_ids
        bm25.save(tmp / "bm25", show_progress=False)
        term_hashes, term_ids = _hashed_vocab(bm25.vocab_dict)
        np.save(tmp / "term_hashes.npy", term_hashes)
        np.save(tmp / "term_ids.npy", term_ids)
        np.save(tmp / "offsets.npy", np.array(offsets, dtype=np.int64))
        meta = {"format": FORMAT, "analyzer": analyzer, "passage_chars": passage_chars,
                "inputs": [str(p) for p in inputs], "passages": len(offsets) - 1, "articles": counts["articles"],
                "empty_articles": counts["empty"], "malformed": counts["malformed"], "bad_lines": bad.examples,
                "vocab": len(vocab), "terms": n_terms, "seconds_read": round(t_read, 1),
                "seconds": round(time.time() - t0, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        write_json(tmp / "meta.json", meta)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta, bad


def _term_hash(terms):
    """A stable 64-bit hash per term (Python's hash() is salted per process)."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
                     for t in terms], dtype=np.int64)


def _hashed_vocab(vocab):
    """The vocabulary as sorted term hashes and their ids: memory-mapped at load, where parsing
    bm25s' JSON vocabulary (1.5M terms for the shared wiki) takes seconds."""
    hashes, ids = _term_hash(list(vocab)), np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    order = np.argsort(hashes, kind="stable")
    hashes, ids = hashes[order], ids[order]
    if len(hashes) > 1 and (hashes[1:] == hashes[:-1]).any():
        raise RuntimeError("two terms share a 64-bit hash; rebuild with another analyzer setting")
    return hashes, ids


def _first(bad):
    return "; first: " + bad.examples[0] if bad.examples else ""


def _replace_dir(new, target):
    """Put folder `new` at `target`: the old one is moved aside first and removed only after."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- searching


class Index:
    """A built index folder: `search(query, k)` returns the top hits as dicts."""

    def __init__(self, folder):
        import bm25s

        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise IndexNotFound(f"no index at {folder} "
                                f"(build one with `python retrieval.py --input DIR --out {folder}`)")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise IndexFolderError(f"index at {folder} has format {self.meta.get('format')}, this code reads {FORMAT}")
        self.analyzer = self.meta["analyzer"]
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.bm25 = bm25s.BM25.load(folder / "bm25", mmap=True, load_vocab=False, show_progress=False)
        self.term_hashes = np.load(folder / "term_hashes.npy", mmap_mode="r")
        self.term_ids = np.load(folder / "term_ids.npy", mmap_mode="r")
        self._passages = open(folder / "passages.jsonl", "rb")

    def __len__(self):
        return len(self.offsets) - 1

    def close(self):
        self._passages.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def term_ids_of(self, terms):
        """Vocabulary ids of the terms the index knows (unknown terms are left out)."""
        if not terms:
            return []
        hashes = _term_hash(terms)
        at = np.minimum(np.searchsorted(self.term_hashes, hashes), len(self.term_hashes) - 1)
        known = self.term_hashes[at] == hashes
        return self.term_ids[at[known]].tolist()

    def passage(self, i):
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return json.loads(os.pread(self._passages.fileno(), end - start, start))

    def search(self, query, k=5):
        """Top `k` passages by BM25 score, best first: [{score, title, article_id, text, passage}].

        Only passages sharing at least one term with the query come back, so there may be fewer than k.
        """
        if not isinstance(query, str):
            raise TypeError("query must be a string")
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"query longer than {MAX_QUERY_CHARS} characters")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, not {k}")
        ids = self.term_ids_of(analyze(query, self.analyzer))
        if not ids:
            return []
        scores = self.bm25.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # best first, ties by passage order
        return [{"score": float(scores[i]), **self.passage(int(i)), "passage": int(i)} for i in top if scores[i] > 0]


def load_index(folder):
    return Index(folder)


# ----------------------------------------------------------------------------- RAG prompt


def format_passage(hit):
    return f"{hit['title']}：{hit['text']}" if hit.get("title") else hit["text"]


def rag_prompt(tok, question, hits, block_size, max_new_tokens, min_chars=16):
    """(prompt ids, sources): the question after as many passages as fit `block_size - max_new_tokens`.

    Passages go in rank order, each as `title：text` on its own line; the first that does not fit
    whole is cut (its beginning kept) if at least `min_chars` of it fit, and packing stops there.
    `sources` names the passages used ({title, article_id, cut, chars, text}: `text` is the line the
    model read, `title：text` or its first `chars` characters). With no passage room the prompt is
    the question alone; when even that does not fit, PromptTooLong.
    """
    budget = block_size - max_new_tokens
    if budget < 1:
        raise ValueError(f"no room for a prompt: block_size {block_size} - max_new_tokens {max_new_tokens} < 1")
    bare = tok.encode_qa(question.strip())
    if len(bare) > budget:
        raise PromptTooLong(f"the question alone is {len(bare)} tokens, over the {budget}-token prompt budget")
    chosen, sources = [], []

    def fits(parts):
        ids = tok.encode_passage_qa("\n".join(parts), question)
        return ids if len(ids) <= budget else None

    ids = bare
    for hit in hits:
        whole = format_passage(hit)
        if (got := fits(chosen + [whole])) is not None:
            chosen.append(whole)
            sources.append({"title": hit.get("title", ""), "article_id": hit.get("article_id"), "cut": False,
                            "chars": len(whole), "text": whole})
            ids = got
            continue
        lo, hi = 0, len(whole)  # the longest prefix that fits: binary search over characters
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(chosen + [whole[:mid]]) is not None:
                lo = mid
            else:
                hi = mid - 1
        if lo >= min_chars:
            ids = fits(chosen + [whole[:lo]])
            sources.append({"title": hit.get("title", ""), "article_id": hit.get("article_id"), "cut": True,
                            "chars": lo, "text": whole[:lo]})
        break
    return ids, sources


def sentence_spans(text):
    """(start, end) offsets of each sentence of `text` (`split_sentences`); a paragraph's newline
    falls between two spans, so text[spans[i][0]:spans[j][1]] keeps the paragraphs."""
    spans, at = [], 0
    for paragraph in text.split("\n"):
        for sentence in split_sentences(paragraph):
            spans.append((at, at + len(sentence)))
            at += len(sentence)
        at += 1
    return spans


def overlaps(sentences, question, how="bigram"):
    """How many terms (`analyze`: Han characters and bigrams) each sentence shares with the question."""
    wanted = set(analyze(question, how))
    return [len(wanted & set(analyze(s, how))) for s in sentences]


def best_sentence(sentences, question, how="bigram"):
    """Index of the sentence sharing most terms with the question (`overlaps`); the first on ties.
    The best-overlap rule of evaluations/baselines.py, the anchor of a question-anchored
    `fit_passage`, and extractive.py's sentence gate (its top `gate` sentences)."""
    scores = overlaps(sentences, question, how)
    return max(range(len(sentences)), key=scores.__getitem__)


def fit_passage(tok, passage, question, budget, how="bigram", answer=None, answer_start=None, place=None):
    """(text, cut): the passage, or a window of it, such that `tok.encode_passage_qa(text, question,
    answer)` fits `budget` tokens. The one passage-windowing function: evaluation, RAG and SFT.

    The window is whole sentences grown around an anchor while they fit (the paragraphs' newlines
    kept); a sentence too long alone keeps the longest run of characters around the anchor that fits.
    - Evaluation and RAG (`answer` None): the anchor is the sentence sharing most terms with the
      question (`best_sentence`). No gold answer is used, so what a held-out question is shown
      never depends on its answer: the paragraph as a user would give it, fitted around the
      question. The window grows after, then before, in turn.
    - SFT training (`answer` and `answer_start` given, the answer counted in the budget): the
      anchor is the answer span, and `place` (in [0, 1], drawn per example by the caller) is the
      share of the free room put before it, so the answer's place in the window is spread and the
      model cannot learn "the answer is in the middle" (or "in the opening").
    PromptTooLong when the question (and answer) alone do not fit.
    """
    def fits(text):
        return len(tok.encode_passage_qa(text, question, answer)) <= budget

    if fits(passage):
        return passage, False
    if not fits(""):
        raise PromptTooLong(f"the question alone is over the {budget}-token prompt budget")
    spans = sentence_spans(passage)
    if not spans:
        return "", True
    if answer and answer_start is not None and passage[answer_start:answer_start + len(answer)] == answer:
        a, b = answer_start, answer_start + len(answer)
    else:
        k = best_sentence([passage[s:e] for s, e in spans], question, how)
        a, b, place = spans[k][0], spans[k][1], None
    lo = next((k for k, s in enumerate(spans) if s[1] > a), len(spans) - 1)
    hi = next((k for k, s in enumerate(spans) if s[1] >= b), len(spans) - 1) + 1
    if not fits(passage[spans[lo][0]:spans[hi - 1][1]]):
        return _char_window(passage, a, b, fits, 0.0 if place is None else place), True
    turn = 0
    while True:
        before, after = a - spans[lo][0], spans[hi - 1][1] - b
        turn += 1  # the question's window: after, then before, in turn
        grow_before = turn % 2 == 0 if place is None else before < place * (before + after + 1)
        for side in ((-1, 1) if grow_before else (1, -1)):
            new_lo, new_hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
            if 0 <= new_lo and new_hi <= len(spans) and fits(passage[spans[new_lo][0]:spans[new_hi - 1][1]]):
                lo, hi = new_lo, new_hi
                break
        else:
            return passage[spans[lo][0]:spans[hi - 1][1]], True


def _char_window(passage, a, b, fits, place):
    """The widest window of `passage` holding [a, b) (as much of it as fits) that `fits`, with the
    share `place` of its free room before the anchor: binary search over the width."""
    def window(width):
        start = a - int(place * max(width - (b - a), 0))
        start = min(max(start, 0), max(len(passage) - width, 0))
        return passage[start:start + width]

    short, long = 0, len(passage)
    while short < long:
        mid = (short + long + 1) // 2
        short, long = (mid, long) if fits(window(mid)) else (short, mid - 1)
    return window(short)


def sources_text(sources):
    """The passage text a RAG prompt holds (`rag_prompt`'s sources, one a line), or None when it
    holds none: what an extractive answer may copy from."""
    return "\n".join(s["text"] for s in sources) or None


# ----------------------------------------------------------------------------- recall


def is_hit(hit, gold):
    """Does one retrieved passage answer a question? `gold`: {answers, article_ids, titles} (each optional).

    A hit is a dict {text, title, article_id} or a passage string. Empty gold strings never match
    (an empty answer occurs in every text).
    """
    if isinstance(hit, str):
        hit = {"text": hit}
    text = hit.get("text", "")
    if any(a.strip() and a.strip() in text for a in gold.get("answers", ())):
        return True
    if hit.get("article_id") is not None and hit["article_id"] in gold.get("article_ids", ()):
        return True
    return bool(hit.get("title")) and hit["title"] in gold.get("titles", ())


def recall_at_k(hits_per_question, golds, k):
    """Share of questions with a gold passage among their top `k` hits (in [0, 1]).

    golds: per question, a list of gold answer strings, or a dict {answers, article_ids, titles}.
    A question whose gold is empty (no non-empty answer, id or title) can never be found and counts
    as a miss, so recall is never inflated by unanswerable questions.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if len(hits_per_question) != len(golds):
        raise ValueError(f"{len(hits_per_question)} hit lists but {len(golds)} golds")
    if not golds:
        raise ValueError("recall of no questions is undefined")
    found = 0
    for hits, gold in zip(hits_per_question, golds):
        if isinstance(gold, str):
            raise TypeError("a question's gold answers must be a list of strings (or a dict), not one string")
        gold = gold if isinstance(gold, dict) else {"answers": gold}
        found += any(is_hit(h, gold) for h in hits[:k])
    return found / len(golds)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build a BM25 passage index over wiki jsonl, or search one.")
    ap.add_argument("--input", nargs="+", help="folders (walked for *.jsonl) or jsonl files to index")
    ap.add_argument("--out", default="data/index", help="index folder to write")
    ap.add_argument("--analyzer", default="bigram", choices=ANALYZERS)
    ap.add_argument("--passage_chars", type=int, default=DEFAULT_PASSAGE_CHARS)
    ap.add_argument("--index", help="index folder to search (default: --out)")
    ap.add_argument("--query", help="search the index for this text")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not args.input and not args.query:
        ap.error("give --input DIR to build an index, or --query TEXT to search one")
    try:
        if args.input:
            meta, bad = build_index(args.input, args.out, args.analyzer, args.passage_chars, args.quiet)
            bad.report()
            print(f"indexed {meta['passages']:,} passages of {meta['articles']:,} articles "
                  f"({meta['empty_articles']:,} with no text after cleaning and "
                  f"{meta['malformed']} malformed lines skipped; "
                  f"{meta['vocab']:,} distinct terms) in {meta['seconds']}s, "
                  f"peak RSS {meta['peak_rss_mb']} MB -> {args.out}")
        if args.query:
            t0 = time.time()
            index = Index(args.index or args.out)
            t1 = time.time()
            hits = index.search(args.query, args.k)
            print(f"loaded {len(index):,} passages in {t1 - t0:.2f}s; searched in {time.time() - t1:.3f}s")
            for rank, hit in enumerate(hits, 1):
                print(f"{rank}. [{hit['score']:.2f}] {hit['title']} ({hit['article_id']}): {hit['text']}")
            if not hits:
                print("no passage shares a term with the query")
    except (OSError, ValueError, IndexFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
