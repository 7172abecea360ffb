"""The Gradio arena: stream one or two models side by side, vote, and keep an Elo leaderboard.

    python sample_gradio.py --models out/pretrain out/sft --peers config/peers.json

Design choices:
- Two kinds of model, one interface. `LocalModel` is a run directory, loaded on first use and
  cached, generating through `inference.Run.stream` (the one generator of the project).
  `PeerModel` is another machine's server.py, called through `POST /generate` with streaming.
  Both yield text pieces and raise `ModelError` with a readable message, so the page treats them
  alike. A chat with a peer sends the whole conversation as `messages` (and the system prompt), so
  the peer answers with the earlier turns in view, as a local model does.
- `stream_models` runs each model in its own thread; the threads push their pieces into one
  queue and the handler yields every panel after each batch of pieces, so each panel moves as its
  own tokens arrive and a slow or dead peer never holds up the other panel. Peers get a connect
  timeout (3 s) and a read timeout between chunks (10 s), both flags.
- Stop sets the run's `threading.Event`: the handler returns at once, and each thread closes its
  generator (which stops the model) or its HTTP response at its next piece.
- tokens/s counts streamed pieces: one per token for local models (a character split across
  tokens counts once) and one per received chunk for peers, which flush after each token.
- Votes are appended to a jsonl log, one line per vote; ratings are recomputed from the whole log
  in order, so anyone with the log gets the same board. Standard Elo, K=32, start 1000; a tie
  scores 0.5 and so does "both bad" (it says nothing about which model is better); a model
  voted against itself is skipped.
- Blind mode puts the two chosen models on random sides as "Model A" / "Model B" and reveals the
  names after the vote.
- Offline: no analytics, no share link, system fonts instead of Google Fonts.
"""
import argparse
import codecs
import csv
import io
import json
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402  (the environment variable must be set before the import)
import httpx  # noqa: E402
import pandas as pd  # noqa: E402

from inference import load_run, pick_device  # noqa: E402
from data_utils import BadLines, iter_jsonl  # noqa: E402

ELO_K, ELO_START = 32, 1000.0
VOTES = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}  # the left model's score
ARENA_MODES = ("text", "qa")
FLAG_FIELDS = ["time", "mode", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
               "left_model", "left_output", "right_model", "right_output"]


class ModelError(Exception):
    """A model could not answer; the message goes into its own panel."""


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 200  # 0 turns it off
    top_p: float = 1.0

    def sampling(self):
        return {"max_new_tokens": int(self.max_new_tokens), "temperature": float(self.temperature),
                "top_k": int(self.top_k) or None, "top_p": float(self.top_p)}


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

    def stream(self, prompt, mode, settings, system=None):
        yield from self.run().stream(prompt, mode, system=system, **settings.sampling())


class PeerModel:
    def __init__(self, name, url, api_key=None, connect_timeout=3.0, read_timeout=10.0):
        self.name, self.url, self.api_key = name, peer_url(url), api_key
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)

    def stream(self, prompt, mode, settings, system=None):
        # a chat is a list of {role, content} messages, which /generate takes as `messages`
        payload = {"prompt" if isinstance(prompt, str) else "messages": prompt, "mode": mode, "stream": True,
                   **settings.sampling()}
        if system:
            payload["system"] = system
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with httpx.stream("POST", f"{self.url}/generate", json=payload, headers=headers,
                              timeout=self.timeout) as response:
                if response.status_code != 200:
                    raise ModelError(f"{self.name}: HTTP {response.status_code}: {_error_of(response.read())}")
                # strict decoding: a peer sending bytes that are not UTF-8 is broken, say so
                decoder = codecs.getincrementaldecoder("utf-8")()
                for chunk in response.iter_bytes():
                    text = decoder.decode(chunk)
                    if text:
                        yield text
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ModelError(f"{self.name} sent bytes that are not UTF-8 text") from None
        except httpx.ConnectTimeout:
            raise ModelError(f"{self.name} at {self.url}: no connection within "
                             f"{self.timeout.connect:g} s") from None
        except httpx.ReadTimeout:
            raise ModelError(f"{self.name} sent nothing for {self.timeout.read:g} s") from None
        except httpx.HTTPError as e:
            raise ModelError(f"{self.name} at {self.url}: {type(e).__name__}: {e}") from None


def _error_of(body):
    """The message of a server.py error body, or the start of whatever else came."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace") or "(empty body)"


def peer_url(address):
    """`host:port` or a URL (with or without a trailing /generate) -> `http://host:port`."""
    address = address.strip().rstrip("/")
    if not address:
        raise ValueError("a peer address is empty")
    if "://" not in address:
        address = "http://" + address
    return address.removesuffix("/generate")


def load_peers(path, connect_timeout=3.0, read_timeout=10.0):
    """A peers file: `{"alice": "192.168.1.20:5000", "bob": {"url": "...", "api_key": "..."}}`."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read peers file {path}: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a JSON object of name -> address, got {type(entries).__name__}")
    peers = []
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"url": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise ValueError(f"{path}: peer {name!r} needs an address string or {{\"url\": ..., \"api_key\": ...}}")
        peers.append(PeerModel(name, entry["url"], entry.get("api_key"), connect_timeout, read_timeout))
    return peers


# ----------------------------------------------------------------------------- streaming

@dataclass
class Panel:
    """What one model has produced so far in a run, and how fast."""
    text: str = ""
    pieces: int = 0
    state: str = "waiting"  # waiting, streaming, done, error, stopped
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def finish(self, state, error=None):
        self.state, self.error, self.ended = state, error, time.monotonic()

    @property
    def running(self):
        return self.state in ("waiting", "streaming")

    def stats(self):
        elapsed = (self.ended or time.monotonic()) - self.started
        rate = self.pieces / max(elapsed, 1e-9)
        line = f"**{self.state}** · {elapsed:.1f} s · {self.pieces} tokens · {rate:.1f} tokens/s"
        return line + (f"\n\nerror: {self.error}" if self.error else "")


def _pump(index, model, prompt, mode, settings, system, events, stop):
    pieces = model.stream(prompt, mode, settings, system)
    try:
        for piece in pieces:
            if stop.is_set():
                break
            events.put((index, piece, None))
        events.put((index, None, None))
    except Exception as e:  # any failure belongs in this model's panel, not in the other one
        events.put((index, None, str(e) or type(e).__name__))
    finally:
        pieces.close()


def stream_models(models, prompt, mode, settings, stop, system=None):
    """Run the models at once, one thread each; yield the list of Panels as pieces arrive."""
    panels = [Panel() for _ in models]
    events = queue.Queue()
    for i, model in enumerate(models):
        threading.Thread(target=_pump, args=(i, model, prompt, mode, settings, system, events, stop),
                         name=f"stream {model.name}", daemon=True).start()
    try:
        while any(p.running for p in panels):
            if stop.is_set():
                for p in panels:
                    if p.running:
                        p.finish("stopped")
                break
            try:
                batch = [events.get(timeout=0.1)]
            except queue.Empty:
                continue
            while not events.empty():  # one page update per batch, not one per token
                batch.append(events.get())
            for index, piece, error in batch:
                panel = panels[index]
                if piece is not None:
                    panel.text, panel.pieces, panel.state = panel.text + piece, panel.pieces + 1, "streaming"
                else:
                    panel.finish("error" if error else "done", error)
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


# ----------------------------------------------------------------------------- the page

class Arena:
    """The models by name, the logs, and the Stop switch of each session's running generation."""

    def __init__(self, models, votes_path, flagged_path, connect_timeout=3.0, read_timeout=10.0):
        self.models = {}
        for model in models:
            if model.name in self.models:
                raise ValueError(f"two models are named {model.name!r}")
            self.models[model.name] = model
        self.votes_path, self.flagged_path = Path(votes_path), Path(flagged_path)
        self.timeouts = (connect_timeout, read_timeout)
        self.lock = threading.Lock()
        self.stops = {}

    def add_peer(self, name, address, api_key=None):
        name = name.strip()
        if not name:
            raise ValueError("give the peer a name")
        peer = PeerModel(name, address, api_key or None, *self.timeouts)
        with self.lock:
            if name in self.models:
                raise ValueError(f"a model named {name!r} exists already")
            self.models[name] = peer
        return peer

    def start(self, key):
        """A fresh Stop switch for the generation `key` = (session, tab) is about to run."""
        with self.lock:
            self.stops[key] = threading.Event()
            return self.stops[key]

    def stop(self, key):
        with self.lock:
            if key in self.stops:
                self.stops[key].set()

    def record_vote(self, battle, winner):
        left, right = battle["models"]
        vote = {"schema": 1, "time": _now(), "left": left, "right": right, "winner": winner, "mode": battle["mode"],
                "prompt": battle["prompt"], "blind": battle["blind"]}
        with self.lock:
            append_text(self.votes_path, json.dumps(vote, ensure_ascii=False) + "\n")

    def flag(self, battle):
        names, outputs = battle["models"] + [""], battle["outputs"] + [""]
        row = {"time": _now(), "mode": battle["mode"], "prompt": battle["prompt"], **battle["settings"],
               "left_model": names[0], "left_output": outputs[0], "right_model": names[1], "right_output": outputs[1]}
        with self.lock:
            flag_row(self.flagged_path, row)


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


SINGLE, DUAL = "Single model", "Dual models"
VOTE_BUTTONS = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both are bad"}
BOARD_COLUMNS = ["model", "elo", "votes", "wins", "losses", "ties"]
# System fonts: the default theme would fetch its fonts from Google, and the arena runs offline.
THEME = gr.themes.Default(font=["system-ui", "Noto Sans CJK SC", "sans-serif"], font_mono=["monospace"])


def board_updates(arena):
    votes, bad = load_votes(arena.votes_path)
    rows = leaderboard(votes)
    table = pd.DataFrame(rows, columns=BOARD_COLUMNS)
    elos = [r[1] for r in rows] or [ELO_START]
    plot = gr.BarPlot(value=table, y_lim=[min(elos) - 50, max(elos) + 50])
    note = f"{len(votes)} vote{'' if len(votes) == 1 else 's'} in `{arena.votes_path}`"
    if bad.count:
        note += f", {bad.count} malformed lines skipped (first: {bad.examples[0]})"
    return table, plot, note


def build_app(arena, examples=()):
    names = list(arena.models)
    with gr.Blocks(title="MiniGPT-zh arena") as demo:
        gr.Markdown("# MiniGPT-zh arena")
        battle = gr.State(None)
        with gr.Tab("Arena"):
            with gr.Row():
                layout = gr.Radio([SINGLE, DUAL], value=DUAL, label="Layout")
                mode = gr.Radio(list(ARENA_MODES), value="text", label="Mode",
                                info="text continues a passage; qa answers a question")
                blind = gr.Checkbox(False, label="Blind: hide model names until the vote")
            with gr.Row():
                left_name = gr.Dropdown(names, value=names[0] if names else None, label="Left model")
                right_name = gr.Dropdown(names, value=names[min(1, len(names) - 1)] if names else None,
                                         label="Right model")
            prompt = gr.Textbox(lines=3, label="Prompt", elem_id="prompt")
            with gr.Row():
                max_new = gr.Slider(1, 1024, value=128, step=1, label="Max New Tokens")
                temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature")
                top_k = gr.Slider(0, 500, value=200, step=1, label="Top K (0 = off)")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top P")
            with gr.Row():
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                clear_button = gr.Button("Clear")
                flag_button = gr.Button("Flag")
            with gr.Row():
                with gr.Column():
                    left_out = gr.Textbox(label="Left", lines=10, max_lines=20, interactive=False,
                                          elem_id="left_out")
                    left_stats = gr.Markdown(elem_id="left_stats")
                with gr.Column() as right_column:
                    right_out = gr.Textbox(label="Right", lines=10, max_lines=20, interactive=False,
                                           elem_id="right_out")
                    right_stats = gr.Markdown(elem_id="right_stats")
            with gr.Row() as vote_row:
                vote_buttons = {w: gr.Button(label, interactive=False) for w, label in VOTE_BUTTONS.items()}
            status = gr.Markdown(elem_id="status")
            if examples:
                gr.Examples(list(examples), inputs=[prompt, mode], label="Examples")
            with gr.Accordion("Add a peer (a server.py on another machine)", open=False):
                with gr.Row():
                    peer_name = gr.Textbox(label="Name", placeholder="alice")
                    peer_address = gr.Textbox(label="Address", placeholder="192.168.1.20:5000")
                    peer_key = gr.Textbox(label="API key (optional)", type="password")
                add_button = gr.Button("Add peer")
        with gr.Tab("Leaderboard") as board_tab:
            gr.Markdown(f"Elo from the whole vote log in order: K={ELO_K}, every model starts at {ELO_START:g}; "
                        "a tie scores ½ and so does *both bad*; votes of a model against itself are skipped.")
            board_table = gr.Dataframe(headers=BOARD_COLUMNS, interactive=False, elem_id="board")
            board_plot = gr.BarPlot(x="model", y="elo", title="Elo rating", sort="-y")
            board_note = gr.Markdown()
        with gr.Tab("Chat"):
            chat_history = gr.State([])
            chat_model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
            system = gr.Textbox(label="System prompt / persona", placeholder="你是一个乐于助人的助手。")
            chatbot = gr.Chatbot(label="Conversation", height=360)
            message = gr.Textbox(label="Message", lines=2)
            with gr.Row():
                send_button = gr.Button("Send", variant="primary")
                chat_stop = gr.Button("Stop", variant="stop")
                chat_clear = gr.Button("Clear")
            chat_stats = gr.Markdown()
            gr.Markdown("Max New Tokens, Temperature, Top K and Top P are the Arena tab's.")

        outputs = [left_out, left_stats, right_out, right_stats]

        def voting(enabled):
            # made when a handler runs: a component made here, inside the Blocks, would be drawn
            return {b: gr.Button(interactive=enabled) for b in vote_buttons.values()}

        def run(layout_value, blind_value, left, right, prompt_text, mode_value, max_new_tokens, temperature_value,
                top_k_value, top_p_value, request: gr.Request):
            names_now = [left, right] if layout_value == DUAL else [left]
            if not prompt_text.strip():
                yield {status: "Enter a prompt first."}
                return
            if any(n not in arena.models for n in names_now):
                yield {status: "Choose a model for each panel."}
                return
            hidden = layout_value == DUAL and blind_value
            if hidden:
                random.shuffle(names_now)
            labels = ["Model A", "Model B"] if hidden else names_now
            settings = Settings(max_new_tokens, temperature_value, top_k_value, top_p_value)
            stop = arena.start((request.session_hash, "arena"))
            yield {battle: None, status: "", left_out: gr.Textbox(value="", label=labels[0]),
                   right_out: gr.Textbox(value="", label=labels[-1]), **voting(False)}
            panels = []
            for panels in stream_models([arena.models[n] for n in names_now], prompt_text, mode_value, settings, stop):
                yield dict(zip(outputs, [x for p in panels for x in (p.text, p.stats())]))
            finished = {"models": names_now, "outputs": [p.text for p in panels], "prompt": prompt_text,
                        "mode": mode_value, "settings": asdict(settings), "blind": hidden}
            votable = len(set(names_now)) == 2 and not any(p.state == "stopped" for p in panels)
            yield {battle: finished, **voting(votable),
                   status: "Which answer is better?" if votable else ""}

        run_inputs = [layout, blind, left_name, right_name, prompt, mode, max_new, temperature, top_k, top_p]
        run_outputs = [battle, status, *outputs, *vote_buttons.values()]
        run_button.click(run, run_inputs, run_outputs)
        prompt.submit(run, run_inputs, run_outputs)

        def stop_arena(request: gr.Request):
            arena.stop((request.session_hash, "arena"))

        stop_button.click(stop_arena, None, None, queue=False)

        def vote(winner, finished):
            if not finished or len(set(finished["models"])) != 2:
                return {status: "Run two different models first."}
            arena.record_vote(finished, winner)
            left, right = finished["models"]
            table, plot, note = board_updates(arena)
            return {battle: None, **voting(False), board_table: table, board_plot: plot, board_note: note,
                    left_out: gr.Textbox(label=left), right_out: gr.Textbox(label=right),
                    status: f"Vote recorded: {VOTE_BUTTONS[winner]}. Left was **{left}**, right was **{right}**."}

        for winner, button in vote_buttons.items():
            button.click(lambda finished, w=winner: vote(w, finished), [battle],
                         [battle, status, left_out, right_out, board_table, board_plot, board_note,
                          *vote_buttons.values()])

        def flag(finished):
            if not finished:
                return "Nothing to flag yet: run a prompt first."
            arena.flag(finished)
            return f"Flagged into `{arena.flagged_path}`."

        flag_button.click(flag, [battle], [status])
        clear_button.click(lambda: {prompt: "", battle: None, status: "", **{c: "" for c in outputs}, **voting(False)},
                           None, [prompt, battle, status, *outputs, *vote_buttons.values()])
        layout.change(lambda value: {right_column: gr.Column(visible=value == DUAL),
                                     vote_row: gr.Row(visible=value == DUAL),
                                     left_name: gr.Dropdown(label="Left model" if value == DUAL else "Model"),
                                     right_name: gr.Dropdown(visible=value == DUAL)},
                      [layout], [right_column, vote_row, left_name, right_name])

        dropdowns = [left_name, right_name, chat_model]

        def refresh_choices():
            return [gr.Dropdown(choices=list(arena.models)) for _ in dropdowns]

        def add_peer(name, address, key):
            try:
                peer = arena.add_peer(name, address, key)
            except ValueError as e:
                return [*refresh_choices(), f"Could not add the peer: {e}"]
            return [*refresh_choices(), f"Added **{peer.name}** at {peer.url}."]

        add_button.click(add_peer, [peer_name, peer_address, peer_key], [*dropdowns, status])
        board_tab.select(lambda: board_updates(arena), None, [board_table, board_plot, board_note])
        demo.load(lambda: [*refresh_choices(), *board_updates(arena)], None,
                  [*dropdowns, board_table, board_plot, board_note])

        def chat(text, history, model_name, system_text, max_new_tokens, temperature_value, top_k_value, top_p_value,
                 request: gr.Request):
            if not text.strip() or model_name not in arena.models:
                yield history, history, text, "Type a message and choose a model."
                return
            asked = history + [{"role": "user", "content": text}]
            stop = arena.start((request.session_hash, "chat"))
            panel = Panel()
            for (panel,) in stream_models([arena.models[model_name]], asked, "chat",
                                          Settings(max_new_tokens, temperature_value, top_k_value, top_p_value), stop,
                                          system=system_text.strip() or None):
                yield asked + [{"role": "assistant", "content": panel.text}], history, "", panel.stats()
            if panel.text:  # a failed turn is not kept: the next turn would see a question with no answer
                history = asked + [{"role": "assistant", "content": panel.text}]
            yield history if panel.text else asked, history, "" if panel.text else text, panel.stats()

        chat_inputs = [message, chat_history, chat_model, system, max_new, temperature, top_k, top_p]
        chat_outputs = [chatbot, chat_history, message, chat_stats]
        send_button.click(chat, chat_inputs, chat_outputs)
        message.submit(chat, chat_inputs, chat_outputs)

        def stop_chat(request: gr.Request):
            arena.stop((request.session_hash, "chat"))

        chat_stop.click(stop_chat, None, None, queue=False)
        chat_clear.click(lambda: ([], [], "", ""), None, chat_outputs)
    return demo


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
    parser.add_argument("--connect_timeout", type=float, default=3.0)
    parser.add_argument("--read_timeout", type=float, default=10.0, help="seconds a peer may stay silent mid-answer")
    args = parser.parse_args(argv)
    out_dirs = args.models if args.models is not None else sorted(
        str(d) for d in Path("out").glob("*") if (d / "best.pt").exists() or (d / "last.pt").exists())
    missing = [d for d in out_dirs if not Path(d).is_dir()]
    if missing:
        parser.error(f"no such run directory: {', '.join(missing)}")
    models = local_models(out_dirs, pick_device(args.device))
    try:
        if args.peers:
            models += load_peers(args.peers, args.connect_timeout, args.read_timeout)
        arena = Arena(models, args.votes, args.flagged, args.connect_timeout, args.read_timeout)
    except ValueError as e:  # an unreadable peers file, two models with one name
        parser.error(str(e))
    if not models:
        print("no models yet: pass --models or --peers, or add a peer on the page")
    demo = build_app(arena, load_examples(args.examples))
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, share=False,
                                                   theme=THEME, show_error=True)


if __name__ == "__main__":
    main()
