"""The OpenAI routes as clients use them (openai_api.py), over real HTTP on 127.0.0.1 with the
official `openai` client: prompts as lists of strings or token ids, `echo` with prompt logprobs,
`max_tokens: 0` scoring, `text_offset`, logprobs 0 / top_logprobs k / stop strings (issue 22 F3,
F4, F6), chat content parts and the developer role, `GET /v1/models/{id}`, and the vLLM-style
`/tokenize`, `/detokenize`, `/tokenizer_info` lm-eval's remote tokenizer reads.

Expected values come from a second copy of the same tiny random run (`reference`): greedy texts
from `Run.complete_ids`, prompt logprobs from a direct forward of the model.
"""
import json

import openai
import pytest
import requests
import torch
from test_server import serving

from openai_api import token_text

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir, max_batch=8, queue=32, max_new_tokens_cap=64) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def greedy(reference, ids, n_tokens, mode="text"):
    return reference.complete_ids([list(ids)], mode, max_new_tokens=n_tokens, temperature=0)[0]


def direct_logprobs(model, ids):
    """log_softmax of one plain forward: row t scores token t + 1."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), -1)


def test_prompt_logprobs_equal_a_direct_forward(reference):
    ids = reference.tok.encode("长江是中国第一长河，全长约6300公里。")
    entries = reference.prompt_logprobs(ids, top=3)
    want = direct_logprobs(reference.model, ids)
    assert entries[0] == (ids[0], None, None) and [t for t, _, _ in entries] == ids
    for t, (token, logprob, top) in enumerate(entries[1:]):
        assert logprob == pytest.approx(want[t, token].item(), abs=1e-5)
        values, tokens = want[t].topk(3)
        assert [a for a, _ in top] == tokens.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert all(top is None for _, _, top in reference.prompt_logprobs(ids)[1:])


def test_list_prompts_give_one_choice_per_prompt_times_n(client, reference):
    prompts = ["长江是", "北京是中华人民共和国的首都", "Python"]
    r = client.completions.create(model="tiny-sft", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for i, prompt in enumerate(prompts):  # every choice is its prompt's solo greedy text
        want = greedy(reference, reference.tok.encode(prompt), 6)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == want
    assert r.usage.prompt_tokens == sum(len(reference.tok.encode(p)) for p in prompts)
    ids = [reference.tok.encode(p) for p in prompts]
    by_ids = client.completions.create(model="tiny-sft", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices[::2]]
    one = client.completions.create(model="tiny-sft", prompt=ids[1], max_tokens=6, temperature=0)
    assert one.choices[0].text == r.choices[2].text


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    prompt = "北京是中华人民共和国的首都"
    ids = reference.tok.encode(prompt)
    want = direct_logprobs(reference.model, ids)
    scored = client.completions.create(model="tiny-sft", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [token_text(reference.tok, t)[0] for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([want[t, ids[t + 1]].item() for t in range(len(ids) - 1)],
                                                  abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert_offsets(choice.text, lp)
    # lm-eval's loglikelihood request: echo, one new token, its logprob last
    both = client.completions.create(model="tiny-sft", prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=1,
                                     temperature=0)
    first = both.choices[0]
    assert first.logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert len(first.logprobs.tokens) == len(ids) + 1
    assert first.text == prompt + greedy(reference, ids, 1)
    assert_offsets(first.text, first.logprobs)
    assert both.choices[1].logprobs.token_logprobs[1:3] == pytest.approx(lp.token_logprobs[1:3], abs=1e-6)
    plain = client.completions.create(model="tiny-sft", prompt=prompt, max_tokens=2, echo=True, temperature=0)
    assert plain.choices[0].text == prompt + greedy(reference, ids, 2) and plain.choices[0].logprobs is None


def assert_offsets(text, lp):
    """Each token's text sits at its offset of the whole text; offsets never fall."""
    assert len(lp.text_offset) == len(lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset):
        if not token.startswith("bytes:") and not token.startswith("<|"):
            assert text[offset:offset + len(token)] == token


def sse_events(url, path, body):
    r = requests.post(f"{url}{path}", json=body, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    lines = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_text_offsets_go_on_counting_and_match_the_whole_answer(server, client):
    body = {"prompt": "故宫位于", "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": True}
    whole = client.completions.create(model="tiny-sft", **body).choices[0]
    events = sse_events(server, "/v1/completions", {**body, "stream": True})
    text = "".join(e["choices"][0]["text"] for e in events)
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    tokens = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert text == whole.text and tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert offsets[-1] >= len("故宫位于")  # the generated tokens' offsets count on from the prompt


def test_logprobs_zero_gives_the_chosen_tokens_logprob_only(client):
    # issue 22 F3: 0 used to count as "off"
    r = client.completions.create(model="tiny-sft", prompt="长江", max_tokens=8, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == r.usage.completion_tokens == len(lp.tokens)
    assert all(isinstance(v, float) for v in lp.token_logprobs) and all(top == {} for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny-sft", messages=[{"role": "user", "content": "长江"}],
                                          max_tokens=8, temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(c.top_logprobs == [] for c in content)
    assert chat.choices[0].message.content is not None


def test_top_logprobs_are_k_distinct_tokens_with_their_bytes(client):
    # issue 22 F6: tokens that are part of a character used to collapse into one "\ufffd" key
    r = client.completions.create(model="tiny-sft", prompt="长江", max_tokens=16, temperature=0, logprobs=5)
    tops = r.choices[0].logprobs.top_logprobs
    assert all(len(top) == 5 for top in tops)
    assert any(key.startswith("bytes:") for top in tops for key in top)  # the case that used to collapse
    chat = client.chat.completions.create(model="tiny-sft", messages=[{"role": "user", "content": "长江"}],
                                          max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
    for entry in chat.choices[0].logprobs.content:
        raws = [bytes(alt.bytes) for alt in entry.top_logprobs]
        assert len(set(raws)) == 5  # five different tokens, each with its exact bytes


def test_a_stop_string_cuts_logprobs_and_usage_with_the_text(client, server, reference):
    # issue 22 F4: the tokens after the cut used to be counted and listed
    prompt = "长江"
    full = client.completions.create(model="tiny-sft", prompt=prompt, max_tokens=20, temperature=0, logprobs=1)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop and text.index(stop) > 0
    cut = client.completions.create(model="tiny-sft", prompt=prompt, max_tokens=20, temperature=0, logprobs=1,
                                    stop=[stop])
    choice = cut.choices[0]
    assert choice.text == text[:text.index(stop)] and choice.finish_reason == "stop"
    lp = choice.logprobs
    kept = sum(1 for o in full.choices[0].logprobs.text_offset if o < len(choice.text))
    assert len(lp.tokens) == len(lp.token_logprobs) == cut.usage.completion_tokens == kept
    assert kept < full.usage.completion_tokens and all(o < len(choice.text) for o in lp.text_offset)
    events = sse_events(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                    "logprobs": 1, "stop": [stop], "stream": True,
                                                    "stream_options": {"include_usage": True}})
    streamed = [t for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp.tokens and events[-1]["usage"]["completion_tokens"] == kept


def test_chat_content_parts_and_the_developer_role(client):
    def answer(messages):
        r = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content

    plain = answer([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "长江\n多长？"}])
    text_parts = [{"type": "text", "text": "长江"}, {"type": "text", "text": "多长？"}]
    parts = answer([{"role": "developer", "content": [{"type": "text", "text": "你是助手"}]},
                    {"role": "user", "content": text_parts}])
    assert parts == plain


def test_models_retrieve_and_an_unknown_model(client, reference):
    card = client.models.retrieve("tiny-sft")
    assert card.id == "tiny-sft" and card.model_extra["max_model_len"] == reference.info["block_size"]
    assert client.models.list().data[0].model_extra["max_model_len"] == reference.info["block_size"]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["type"] == "invalid_request_error" and "gpt-9" in e.value.body["message"]


def test_vllm_tokenizer_routes(server, reference):
    tok = reference.tok
    r = requests.post(f"{server}/tokenize", json={"prompt": "长江是中国第一长河", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("长江是中国第一长河") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == reference.info["block_size"]
    assert requests.post(f"{server}/tokenize", json={"text": "长江"}).json()["tokens"] == tok.encode("长江")
    info = requests.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == reference.info["block_size"]
    eos = requests.post(f"{server}/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
    assert eos == [tok.eot]  # how lm-eval's remote tokenizer finds the EOS id
    back = requests.post(f"{server}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == back["text"] == "长江是中国第一长河"


def test_langchain_openai_sends_lists_and_gets_answers(server, reference):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(base_url=f"{server}/v1", api_key="none", model="tiny-sft", max_tokens=6,
                                  temperature=0, max_retries=0)
    assert llm.invoke("长江是") == greedy(reference, reference.tok.encode("长江是"), 6)
    chat = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="none", model="tiny-sft", max_tokens=6,
                                       temperature=0, max_retries=0)
    assert isinstance(chat.invoke([("system", "你是助手"), ("human", "长江？")]).content, str)


def test_a_full_queue_part_way_through_the_prompts_cancels_those_queued(run_dir):
    from test_server import health, wait_until

    with serving(run_dir, max_batch=1, queue=2, max_new_tokens_cap=20000) as (url, _):
        r = requests.post(f"{url}/v1/completions", json={"prompt": ["长江"] * 8, "max_tokens": 20000}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"]
        # the prompts queued before the queue filled would run 20,000 tokens each: they are dropped
        assert wait_until(lambda: health(url)["active"] == 0 and health(url)["waiting"] == 0, timeout=20)
        assert health(url)["cancelled"] >= 1


ODD_PROMPTS = [[], [[]], [[1, 2], [3, "a"]], [None], [[1.5]], [[True]], [[2**70]], [[-5]], "", [""], ["", "a"],
               [[1] * 65, [1]], [["a"]], {"a": 1}, 7, [[[1]]], ["长" * 513], [1] * 65]


@pytest.mark.parametrize("prompt", ODD_PROMPTS, ids=[str(i) for i in range(len(ODD_PROMPTS))])
@pytest.mark.parametrize("extra", [{}, {"echo": True, "max_tokens": 0, "logprobs": 5}, {"stream": True, "n": 2}],
                         ids=["plain", "score", "stream"])
def test_odd_prompts_are_a_400_naming_the_prompt(server, prompt, extra):
    r = requests.post(f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"].startswith("prompt")


def test_presence_and_frequency_penalties_lower_the_logits_of_generated_tokens(reference):
    from engine import Engine

    model, ids = reference.model, reference.tok.encode("长江")
    engine = Engine(model, max_batch=2, prefill_chunk=64)
    penalised = engine.add(ids, 12, temperature=0, presence_penalty=0.5, frequency_penalty=1.5)
    engine.add(ids + ids, 12, temperature=0)  # a batch-mate without penalties
    tokens = []
    while engine.has_work():
        tokens += [e.token for e in engine.step() if e.request == penalised]
    counts = torch.zeros(model.config.vocab_size)
    for token in tokens:  # each token is the argmax of a direct forward's logits, penalised by hand
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1].float()
        assert token == int((logits - 0.5 * (counts > 0) - 1.5 * counts).argmax())
        counts[token] += 1
        ids = ids + [token]
    assert len(set(tokens)) > 1  # a penalised row moves on to other tokens


def test_penalties_over_http_equal_the_engine_and_change_the_text(client, reference):
    plain = client.completions.create(model="tiny-sft", prompt="长江", max_tokens=12, temperature=0)
    penalised = client.completions.create(model="tiny-sft", prompt="长江", max_tokens=12, temperature=0,
                                          presence_penalty=0.5, frequency_penalty=1.5)
    from engine import Engine

    engine = Engine(reference.model, max_batch=1, prefill_chunk=64)
    engine.add(reference.tok.encode("长江"), 12, temperature=0, presence_penalty=0.5, frequency_penalty=1.5,
               stop_ids=reference.tok.stop_ids("text"))
    tokens = []
    while engine.has_work():
        tokens += [e.token for e in engine.step()]
    assert penalised.choices[0].text == reference.tok.decode(tokens) != plain.choices[0].text
