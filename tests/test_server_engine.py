"""server.py's continuous worker over real HTTP on 127.0.0.1: late arrivals join the running batch,
cancellation frees a slot, per-request seeds, logprobs against a direct forward pass, n choices
sharing a prefill, /metrics, /tokenize and /detokenize, RAG mode, and one failing request that
ends alone.

Expected texts come from `Run.complete` / `engine.generate` on a second copy of the same tiny run
(greedy or seeded, so they must match exactly). Torch runs single-threaded (see test_server.py).
"""
import json
import threading
import time
from contextlib import contextmanager
from urllib.parse import unquote

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_retrieval import ARTICLES
from test_server import LONG, health, open_stream, wait_until  # helpers only, no tests

from engine import generate
from extractive import answer_spans
from inference import load_run
from openai_api import token_text
from retrieval import Index, build_index, sources_text
from server import Batcher, Job, Scheduler, create_app, make_server

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag")
    (folder / "wiki").mkdir()
    (folder / "wiki" / "a.jsonl").write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in ARTICLES) + "\n",
                                             encoding="utf-8")
    build_index([folder / "wiki"], folder / "index", quiet=True)
    with Index(folder / "index") as index:
        yield index


@contextmanager
def serving(run, clients=16, **options):
    app = create_app(run, **options)
    server = make_server(app, "127.0.0.1", 0, clients=clients)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", server.effective_port, app
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        app.extensions["batcher"].close()


@pytest.fixture(scope="module")
def server(run_dir, index):
    with serving(load_run(run_dir), max_batch=8, queue=16, max_new_tokens_cap=LONG, index=index) as (url, _, _):
        yield url


def concurrently(work, n, timeout=120):
    """work(i) for i < n, all released at once; their results in order."""
    results, barrier = [None] * n, threading.Barrier(n)

    def client(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results


def text_of(url, body):
    r = requests.post(f"{url}/generate", json=body | {"stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_a_late_arrival_joins_the_running_batch_and_finishes_first(server, reference):
    port = int(server.rsplit(":", 1)[1])
    conn, long_stream = open_stream(port, {"prompt": "故宫", "max_new_tokens": LONG, "temperature": 0,
                                           "ignore_eos": True})
    try:
        assert long_stream.read1(64)  # the long request is running
        before = health(server)
        short = {"prompt": "黄河是", "max_new_tokens": 8, "temperature": 0}
        assert text_of(server, short) == reference.complete("黄河是", max_new_tokens=8, temperature=0)
        after = health(server)
        # it ran next to the long one (a static batch would have made it wait for the long one's end)
        assert after["active"] >= 1 and after["largest_batch"] >= 2
        assert after["tokens"] - before["tokens"] < LONG
    finally:
        long_stream.close()
        conn.close()
    assert wait_until(lambda: health(server)["active"] == 0)


def test_cancellation_frees_a_slot(run_dir):
    with serving(load_run(run_dir), max_batch=1, queue=4, max_new_tokens_cap=LONG) as (url, port, _):
        conn, busy = open_stream(port, {"prompt": "长江", "max_new_tokens": LONG, "temperature": 0,
                                        "ignore_eos": True})
        assert busy.read1(64)
        got = {}
        waiter = threading.Thread(target=lambda: got.update(r=requests.post(
            f"{url}/generate", json={"prompt": "黄河", "max_new_tokens": 3, "stream": False}, timeout=30)))
        waiter.start()
        assert wait_until(lambda: health(url)["waiting"] == 1), "the second request waits for the only slot"
        time.sleep(0.3)
        assert "r" not in got
        busy.close()  # the client goes: its slot is freed, the waiting request runs
        conn.close()
        waiter.join(timeout=30)
        assert got["r"].status_code == 200 and got["r"].json()["tokens"] >= 1
        assert health(url)["cancelled"] == 1


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(server, reference):
    body = {"prompt": "长江是", "max_new_tokens": 40, "temperature": 1.0, "top_k": 50, "seed": 1234}
    alone = text_of(server, body)
    others = [{"prompt": p, "max_new_tokens": 30, "temperature": 1.0} for p in ("北京", "上海", "Python", "首都")]
    batch = concurrently(lambda i: text_of(server, others[i - 1] if i else body), 5)
    assert batch[0] == alone
    ids = reference.tok.encode("长江是")
    tokens = [t for (t,) in generate(reference.model, [ids], 40, temperature=1.0, top_k=50, seed=1234,
                                     stop_ids=reference.tok.stop_ids("text"))]
    assert alone == reference.tok.decode(tokens)
    assert text_of(server, body | {"seed": 1235}) != alone  # the seed matters


def test_unseeded_samples_in_one_batch_differ(server):
    body = {"prompt": "长江是", "max_new_tokens": 30, "temperature": 1.0}
    texts = concurrently(lambda i: text_of(server, body), 4)
    assert len(set(texts)) > 1, "each request draws its own seed (the static batcher gave a batch one)"


def direct_logprobs(model, ids, generated, top):
    """(chosen logprob, top [(id, logprob)]) per generated token from full forward passes."""
    out = []
    for i, token in enumerate(generated):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids + generated[:i]]))
        lp = torch.log_softmax(logits[0, -1].float(), -1)
        values, idx = lp.topk(top)
        out.append((float(lp[token]), list(zip(idx.tolist(), values.tolist()))))
    return out


def test_logprobs_equal_a_direct_forward_pass(server, reference):
    tok = reference.tok
    ids = tok.encode("黄河是")
    generated = [t for (t,) in generate(reference.model, [ids], 6, temperature=0)]
    expected = direct_logprobs(reference.model, ids, generated, 3)
    body = {"prompt": "黄河是", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    reply = requests.post(f"{server}/v1/completions", json=body, timeout=30).json()
    lp = reply["choices"][0]["logprobs"]
    assert lp["tokens"] == [token_text(tok, t)[0] for t in generated]
    assert lp["token_logprobs"] == pytest.approx([e[0] for e in expected], abs=1e-4)
    for got, (_, top) in zip(lp["top_logprobs"], expected):  # keyed by text, as OpenAI's completions are
        assert got == pytest.approx({token_text(tok, t)[0]: v for t, v in top}, abs=1e-4)
    chat_body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0,
                 "logprobs": True, "top_logprobs": 2}
    chat = requests.post(f"{server}/v1/chat/completions", json=chat_body, timeout=30).json()
    chat_ids = reference.prompt_ids([{"role": "user", "content": "你好"}], "chat")
    content = chat["choices"][0]["logprobs"]["content"]
    chat_tokens = [t for (t,) in generate(reference.model, [chat_ids], 6, temperature=0,
                                          stop_ids=tok.stop_ids("chat"))]
    expected = direct_logprobs(reference.model, chat_ids, chat_tokens, 2)
    assert [c["bytes"] for c in content] == [token_text(tok, t)[1] for t in chat_tokens]
    assert [c["logprob"] for c in content] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    # streamed: every token's entry arrives once, in order
    events = sse_events(server, "/v1/chat/completions", chat_body | {"stream": True})
    streamed = [c for e in events for c in ((e["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-6)


def sse_events(url, path, body):
    r = requests.post(f"{url}{path}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    lines = [line[len("data: "):] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_share_one_prefill_and_are_seeded_seed_plus_index(server):
    body = {"messages": [{"role": "user", "content": "长江"}], "max_tokens": 12, "temperature": 1.0, "n": 3,
            "seed": 77}
    reply = requests.post(f"{server}/v1/chat/completions", json=body, timeout=30).json()
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for i, choice in enumerate(choices):  # choice i is what n=1 with seed 77 + i gives
        alone = requests.post(f"{server}/v1/chat/completions", json=body | {"n": 1, "seed": 77 + i}, timeout=30)
        assert choice["message"]["content"] == alone.json()["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] >= 3
    events = sse_events(server, "/v1/completions", {"prompt": "长江", "max_tokens": 5, "temperature": 0, "n": 2,
                                                    "stream": True})
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert finished == [0, 1]
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in (0, 1)]
    assert texts[0] == texts[1]  # greedy rows of one prefill


def metric_values(url):
    text = requests.get(f"{url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_move(server, run_dir):
    before = metric_values(server)
    r = requests.post(f"{server}/generate", json={"prompt": "北京", "max_new_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "stream": False}, timeout=30)
    assert r.json()["tokens"] == 5
    after = metric_values(server)
    length = ("minigpt_requests_total", (("status", "length"),))
    assert after[length] == before.get(length, 0) + 1
    assert after[("minigpt_generated_tokens_total", ())] >= before[("minigpt_generated_tokens_total", ())] + 5
    ttft = ("minigpt_time_to_first_token_seconds_count", ())
    assert after[ttft] == before[ttft] + 1
    latency = ("minigpt_token_latency_seconds_count", ())
    assert after[latency] >= before[latency] + 4
    assert ("minigpt_queue_depth", ()) in after and ("minigpt_running_rows", ()) in after
    # a second app in the same process has registries of its own, and /metrics needs the key
    with serving(load_run(run_dir), api_key="k") as (url, _, _):
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 401
        fresh = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer k"}, timeout=5).text
        assert "minigpt_generated_tokens_total 0.0" in fresh


def test_tokenize_and_detokenize_round_trip(server, reference):
    text = "长江是中国第一长河 Python 1991"
    tokens = requests.post(f"{server}/tokenize", json={"text": text}, timeout=5).json()
    assert tokens["tokens"] == reference.tok.encode(text) and tokens["count"] == len(tokens["tokens"])
    back = requests.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}, timeout=5).json()
    assert back["text"] == text
    too_big = requests.post(f"{server}/detokenize", json={"tokens": [reference.model.config.vocab_size]}, timeout=5)
    assert too_big.status_code == 400 and too_big.json()["error"]["field"] == "tokens"


def test_rag_mode_streams_and_names_its_sources(server, reference):
    body = {"prompt": "紫禁城在哪里？", "mode": "rag", "rag_k": 2, "max_new_tokens": 8, "temperature": 0}
    with requests.post(f"{server}/generate", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200
        sources = json.loads(unquote(r.headers["X-Sources"]))
        text = r.content.decode("utf-8")
    assert sources and sources[0]["title"] == "故宫" and sources[0]["article_id"] == "3"
    whole = requests.post(f"{server}/generate", json=body | {"stream": False}, timeout=30).json()
    assert whole["sources"] == sources and whole["text"] == text
    events = sse_events(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "紫禁城在哪里？"}],
                                                         "rag": {"k": 2}, "max_tokens": 8, "temperature": 0,
                                                         "stream": True})
    assert events[0]["sources"] == sources and all("sources" not in e for e in events[1:])
    answer = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert answer == text  # the same passage + question prompt in the qa layout


def test_rag_extractive_answers_are_the_likeliest_span_like_sample_gives(server, reference, index):
    question = "紫禁城在哪里？"
    body = {"prompt": question, "mode": "rag", "rag_k": 2, "max_new_tokens": 8, "temperature": 0, "extractive": True}
    with requests.post(f"{server}/generate", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200
        text = r.content.decode("utf-8")
    ids, sources = reference.rag_prompt_ids(question, index, 2, 8)
    expected = "".join(reference.stream_ids(ids, "qa", max_new_tokens=8, temperature=0.0,
                                            span=answer_spans(reference.tok, sources_text(sources), question)))
    assert text and text == expected and text in sources_text(sources)  # the span search, as sample.py runs it
    free = "".join(reference.stream_ids(ids, "qa", max_new_tokens=8, temperature=0.0))
    assert free not in sources_text(sources)  # this random model, unheld, writes text of its own
    chat = requests.post(f"{server}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": question}], "rag": {"k": 2, "extractive": True},
        "max_tokens": 8, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == text
    refused = requests.post(f"{server}/generate", json=body | {"ignore_eos": True}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "ignore_eos"


def test_extractive_rag_with_no_passage_is_an_empty_answer_with_a_reason(server):
    """Issue 22 F5: retrieval finds nothing for a question sharing no term with the index, so there is
    no span to answer with: an empty answer, finish_reason "no_passage", sources [], on every route."""
    question = "zzzq？"
    body = {"prompt": question, "mode": "rag", "max_new_tokens": 8, "temperature": 0, "extractive": True}
    whole = requests.post(f"{server}/generate", json=body | {"stream": False}, timeout=30).json()
    assert whole["text"] == "" and whole["tokens"] == 0
    assert whole["finish_reason"] == "no_passage" and whole["sources"] == []
    with requests.post(f"{server}/generate", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.content == b""
        assert r.headers["X-Finish-Reason"] == "no_passage" and json.loads(unquote(r.headers["X-Sources"])) == []
    chat = {"messages": [{"role": "user", "content": question}], "rag": {"extractive": True}, "max_tokens": 8, "n": 2}
    reply = requests.post(f"{server}/v1/chat/completions", json=chat, timeout=30).json()
    assert reply["sources"] == [] and reply["usage"]["completion_tokens"] == 0
    assert [(c["message"]["content"], c["finish_reason"]) for c in reply["choices"]] == [("", "no_passage")] * 2
    events = sse_events(server, "/v1/chat/completions", chat | {"n": 1, "stream": True})
    assert events[0]["sources"] == []
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == ""
    assert events[-1]["choices"][0]["finish_reason"] == "no_passage"
    free = requests.post(f"{server}/generate", json=body | {"extractive": False, "stream": False}, timeout=30).json()
    assert free["sources"] == [] and free["tokens"] > 0  # without extractive the model still writes


def test_a_request_that_fails_in_a_step_ends_alone(run_dir, reference):
    """A request whose forward raises (here: a model that refuses one token id in its input) ends
    with "error"; the others resume and finish with exactly the text they would have had alone."""
    poison = reference.tok.encode("故宫")[0]

    class Poisoned(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, idx, **kw):
            if bool((idx == poison).any()):
                raise RuntimeError("poisoned token")
            return self.inner(idx, **kw)

    run = load_run(run_dir)
    run.model = Poisoned(run.model)
    prompts = [f"{city}是" for city in ("北京", "上海", "长江", "黄河", "Python", "中国")]
    assert all(poison not in reference.tok.encode(p) for p in prompts)
    expected = [reference.complete(p, "text", max_new_tokens=10, temperature=0) for p in prompts]
    greedy = {"temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}
    jobs = [Job(reference.tok.encode(p), 10, greedy, reference.tok.stop_ids("text"), None) for p in prompts]
    bad = Job(reference.tok.encode("故宫是"), 10, greedy, (), None)
    worker = Scheduler(run, max_batch=16, queue_size=16)
    try:
        # the bad request arrives while the others are mid-generation, so it fails a shared step
        for job in jobs[:3]:
            worker.submit(job)
        assert wait_until(lambda: all(job.tokens >= 1 for job in jobs[:3]) or any(j.finish_reason for j in jobs))
        for job in [bad] + jobs[3:]:
            worker.submit(job)
        texts = ["".join(job.pieces((), lambda: False)) for job in jobs + [bad]]
    finally:
        worker.close()
    assert texts[:-1] == expected
    assert bad.reason == "error" and texts[-1] == ""
    assert all(job.reason in ("stop", "length") for job in jobs) and worker.stats["failed"] == 1


@pytest.mark.slow
def test_64_concurrent_greedy_streams_equal_their_solo_outputs(run_dir, reference):
    prompts = [f"{a}{b}" for a in ("北京", "上海", "长江", "黄河", "故宫", "Python", "中国", "首都")
               for b in ("是", "的", "在", "有", "和", "，", "位于", "被称为")]
    lengths = [8 + (i * 37) % 120 for i in range(64)]  # some pass the 64-token window and slide
    expected = [reference.complete(p, "text", max_new_tokens=n, temperature=0, ) for p, n in zip(prompts, lengths)]
    with serving(load_run(run_dir), clients=80, max_batch=16, queue=64) as (url, _, _):
        def stream(i):
            body = {"prompt": prompts[i], "max_new_tokens": lengths[i], "temperature": 0}
            with requests.post(f"{url}/generate", json=body, stream=True, timeout=120) as r:
                return r.content.decode("utf-8")

        got = concurrently(stream, 64, timeout=300)
        assert health(url)["largest_batch"] == 16 and health(url)["failed"] == 0
    assert got == expected


def test_the_static_batcher_seeds_each_row_with_its_own_seed(run_dir, reference):
    """`--scheduler static` passed one seed (the first row's) for the whole batch."""
    sampled = {"temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}
    ids = reference.tok.encode("长江是")

    def job(seed):
        return Job(ids, 20, sampled, (), seed)

    worker = Batcher(load_run(run_dir), max_batch=4, queue_size=4, gather_ms=300)
    try:
        jobs = [job(5), job(99)]
        for j in jobs:
            worker.submit(j)
        texts = ["".join(j.pieces((), lambda: False)) for j in jobs]
        alone = job(99)
        worker.submit(alone)
        alone_text = "".join(alone.pieces((), lambda: False))
    finally:
        worker.close()
    assert worker.stats["largest_batch"] == 2, "the first two shared a batch"
    assert texts[1] == alone_text and texts[0] != texts[1]
