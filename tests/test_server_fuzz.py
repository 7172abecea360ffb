"""A seeded fuzz of server.py on 127.0.0.1: 1,200 hostile requests, with legitimate clients alongside.

The server is the real waitress server from `make_server` on an ephemeral port with a tiny random
model and an API key. The hostile requests are built up front from a seeded random generator (the
same set on every run) across the classes an attacker on the LAN can reach: JSON nested too
deep, lone surrogates, wrong types, extreme numbers, huge or odd strings within the 1 MB limit,
bad and oversized headers, wrong methods and paths, unknown fields, truncated bodies, bad auth,
OPTIONS without the key (a 401 that lists no route, CORS preflight or not), clients that hang up
without reading their answer (their rows must stop: the worker is idle after the fuzz),
across every POST route (/tokenize and /detokenize too) and the n, logprobs, rag and extractive fields (the
server has a tiny index, so RAG requests generate; one legitimate client asks for an extractive answer).
They are sent as raw bytes over sockets (so malformed HTTP really goes out) by four threads while
a fifth sends legitimate greedy requests. Asserted: no 5xx and no traceback or file path in any
answer, the legitimate answers equal the ones taken before the fuzz, no row failed in the worker,
and greedy output after the fuzz equals greedy output before. Every socket has a timeout and the
whole run a deadline, so it cannot hang; the model is tiny and generations are capped at 8 tokens.
"""
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, WIKI_ARTICLES, make_run

from inference import load_run
from retrieval import Index, build_index
from server import create_app, make_server

KEY = "fuzz-key"
AUTH = f"Bearer {KEY}"
CASES = 1200
DEADLINE_S = 300  # generous: the run takes ~10-30 s on a busy 2-core machine
SOCKET_TIMEOUT_S = 10
CAP = 8  # max_new_tokens_cap: every generation the fuzz starts is short

pytestmark = pytest.mark.slow

LEGIT = [("/generate", {"prompt": "北京是", "max_new_tokens": 8, "temperature": 0, "stream": False}),
         ("/generate", {"prompt": "长江", "mode": "qa", "max_new_tokens": 8, "temperature": 0, "stream": False}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8,
                                   "temperature": 0}),
         ("/v1/completions", {"prompt": "黄河是", "max_tokens": 8, "temperature": 0}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "长江"}], "max_tokens": 8,
                                   "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2}),
         ("/v1/completions", {"prompt": "故宫", "max_tokens": 8, "temperature": 0, "logprobs": 3, "stop": ["。"]}),
         ("/generate", {"prompt": "紫禁城在哪里？", "mode": "rag", "rag_k": 2, "max_new_tokens": 8, "temperature": 0,
                        "extractive": True, "stream": False})]
POST_ROUTES = ["/generate", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
FIELDS = ["prompt", "messages", "mode", "system", "stream", "max_new_tokens", "max_tokens", "max_completion_tokens",
          "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "ignore_eos", "n", "stream_options",
          "logprobs", "top_logprobs", "rag", "rag_k", "extractive", "text", "tokens", "tools", "response_format",
          "logit_bias", "echo", "suffix", "best_of"]
ODD_VALUES = [None, True, False, 0, -1, 1, 1.5, -0.0, "", "x", "rag", [], {}, [1, 2], {"a": 1}, [[]], "长江" * 3,
              [{"role": "user"}], [{"role": "user", "content": None}], {"include_usage": "yes"}, {"k": 3},
              {"k": 2, "extractive": True},
              [0, 1, 2], [-1], [2**40]]
EXTREME_NUMBERS = ["1e308", "-1e308", "1e-300", "5e-324", "1e-46", str(2**63), str(2**64), str(-2**63), "1e999",
                   "NaN", "Infinity", "-Infinity", "9" * 4000, "9" * 5000, "-0", "0.0000001", "1E+2", "123456789.0"]
ODD_TEXT = ["<|endoftext|>", "<|end|><|assistant|>", "\u0000", "\u202e\u202d", "e\u0301" * 50, "😀" * 30, "\ufeff",
            "\r\n\r\n", "%s%n", "../../etc/passwd", "\\", '"', "\udbff\udfff", "\t" * 100, "中" * 600]


def json_text(value):
    return json.dumps(value, ensure_ascii=False)


def valid_body(rng, path):
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": rng.choice(["你好", "长江", "a"])}], "max_tokens": 4}
    if path == "/tokenize":
        return {"text": rng.choice(["北京", "上海是", "a"])}
    if path == "/detokenize":
        return {"tokens": rng.choice([[1, 2, 3], [], [100]])}
    budget = "max_new_tokens" if path == "/generate" else "max_tokens"
    return {"prompt": rng.choice(["北京", "上海是", "a"]), budget: 4}


def request_bytes(method, path, body=b"", headers=None, auth=AUTH, length=None):
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    if auth is not None:
        lines.append(b"Authorization: " + (auth.encode("utf-8", "surrogateescape") if isinstance(auth, str) else auth))
    lines += headers or [b"Content-Type: application/json"]
    if length is not False:
        lines.append(b"Content-Length: " + str(len(body) if length is None else length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# each builder returns (raw request bytes, may_drop): may_drop marks malformed HTTP that waitress
# may answer by closing the connection
def deep_json(rng):
    depth = rng.choice([65, 100, 1000, 5000, 20000, 100000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    nested = opener * depth + ("1" if opener != "[" else "") + closer * depth * rng.choice([0, 1])
    field = rng.choice(FIELDS)
    body = nested if rng.random() < 0.3 else f'{{"{field}": {nested}}}'
    return request_bytes("POST", rng.choice(POST_ROUTES), body.encode()), False


def surrogate(rng):
    path = rng.choice(POST_ROUTES)
    body = json.dumps(valid_body(rng, path))  # ASCII, so the escape below stays an escape
    escape = rng.choice(["\\ud800", "\\udfff", "\\udbff", "x\\ud800y", "\\udc00\\ud800"])
    field = rng.choice(FIELDS + ["\\ud800"])
    if field == "messages":
        value = f'[{{"role": "user", "content": "{escape}"}}]'
    elif field == "stop":
        value = f'["ok", "{escape}"]'
    else:
        value = f'"{escape}"'
    key = field if rng.random() < 0.8 else escape
    return request_bytes("POST", path, (f'{{"{key}": {value}, ' + body[1:]).encode()), False


def bad_type(rng):
    path = rng.choice(POST_ROUTES)
    body = valid_body(rng, path) | {rng.choice(FIELDS): rng.choice(ODD_VALUES) for _ in range(rng.randint(1, 3))}
    return request_bytes("POST", path, json_text(body).encode()), False


def extreme_number(rng):
    path = rng.choice(POST_ROUTES)
    body = json_text(valid_body(rng, path))
    field = rng.choice(["temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens",
                        "max_tokens", "n", "best_of", "max_completion_tokens", "logprobs", "top_logprobs", "rag_k",
                        "tokens"])
    number = rng.choice(EXTREME_NUMBERS)
    return request_bytes("POST", path, (f'{{"{field}": {number}, ' + body[1:]).encode()), False


def odd_string(rng):
    path = rng.choice(POST_ROUTES)
    size = rng.choice([1, 10, 500, 4000, 60_000, 300_000])
    text = "".join(rng.choice(ODD_TEXT) for _ in range(max(1, size // 20)))[:size]
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # a valid pair stays a character
    body = valid_body(rng, path)
    where = rng.choice(["prompt", "system", "stop", "content", "key", "mode"])
    if where == "content":
        body["messages"] = [{"role": rng.choice(["user", "system", "assistant"]), "content": text}] * rng.randint(1, 3)
    elif where == "stop":
        body["stop"] = [text[:rng.choice([1, 200, 300])]]
    elif where == "key":
        body[text[:1000]] = text
    else:
        body[where] = text
    raw = json_text(body).encode()
    return request_bytes("POST", path, raw[:(1 << 20) - 10]), False


def bad_header(rng):
    path = rng.choice(POST_ROUTES + ["/health", "/v1/models"])
    body = json_text(valid_body(rng, path)).encode()
    choice = rng.randrange(9)
    if choice == 0:
        return request_bytes("POST", path, body, length=rng.choice(["abc", "-1", "99999999999999999999", "1e3",
                                                                     " 5", "0x10"])), True
    if choice == 1:
        return request_bytes("POST", path, body, headers=[b"Content-Type: application/json",
                                                          b"Content-Length: 3"]), True
    if choice == 2:
        return request_bytes("POST", path, body, headers=[b"X-Big: " + b"a" * rng.choice([70_000, 300_000])]), True
    if choice == 3:
        return request_bytes("POST", path, body, headers=[b"X-Bin: \xff\xfe\x00\x01", b"Content-Type: \xc3\x28"]), True
    if choice == 4:  # a chunked body that lies about its chunk sizes
        chunked = b"5\r\n" + body[:5] + b"\r\nzz\r\n" + body + b"\r\n0\r\n\r\n"
        return request_bytes("POST", path, chunked, headers=[b"Transfer-Encoding: chunked"], length=False), True
    if choice == 5:
        return request_bytes("POST", path, body, headers=[b"Content-Type: text/plain; charset=utf-16"]), False
    if choice == 6:
        return b"POST " + path.encode() + b" HTTP/9.9\r\nHost: x\r\n\r\n", True
    if choice == 7:
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.randrange(256) for _ in range(64)), True
    return request_bytes("POST", path, body, headers=[b"Content-Type: application/x-www-form-urlencoded",
                                                      b"Expect: 100-continue"]), False


def wrong_method(rng):
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "CONNECT"])
    path = rng.choice(POST_ROUTES + ["/health", "/v1/models", "/metrics", "/", "/v1", "/v1/chat", "/generate/",
                                     "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/" + "a" * 5000,
                                     "/generate?x=1&prompt=2", "/health?" + "&" * 1000, "//generate", "/GENERATE"])
    method = "POST" if path not in POST_ROUTES and rng.random() < 0.5 else method
    return request_bytes(method, path, json_text(valid_body(rng, "/generate")).encode()), False


def unknown_fields(rng):
    path = rng.choice(POST_ROUTES)
    body = valid_body(rng, path)
    for i in range(rng.randint(1, 50)):
        body[f"field_{rng.randrange(10**6)}_{i}"] = rng.choice(ODD_VALUES)
    body.update(rng.choice([{}, {"user": "x"}, {"presence_penalty": 0.5}, {"metadata": {"a": "b"}}, {"store": True}]))
    return request_bytes("POST", path, json_text(body).encode()), False


def truncated(rng):
    path = rng.choice(POST_ROUTES)
    body = json_text(valid_body(rng, path) | {"stop": ["。"]}).encode()
    cut = body[:rng.randrange(len(body))]
    if rng.random() < 0.5:  # a complete request whose JSON stops short
        return request_bytes("POST", path, cut), False
    return request_bytes("POST", path, cut, length=len(body)), True  # the body never finishes


def bad_auth(rng):
    path = rng.choice(POST_ROUTES + ["/v1/models"])
    auth = rng.choice([None, "", "Bearer", "Bearer ", "bearer fuzz-key", "Bearer fuzz-key ", "Bearer fuzz-kez",
                       "Basic Zm9vOmJhcg==", "Bearer " + "k" * 10_000, b"Bearer \xff\xfe", "Bearer fuzz-key\x00",
                       "Bearer 密钥"])
    return request_bytes(rng.choice(["POST", "GET"]), path, json_text(valid_body(rng, path)).encode(), auth=auth), \
        False


def odd_body(rng):
    path = rng.choice(POST_ROUTES)
    body = rng.choice([b"", b"null", b"[]", b'"str"', b"1", b"true", b"{", b"}", b"{}", b"\xef\xbb\xbf{}",
                       '{"prompt": "长江"}'.encode("utf-16"), b'{"prompt": "a"}' * 2, b"\x00" * 100,
                       b'{"prompt": "a",}', b"{'prompt': 'a'}", b'{"prompt": "\\x41"}', b'{"prompt": "a"} x',
                       b'{"messages": [' + b'{"role": "user", "content": "a"},' * 5000 + b'{"role": "user"}]}',
                       b'{"stop": [' + b'"a",' * 20000 + b'"a"], "prompt": "a"}',
                       b'{"prompt": "a", "prompt": 5}'])
    return request_bytes("POST", path, body), False


def keyless_options(rng):
    """OPTIONS without the key (or with a wrong one), CORS preflight or not: 401 everywhere (issue 22 F7)."""
    path = rng.choice(POST_ROUTES + ["/v1/models", "/metrics", "/nowhere", "/v1"])
    headers = rng.choice([[], [b"Origin: http://evil.test", b"Access-Control-Request-Method: POST"],
                          [b"Access-Control-Request-Method: GET"]])
    auth = rng.choice([None, "", "Bearer fuzz-kez", "Basic fuzz-key", "fuzz-key"])
    return request_bytes("OPTIONS", path, b"", headers=headers, auth=auth), False


def hang_up(rng):
    """A valid generation whose client closes the socket without reading the answer (issue 22 F1)."""
    path = rng.choice(POST_ROUTES[:3])
    body = valid_body(rng, path) | {"stream": rng.random() < 0.5, "ignore_eos": True, "n": rng.choice([1, 2])}
    if path == "/generate":
        body.pop("n")
    return request_bytes("POST", path, json_text(body).encode()), HANG_UP


HANG_UP = "hang up"  # may_drop: the client leaves at once, so there is no answer to read
BUILDERS = [deep_json, surrogate, bad_type, extreme_number, odd_string, bad_header, wrong_method, unknown_fields,
            truncated, bad_auth, odd_body, keyless_options, hang_up]


def exchange(port, raw, half_close=False):
    """Send raw bytes, read until the server closes; (status or None, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        try:
            s.sendall(raw)
            if half_close == HANG_UP:
                return None, b""
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close early on a request it refuses (e.g. a huge header)
            pass
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    while data.startswith(b"HTTP/1.1 100 "):  # "Expect: 100-continue" gets an interim answer first
        data = data.split(b"\r\n\r\n", 1)[1]
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None
    return status, data


def wait_idle(batcher, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while batcher.active or batcher.waiting.qsize():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def legit_answer(port, path, body):
    status, data = exchange(port, request_bytes("POST", path, json_text(body).encode()))
    assert status == 200, data[:300]
    reply = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return reply["text"] if path == "/generate" else (
        reply["choices"][0]["message"]["content"] if "chat" in path else reply["choices"][0]["text"])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_tokenizer):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fuzz")
    run_dir = make_run(folder / "tiny-fuzz", tiny_tokenizer)
    (folder / "wiki").mkdir()  # an index, so that rag and extractive requests reach generation
    (folder / "wiki" / "a.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in WIKI_ARTICLES),
                                             encoding="utf-8")
    build_index([folder / "wiki"], folder / "index", quiet=True)
    index = Index(folder / "index")
    app = create_app(load_run(run_dir), api_key=KEY, max_batch=8, queue=64, max_new_tokens_cap=CAP, gather_ms=10,
                     index=index)
    server = make_server(app, "127.0.0.1", 0, clients=16)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield server.effective_port, app.extensions["batcher"], run_dir
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        app.extensions["batcher"].close()
        index.close()
        torch.set_num_threads(torch_threads)


def test_hostile_requests_get_4xx_and_harm_no_one(fuzz_server):
    port, batcher, run_dir = fuzz_server
    rng = random.Random(20261130)
    cases = [(builder.__name__, *builder(rng)) for builder in (BUILDERS[i % len(BUILDERS)] for i in range(CASES))]
    before = [legit_answer(port, path, body) for path, body in LEGIT]
    deadline = time.monotonic() + DEADLINE_S
    problems, statuses, legit_rounds = [], {}, [0]
    fuzz_done = threading.Event()

    def hostile(case):
        name, raw, may_drop = case
        if time.monotonic() > deadline:
            return
        status, data = exchange(port, raw, half_close=may_drop)
        statuses[status] = statuses.get(status, 0) + 1
        leaked = [s for s in (b"Traceback", b'File "', str(ROOT).encode(), str(run_dir).encode(),
                              b"site-packages") if s in data]
        if (status is None and not may_drop) or (status is not None and status >= 500) or leaked:
            problems.append((name, status, leaked, raw[:120], data[:300]))
        if name == "keyless_options" and (status != 401 or b"Allow:" in data):  # no route list without the key
            problems.append((name, status, raw[:120], data[:300]))

    def legit():
        while not fuzz_done.is_set() and time.monotonic() < deadline and legit_rounds[0] < 500:
            try:
                got = [legit_answer(port, path, body) for path, body in LEGIT]
            except Exception as e:  # an error here must fail the test, not just end this thread
                problems.append(("legit", repr(e)))
                return
            if got != before:
                problems.append(("legit", got, before))
            legit_rounds[0] += 1

    legit_thread = threading.Thread(target=legit)
    legit_thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(hostile, cases))
    finally:
        fuzz_done.set()
        legit_thread.join(timeout=SOCKET_TIMEOUT_S * 4)
    assert time.monotonic() < deadline, f"the fuzz ran past {DEADLINE_S} s: the server is far too slow"
    assert not problems, problems[:5]
    assert sum(statuses.values()) == CASES and legit_rounds[0] >= 1
    assert statuses.get(200, 0) > 100 and statuses.get(400, 0) > 400, statuses  # it reached both paths
    assert batcher.stats["failed"] == 0, "no generation may fail"
    assert wait_idle(batcher), "rows of clients that hung up are still generating"
    assert [legit_answer(port, path, body) for path, body in LEGIT] == before
