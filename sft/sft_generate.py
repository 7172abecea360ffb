"""Generate question-answer pairs from wiki articles, for supervised fine-tuning.

    python sft/sft_generate.py --input ../shared/data/zhwiki --output sft/sft_saves.jsonl \
        --base_url http://127.0.0.1:1234/v1 --model NAME [--workers 4] [--limit N]
    python sft/sft_generate.py --input ../shared/data/zhwiki --backend extractive

Output: one line per pair, `{"question", "answer", "context", "answer_in_context", "id", "title"}`
(`id` = the article's id; `context` = the source passage: the chunk of the article, whole sentences
of at most `--context_chars` cut before any question, that holds the answer; extractive pairs also
carry their question `family`), which `data/prepare_sft.py` reads directly.

Design choices:
- Two backends behind one validator. `llm` sends one article per request to any OpenAI-compatible
  chat-completions server (LM Studio, vLLM, Ollama, llama.cpp, this project's server.py) through
  one small stdlib HTTP call (`post_json`) that holds every limit: a total deadline for the whole
  request (`--timeout`: a timer shuts the socket, since per-read timeouts never stop a server that
  sends a byte a second) and a cap on the reply's size (`--max_reply_bytes`, read in chunks and
  refused past it). The backoff policy below is the only retry policy. `extractive` asks short-answer
  cloze questions (who, when, where, how many, what, aliases) about sentences anywhere in the
  article by rule (`sft/reading_pairs.py`), so the pipeline runs without any model; a run-wide
  `Balance` keeps the answers' places in their passages spread (the summary prints the histogram
  by tenths and the question families).
- Every LLM candidate pair passes the same checks (`validate`; extractive pairs are built within
  the same length limits and pronoun rule, and are verbatim): JSON objects
  are pulled out of a reply tolerantly (code fences, prose, a list or one object per line), lengths
  are bounded, questions opening with a pronoun are rejected (they cannot be understood without
  the article), an answer must be supported by the article (the share of its character bigrams
  that occur in the article, `--min_support`), duplicates are dropped. Nothing in a reply is
  trusted: a body that is not a chat completion (content not a string, `choices` of the wrong
  shape), JSON nested deeper than 64 levels (checked before `json` recurses) and strings holding
  lone surrogates are failures or rejections with a reason, never a crash. A reply that fails, and a
  timeout, connection error, 429 or 5xx, is retried with exponential backoff (a Retry-After honoured,
  capped by `--max_backoff` like every wait) up to `--max_attempts`; then the article is recorded
  as failed with the reason. 401/403 (and 404: a wrong URL or model) stop the run at once: every
  later request would fail the same way.
- Each pair keeps its source passage, for reading-comprehension examples (passage + question ->
  answer, the layout `prepare_sft.py --with_context` gives SQuAD-style data): the same chunks for
  both backends (`passage`). Extractive answers are verbatim, so their passage always holds them
  (and `validate`'s support check is skipped for them); an LLM's answer may paraphrase, so its
  passage is the chunk of its best-supported sentence and `answer_in_context` records whether the
  answer occurs in it verbatim.
- Resumable append-only output rather than write-then-rename: a run over 100k articles must
  survive Ctrl-C or a kill. Only the main thread writes; each article's lines go out in one write
  and flush, then one line in the sidecar `OUTPUT.state.jsonl` (`{"id", "status", "reason",
  "pairs", "end"}`, `end` = output size after the article). On resume, ids marked done there or
  present in the output are skipped, failed ones are retried, and a torn last line is cut back to
  the last recorded `end`, so a kill loses at most the articles in flight and duplicates nothing.
- Articles are cleaned with `data_utils.clean_article` (as for pretraining), articles shorter than
  `--min_chars` are skipped and longer ones cut at a sentence boundary to `--max_chars`, so the
  prompt fits a local model's context; answers are checked against that same cut text.
- Library functions raise `GenerateError` (or `RequestFailed` for one attempt); only `main` turns
  them into an exit status.
"""
import argparse
import json
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter, namedtuple
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

if not __package__:  # run as a script (python sft/sft_generate.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines, clean_article, find_jsonl, iter_jsonl, split_sentences  # noqa: E402
from sft.reading_pairs import Balance, chunk_for, chunks, cloze_pairs, position_histogram, sentence_spans  # noqa: E402

DEFAULT_PROMPT = Path(__file__).with_name("prompt_zh.txt")
Article = namedtuple("Article", "id title text")
Outcome = namedtuple("Outcome", "status pairs reason")  # status: "done" | "failed"
DEFAULT_CONTEXT_CHARS = 500  # with a question and an answer, fits a 512-token block (1.65 characters a token)
Limits = namedtuple("Limits", "min_qa max_qa max_question_chars max_answer_chars min_support context_chars",
                    defaults=(DEFAULT_CONTEXT_CHARS,))


class GenerateError(Exception):
    """The run cannot start or go on (no input, a bad prompt file, a refused key, a wrong URL);
    `main` prints it and exits with status 2."""


# ----------------------------------------------------------------------------- articles


def truncate_at_sentence(text, max_chars):
    """The longest run of whole sentences (paragraph breaks kept) within `max_chars`."""
    if len(text) <= max_chars:
        return text
    paragraphs, used, full = [], 0, False
    for paragraph in text.split("\n"):
        kept = []
        for sentence in split_sentences(paragraph):
            full = used + len(sentence) > max_chars
            if full:
                break
            kept.append(sentence)
            used += len(sentence)
        if kept:
            paragraphs.append("".join(kept))
            used += 1
        if full:
            break
    # a first sentence longer than the budget still gives the model something to read
    return "\n".join(paragraphs) or text[:max_chars]


class ArticleReader:
    """Articles to work on, read lazily; counts what it skips for the summary and progress bar."""

    def __init__(self, input_path, min_chars, max_chars, limit=None):
        self.root = Path(input_path)
        self.files = find_jsonl(self.root)
        if not self.files:
            raise GenerateError(f"no .jsonl files found at {self.root}")
        self.min_chars, self.max_chars, self.limit = min_chars, max_chars, limit
        self.bad = BadLines()
        self.lines = self.eligible = self.too_short = 0

    def count_lines(self):
        return sum(f.read_bytes().count(b"\n") for f in self.files)

    def __iter__(self):
        for path in self.files:
            name = path.relative_to(self.root) if self.root.is_dir() else path.name
            for lineno, obj in iter_jsonl(path, self.bad):
                if self.limit is not None and self.eligible >= self.limit:
                    return
                self.lines += 1
                title = str(obj.get("title") or "").strip()
                if _SURROGATE.search(title + obj["text"] + str(obj.get("id"))):
                    self.bad.add(f"{name}:{lineno}", "lone surrogate (\\ud800-\\udfff) in the text")
                    continue
                body = clean_article(obj["text"], drop_title=bool(title) and obj["text"].startswith(title))
                if len(body) < self.min_chars:
                    self.too_short += 1
                    continue
                self.eligible += 1
                article_id = str(obj["id"]) if obj.get("id") is not None else f"{name}:{lineno}"
                title = title or body.split("\n", 1)[0][:30]
                yield Article(article_id, title, truncate_at_sentence(body, self.max_chars))


# ----------------------------------------------------------------------------- validation

_JSON_START = re.compile(r"[\[{]")
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string (skipped whole) or a bracket
MAX_JSON_DEPTH = 64  # a QA reply needs 3 or 4 levels
_DECODER = json.JSONDecoder()
# Questions that lean on the article for their subject cannot be asked on their own.
PRONOUNS = ("他", "她", "它", "这", "该", "此", "其", "那个", "那些", "那位", "本文", "文中", "文章", "上述", "作者")
_NOT_WORD = re.compile(r"[\W_]+")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates parse from JSON but cannot be written as UTF-8


def too_deep(text, start=0, max_depth=MAX_JSON_DEPTH):
    """Where the JSON value at `start` first nests deeper than `max_depth`, or None. Checked before
    parsing because `json` recurses: a reply of 100k '[' would raise RecursionError."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, start):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                return m.end()
        elif m.group() in "]}":
            depth -= 1
            if depth <= 0:
                return None
    return None


def extract_json_objects(reply):
    """Every JSON object holding a question or answer in a model's reply, however it is wrapped."""
    reply = reply.rsplit("</think>", 1)[-1]  # a reasoning model's draft comes before its answer
    found, i = [], 0
    while match := _JSON_START.search(reply, i):
        if (deep := too_deep(reply, match.start())) is not None:
            i = deep  # objects nested inside may still be whole
            continue
        try:
            value, i = _DECODER.raw_decode(reply, match.start())
        except json.JSONDecodeError:
            i = match.start() + 1  # a broken list may still hold whole objects further on
            continue
        found.extend(_qa_objects(value))
    return found


def _qa_objects(value):
    if isinstance(value, dict):
        if any(k in value for k in ("question", "answer", "问题", "答案")):
            return [value]
        value = list(value.values())  # a wrapper such as {"qa_pairs": [...]}
    if isinstance(value, list):
        return [obj for item in value for obj in _qa_objects(item)]
    return []


def support(answer, article_text):
    """Share of the answer's character bigrams (punctuation ignored) that occur in the article."""
    answer = _NOT_WORD.sub("", answer).lower()
    text = _NOT_WORD.sub("", article_text).lower()
    if len(answer) < 2:
        return float(bool(answer) and answer in text)
    grams = {text[i : i + 2] for i in range(len(text) - 1)}
    wanted = [answer[i : i + 2] for i in range(len(answer) - 1)]
    return sum(g in grams for g in wanted) / len(wanted)


def validate(candidates, article, limits):
    """Keep the acceptable pairs (at most `max_qa`) and count why the others were rejected."""
    pairs, rejected, seen = [], Counter(), set()
    for obj in candidates:
        question, answer = obj.get("question", obj.get("问题")), obj.get("answer", obj.get("答案"))
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip() or not answer.strip():
            rejected["missing_fields"] += 1
            continue
        if _SURROGATE.search(question + answer):
            rejected["bad_text"] += 1
            continue
        question, answer = question.strip(), answer.strip()
        key = _NOT_WORD.sub("", question)
        if len(question) > limits.max_question_chars or len(answer) > limits.max_answer_chars:
            rejected["too_long"] += 1
        elif question.startswith(PRONOUNS):
            rejected["pronoun_question"] += 1
        elif support(answer, article.text) < limits.min_support:
            rejected["unsupported_answer"] += 1
        elif key in seen:
            rejected["duplicate"] += 1
        else:
            seen.add(key)
            pairs.append({"question": question, "answer": answer})
    return pairs[: limits.max_qa], rejected


def passage(answer, text, max_chars):
    """The passage a pair is shown with: the chunk of `text` (`reading_pairs.chunks`, runs of whole
    sentences of at most `max_chars`, fixed before any question) that holds `answer`, or, when it is
    not verbatim (an LLM's paraphrase), the chunk of the sentence that supports it best. The chunk
    does not depend on where the answer sits in it, so answers are spread over the passage."""
    at = text.find(answer) if answer else -1
    if at < 0:
        spans = sentence_spans(text) or [(0, len(text))]
        at, end = max(spans, key=lambda s: support(answer, text[s[0]:s[1]]))
        answer = text[at:end]
    return chunk_for(text, at, min(len(answer), max_chars), max_chars) or text[at:at + max_chars]


def judge(candidates, article, limits, nothing="malformed_json"):
    """Done with the valid pairs (each with its source passage), or failed with the main reason
    there were too few of them."""
    if not candidates:
        return Outcome("failed", [], nothing)
    pairs, rejected = validate(candidates, article, limits)
    if len(pairs) >= limits.min_qa:
        for pair in pairs:
            pair["context"] = passage(pair["answer"], article.text, limits.context_chars)
            pair["answer_in_context"] = pair["answer"] in pair["context"]
        return Outcome("done", pairs, None)
    # the reason behind most candidates, valid pairs (too few of them) counting as "too_few_pairs"
    reasons = rejected + Counter(too_few_pairs=len(pairs))
    return Outcome("failed", [], reasons.most_common(1)[0][0])


# ----------------------------------------------------------------------------- llm backend


class RequestFailed(Exception):
    """One attempt failed; `reason` goes into the state file, `retry` says whether trying again may help."""

    def __init__(self, reason, retry=True, wait_s=None):
        super().__init__(reason)
        self.reason, self.retry, self.wait_s = reason, retry, wait_s


def post_json(url, payload, headers, timeout, max_bytes):
    """(status, headers, body) of one POST. The whole exchange (connect, send, response headers and
    body) ends within `timeout` seconds and reads at most `max_bytes` of body, or RequestFailed
    ("timeout", "too_large", "connection_error") is raised."""
    parts = urlsplit(url)
    connection = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    conn = connection(parts.hostname, parts.port, timeout=timeout)
    expired, sockets = threading.Event(), []

    def expire():  # socket timeouts bound each read, not their sum: a byte a second never trips one
        expired.set()
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes the blocked read
            except OSError:
                pass

    timer, response = threading.Timer(timeout, expire), None
    timer.daemon = True
    timer.start()
    try:
        conn.connect()  # bounded by the socket timeout; kept, as http.client forgets it once a reply is read
        sockets.append(conn.sock)
        if expired.is_set():
            raise RequestFailed("timeout")
        path = parts._replace(scheme="", netloc="").geturl() or "/"
        conn.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        if (response.length or 0) > max_bytes:  # declared too large: refused unread
            raise RequestFailed("too_large")
        body = bytearray()
        while chunk := response.read(1 << 16):
            body += chunk
            if len(body) > max_bytes:
                raise RequestFailed("too_large")
        if expired.is_set():  # the shutdown may have ended a body without Content-Length early
            raise RequestFailed("timeout")
        return response.status, response.headers, bytes(body)
    except (OSError, HTTPException) as e:
        raise RequestFailed("timeout" if expired.is_set() or isinstance(e, TimeoutError) else "connection_error") from e
    finally:
        timer.cancel()
        if response is not None:
            response.close()  # the socket itself, so that a server still sending stops at once
        conn.close()


def reply_content(body):
    """The message text of a chat-completions reply body; RequestFailed for anything else."""
    try:
        text = body.decode("utf-8")
        if too_deep(text) is not None:
            raise RequestFailed("too_deep")
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):  # not JSON, or not shaped like a chat completion
        raise RequestFailed("bad_response") from None
    if content is None or content == "":
        raise RequestFailed("empty_reply")
    if not isinstance(content, str):
        raise RequestFailed("bad_response")
    return content


def _retry_after(headers, cap_s):
    """Seconds to wait as a Retry-After header asks (delay-seconds or an HTTP-date), at most `cap_s`
    (--max_backoff: a server's word never holds a worker longer than our own policy would); None
    when there is no usable answer (absent, unparseable, NaN, negative: our own backoff applies).
    A date in the past means now; "inf", 1e400 and dates in year 9999 mean `cap_s`."""
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
        if not seconds >= 0:  # NaN and negative numbers are no answer (RFC 9110: 1*DIGIT)
            return None
    except ValueError:
        try:
            seconds = max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
    return min(seconds, cap_s)


class LLMBackend:
    """One chat-completions request per article, validated and retried by our own policy."""

    def __init__(self, args, prompt, limits, stop):
        self.args, self.prompt, self.limits, self.stop = args, prompt, limits, stop
        self.url = args.base_url.rstrip("/") + "/chat/completions"

    def request(self, article):
        content = self.prompt.replace("{title}", article.title).replace("{text}", article.text)
        return {"model": self.args.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.args.temperature, "max_tokens": self.args.max_tokens}

    def ask(self, article):
        """The model's reply text; GenerateError when every later request would fail the same way."""
        args = self.args
        status, headers, body = post_json(self.url, self.request(article), {"Authorization": f"Bearer {args.api_key}"},
                                          args.timeout, args.max_reply_bytes)
        detail = body[:200].decode("utf-8", "replace")
        if status in (401, 403):
            raise GenerateError(f"authentication failed (HTTP {status}) at {args.base_url}: check --api_key ({detail})")
        if status == 404:
            raise GenerateError(f"HTTP 404 from {self.url}: check --base_url (it usually ends in /v1) "
                                f"and --model {args.model!r} ({detail})")
        if status == 429 or status >= 500:
            raise RequestFailed(f"http_{status}", wait_s=_retry_after(headers, args.max_backoff))
        if not 200 <= status < 300:
            raise RequestFailed(f"http_{status}", retry=False)  # the same request would be refused again
        return reply_content(body)

    def __call__(self, article):
        for attempt in range(1, self.args.max_attempts + 1):
            wait_s = None
            try:
                outcome = judge(extract_json_objects(self.ask(article)), article, self.limits)
                if outcome.status == "done":
                    return outcome
                reason = outcome.reason
            except RequestFailed as e:
                if not e.retry:
                    return Outcome("failed", [], e.reason)
                reason, wait_s = e.reason, e.wait_s
            if attempt < self.args.max_attempts:
                if wait_s is None:
                    wait_s = min(self.args.max_backoff, self.args.backoff * 2 ** (attempt - 1))
                    wait_s *= random.uniform(0.75, 1)  # jitter, so workers do not retry in lockstep
                if self.stop.wait(wait_s):
                    break
        return Outcome("failed", [], reason)


# ----------------------------------------------------------------------------- extractive backend

def extract_candidates(article, max_question_chars=48, max_answer_chars=20, limit=None):
    """Rule-based cloze pairs from every sentence of the article (`reading_pairs.cloze_pairs`);
    answers verbatim, each with its offset `at` in the article."""
    return cloze_pairs(article.title, article.text, article.id, max_question_chars, max_answer_chars, limit)


def extractive_outcome(article, limits, balance=None):
    """Up to `max_qa` valid pairs of the article, each with its chunk as passage; `balance` (a
    `reading_pairs.Balance` shared by the run) skips pairs whose answer would sit in a tenth of the
    passage that already holds more than its share, so the run's positions stay spread."""
    # a few more candidates than kept: the balance may skip some
    candidates = extract_candidates(article, limits.max_question_chars, limits.max_answer_chars, 3 * limits.max_qa)
    spans, kept = chunks(article.text, limits.context_chars), []
    for candidate in candidates:
        # answers are verbatim spans of the article, so `validate`'s support check is moot (and costly)
        context = chunk_for(article.text, candidate["at"], len(candidate["answer"]), limits.context_chars, spans)
        if context is None or candidate["question"].startswith(PRONOUNS):
            continue
        pair = {"question": candidate["question"], "answer": candidate["answer"]}
        pair.update(context=context, answer_in_context=True, family=candidate["family"])
        if balance is None or balance.take(pair):
            kept.append(pair)
        if len(kept) >= limits.max_qa:
            break
    if len(kept) >= limits.min_qa or (balance is not None and candidates):
        # pairs refused by the balance alone are a decision, not a failure: a resumed run must not
        # retry the article and decide differently
        return Outcome("done", kept, None)
    return Outcome("failed", [], "no_pairs")


# ----------------------------------------------------------------------------- output and resume


class Store:
    """The output file and its sidecar state file; only the main thread writes to them."""

    def __init__(self, output):
        self.output = Path(output)
        self.state_path = self.output.with_name(self.output.name + ".state.jsonl")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        states = self._read_lines(self.state_path)
        out_size = self.output.stat().st_size if self.output.exists() else 0
        ends = [s.get("end") for s in states if isinstance(s.get("end"), int)]
        if ends and max(ends) > out_size:
            print(f"{self.state_path} records more output than {self.output} holds: ignoring it")
            states, ends = [], []
            self.state_path.write_bytes(b"")
        lines = self._read_lines(self.output, safe_end=max(ends, default=None))
        last_status = {s["id"]: s.get("status") for s in states if "id" in s}
        self.done = {i for i, status in last_status.items() if status == "done"}
        self.done |= {str(line["id"]) for line in lines if "id" in line}
        self.failed_before = {i for i, status in last_status.items() if status == "failed"} - self.done
        self.pairs_before = len(lines)
        self._out, self._state = open(self.output, "ab"), open(self.state_path, "ab")

    @staticmethod
    def _read_lines(path, safe_end=None):
        """JSON lines of a file, after cutting a last line torn by a kill (back to `safe_end` when
        that is earlier: the torn write may have left whole lines of its article before it)."""
        if not path.exists():
            return []
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            if safe_end is not None and safe_end < keep:
                keep = safe_end
            print(f"{path}: dropping {len(data) - keep} bytes of an interrupted write")
            with open(path, "rb+") as f:
                f.truncate(keep)
            data = data[:keep]
        lines = []
        for raw in data.splitlines():
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):  # a corrupt line is dropped, never fatal
                continue
            if isinstance(obj, dict):
                lines.append(obj)
        return lines

    def record(self, article, outcome):
        if outcome.pairs:
            rows = [{**pair, "id": article.id, "title": article.title} for pair in outcome.pairs]
            self._out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            self._out.flush()
        state = {"id": article.id, "status": outcome.status, "reason": outcome.reason,
                 "pairs": len(outcome.pairs), "end": self._out.tell()}
        self._state.write((json.dumps(state, ensure_ascii=False) + "\n").encode("utf-8"))
        self._state.flush()

    def close(self):
        self._out.close()
        self._state.close()


# ----------------------------------------------------------------------------- running


def run_concurrently(generate, articles, workers, stop, interrupted=None):
    """Yield (article, outcome) as requests finish, with at most 2 * workers articles in flight;
    raises KeyboardInterrupt within 0.1 s of `interrupted` being set, also while requests are held."""
    pool, pending, articles = ThreadPoolExecutor(workers), {}, iter(articles)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < 2 * workers:
                article = next(articles, None)
                exhausted = article is None
                if article is not None:
                    pending[pool.submit(generate, article)] = article
            if not pending:
                return
            finished, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            if interrupted is not None and interrupted.is_set():
                raise KeyboardInterrupt
            for future in finished:
                yield pending.pop(future), future.result()
    finally:
        stop.set()  # ends backoff waits at once when we stop early
        pool.shutdown(wait=False, cancel_futures=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a .jsonl file or a folder of them ({id, title, text} lines)")
    p.add_argument("--output", default="sft/sft_saves.jsonl")
    p.add_argument("--backend", choices=("llm", "extractive"), default="llm")
    p.add_argument("--base_url", default="http://127.0.0.1:1234/v1",
                   help="OpenAI-compatible API root (default: LM Studio's)")
    p.add_argument("--model", help="model name as the server knows it (required with --backend llm)")
    p.add_argument("--api_key", default="not-needed", help="local servers usually ignore it")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests (llm; extractive runs single-threaded)")
    p.add_argument("--limit", type=int, help="work on the first N articles long enough to use")
    p.add_argument("--min_qa", type=int, help="fewest valid pairs per article (default 3; 1 for extractive)")
    p.add_argument("--max_qa", type=int, default=6, help="pairs kept per article at most")
    p.add_argument("--max_question_chars", type=int, help="default 15 (llm), 48 (extractive: cloze questions)")
    p.add_argument("--max_answer_chars", type=int,
                   help="default 300 (llm), 20 (extractive: short spans, as DRCD/CMRC2018's)")
    p.add_argument("--min_support", type=float, default=0.6,
                   help="least share of an answer's character bigrams that must occur in the article")
    p.add_argument("--context_chars", type=int, default=DEFAULT_CONTEXT_CHARS,
                   help="longest source passage written with each pair (whole sentences around the answer)")
    p.add_argument("--min_chars", type=int, default=200, help="skip articles shorter than this after cleaning")
    p.add_argument("--max_chars", type=int, default=2000, help="cut longer articles at a sentence boundary")
    p.add_argument("--prompt_file", default=str(DEFAULT_PROMPT),
                   help="prompt with {title} {text} {min_qa} {max_qa} {max_question_chars} {max_answer_chars}")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for a whole request: connecting, sending and reading all of the reply")
    p.add_argument("--max_reply_bytes", type=int, default=4 << 20, help="a longer reply is refused (failure too_large)")
    p.add_argument("--max_attempts", type=int, default=4, help="tries per article before it is recorded failed")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each retry")
    p.add_argument("--max_backoff", type=float, default=60.0,
                   help="longest wait before a retry, a server's Retry-After included")
    p.add_argument("--dry_run", action="store_true", help="print the request for one article and exit")
    args = p.parse_args(argv)
    extractive = args.backend == "extractive"
    if args.min_qa is None:
        args.min_qa = 1 if extractive else 3
    if args.max_question_chars is None:
        args.max_question_chars = 48 if extractive else 15
    if args.max_answer_chars is None:
        args.max_answer_chars = 20 if extractive else 300
    if args.backend == "llm" and not args.model:
        p.error("--model is required with --backend llm (the name the server lists at /v1/models)")
    if not 1 <= args.min_qa <= args.max_qa or args.workers < 1 or args.max_attempts < 1:
        p.error("need 1 <= --min_qa <= --max_qa, --workers >= 1 and --max_attempts >= 1")
    if not args.max_answer_chars <= args.context_chars:
        p.error("--context_chars must be at least --max_answer_chars, so that a passage can hold its answer")
    if not (0 < args.timeout <= 86400 and 0 <= args.backoff <= args.max_backoff <= 86400 and args.max_reply_bytes > 0):
        p.error("need 0 < --timeout <= 86400, 0 <= --backoff <= --max_backoff <= 86400 and --max_reply_bytes > 0")
    try:
        url = urlsplit(args.base_url)
        good_url = url.scheme in ("http", "https") and url.hostname and (url.port or 0) >= 0
    except ValueError:  # a port that is not a number
        good_url = False
    if not good_url:
        p.error(f"--base_url {args.base_url!r} is not an http:// or https:// URL")
    if not (args.api_key.isascii() and args.api_key.isprintable()):
        p.error("--api_key must be printable ASCII (it is sent in an HTTP header)")
    return args


def load_prompt(args):
    try:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read --prompt_file {args.prompt_file}: {e}") from e
    if "{text}" not in prompt:
        raise GenerateError(f"{args.prompt_file} has no {{text}} placeholder for the article")
    for key in ("min_qa", "max_qa", "max_question_chars", "max_answer_chars"):
        prompt = prompt.replace("{" + key + "}", str(getattr(args, key)))
    return prompt


def summarize(done, failures, pairs, verbatim, reader, store, elapsed, histogram=None, families=None):
    finished = done + sum(failures.values())
    reasons = ", ".join(f"{r} {n}" for r, n in failures.most_common()) or "none"
    print(f"articles: {done} done, {sum(failures.values())} failed ({reasons}); "
          f"{len(store.done)} done before, {reader.too_short} shorter than --min_chars skipped")
    print(f"pairs: {pairs} new ({pairs / max(done, 1):.2f} per done article, {verbatim} with the answer verbatim in "
          f"its context), {store.pairs_before} before; {finished / max(elapsed, 1e-9):.1f} articles/s, "
          f"{pairs / max(elapsed, 1e-9):.1f} pairs/s in {elapsed:.1f}s -> {store.output}")
    if histogram and sum(histogram):
        print("answer position in its passage, by tenths: " + " ".join(
            f"{10 * k}-{10 * k + 10}%:{n}" for k, n in enumerate(histogram)))
    if families:
        print("question families: " + ", ".join(f"{f} {n}" for f, n in families.most_common()))
    reader.bad.report("malformed input lines")


def generate(args):
    """The whole run; returns the exit status, raises GenerateError."""
    limits = Limits(args.min_qa, args.max_qa, args.max_question_chars, args.max_answer_chars, args.min_support,
                    args.context_chars)
    reader = ArticleReader(args.input, args.min_chars, args.max_chars, args.limit)
    stop = threading.Event()
    backend = LLMBackend(args, load_prompt(args), limits, stop) if args.backend == "llm" else None
    if args.dry_run:
        article = next(iter(reader), None)
        if article is None:
            raise GenerateError(f"no article in {args.input} has --min_chars {args.min_chars} characters")
        if backend:
            print(json.dumps({"url": backend.url, **backend.request(article)}, ensure_ascii=False, indent=2))
        else:
            print(json.dumps({"id": article.id, **extractive_outcome(article, limits)._asdict()},
                             ensure_ascii=False, indent=2))
        return 0

    store = Store(args.output)
    if store.failed_before:
        print(f"retrying {len(store.failed_before)} articles that failed before")
    seen = set(store.done)

    def todo():
        for article in reader:
            if article.id not in seen:  # done before, or listed twice in the input
                seen.add(article.id)
                yield article

    # Ctrl-C only sets a flag, acted on between articles: a KeyboardInterrupt raised anywhere (inside
    # the store's write, holding its lock) could tear a line or hang the exit (seen under load)
    interrupted = threading.Event()
    if backend:
        results = run_concurrently(backend, todo(), args.workers, stop, interrupted)
    else:
        balance = Balance()
        results = ((a, extractive_outcome(a, limits, balance)) for a in todo())
    done, pairs, verbatim, failures, started = 0, 0, 0, Counter(), time.time()
    histogram, families = [0] * 10, Counter()
    bar = tqdm(total=args.limit or reader.count_lines(), unit="article", mininterval=0.5)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set()) if in_main else None
    try:
        for article, outcome in results:
            store.record(article, outcome)
            if outcome.status == "done":
                done, pairs = done + 1, pairs + len(outcome.pairs)
                verbatim += sum(p["answer_in_context"] for p in outcome.pairs)
                histogram = [x + y for x, y in zip(histogram, position_histogram(outcome.pairs))]
                families.update(p.get("family", "llm") for p in outcome.pairs)
            else:
                failures[outcome.reason] += 1
            bar.n = reader.eligible if args.limit else reader.lines
            rate = pairs / max(time.time() - started, 1e-9)
            bar.set_postfix(pairs=pairs, pairs_per_s=f"{rate:.1f}", failed=sum(failures.values()), refresh=False)
            bar.update(0)
            if interrupted.is_set():
                raise KeyboardInterrupt
        bar.n = reader.eligible if args.limit else reader.lines
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished articles are saved; run again to resume", file=sys.stderr)
        return 130
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)
        results.close()  # stops the workers' retries and cancels articles not yet sent
        bar.close()
        store.close()
        summarize(done, failures, pairs, verbatim, reader, store, time.time() - started, histogram, families)


def main(argv=None):
    args = parse_args(argv)
    try:
        return generate(args)
    except GenerateError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written and closed; requests still in flight after Ctrl-C or a fatal error
    # would otherwise hold the exit until --timeout, and their answers would be dropped anyway
    os._exit(exit_code)
