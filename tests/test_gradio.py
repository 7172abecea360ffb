"""Tests of the arena's parts without a browser: Elo math, logs, peers files, battles, chat turns,
the streaming and its limits, and the queue of the real Gradio app.

Peers are real HTTP servers on 127.0.0.1 started inside the tests, one per behaviour (streams well,
streams slowly, goes silent, floods, drips, sends bytes that are not UTF-8, answers 500 with an
endless body, refuses the request, is down), speaking server.py's protocol. Every server loop is
bounded in time and bytes. Local models are tiny random runs from conftest.
"""
import csv
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT, make_run

from inference import load_run
from sample_gradio import (
    SLIDER_DEFAULTS,
    Arena,
    ArenaError,
    Battle,
    LocalModel,
    Panel,
    PeerLimits,
    PeerModel,
    Rag,
    Settings,
    chat_display,
    elo_ratings,
    leaderboard,
    load_examples,
    load_peers,
    load_votes,
    local_models,
    main,
    make_app,
    markdown_text,
    peer_name,
    peer_url,
    stream_models,
)

FAST = PeerLimits(connect_timeout=1.0, read_timeout=0.5, deadline=5.0)


# ----------------------------------------------------------------------------- Elo

def test_elo_one_win_moves_both_by_half_k():
    assert elo_ratings([{"left": "a", "right": "b", "winner": "left"}]) == {"a": 1016.0, "b": 984.0}


def test_elo_replays_in_order_by_hand():
    # second vote: b (984) beats a (1016); b expected 1 / (1 + 10 ** (32 / 400)) = 0.454078
    votes = [{"left": "a", "right": "b", "winner": "left"}, {"left": "a", "right": "b", "winner": "right"}]
    ratings = elo_ratings(votes)
    assert ratings["b"] == pytest.approx(984 + 32 * (1 - 0.454078), abs=1e-3)
    assert ratings["a"] == pytest.approx(1016 - 32 * (1 - 0.454078), abs=1e-3)
    assert ratings["a"] + ratings["b"] == pytest.approx(2000)


def test_elo_tie_and_both_bad_score_half():
    # a tie between equals changes nothing; after a's win, a tie pulls a back toward b
    assert elo_ratings([{"left": "a", "right": "b", "winner": "tie"}]) == {"a": 1000.0, "b": 1000.0}
    win = {"left": "a", "right": "b", "winner": "left"}
    for outcome in ("tie", "both_bad"):
        ratings = elo_ratings([win, {"left": "b", "right": "a", "winner": outcome}])
        # b (984) expected 0.454078, scores 0.5: gains 32 * 0.045922 = 1.4695
        assert ratings["b"] == pytest.approx(985.4695, abs=1e-3)
        assert ratings["a"] == pytest.approx(1014.5305, abs=1e-3)


def test_leaderboard_counts_and_skips_self_votes():
    votes = [{"left": "a", "right": "b", "winner": "left"}, {"left": "c", "right": "a", "winner": "both_bad"},
             {"left": "a", "right": "a", "winner": "left"}]
    rows = {r[0]: r for r in leaderboard(votes)}
    assert rows["a"][2:] == [2, 1, 0, 1] and rows["b"][2:] == [1, 0, 1, 0] and rows["c"][2:] == [1, 0, 0, 1]
    assert [r[0] for r in leaderboard(votes)][0] == "a"


def finished_battle(names=("甲", "b"), prompt="问题，带逗号", mode="qa", blind=False, outputs=("x", "y")):
    battle = Battle(list(names), prompt, mode, Settings(max_new_tokens=5, top_k=0), blind)
    battle.finish([Panel(text=t, state="done") for t in outputs])
    return battle


def test_votes_log_round_trip_counts_bad_lines(tmp_path):
    arena = Arena([], tmp_path / "arena" / "votes.jsonl", tmp_path / "flagged.csv")
    arena.record_vote(finished_battle(blind=True), "left")
    with open(arena.votes_path, "a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps({"left": "a", "right": "b", "winner": "maybe"}) + "\n")
    arena.record_vote(finished_battle(blind=True), "tie")
    votes, bad = load_votes(arena.votes_path)
    assert [(v["left"], v["right"], v["winner"], v["prompt"], v["blind"]) for v in votes] == [
        ("甲", "b", "left", "问题，带逗号", True), ("甲", "b", "tie", "问题，带逗号", True)]
    assert bad.count == 2
    assert load_votes(tmp_path / "absent.jsonl")[0] == []
    rows, note = arena.board()
    assert [r[0] for r in rows] == ["甲", "b"] and "2 votes" in note and "2 malformed lines" in note


# ----------------------------------------------------------------------------- battles (issue 11.4)

def test_blind_battle_puts_the_pair_on_random_sides():
    sides = set()
    for seed in range(20):
        battle = Battle.start(["a", "b"], "p", "text", Settings(), blind=True, rng=random.Random(seed))
        assert battle.labels == ["Model A", "Model B"] and sorted(battle.models) == ["a", "b"]
        sides.add(tuple(battle.models))
    assert sides == {("a", "b"), ("b", "a")}
    # not blind, or a single model: names stay where they were chosen and are shown
    assert Battle.start(["a", "b"], "p", "text", Settings(), rng=random.Random(1)).labels == ["a", "b"]
    single = Battle.start(["a"], "p", "text", Settings(), blind=True)
    assert (single.blind, single.labels) == (False, ["a"])


def test_blind_vote_is_logged_with_the_real_sides_and_revealed(tmp_path):
    arena = Arena([], tmp_path / "votes.jsonl", tmp_path / "flagged.csv")
    battle = Battle.start(["a", "b"], "p", "text", Settings(), blind=True, rng=random.Random(3))
    battle.finish([Panel(text="1", state="done"), Panel(text="2", state="done")])
    said = arena.record_vote(battle, "left")
    left, right = battle.models
    assert f"Left was **{left}**, right was **{right}**" in said
    vote = load_votes(arena.votes_path)[0][0]
    assert (vote["left"], vote["right"], vote["winner"], vote["blind"]) == (left, right, "left", True)
    assert vote["schema"] == 1


def test_a_battle_takes_one_vote(tmp_path):
    arena = Arena([], tmp_path / "votes.jsonl", tmp_path / "flagged.csv")
    battle = finished_battle()
    assert battle.votable
    arena.record_vote(battle, "right")
    assert not battle.votable
    for winner in ("right", "left"):
        with pytest.raises(ArenaError, match="vote already"):
            arena.record_vote(battle, winner)
    assert len(load_votes(arena.votes_path)[0]) == 1
    # clicks racing on one battle: exactly one vote gets in
    battle, outcomes = finished_battle(), []

    def click():
        try:
            outcomes.append(arena.record_vote(battle, "tie"))
        except ArenaError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sum(isinstance(o, str) for o in outcomes) == 1 and len(outcomes) == 8
    assert len(load_votes(arena.votes_path)[0]) == 2


@pytest.mark.parametrize("battle, message", [
    (finished_battle(names=("a", "a")), "two different"),
    (Battle(["a", "b"], "p", "text", Settings()), "two different"),  # never ran
    (finished_battle(names=("a",), outputs=("x",)), "two different"),
])
def test_votes_that_say_nothing_are_refused(tmp_path, battle, message):
    arena = Arena([], tmp_path / "votes.jsonl", tmp_path / "flagged.csv")
    with pytest.raises(ArenaError, match=message):
        arena.record_vote(battle, "left")
    stopped = finished_battle()
    stopped.finish([Panel(text="x", state="done"), Panel(text="y", state="stopped")])
    with pytest.raises(ArenaError):
        arena.record_vote(stopped, "left")
    with pytest.raises(ArenaError, match="unknown vote"):
        arena.record_vote(finished_battle(), "maybe")
    assert not arena.votes_path.exists()


def test_battle_needs_a_prompt_and_known_models(tmp_path, local):
    arena = Arena(local, tmp_path / "votes.jsonl", tmp_path / "flagged.csv")
    with pytest.raises(ArenaError, match="prompt"):
        arena.battle(["a", "b"], "  ", "text", Settings())
    with pytest.raises(ArenaError, match="model"):
        arena.battle(["a", None], "北京", "text", Settings())
    battle = arena.battle(["a", "b"], "北京", "text", Settings(max_new_tokens=4))
    last = list(arena.run(("s", "arena"), battle))[-1]
    assert [p.state for p in last] == ["done", "done"] and battle.outputs == [p.text for p in last]
    assert battle.votable and not arena.stops  # the run's Stop switch is gone with the run


def test_sampling_defaults_are_one_definition():
    from inference import SAMPLING_DEFAULTS

    assert all(SLIDER_DEFAULTS[k] == SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k"))
    assert Settings().sampling() == {**SLIDER_DEFAULTS, "top_k": SLIDER_DEFAULTS["top_k"] or None}
    demo = make_app(Arena([], "v.jsonl", "f.csv"))
    sliders = {c.label: c.value for c in demo.blocks.values() if type(c).__name__ == "Slider"}
    assert sliders == {"Max New Tokens": SLIDER_DEFAULTS["max_new_tokens"],
                       "Temperature": SLIDER_DEFAULTS["temperature"],
                       "Top K (0 = off)": SLIDER_DEFAULTS["top_k"], "Top P": SLIDER_DEFAULTS["top_p"]}


# ----------------------------------------------------------------------------- files

def test_peers_file_both_forms(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"alice": "192.168.1.20:5000",
                                "bob": {"url": "https://b.example:8443/generate/", "api_key": "k"}}))
    (alice, bob), problems = load_peers(path)
    assert (alice.name, alice.url, alice.api_key) == ("alice", "http://192.168.1.20:5000", None)
    assert (bob.name, bob.url, bob.api_key) == ("bob", "https://b.example:8443", "k")
    assert problems == []
    assert len(load_peers(ROOT / "config" / "peers.json")[0]) == 2


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object"), ("{oops", "cannot read peers file"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep-list"),
    pytest.param('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply", id="deep-entry"),
    pytest.param(b'{"a": "\xff"}', "cannot read peers file", id="not-utf8")])
def test_peers_file_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "peers.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        load_peers(path)


def test_bad_peer_entries_are_reported_and_skipped(tmp_path):
    nested = {"url": "127.0.0.1:5000"}
    for _ in range(500):  # deep, but within what the parser takes: the structure check rejects it
        nested = {"url": nested}
    entries = {"ok": "127.0.0.1:5000", "number": 5, "nested": nested, "": "127.0.0.1:5001",
               "ws": "ws://127.0.0.1:5002", "js": "javascript:alert(1)", "port": "127.0.0.1:99999",
               "key": {"url": "127.0.0.1:5003", "api_key": ["x"]}, "extra": {"url": "h:1", "token": "x"},
               "fine": {"url": "https://h.example:8443", "api_key": "k"}}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(entries))
    peers, problems = load_peers(path)
    assert [p.name for p in peers] == ["ok", "fine"]
    assert len(problems) == 8
    by_name = {p.split("peer ")[1].split(" skipped")[0]: p for p in problems}
    assert "needs an address" in by_name["'number'"] and "needs an address" in by_name["'nested'"]
    assert "needs a name" in by_name["''"] and "http:// or https://" in by_name["'ws'"]
    assert "http:// or https://" in by_name["'js'"] and "1 to 65535" in by_name["'port'"]
    assert "api_key" in by_name["'key'"] and "needs an address" in by_name["'extra'"]


def test_startup_reports_a_bad_peers_file_instead_of_crashing(tmp_path, capsys):
    path = tmp_path / "peers.json"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "--peers", str(path), "--votes", str(tmp_path / "v.jsonl")])
    assert exit_info.value.code == 2 and "nested too deeply" in capsys.readouterr().err


@pytest.mark.parametrize("address, url", [
    ("127.0.0.1:5000", "http://127.0.0.1:5000"), (" localhost:5000/generate ", "http://localhost:5000"),
    ("HTTPS://b.example:8443/generate/", "https://b.example:8443"), ("[::1]:5000", "http://[::1]:5000"),
    ("http://h.example", "http://h.example"), ("http://h:1/api/", "http://h:1/api"), ("h:65535", "http://h:65535")])
def test_peer_addresses_accepted(address, url):
    assert peer_url(address) == url


@pytest.mark.parametrize("address, message", [
    ("  ", "empty"), ("ws://h:5000", "http:// or https://"), ("javascript:alert(1)", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"), ("ftp://h:21", "http:// or https://"),
    ("h:99999", "1 to 65535"), ("h:0", "1 to 65535"), ("http://h:/", "1 to 65535"), ("h:port", "http:// or https://"),
    ("http://:5000", "no host"), ("http://h:1/?x=1", "query"), ("h\x00:1", "control"), ("h 1:5", "spaces"),
    (5, "empty")])
def test_peer_addresses_rejected_clearly(address, message):
    with pytest.raises(ValueError, match=message):
        peer_url(address)


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "x" * 65, "\ud800", None])
def test_peer_names_rejected(name):
    with pytest.raises(ValueError, match="name"):
        peer_name(name)


def test_adding_a_peer_at_run_time(tmp_path):
    arena = Arena(load_peers(ROOT / "config" / "peers.json")[0], tmp_path / "v.jsonl", tmp_path / "f.csv")
    assert arena.add_peer(" carol ", "10.0.0.3:5000/generate", "").url == "http://10.0.0.3:5000"
    assert list(arena.models) == ["alice", "bob", "carol"] and arena.models["carol"].api_key is None
    for name, address, message in (("alice", "h:1", "exists already"), ("", "h:1", "name"), ("dan", " ", "empty"),
                                   ("dan", "javascript:alert(1)", "http"), ("dan", "h:99999", "65535")):
        with pytest.raises(ValueError, match=message):
            arena.add_peer(name, address)
    assert list(arena.models) == ["alice", "bob", "carol"]


def test_local_models_are_named_after_their_folder():
    names = [m.name for m in local_models(["runs/a/sft", "runs/b/sft", "runs/pretrain"], "cpu")]
    assert names == ["runs/a/sft", "runs/b/sft", "pretrain"]


def test_flagging_appends_csv_rows(tmp_path):
    arena = Arena([], tmp_path / "votes.jsonl", tmp_path / "arena" / "flagged.csv")
    arena.flag(finished_battle(["a", "b"], "问，答", "text", outputs=["第一行\n第二行", 'say "hi", ok']))
    arena.flag(finished_battle(["a"], "问，答", "text", outputs=["only"]))
    with open(arena.flagged_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["left_model"], r["left_output"], r["right_model"], r["right_output"]) for r in rows] == [
        ("a", "第一行\n第二行", "b", 'say "hi", ok'), ("a", "only", "", "")]
    assert rows[0]["prompt"] == "问，答" and rows[0]["max_new_tokens"] == "5" and rows[0]["mode"] == "text"
    assert rows[0]["top_k"] == "0"


def test_examples_csv_loads():
    examples = load_examples(ROOT / "examples.csv")
    modes = [mode for _, mode in examples]
    assert modes.count("text") >= 10 and modes.count("qa") >= 10
    assert all(prompt.strip() and "<|" not in prompt for prompt, _ in examples)


# ----------------------------------------------------------------------------- text from outside is shown as text

def test_markdown_text_escapes_html_and_markdown():
    shown = markdown_text("<img src=x onerror=alert(1)> **bold** [a](javascript:x) `c` $$x$$ & #")
    assert "<" not in shown and ">" not in shown and "&lt;img" in shown
    assert "**" not in shown and "](" not in shown and "`c`" not in shown and "$$" not in shown
    assert "\\*\\*bold\\*\\*" in shown and "&amp;" in shown


def test_a_peer_error_shows_as_text_in_the_stats():
    panel = Panel()
    panel.finish("error", "p: HTTP 500: <b>boom</b> *x*")
    stats = panel.stats()
    assert stats.startswith("**error**") and "<b>" not in stats and "&lt;b&gt;boom&lt;/b&gt; \\*x\\*" in stats


def test_chat_display_escapes_html_and_keeps_the_history():
    history = [{"role": "user", "content": "a<b>c</b>"}, {"role": "assistant", "content": "<script>x</script>&"}]
    assert chat_display(history) == [{"role": "user", "content": "a&lt;b&gt;c&lt;/b&gt;"},
                                     {"role": "assistant", "content": "&lt;script&gt;x&lt;/script&gt;&amp;"}]
    assert history[0]["content"] == "a<b>c</b>"  # what the model sees next turn is the real text


# ----------------------------------------------------------------------------- peers on loopback

class Seen(list):
    """The requests a test peer got, when it saw the client hang up, and the bytes it sent."""
    hangup = None
    sent = 0


def peer_handler(behaviour, pieces, delay, seen, closing):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            if behaviour == "reject":
                error = {"error": {"message": "prompt must be a string", "field": "prompt"}}
                return self.reply(400, json.dumps(error), "application/json")
            if behaviour == "error500":
                return self.reply(500, "<html>Internal Server Error</html>", "text/html")
            if behaviour == "error500_nested":
                return self.reply(500, "[" * 4000, "application/json")
            self.start_chunked(500 if behaviour == "error500_endless" else 200)
            if behaviour == "error500_endless":  # 64 KiB every 10 ms for at most 5 s: about 30 MB
                ends = time.monotonic() + 5
                while time.monotonic() < ends and self.chunk(b"x" * 65536):
                    time.sleep(0.01)
                return
            if behaviour == "endless":  # a character every `delay` s until the client goes, at most 60 s
                ends = time.monotonic() + 60
                while time.monotonic() < ends and not closing.is_set() and self.chunk("字".encode()):
                    time.sleep(delay)
                self.chunk(b"")
                return
            chunks = [b"\xe4\xb8\x80\xff\xfe garbage"] if behaviour == "garbage" else [p.encode() for p in pieces]
            for chunk in chunks:
                if not self.chunk(chunk):
                    return
                time.sleep(delay)
            if behaviour == "silent":
                time.sleep(3)
            if behaviour == "hold":  # silent until the client closes the connection (at most 5 s)
                self.connection.settimeout(5)
                try:
                    if self.connection.recv(1) == b"":
                        seen.hangup = time.monotonic()
                except OSError:
                    pass
                return
            self.chunk(b"")

        def start_chunked(self, code):
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def chunk(self, data):
            """Send one chunk (b"" ends the body); False once the client has hung up."""
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                seen.sent += len(data)
                return True
            except OSError:
                seen.hangup = seen.hangup or time.monotonic()
                return False

        def reply(self, code, text, content_type):
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def peer():
    """Start a peer on 127.0.0.1: peer(behaviour, pieces, delay) -> (PeerModel, Seen)."""
    servers, closing = [], threading.Event()

    def start(behaviour="good", pieces=("你", "好", "，", "世界"), delay=0.0, api_key=None, name=None, limits=FAST):
        seen = Seen()
        server = ThreadingHTTPServer(("127.0.0.1", 0), peer_handler(behaviour, pieces, delay, seen, closing))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return PeerModel(name or behaviour, f"127.0.0.1:{server.server_port}", api_key, limits), seen

    start.closing = closing
    yield start
    closing.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("runs")
    return [LocalModel(name, make_run(out / name, tiny_tokenizer, seed=seed)) for name, seed in (("a", 1), ("b", 2))]


def run_to_end(models, prompt="北京", mode="text", settings=None, **kw):
    """Every page update of a run as (text, state) per panel, and the last one."""
    settings = settings or Settings(max_new_tokens=12)
    snapshots = [[(p.text, p.state) for p in panels]
                 for panels in stream_models(models, prompt, mode, settings, threading.Event(), **kw)]
    return snapshots, snapshots[-1]


def test_peer_streams_with_key_and_payload(peer):
    model, seen = peer("good", api_key="secret")
    settings = Settings(max_new_tokens=7, temperature=0.5, top_k=0, top_p=0.9)
    snapshots, last = run_to_end([model], "问题", "qa", settings)
    assert last == [("你好，世界", "done")]
    path, auth, body = seen[0]
    assert (path, auth) == ("/generate", "Bearer secret")
    assert body == {"prompt": "问题", "mode": "qa", "stream": True, "max_new_tokens": 7, "temperature": 0.5,
                    "top_k": None, "top_p": 0.9}


def test_dual_streams_interleave(peer):
    left, _ = peer("good", pieces=["甲"] * 8, delay=0.05, name="left")
    right, _ = peer("good", pieces=["乙"] * 8, delay=0.05, name="right")
    snapshots, last = run_to_end([left, right])
    assert last == [("甲" * 8, "done"), ("乙" * 8, "done")]
    # some page update shows both panels part-way: neither waited for the other to finish
    assert any(0 < len(a) < 8 and 0 < len(b) < 8 for (a, _), (b, _) in snapshots)


def test_local_models_stream_side_by_side(local, tiny_tokenizer):
    snapshots, last = run_to_end(local, settings=Settings(max_new_tokens=10, temperature=0))
    for (text, state), model in zip(last, local):
        assert state == "done"
        assert text == load_run(model.out_dir).complete("北京", "text", max_new_tokens=10, temperature=0)
    chat = [{"role": "user", "content": "你好"}]
    assert run_to_end(local[:1], chat, "chat", system="你是助手")[1][0][1] == "done"


@pytest.mark.parametrize("behaviour, message", [
    ("down", "ConnectError"), ("silent", "sent nothing for 0.5 s"), ("garbage", "not UTF-8"),
    ("error500", "HTTP 500: <html>Internal Server Error"), ("error500_nested", "HTTP 500: [[["),
    ("reject", "HTTP 400: prompt must be a string")])
def test_broken_peer_fails_in_its_own_panel(peer, local, behaviour, message):
    if behaviour == "down":
        with socket.socket() as s:  # a port that nothing listens on any more
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        broken = PeerModel("down", f"127.0.0.1:{port}", limits=FAST)
    else:
        broken, _ = peer(behaviour)
    started = time.monotonic()
    snapshots, last = run_to_end([broken, local[0]])
    assert time.monotonic() - started < 3
    assert last[0][1] == "error" and last[1][1] == "done" and last[1][0]
    panels = list(stream_models([broken], "x", "text", Settings(max_new_tokens=2), threading.Event()))[-1]
    assert message in panels[0].error
    assert markdown_text(message) in panels[0].stats()  # shown as text: <html> is escaped
    if behaviour == "silent":
        assert panels[0].text == "你好，世界"  # what came before the silence stays


def test_unloadable_local_model_fails_in_its_own_panel(tmp_path, local):
    (tmp_path / "empty").mkdir()
    snapshots, last = run_to_end([LocalModel("empty", tmp_path / "empty"), local[1]])
    assert last[0] == ("", "error") and last[1][1] == "done"
    panels = list(stream_models([LocalModel("empty", tmp_path / "empty")], "x", "text", Settings(), threading.Event()))
    assert "no checkpoint" in panels[-1][0].error


def test_chat_peer_gets_the_whole_conversation_and_system(peer):
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"},
                    {"role": "user", "content": "再见"}]
    model, seen = peer("good")
    assert run_to_end([model], conversation, "chat", system="简短")[1] == [("你好，世界", "done")]
    body = seen[0][2]
    assert (body["messages"], body["mode"], body["system"]) == (conversation, "chat", "简短")
    assert "prompt" not in body


def test_chat_turns_keep_answered_history_only(peer, tmp_path):
    good, seen = peer("good", pieces=["<b>", "好", "</b>"])
    broken, _ = peer("error500")
    arena = Arena([good, broken], tmp_path / "v.jsonl", tmp_path / "f.csv")
    key = ("session", "chat")
    *_, (shown, kept, box, stats) = arena.chat(key, "good", [], "你好", " 简短 ", Settings(max_new_tokens=5))
    assert shown == kept == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<b>好</b>"}]
    assert box == "" and stats.startswith("**done**") and seen[0][2]["system"] == "简短"
    *_, (shown, kept2, box, stats) = arena.chat(key, "error500", kept, "再见", "", Settings(max_new_tokens=5))
    assert kept2 == kept and shown == kept + [{"role": "user", "content": "再见"}]
    assert box == "再见" and "HTTP 500" in stats  # a failed turn: the message stays to be sent again
    assert list(arena.chat(key, "nobody", kept, "x", "", Settings())) == [(kept, kept, "x", "Type a message and "
                                                                           "choose a model.")]
    assert not arena.stops


def test_stop_ends_both_streams_and_their_threads(peer, local):
    slow, _ = peer("good", pieces=["字"] * 100, delay=0.1, name="slowpoke")
    stop = threading.Event()
    stream = stream_models([slow, local[0]], "北京", "text", Settings(max_new_tokens=100_000), stop)
    next(stream)
    stop.set()
    started = time.monotonic()
    last = list(stream)[-1]
    assert time.monotonic() - started < 1
    assert [p.state for p in last] == ["stopped", "stopped"]
    deadline = time.monotonic() + 3
    while any(t.name.startswith("stream ") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("stream ")]


def test_each_session_has_its_own_stop(peer, tmp_path):
    slow, _ = peer("good", pieces=["字"] * 20, delay=0.05, name="slow")
    arena = Arena([slow], tmp_path / "v.jsonl", tmp_path / "f.csv")
    first, second = (arena.stream((s, "arena"), ["slow"], "北京", "text", Settings()) for s in ("s1", "s2"))
    next(first), next(second)
    arena.stop(("s1", "arena"))
    assert [p.state for p in list(first)[-1]] == ["stopped"]
    assert list(second)[-1][0].text == "字" * 20  # the other session ran to its end
    assert not arena.stops


# ----------------------------------------------------------------------------- limits on peers (issue 10.9)

def wait_for(condition, seconds):
    ends = time.monotonic() + seconds
    while not condition() and time.monotonic() < ends:
        time.sleep(0.02)
    return condition()


def test_a_peer_cannot_send_more_than_max_new_tokens_allows(peer):
    flood, seen = peer("good", pieces=["字" * 100] * 60)  # 6,000 characters for max_new_tokens=50
    started = time.monotonic()
    (text, state), = run_to_end([flood], settings=Settings(max_new_tokens=50))[1]
    panel = list(stream_models([flood], "x", "text", Settings(max_new_tokens=50), threading.Event()))[-1][0]
    assert len(text) == len(panel.text) == 50 * 16 + 256 and state == "error"
    assert "more than 1056 characters for max_new_tokens=50" in panel.error
    assert time.monotonic() - started < 3


def test_a_dripping_peer_meets_its_deadline(peer):
    # a character every 0.3 s never trips the 1 s read timeout; the 1.5 s deadline ends it
    drip, seen = peer("good", pieces=["字"] * 40, delay=0.3, limits=PeerLimits(1.0, 1.0, 1.5))
    started = time.monotonic()
    panel = list(stream_models([drip], "x", "text", Settings(max_new_tokens=500), threading.Event()))[-1][0]
    took = time.monotonic() - started
    assert panel.state == "error" and "took longer than 1.5 s" in panel.error
    assert 1.4 < took < 2.5 and 3 <= len(panel.text) <= 6
    assert wait_for(lambda: seen.hangup, 2)  # and the connection is closed


def test_a_silent_peer_meets_its_deadline_before_its_read_timeout(peer):
    hold, seen = peer("hold", pieces=["字"], limits=PeerLimits(1.0, 4.0, 0.8))
    started = time.monotonic()
    panel = list(stream_models([hold], "x", "text", Settings(), threading.Event()))[-1][0]
    assert panel.state == "error" and "took longer than 0.8 s" in panel.error and panel.text == "字"
    assert time.monotonic() - started < 1.5
    assert wait_for(lambda: seen.hangup, 1)


def test_an_endless_error_body_is_read_only_in_part(peer):
    flood, seen = peer("error500_endless")
    started = time.monotonic()
    panel = list(stream_models([flood], "x", "text", Settings(), threading.Event()))[-1][0]
    assert panel.state == "error" and "HTTP 500: xxxx" in panel.error and len(panel.error) < 300
    assert time.monotonic() - started < 2
    assert wait_for(lambda: seen.hangup, 2)
    assert seen.sent < 20_000_000  # it stopped sending long before its 5 s (~30 MB) were up


def test_stop_closes_a_silent_peers_connection_at_once(peer):
    hold, seen = peer("hold", pieces=["字"], limits=PeerLimits(1.0, 4.0, 30.0))
    stop = threading.Event()
    stream = stream_models([hold], "北京", "text", Settings(), stop)
    assert wait_for(lambda: next(stream)[0].text == "字", 3)
    stopped = time.monotonic()
    stop.set()
    assert [p.state for p in list(stream)[-1]] == ["stopped"]
    assert wait_for(lambda: seen.hangup, 2) and seen.hangup - stopped < 0.5  # not after the 4 s read timeout


# ----------------------------------------------------------------------------- the app's queue (issue 10.9)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_endless_peers_of_four_users_do_not_hold_up_a_fifth(peer, tmp_path):
    client_module = pytest.importorskip("gradio_client")
    limits = PeerLimits(1.0, 5.0, 60.0)
    endless, seen = peer("endless", delay=0.05, limits=limits)
    good, _ = peer("good", limits=limits)
    demo = make_app(Arena([endless, good], tmp_path / "v.jsonl", tmp_path / "f.csv", limits))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    # five users, each a session of its own (the clients connect before the clock starts: a busy machine is slow)
    url, clients = f"http://127.0.0.1:{port}/", []
    try:
        for _ in range(5):
            clients.append(client_module.Client(url, verbose=False, download_files=False,
                                                httpx_kwargs={"timeout": 60}))

        def run_on(client, model):
            return client.submit("Single model", False, model, model, "北京", "text", 50, 0.8, 200, 1.0,
                                 False, api_name="/run")

        for client in clients[:4]:
            run_on(client, "endless")
        assert wait_for(lambda: len(seen) == 4, 30), "the four endless runs did not start"
        fifth = run_on(clients[4], "good")
        # the endless answers go on for 60 s: a fifth run that waits for a free worker cannot finish in 30 s
        assert wait_for(fifth.done, 30), "the fifth user waited for the four endless peers"
        assert any("你好，世界" in json.dumps(output, ensure_ascii=False) for output in fifth.outputs())
    finally:
        peer.closing.set()  # the endless peers end their answers, so the app has nothing left to wait for
        for client in clients:
            client.close()
        demo.close()


# ----------------------------------------------------------------------------- RAG


def test_rag_battle_shows_each_local_models_passages_beside_its_answer(tmp_path, local, tiny_index, peer):
    from retrieval import Index

    index = Index(tiny_index)
    arena = Arena(local, tmp_path / "votes.jsonl", tmp_path / "flagged.csv", rag=Rag(index, k=2))
    battle = arena.battle(["a", "b"], "紫禁城在哪里？", "qa", Settings(max_new_tokens=6, temperature=0.0), rag=True)
    assert battle.mode == "rag"  # the box wins over the mode radio; the vote log says so
    last = list(arena.run(("s", "arena"), battle))[-1]
    assert [p.state for p in last] == ["done", "done"]
    for model, panel in zip(local, last):  # each answer and its sources come from the one RAG path
        ids, sources = model.run().rag_prompt_ids("紫禁城在哪里？", index, 2, 6)
        assert panel.sources == sources and sources[0]["title"] == "故宫"
        assert panel.text == "".join(model.run().stream_ids(ids, "qa", max_new_tokens=6, temperature=0.0))
    md = last[0].sources_markdown()
    assert md.startswith("**Passages read:**") and "1\\. **故宫**" in md and "故宫位于北京市中心" in md
    # without the box: the plain qa battle, no passages shown
    plain = list(arena.run(("s", "arena"), arena.battle(["a"], "紫禁城在哪里？", "qa", Settings(max_new_tokens=4))))[-1]
    assert plain[0].sources is None and plain[0].sources_markdown() == ""
    # a peer has no passages from this index: its panel says so, the local one still answers
    p, _ = peer()
    last = list(stream_models([p, local[0]], "紫禁城在哪里？", "rag", Settings(max_new_tokens=4), threading.Event(),
                              rag=arena.rag))[-1]
    assert last[0].state == "error" and "local models only" in last[0].error and last[1].state == "done"


def test_rag_extractive_answers_copy_the_passages_read(tmp_path, local, tiny_index):
    from retrieval import Index, sources_text

    index = Index(tiny_index)
    arena = Arena(local, tmp_path / "votes.jsonl", tmp_path / "flagged.csv", rag=Rag(index, k=2, extractive=True))
    battle = arena.battle(["a", "b"], "紫禁城在哪里？", "qa", Settings(max_new_tokens=6, temperature=0.0), rag=True)
    last = list(arena.run(("s", "arena"), battle))[-1]
    invented = 0
    for model, panel in zip(local, last):
        ids, sources = model.run().rag_prompt_ids("紫禁城在哪里？", index, 2, 6)
        assert panel.state == "done" and panel.text and panel.text in sources_text(sources)
        free = "".join(model.run().stream_ids(ids, "qa", max_new_tokens=6, temperature=0.0))
        invented += free not in sources_text(sources)
    assert invented  # unheld, these random models write text of their own


def test_rag_box_needs_an_index_and_a_question_that_fits(tmp_path, local, tiny_index):
    from retrieval import Index

    arena = Arena(local, tmp_path / "votes.jsonl", tmp_path / "flagged.csv")
    with pytest.raises(ArenaError, match="--rag INDEX"):
        arena.battle(["a"], "长江多长？", "qa", Settings(), rag=True)
    with pytest.raises(ArenaError, match="--rag INDEX"):
        list(stream_models(local, "长江多长？", "rag", Settings(), threading.Event()))
    arena = Arena(local, tmp_path / "votes.jsonl", tmp_path / "flagged.csv", rag=Rag(Index(tiny_index)))
    panel = list(arena.run(("s", "arena"), arena.battle(["a"], "长江" * 80, "qa", Settings(max_new_tokens=8),
                                                        rag=True)))[-1][0]
    assert panel.state == "error" and "the question alone" in panel.error  # the tiny run's 64-token window


def test_sources_are_shown_as_text():
    panel = Panel(sources=[{"title": "<b>x</b>", "text": "<script>alert(1)</script> *y*", "cut": True}])
    md = panel.sources_markdown()
    assert "<script>" not in md and "&lt;script&gt;" in md and "\\*y\\*" in md and "cut to fit" in md
    assert "none" in Panel(sources=[]).sources_markdown()


def test_main_refuses_a_missing_rag_index(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--models", "--rag", str(tmp_path / "none")])
    assert "no index at" in capsys.readouterr().err
