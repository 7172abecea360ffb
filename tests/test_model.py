"""The model and the generator: KV-cache decoding equals recomputation, batching and left padding
change nothing, the sampling options do what they say, and the training loss is the masked mean.

The generator's per-step logits are read with a forward hook on `lm_head` (a real PyTorch hook, no
change to model.py): during cached decoding it sees exactly the logits each token is chosen from.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, _sample, generate

VOCAB, BLOCK = 101, 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine every op of a
    2-thread pool waits for a descheduled peer (measured: 15 s instead of 0.2 s for 96 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    # the GPT-2 init gives near-uniform logits; bigger weights make argmax ties impossible
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)
    return m


def run_generate(model, prompts, steps, **kw):
    """All steps of `generate`, plus the (B, V) logits lm_head produced for each step."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1, :].clone()))
    try:
        out = list(generate(model, prompts, steps, **kw))
    finally:
        hook.remove()
    return out, seen


def recompute_logits(model, context):
    with torch.no_grad():
        return model(torch.tensor([context]))[0][0, -1]


PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [60, 2], [33, 34, 35, 36]]


def test_cached_decoding_equals_recomputing_the_context(model):
    prompt = PROMPTS[0]
    steps, logits = run_generate(model, [prompt], 20, temperature=0)
    tokens = [s[0] for s in steps]
    context = list(prompt)
    for step, token in enumerate(tokens):
        full = recompute_logits(model, context)
        assert torch.allclose(logits[step][0], full, atol=1e-5, rtol=0), f"logits differ at step {step}"
        assert token == int(full.argmax()), f"greedy token differs at step {step}"
        context.append(token)
    assert len(tokens) == 20


def test_left_padded_batch_equals_one_prompt_at_a_time(model):
    steps, logits = run_generate(model, PROMPTS, 12, temperature=0)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_logits = run_generate(model, [prompt], 12, temperature=0)
        assert [s[row] for s in steps] == [s[0] for s in alone]
        for step in range(12):
            assert torch.allclose(logits[step][row], alone_logits[step][0], atol=1e-5, rtol=0)


def test_sampled_batch_rows_are_independent_of_padding(model):
    """Per-row settings in one batch: a greedy row next to sampled rows is still the greedy one."""
    steps = list(generate(model, PROMPTS, 10, temperature=[1.5, 0.0, 1.0], seed=3))
    alone = list(generate(model, [PROMPTS[1]], 10, temperature=0.0))
    assert [s[1] for s in steps] == [s[0] for s in alone]


def test_window_slides_beyond_block_size(model):
    prompt = list(range(1, BLOCK + 10))  # already longer than the window
    steps = list(generate(model, [prompt, [7, 8]], 3 * BLOCK, temperature=1.0, seed=0))
    assert len(steps) == 3 * BLOCK
    assert all(t is not None and 0 <= t < VOCAB for s in steps for t in s)


def test_stop_tokens_end_a_row_and_later_steps_yield_none(model):
    free = list(generate(model, PROMPTS, 10, temperature=0))
    stop = free[0][0]  # row 0 stops at once; other rows stop wherever they meet it
    stopped = list(generate(model, PROMPTS, 10, temperature=0, stop_ids={stop}))
    for row in range(len(PROMPTS)):
        expected = [s[row] for s in free]
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        got = [s[row] for s in stopped]
        assert got[:len(expected)] == expected
        assert all(t is None for t in got[len(expected):])
    assert stopped[0][0] == stop and all(s[0] is None for s in stopped[1:])


def test_generation_ends_when_every_row_has_stopped(model):
    first = list(generate(model, [PROMPTS[0]], 1, temperature=0))[0][0]
    assert len(list(generate(model, [PROMPTS[0]], 50, temperature=0, stop_ids={first}))) == 1


def test_seed_makes_sampling_reproducible(model):
    a = list(generate(model, PROMPTS, 20, temperature=1.0, seed=7))
    b = list(generate(model, PROMPTS, 20, temperature=1.0, seed=7))
    c = list(generate(model, PROMPTS, 20, temperature=1.0, seed=8))
    assert a == b and a != c


def test_repetition_penalty_lowers_repeated_tokens(model):
    prompt, penalty = PROMPTS[0], 1.8
    steps, raw = run_generate(model, [prompt], 15, temperature=0, repetition_penalty=penalty)
    plain, _ = run_generate(model, [prompt], 15, temperature=0)
    context = list(prompt)
    for step, (token,) in enumerate(steps):
        logits = raw[step][0].clone()
        seen = torch.tensor(sorted(set(context)))
        penalised = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        assert (penalised < logits[seen]).all()
        logits[seen] = penalised
        assert token == int(logits.argmax())
        context.append(token)
    assert len(set(context[len(prompt):])) >= len({t for (t,) in plain})  # repeats less than greedy


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError):
        next(generate(model, [[]], 5))
    with pytest.raises(ValueError):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- _sample


def sample(logits, n=1, temperature=1.0, top_k=None, top_p=None, seed=0):
    """n draws from one row of logits through the generator's sampler."""
    rows = logits.expand(n, -1)
    col = lambda v, dtype: None if v is None else torch.full((n, 1), v, dtype=dtype)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    return _sample(rows, col(temperature, torch.float32), col(top_k, torch.long), col(top_p, torch.float32), gen)


TINY = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def frequencies(tokens, size=5):
    return torch.bincount(tokens, minlength=size).float() / len(tokens)


def test_temperature_zero_is_argmax():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    out = _sample(logits, torch.zeros(50, 1), None, None, torch.Generator().manual_seed(0))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy_at_any_temperature():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(2))
    hot = torch.full((50, 1), 5.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(_sample(logits, hot, torch.ones(50, 1, dtype=torch.long), None, gen), logits.argmax(-1))
    assert torch.equal(_sample(logits, hot, None, torch.full((50, 1), 1e-6), gen), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_distribution_follows_softmax(temperature):
    draws = sample(TINY, n=20000, temperature=temperature, top_k=None, top_p=1.0)
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


# ----------------------------------------------------------------------------- the model itself


def test_parameter_count_matches_the_architecture():
    V, T, L, d = 97, 16, 3, 24
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=4, n_embd=d))
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = V * d + T * d + L * per_block + 2 * d  # token embeddings counted once: tied to lm_head
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == total - T * d


def test_output_layer_is_tied_to_token_embeddings(tmp_path):
    m = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    assert m.lm_head.weight is m.transformer.wte.weight
    torch.save(m.state_dict(), tmp_path / "m.pt")
    fresh = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, m.lm_head.weight)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    L = 4
    m = GPT(GPTConfig(block_size=64, vocab_size=2000, n_layer=L, n_head=4, n_embd=256))
    h = m.transformer.h[0]
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert abs(h.attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(h.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    residual = 0.02 / math.sqrt(2 * L)
    for proj in (h.attn.c_proj.weight, h.mlp.c_proj.weight):
        assert abs(proj.std().item() - residual) < residual * 0.05
    assert h.attn.c_attn.bias.abs().sum() == 0
    assert torch.equal(h.ln_1.weight, torch.ones(256))


def test_masked_loss_is_the_mean_over_masked_positions(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (3, 10), generator=gen)
    y = torch.randint(0, VOCAB, (3, 10), generator=gen)
    mask = torch.rand(3, 10, generator=gen) > 0.5
    logits, loss = model(x, y, loss_mask=mask)
    nll = -F.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    by_hand = sum(nll[i, j] for i in range(3) for j in range(10) if mask[i, j]) / int(mask.sum())
    assert torch.allclose(loss, by_hand, atol=1e-5)
    _, unmasked = model(x, y)
    assert torch.allclose(unmasked, nll.mean(), atol=1e-5)
    _, nothing = model(x, y, loss_mask=torch.zeros_like(mask))
    assert nothing.item() == 0.0  # an all-masked batch gives 0, not NaN


def test_is_causal_path_equals_an_explicit_mask(model):
    x = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        implicit, _ = model(x)
        mask = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()[None, None]
        explicit, _ = model(x, attn_mask=mask, pos=torch.arange(BLOCK))
    assert torch.allclose(implicit, explicit, atol=1e-5, rtol=0)
