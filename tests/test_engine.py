"""The generation engine: a row's tokens depend on its own prompt and settings only (batch-mates,
late arrivals, cancellations, chunked prefill and the sliding window change nothing), cached
decoding equals recomputation, logprobs equal a direct forward, the sampler does what it says, and
hostile settings are refused or harmless.

The reference for "what a row should get" is a plain loop over full forward passes of the row's own
window (`reference`), with the window rule written out: when the window (block_size - 1 tokens)
is full, keep its last half.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from engine import Engine, generate, sample_tokens
from extractive import Spans
from model import GPT, GPTConfig

VOCAB, BLOCK = 101, 32
WINDOW = BLOCK - 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    # the GPT-2 init gives near-uniform logits (argmax ties) and bigger embeddings alone make the
    # model repeat its last token; bigger block weights give varied text with clear argmax gaps
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and name.startswith("transformer.h."):
                p.mul_(10)
        m.transformer.wte.weight.mul_(2)
    return m


def prompt(length, seed):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


A, B = prompt(20, 0), prompt(30, 100)  # the measured case of issue 10.1
RAGGED = [prompt(n, n) for n in (3, 11, 20, 30, 31, 45)]


def rows(steps):
    """Per-row token lists (None dropped) from generate's per-step lists."""
    return [[t for t in row if t is not None] for row in zip(*steps)]


def alone(model, ids, n, **kw):
    return rows(generate(model, [ids], n, **kw))[0]


@torch.no_grad()
def reference(model, ids, n):
    """Greedy tokens from full forward passes over the row's own window, and their logits."""
    window, out, logits = list(ids)[-WINDOW:], [], []
    for _ in range(n):
        last = model(torch.tensor([window]))[0][0, -1]
        out.append(int(last.argmax()))
        logits.append(last)
        window.append(out[-1])
        if len(window) > WINDOW:  # the window was full: slide, keeping its last half
            window = window[-(WINDOW // 2):]
    return out, logits


def run_engine(engine, until=500):
    """Step until idle; per (request, index): the list of events."""
    out = {}
    for _ in range(until):
        if not engine.has_work():
            return out
        for e in engine.step():
            out.setdefault((e.request, e.index), []).append(e)
    raise AssertionError("the engine did not finish")


def tokens(events):
    return [e.token for e in events]


# ----------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("new", [5, 40])
def test_a_short_row_is_not_cut_by_a_long_batch_mate(model, new):
    """Issue 10.1: block 32, A of 20 tokens and B of 30. The old generator shared one cache
    length, so when B reached the window A was cut to the last half of it too."""
    together = rows(generate(model, [A, B], new, temperature=0))
    assert together[0] == alone(model, A, new, temperature=0) == reference(model, A, new)[0]
    assert together[1] == alone(model, B, new, temperature=0) == reference(model, B, new)[0]


def test_cached_decoding_equals_recomputing_the_window(model):
    """The logits each token is chosen from (read with a forward hook on lm_head) equal a full
    forward over the row's window, inside the window and after it slides (twice)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1, :].clone()))
    try:
        got = alone(model, RAGGED[1], 60, temperature=0)
    finally:
        hook.remove()
    expected, logits = reference(model, RAGGED[1], 60)
    assert got == expected
    assert len(seen) == 60
    for step, (ours, full) in enumerate(zip(seen, logits)):
        assert torch.allclose(ours[0], full, atol=1e-5, rtol=0), f"logits differ at step {step}"


def test_ragged_greedy_batch_equals_each_prompt_alone(model):
    together = rows(generate(model, RAGGED, 40, temperature=0))
    for row, ids in zip(together, RAGGED):
        assert row == alone(model, ids, 40, temperature=0) == reference(model, ids, 40)[0]


def test_ragged_seeded_batch_equals_each_prompt_alone(model):
    settings = dict(temperature=[1.0, 0.7, 1.3, 1.0, 0.0, 1.0], top_k=[None, 20, 0, 5, None, 50],
                    top_p=[None, 0.9, None, 0.8, None, 1.0], repetition_penalty=[1.0, 1.3, 1.0, 1.0, 1.5, 0.9])
    seeds = [11, 12, 13, 14, 15, 16]
    together = rows(generate(model, RAGGED, 40, seed=seeds, **settings))
    for i, (row, ids) in enumerate(zip(together, RAGGED)):
        mine = {k: v[i] for k, v in settings.items()}
        assert row == alone(model, ids, 40, seed=seeds[i], **mine), f"row {i} depends on its batch"
    # and one int seed seeds every row with it
    shared = rows(generate(model, RAGGED[:3], 30, temperature=1.0, seed=5))
    assert shared == [alone(model, ids, 30, temperature=1.0, seed=5) for ids in RAGGED[:3]]


def test_seed_makes_sampling_reproducible(model):
    a = list(generate(model, RAGGED, 20, temperature=1.0, seed=7))
    b = list(generate(model, RAGGED, 20, temperature=1.0, seed=7))
    c = list(generate(model, RAGGED, 20, temperature=1.0, seed=8))
    assert a == b and a != c
    torch.manual_seed(3)
    d = list(generate(model, RAGGED, 20, temperature=1.0))
    torch.manual_seed(3)  # seed None draws the row seeds from torch's generator
    assert d == list(generate(model, RAGGED, 20, temperature=1.0))


def test_a_late_row_gets_what_it_gets_alone(model):
    engine = Engine(model, max_batch=4)
    first = engine.add(A, 40, temperature=1.0, seed=1)
    events = {}
    for _ in range(7):
        for e in engine.step():
            events.setdefault(e.request, []).append(e)
    late = engine.add(B, 40, temperature=0.8, top_k=30, seed=2)
    for key, evs in run_engine(engine).items():
        events.setdefault(key[0], []).extend(evs)
    assert tokens(events[first]) == alone(model, A, 40, temperature=1.0, seed=1)
    assert tokens(events[late]) == alone(model, B, 40, temperature=0.8, top_k=30, seed=2)
    assert events[first][-1].finish_reason == "length" and len(events[first]) == 40


def test_cancel_frees_the_slot_for_a_queued_request(model):
    engine = Engine(model, max_batch=1)
    running = engine.add(A, 100, temperature=0)
    queued = engine.add(B, 10, temperature=0)
    for _ in range(3):
        assert {e.request for e in engine.step()} == {running}  # no slot for the second
    assert engine.running() == 1
    assert engine.cancel(running)
    assert engine.running() == 0 and not engine.cancel(running)
    out = run_engine(engine)
    assert list(out) == [(queued, 0)]
    assert tokens(out[(queued, 0)]) == alone(model, B, 10, temperature=0)


def test_cancel_in_the_middle_of_a_batch_keeps_the_others_intact(model):
    engine = Engine(model, max_batch=4)
    ids = [engine.add(p, 30, temperature=1.0, seed=i) for i, p in enumerate(RAGGED[:4])]
    out = {}
    for step in range(30):
        if step == 5:
            engine.cancel(ids[1])  # a slot in the middle: the last row moves into it
        for e in engine.step():
            out.setdefault(e.request, []).append(e.token)
    assert len(out[ids[1]]) == 5
    for i in (0, 2, 3):
        assert out[ids[i]] == alone(model, RAGGED[i], 30, temperature=1.0, seed=i)


def test_chunked_prefill_equals_one_prefill_and_keeps_streams_moving(model):
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    short = engine.add(A[:3], 30, temperature=0)
    out = {short: [e.token for e in engine.step()]}
    long = engine.add(B, 30, temperature=1.0, seed=9)
    first_long = None
    for step in range(100):
        if not engine.has_work():
            break
        events = engine.step()
        got = {e.request for e in events}
        if len(out[short]) < 30:
            assert short in got, "the running stream stalled during a prefill"
        if long in got and first_long is None:
            first_long = step
        for e in events:
            out.setdefault(e.request, []).append(e.token)
    assert first_long == math.ceil(len(B) / 4) - 1  # 4 prompt tokens per step, then the first token
    assert out[long] == alone(model, B, 30, temperature=1.0, seed=9)
    assert out[short] == alone(model, A[:3], 30, temperature=0)


def test_logprobs_equal_a_direct_forward(model):
    engine = Engine(model, max_batch=4)
    settings = [dict(temperature=0), dict(temperature=1.3, repetition_penalty=1.4, seed=4),
                dict(temperature=0.7, top_k=10, seed=5)]
    prompts = RAGGED[:3]
    ids = [engine.add(p, 12, logprobs=5, **s) for p, s in zip(prompts, settings)]
    last = engine.add(prompts[0], 3, temperature=0)  # logprobs=0: the chosen token's only
    out = run_engine(engine)
    for request, ids_ in zip(ids, prompts):
        context = list(ids_)
        for e in out[(request, 0)]:
            with torch.no_grad():
                full = F.log_softmax(model(torch.tensor([context]))[0][0, -1], -1)
            assert math.isclose(e.logprob, float(full[e.token]), abs_tol=1e-5)
            values, top = full.topk(5)
            assert [t for t, _ in e.top_logprobs] == top.tolist()
            assert all(math.isclose(lp, float(v), abs_tol=1e-5) for (_, lp), v in zip(e.top_logprobs, values))
            context.append(e.token)
    assert all(e.top_logprobs is None and e.logprob <= 0 for e in out[(last, 0)])


def test_n_rows_share_one_prefill_and_match_solo_seeds(model):
    prefills = []
    hook = model.register_forward_pre_hook(lambda mod, args: prefills.append(tuple(args[0].shape)))
    engine = Engine(model, max_batch=4)
    try:
        request = engine.add(B, 20, temperature=1.0, top_p=0.95, seed=21, n=2, logprobs=1)
        out = run_engine(engine)
    finally:
        hook.remove()
    assert prefills[0] == (1, len(B)) and prefills[1] == (2, 1)  # one prefill, then both rows decode
    assert tokens(out[(request, 0)]) == alone(model, B, 20, temperature=1.0, top_p=0.95, seed=21)
    assert tokens(out[(request, 1)]) == alone(model, B, 20, temperature=1.0, top_p=0.95, seed=22)
    assert tokens(out[(request, 0)]) != tokens(out[(request, 1)])


# ----------------------------------------------------------------------------- stopping and errors


def test_stop_tokens_end_a_row_and_later_steps_yield_none(model):
    free = list(generate(model, RAGGED[:3], 10, temperature=0))
    stop = free[0][0]  # row 0 stops at once; other rows stop wherever they meet it
    stopped = list(generate(model, RAGGED[:3], 10, temperature=0, stop_ids={stop}))
    for row in range(3):
        expected = [s[row] for s in free]
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        got = [s[row] for s in stopped]
        assert got[:len(expected)] == expected
        assert all(t is None for t in got[len(expected):])
    assert stopped[0][0] == stop and all(s[0] is None for s in stopped[1:])


def test_generation_ends_when_every_row_has_stopped(model):
    first = alone(model, A, 1, temperature=0)[0]
    assert len(list(generate(model, [A], 50, temperature=0, stop_ids={first}))) == 1


def test_repetition_penalty_lowers_repeated_tokens(model):
    penalty = 1.8
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1, :].clone()))
    try:
        got = alone(model, A, 15, temperature=0, repetition_penalty=penalty)
    finally:
        hook.remove()
    context = list(A)
    for step, token in enumerate(got):
        logits = seen[step][0].clone()
        repeated = torch.tensor(sorted(set(context)))
        logits[repeated] = torch.where(logits[repeated] > 0, logits[repeated] / penalty, logits[repeated] * penalty)
        assert token == int(logits.argmax())
        context.append(token)


@pytest.mark.parametrize("bad", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(repetition_penalty=0.0), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
    dict(repetition_penalty=float("inf")), dict(max_new_tokens=0), dict(logprobs=6), dict(n=5), dict(seed=1.5),
])
def test_bad_settings_are_refused_and_harm_nobody(model, bad):
    engine = Engine(model, max_batch=2)
    good = engine.add(A, 8, temperature=0)
    kw = dict(max_new_tokens=5) | bad
    with pytest.raises(ValueError):
        engine.add(B, **kw)
    out = run_engine(engine)
    assert list(out) == [(good, 0)] and tokens(out[(good, 0)]) == alone(model, A, 8, temperature=0)


@pytest.mark.parametrize("hostile", [
    dict(top_p=1e-300), dict(top_k=2**63), dict(temperature=1e300), dict(temperature=1e-300),
    dict(repetition_penalty=0.01, temperature=1e-30), dict(repetition_penalty=100.0, top_k=1, top_p=1e-300),
])
def test_extreme_valid_settings_give_tokens_and_harm_nobody(model, hostile):
    normal = dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)
    per_row = {key: [hostile.get(key, value), value] for key, value in normal.items()}
    engine = Engine(model, max_batch=2)
    wild = engine.add(A, 40, seed=3, logprobs=2, **{key: values[0] for key, values in per_row.items()})
    out = run_engine(engine)[(wild, 0)]
    assert len(out) == 40 and all(0 <= e.token < VOCAB for e in out)
    assert all(math.isfinite(e.logprob) and all(math.isfinite(lp) for _, lp in e.top_logprobs) for e in out)
    batched = rows(generate(model, [A, B], 40, seed=[3, 4], **per_row))
    assert batched[0] == tokens(out)
    assert batched[1] == alone(model, B, 40, seed=4, **normal)


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError):
        next(generate(model, [[]], 5))
    with pytest.raises(ValueError):
        next(generate(model, [[VOCAB]], 5))
    with pytest.raises(ValueError):
        next(generate(model, [A, B], 5, temperature=[1.0]))  # one value for two rows
    with pytest.raises(ValueError):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- extractive answers
# (the search itself against brute force: tests/test_extractive.py)


def spans_of(source, stop, longest=4, norm="mean"):
    n = len(source)
    runs = sorted({tuple(source[i:j]) for i in range(n) for j in range(i + 1, min(n, i + longest) + 1)})
    return Spans([str(r) for r in runs], [list(r) for r in runs], stop, norm)


def test_extractive_rows_are_batch_independent_and_leave_free_rows_alone(model):
    stop = VOCAB - 1
    sources = [prompt(15, 7), None, prompt(4, 9), None]
    spans = [None if s is None else spans_of([t for t in s if t != stop], stop) for s in sources]
    prompts = [RAGGED[0], RAGGED[2], RAGGED[3], RAGGED[5]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5)):
        batch = rows(generate(model, prompts, 10, stop_ids=[stop], spans=spans, **kw))
        solo = [alone(model, p, 10, stop_ids=[stop], spans=[s], **kw) for p, s in zip(prompts, spans)]
        free = [alone(model, p, 10, stop_ids=[stop], **kw) for p in prompts]
        assert batch == solo
        assert batch[1] == free[1] and batch[3] == free[3]  # rows without a span decode as before
        for got, span in zip(batch, spans):
            if span is not None:
                assert got[-1] == stop and got[:-1] in span.ids


def test_extractive_choices_share_the_answer_and_logprobs_are_the_models_own(model):
    stop = VOCAB - 1
    spans = spans_of([t for t in prompt(12, 21) if t != stop], stop)
    engine = Engine(model, max_batch=2)
    engine.add(A, 8, temperature=1.0, stop_ids=[stop], n=2, span=spans, logprobs=1)
    events = []
    while engine.has_work():
        events += engine.step()
    per_row = [[e for e in events if e.index == i] for i in range(2)]
    assert [e.token for e in per_row[0]] == [e.token for e in per_row[1]]
    tokens = [e.token for e in per_row[0]]
    with torch.no_grad():
        logits = model(torch.tensor([A + tokens[:-1]]))[0][0, len(A) - 1:]
    expected = F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprob for e in per_row[0]]), expected, atol=1e-4)


def test_extractive_settings_are_checked(model):
    engine = Engine(model)
    good = spans_of([1, 2, 3], 0)
    for bad in ([1, 2, 3], "abc", Spans(["x"], [[VOCAB]], 0), Spans(["x"], [[-1]], 0)):
        with pytest.raises(ValueError, match="span"):
            engine.add(A, 5, stop_ids=[0], span=bad)
    with pytest.raises(ValueError, match="stop_ids"):
        engine.add(A, 5, span=good)  # the end token must stop the row
    with pytest.raises(ValueError, match="norm"):
        Spans([], [], 0, "max")
    with pytest.raises(ValueError):
        next(generate(model, [A, B], 5, stop_ids=[0], spans=[good]))  # one span for two rows
    assert not engine.has_work()


# ----------------------------------------------------------------------------- the sampler


def sample(logits, n=1, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """n draws from one row of logits through the engine's sampler."""
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype)  # noqa: E731
    uniform = 1 - torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return sample_tokens(logits.expand(n, -1), full(temperature, torch.float32), full(top_k, torch.long),
                         full(top_p, torch.float32), uniform)


TINY = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def frequencies(tokens, size=5):
    return torch.bincount(tokens, minlength=size).float() / len(tokens)


def test_temperature_zero_is_argmax():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    out = sample_tokens(logits, torch.zeros(50), torch.zeros(50, dtype=torch.long), torch.ones(50), torch.rand(50))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy_at_any_temperature():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(2))
    hot, u = torch.full((50,), 5.0), 1 - torch.rand(50, generator=torch.Generator().manual_seed(0))
    off_k, off_p = torch.zeros(50, dtype=torch.long), torch.ones(50)
    assert torch.equal(sample_tokens(logits, hot, torch.ones(50, dtype=torch.long), off_p, u), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, hot, off_k, torch.full((50,), 1e-6), u), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, hot, off_k, torch.zeros(50), u), logits.argmax(-1))  # 1e-300 in float32


def test_a_broken_row_falls_back_to_greedy_alone():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    logits[1] = float("-inf")
    logits[1, 7] = 0.0
    logits[2, 5] = float("nan")
    u = torch.tensor([0.3, 0.5, 0.9])
    out = sample_tokens(logits, torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3), u)
    assert int(out[1]) == 7
    assert 0 <= int(out[2]) < 40
    assert int(out[0]) == int(sample_tokens(logits[:1], torch.ones(1), torch.zeros(1, dtype=torch.long),
                                            torch.ones(1), u[:1])[0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_distribution_follows_softmax(temperature):
    draws = sample(TINY, n=20000, temperature=temperature)
    expected = F.softmax(TINY[0] / temperature, -1)
    assert torch.allclose(frequencies(draws), expected, atol=0.015)


def test_top_k_keeps_the_k_likeliest_renormalised():
    freq = frequencies(sample(TINY, n=20000, top_k=2))
    assert freq[2:].sum() == 0
    assert math.isclose(float(freq[0]), float(F.softmax(TINY[0, :2], -1)[0]), abs_tol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = F.softmax(TINY[0], -1)  # about .53 .20 .12 .07 .03
    p = float(probs[:2].sum()) - 0.01  # the first two are needed to reach p, the third is not
    freq = frequencies(sample(TINY, n=20000, top_p=p))
    assert freq[2:].sum() == 0
    assert math.isclose(float(freq[0]), float(probs[0] / probs[:2].sum()), abs_tol=0.015)
