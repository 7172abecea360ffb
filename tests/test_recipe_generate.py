"""Generation with the qwen3 architecture through the one engine (engine.py): cached decoding
equals recomputing the context (also with grouped-query attention, whose cache holds n_kv_head
heads), a ragged batch equals each prompt alone, and the window slides past block_size.
test_recipe.py tests the cache contract itself (shapes with grouped-query attention).
"""
import pytest
import torch

from engine import Engine, generate
from model import GPT, GPTConfig

VOCAB, BLOCK = 101, 32
PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [60, 2], [33, 34, 35, 36]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module", params=[2, 1], ids=["mha", "gqa"])
def model(request):
    torch.manual_seed(0)
    m = GPT(GPTConfig(arch="qwen3", block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                      n_kv_head=request.param, tie_embeddings=False)).eval()
    with torch.no_grad():  # weights far from the init: no argmax ties, every part of the model matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def greedy_events(model, prompts, steps):
    engine = Engine(model, max_batch=len(prompts))
    ids = [engine.add(p, steps, temperature=0) for p in prompts]
    events = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            events[event.request].append(event)
    return [events[i] for i in ids]


def test_qwen3_cached_decoding_equals_recomputing_the_context(model):
    assert model.config.n_kv_head in (1, 2)
    prompt = PROMPTS[0]
    (events,) = greedy_events(model, [prompt], 20)
    context = list(prompt)
    for event in events:
        with torch.no_grad():
            full = model(torch.tensor([context]))[0][0, -1].log_softmax(-1)
        assert event.token == int(full.argmax())
        assert abs(event.logprob - float(full[event.token])) < 1e-5
        context.append(event.token)


def test_qwen3_ragged_batch_equals_one_prompt_at_a_time(model):
    together = greedy_events(model, PROMPTS, 12)
    for row, prompt in enumerate(PROMPTS):
        (alone,) = greedy_events(model, [prompt], 12)
        assert [e.token for e in together[row]] == [e.token for e in alone]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(together[row], alone)) < 1e-5


def test_qwen3_window_slides_beyond_block_size(model):
    steps = list(generate(model, [list(range(1, BLOCK + 10)), [7, 8]], 2 * BLOCK, temperature=1.0, seed=0))
    assert len(steps) == 2 * BLOCK and all(0 <= t < VOCAB for s in steps for t in s)
    alone = list(generate(model, [[7, 8]], 2 * BLOCK, temperature=1.0, seed=0))
    assert [s[1] for s in steps] == [s[0] for s in alone]  # the short row is its own, past the window too
