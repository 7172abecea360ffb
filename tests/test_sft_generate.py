"""Tests for sft/sft_generate.py against a real OpenAI-compatible HTTP server on loopback.

The server (`FakeChatServer`) answers `POST /v1/chat/completions` like LM Studio or vLLM would,
with behaviour scripted per article title (read back from the prompt): good replies wrapped in
prose and code fences, malformed JSON, too few pairs, pronoun questions, unsupported answers, slow
replies, 500s, 429s with Retry-After, 401s, requests held until the test releases them (to
SIGKILL the generator mid-run), and hostile replies: bodies of the wrong shape, deep nesting, lone
surrogates, a body dripped a few bytes at a time, a body larger than the cap. Backoff is tiny so
the file runs in seconds.
"""
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, need_shared

sys.path.insert(0, str(ROOT / "sft"))
import sft_generate as gen  # noqa: E402

from data_utils import split_sentences  # noqa: E402

SCRIPT = ROOT / "sft" / "sft_generate.py"
FAST = ["--backoff", "0.01", "--max_backoff", "0.05", "--timeout", "0.5", "--max_attempts", "3", "--min_chars", "50"]


# ----------------------------------------------------------------------------- the server


def chat_reply(content):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}


class FakeChatServer:
    """script: title -> function(attempt number) -> (status, content or error, headers, delay_s).

    content: any JSON value (sent as the message content of a chat completion), bytes (sent as the
    whole body), or a function that writes the body itself to the socket (no Content-Length)."""

    def __init__(self, script):
        self.script, self.calls, self.times = script, Counter(), defaultdict(list)
        self.release = threading.Event()
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions"
                title = re.search(r"文章标题：(.+)", body["messages"][0]["content"]).group(1).strip()
                with lock:
                    server.calls[title] += 1
                    server.times[title].append(time.monotonic())
                    attempt = server.calls[title]
                status, content, headers, delay = server.script[title](attempt)
                if delay == "hold":
                    server.release.wait(30)
                else:
                    time.sleep(delay)
                if isinstance(content, bytes) or callable(content):
                    payload = content
                else:
                    payload = json.dumps(chat_reply(content) if status == 200 else {"error": {"message": content}})
                    payload = payload.encode()
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    if not callable(payload):
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    payload(self.wfile) if callable(payload) else self.wfile.write(payload)
                except OSError:  # the client gave up (timeout, too large) or was killed
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(FakeChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ----------------------------------------------------------------------------- articles and replies


def river(title):
    return (f"{title}是一条位于示例省的河流，全长约480公里。{title}发源于青石山脉的北坡。"
            f"{title}流经三座城市，最后注入白鹭湖。{title}流域盛产稻米和茶叶。")


def good_pairs(title):
    return [{"question": f"{title}全长多少公里？", "answer": "约480公里"},
            {"question": f"{title}发源于哪里？", "answer": "青石山脉的北坡"},
            {"question": f"{title}最后注入哪里？", "answer": "白鹭湖"},
            {"question": f"{title}流域盛产什么？", "answer": "稻米和茶叶"}]


def as_list(pairs):
    return json.dumps(pairs, ensure_ascii=False)


def ok(content, delay=0):
    return lambda attempt: (200, content, {}, delay)


def first_then_ok(status, headers, content, delay=0):
    return lambda attempt: (status, "busy", headers, 0) if attempt == 1 else (200, content, {}, delay)


def write_articles(path, titles, extra_lines=()):
    lines = [json.dumps({"id": f"a{i}", "title": t, "text": f"{t}\n\n{river(t)}"}, ensure_ascii=False)
             for i, t in enumerate(titles)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def last_states(output):
    return {s["id"]: s for s in read_jsonl(Path(f"{output}.state.jsonl"))}


def assert_valid_and_unique(output, articles_path):
    """Every output pair passes the generator's own validator; no (id, question) twice."""
    articles = {a.id: a for a in gen.ArticleReader(articles_path, 50, 2000)}
    limits = gen.Limits(1, 6, 15, 300, 0.6)
    rows = read_jsonl(output)
    for row in rows:
        assert set(row) == {"question", "answer", "id", "title", "context", "answer_in_context"}
        kept, rejected = gen.validate([row], articles[row["id"]], limits)
        assert kept and not rejected, row
        assert row["context"] in articles[row["id"]].text and len(row["context"]) <= gen.DEFAULT_CONTEXT_CHARS
        assert row["answer_in_context"] == (row["answer"] in row["context"])
    assert len({(r["id"], r["question"]) for r in rows}) == len(rows)
    return rows


# ----------------------------------------------------------------------------- end-to-end with the server

PRONOUN_PAIRS = [{"question": "它发源于哪里？", "answer": "青石山脉的北坡"},
                 {"question": "该河流全长多少？", "answer": "约480公里"},
                 {"question": "这条河注入哪里？", "answer": "白鹭湖"}]
UNSUPPORTED = [{"question": "河流己的长度？", "answer": "火星上的奥林帕斯山"},
               {"question": "河流己的源头？", "answer": "南极冰盖下的湖泊群"},
               {"question": "河流己的物产？", "answer": "黄金与钻石矿藏"}]


def test_generate_against_scripted_server(serve, tmp_path, capsys):
    pairs_jia = good_pairs("河流甲")
    script = {
        # prose and a code fence around a list holding a duplicate: done, duplicate dropped
        "河流甲": ok("好的，以下是问答对：\n```json\n" + as_list(pairs_jia + pairs_jia[:1]) + "\n```\n希望有帮助！"),
        # one object per line, plus a pronoun question that is dropped while the rest pass
        "河流乙": ok("\n".join(json.dumps(p, ensure_ascii=False) for p in good_pairs("河流乙") + PRONOUN_PAIRS[:1])),
        "河流丙": ok('问答：{question: "河流丙有多长", answer: 480}'),
        "河流丁": ok(as_list(good_pairs("河流丁")[:2])),
        "河流戊": ok(as_list(PRONOUN_PAIRS)),
        "河流己": ok(as_list(UNSUPPORTED)),
        "河流庚": first_then_ok(500, {}, as_list(good_pairs("河流庚"))),
        "河流辛": first_then_ok(429, {"Retry-After": "1"}, as_list(good_pairs("河流辛"))),
        "河流壬": ok(as_list(good_pairs("河流壬")), delay=2),
        "河流癸": lambda n: (200, as_list(good_pairs("河流癸")), {}, 2 if n == 1 else 0),
        "短": ok("[]"),
    }
    server = serve(script)
    titles = [t for t in script if t != "短"]
    short = json.dumps({"id": "short", "title": "短", "text": "短\n\n太短的条目。"}, ensure_ascii=False)
    articles = write_articles(tmp_path / "wiki.jsonl", titles, [short, "{broken json"])
    output = tmp_path / "out" / "sft_saves.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            "--workers", "4", *FAST, "--max_backoff", "1.5"]  # room for the Retry-After: 1 below

    assert gen.main(argv) == 0
    rows = assert_valid_and_unique(output, articles)
    per_title = Counter(r["title"] for r in rows)
    assert per_title == {t: 4 for t in ("河流甲", "河流乙", "河流庚", "河流辛", "河流癸")}
    states = last_states(output)
    assert {s["id"]: s["reason"] for s in states.values() if s["status"] == "failed"} == {
        "a2": "malformed_json", "a3": "too_few_pairs", "a4": "pronoun_question", "a5": "unsupported_answer",
        "a8": "timeout"}
    assert "short" not in states and "短" not in server.calls
    assert server.calls["河流丙"] == 3 and server.calls["河流庚"] == 2 and server.calls["河流癸"] == 2
    retry_gap = server.times["河流辛"][1] - server.times["河流辛"][0]
    assert retry_gap >= 0.9, "Retry-After: 1 must be honoured even though --backoff is 0.01"
    summary = capsys.readouterr().out
    assert "5 done, 5 failed" in summary and "skipped 1 malformed input lines" in summary

    # a second run retries only the failed articles and leaves the done ones alone
    before = output.read_bytes()
    assert gen.main(argv) == 0
    assert output.read_bytes() == before
    assert server.calls["河流甲"] == 1 and server.calls["河流丙"] == 6


# ----------------------------------------------------------------------------- hostile replies


def raw(obj):
    return lambda attempt: (200, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), {}, 0)


def test_malformed_replies_are_recorded_failures_and_the_run_goes_on(serve, tmp_path, capsys):
    good = as_list(good_pairs("河流甲"))
    nested_pairs = "[" * 100_000 + as_list(good_pairs("河流十")) + "]" * 100_000
    with_surrogate = good_pairs("河流壹") + [{"question": "河流壹全长多少\ud800？", "answer": "约480公里\ud800"}]
    script = {
        "河流甲": ok(good),
        "河流一": ok(5),  # content an int, a list, a dict
        "河流二": ok(["[{}]"]),
        "河流三": ok({"question": "河流三有多长？", "answer": "约480公里"}),
        "河流四": raw({"choices": "[{}]"}),  # choices a string, [{}], message null
        "河流五": raw({"choices": [{}]}),
        "河流六": raw({"choices": [{"message": None}]}),
        "河流七": ok("[" * 100_000),  # content nested past any parser's recursion limit
        "河流八": raw(b'{"choices": ' + b"[" * 100_000),  # the body itself nested as deep
        "河流九": raw(b"\xff\xfe not utf-8"),
        "河流十": ok(nested_pairs),  # whole pairs deep inside brackets are still found
        "河流壹": ok(as_list(with_surrogate)),  # a pair holding a lone surrogate is dropped, not written
        "河流贰": ok(""),
    }
    server = serve(script)
    bad_input = json.dumps({"id": "s", "title": "河流\ud800", "text": river("河流")})  # escaped surrogate
    articles = write_articles(tmp_path / "wiki.jsonl", list(script), [bad_input])
    output = tmp_path / "out.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            "--workers", "2", *FAST, "--max_attempts", "1"]
    assert gen.main(argv) == 0
    rows = assert_valid_and_unique(output, articles)
    assert Counter(r["title"] for r in rows) == {"河流甲": 4, "河流十": 4, "河流壹": 4}
    failed = {s["id"]: s["reason"] for s in last_states(output).values() if s["status"] == "failed"}
    assert failed == {"a1": "bad_response", "a2": "bad_response", "a3": "bad_response", "a4": "bad_response",
                      "a5": "bad_response", "a6": "bad_response", "a7": "malformed_json", "a8": "too_deep",
                      "a9": "bad_response", "a12": "empty_reply"}
    out = capsys.readouterr().out
    assert "3 done, 10 failed" in out and "skipped 1 malformed input lines" in out and "lone surrogate" in out
    assert "河流\ud800" not in server.calls


def test_a_dripping_reply_is_cut_at_the_total_timeout(serve, tmp_path):
    body = json.dumps(chat_reply(as_list(good_pairs("河流甲")))).encode()

    def drip(wfile):  # the whole body in 4 s, a few bytes every 0.05 s: no single read ever waits 1 s
        step = len(body) // 80 + 1
        for k in range(0, len(body), step):
            wfile.write(body[k : k + step])
            wfile.flush()
            time.sleep(0.05)

    server = serve({"河流甲": lambda attempt: (200, drip, {}, 0)})
    articles = write_articles(tmp_path / "wiki.jsonl", ["河流甲"])
    output = tmp_path / "out.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            *FAST, "--timeout", "1", "--max_attempts", "1"]
    started = time.monotonic()
    assert gen.main(argv) == 0
    assert time.monotonic() - started < 3.5, "--timeout 1 bounds the whole request, not each read"
    assert last_states(output)["a0"]["reason"] == "timeout"


def test_a_reply_over_the_size_cap_is_refused(serve, tmp_path, capsys):
    reply = json.dumps(chat_reply(as_list(good_pairs("河流乙")))).encode()
    sent = Counter()

    def flood(wfile):  # 12 MiB of JSON whitespace, then a valid reply: valid, but 3x the default cap
        for _ in range(192):
            wfile.write(b" " * (1 << 16))
            sent["bytes"] += 1 << 16
        wfile.write(reply)

    declared = b" " * (5 << 20) + reply  # the same with a Content-Length: refused before reading
    server = serve({"河流甲": lambda attempt: (200, flood, {}, 0), "河流乙": raw(declared)})
    articles = write_articles(tmp_path / "wiki.jsonl", ["河流甲", "河流乙"])
    output = tmp_path / "out.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            *FAST, "--timeout", "20", "--max_attempts", "1"]
    assert gen.main(argv) == 0
    assert {s["id"]: s["reason"] for s in last_states(output).values()} == {"a0": "too_large", "a1": "too_large"}
    assert output.read_bytes() == b"" and "0 done, 2 failed (too_large 2)" in capsys.readouterr().out


def test_authentication_error_stops_at_once(serve, tmp_path, capsys):
    server = serve(defaultdict(lambda: lambda attempt: (401, "invalid api key", {}, 0)))
    articles = write_articles(tmp_path / "wiki.jsonl", [f"河流{i}" for i in range(20)])
    output = tmp_path / "out.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            "--api_key", "wrong", "--workers", "2", *FAST]
    assert gen.main(argv) == 2
    assert "authentication failed (HTTP 401)" in capsys.readouterr().err
    assert sum(server.calls.values()) <= 4  # no retries, no sweep through the remaining articles
    assert output.read_bytes() == b""


def test_dry_run_prints_the_request_and_sends_nothing(serve, tmp_path, capsys):
    server = serve({})
    articles = write_articles(tmp_path / "wiki.jsonl", ["河流甲", "河流乙"])
    argv = ["--input", str(articles), "--output", str(tmp_path / "out.jsonl"), "--base_url", server.base_url,
            "--model", "qwen2.5-7b-instruct", "--dry_run", *FAST]
    assert gen.main(argv) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["url"] == server.base_url + "/chat/completions" and request["model"] == "qwen2.5-7b-instruct"
    prompt = request["messages"][0]["content"]
    assert "文章标题：河流甲" in prompt and river("河流甲") in prompt and "3到6个" in prompt
    assert not server.calls and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupt_and_resume_loses_and_duplicates_nothing(serve, tmp_path, sig):
    titles = [f"河流{i:02d}" for i in range(12)]
    # the first six answer at once; the rest are held until the test has stopped the generator
    script = {t: ok(as_list(good_pairs(t)), delay=0 if i < 6 else "hold") for i, t in enumerate(titles)}
    server = serve(script)
    articles = write_articles(tmp_path / "wiki.jsonl", titles)
    output = tmp_path / "sft_saves.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            "--workers", "2", *FAST, "--timeout", "30"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(f"{output}.state.jsonl")

    def six_done_two_held():
        return (state.exists() and len(state.read_bytes().splitlines()) >= 6
                and sum(server.calls[t] for t in titles[6:]) >= 2)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not six_done_two_held():
        time.sleep(0.05)
    assert six_done_two_held()
    stopped_at = time.monotonic()
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=10) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert time.monotonic() - stopped_at < 5, "Ctrl-C must not wait for the held requests"
    assert len(read_jsonl(output)) == 24, "the six answered articles were written before the stop"
    # what a kill in the middle of an article's write would leave: a whole line of it, then a torn
    # one; resuming must cut both, or article a6 would count as done with a single pair
    whole = {**good_pairs("河流06")[0], "id": "a6", "title": "河流06"}
    with open(output, "ab") as f:
        f.write((json.dumps(whole, ensure_ascii=False) + '\n{"question": "河流06发源于哪里？", "answer": "青').encode())

    server.release.set()  # the resumed run gets answers for the held articles
    assert gen.main(argv) == 0
    rows = assert_valid_and_unique(output, articles)
    assert Counter(r["title"] for r in rows) == {t: 4 for t in titles}
    assert all(server.calls[t] == 1 for t in titles[:6]), "finished articles are not asked again"
    assert all(s["status"] == "done" for s in last_states(output).values())


# ----------------------------------------------------------------------------- the pieces


def test_extract_json_objects_tolerates_wrapping():
    pair = {"question": "长江有多长？", "answer": "约6300公里"}
    text = json.dumps(pair, ensure_ascii=False)
    assert gen.extract_json_objects(f"当然！\n```json\n[{text}]\n```\n以上。") == [pair]
    assert gen.extract_json_objects(f"{text}\n{text}") == [pair, pair]
    assert gen.extract_json_objects(json.dumps({"qa_pairs": [pair]}, ensure_ascii=False)) == [pair]
    draft_then_cut_off = f'<think>{{"question": "草稿", "answer": "x"}}</think>[{text}, {{"question": "断'
    assert gen.extract_json_objects(draft_then_cut_off) == [pair]
    assert gen.extract_json_objects("抱歉，我无法回答。[1]") == []


def test_validate_rules():
    article = gen.Article("x", "长江",
                          "长江是中国最长的河流，全长约6300公里，发源于青藏高原的唐古拉山脉，最后注入东海。")
    limits = gen.Limits(1, 2, 15, 20, 0.6)
    candidates = [{"question": "长江有多长？", "answer": "全长约6300公里"},
                  {"question": "长江有多长 ?", "answer": "约6300公里"},  # same question once punctuation is ignored
                  {"question": "它发源于哪里？", "answer": "唐古拉山脉"},
                  {"question": "长江的源头在哪座遥远而高耸的山脉之中？", "answer": "唐古拉山脉"},
                  {"question": "长江流入哪里？", "answer": "太平洋西岸的日本海"},
                  {"question": "长江流入哪里？"},
                  {"question": "长江发源于哪里？", "answer": "青藏高原的唐古拉山脉"},
                  {"question": "长江是什么？", "answer": "中国最长的河流"}]
    kept, rejected = gen.validate(candidates, article, limits)
    assert [p["question"] for p in kept] == ["长江有多长？", "长江发源于哪里？"]  # max_qa = 2
    assert rejected == {"duplicate": 1, "pronoun_question": 1, "too_long": 1, "unsupported_answer": 1,
                        "missing_fields": 1}
    assert gen.judge(candidates[2:3], article, limits) == gen.Outcome("failed", [], "pronoun_question")
    assert gen.judge([], article, limits).reason == "malformed_json"


def http_date(seconds_from_now):
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + seconds_from_now))


# what a hostile or broken server may send, and the wait it must come to (cap: --max_backoff)
RETRY_AFTER = {"3": 3.0, "0": 0.0, "inf": "cap", "Infinity": "cap", "1e400": "cap", "9" * 400: "cap",
               "99999999999": "cap", "Fri, 31 Dec 9999 23:59:59 GMT": "cap", http_date(3600): "cap",
               "Thu, 01 Jan 1970 00:00:00 GMT": 0.0, "Sunday, 06-Nov-94 08:49:37 GMT": 0.0,  # RFC 850 form
               "Fri Dec 31 23:59:59 9999": "cap",  # asctime form
               "NaN": None, "-5": None, "-inf": None, "soon": None, "": None,
               "Fri, 31 Dec 99999 23:59:59 GMT": None, "Mon, 99 Foo 2026 99:99:99 GMT": None}


def test_retry_after_header():
    for value, wanted in RETRY_AFTER.items():
        assert gen._retry_after({"retry-after": value}, 10.0) == (10.0 if wanted == "cap" else wanted), value
    assert 50 < gen._retry_after({"retry-after": http_date(60)}, 600) <= 60
    assert gen._retry_after({}, 10.0) is None and gen._retry_after(None, 10.0) is None


def test_every_wait_a_server_asks_for_is_capped_by_max_backoff(serve, tmp_path):
    """A real server answering 429 and 503 with hostile Retry-After headers: every wait ends within
    --max_backoff (before this was capped at 600 s, "inf" held a worker for 10 minutes)."""
    cap = 0.5
    titles = {f"河流{i:02d}": value for i, value in enumerate(RETRY_AFTER)}

    def busy_twice(title, value):
        return lambda n: (429 if n == 1 else 503, "busy", {"Retry-After": value}, 0) if n < 3 else \
            (200, as_list(good_pairs(title)), {}, 0)

    script = {title: busy_twice(title, value) for title, value in titles.items()}
    server = serve(script)
    articles = write_articles(tmp_path / "wiki.jsonl", list(titles))
    output = tmp_path / "sft_saves.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            "--workers", "6", *FAST, "--max_attempts", "3", "--max_backoff", str(cap), "--timeout", "10"]
    # a subprocess with a deadline: a wait past the cap fails the test instead of hanging it
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(s["status"] == "done" for s in last_states(output).values()) and len(last_states(output)) == len(titles)
    for title, value in titles.items():
        first, second, third = server.times[title]
        for gap in (second - first, third - second):
            assert gap < cap + 2.0, f"Retry-After {value!r} held the worker {gap:.1f} s"
            if RETRY_AFTER[value] == "cap":
                assert gap >= cap * 0.9, f"Retry-After {value!r} is honoured up to the cap"


def test_truncate_at_sentence_keeps_whole_sentences():
    text = "第一句话。第二句话比较长一些！\n第三句？第四句。"
    assert gen.truncate_at_sentence(text, 100) == text
    assert gen.truncate_at_sentence(text, 16) == "第一句话。第二句话比较长一些！"
    assert gen.truncate_at_sentence(text, 21) == "第一句话。第二句话比较长一些！\n第三句？"
    assert gen.truncate_at_sentence("没有句号的很长一段文字" * 5, 10) == "没有句号的很长一段文"


def test_extractive_rules_ask_short_questions_about_sentences_anywhere():
    text = ("东富山站（）是隶属于爱之风富山铁道的铁路车站，座落于富山县富山市。该站靠近富山湾。\n"
            "车站于1908年正式开业，站房由日本国有铁道兴建。2015年，车站每日约有1200人次使用。"
            "车站简称“东富”，曾出现在小说《雪国》中。")
    pairs = gen.extract_candidates(gen.Article("1", "东富山站", text))
    by_answer = {p["answer"]: p for p in pairs}
    assert set(by_answer) >= {"1908年", "1200人次", "《雪国》", "日本国有铁道", "富山县富山市"}
    assert by_answer["1908年"]["family"] == "when" and "哪一年" in by_answer["1908年"]["question"]
    assert "多少人次" in by_answer["1200人次"]["question"] and by_answer["1200人次"]["family"] == "how_many"
    assert "谁" in by_answer["日本国有铁道"]["question"] and "哪里" in by_answer["富山县富山市"]["question"]
    for p in pairs:
        assert p["answer"] not in p["question"] and p["question"].endswith("？") and len(p["answer"]) <= 20
        assert text[p["at"]:p["at"] + len(p["answer"])] == p["answer"]  # verbatim, where it was found
        assert "东富山" in p["question"]  # the title stands in for a missing subject: askable closed-book
    assert {p["family"] for p in pairs} >= {"when", "how_many", "who", "where", "what"}
    assert gen.extract_candidates(gen.Article("1", "东富山站", text)) == pairs  # deterministic


def test_extractive_backend_on_shared_wiki_slice(tmp_path, capsys):
    source = need_shared("zhwiki", "zhwiki-00.jsonl")
    with open(source, encoding="utf-8") as f:
        lines = [next(f) for _ in range(2000)]
    articles = tmp_path / "slice.jsonl"
    articles.write_text("".join(lines), encoding="utf-8")
    output = tmp_path / "sft_saves.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--backend", "extractive"]
    assert gen.main(argv) == 0
    articles_by_id = {a.id: a for a in gen.ArticleReader(articles, 200, 2000)}
    limits = gen.Limits(1, 6, 48, 20, 0.6)
    rows = read_jsonl(output)
    assert len(rows) >= 1000, f"only {len(rows)} pairs from {len(articles_by_id)} usable articles"
    # the answers are short and sit anywhere in their passage: each tenth holds a fair share, and a
    # rule answering with the passage's first sentence finds few of them
    assert statistics.median(len(r["answer"]) for r in rows) <= 8
    histogram = gen.position_histogram(rows)
    assert min(histogram) >= 0.05 * len(rows) and max(histogram) <= 0.15 * len(rows), histogram
    in_first = sum(r["answer"] in split_sentences(r["context"])[0] for r in rows)
    assert in_first <= 0.25 * len(rows), in_first
    families = Counter(r["family"] for r in rows)
    assert len(families) >= 5 and max(families.values()) <= 0.5 * len(rows), families
    for row in rows:
        kept, _ = gen.validate([row], articles_by_id[row["id"]], limits)
        assert kept, row
        assert row["answer"] in articles_by_id[row["id"]].text  # verbatim
        assert row["answer"] in row["context"] and row["answer_in_context"]  # the passage it came from
        assert row["context"] in articles_by_id[row["id"]].text and len(row["context"]) <= gen.DEFAULT_CONTEXT_CHARS
    states = last_states(output)
    assert set(states) == set(articles_by_id)
    failed = [s for s in states.values() if s["status"] == "failed"]
    assert {s["reason"] for s in failed} <= {"no_pairs"}
    capsys.readouterr()
    assert gen.main(argv) == 0  # resume: done articles are skipped, failed ones tried again
    assert len(read_jsonl(output)) == len(rows) and f"0 done, {len(failed)} failed" in capsys.readouterr().out


def test_json_depth_is_bounded_before_parsing():
    pair = {"question": "长江有多长？", "answer": "约6300公里"}
    text = json.dumps(pair, ensure_ascii=False)
    assert gen.extract_json_objects("[" * 100_000) == []  # json alone would raise RecursionError
    assert gen.extract_json_objects("{" * 50_000 + text) == [pair]
    assert gen.extract_json_objects("[" * 100_000 + text + "]" * 100_000) == [pair]
    brackets_in_a_string = {"question": "长江有多长？", "answer": "[" * 1000}
    assert gen.extract_json_objects(json.dumps(brackets_in_a_string)) == [brackets_in_a_string]
    assert gen.too_deep("[" * 64 + "]" * 64) is None and gen.too_deep("[" * 65) == 65
    with pytest.raises(gen.RequestFailed) as failed:
        gen.reply_content(json.dumps(chat_reply("[" * 100)).replace('"choices": ', '"choices": ' + "[" * 100).encode())
    assert failed.value.reason == "too_deep"


def test_library_errors_are_typed_and_main_turns_them_into_exit_codes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(gen.GenerateError, match="no .jsonl files found"):
        gen.ArticleReader(tmp_path / "empty", 50, 2000)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("没有文章占位符 {title}", encoding="utf-8")
    args = gen.parse_args(["--input", str(tmp_path), "--model", "m", "--prompt_file", str(prompt)])
    with pytest.raises(gen.GenerateError, match="no {text} placeholder"):
        gen.load_prompt(args)
    assert gen.main(["--input", str(tmp_path / "empty"), "--backend", "extractive"]) == 2
    assert "error: no .jsonl files found" in capsys.readouterr().err
    articles = write_articles(tmp_path / "wiki.jsonl", ["河流甲"])
    assert gen.main(["--input", str(articles), "--model", "m", "--prompt_file", str(prompt), "--dry_run"]) == 2
    assert "no {text} placeholder" in capsys.readouterr().err


def test_passage_is_the_fixed_chunk_that_holds_the_answer():
    text = ("甲河是一条河流。甲河长约480公里。\n"
            "甲河发源于青石山脉的北坡，流经三座城市。甲河最后注入白鹭湖。甲河流域盛产稻米。")
    context = gen.passage("青石山脉的北坡", text, 30)
    assert "青石山脉的北坡" in context and len(context) <= 30 and context in text
    assert context.startswith("甲河") and context.endswith("。")  # whole sentences
    # the chunks are cut before any question: every answer of a chunk is shown the same passage
    assert gen.passage("三座城市", text, 30) == context and gen.passage("白鹭湖", text, 30) == context
    assert gen.passage("稻米", text, 30) != context and gen.passage("480公里", text, 30) != context
    assert gen.passage("青石山脉的北坡", text, 1000) == text
    # a paraphrase is not verbatim: the passage is the chunk of the sentence that supports it best
    assert "发源于青石山脉的北坡" in gen.passage("青石山脉北坡", text, 30)
    long_sentence = "前" * 300 + "答案在这里" + "后" * 300 + "。"
    window = gen.passage("答案在这里", long_sentence, 40)
    assert len(window) <= 40 and window in long_sentence
    assert gen.passage("答案", "", 40) == "" and gen.passage("不在文中", "只有一句。", 40) == "只有一句。"


def test_llm_pairs_carry_their_passage_and_say_whether_the_answer_is_verbatim(serve, tmp_path):
    paraphrased = good_pairs("河流甲")[:3] + [{"question": "河流甲的源头在哪？", "answer": "青石山脉北坡"}]
    server = serve({"河流甲": ok(as_list(paraphrased))})
    articles = write_articles(tmp_path / "wiki.jsonl", ["河流甲"])
    output = tmp_path / "out.jsonl"
    argv = ["--input", str(articles), "--output", str(output), "--base_url", server.base_url, "--model", "fake",
            *FAST, "--context_chars", "40", "--max_answer_chars", "40"]
    assert gen.main(argv) == 0
    rows = {r["answer"]: r for r in read_jsonl(output)}
    assert [r["answer_in_context"] for r in rows.values()] == [True, True, True, False]
    assert "青石山脉的北坡" in rows["青石山脉北坡"]["context"]
    assert all(len(r["context"]) <= 40 and r["context"] in river("河流甲") for r in rows.values())


def test_post_json_reports_a_refused_connection():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(gen.RequestFailed) as failed:
        gen.post_json(f"http://127.0.0.1:{port}/v1/chat/completions", {}, {}, 2, 1000)
    assert failed.value.reason == "connection_error" and failed.value.retry
