"""The Gradio arena: stream one or two models side by side, vote, and keep an Elo leaderboard.

    python sample_gradio.py --models out/pretrain out/sft --peers config/peers.json
    python sample_gradio.py --models out/pretrain out/sft --rag data/index     # adds the RAG box

Design choices:
- Two kinds of model, one interface. `LocalModel` is a run directory, loaded on first use and
  cached, generating through `inference.Run.stream` (the one generator of the project).
  `PeerModel` is another machine's server.py, called through `POST /generate` with streaming
  (`peer_stream`). Both yield text pieces and raise `ModelError` with a readable message, so the
  page treats them alike. A chat with a peer sends the whole conversation as `messages` (and the
  system prompt), so the peer answers with the earlier turns in view, as a local model does.
- A peer is another machine, so nothing it does is trusted (`PeerLimits`): a connect timeout
  (3 s), a read timeout between chunks (10 s) and a deadline for the whole answer (120 s), all
  flags; at most `max_new_tokens * 16 + 256` characters (a token is far shorter on average), the
  rest is cut off; an error body is read up to 4 KiB. A watchdog thread shuts the socket down at
  Stop or at the deadline, so a blocked read returns at once and the connection really closes.
  Peers files and addresses typed on the page are validated entry by entry: http(s) URLs with a
  host and a port in 1..65535 and a non-empty printable name; bad entries are reported and skipped.
- `stream_models` runs each model in its own thread; the threads push their pieces into one
  queue and the handler yields every panel after each batch of pieces (and every 0.5 s while
  nothing comes), so each panel moves as its own tokens arrive and a slow or dead peer never holds
  up the other panel. Each `next()` of a handler is short, so Gradio's worker threads are never
  held by a silent peer; and the queue has no concurrency limit, because the handlers only wait:
  every stream is bounded in size and time, and four endless peers must not block a fifth user.
- Stop sets the run's `threading.Event`: the handler returns at once, local generators stop at
  their next token and peers' sockets are shut down. Each tab of each session has its own switch.
- tokens/s counts streamed pieces: one per token for local models (a character split across
  tokens counts once) and one per received chunk for peers, which flush after each token.
- Votes are appended to a jsonl log, one line per vote; ratings are recomputed from the whole log
  in order, so anyone with the log gets the same board. Standard Elo, K=32, start 1000; a tie
  scores 0.5 and so does "both bad" (it says nothing about which model is better); a model
  voted against itself is skipped.
- A `Battle` is one run of the Arena tab: blind mode puts the two chosen models on random sides
  as "Model A" / "Model B" and reveals the names after the vote; a battle takes one vote.
- RAG (`--rag INDEX`, `--rag_k`): the RAG box answers the prompt as a question from retrieved
  passages. Each local model builds its own prompt through `Run.rag_prompt_ids` (the one RAG path;
  its tokenizer and window decide how much of the passages fit) and its panel lists the passages
  it read, title and text, escaped (`Panel.sources_markdown`); `--extractive` holds the answers to
  spans of those passages (the likeliest span, extractive.py). A peer has no access to this index,
  so in RAG mode its panel says so instead of answering something else.
- The page only wires widgets to `Arena`, `Battle` and the functions above them, which the tests
  call without a browser. Text from models and peers is shown as text: Textboxes show it as is,
  Markdown and the Chatbot get it escaped (`markdown_text`, `chat_display`).
- Offline: no analytics, no share link, system fonts instead of Google Fonts.
"""
import argparse
import codecs
import csv
import html
import io
import json
import os
import queue
import random
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402  (the environment variable must be set before the import)
import httpx  # noqa: E402
import pandas as pd  # noqa: E402

from data_utils import BadLines, iter_jsonl  # noqa: E402
from extractive import answer_spans  # noqa: E402
from inference import SAMPLING_DEFAULTS, load_run, pick_device  # noqa: E402
from retrieval import Index, IndexFolderError, PromptTooLong, sources_text  # noqa: E402

# the sliders start at the shared defaults (top_p 1.0 = off, a slider has no "none")
SLIDER_DEFAULTS = {"max_new_tokens": 128, **{k: SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k")}, "top_p": 1.0}
ELO_K, ELO_START = 32, 1000.0
VOTES = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}  # the left model's score
ARENA_MODES = ("text", "qa")
VOTE_BUTTONS = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both are bad"}
FLAG_FIELDS = ["time", "mode", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
               "left_model", "left_output", "right_model", "right_output"]
PEER_CHARS_PER_TOKEN, PEER_MARGIN_CHARS = 16, 256  # a peer's answer: at most max_new_tokens * 16 + 256 chars
ERROR_BODY_BYTES = 4096  # how much of a peer's error body is read
PEERS_FILE_BYTES = 1 << 20
MAX_NAME_CHARS = 64
HEARTBEAT_S = 0.5  # the longest a streaming handler waits before it yields (and frees its worker thread)


class ModelError(Exception):
    """A model could not answer; the message goes into its own panel."""


class ArenaError(ValueError):
    """A request the page cannot carry out (no prompt, no model, a second vote); the message is for the user."""


@dataclass
class Settings:
    max_new_tokens: int = SLIDER_DEFAULTS["max_new_tokens"]
    temperature: float = SLIDER_DEFAULTS["temperature"]
    top_k: int = SLIDER_DEFAULTS["top_k"]  # 0 turns it off
    top_p: float = SLIDER_DEFAULTS["top_p"]

    def sampling(self):
        return {"max_new_tokens": int(self.max_new_tokens), "temperature": float(self.temperature),
                "top_k": int(self.top_k) or None, "top_p": float(self.top_p)}


@dataclass(frozen=True)
class Rag:
    """Where RAG passages come from: a retrieval.Index and how many passages to retrieve; with
    `extractive`, answers are the likeliest span of the passages (extractive.py)."""
    index: object
    k: int = 3
    extractive: bool = False


def markdown_text(text):
    """`text` for a Markdown component, shown as written: HTML and Markdown syntax are escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", html.escape(str(text), quote=False))


# ----------------------------------------------------------------------------- models

class LocalModel:
    def __init__(self, name, out_dir, device="cpu"):
        self.name, self.out_dir, self.device = name, Path(out_dir), device
        self._run, self._lock = None, threading.Lock()

    def run(self):
        with self._lock:  # two panels asking for the same model load it once
            if self._run is None:
                try:
                    self._run = load_run(self.out_dir, device=self.device)
                except (OSError, ValueError, KeyError) as e:
                    raise ModelError(f"cannot load {self.out_dir}: {e}") from e
        return self._run

    def stream(self, prompt, mode, settings, system=None, stop=None):
        # Stop is seen by the caller between tokens; closing this generator ends the generation
        yield from self.run().stream(prompt, mode, system=system, **settings.sampling())

    def rag_stream(self, question, rag, settings):
        """(sources, pieces): the passages this model reads for the question, and its answer."""
        run = self.run()
        try:
            ids, sources = run.rag_prompt_ids(question, rag.index, rag.k, int(settings.max_new_tokens))
        except PromptTooLong as e:
            raise ModelError(str(e)) from e
        span = answer_spans(run.tok, sources_text(sources), question) if rag.extractive else None
        return sources, run.stream_ids(ids, "qa", span=span, **settings.sampling())


@dataclass(frozen=True)
class PeerLimits:
    """How long a peer may take, in seconds: to connect, silent mid-answer, and for the whole answer."""
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    deadline: float = 120.0


class PeerModel:
    def __init__(self, name, url, api_key=None, limits=PeerLimits()):
        self.name, self.url, self.api_key, self.limits = peer_name(name), peer_url(url), api_key, limits

    def stream(self, prompt, mode, settings, system=None, stop=None):
        # a chat is a list of {role, content} messages, which /generate takes as `messages`
        payload = {"prompt" if isinstance(prompt, str) else "messages": prompt, "mode": mode, "stream": True,
                   **settings.sampling()}
        if system:
            payload["system"] = system
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        max_chars = int(settings.max_new_tokens) * PEER_CHARS_PER_TOKEN + PEER_MARGIN_CHARS
        yield from peer_stream(self.name, self.url, payload, headers, self.limits, max_chars, stop)

    def rag_stream(self, question, rag, settings):
        raise ModelError("RAG runs local models only: a peer has no access to this arena's index")


def peer_stream(name, url, payload, headers, limits, max_chars, stop=None):
    """Yield the text a server.py at `url` streams for `payload`, within `limits` and `max_chars`.

    Stop ends it quietly; everything else that goes wrong raises ModelError (after yielding what
    came in time). The connection is closed whenever the generator ends, however it ends."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + limits.deadline
    finished = threading.Event()
    timeout = httpx.Timeout(min(limits.read_timeout, limits.deadline), connect=limits.connect_timeout)
    try:
        with httpx.stream("POST", f"{url}/generate", json=payload, headers=headers, timeout=timeout) as response:
            threading.Thread(target=_shut_at_stop_or_deadline, args=(response, stop, deadline, finished),
                             name=f"watch {name}", daemon=True).start()
            if response.status_code != 200:
                raise ModelError(f"{name}: HTTP {response.status_code}: {_error_of(_read_some(response))}")
            # strict decoding: a peer sending bytes that are not UTF-8 is broken, say so
            decoder, sent = codecs.getincrementaldecoder("utf-8")(), 0
            for chunk in response.iter_bytes():
                text = decoder.decode(chunk)
                if sent + len(text) > max_chars:
                    yield text[:max_chars - sent]
                    raise ModelError(f"{name} sent more than {max_chars} characters for max_new_tokens="
                                     f"{payload['max_new_tokens']}; the rest was cut off")
                if time.monotonic() > deadline:
                    raise ModelError(f"{name} took longer than {limits.deadline:g} s; the rest was cut off")
                if text:
                    sent += len(text)
                    yield text
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ModelError(f"{name} sent bytes that are not UTF-8 text") from None
    except httpx.HTTPError as e:
        if stop.is_set():  # the watchdog shut the socket: the user pressed Stop
            return
        if time.monotonic() > deadline:
            raise ModelError(f"{name} took longer than {limits.deadline:g} s; the rest was cut off") from None
        if isinstance(e, httpx.ConnectTimeout):
            raise ModelError(f"{name} at {url}: no connection within {limits.connect_timeout:g} s") from None
        if isinstance(e, httpx.ReadTimeout):
            raise ModelError(f"{name} sent nothing for {timeout.read:g} s") from None
        raise ModelError(f"{name} at {url}: {type(e).__name__}: {e}") from None
    finally:
        finished.set()


def _shut_at_stop_or_deadline(response, stop, deadline, finished):
    """Shut the peer's socket down at Stop or at the deadline: a read blocked on it returns at once."""
    while not finished.wait(0.05):
        if stop.is_set() or time.monotonic() > deadline:
            try:
                response.extensions["network_stream"].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            except (OSError, KeyError, AttributeError):  # closed meanwhile: nothing left to shut
                pass
            return


def _read_some(response, limit=ERROR_BODY_BYTES):
    """At most `limit` bytes of a body: an error body may be endless."""
    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]


def _error_of(body):
    """The message of a server.py error body, or the start of whatever else came."""
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError, RecursionError):
        return body[:200].decode("utf-8", "replace") or "(empty body)"


def peer_name(name):
    """A peer's name, stripped: non-empty, printable, at most 64 characters; ValueError otherwise."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise ValueError("a peer needs a name")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a peer name must be printable text of at most {MAX_NAME_CHARS} characters")
    return name


def peer_url(address):
    """`host:port` or an http(s) URL (with or without a trailing /generate) -> `http://host:port`.

    Anything else (another scheme, no host, a port outside 1..65535) raises ValueError."""
    address = address.strip() if isinstance(address, str) else ""
    if not address:
        raise ValueError("a peer address is empty")
    if not address.isprintable() or " " in address:
        raise ValueError(f"{address!r} is not an address (spaces or control characters)")
    if "://" not in address:
        # `host:port` gets http://, but `javascript:alert(1)` is a scheme, not a host and a port
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:(?!\d)", address):
            raise ValueError(f"{address!r}: a peer is an http:// or https:// server.py")
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{address!r}: a peer is an http:// or https:// server.py, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError(f"{address!r} has no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (parts.netloc.endswith(":") and port is None):
        raise ValueError(f"{address!r}: the port must be a number from 1 to 65535")
    if parts.query or parts.fragment:
        raise ValueError(f"{address!r}: a peer address has no ?query or #fragment")
    path = parts.path.rstrip("/").removesuffix("/generate").rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc}{path}"


def load_peers(path, limits=PeerLimits()):
    """A peers file `{"alice": "192.168.1.20:5000", "bob": {"url": "...", "api_key": "..."}}` ->
    (peers, problems). An unreadable file raises ValueError; a bad entry is described in `problems`
    and skipped, so one typo does not lose the other peers."""
    try:
        data = Path(path).read_bytes()
        if len(data) > PEERS_FILE_BYTES:
            raise ValueError(f"larger than {PEERS_FILE_BYTES} bytes")
        entries = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"cannot read peers file {path}: nested too deeply") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read peers file {path}: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a JSON object of name -> address, got {type(entries).__name__}")
    peers, problems = [], []
    for name, entry in entries.items():
        try:
            peers.append(peer_from_entry(name, entry, limits))
        except ValueError as e:
            problems.append(f"{path}: peer {name[:MAX_NAME_CHARS]!r} skipped: {e}")
    return peers, problems


def peer_from_entry(name, entry, limits=PeerLimits()):
    """A PeerModel from one peers-file entry, an address string or {"url": ..., "api_key": ...}."""
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or set(entry) - {"url", "api_key"}:
        raise ValueError('needs an address string or {"url": ..., "api_key": ...}')
    key = entry.get("api_key")
    if key is not None and not (isinstance(key, str) and key.isascii() and key.isprintable()):
        raise ValueError("api_key must be printable ASCII text")
    return PeerModel(name, entry["url"], key or None, limits)


# ----------------------------------------------------------------------------- streaming

@dataclass
class Panel:
    """What one model has produced so far in a run, and how fast."""
    text: str = ""
    pieces: int = 0
    state: str = "waiting"  # waiting, streaming, done, error, stopped
    error: str | None = None
    sources: list | None = None  # the passages a RAG answer read (retrieval.rag_prompt's sources)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def finish(self, state, error=None):
        self.state, self.error, self.ended = state, error, time.monotonic()

    @property
    def running(self):
        return self.state in ("waiting", "streaming")

    def stats(self):
        """A Markdown line; the error comes from outside (a peer's body) and is shown as text."""
        elapsed = (self.ended or time.monotonic()) - self.started
        rate = self.pieces / max(elapsed, 1e-9)
        line = f"**{self.state}** · {elapsed:.1f} s · {self.pieces} tokens · {rate:.1f} tokens/s"
        return line + (f"\n\nerror: {markdown_text(self.error)}" if self.error else "")

    def sources_markdown(self):
        """The passages a RAG answer read, title and text, as Markdown showing them as written."""
        if self.sources is None:
            return ""
        if not self.sources:
            return "**Passages read:** none (no passage shares a term with the question, or none fit the window)"
        lines = ["**Passages read:**", ""]
        for i, source in enumerate(self.sources, 1):
            cut = " (cut to fit the window)" if source["cut"] else ""
            title = markdown_text(source["title"] or "untitled")
            lines.append(f"{i}\\. **{title}**{cut}: {markdown_text(source['text'])}")
            lines.append("")
        return "\n".join(lines).rstrip()


def _pump(index, model, prompt, mode, settings, system, events, stop, rag):
    """Put (panel index, kind, value) events: "sources", then "piece"s, then "done" or "error"."""
    pieces = None
    try:
        if mode == "rag":
            sources, pieces = model.rag_stream(prompt, rag, settings)
            events.put((index, "sources", sources))
        else:
            pieces = model.stream(prompt, mode, settings, system, stop)
        for piece in pieces:
            if stop.is_set():
                break
            events.put((index, "piece", piece))
        events.put((index, "done", None))
    except Exception as e:  # any failure belongs in this model's panel, not in the other one
        events.put((index, "error", str(e) or type(e).__name__))
    finally:
        if pieces is not None:
            pieces.close()


def stream_models(models, prompt, mode, settings, stop, system=None, rag=None):
    """Run the models at once, one thread each; yield the list of Panels as pieces arrive.
    Mode "rag" answers the prompt as a question from the passages `rag` (a Rag) retrieves."""
    if mode == "rag" and rag is None:
        raise ArenaError("RAG needs an index: start the arena with --rag INDEX.")
    panels = [Panel() for _ in models]
    events = queue.Queue()
    for i, model in enumerate(models):
        threading.Thread(target=_pump, args=(i, model, prompt, mode, settings, system, events, stop, rag),
                         name=f"stream {model.name}", daemon=True).start()
    try:
        waited = 0.0
        while any(p.running for p in panels):
            if stop.is_set():
                for p in panels:
                    if p.running:
                        p.finish("stopped")
                break
            try:
                batch = [events.get(timeout=0.1)]
            except queue.Empty:
                waited += 0.1
                if waited >= HEARTBEAT_S:  # nothing came: let the page see the clock move
                    waited = 0.0
                    yield panels
                continue
            while not events.empty():  # one page update per batch, not one per token
                batch.append(events.get())
            for index, kind, value in batch:
                panel = panels[index]
                if kind == "piece":
                    panel.text, panel.pieces, panel.state = panel.text + value, panel.pieces + 1, "streaming"
                elif kind == "sources":
                    panel.sources = value
                else:
                    panel.finish(kind, value)
            waited = 0.0
            yield panels
        yield panels
    finally:
        stop.set()  # a handler abandoned by the page must not leave its threads generating


# ----------------------------------------------------------------------------- votes and Elo

def elo_ratings(votes, k=ELO_K, start=ELO_START):
    """Elo ratings after replaying the votes in order (each a dict with left, right, winner)."""
    ratings = {}
    for vote in votes:
        left, right = vote["left"], vote["right"]
        if left == right:
            continue
        r_left, r_right = ratings.setdefault(left, start), ratings.setdefault(right, start)
        expected_left = 1 / (1 + 10 ** ((r_right - r_left) / 400))
        delta = k * (VOTES[vote["winner"]] - expected_left)
        ratings[left], ratings[right] = r_left + delta, r_right - delta
    return ratings


def leaderboard(votes):
    """Rows (model, elo, votes, wins, losses, ties) sorted by rating; both-bad counts as a tie."""
    counts = {}
    for vote in votes:
        if vote["left"] == vote["right"]:
            continue
        for side in ("left", "right"):
            row = counts.setdefault(vote[side], {"votes": 0, "wins": 0, "losses": 0, "ties": 0})
            row["votes"] += 1
            score = VOTES[vote["winner"]] if side == "left" else 1 - VOTES[vote["winner"]]
            row["wins" if score == 1 else "losses" if score == 0 else "ties"] += 1
    ratings = elo_ratings(votes)
    rows = [[name, round(ratings[name], 1), c["votes"], c["wins"], c["losses"], c["ties"]]
            for name, c in counts.items()]
    return sorted(rows, key=lambda r: -r[1])


def load_votes(path):
    """The votes of the log in order; malformed lines are counted in the returned BadLines."""
    bad, votes = BadLines(), []
    if Path(path).exists():
        for lineno, vote in iter_jsonl(path, bad, required=("left", "right", "winner")):
            if vote["winner"] in VOTES:
                votes.append(vote)
            else:
                bad.add(f"{path}:{lineno}", f"unknown winner {vote['winner']!r}")
    return votes, bad


def append_text(path, text):
    """Append to a log (votes, flags): a crash loses at most this entry, never the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def flag_row(path, row):
    """Append a FLAG_FIELDS row to the flag CSV, with the header first when the file is new."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if not Path(path).exists() or Path(path).stat().st_size == 0:
        writer.writerow(FLAG_FIELDS)
    writer.writerow([row.get(name, "") for name in FLAG_FIELDS])
    append_text(path, buffer.getvalue())


def load_examples(path):
    """[prompt, mode] rows of examples.csv (columns mode, prompt); rows with a bad mode are skipped."""
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [[row["prompt"], row["mode"]] for row in csv.DictReader(f)
                if row.get("mode") in ARENA_MODES and row.get("prompt")]


# ----------------------------------------------------------------------------- battles, chat and the arena

def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Battle:
    """One run of the Arena tab: the models on each side, what they wrote, and its one vote."""
    models: list
    prompt: str
    mode: str
    settings: Settings
    blind: bool = False
    outputs: list = field(default_factory=list)
    stopped: bool = False
    winner: str | None = None

    @classmethod
    def start(cls, names, prompt, mode, settings, blind=False, rng=random):
        """A battle of `names` (one or two); a blind pair is put on random sides."""
        names, blind = list(names), blind and len(names) == 2
        if blind:
            rng.shuffle(names)
        return cls(names, prompt, mode, settings, blind)

    @property
    def labels(self):
        return ["Model A", "Model B"] if self.blind else list(self.models)

    def finish(self, panels):
        self.outputs, self.stopped = [p.text for p in panels], any(p.state == "stopped" for p in panels)

    @property
    def votable(self):
        """Two different models that both ran to the end, and no vote yet."""
        return len(set(self.models)) == 2 and bool(self.outputs) and not self.stopped and self.winner is None

    def vote(self, winner):
        """The vote's log entry; a battle takes one vote (ArenaError for a second)."""
        if winner not in VOTES:
            raise ArenaError(f"unknown vote {winner!r}")
        if self.winner is not None:
            raise ArenaError("This battle has its vote already: run a new one.")
        if not self.votable:
            raise ArenaError("Run two different models to the end first.")
        self.winner = winner
        left, right = self.models
        return {"schema": 1, "time": _now(), "left": left, "right": right, "winner": winner, "mode": self.mode,
                "prompt": self.prompt, "blind": self.blind}

    def flag_row(self):
        names, outputs = self.models + [""], self.outputs + [""]
        return {"time": _now(), "mode": self.mode, "prompt": self.prompt, **asdict(self.settings),
                "left_model": names[0], "left_output": outputs[0], "right_model": names[1],
                "right_output": outputs[1]}


class Arena:
    """The models by name, the logs, and the Stop switch of each session's running generation."""

    def __init__(self, models, votes_path, flagged_path, limits=PeerLimits(), rag=None):
        self.rag = rag  # a Rag, or None: no RAG box on the page
        self.models = {}
        for model in models:
            self.add_model(model)
        self.votes_path, self.flagged_path, self.limits = Path(votes_path), Path(flagged_path), limits
        self.lock = threading.Lock()  # held only for quick bookkeeping, never while a model runs
        self.stops = {}

    def add_model(self, model):
        if model.name in self.models:
            raise ValueError(f"a model named {model.name!r} exists already")
        self.models[model.name] = model

    def add_peer(self, name, address, api_key=None):
        peer = PeerModel(name, address, api_key or None, self.limits)
        with self.lock:
            self.add_model(peer)
        return peer

    def stop(self, key):
        with self.lock:
            if key in self.stops:
                self.stops[key].set()

    def stream(self, key, names, prompt, mode, settings, system=None):
        """stream_models for the tab `key` = (session, tab), with its own Stop switch: one
        generation per tab, so a new one stops the one before."""
        models = [self.models[n] for n in names]
        with self.lock:
            if key in self.stops:
                self.stops[key].set()
            self.stops[key] = stop = threading.Event()
        try:
            yield from stream_models(models, prompt, mode, settings, stop, system, self.rag)
        finally:
            with self.lock:
                if self.stops.get(key) is stop:
                    del self.stops[key]

    def battle(self, names, prompt, mode, settings, blind=False, rng=random, rag=False):
        """A Battle to run, or ArenaError saying what is missing. With `rag` the prompt is a
        question answered from retrieved passages (mode "rag", whatever the mode radio says)."""
        if not prompt.strip():
            raise ArenaError("Enter a prompt first.")
        if rag:
            if self.rag is None:
                raise ArenaError("RAG needs an index: start the arena with --rag INDEX.")
            mode = "rag"
        if not names or any(n not in self.models for n in names):
            raise ArenaError("Choose a model for each panel.")
        return Battle.start(names, prompt, mode, settings, blind, rng)

    def run(self, key, battle):
        """Stream the battle's models, yielding the panels; the battle holds the outputs at the end."""
        panels = []
        for panels in self.stream(key, battle.models, battle.prompt, battle.mode, battle.settings):
            yield panels
        battle.finish(panels)

    def record_vote(self, battle, winner):
        """Log the battle's vote (once: the check and the write are one step) and say who was who."""
        with self.lock:
            vote = battle.vote(winner)
            append_text(self.votes_path, json.dumps(vote, ensure_ascii=False) + "\n")
        left, right = (markdown_text(n) for n in battle.models)
        return f"Vote recorded: {VOTE_BUTTONS[winner]}. Left was **{left}**, right was **{right}**."

    def flag(self, battle):
        with self.lock:
            flag_row(self.flagged_path, battle.flag_row())

    def board(self):
        """Leaderboard rows and a Markdown note on the log."""
        votes, bad = load_votes(self.votes_path)
        note = f"{len(votes)} vote{'' if len(votes) == 1 else 's'} in `{self.votes_path}`"
        if bad.count:
            note += f", {bad.count} malformed lines skipped (first: {markdown_text(bad.examples[0])})"
        return leaderboard(votes), note

    def chat(self, key, model_name, history, text, system, settings):
        """One chat turn: yield (shown, kept, message box, stats) as the answer streams. `kept` is
        the history the next turn builds on: a failed turn is not kept (the next turn would see a
        question with no answer) and its message stays in the box to send again."""
        if not text.strip() or model_name not in self.models:
            yield history, history, text, "Type a message and choose a model."
            return
        asked = history + [{"role": "user", "content": text}]
        panel = Panel()
        for (panel,) in self.stream(key, [model_name], asked, "chat", settings, system.strip() or None):
            yield asked + [{"role": "assistant", "content": panel.text}], history, "", panel.stats()
        if panel.text:
            history = asked + [{"role": "assistant", "content": panel.text}]
        yield history if panel.text else asked, history, "" if panel.text else text, panel.stats()


def chat_display(messages):
    """Messages for the Chatbot, which renders HTML even with render_markdown=False: escape them."""
    return [{"role": m["role"], "content": html.escape(m["content"], quote=False)} for m in messages]


# ----------------------------------------------------------------------------- the page

SINGLE, DUAL = "Single model", "Dual models"
BOARD_COLUMNS = ["model", "elo", "votes", "wins", "losses", "ties"]
# System fonts: the default theme would fetch its fonts from Google, and the arena runs offline.
THEME = gr.themes.Default(font=["system-ui", "Noto Sans CJK SC", "sans-serif"], font_mono=["monospace"])
NO_LATEX = {"latex_delimiters": []}  # `$$` in a model's text is text, not a formula


def _arena_tab(names, examples, rag=None):
    ui = SimpleNamespace()
    with gr.Row():
        ui.layout = gr.Radio([SINGLE, DUAL], value=DUAL, label="Layout")
        ui.mode = gr.Radio(list(ARENA_MODES), value="text", label="Mode",
                           info="text continues a passage; qa answers a question")
        ui.blind = gr.Checkbox(False, label="Blind: hide model names until the vote")
        ui.rag = gr.Checkbox(False, label=f"RAG: answer from the {rag.k if rag else 0} best passages of the index",
                             visible=rag is not None, elem_id="rag")
    with gr.Row():
        ui.left_name = gr.Dropdown(names, value=names[0] if names else None, label="Left model")
        ui.right_name = gr.Dropdown(names, value=names[min(1, len(names) - 1)] if names else None,
                                    label="Right model", elem_id="right_name")
    ui.prompt = gr.Textbox(lines=3, label="Prompt", elem_id="prompt")
    d = SLIDER_DEFAULTS
    with gr.Row():
        ui.sampling = [gr.Slider(1, 1024, value=d["max_new_tokens"], step=1, label="Max New Tokens"),
                       gr.Slider(0, 2, value=d["temperature"], step=0.05, label="Temperature"),
                       gr.Slider(0, 500, value=d["top_k"], step=1, label="Top K (0 = off)"),
                       gr.Slider(0.05, 1, value=d["top_p"], step=0.05, label="Top P")]
    with gr.Row():
        ui.run = gr.Button("Run", variant="primary", elem_id="run")
        ui.stop = gr.Button("Stop", variant="stop", elem_id="stop")
        ui.clear = gr.Button("Clear")
        ui.flag = gr.Button("Flag")
    with gr.Row():
        with gr.Column():
            ui.left_out = gr.Textbox(label="Left", lines=10, max_lines=20, interactive=False, elem_id="left_out")
            ui.left_stats = gr.Markdown(elem_id="left_stats", **NO_LATEX)
            ui.left_sources = gr.Markdown(elem_id="left_sources", **NO_LATEX)
        with gr.Column() as ui.right_column:
            ui.right_out = gr.Textbox(label="Right", lines=10, max_lines=20, interactive=False, elem_id="right_out")
            ui.right_stats = gr.Markdown(elem_id="right_stats", **NO_LATEX)
            ui.right_sources = gr.Markdown(elem_id="right_sources", **NO_LATEX)
    with gr.Row() as ui.vote_row:
        ui.votes = {w: gr.Button(label, interactive=False) for w, label in VOTE_BUTTONS.items()}
    ui.status = gr.Markdown(elem_id="status", **NO_LATEX)
    if examples:
        gr.Examples(list(examples), inputs=[ui.prompt, ui.mode], label="Examples")
    with gr.Accordion("Add a peer (a server.py on another machine)", open=False):
        with gr.Row():
            ui.peer_name = gr.Textbox(label="Name", placeholder="alice")
            ui.peer_address = gr.Textbox(label="Address", placeholder="192.168.1.20:5000")
            ui.peer_key = gr.Textbox(label="API key (optional)", type="password")
        ui.add_peer = gr.Button("Add peer")
    return ui


def _board_tab():
    gr.Markdown(f"Elo from the whole vote log in order: K={ELO_K}, every model starts at {ELO_START:g}; "
                "a tie scores ½ and so does *both bad*; votes of a model against itself are skipped.")
    return SimpleNamespace(table=gr.Dataframe(headers=BOARD_COLUMNS, interactive=False, elem_id="board"),
                           plot=gr.BarPlot(x="model", y="elo", title="Elo rating", sort="-y"),
                           note=gr.Markdown(**NO_LATEX))


def _chat_tab(names):
    ui = SimpleNamespace(history=gr.State([]))
    ui.model = gr.Dropdown(names, value=names[0] if names else None, label="Model", elem_id="chat_model")
    ui.system = gr.Textbox(label="System prompt / persona", placeholder="你是一个乐于助人的助手。")
    ui.chatbot = gr.Chatbot(label="Conversation", height=360, render_markdown=False, elem_id="chatbot", **NO_LATEX)
    ui.message = gr.Textbox(label="Message", lines=2, elem_id="message")
    with gr.Row():
        ui.send = gr.Button("Send", variant="primary", elem_id="send")
        ui.stop = gr.Button("Stop", variant="stop")
        ui.clear = gr.Button("Clear")
    ui.stats = gr.Markdown(elem_id="chat_stats", **NO_LATEX)
    gr.Markdown("Max New Tokens, Temperature, Top K and Top P are the Arena tab's.")
    return ui


def board_updates(arena):
    rows, note = arena.board()
    elos = [r[1] for r in rows] or [ELO_START]
    table = pd.DataFrame(rows, columns=BOARD_COLUMNS)
    return table, gr.BarPlot(value=table, y_lim=[min(elos) - 50, max(elos) + 50]), note


def stopper(arena, tab):
    """The Stop button's handler for `tab` (a function: Gradio passes the request by annotation only)."""
    def stop(request: gr.Request):
        arena.stop((request.session_hash, tab))
    return stop


def build_app(arena, examples=()):
    """The page: widgets wired to Arena and Battle; no logic of its own."""
    names = list(arena.models)
    with gr.Blocks(title="MiniGPT-zh arena") as demo:
        gr.Markdown("# MiniGPT-zh arena")
        battle = gr.State(None)
        with gr.Tab("Arena"):
            a = _arena_tab(names, examples, arena.rag)
        with gr.Tab("Leaderboard") as board_tab:
            b = _board_tab()
        with gr.Tab("Chat"):
            c = _chat_tab(names)
        outputs = [a.left_out, a.left_stats, a.left_sources, a.right_out, a.right_stats, a.right_sources]
        board = [b.table, b.plot, b.note]

        def voting(enabled):  # made when a handler runs: one made here, inside the Blocks, would be drawn
            return {button: gr.Button(interactive=enabled) for button in a.votes.values()}

        def run(layout, blind, left, right, prompt, mode, max_new, temperature, top_k, top_p, rag,
                request: gr.Request):
            settings = Settings(max_new, temperature, top_k, top_p)
            try:
                fight = arena.battle([left, right] if layout == DUAL else [left], prompt, mode, settings, blind,
                                     rag=rag)
            except ArenaError as e:
                yield {a.status: str(e)}
                return
            yield {battle: None, a.status: "", a.left_out: gr.Textbox(value="", label=fight.labels[0]),
                   a.right_out: gr.Textbox(value="", label=fight.labels[-1]), **voting(False)}
            for panels in arena.run((request.session_hash, "arena"), fight):
                yield dict(zip(outputs, [x for p in panels for x in (p.text, p.stats(), p.sources_markdown())]))
            yield {battle: fight, **voting(fight.votable), a.status: "Which answer is better?" if fight.votable else ""}

        run_io = ([a.layout, a.blind, a.left_name, a.right_name, a.prompt, a.mode, *a.sampling, a.rag],
                  [battle, a.status, *outputs, *a.votes.values()])
        a.run.click(run, *run_io)
        a.prompt.submit(run, *run_io)
        a.stop.click(stopper(arena, "arena"), None, None, queue=False)

        def vote(winner, fight):
            try:
                if not fight:
                    raise ArenaError("Run two different models first.")
                said = arena.record_vote(fight, winner)
            except ArenaError as e:
                return {a.status: str(e)}
            return {**voting(False), **dict(zip(board, board_updates(arena))), a.status: said,
                    a.left_out: gr.Textbox(label=fight.models[0]), a.right_out: gr.Textbox(label=fight.models[1])}

        for winner, button in a.votes.items():
            button.click(lambda fight, w=winner: vote(w, fight), [battle],
                         [a.status, a.left_out, a.right_out, *board, *a.votes.values()])
        a.flag.click(lambda fight: arena.flag(fight) or f"Flagged into `{arena.flagged_path}`." if fight
                     else "Nothing to flag yet: run a prompt first.", [battle], [a.status])
        a.clear.click(lambda: {a.prompt: "", battle: None, a.status: "", **{o: "" for o in outputs}, **voting(False)},
                      None, [a.prompt, battle, a.status, *outputs, *a.votes.values()])
        a.layout.change(lambda value: {a.right_column: gr.Column(visible=value == DUAL),
                                       a.vote_row: gr.Row(visible=value == DUAL),
                                       a.left_name: gr.Dropdown(label="Left model" if value == DUAL else "Model"),
                                       a.right_name: gr.Dropdown(visible=value == DUAL)},
                        [a.layout], [a.right_column, a.vote_row, a.left_name, a.right_name])

        dropdowns = [a.left_name, a.right_name, c.model]

        def choices():
            return [gr.Dropdown(choices=list(arena.models)) for _ in dropdowns]

        def add_peer(name, address, key):
            try:
                peer = arena.add_peer(name, address, key)
            except ValueError as e:
                return [*choices(), f"Could not add the peer: {markdown_text(e)}"]
            return [*choices(), f"Added **{markdown_text(peer.name)}** at {markdown_text(peer.url)}."]

        a.add_peer.click(add_peer, [a.peer_name, a.peer_address, a.peer_key], [*dropdowns, a.status])
        board_tab.select(lambda: board_updates(arena), None, board)
        demo.load(lambda: [*choices(), *board_updates(arena)], None, [*dropdowns, *board])

        def chat(text, history, model, system, max_new, temperature, top_k, top_p, request: gr.Request):
            settings = Settings(max_new, temperature, top_k, top_p)
            for shown, kept, box, stats in arena.chat((request.session_hash, "chat"), model, history, text, system,
                                                      settings):
                yield chat_display(shown), kept, box, stats

        chat_io = ([c.message, c.history, c.model, c.system, *a.sampling], [c.chatbot, c.history, c.message, c.stats])
        c.send.click(chat, *chat_io)
        c.message.submit(chat, *chat_io)
        c.stop.click(stopper(arena, "chat"), None, None, queue=False)
        c.clear.click(lambda: ([], [], "", ""), None, chat_io[1])
    return demo


def make_app(arena, examples=()):
    """The page with its queue. No concurrency limit: a handler only waits for its model threads,
    each stream is bounded in size and time, and one user's slow peers must not queue another's."""
    return build_app(arena, examples).queue(default_concurrency_limit=None)


def local_models(out_dirs, device):
    """A LocalModel per run directory, named after its folder (or its path when two folders share a name)."""
    folder_names = [Path(d).resolve().name for d in out_dirs]
    return [LocalModel(name if folder_names.count(name) == 1 else str(d), d, device)
            for name, d in zip(folder_names, out_dirs)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--models", nargs="*", default=None,
                        help="run directories (default: every folder of out/ holding a checkpoint)")
    parser.add_argument("--peers", help='JSON file {"name": "host:port" or {"url", "api_key"}}')
    parser.add_argument("--votes", default="arena/votes.jsonl")
    parser.add_argument("--flagged", default="arena/flagged.csv")
    parser.add_argument("--examples", default=str(Path(__file__).with_name("examples.csv")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rag", default=None, help="retrieval.py index folder: adds the RAG box to the Arena tab")
    parser.add_argument("--rag_k", type=int, default=3, help="passages retrieved per question in RAG mode")
    parser.add_argument("--extractive", action="store_true",
                        help="RAG answers are the likeliest span of the retrieved passages (extractive.py)")
    parser.add_argument("--connect_timeout", type=float, default=PeerLimits.connect_timeout)
    parser.add_argument("--read_timeout", type=float, default=PeerLimits.read_timeout,
                        help="seconds a peer may stay silent mid-answer")
    parser.add_argument("--deadline", type=float, default=PeerLimits.deadline,
                        help="seconds a peer may take for a whole answer")
    args = parser.parse_args(argv)
    limits = PeerLimits(args.connect_timeout, args.read_timeout, args.deadline)
    if min(vars(limits).values()) <= 0:
        parser.error("--connect_timeout, --read_timeout and --deadline must be positive")
    out_dirs = args.models if args.models is not None else sorted(
        str(d) for d in Path("out").glob("*") if (d / "best.pt").exists() or (d / "last.pt").exists())
    if not 1 <= args.rag_k <= 100:
        parser.error("--rag_k must be between 1 and 100")
    try:
        rag = Rag(Index(args.rag), args.rag_k, args.extractive) if args.rag else None
    except IndexFolderError as e:
        parser.error(str(e))
    missing = [d for d in out_dirs if not Path(d).is_dir()]
    if missing:
        parser.error(f"no such run directory: {', '.join(missing)}")
    try:
        arena = Arena(local_models(out_dirs, pick_device(args.device)), args.votes, args.flagged, limits, rag)
        peers, problems = load_peers(args.peers, limits) if args.peers else ([], [])
    except ValueError as e:  # an unreadable peers file
        parser.error(str(e))
    for peer in peers:
        try:
            arena.add_model(peer)
        except ValueError as e:
            problems.append(f"{args.peers}: peer {peer.name!r} skipped: {e}")
    for problem in problems:
        print(problem)
    if not arena.models:
        print("no models yet: pass --models or --peers, or add a peer on the page")
    make_app(arena, load_examples(args.examples)).launch(server_name=args.host, server_port=args.port, share=False,
                                                         theme=THEME, show_error=True)


if __name__ == "__main__":
    main()
