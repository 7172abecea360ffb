"""server.py under the faults of issue 22, over real HTTP on 127.0.0.1: clients that hang up (F1),
`n` above `--max_batch` (F2), and the API key on every route, OPTIONS included (F7).

Each server is the real waitress server from `make_server` on port 0 serving a tiny random model.
Disconnects are real: a raw socket sends its request and is closed. Whether generation stopped is
read from the server's own counters (/metrics: tokens generated, rows running, streams
cancelled), never inferred from timing alone: a request asks for LONG tokens, far more than the
model makes in any wait here, so "cancelled, with fewer than LONG tokens made, and no token made
since" holds only when the server really stopped.
"""
import json
import socket
import threading
import time

import pytest
import requests
from test_server import LONG, serving, wait_until

from inference import load_run
from server import create_app, make_server

KEY = "s3cret"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def metrics(url, headers=None):
    """The server's Prometheus samples without labels: {name: value}."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def send_raw(port, path, body, headers=""):
    """A request sent over a raw socket that the test closes when it likes (a real hang-up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


TOKENS, RUNNING, CANCELLED = "minigpt_generated_tokens_total", "minigpt_running_rows", "minigpt_cancelled_streams_total"


def assert_abandoned_request_stops(url, sock, before, rows=1):
    """Close `sock` once its request generates; then the server must cancel it (its `rows`
    streams), free its rows and make no more tokens, long before LONG tokens."""
    assert wait_until(lambda: metrics(url)[RUNNING] == rows and metrics(url)[TOKENS] > before[TOKENS])
    sock.close()
    assert wait_until(lambda: metrics(url)[CANCELLED] == before[CANCELLED] + rows), \
        "the abandoned request was never cancelled (it generates for nobody)"
    assert wait_until(lambda: metrics(url)[RUNNING] == 0)
    stopped = metrics(url)[TOKENS]
    time.sleep(0.3)
    after = metrics(url)
    assert after[TOKENS] == stopped, "tokens were still generated after the cancel"
    assert stopped - before[TOKENS] < LONG


# ----------------------------------------------------------------------------- F1: hang-ups

@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir, max_batch=4, queue=8, max_new_tokens_cap=LONG) as (url, port):
        yield url, port


def test_a_row_is_dropped_within_one_step_of_waitress_noticing_the_hang_up(run_dir):
    """Watched from inside: once the request's client_disconnected turns true, the worker runs at
    most one more engine step (the one under way) before the row leaves the engine."""
    app = create_app(load_run(run_dir), max_batch=4, queue=8, max_new_tokens_cap=LONG)
    server = make_server(app, "127.0.0.1", 0, clients=4)
    threading.Thread(target=server.run, daemon=True).start()
    worker = app.extensions["batcher"]
    try:
        sock = send_raw(server.effective_port, "/generate", {"prompt": "长江", "max_new_tokens": LONG,
                                                            "ignore_eos": True, "stream": False})
        assert wait_until(lambda: worker.requests and worker.stats["tokens"] > 4)
        (rid, jobs), = list(worker.requests.items())
        sock.close()
        assert wait_until(jobs[0].client_gone, timeout=10), "waitress never reported the hang-up"
        steps_at_notice = worker.stats["batches"]
        assert wait_until(lambda: rid not in worker.requests and worker.engine.running() == 0)
        assert worker.stats["batches"] - steps_at_notice <= 1
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        worker.close()


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "故宫", "max_new_tokens": LONG, "ignore_eos": True, "stream": False}),
    ("/generate", {"prompt": "故宫", "max_new_tokens": LONG, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"prompt": "故宫", "max_tokens": LONG, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "长江"}], "max_tokens": LONG, "n": 2,
                              "ignore_eos": True}),
], ids=["generate", "generate-stream", "completions", "chat-n2"])
def test_a_client_that_hangs_up_stops_its_generation(server, path, body):
    url, port = server
    assert wait_until(lambda: metrics(url)[RUNNING] == 0)
    before = metrics(url)
    assert_abandoned_request_stops(url, send_raw(port, path, body), before, rows=body.get("n", 1))
    assert requests.post(f"{url}/generate", json={"prompt": "a", "max_new_tokens": 2, "stream": False},
                         timeout=30).status_code == 200, "the server still serves"


def test_queued_requests_whose_clients_left_do_not_fill_the_queue(run_dir):
    with serving(run_dir, max_batch=1, queue=2, max_new_tokens_cap=LONG) as (url, port):
        busy = send_raw(port, "/generate", {"prompt": "长江", "max_new_tokens": LONG, "ignore_eos": True,
                                            "stream": False})
        assert wait_until(lambda: metrics(url)[RUNNING] == 1)
        queued = [send_raw(port, "/generate", {"prompt": "黄河", "max_new_tokens": 4, "stream": False})
                  for _ in range(2)]
        assert wait_until(lambda: metrics(url)["minigpt_queue_depth"] == 2)
        for sock in queued:
            sock.close()
        # the queue is full of requests nobody waits for: a live client is queued, not refused
        live = {}
        thread = threading.Thread(target=lambda: live.update(r=requests.post(
            f"{url}/generate", json={"prompt": "a", "max_new_tokens": 2, "stream": False}, timeout=60)))
        time.sleep(0.2)  # waitress reads the two hang-ups
        thread.start()
        assert wait_until(lambda: metrics(url)[CANCELLED] == 2), "the abandoned queued requests stay queued"
        busy.close()
        thread.join(60)
        assert live["r"].status_code == 200, live["r"].text


# ----------------------------------------------------------------------------- F2: n above max_batch

def test_n_above_max_batch_is_a_400_naming_both_numbers(run_dir):
    with serving(run_dir, max_batch=2, queue=4) as (url, _):
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 4}),
                           ("/v1/completions", {"prompt": "a", "n": 3})]:
            r = requests.post(f"{url}{path}", json={**body, "max_tokens": 2}, timeout=10)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["field"] == "n" and str(body["n"]) in error["message"] and "2" in error["message"]
        ok = requests.post(f"{url}/v1/completions", json={"prompt": "a", "n": 2, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        assert requests.get(f"{url}/health", timeout=5).json()["queue"]["active"] == 0


def test_the_engine_refuses_more_rows_than_slots(reference):
    from engine import Engine

    engine = Engine(reference.model, max_batch=2)
    with pytest.raises(ValueError, match="n must be in"):
        engine.add([1, 2, 3], 4, n=3)
    assert not engine.has_work()


# ----------------------------------------------------------------------------- F7: the key everywhere

@pytest.mark.parametrize("cors", [False, True])
def test_every_route_but_health_needs_the_key_options_included(run_dir, cors):
    with serving(run_dir, api_key=KEY, cors=cors) as (url, _):
        for path in ["/v1/models", "/v1/chat/completions", "/generate", "/metrics", "/tokenize", "/nowhere"]:
            r = requests.options(f"{url}{path}", timeout=10)
            assert r.status_code == 401 and "Allow" not in r.headers, (path, r.status_code, r.headers)
            assert "/v1" not in r.text and "POST" not in r.text
        assert requests.get(f"{url}/nowhere", timeout=10).status_code == 401  # no route list by probing
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        with_key = requests.options(f"{url}/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert with_key.status_code == 200


def test_a_cors_preflight_is_answered_without_the_key_and_names_no_route(run_dir):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with serving(run_dir, api_key=KEY, cors=True) as (url, _):
        answers = [requests.options(f"{url}{path}", headers=preflight, timeout=10)
                   for path in ["/v1/chat/completions", "/generate", "/nowhere"]]
        for r in answers:
            assert r.status_code == 200 and r.content == b"" and "Allow" not in r.headers
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        same = [{k: v for k, v in r.headers.items() if k != "Date"} for r in answers]
        assert same[0] == same[1] == same[2], "the preflight answer must not tell one path from another"
    with serving(run_dir, api_key=KEY) as (url, _):  # without --cors there is no preflight to answer
        assert requests.options(f"{url}/generate", headers=preflight, timeout=10).status_code == 401


def test_the_bearer_scheme_is_case_insensitive_the_key_is_not(run_dir):
    cases = {f"Bearer {KEY}": 200, f"bearer {KEY}": 200, f"BEARER {KEY}": 200, f"bEaReR  {KEY}": 200,
             f"Bearer {KEY}x": 401, f"Basic {KEY}": 401, f"Bearer{KEY}": 401, KEY: 401, "Bearer ": 401,
             f"Bearer {KEY.upper()}": 401, "": 401}
    with serving(run_dir, api_key=KEY) as (url, _):
        got = {auth: requests.get(f"{url}/v1/models", headers={"Authorization": auth}, timeout=10).status_code
               for auth in cases}
    assert got == cases
