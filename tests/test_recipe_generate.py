"""Generation with the qwen3 architecture through the shared generator (`generate`, `KVCache`):
cached decoding equals recomputing the context, and a left-padded batch equals each prompt alone.

These use model.generate, which is moving to engine.py; the lead adapts the import there (and the
GQA case once the cache is sized by n_kv_head). test_recipe.py tests the cache contract itself
(shapes with grouped-query attention) without the generator.
"""
import pytest
import torch

from model import GPT, GPTConfig, generate

VOCAB, BLOCK = 101, 32
PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [60, 2], [33, 34, 35, 36]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(arch="qwen3", block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                      tie_embeddings=False)).eval()
    with torch.no_grad():  # weights far from the init: no argmax ties, every part of the model matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def greedy_with_logits(model, prompts, steps):
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1, :].clone()))
    try:
        out = list(generate(model, prompts, steps, temperature=0))
    finally:
        hook.remove()
    return out, seen


def test_qwen3_cached_decoding_equals_recomputing_the_context(model):
    prompt = PROMPTS[0]
    steps, logits = greedy_with_logits(model, [prompt], 20)
    context = list(prompt)
    for step, (token,) in enumerate(steps):
        with torch.no_grad():
            full = model(torch.tensor([context]))[0][0, -1]
        torch.testing.assert_close(logits[step][0], full, atol=1e-5, rtol=0)
        assert token == int(full.argmax())
        context.append(token)


def test_qwen3_left_padded_batch_equals_one_prompt_at_a_time(model):
    steps, logits = greedy_with_logits(model, PROMPTS, 12)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_logits = greedy_with_logits(model, [prompt], 12)
        assert [s[row] for s in steps] == [s[0] for s in alone]
        for step in range(12):
            torch.testing.assert_close(logits[step][row], alone_logits[step][0], atol=1e-5, rtol=0)


def test_qwen3_window_slides_beyond_block_size(model):
    steps = list(generate(model, [list(range(1, BLOCK + 10)), [7, 8]], 2 * BLOCK, temperature=1.0, seed=0))
    assert len(steps) == 2 * BLOCK and all(0 <= t < VOCAB for s in steps for t in s)
