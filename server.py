"""Serve a trained run to peers on the LAN: a streaming `/generate` API and OpenAI-compatible routes.

    python server.py --out_dir out/sft [--host 127.0.0.1] [--port 5000] [--api_key KEY] [--cors]

Design choices:
- One model, one owner. A single background thread (`Batcher`) owns the model; HTTP handler
  threads never touch it. Handlers tokenize and validate, put a `Job` on a bounded queue and read
  text pieces back from the job's own queue, so streams cannot cross.
- Dynamic batching. The worker takes the first waiting job, keeps collecting while jobs arrive
  less than `gather_ms` apart (at most 10 * gather_ms), and runs up to `max_batch` jobs together
  through `model.generate` (the project's one generator) with per-row sampling settings. Stop
  tokens and per-row token budgets are applied here, row by row, so jobs of different modes share
  a batch; the batch ends when every row is finished or cancelled, and new arrivals form the next
  batch (simple, but a long request holds late arrivals back until its batch ends).
- Determinism. Greedy (temperature 0) rows equal their single-request output while prompt +
  output fit in the model's window (`generate` keeps rows independent; once a window slides, it
  slides for the whole batch). Sampled rows share one random generator per batch (seeded by the
  first row that brings a `seed`), so with batching a sampled output depends on its batch mates:
  `seed` is reproducible only for a request served alone.
- A full queue answers 503 with Retry-After instead of letting latency grow without bound.
- A client that goes away stops costing compute: a failed write closes the response iterator, and
  a handler waiting for tokens polls waitress's `client_disconnected`; either marks the job
  cancelled and the worker drops its row at the next step (and skips it if it was still queued).
- Every error is JSON `{"error": {"message", "type", "field"?}}`: validation names the offending
  field, unknown routes/methods keep their 404/405, and a catch-all turns anything unexpected into
  a 500 without a traceback (the traceback goes to the server log only).
- `--api_key` guards every route but `/health` (compared in constant time); `/health` shows only
  what `/v1/models` would (model description, queue depth) and no file paths.
- Served by waitress (pure Python, Linux and Windows) with a thread per connected client; it sends
  each chunk as soon as it is written, which is what streaming needs.
"""
import argparse
import hmac
import json
import logging
import math
import queue
import socket
import threading
import time
import uuid

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from checkpoint import MODES, load_run, pick_device
from engine import generate
from tokenizer import StreamDecoder

log = logging.getLogger("minigpt.server")

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_NEW_TOKENS = 256
POLL_S = 0.2  # how often a waiting handler checks whether its client is still there
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")


class ApiError(Exception):
    def __init__(self, status, message, field=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_response(status, message, field=None, kind="invalid_request_error", headers=None):
    error = {"message": message, "type": kind, **({"field": field} if field else {})}
    return Response(json.dumps({"error": error}, ensure_ascii=False), status, headers,
                    content_type="application/json")


# ----------------------------------------------------------------------------- request validation

def typed(body, name, kinds, default, description):
    """body[name] (or the default) checked against `kinds`; JSON true/false never counts as a number."""
    value = body.get(name, default)
    if value is None:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or wrong_bool or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {description}, not {json.dumps(value, ensure_ascii=False)[:60]}", name)
    return value


def require(ok, message, field):
    if not ok:
        raise ApiError(400, message, field)


def parse_json_body():
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except ValueError as e:  # also UnicodeDecodeError
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    require(isinstance(body, dict), "the body must be a JSON object", None)
    return body


def parse_generation(body, cap, max_tokens_name, defaults):
    """Sampling settings, token budget, stop strings and seed shared by every generating route."""
    number = (int, float)
    temperature = typed(body, "temperature", number, defaults["temperature"], "a number")
    require(temperature is not None and temperature >= 0, "'temperature' must be >= 0 (0 = greedy)", "temperature")
    top_k = typed(body, "top_k", int, defaults.get("top_k"), "an integer or null")
    require(top_k is None or top_k >= 0, "'top_k' must be >= 0 (0 or null = off)", "top_k")
    top_p = typed(body, "top_p", number, defaults.get("top_p"), "a number or null")
    require(top_p is None or 0 < top_p <= 1, "'top_p' must be in (0, 1]", "top_p")
    penalty = typed(body, "repetition_penalty", number, 1.0, "a number")
    require(penalty is not None and penalty > 0, "'repetition_penalty' must be > 0 (1 = off)", "repetition_penalty")
    max_new = typed(body, max_tokens_name, int, min(DEFAULT_MAX_NEW_TOKENS, cap), "an integer")
    require(max_new is not None and 1 <= max_new <= cap, f"'{max_tokens_name}' must be between 1 and {cap}",
            max_tokens_name)
    seed = typed(body, "seed", int, None, "an integer or null")
    require(seed is None or 0 <= seed < 2**63, "'seed' must be between 0 and 2**63 - 1", "seed")
    stop = typed(body, "stop", (str, list), None, "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    require(len(stop) <= 4 and all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop),
            "'stop' takes at most 4 non-empty strings of up to 200 characters", "stop")
    ignore_eos = typed(body, "ignore_eos", bool, False, "true or false")
    if temperature == 0:  # greedy ignores top-k/top-p; leaving them on would make the batch sort the vocabulary
        top_k = top_p = None
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, repetition_penalty=float(penalty))
    return dict(sampling=sampling, max_new_tokens=max_new, seed=seed, stops=stop, ignore_eos=ignore_eos)


def parse_messages(body):
    messages = body.get("messages")
    require(isinstance(messages, list) and messages, "'messages' must be a non-empty list of {role, content}",
            "messages")
    for i, m in enumerate(messages):
        require(isinstance(m, dict), f"'messages[{i}]' must be an object with role and content", f"messages[{i}]")
        require(m.get("role") in ("system", "user", "assistant"),
                f"'messages[{i}].role' must be system, user or assistant", f"messages[{i}].role")
        require(isinstance(m.get("content"), str), f"'messages[{i}].content' must be a string",
                f"messages[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ----------------------------------------------------------------------------- stop strings

class StopCutter:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops):
        self.stops, self.buffer, self.hit = stops, "", False

    def push(self, piece):
        if not self.stops:
            return piece
        self.buffer += piece
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            text, self.buffer = self.buffer[:min(found)], ""
            return text
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        text, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return text

    def flush(self):
        text, self.buffer = self.buffer, ""
        return text


# ----------------------------------------------------------------------------- the batching worker

class Job:
    """One request as the worker sees it; the worker writes text pieces to `out`, then None."""

    def __init__(self, ids, max_new_tokens, sampling, stop_ids, seed):
        self.ids, self.max_new_tokens, self.sampling = ids, max_new_tokens, sampling
        self.stop_ids, self.seed = frozenset(stop_ids), seed
        self.out = queue.Queue()  # unbounded: the worker never waits for a slow reader
        self.cancelled = threading.Event()
        self.tokens, self.finish_reason, self.started = 0, None, time.monotonic()
        self.stop_string_hit = False  # set by the reading handler, never by the worker

    @property
    def reason(self):
        return "stop" if self.stop_string_hit else self.finish_reason

    def pieces(self, stops, client_gone):
        """Text pieces as they arrive; cancels the job when the caller stops early or leaves."""
        cutter = StopCutter(stops)
        try:
            while True:
                try:
                    piece = self.out.get(timeout=POLL_S)
                except queue.Empty:
                    if client_gone():
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


class Batcher:
    """Owns the model: collects waiting jobs into batches and runs them through `generate`."""

    def __init__(self, run, max_batch=16, queue_size=64, gather_ms=5):
        self.run, self.max_batch, self.gather_s = run, max_batch, gather_ms / 1000
        self.waiting = queue.Queue(maxsize=queue_size)
        self.active = 0  # rows of the running batch still generating (read by /health)
        self.stats = dict(requests=0, rejected=0, batches=0, largest_batch=0, cancelled=0, tokens=0)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="generator", daemon=True)
        self.thread.start()

    def count(self, key, n=1):
        with self.lock:
            self.stats[key] += n

    def submit(self, job):
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            self.count("rejected")
            raise ApiError(503, "the server is busy (request queue full); retry shortly", kind="server_busy") from None
        self.count("requests")

    def close(self):
        """Stop the worker; running and queued jobs end with finish_reason "error"."""
        self.closed.set()
        self.thread.join(timeout=5)
        while True:
            try:
                self._abandon([self.waiting.get_nowait()])
            except queue.Empty:
                return

    def _loop(self):
        while not self.closed.is_set():
            try:
                first = self.waiting.get(timeout=POLL_S)
            except queue.Empty:
                continue
            batch = self._collect(first)
            try:
                self._run(batch)
            except Exception:  # keep serving; the affected requests end with finish_reason "error"
                log.exception("generation failed for a batch of %d", len(batch))
                self._abandon(batch)
            finally:
                self.active = 0

    @staticmethod
    def _abandon(jobs):
        for job in jobs:
            if job.finish_reason is None:
                job.finish_reason = "error"
                job.out.put(None)

    def _collect(self, first):
        """The first job plus those arriving until `gather_s` passes without one (a burst of clients
        lands in one batch), bounded by 10 * gather_s so a steady trickle cannot stall the batch."""
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
        jobs = [j for j in batch if not j.cancelled.is_set()]
        self.count("cancelled", len(batch) - len(jobs))
        if not jobs:
            return
        with self.lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        per_row = {key: [j.sampling[key] for j in jobs] for key in SAMPLING_KEYS}
        seed = next((j.seed for j in jobs if j.seed is not None), None)
        decoders = [StreamDecoder(self.run.tok) for _ in jobs]
        done = [False] * len(jobs)
        self.active = len(jobs)
        # stop tokens are per row (modes differ), so generate gets none and rows are ended here
        steps = generate(self.run.model, [j.ids for j in jobs], max(j.max_new_tokens for j in jobs),
                         stop_ids=(), seed=seed, **per_row)
        try:
            for step in steps:
                delivered = 0
                for i, (job, token) in enumerate(zip(jobs, step)):
                    if done[i]:
                        continue
                    if job.cancelled.is_set():
                        done[i] = True
                        self.count("cancelled")
                        continue
                    job.tokens += 1
                    delivered += 1
                    reason = "stop" if token in job.stop_ids else "length" if job.tokens >= job.max_new_tokens else None
                    piece = decoders[i].push(token) + (decoders[i].flush() if reason else "")
                    if piece:
                        job.out.put(piece)
                    if reason:
                        job.finish_reason, done[i] = reason, True
                        job.out.put(None)
                self.count("tokens", delivered)
                self.active = done.count(False)
                if self.active == 0:
                    break
                if self.closed.is_set():
                    self._abandon(job for job, finished in zip(jobs, done) if not finished)
                    break
        finally:
            steps.close()


# ----------------------------------------------------------------------------- the Flask app

def public_info(run, name):
    """What peers may see about the model: everything in run.info but the checkpoint's file path."""
    info = {k: v for k, v in run.info.items() if k != "checkpoint"}
    return {**info, "name": name or run.info["name"]}


def create_app(run, name=None, api_key=None, cors=False, max_batch=16, queue=64, max_new_tokens_cap=1024,
               gather_ms=5):
    """The WSGI app serving `run` (a checkpoint.Run); its worker is `app.extensions["batcher"]`."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.ensure_ascii = False
    info = public_info(run, name)
    model_name = info["name"]
    block_size = run.info["block_size"]
    max_prompt_chars = 8 * block_size  # a cheap bound checked before tokenizing
    batcher = Batcher(run, max_batch, queue, gather_ms)
    app.extensions["batcher"] = batcher
    expected_auth = f"Bearer {api_key}".encode() if api_key else None

    @app.before_request
    def check_key():
        if expected_auth is None or request.method == "OPTIONS" or request.path == "/health":
            return None
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected_auth):
            return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    def add_cors(response):
        if cors:
            response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    @app.errorhandler(ApiError)
    def api_error(e):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(e.status, e.message, e.field, e.kind, headers)

    @app.errorhandler(HTTPException)
    def http_error(e):
        headers = [(k, v) for k, v in e.get_headers() if k.lower() != "content-type"]
        return error_response(e.code, e.description, kind=e.name.lower().replace(" ", "_"), headers=headers)

    @app.errorhandler(Exception)
    def unexpected_error(e):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal server error", kind="server_error")

    def queue_state():
        return {"waiting": batcher.waiting.qsize(), "active": batcher.active, "max_batch": max_batch,
                "queue_size": queue, **batcher.stats}

    def new_job(ids, options, stop_ids):
        require(len(ids) > 0, "the prompt is empty", options["field"])
        require(len(ids) < block_size, f"the prompt is {len(ids)} tokens; this model reads at most "
                                       f"{block_size - 1}", options["field"])
        job = Job(ids, options["max_new_tokens"], options["sampling"], () if options["ignore_eos"] else stop_ids,
                  options["seed"])
        batcher.submit(job)
        return job

    def prompt_text(body, field="prompt"):
        text = typed(body, field, str, None, "a string")
        require(text is not None, f"'{field}' is required", field)
        require(len(text) <= max_prompt_chars, f"'{field}' is longer than {max_prompt_chars} characters", field)
        return text

    def streaming(chunks, content_type, job):
        response = Response(chunks, content_type=content_type, headers={"Cache-Control": "no-cache"})
        # however the response ends (done, write failed, never iterated), the job stops with it
        response.call_on_close(job.cancelled.set)
        return response

    def disconnect_check():
        return request.environ.get("waitress.client_disconnected", lambda: False)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": info, "queue": queue_state()}

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "minigpt-zh", **info}
        return {"object": "list", "data": [card]}

    @app.post("/generate")
    def generate_route():
        body = parse_json_body()
        mode = typed(body, "mode", str, "text", "a string")
        require(mode in MODES, f"'mode' must be one of {', '.join(MODES)}", "mode")
        if mode == "chat" and "messages" in body:  # a whole conversation (the arena's chat with a peer)
            prompt = parse_messages(body)
            require(sum(len(m["content"]) for m in prompt) <= max_prompt_chars,
                    f"'messages' are longer than {max_prompt_chars} characters", "messages")
        else:
            prompt = prompt_text(body)
        system = typed(body, "system", str, None, "a string")
        stream = typed(body, "stream", bool, True, "true or false")
        options = parse_generation(body, max_new_tokens_cap, "max_new_tokens",
                                   {"temperature": 0.8, "top_k": 200}) | {"field": "prompt"}
        job = new_job(run.prompt_ids(prompt, mode, system), options, run.tok.stop_ids(mode))
        pieces = job.pieces(options["stops"], disconnect_check())
        if stream:
            return streaming(pieces, "text/plain; charset=utf-8", job)
        text = "".join(pieces)
        if job.reason == "error":
            raise ApiError(500, "generation failed", kind="server_error")
        return {"text": text, "tokens": job.tokens, "seconds": round(time.monotonic() - job.started, 4),
                "finish_reason": job.reason}

    def openai_route(kind):
        """/v1/chat/completions (kind "chat") or /v1/completions (kind "text")."""
        body = parse_json_body()
        n = typed(body, "n", int, 1, "an integer")
        require(n == 1, "only n=1 is supported", "n")
        stream = typed(body, "stream", bool, False, "true or false")
        stream_options = typed(body, "stream_options", dict, {}, "an object") or {}
        include_usage = stream_options.get("include_usage") is True
        max_name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
        options = parse_generation(body, max_new_tokens_cap, max_name, {"temperature": 1.0})
        if kind == "chat":
            messages = parse_messages(body)
            require(sum(len(m["content"]) for m in messages) <= max_prompt_chars,
                    f"'messages' are longer than {max_prompt_chars} characters", "messages")
            ids = run.prompt_ids(messages, "chat")
        else:
            ids = run.prompt_ids(prompt_text(body), "text")
        job = new_job(ids, options | {"field": "messages" if kind == "chat" else "prompt"}, run.tok.stop_ids(kind))
        pieces = job.pieces(options["stops"], disconnect_check())
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_name}

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": job.tokens, "total_tokens": len(ids) + job.tokens}

        def choice(text, finish, delta):
            if kind == "text":
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"index": 0, ("delta" if delta else "message"): text, "logprobs": None, "finish_reason": finish}

        if not stream:
            text = "".join(pieces)
            if job.reason == "error":
                raise ApiError(500, "generation failed", kind="server_error")
            message = text if kind == "text" else {"role": "assistant", "content": text}
            return {**head, "choices": [choice(message, job.reason, False)], "usage": usage()}

        chunk_head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(content, finish=None):
            event = {**chunk_head, "choices": [choice(content, finish, True)]}
            return event | ({"usage": None} if include_usage else {})

        def events():
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            for piece in pieces:
                yield chunk({"content": piece} if kind == "chat" else piece)
            if job.reason == "error":
                yield {"error": {"message": "generation failed", "type": "server_error"}}
            else:
                yield chunk({} if kind == "chat" else "", job.reason)
            if include_usage:
                yield {**chunk_head, "choices": [], "usage": usage()}

        def sse():
            for event in events():
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return streaming(sse(), "text/event-stream; charset=utf-8", job)

    app.post("/v1/chat/completions", endpoint="chat_completions")(lambda: openai_route("chat"))
    app.post("/v1/completions", endpoint="completions")(lambda: openai_route("text"))
    return app


# ----------------------------------------------------------------------------- running it

def make_server(app, host="127.0.0.1", port=5000, clients=84):
    """A waitress server for `app` (port 0 picks a free port: see `.effective_port`).

    One waitress thread per connected client, since a streaming response holds its thread; the
    request lookahead lets waitress notice a client that hangs up while its response is pending.
    """
    from waitress import create_server

    return create_server(app, host=host, port=port, threads=clients, channel_request_lookahead=1,
                         max_request_body_size=4 * MAX_BODY_BYTES, ident="minigpt-zh")


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
    ap.add_argument("--max_batch", type=int, default=16, help="requests generated together in one batch")
    ap.add_argument("--queue", type=int, default=64, help="requests that may wait; more get 503")
    ap.add_argument("--max_new_tokens_cap", type=int, default=1024)
    ap.add_argument("--batch_wait_ms", type=float, default=5,
                    help="how long the worker waits for more arrivals before starting a batch")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        run = load_run(args.out_dir, device=pick_device(args.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    app = create_app(run, name=args.name, api_key=args.api_key, cors=args.cors, max_batch=args.max_batch,
                     queue=args.queue, max_new_tokens_cap=args.max_new_tokens_cap, gather_ms=args.batch_wait_ms)
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
