"""server.py over real HTTP on 127.0.0.1: streaming, batching without cross-talk, the OpenAI client,
back-pressure (503), disconnects, bad input, auth and CORS.

Each server is the real waitress server on port 0 in a thread, serving a tiny random model; the
expected texts come from `Run.complete` on a second copy of the same run (greedy, so they must
match exactly). Torch runs single-threaded here: the model is tiny, and on a shared 2-core machine
two spinning torch threads make it ~10x slower.
"""
import http.client
import json
import threading
import time
from contextlib import contextmanager

import pytest
import requests
import torch

from inference import load_run
from conftest import make_run
from server import StopCutter, create_app, make_server

LONG = 20000  # a generation that would take far longer than any test waits


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer):
    return make_run(tmp_path_factory.mktemp("server") / "tiny-sft", tiny_tokenizer)


@pytest.fixture(scope="module")
def reference(run_dir):
    """A second copy of the model for expected outputs (the server's worker owns its own copy)."""
    return load_run(run_dir)


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


def wait_until(condition, timeout=5.0):
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
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": 1}, "stream_options"),
    ("/v1/completions", {"prompt": ["a"]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
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
