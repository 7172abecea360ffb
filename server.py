"""Serve a trained run to peers on the LAN: a streaming `/generate` API and OpenAI-compatible routes.

    python server.py --out_dir out/sft [--host 127.0.0.1] [--port 5000] [--api_key KEY] [--cors] [--rag INDEX]

Routes: `POST /generate`, `/v1/chat/completions`, `/v1/completions`, `/tokenize`, `/detokenize`;
`GET /health`, `/v1/models`, `/v1/models/{id}`, `/tokenizer_info`, `/metrics` (Prometheus text).
This module is the HTTP app, the workers and the routes; the OpenAI wire format (reading those
bodies, shaping their answers, the vLLM-style tokenizer routes) is openai_api.py, and the fields
every route reads are request_fields.py.

Design choices:
- Layers. `create_app` only wires Flask routes to a `Service`, which does what the routes do
  without HTTP: `parse_json_body` reads a body, `parse_generate` / `parse_openai` turn it into a
  typed `GenerationRequest` (every field checked, errors name the field), the service queues its
  `Job`s (one per choice) and `OpenAIReply` with `ChatApi` / `CompletionsApi` shapes the answer
  (`sse` frames a stream). Tests call each of these directly.
- One model, one owner. A single background thread owns the model; HTTP handler threads never
  generate with it (scoring a prompt for `echo` is a cache-free forward that changes nothing the
  worker reads: a handler runs it, one at a time). Handlers tokenize and validate, put a request
  on a bounded queue and read text pieces back from each job's own queue, so streams cannot cross.
- Continuous batching (`Scheduler`, the default). The worker drives one `engine.Engine`: at every
  step it drops cancelled requests, adds waiting ones while fewer than `max_batch` rows are in the
  engine, and runs one engine step (a decode step for every running row, then prefill of new
  prompts in chunks of `prefill_chunk` tokens). A request joins the running batch at the next
  step and leaves it the step it finishes, so a short request arriving while a long one runs
  finishes first. `--scheduler static` keeps the previous `Batcher` (a batch of requests that
  arrived within `gather_ms` runs through `engine.generate` until its longest row ends), for
  bench/bench_server.py's comparison; it serves n=1 without logprobs or presence/frequency penalties.
- Reproducible. Every row has its own positions, window and random generator (engine.py), seeded
  by the request's `seed` (random when absent; choice i of `n` uses seed + i): a seeded request
  gives the same text alone or in any batch, and a greedy one its solo text, also after its
  window slides.
- One request never fails the others. The engine validates a request when it is added (a refusal
  ends that request alone with finish_reason "error"). If a step raises, every live request is
  tried alone for one step in a scratch engine; those that fail alone end with "error", the others
  resume in a fresh engine from the tokens they already sent (greedy rows exactly; a sampled row
  restarts its generator, and n > 1 rows that already sent text cannot resume and end too).
- OpenAI fields: `n` (1..4, rows sharing one prefill; a stream sends the choices one after the
  other, each with its index), prompts as lists of strings or token ids, `echo` with prompt
  logprobs, `logprobs`/`top_logprobs` on chat and `logprobs: N` on completions (0..5; log-softmax
  of the raw logits, as the engine reports them; streamed chunks carry the entries of their
  tokens), `stop` lists, `seed`, usage (openai_api.py's docstring has the details). Other
  unsupported fields are refused (a 400 naming the field) rather than ignored.
- RAG (`--rag INDEX`, a retrieval.py index): `/generate` with `mode: "rag"` (and `rag_k`, default 3,
  at most 10), or `"rag": true | {"k": K}` on chat completions (the last message is the question),
  retrieves passages and answers from retrieval.rag_prompt's passage + question prompt;
  `"extractive": true` (in the /generate body, or `"rag": {"extractive": true}`) answers with the
  likeliest span of the passages' text (extractive.py: no invented words). When retrieval found no
  passage there is no span: the answer is empty with finish_reason "no_passage" (`X-Finish-Reason`
  on a streamed /generate) and `sources: []`, and nothing is generated. The
  articles used come back as `sources` ([{title, article_id}]): a field of the JSON answer, the
  `X-Sources` header of a streamed /generate (percent-encoded UTF-8 JSON), a field of the first SSE
  event. Without an index these requests are a 400.
- Nothing from outside is trusted: bodies are UTF-8 JSON of at most 1 MB nested at most 64 levels
  (checked on the raw text before parsing, so no recursion error is reachable), strings with lone
  surrogates are refused, every number has a range, /tokenize takes at most 100k characters and
  /detokenize 100k token ids of this vocabulary, and no error message echoes text that cannot be
  encoded.
- Observable: `/metrics` (prometheus-client, one registry per app) counts finished streams by
  status and generated tokens, gauges queue depth and running rows, and has histograms of time to
  first token and of the time between tokens; `/health` has the same counts as JSON.
- A full queue answers 503 with Retry-After instead of letting latency grow without bound.
- A client that goes away stops costing compute, streaming or not: each job holds waitress's
  `client_disconnected` (reported once waitress reads the hang-up; `channel_request_lookahead` > 0
  makes it keep reading while a response is pending) and the worker asks every job before every
  step, so the request is dropped (its slots freed) within one step of waitress noticing; a failed
  write or a stop string ends a job the same way. Queued requests whose clients left are dropped
  when they reach the worker, or at once when the queue is full (once waitress has noticed, they
  cause no 503s). The drops are counted (`minigpt_cancelled_streams_total` in /metrics,
  `cancelled` in /health).
- `n` above `--max_batch` is a 400 naming both numbers: the n rows of a request share one prefill
  and run together, so they could never all get a slot (served in turns they would not share it).
- Every error is JSON `{"error": {"message", "type", "field"?}}`: validation names the offending
  field, unknown routes/methods keep their 404/405, and a catch-all turns anything unexpected into
  a 500 without a traceback (the traceback goes to the server log only).
- `--api_key` guards every route but `/health`, OPTIONS and unknown paths included (compared in
  constant time; the scheme word `Bearer` in any case, RFC 7235); `/health` shows only what
  `/v1/models` would (model description, queue depth) and no file paths. Under `--cors` a CORS
  preflight (OPTIONS with Origin and Access-Control-Request-Method: browsers send it without
  credentials) gets the same empty 200 with the CORS headers on every path, naming no route.
- Served by waitress (pure Python, Linux and Windows) with a thread per connected client; it sends
  each chunk as soon as it is written, which is what streaming needs. Connections that are still
  sending their request cost a socket, not a thread, and up to CONNECTION_LIMIT are accepted, so a
  few hundred slow clients cannot lock others out; a connection silent for CHANNEL_TIMEOUT_S closes.
"""
import argparse
import hmac
import itertools
import json
import logging
import queue
import re
import socket
import threading
import time
from collections import namedtuple
from dataclasses import replace
from urllib.parse import quote

import torch
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from engine import Engine, generate
from extractive import answer_spans
from inference import MODES, SAMPLING_DEFAULTS, load_run, pick_device
from openai_api import (
    CHAT,
    COMPLETIONS,
    GENERATION_FAILED,
    OpenAIReply,
    StopCutter,
    check_prompt_tokens,
    detokenize,
    find_model,
    make_echo,
    model_card,
    parse_openai,
    read_messages,
    sse,
    tokenize,
    tokenizer_info,
)
from request_fields import (
    MAX_RAG_K,
    RAG_K,
    ApiError,
    GenerationRequest,
    Limits,
    parse_settings,
    read_text,
    require,
    typed,
)
from retrieval import Index, IndexFolderError, rag_prompt, sources_text
from tokenizer import StreamDecoder

log = logging.getLogger("minigpt.server")

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
MAX_JSON_CONTAINERS = 10_000  # arrays + objects: 350k empty lists in 1 MB take ~1 s of GIL-holding parsing
MAX_HEADER_BYTES = 64 << 10
CONNECTION_LIMIT = 1000  # open connections waitress accepts (its default, 100, is easy to exhaust)
CHANNEL_TIMEOUT_S = 30  # a connection silent this long, with no response pending, is closed
POLL_S = 0.2  # how often a waiting handler checks whether its client is still there
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
NO_PASSAGE = "no_passage"  # finish_reason of an extractive answer when retrieval found no passage


def json_response(data, status=200, headers=None):
    # "replace": whatever slipped into a message, the answer is always valid UTF-8
    body = json.dumps(data, ensure_ascii=False).encode("utf-8", "replace")
    return Response(body, status, headers, content_type="application/json")


def error_response(status, message, field=None, error_type="invalid_request_error", headers=None):
    error = {"message": message, "type": error_type, **({"field": field} if field else {})}
    return json_response({"error": error}, status, headers)


# ----------------------------------------------------------------------------- reading a body

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [{ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}.get(b, 0) for b in range(256)]
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_brackets(raw):
    """The brackets of UTF-8 JSON (bytes) that lie outside strings, in order.

    Exact for any valid JSON prefix, and linear (bytes methods only): escaped backslashes and escaped
    quotes are removed first (left to right, which pairs them as the parser does), then every
    other '"' opens or closes a string. In UTF-8 these ASCII bytes never occur inside a character.
    """
    outside = raw.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    return b"".join(outside).translate(None, _NOT_BRACKETS)


def json_depth(brackets):
    """The deepest nesting that `json_brackets` output reaches."""
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)



def lone_surrogate_at(value, path):
    """The path of the first string (key or value) in `value` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                return path  # "" for a key of the body itself
            name = key if len(key) <= 40 else key[:40] + "…"
            found = lone_surrogate_at(item, f"{path}.{name}" if path else name)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_json_body(raw):
    """The JSON object in a request body (bytes), or an ApiError(400) saying what is wrong."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8: {e}") from None
    # both checked before parsing: the parser recurses once per level, and builds every container
    brackets = json_brackets(raw)
    require(len(brackets) <= 2 * MAX_JSON_CONTAINERS,
            f"the JSON holds more than {MAX_JSON_CONTAINERS} arrays and objects", None)
    require(json_depth(brackets) <= MAX_JSON_DEPTH, f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep", None)
    try:
        body = json.loads(text or "null")
    except ValueError as e:  # also a number with more than 4300 digits
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    require(isinstance(body, dict), "the body must be a JSON object", None)
    field = lone_surrogate_at(body, "")
    require(field is None, f"'{field or 'a key'}' is not valid Unicode text (it holds a lone surrogate)", field or None)
    return body


# ----------------------------------------------------------------------------- request validation

def parse_generate(body, limits):
    """A `POST /generate` body as a GenerationRequest."""
    mode = typed(body, "mode", str, "text", "a string")
    require(mode in MODES + ("rag",), f"'mode' must be one of {', '.join(MODES + ('rag',))}", "mode")
    rag_k = typed(body, "rag_k", int, RAG_K, "an integer")
    require(rag_k is not None and 1 <= rag_k <= MAX_RAG_K, f"'rag_k' must be between 1 and {MAX_RAG_K}", "rag_k")
    if mode == "chat" and "messages" in body:  # a whole conversation (the arena's chat with a peer)
        prompt = read_messages(body, limits)
    else:
        prompt = read_text(body, "prompt", limits)
    system = typed(body, "system", str, None, "a string")
    require(system is None or len(system) <= limits.max_prompt_chars,
            f"'system' is longer than {limits.max_prompt_chars} characters", "system")
    stream = typed(body, "stream", bool, True, "true or false")
    extractive = typed(body, "extractive", bool, False, "true or false")
    require(not extractive or mode == "rag", "'extractive' copies the answer from retrieved passages: mode 'rag'",
            "extractive")
    settings = parse_settings(body, limits, "max_new_tokens", SAMPLING_DEFAULTS)
    if mode == "rag":  # the question is answered from retrieved passages, in the qa layout
        return GenerationRequest(prompt, "qa", None, "prompt", stream=stream, rag_k=rag_k, extractive=extractive,
                                 **settings)
    return GenerationRequest(prompt, mode, system, "prompt", stream=stream, **settings)


# ----------------------------------------------------------------------------- the workers

def _never():
    return False


class Job:
    """One output stream (one choice) as the worker sees it; the worker writes text pieces to `out`,
    then None. A request with n choices is n Jobs sharing one `group` (one engine request)."""

    def __init__(self, ids, max_new_tokens, sampling, stop_ids, seed, logprobs=None, span=None):
        self.ids, self.max_new_tokens, self.sampling = ids, max_new_tokens, sampling
        self.span = span  # an extractive answer's candidates (extractive.Spans), or None
        self.stop_ids, self.seed, self.logprobs = frozenset(stop_ids), seed, logprobs
        self.out = queue.Queue()  # unbounded: the worker never waits for a slow reader
        self.cancelled = threading.Event()
        self.tokens, self.finish_reason, self.started = 0, None, time.monotonic()
        self.generated, self.decoder = [], None  # the worker's: ids sent so far, its StreamDecoder
        self.entries = []  # (token, logprob, [(token, logprob)] or None) per token, when logprobs were asked
        self.last_token_at = None  # the worker's: when the previous token came (latency metrics)
        self.group = [self]
        self.stop_string_hit = False  # set by the reading handler, never by the worker
        self.client_gone = _never  # set by the service: waitress's client_disconnected, polled every step

    @property
    def reason(self):
        return "stop" if self.stop_string_hit else self.finish_reason

    def gone(self):
        """Whether nobody reads this job any more (its reader stopped, or its client hung up). The
        worker asks every step, so an abandoned row stops within one step of waitress noticing."""
        if not self.cancelled.is_set() and self.finish_reason is None and self.client_gone():
            self.cancelled.set()
        return self.cancelled.is_set()

    def pieces(self, stops, client_gone):
        """Text pieces as they arrive; cancels the job when the caller stops early or leaves."""
        cutter = StopCutter(stops)
        try:
            while True:
                try:
                    piece = self.out.get(timeout=POLL_S)
                except queue.Empty:
                    if self.cancelled.is_set() or client_gone():  # the worker may have dropped it already
                        return
                    continue
                if piece is None:
                    tail = cutter.flush()
                    if tail:
                        yield tail
                    return
                text = cutter.push(piece)
                if text:
                    yield text
                if cutter.hit:
                    self.stop_string_hit = True
                    return
        finally:
            self.cancelled.set()  # a no-op for a finished row; drops a running or queued one


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("minigpt_requests", "Finished output streams by status", ["status"],
                                registry=self.registry)
        self.tokens = Counter("minigpt_generated_tokens", "Tokens generated", registry=self.registry)
        self.cancelled = Counter("minigpt_cancelled_streams", "Output streams dropped before their end because "
                                 "their reader stopped (the client left, or a stop string ended it)",
                                 registry=self.registry)
        self.queue_depth = Gauge("minigpt_queue_depth", "Requests waiting for the worker", registry=self.registry)
        self.running = Gauge("minigpt_running_rows", "Rows being generated", registry=self.registry)
        self.ttft = Histogram("minigpt_time_to_first_token_seconds", "From submission to the first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.token_latency = Histogram("minigpt_token_latency_seconds", "Between two tokens of one stream",
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                       registry=self.registry)

    def exposition(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Worker:
    """What both workers share: the bounded queue of requests (lists of Jobs), stats, delivery."""

    def __init__(self, run, max_batch, queue_size):
        self.run, self.max_batch = run, max_batch
        self.waiting = queue.Queue(maxsize=queue_size)
        self.active = 0  # rows being generated (read by /health and /metrics)
        self.stats = dict(requests=0, rejected=0, batches=0, largest_batch=0, cancelled=0, tokens=0, failed=0)
        self.metrics = Metrics()
        self.metrics.queue_depth.set_function(self.waiting.qsize)
        self.metrics.running.set_function(lambda: self.active)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="generator", daemon=True)

    def count(self, key, n=1):
        with self.lock:
            self.stats[key] += n

    def submit(self, jobs):
        """Queue one request: a Job, or the Jobs of its n choices (continuous worker only)."""
        jobs = [jobs] if isinstance(jobs, Job) else list(jobs)
        for job in jobs:
            job.group = jobs
        try:
            self.waiting.put_nowait(jobs)
        except queue.Full:
            if self._purge_gone():
                return self.submit(jobs)
            self.count("rejected")
            self.metrics.requests.labels("rejected").inc()
            raise ApiError(503, "the server is busy (request queue full); retry shortly",
                           error_type="server_busy") from None
        self.count("requests")

    def _purge_gone(self):
        """Drop the queued requests whose clients all left; how many. A queue full of abandoned
        requests must not turn live clients away with 503s."""
        with self.waiting.mutex:
            gone = [jobs for jobs in self.waiting.queue if all(job.gone() for job in jobs)]
            for jobs in gone:
                self.waiting.queue.remove(jobs)
            if gone:
                self.waiting.not_full.notify(len(gone))
        for job in (job for jobs in gone for job in jobs):
            self._cancelled(job)
        return len(gone)

    def close(self):
        """Stop the worker; running and queued jobs end with finish_reason "error"."""
        self.closed.set()
        self.thread.join(timeout=5)
        while True:
            try:
                self._abandon(self.waiting.get_nowait())
            except queue.Empty:
                return

    def _cancelled(self, job):
        """A job dropped because its reader stopped: its client left, or a stop string ended it."""
        self.count("cancelled")
        self.metrics.cancelled.inc()
        self.metrics.requests.labels("stop" if job.stop_string_hit else "cancelled").inc()

    def _abandon(self, jobs):
        for job in jobs:
            if job.finish_reason is None:
                self.count("failed")
                self.metrics.requests.labels("error").inc()
                job.finish_reason = "error"
                job.out.put(None)

    def _deliver(self, job, token, reason, entry=None):
        """Hand one token to its job as text; `reason` ends the job ("stop" or "length")."""
        now = time.monotonic()
        if job.last_token_at is None:
            self.metrics.ttft.observe(now - job.started)
        else:
            self.metrics.token_latency.observe(now - job.last_token_at)
        job.last_token_at = now
        job.decoder = job.decoder or StreamDecoder(self.run.tok)
        job.tokens += 1
        job.generated.append(token)
        if entry is not None:
            job.entries.append(entry)
        piece = job.decoder.push(token) + (job.decoder.flush() if reason else "")
        if piece:
            job.out.put(piece)
        if reason:
            job.finish_reason = reason
            self.metrics.requests.labels(reason).inc()
            job.out.put(None)


class Scheduler(Worker):
    """The continuous worker: one thread drives one `engine.Engine` (iteration-level scheduling).

    Each loop: drop cancelled requests, add waiting ones while fewer than `max_batch` rows are in
    the engine, run one `engine.step()`, hand its tokens to their jobs. A request's rows leave the
    batch the step they finish; a new one starts at the next step (its prompt prefilled in chunks
    of `prefill_chunk` tokens, so a long prompt does not stall running streams).
    """

    def __init__(self, run, max_batch=16, queue_size=64, prefill_chunk=64):
        super().__init__(run, max_batch, queue_size)
        self.prefill_chunk = prefill_chunk
        self.engine = Engine(run.model, max_batch, prefill_chunk)
        self.requests = {}  # engine request id -> its jobs
        self.thread.start()

    def _loop(self):
        while not self.closed.is_set():
            try:
                self._admit(block=not self.requests)
                self._drop_cancelled()
                if self.requests:
                    self._step()
            except Exception:  # a fault of the worker itself: no client is left waiting
                log.exception("the worker failed")
                self._abandon([job for jobs in self.requests.values() for job in jobs])
                self._reset()
        self._abandon([job for jobs in self.requests.values() for job in jobs])

    def _rows(self):
        return sum(len(jobs) for jobs in self.requests.values())

    def _admit(self, block):
        while self._rows() < self.max_batch:
            try:
                jobs = self.waiting.get(timeout=POLL_S) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if all(j.gone() for j in jobs):  # its client left while it waited
                for job in jobs:
                    self._cancelled(job)
                continue
            self._add(self.engine, jobs)

    def _add(self, engine, jobs):
        """Add a request (resuming from what its jobs already sent); a request the engine refuses
        ends alone with "error"."""
        first = jobs[0]
        try:
            request = engine.add(first.ids + first.generated, first.max_new_tokens - first.tokens,
                                 stop_ids=first.stop_ids, seed=first.seed, logprobs=first.logprobs or 0, n=len(jobs),
                                 span=first.span, **first.sampling)
        except (ValueError, TypeError) as e:
            log.warning("the engine refused a request: %s", e)
            self._abandon(jobs)
            return None
        if engine is self.engine:
            self.requests[request] = jobs
        return request

    def _drop_cancelled(self):
        for rid, jobs in list(self.requests.items()):
            if all(j.finish_reason or j.gone() for j in jobs):
                self.engine.cancel(rid)
                del self.requests[rid]
                for job in jobs:
                    if job.finish_reason is None:
                        self._cancelled(job)
        self.active = self.engine.running()

    def _step(self):
        try:
            events = self.engine.step()
        except Exception:
            log.exception("a generation step failed for %d requests", len(self.requests))
            self._isolate()
            return
        self.active = self.engine.running()
        with self.lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], self.active)
            self.stats["tokens"] += len(events)
        self.metrics.tokens.inc(len(events))
        for event in events:
            jobs = self.requests.get(event.request)
            if jobs is None:
                continue
            job = jobs[event.index]
            try:
                self._deliver(job, event.token, event.finish_reason, (event.token, event.logprob, event.top_logprobs)
                              if job.logprobs is not None else None)
            except Exception:  # this row's own fault (its text): end it alone
                log.exception("a row failed while its text was decoded")
                self._abandon([job])
                job.cancelled.set()
            if all(j.finish_reason for j in jobs):
                self.requests.pop(event.request, None)

    def _reset(self):
        self.engine = Engine(self.run.model, self.max_batch, self.prefill_chunk)
        self.requests, self.active = {}, 0

    def _isolate(self):
        """After a failed step: try each live request alone for one step in a scratch engine; one
        that fails alone ends with "error", the others resume (from the tokens they already sent)
        in a fresh engine. Greedy rows resume exactly; a sampled row redraws from its seed."""
        live = [jobs for jobs in self.requests.values() if any(j.finish_reason is None for j in jobs)]
        self._reset()
        culprits = []
        for jobs in live:
            scratch = Engine(self.run.model, len(jobs), self.prefill_chunk)
            try:
                if self._add(scratch, jobs) is not None:
                    while scratch.has_work() and not scratch.step():
                        pass
            except Exception:
                log.exception("a request fails alone: it ends with an error")
                culprits.append(jobs)
        if not culprits:  # no request fails alone: the fault is not one request's, so end them all
            culprits = live
        for jobs in live:
            if jobs in culprits or not resumable(jobs):
                self._abandon(jobs)
            elif jobs[0].finish_reason is None:
                self._add(self.engine, jobs)


def resumable(jobs):
    """Can a request that already sent tokens go on in a fresh engine? Not n > 1 rows (one request,
    but their texts differ), nor an extractive row (its span is followed from the first token)."""
    sent = any(j.generated for j in jobs)
    return not sent or (len(jobs) == 1 and jobs[0].span is None)


class Batcher(Worker):
    """The static worker (`--scheduler static`, kept for bench/bench_server.py's comparison):
    waits `gather_ms` for a burst of requests, then runs up to `max_batch` of them through
    `engine.generate` until the longest ends; late arrivals wait for the next batch. One row
    (n=1) per request; logprobs are not recorded; no extractive answers."""

    def __init__(self, run, max_batch=16, queue_size=64, gather_ms=5):
        super().__init__(run, max_batch, queue_size)
        self.gather_s = gather_ms / 1000
        self.thread.start()

    def _loop(self):
        while not self.closed.is_set():
            try:
                first = self.waiting.get(timeout=POLL_S)
            except queue.Empty:
                continue
            batch = [jobs[0] for jobs in self._collect(first)]
            try:
                self._run(batch)
            except Exception:  # a fault of the worker itself: no client is left waiting
                log.exception("the worker failed on a batch of %d", len(batch))
                self._abandon(batch)
            finally:
                self.active = 0

    def _collect(self, first):
        """The first request plus those arriving until `gather_s` passes without one (a burst of
        clients lands in one batch), bounded by 10 * gather_s so a steady trickle cannot stall it."""
        batch, now = [first], time.monotonic()
        deadline, last_call = now + self.gather_s, now + 10 * self.gather_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.waiting.get(timeout=max(0.0, min(deadline, last_call) - time.monotonic())))
            except queue.Empty:
                break
            deadline = time.monotonic() + self.gather_s
        return batch

    def _run(self, batch):
        jobs = [j for j in batch if not j.gone()]
        for job in batch:
            if job.cancelled.is_set():
                self._cancelled(job)
        if not jobs:
            return
        with self.lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        self._isolating(jobs)

    def _isolating(self, jobs):
        """Generate for `jobs`; when that raises, retry the unfinished rows in halves (each resuming
        where it stopped) until a row fails alone: only such a row ends with "error"."""
        try:
            self._generate(jobs)
            return
        except Exception:
            left = [j for j in jobs if j.finish_reason is None and not j.cancelled.is_set()]
            log.exception("generation failed for %d rows (%d unfinished)", len(jobs), len(left))
        if len(jobs) == 1 or self.closed.is_set():
            self._abandon(left)
            return
        half = (len(left) + 1) // 2
        for part in (left[:half], left[half:]):
            if part:
                self._isolating(part)

    def _generate(self, jobs):
        per_row = {key: [j.sampling[key] for j in jobs] for key in SAMPLING_KEYS}
        # each row its own seed (a request without one gets a random one), so rows never share draws
        seeds = [j.seed if j.seed is not None else int(torch.randint(0, 2**62, (1,))) for j in jobs]
        done = [False] * len(jobs)
        self.active = len(jobs)
        # a row resumes from what it already sent; stop tokens are per row (modes differ), so
        # generate gets none and rows are ended here
        steps = generate(self.run.model, [j.ids + j.generated for j in jobs],
                         max(j.max_new_tokens - j.tokens for j in jobs), stop_ids=(), seed=seeds, **per_row)
        try:
            for step in steps:
                delivered = 0
                for i, (job, token) in enumerate(zip(jobs, step)):
                    if done[i]:
                        continue
                    if job.gone():
                        done[i] = True
                        self._cancelled(job)
                        continue
                    try:
                        reason = ("stop" if token in job.stop_ids else
                                  "length" if job.tokens + 1 >= job.max_new_tokens else None)
                        self._deliver(job, token, reason)
                    except Exception:  # this row's own fault (its text): end it alone
                        log.exception("a row failed while its text was decoded")
                        self._abandon([job])
                    delivered += 1
                    done[i] = job.finish_reason is not None
                self.count("tokens", delivered)
                self.metrics.tokens.inc(delivered)
                self.active = done.count(False)
                if self.active == 0:
                    break
                if self.closed.is_set():
                    self._abandon(job for job, finished in zip(jobs, done) if not finished)
                    break
        finally:
            steps.close()


# ----------------------------------------------------------------------------- what the routes do

def public_info(run, name):
    """What peers may see about the model: everything in run.info but the checkpoint's file path."""
    info = {k: v for k, v in run.info.items() if k != "checkpoint"}
    return {**info, "name": name or run.info["name"]}


Stream = namedtuple("Stream", "chunks content_type jobs headers")  # a streamed answer; its jobs end with it


def started(pieces, job):
    """`pieces` with its first piece already awaited, so that a job failing before any text gets
    an error status instead of an empty 200."""
    first = next(pieces, None)
    if first is None and job.reason == "error":
        raise ApiError(500, GENERATION_FAILED["message"], error_type="server_error")
    return itertools.chain(() if first is None else (first,), pieces)


def make_worker(run, scheduler="continuous", max_batch=16, queue_size=64, gather_ms=5, prefill_chunk=64):
    if scheduler == "continuous":
        return Scheduler(run, max_batch, queue_size, prefill_chunk)
    if scheduler == "static":
        return Batcher(run, max_batch, queue_size, gather_ms)
    raise ValueError(f"scheduler must be continuous or static, not {scheduler!r}")


class Service:
    """The routes' work without HTTP: read a request, queue its jobs, shape the answer."""

    def __init__(self, run, name=None, max_batch=16, queue_size=64, max_new_tokens_cap=1024, gather_ms=5,
                 scheduler="continuous", index=None):
        self.run, self.info, self.index = run, public_info(run, name), index
        self.max_batch, self.queue_size = max_batch, queue_size
        self.limits = Limits(run.info["block_size"], run.model.config.vocab_size, max_new_tokens_cap)
        self.worker = make_worker(run, scheduler, max_batch, queue_size, gather_ms)
        self.static = scheduler == "static"
        self.score_lock = threading.Lock()  # prompt scoring (echo): one teacher-forced forward at a time

    def health(self):
        w = self.worker
        queue_state = {"waiting": w.waiting.qsize(), "active": w.active, "max_batch": self.max_batch,
                       "queue_size": self.queue_size, **w.stats}
        return {"status": "ok", "model": self.info, "queue": queue_state}

    def models(self):
        return {"object": "list", "data": [model_card(self.info)]}

    def model(self, model_id):
        return find_model(self.info, model_id)

    def prompt(self, req):
        """(prompt ids, sources, span): sources name the retrieved articles in RAG mode, else None;
        span holds an extractive answer's candidates (extractive.Spans; none without a passage), else None."""
        if not req.rag_k:
            return self.run.prompt_ids(req.prompt, req.mode, req.system), None, None
        require(self.index is not None, "this server has no retrieval index (start it with --rag INDEX)",
                "rag" if req.prompt_field == "messages" else "mode")
        try:
            hits = self.index.search(req.prompt, req.rag_k)
            # the answer may slide the window, so the passages leave room for a short answer only
            room = min(req.max_new_tokens, self.limits.block_size // 4)
            ids, sources = rag_prompt(self.run.tok, req.prompt, hits, self.limits.block_size, room)
            span = answer_spans(self.run.tok, sources_text(sources), req.prompt) if req.extractive else None
        except ValueError as e:  # a question too long to search or to fit (PromptTooLong), too many spans
            raise ApiError(400, str(e), req.prompt_field) from None
        return ids, [{"title": s["title"], "article_id": s["article_id"]} for s in sources], span

    def submit(self, req, prepared=None, client_gone=None):
        """Queue a request: (its jobs, one per choice; sources or None). `prepared`: what
        `prompt(req)` would give, when the caller made it already; `client_gone()` says when the
        client hung up (the worker polls it every step)."""
        ids, sources, span = prepared or self.prompt(req)
        block_size = self.limits.block_size
        require(len(ids) > 0, "the prompt is empty", req.prompt_field)
        require(len(ids) < block_size, f"the prompt is {len(ids)} tokens; this model reads at most {block_size - 1}",
                req.prompt_field)
        if self.static:
            require(req.n == 1, "this server runs --scheduler static: only n=1", "n")
            require(req.logprobs is None, "this server runs --scheduler static: no logprobs", "logprobs")
            require(span is None, "this server runs --scheduler static: no extractive answers", "extractive")
            for name in set(req.sampling) - set(SAMPLING_KEYS):  # presence/frequency penalties (openai_api)
                raise ApiError(400, f"this server runs --scheduler static: no '{name}'", name)
        # the n rows of a request share one prefill, so they run together or not at all: more rows
        # than the engine has would wait for ever (the worker spun, never answering)
        require(req.n <= self.max_batch, f"'n' is {req.n}, but this server generates at most {self.max_batch} "
                f"rows at a time (--max_batch {self.max_batch}); ask for n <= {self.max_batch}", "n")
        stop_ids = () if req.ignore_eos else self.run.tok.stop_ids(req.mode)
        require(span is None or stop_ids, "an extractive answer ends with a stop token: not with 'ignore_eos'",
                "ignore_eos")
        jobs = [Job(ids, req.max_new_tokens, req.sampling, stop_ids, req.seed, req.logprobs, span)
                for _ in range(req.n)]
        if span is not None and not span.ids:  # no passage, so no span: an empty answer, nothing generated
            for job in jobs:
                job.finish_reason = NO_PASSAGE
                job.out.put(None)
            return jobs, sources
        for job in jobs:
            job.client_gone = client_gone or _never
        self.worker.submit(jobs)
        return jobs, sources

    def generate(self, body, client_gone):
        """`POST /generate`: a Stream of plain text (RAG: sources in the X-Sources header), or
        {"text", "tokens", "seconds", "finish_reason", "sources"?}."""
        req = parse_generate(body, self.limits)
        jobs, sources = self.submit(req, client_gone=client_gone)
        job = jobs[0]
        pieces = started(job.pieces(req.stops, client_gone), job)
        if req.stream:
            headers = {} if sources is None else {"X-Sources": quote(json.dumps(sources, ensure_ascii=False))}
            if job.finish_reason == NO_PASSAGE:
                headers["X-Finish-Reason"] = NO_PASSAGE
            return Stream(pieces, "text/plain; charset=utf-8", jobs, headers)
        text = "".join(pieces)
        if job.reason == "error":
            raise ApiError(500, GENERATION_FAILED["message"], error_type="server_error")
        return {"text": text, "tokens": job.tokens, "seconds": round(time.monotonic() - job.started, 4),
                "finish_reason": job.reason, **({} if sources is None else {"sources": sources})}

    def openai(self, api, body, client_gone):
        """An OpenAI route (`api` is CHAT or COMPLETIONS): a Stream of server-sent events, or a completion.
        Completions may hold several prompts: their choices come in order, n per prompt."""
        req = parse_openai(body, api, self.limits)
        items = req.prompt if isinstance(req.prompt, tuple) else (req.prompt,)
        prepared = [(list(p), None, None) if isinstance(p, tuple) else self.prompt(replace(req, prompt=p))
                    for p in items]
        check_prompt_tokens([ids for ids, _, _ in prepared], self.limits, req.max_new_tokens == 0,
                            req.prompt_field)
        scores = [self.score(ids, req.logprobs) if req.echo and req.logprobs is not None else None
                  for ids, _, _ in prepared]
        jobs = []
        try:
            for ids, sources, span in prepared:
                jobs += self.submit(req, (ids, sources, span), client_gone=client_gone)[0] if req.max_new_tokens else \
                    [finished_job(ids, req.logprobs) for _ in range(req.n)]
        except ApiError:  # the queue filled up part way: the prompts queued already stop too
            for job in jobs:
                job.cancelled.set()
            raise
        echoes = [make_echo(self.run.tok, ids, score) for (ids, _, _), score in zip(prepared, scores)
                  for _ in range(req.n)] if req.echo else None
        streams = [job.pieces(req.stops, client_gone) for job in jobs]
        streams[0] = started(streams[0], jobs[0])
        reply = OpenAIReply(api, self.info["name"], jobs, req.include_usage, self.run.tok, prepared[0][1], echoes,
                            sum(len(ids) for ids, _, _ in prepared))
        if req.stream:
            return Stream(sse(reply.events(streams)), "text/event-stream; charset=utf-8", jobs, {})
        texts = ["".join(pieces) for pieces in streams]
        if any(job.reason == "error" for job in jobs):
            raise ApiError(500, GENERATION_FAILED["message"], error_type="server_error")
        return reply.whole(texts)

    def score(self, ids, top):
        """The prompt's teacher-forced logprobs (inference.Run.prompt_logprobs). A forward without a
        cache changes nothing the worker reads, so the handler runs it itself, one at a time."""
        with self.score_lock:
            return self.run.prompt_logprobs(ids, top)

    def tokenize(self, body):
        """`POST /tokenize` (vLLM's shape; openai_api.tokenize)."""
        return tokenize(self.run.tok, body, self.limits)

    def detokenize(self, body):
        """`POST /detokenize`: {"tokens"} -> {"prompt", "text"} (special tokens are dropped)."""
        return detokenize(self.run.tok, body, self.limits)

    def tokenizer_info(self):
        return tokenizer_info(self.run.tok, self.limits)


def finished_job(ids, logprobs):
    """The job of a choice that generates nothing (`max_tokens: 0` with `echo`: the prompt is scored)."""
    job = Job(ids, 0, {}, (), None, logprobs)
    job.finish_reason = "length"
    job.out.put(None)
    return job


# ----------------------------------------------------------------------------- the Flask app

def key_matches(authorization, api_key):
    """Whether an Authorization header value is `Bearer <api_key>`. The scheme is case-insensitive
    and may be followed by several spaces (RFC 7235 section 2.1); the key is compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    same_key = hmac.compare_digest(token.lstrip(" ").encode(), api_key.encode())
    return scheme.lower() == "bearer" and same_key


def is_preflight(method, headers):
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method. Browsers send it
    without credentials, so under --cors it is answered without the key; any other OPTIONS needs it."""
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def create_app(run, name=None, api_key=None, cors=False, max_batch=16, queue=64, max_new_tokens_cap=1024,
               gather_ms=5, scheduler="continuous", index=None):
    """The WSGI app serving `run` (an inference.Run): Flask wiring around a `Service`
    (`app.extensions["service"]`; its worker is `app.extensions["batcher"]`). `index`: a
    retrieval.Index for RAG requests, or None."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    service = Service(run, name, max_batch, queue, max_new_tokens_cap, gather_ms, scheduler, index)
    app.extensions.update(service=service, batcher=service.worker)

    @app.before_request
    def check_key():
        if cors and is_preflight(request.method, request.headers):
            return Response(status=200)  # the same empty answer on every path: it names no route
        if not api_key or request.path == "/health" or key_matches(request.headers.get("Authorization", ""), api_key):
            return None
        return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                              error_type="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    @app.after_request
    def add_cors(response):
        if cors:
            response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = "X-Sources"
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.errorhandler(ApiError)
    def api_error(e):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(e.status, e.message, e.field, e.error_type, headers)

    @app.errorhandler(HTTPException)
    def http_error(e):
        headers = [(k, v) for k, v in e.get_headers() if k.lower() != "content-type"]
        return error_response(e.code, e.description, error_type=e.name.lower().replace(" ", "_"), headers=headers)

    @app.errorhandler(Exception)
    def unexpected_error(e):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal server error", error_type="server_error")

    def body():
        return parse_json_body(request.get_data(cache=False))

    def answer(work, *args):
        """Run `work` on the request's JSON body; a Stream becomes a streamed response."""
        client_gone = request.environ.get("waitress.client_disconnected", lambda: False)
        result = work(*args, body(), client_gone)
        if not isinstance(result, Stream):
            return json_response(result)
        response = Response(result.chunks, content_type=result.content_type,
                            headers={"Cache-Control": "no-cache", **result.headers})
        # however the response ends (done, write failed, never iterated), its jobs stop with it
        response.call_on_close(lambda: [job.cancelled.set() for job in result.jobs])
        return response

    def metrics():
        data, content_type = service.worker.metrics.exposition()
        return Response(data, content_type=content_type)

    app.get("/health")(lambda: json_response(service.health()))
    app.get("/v1/models", endpoint="models")(lambda: json_response(service.models()))
    app.get("/metrics", endpoint="metrics")(metrics)
    app.post("/tokenize", endpoint="tokenize")(lambda: json_response(service.tokenize(body())))
    app.post("/detokenize", endpoint="detokenize")(lambda: json_response(service.detokenize(body())))
    app.get("/tokenizer_info", endpoint="tokenizer_info")(lambda: json_response(service.tokenizer_info()))
    app.get("/v1/models/<path:model_id>", endpoint="model")(lambda model_id: json_response(service.model(model_id)))
    app.post("/generate", endpoint="generate")(lambda: answer(service.generate))
    app.post("/v1/chat/completions", endpoint="chat_completions")(lambda: answer(service.openai, CHAT))
    app.post("/v1/completions", endpoint="completions")(lambda: answer(service.openai, COMPLETIONS))
    return app


# ----------------------------------------------------------------------------- running it

def connection_limit(wanted=CONNECTION_LIMIT):
    """`wanted`, or less where the open-files limit is lower (each connection holds a descriptor)."""
    try:
        import resource  # not on Windows
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else max(100, min(wanted, soft - 100))


def make_server(app, host="127.0.0.1", port=5000, clients=84, idle_timeout_s=CHANNEL_TIMEOUT_S):
    """A waitress server for `app` (port 0 picks a free port: see `.effective_port`).

    One waitress thread per connected client, since a streaming response holds its thread; the
    request lookahead lets waitress notice a client that hangs up while its response is pending.
    A connection still sending its request holds no thread, so the connection limit is raised far
    above the thread count (poll() instead of select(), which stops at 1024 descriptors), and a
    silent one is closed after `idle_timeout_s` (checked every few seconds).
    """
    from waitress import create_server

    return create_server(app, host=host, port=port, threads=clients, channel_request_lookahead=1,
                         max_request_body_size=4 * MAX_BODY_BYTES, max_request_header_size=MAX_HEADER_BYTES,
                         connection_limit=connection_limit(), asyncore_use_poll=True,
                         channel_timeout=idle_timeout_s, cleanup_interval=min(5, idle_timeout_s), ident="minigpt-zh")


def lan_address():
    """This machine's address on the LAN (a UDP socket 'connect' sends no packet)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def main():
    ap = argparse.ArgumentParser(description="Serve a MiniGPT-zh run over HTTP: streaming /generate and "
                                             "OpenAI-compatible /v1 routes.")
    ap.add_argument("--out_dir", required=True, help="run directory holding best.pt / last.pt")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept LAN peers (use --api_key then)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    ap.add_argument("--name", default=None, help="model name shown to clients (default: the run directory's name)")
    ap.add_argument("--cors", action="store_true", help="allow browser pages from any origin to call the API")
    ap.add_argument("--max_batch", type=int, default=16,
                    help="rows generated together (the continuous scheduler queues the rest)")
    ap.add_argument("--queue", type=int, default=64, help="requests that may wait; more get 503")
    ap.add_argument("--max_new_tokens_cap", type=int, default=1024)
    ap.add_argument("--batch_wait_ms", type=float, default=5,
                    help="--scheduler static only: how long it waits for more arrivals before starting a batch")
    ap.add_argument("--scheduler", choices=("continuous", "static"), default="continuous",
                    help="continuous: requests join and leave the running batch every step; static: the "
                         "previous batcher (a batch runs until its longest row ends), kept for comparison")
    ap.add_argument("--rag", default=None, metavar="INDEX",
                    help="a retrieval index folder (retrieval.py): enables mode 'rag' and the chat 'rag' field")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        run = load_run(args.out_dir, device=pick_device(args.device))
        index = Index(args.rag) if args.rag else None
    except (FileNotFoundError, ValueError, IndexFolderError) as e:
        raise SystemExit(f"error: {e}") from None
    app = create_app(run, name=args.name, api_key=args.api_key, cors=args.cors, max_batch=args.max_batch,
                     queue=args.queue, max_new_tokens_cap=args.max_new_tokens_cap, gather_ms=args.batch_wait_ms,
                     scheduler=args.scheduler, index=index)
    server = make_server(app, args.host, args.port, clients=args.max_batch + args.queue + 4)
    info = public_info(run, args.name)
    print(f"model {info['name']}: {info['params']:,} params, {info['n_layer']} layers, block {info['block_size']}, "
          f"vocab {info['vocab_size']} (tokenizer {info['tokenizer']}), kind {info['kind']}, iter {info['iter']}, "
          f"val_loss {info['val_loss']}, device {next(run.model.parameters()).device}")
    port = server.effective_port
    hosts = ["127.0.0.1", lan_address()] if args.host in ("0.0.0.0", "::") else [args.host]
    for host in hosts:
        print(f"serving on http://{host}:{port}  (POST /generate, /v1/chat/completions, /v1/completions; GET /health)")
    if args.host in ("0.0.0.0", "::") and not args.api_key:
        print("WARNING: listening on every network interface without --api_key: anyone who can reach this machine "
              "can generate text with this model (using its CPU/GPU time) and read the model's description. "
              "Pass --api_key KEY to require 'Authorization: Bearer KEY'.")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["batcher"].close()


if __name__ == "__main__":
    main()
