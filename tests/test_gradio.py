"""Tests of the arena's parts without a browser: Elo math, logs, peers files, and the streaming.

Peers are real HTTP servers on 127.0.0.1 started inside the tests, one per behaviour (streams well,
streams slowly, goes silent, sends bytes that are not UTF-8, answers 500, refuses the request, is
down), speaking server.py's protocol. Local models are tiny random runs from conftest.
"""
import csv
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inference import load_run
from conftest import ROOT, make_run
from sample_gradio import (Arena, LocalModel, PeerModel, Settings, elo_ratings, leaderboard, load_examples,
                           load_peers, load_votes, local_models, peer_url, stream_models)

FAST = dict(connect_timeout=1.0, read_timeout=0.5)


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


def test_votes_log_round_trip_counts_bad_lines(tmp_path):
    arena = Arena([], tmp_path / "arena" / "votes.jsonl", tmp_path / "flagged.csv")
    battle = {"models": ["甲", "b"], "prompt": "问题，带逗号", "mode": "qa", "blind": True}
    arena.record_vote(battle, "left")
    with open(arena.votes_path, "a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps({"left": "a", "right": "b", "winner": "maybe"}) + "\n")
    arena.record_vote(battle, "tie")
    votes, bad = load_votes(arena.votes_path)
    assert [(v["left"], v["right"], v["winner"], v["prompt"], v["blind"]) for v in votes] == [
        ("甲", "b", "left", "问题，带逗号", True), ("甲", "b", "tie", "问题，带逗号", True)]
    assert bad.count == 2
    assert load_votes(tmp_path / "absent.jsonl")[0] == []


# ----------------------------------------------------------------------------- files

def test_peers_file_both_forms(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"alice": "192.168.1.20:5000",
                                "bob": {"url": "https://b.example:8443/generate/", "api_key": "k"}}))
    alice, bob = load_peers(path)
    assert (alice.name, alice.url, alice.api_key) == ("alice", "http://192.168.1.20:5000", None)
    assert (bob.name, bob.url, bob.api_key) == ("bob", "https://b.example:8443", "k")
    assert len(load_peers(ROOT / "config" / "peers.json")) == 2


@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object"), ('{"x": 5}', "peer 'x' needs"),
                                           ("{oops", "cannot read peers file")])
def test_peers_file_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "peers.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_peers(path)
    with pytest.raises(ValueError, match="empty"):
        peer_url("  ")


def test_adding_a_peer_at_run_time(tmp_path):
    arena = Arena(load_peers(ROOT / "config" / "peers.json"), tmp_path / "v.jsonl", tmp_path / "f.csv")
    assert arena.add_peer(" carol ", "10.0.0.3:5000/generate", "").url == "http://10.0.0.3:5000"
    assert list(arena.models) == ["alice", "bob", "carol"] and arena.models["carol"].api_key is None
    for name, address, message in (("alice", "h:1", "exists already"), ("", "h:1", "name"), ("dan", " ", "empty")):
        with pytest.raises(ValueError, match=message):
            arena.add_peer(name, address)


def test_local_models_are_named_after_their_folder():
    names = [m.name for m in local_models(["runs/a/sft", "runs/b/sft", "runs/pretrain"], "cpu")]
    assert names == ["runs/a/sft", "runs/b/sft", "pretrain"]


def test_flagging_appends_csv_rows(tmp_path):
    arena = Arena([], tmp_path / "votes.jsonl", tmp_path / "arena" / "flagged.csv")
    battle = {"models": ["a", "b"], "outputs": ["第一行\n第二行", 'say "hi", ok'], "prompt": "问，答", "mode": "text",
              "settings": {"max_new_tokens": 5, "temperature": 0.8, "top_k": 0, "top_p": 1.0}, "blind": False}
    arena.flag(battle)
    arena.flag({**battle, "models": ["a"], "outputs": ["only"]})
    with open(arena.flagged_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["left_model"], r["left_output"], r["right_model"], r["right_output"]) for r in rows] == [
        ("a", "第一行\n第二行", "b", 'say "hi", ok'), ("a", "only", "", "")]
    assert rows[0]["prompt"] == "问，答" and rows[0]["max_new_tokens"] == "5" and rows[0]["mode"] == "text"


def test_examples_csv_loads():
    examples = load_examples(ROOT / "examples.csv")
    modes = [mode for _, mode in examples]
    assert modes.count("text") >= 10 and modes.count("qa") >= 10
    assert all(prompt.strip() and "<|" not in prompt for prompt, _ in examples)


# ----------------------------------------------------------------------------- peers on loopback

def peer_handler(behaviour, pieces, delay, seen):
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
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunks = [b"\xe4\xb8\x80\xff\xfe garbage"] if behaviour == "garbage" else [p.encode() for p in pieces]
            try:
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(delay)
                if behaviour == "silent":
                    time.sleep(3)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client hung up (Stop): nothing left to do
                pass

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
    """Start a peer on 127.0.0.1: peer(behaviour, pieces, delay) -> (PeerModel, requests seen)."""
    servers = []

    def start(behaviour="good", pieces=("你", "好", "，", "世界"), delay=0.0, api_key=None, name=None):
        seen = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), peer_handler(behaviour, pieces, delay, seen))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return PeerModel(name or behaviour, f"127.0.0.1:{server.server_port}", api_key, **FAST), seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("runs")
    return [LocalModel(name, make_run(out / name, tiny_tokenizer, seed=seed)) for name, seed in (("a", 1), ("b", 2))]


def run_to_end(models, prompt="北京", mode="text", settings=Settings(max_new_tokens=12), **kw):
    """Every page update of a run as (text, state) per panel, and the last one."""
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
    assert any(0 < len(l) < 8 and 0 < len(r) < 8 for (l, _), (r, _) in snapshots)


def test_local_models_stream_side_by_side(local, tiny_tokenizer):
    snapshots, last = run_to_end(local, settings=Settings(max_new_tokens=10, temperature=0))
    for (text, state), model in zip(last, local):
        assert state == "done"
        assert text == load_run(model.out_dir).complete("北京", "text", max_new_tokens=10, temperature=0)
    chat = [{"role": "user", "content": "你好"}]
    assert run_to_end(local[:1], chat, "chat", system="你是助手")[1][0][1] == "done"


@pytest.mark.parametrize("behaviour, message", [
    ("down", "ConnectError"), ("silent", "sent nothing for 0.5 s"), ("garbage", "not UTF-8"),
    ("error500", "HTTP 500: <html>Internal Server Error"), ("reject", "HTTP 400: prompt must be a string")])
def test_broken_peer_fails_in_its_own_panel(peer, local, behaviour, message):
    if behaviour == "down":
        with socket.socket() as s:  # a port that nothing listens on any more
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        broken = PeerModel("down", f"127.0.0.1:{port}", **FAST)
    else:
        broken, _ = peer(behaviour)
    started = time.monotonic()
    snapshots, last = run_to_end([broken, local[0]])
    assert time.monotonic() - started < 3
    assert last[0][1] == "error" and last[1][1] == "done" and last[1][0]
    panels = list(stream_models([broken], "x", "text", Settings(max_new_tokens=2), threading.Event()))[-1]
    assert message in panels[0].error
    assert message in panels[0].stats()
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
