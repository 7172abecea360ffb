"""The network: parameter count, tied embeddings, GPT-2 init, the masked loss and the attention
paths. Generation (the KV cache, batching, sampling) is tested in test_engine.py."""
import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig

VOCAB, BLOCK = 101, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    # the GPT-2 init gives near-uniform logits; bigger weights make argmax ties impossible
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)
    return m


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
