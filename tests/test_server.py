"""server.py over real HTTP on 127.0.0.1: streaming, batching without cross-talk, the OpenAI client,
back-pressure (503), disconnects, bad input (deep JSON, lone surrogates, extreme numbers, unsupported
OpenAI fields), one failing row in a batch, slow clients, auth and CORS; and the request logic
(parsing, OpenAI formatting, SSE framing) called directly, without HTTP.

Each server is the real waitress server on port 0 in a thread, serving a tiny random model; the
expected texts come from `Run.complete` on a second copy of the same run (greedy, so they must
match exactly). Torch runs single-threaded here: the model is tiny, and on a shared 2-core machine
two spinning torch threads make it ~10x slower.
"""
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import requests

from extractive import Spans
from inference import load_run
from openai_api import CHAT, COMPLETIONS, OpenAIReply, StopCutter, parse_openai, sse
from request_fields import ApiError, Limits
from server import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    Batcher,
    Job,
    create_app,
    error_response,
    json_brackets,
    json_depth,
    make_server,
    parse_generate,
    parse_json_body,
    resumable,
)

LONG = 20000  # a generation that would take far longer than any test waits


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@contextmanager
def serving(run_dir, **options):
    app = create_app(load_run(run_dir), **options)
    server = make_server(app, "127.0.0.1", 0, clients=16)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", server.effective_port
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        app.extensions["batcher"].close()


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir, max_batch=8, queue=16, max_new_tokens_cap=LONG, gather_ms=30) as (url, _):
        yield url


def health(url):
    return requests.get(f"{url}/health", timeout=5).json()["queue"]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def open_stream(port, body):
    """A raw HTTP/1.1 streaming request, so the test controls exactly when the socket closes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_health_and_models_describe_the_model(server, reference):
    h = requests.get(f"{server}/health").json()
    assert h["status"] == "ok"
    for key in ("params", "tokenizer", "block_size", "iter"):
        assert h["model"][key] == reference.info[key]
    assert h["model"]["name"] == "tiny-sft"
    assert {"waiting", "active", "cancelled", "max_batch"} <= set(h["queue"])
    assert "checkpoint" not in h["model"] and "best.pt" not in json.dumps(h)  # no file paths leak
    models = requests.get(f"{server}/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "tiny-sft" and card["object"] == "model" and card["block_size"] == 64


def test_generate_streams_chunks_before_the_generation_ends(server):
    started = time.monotonic()
    with requests.post(f"{server}/generate", json={"prompt": "北京是", "max_new_tokens": 800, "temperature": 0,
                                                  "ignore_eos": True}, stream=True, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["Transfer-Encoding"] == "chunked"
        chunks = r.iter_content(chunk_size=None, decode_unicode=False)
        first = next(chunks)
        first_at = time.monotonic() - started
        still_generating = health(server)["active"] == 1
        pieces = list(chunks)
        rest = b"".join(pieces)
        done_at = time.monotonic() - started
    assert first and rest
    for chunk in [first, *pieces]:
        chunk.decode("utf-8")  # strict: a character is never split across chunks
    assert still_generating, "the first chunk should arrive while the server is still generating"
    assert first_at < done_at / 2


def test_qa_mode_returns_only_the_answer(server, reference):
    question = "长江是中国第几长河？"
    expected = reference.complete(question, "qa", max_new_tokens=24, temperature=0)
    body = {"prompt": question, "mode": "qa", "max_new_tokens": 24, "temperature": 0}
    whole = requests.post(f"{server}/generate", json=body | {"stream": False}).json()
    streamed = requests.post(f"{server}/generate", json=body).content.decode("utf-8")
    assert whole["text"] == streamed == expected
    assert not whole["text"].startswith(question)
    assert 1 <= whole["tokens"] <= 24 and whole["seconds"] >= 0 and whole["finish_reason"] in ("stop", "length")


def test_generate_chat_takes_a_whole_conversation(server, reference):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "长江在哪里？"}]
    expected = reference.complete(messages, "chat", system="简短", max_new_tokens=20, temperature=0)
    body = {"messages": messages, "mode": "chat", "system": "简短", "max_new_tokens": 20, "temperature": 0}
    assert requests.post(f"{server}/generate", json=body).content.decode("utf-8") == expected
    bad = requests.post(f"{server}/generate", json=body | {"messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "messages[0].role"


def test_concurrent_greedy_streams_do_not_cross(server, reference):
    jobs = [(f"{city}是", "text") for city in ("北京", "上海", "长江", "黄河", "故宫", "Python")]
    jobs += [("故宫在哪里？", "qa"), ("你好", "chat")]  # modes with other stop tokens share the batch
    expected = [reference.complete(p, m, max_new_tokens=30, temperature=0) for p, m in jobs]
    got = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def client(i):
        prompt, mode = jobs[i]
        barrier.wait()
        got[i] = requests.post(f"{server}/generate", json={"prompt": prompt, "mode": mode, "max_new_tokens": 30,
                                                           "temperature": 0}, timeout=60).content.decode("utf-8")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert health(server)["largest_batch"] >= 2, "the concurrent requests should have shared a batch"


def test_openai_client_chat_completions(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "北京是哪里？"},
                {"role": "assistant", "content": "中国的首都。"}, {"role": "user", "content": "上海呢？"}]
    expected = reference.complete(messages, "chat", max_new_tokens=20, temperature=0)
    reply = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(reference.prompt_ids(messages, "chat"))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_openai_client_completions(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    expected = reference.complete("黄河是", "text", max_new_tokens=16, temperature=0)
    reply = client.completions.create(model="tiny-sft", prompt="黄河是", max_tokens=16, temperature=0)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(reference.tok.encode("黄河是"))
    streamed = list(client.completions.create(model="tiny-sft", prompt="黄河是", max_tokens=16, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_output(server, reference):
    full = reference.complete("上海是", "text", max_new_tokens=30, temperature=0)
    stop = full[4:6]
    assert stop, "the reference output is long enough to pick a stop string from"
    body = {"prompt": "上海是", "max_tokens": 30, "temperature": 0, "stop": [stop]}
    reply = requests.post(f"{server}/v1/completions", json=body).json()
    assert reply["choices"][0]["text"] == full[:full.find(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_stop_cutter_holds_back_a_possible_stop_string_across_pieces():
    cutter = StopCutter(["<|end|>"])
    out = [cutter.push(p) for p in ["ab", "c<", "|e", "nd|>tail"]]
    assert out == ["ab", "c", "", ""] and cutter.hit
    cutter = StopCutter(["##"])
    assert cutter.push("a#") == "a" and cutter.push("b") == "#b" and cutter.flush() == ""


def test_a_client_that_disconnects_stops_its_generation(server):
    # an earlier test's request cut short by a stop string is dropped (and counted) asynchronously
    assert wait_until(lambda: health(server)["active"] == 0)
    before = health(server)
    conn, response = open_stream(int(server.rsplit(":", 1)[1]), {"prompt": "故宫", "max_new_tokens": LONG,
                                                                "temperature": 0, "ignore_eos": True})
    assert response.read1(64)
    assert health(server)["active"] == 1
    response.close()  # drops the socket: the client is gone
    conn.close()
    assert wait_until(lambda: health(server)["active"] == 0, timeout=3), "the row should be dropped promptly"
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < LONG


def test_a_full_queue_answers_503_with_retry_after(run_dir):
    with serving(run_dir, max_batch=1, queue=1, max_new_tokens_cap=LONG) as (url, port):
        conn, busy = open_stream(port, {"prompt": "长江", "max_new_tokens": LONG, "temperature": 0,
                                        "ignore_eos": True})
        assert busy.read1(64)  # the worker is now busy with this request
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=requests.post(
            f"{url}/generate", json={"prompt": "黄河", "max_new_tokens": 3, "stream": False}, timeout=30)))
        waiter.start()
        assert wait_until(lambda: health(url)["waiting"] == 1)
        refused = requests.post(f"{url}/generate", json={"prompt": "上海", "max_new_tokens": 3})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "server_busy"
        busy.close()  # hanging up frees the worker
        conn.close()  # so the queued request runs
        waiter.join(timeout=30)
        assert queued["r"].status_code == 200 and queued["r"].json()["tokens"] >= 1
        assert health(url)["rejected"] == 1


NUMBERS = " ".join(str(i) for i in range(100))  # under the character limit, over the 63-token limit
BAD_INPUTS = [
    ("/generate", b"{", None),
    ("/generate", b"[1, 2]", None),
    ("/generate", b"{}", "prompt"),
    ("/generate", {"prompt": 5}, "prompt"),
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": "长" * 10000}, "prompt"),
    ("/generate", {"prompt": NUMBERS}, "prompt"),
    ("/generate", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/generate", {"prompt": "a", "temperature": -0.5}, "temperature"),
    ("/generate", b'{"prompt": "a", "temperature": NaN}', "temperature"),
    ("/generate", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/generate", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("/generate", {"prompt": "a", "top_k": -1}, "top_k"),
    ("/generate", {"prompt": "a", "top_k": 2.5}, "top_k"),
    ("/generate", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ("/generate", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"prompt": "a", "max_new_tokens": LONG + 1}, "max_new_tokens"),
    ("/generate", {"prompt": "a", "max_new_tokens": True}, "max_new_tokens"),
    ("/generate", {"prompt": "a", "mode": "poem"}, "mode"),
    ("/generate", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/generate", {"prompt": "a", "seed": -1}, "seed"),
    ("/generate", {"prompt": "a", "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 5}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": 1}, "stream_options"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 33}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "长" * 600]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1], [10**6]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [1] * 65}, "prompt"),  # longer than the window
    ("/v1/completions", {"prompt": [1] * 64}, "prompt"),  # no room for a new token
    ("/v1/completions", {"prompt": ["a"] * 17, "n": 4}, "n"),  # 68 choices
    ("/v1/completions", {"prompt": "a", "max_tokens": 0, "echo": False}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "echo": True, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5},
     "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": "high"}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -2.01}, "frequency_penalty"),
    ("/v1/completions", {"prompt": ["a", "b"], "rag": True}, "prompt"),
    ("/v1/completions", {"prompt": "a", "rag": True, "echo": True}, "echo"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    # ranges: values that passed validation and then crashed generation, or mean nothing
    ("/generate", {"prompt": "a", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("/generate", {"prompt": "a", "repetition_penalty": 0.4}, "repetition_penalty"),
    ("/generate", {"prompt": "a", "repetition_penalty": 2.5}, "repetition_penalty"),
    ("/generate", {"prompt": "a", "temperature": 1e300}, "temperature"),
    ("/generate", {"prompt": "a", "temperature": 11}, "temperature"),
    ("/generate", {"prompt": "a", "seed": 2**63}, "seed"),
    ("/generate", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/generate", {"prompt": "a", "stop": "x" * 201}, "stop"),
    ("/generate", {"prompt": "a", "system": "x" * 600}, "system"),
    ("/generate", b'{"prompt": "a", "top_k": ' + b"9" * 5000 + b"}", None),  # Python's int digit limit
    ("/generate", b"\xff\xfe{}", None),  # not UTF-8
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 6},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "rag": True}, "rag"),  # no index
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "rag": {"k": 11}}, "rag"),
    ("/generate", {"prompt": "a", "mode": "rag"}, "mode"),  # this server has no index
    ("/generate", {"prompt": "a", "mode": "rag", "rag_k": 0}, "rag_k"),
    ("/generate", {"prompt": "a", "mode": "qa", "extractive": True}, "extractive"),  # nothing to copy from
    ("/generate", {"prompt": "a", "mode": "rag", "extractive": 1}, "extractive"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "rag": {"extractive": "yes"}}, "rag"),
    ("/tokenize", {"text": 5}, "text"),
    ("/tokenize", {"text": "长" * 100_001}, "text"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/detokenize", {"tokens": [1.0]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [1] * 100_001}, "tokens"),
    # unsupported OpenAI fields are refused, not silently ignored
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 100}},
     "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "a", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
]


@pytest.mark.parametrize("path,body,field", BAD_INPUTS, ids=[f"{p}:{f}:{i}" for i, (p, _, f) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_400_naming_the_field(server, path, body, field):
    data = body if isinstance(body, bytes) else json.dumps(body)
    r = requests.post(f"{server}{path}", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error.get("field") == field


def test_http_errors_are_json_without_tracebacks(server):
    too_big = requests.post(f"{server}/generate", data=b"x" * (MAX := 2 << 20))
    assert too_big.status_code == 413 and too_big.json()["error"]["message"] and len(too_big.content) < MAX
    missing = requests.get(f"{server}/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong_method = requests.get(f"{server}/generate")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "method_not_allowed"
    assert "Traceback" not in too_big.text + missing.text + wrong_method.text


def test_api_key_and_cors(run_dir):
    with serving(run_dir, api_key="s3cret", cors=True) as (url, _):
        assert requests.get(f"{url}/v1/models").status_code == 401
        wrong = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert requests.post(f"{url}/generate", json={"prompt": "a", "max_new_tokens": 2}).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{url}/v1/models", headers=key).status_code == 200
        ok = requests.post(f"{url}/generate", json={"prompt": "a", "max_new_tokens": 2, "stream": False}, headers=key)
        assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "*"
        open_health = requests.get(f"{url}/health")
        assert open_health.status_code == 200 and "s3cret" not in open_health.text
        preflight = requests.options(f"{url}/v1/chat/completions", headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_no_cors_headers_unless_asked(server):
    assert "Access-Control-Allow-Origin" not in requests.get(f"{server}/health").headers


# ----------------------------------------------------------------------------- hostile input (issue 10.6)

ROUTES = [("/generate", {"prompt": "a", "max_new_tokens": 2}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}),
          ("/v1/completions", {"prompt": "a", "max_tokens": 2})]


def post(url, path, data):
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize("path", [p for p, _ in ROUTES])
def test_deeply_nested_json_is_a_400_on_every_route(server, path):
    for deep in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 2000 + b"1" + b"}" * 2000):
        r = post(server, path, b'{"prompt": ' + deep + b', "messages": 1}')
        assert r.status_code == 400, r.text
        assert f"{MAX_JSON_DEPTH} levels" in r.json()["error"]["message"]
    unclosed = post(server, path, b"[" * 100_000)  # not even valid JSON: still no recursion
    assert unclosed.status_code == 400


def test_json_brackets_and_depth_count_only_brackets_outside_strings():
    assert json_brackets(b'{"a": [1, {"b": []}]}') == b"{[{[]}]}" and json_depth(b"{[{[]}]}") == 4
    tricky = json.dumps({"a": "[[[[{{{{", "b": '\\"[[[', "c": ["]]]]", "长[江"]}, ensure_ascii=False).encode()
    assert json_brackets(tricky) == b"{[]}"
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(json_brackets(at_limit.encode())) == MAX_JSON_DEPTH
    with pytest.raises(ApiError, match="levels deep"):
        parse_json_body(b'{"a": ' + ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode() + b"}")
    assert parse_json_body(b'{"a": ' + ("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)).encode() + b"}")
    many = json.dumps({"a": [[]] * MAX_JSON_CONTAINERS}).encode()  # one container too many: 400 before parsing
    with pytest.raises(ApiError, match="arrays and objects"):
        parse_json_body(many)
    assert parse_json_body(json.dumps({"a": [[]] * (MAX_JSON_CONTAINERS - 2)}).encode())


SURROGATE_BODIES = [
    ("/generate", {"prompt": "x", "temperature": "\ud800"}, "temperature"),
    ("/generate", {"prompt": "x", "top_k": "\udfff"}, "top_k"),
    ("/generate", {"prompt": "x", "stream": "\ud800"}, "stream"),
    ("/generate", {"prompt": "x\ud800y"}, "prompt"),
    ("/generate", {"prompt": "x", "stop": ["ok", "\ud800"]}, "stop[1]"),
    ("/generate", {"prompt": "x", "system": "\udc00"}, "system"),
    ("/generate", {"prompt": "x", "mode": "chat", "messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content"),
    ("/generate", {"prompt": "x", "\ud800": 1}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": "\ud800"}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "\ud800", "content": "a"}]}, "messages[0].role"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
]


@pytest.mark.parametrize("path,body,field", SURROGATE_BODIES,
                         ids=[f"{p}:{f}:{i}" for i, (p, _, f) in enumerate(SURROGATE_BODIES)])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, field):
    r = post(server, path, json.dumps(body))  # ensure_ascii: the surrogate travels as a \\ud800 escape
    assert r.status_code == 400, r.text
    r.content.decode("utf-8")  # strict: the error itself is valid UTF-8
    assert r.json()["error"].get("field") == field and "surrogate" in r.json()["error"]["message"]


def test_lone_surrogates_are_found_wherever_they_hide():
    for raw, field in ((b'{"a": {"b": [1, "\\ud800"]}}', "a.b[1]"), (b'{"a": {"\\udfff": 1}}', "a"),
                       (b'{"m": [{"\\ud800": 1}]}', "m[0]"), (b'{"\\ud800": 1}', None), (b'{"a": "\\udbff"}', "a")):
        with pytest.raises(ApiError) as e:
            parse_json_body(raw)
        assert e.value.field == field and "surrogate" in e.value.message
    assert parse_json_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "😀"}  # a pair is a character


def test_error_messages_never_echo_unencodable_text():
    # the checks above catch surrogates first; these are the layers behind them
    response = error_response(400, "bad \ud800 value", "f\udfff")
    assert json.loads(response.get_data().decode("utf-8"))["error"]["type"] == "invalid_request_error"
    limits = Limits(block_size=64, vocab_size=400, max_new_tokens_cap=100)
    with pytest.raises(ApiError) as e:
        parse_generate({"prompt": "x", "temperature": "\ud800"}, limits)
    e.value.message.encode("utf-8")  # strict


EXTREME = [{"repetition_penalty": 1e-300}, {"top_p": 1e-300}, {"top_p": 1e-46}, {"top_k": 2**63},
           {"top_k": 2**64 + 5}]


@pytest.mark.parametrize("extreme", EXTREME, ids=[next(iter(e)) + str(i) for i, e in enumerate(EXTREME)])
def test_extreme_numbers_are_a_400_or_a_normal_answer(server, extreme):
    body = {"prompt": "长江", "max_new_tokens": 4, "temperature": 0.8, "seed": 1} | extreme
    whole = post(server, "/generate", json.dumps(body | {"stream": False}))
    streamed = post(server, "/generate", json.dumps(body | {"stream": True}))
    if whole.status_code == 400:  # out of range: refused up front, naming the field
        assert whole.json()["error"]["field"] == next(iter(extreme)) and streamed.status_code == 400
    else:  # in range: it generates
        assert whole.status_code == 200 and whole.json()["tokens"] >= 1, whole.text
        assert streamed.status_code == 200 and whole.json()["finish_reason"] in ("stop", "length")


def test_tiny_top_p_keeps_only_the_most_likely_token(server, reference):
    expected = reference.complete("黄河", "text", max_new_tokens=12, temperature=0)
    for top_p in (1e-300, 1e-46, 1e-9):
        got = post(server, "/generate", json.dumps({"prompt": "黄河", "max_new_tokens": 12, "temperature": 1.0,
                                                    "top_p": top_p, "stream": False}))
        assert got.json()["text"] == expected


def test_one_extreme_request_does_not_fail_its_batch_mates(server, reference):
    prompts = [f"{city}是" for city in ("北京", "上海", "长江", "黄河", "故宫", "Python", "中国", "首都")]
    expected = [reference.complete(p, "text", max_new_tokens=12, temperature=0) for p in prompts]
    bodies = [{"prompt": p, "max_new_tokens": 12, "temperature": 0, "stream": False} for p in prompts]
    bodies.append({"prompt": "长江", "max_new_tokens": 12, "temperature": 0.9, "top_k": 2**63, "stream": False})
    got = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        barrier.wait()
        got[i] = post(server, "/generate", json.dumps(bodies[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [g.status_code for g in got] == [200] * len(bodies), [g.text for g in got]
    assert [g.json()["text"] for g in got[:-1]] == expected


def test_a_row_that_fails_in_generate_ends_alone(run_dir, reference):
    """The static worker (`--scheduler static`): a row that makes `generate` raise (here: settings no
    route lets through) ends with "error"; its batch mates resume and finish with exactly the text
    they would have had alone. (The continuous worker's counterpart is in test_server_engine.py.)"""
    prompts = [f"{city}是" for city in ("北京", "上海", "长江", "黄河", "故宫", "Python", "中国", "首都")]
    expected = [reference.complete(p, "text", max_new_tokens=10, temperature=0) for p in prompts]
    greedy = {"temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}
    jobs = [Job(reference.tok.encode(p), 10, greedy, reference.tok.stop_ids("text"), None) for p in prompts]
    bad = [Job(reference.tok.encode("长江"), 10, greedy | settings, (), None)
           for settings in ({"temperature": float("nan")}, {"temperature": 0.8, "repetition_penalty": 1e-300})]
    batcher = Batcher(load_run(run_dir), max_batch=16, queue_size=16, gather_ms=300)
    try:
        for job in jobs[:4] + bad[:1] + jobs[4:] + bad[1:]:
            batcher.submit(job)
        texts = ["".join(job.pieces((), lambda: False)) for job in jobs + bad]
    finally:
        batcher.close()
    assert batcher.stats["largest_batch"] == len(jobs) + len(bad), "they should have shared one batch"
    assert texts[:len(jobs)] == expected
    assert [job.reason for job in bad] == ["error", "error"] and texts[len(jobs):] == ["", ""]
    assert all(job.reason in ("stop", "length") for job in jobs) and batcher.stats["failed"] == 2


def test_openai_routes_accept_the_off_values_of_unsupported_fields(server):
    messages = [{"role": "user", "content": "你好"}]
    for extra in ({"n": 1}, {"logprobs": False}, {"logprobs": None}, {"tools": []}, {"logit_bias": {}},
                  {"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"top_logprobs": 0}):
        r = post(server, "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 2} | extra))
        assert r.status_code == 200, (extra, r.text)
    for extra in ({"echo": False}, {"suffix": None}, {"best_of": 1}, {"logprobs": None}):
        r = post(server, "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2} | extra))
        assert r.status_code == 200, (extra, r.text)


def test_slow_clients_do_not_lock_out_others(run_dir):
    """150 connections that dribble header lines (waitress's default limit was 100 connections):
    /health and a real generation must still be answered while they hang on."""
    with serving(run_dir) as (url, port):
        slow, stop = [], threading.Event()
        try:
            for _ in range(150):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)

            def dribble():
                for i in range(100):  # bounded: at most ~20 s
                    if stop.wait(0.2):
                        return
                    for s in slow:
                        try:
                            s.sendall(f"X-Slow-{i}: 1\r\n".encode())
                        except OSError:
                            pass

            threading.Thread(target=dribble, daemon=True).start()
            time.sleep(0.5)
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
            r = requests.post(f"{url}/generate", json={"prompt": "北京", "max_new_tokens": 5, "stream": False},
                              timeout=10)
            assert r.status_code == 200 and r.json()["tokens"] >= 1
        finally:
            stop.set()
            for s in slow:
                s.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(run_dir):
    app = create_app(load_run(run_dir))
    server = make_server(app, "127.0.0.1", 0, clients=2, idle_timeout_s=1)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as silent:
            silent.sendall(b"GET /health HTTP/1.1\r\n")  # and then nothing more
            started = time.monotonic()
            assert silent.recv(1024) == b"", "the server should close the connection"
            assert time.monotonic() - started < 5
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        app.extensions["batcher"].close()


# ----------------------------------------------------------------------------- request logic without HTTP

LIMITS = Limits(block_size=64, vocab_size=400, max_new_tokens_cap=100)


def test_parse_generate_gives_a_typed_request_with_off_values_normalised():
    req = parse_generate({"prompt": "长江", "top_k": 2**63, "top_p": 1e-300, "stop": "。", "seed": 3}, LIMITS)
    assert (req.prompt, req.mode, req.stream, req.stops, req.seed) == ("长江", "text", True, ("。",), 3)
    assert req.sampling == {"temperature": 0.8, "top_k": None, "top_p": 1e-6, "repetition_penalty": 1.0}
    assert req.max_new_tokens == 100  # the default, capped
    chat = parse_generate({"mode": "chat", "messages": [{"role": "user", "content": "你好"}], "system": "s"}, LIMITS)
    assert chat.prompt == [{"role": "user", "content": "你好"}] and chat.system == "s"
    with pytest.raises(ApiError) as e:
        parse_generate({"prompt": "a", "repetition_penalty": 1e-300}, LIMITS)
    assert e.value.status == 400 and e.value.field == "repetition_penalty"


def test_parse_openai_reads_each_api_and_refuses_unsupported_fields():
    chat = parse_openai({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7,
                         "stream": True, "stream_options": {"include_usage": True}}, CHAT, LIMITS)
    assert (chat.mode, chat.max_new_tokens, chat.stream, chat.include_usage) == ("chat", 7, True, True)
    text = parse_openai({"prompt": "hi", "max_tokens": 5}, COMPLETIONS, LIMITS)
    assert (text.mode, text.prompt, text.prompt_field, text.stream) == ("text", ("hi",), "prompt", False)
    for field, value in (("logprobs", True), ("tools", [{}]), ("echo", 1), ("n", 5)):
        with pytest.raises(ApiError) as e:
            parse_openai({"prompt": "hi", field: value}, COMPLETIONS, LIMITS)
        assert e.value.field == field
    # once refused, now served: n, logprobs (completions: a count; chat: a flag + top_logprobs), rag
    text = parse_openai({"prompt": "hi", "n": 4, "logprobs": 0}, COMPLETIONS, LIMITS)
    assert (text.n, text.logprobs) == (4, 0)
    chat = parse_openai({"messages": [{"role": "user", "content": "长江？"}], "logprobs": True, "top_logprobs": 5,
                         "rag": {"k": 2}}, CHAT, LIMITS)
    assert (chat.logprobs, chat.rag_k, chat.prompt, chat.mode, chat.extractive) == (5, 2, "长江？", "qa", False)
    question = [{"role": "user", "content": "长江？"}]
    chat = parse_openai({"messages": question, "rag": {"extractive": True}}, CHAT, LIMITS)
    assert (chat.rag_k, chat.extractive) == (3, True)
    assert parse_openai({"messages": [{"role": "user", "content": "x"}]}, CHAT, LIMITS).logprobs is None


def finished_job(ids, text_tokens, reason):
    job = Job(ids, 10, {}, (), None)
    job.tokens, job.finish_reason = text_tokens, reason
    return job


def test_which_requests_resume_after_a_failed_step():
    def job(sent, span=None):
        j = Job([1, 2], 10, {}, (0,), None, span=span)
        j.generated = [5] * sent
        return j

    span = Spans(["x"], [[1, 2, 3]], 0)
    assert resumable([job(0)]) and resumable([job(3)])  # a plain row goes on from what it sent
    assert resumable([job(0, span)]) and not resumable([job(2, span)])  # a span is followed from the start
    assert resumable([job(0), job(0)]) and not resumable([job(1), job(0)])  # n > 1 rows' texts differ


def test_openai_reply_shapes_chat_and_completions():
    job = finished_job([1, 2, 3], 2, "length")
    chat = OpenAIReply(CHAT, "m", [job]).whole(["你好"])
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-") and chat["model"] == "m"
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "你好"}, "logprobs": None,
                                "finish_reason": "length"}]
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = OpenAIReply(COMPLETIONS, "m", [job]).whole(["abc"])
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert text["choices"] == [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}]


def test_openai_stream_events_and_sse_framing():
    job = finished_job([1], 2, "stop")
    events = list(OpenAIReply(CHAT, "m", [job], include_usage=True).events([iter(["你", "好"])]))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "你"}, {"content": "好"}, {}]
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["usage"] is None
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    text_events = list(OpenAIReply(COMPLETIONS, "m", [job]).events([iter(["ab"])]))
    assert [e["choices"][0]["text"] for e in text_events] == ["ab", ""] and "usage" not in text_events[0]
    failed = list(OpenAIReply(COMPLETIONS, "m", [finished_job([1], 0, "error")]).events([iter([])]))
    assert failed == [{"error": {"message": "generation failed", "type": "server_error"}}]
    framed = list(sse(iter([{"a": "长"}, {"b": 1}])))
    assert framed == ['data: {"a": "长"}\n\n', 'data: {"b": 1}\n\n', "data: [DONE]\n\n"]
