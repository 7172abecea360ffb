"""Max-likelihood span search (extractive.py): the trie scorer equals scoring every candidate alone
with a plain full forward, the candidates are what the docstring says, and an answer whose
characters sit inside merged passage tokens can be emitted.

The reference (`brute_force`) runs `prompt + tok.encode(span) + [end]` through the model with no
cache and sums the log-softmax at each target; `score_spans` must give the same numbers for every
candidate, with rows small enough that subtrees are split and ancestor chains repeated.
"""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import extractive
from engine import SlotCache, generate
from extractive import Spans, answer_spans, candidate_texts, choose, score_spans
from model import GPT, GPTConfig

VOCAB, BLOCK, END = 61, 64, 60

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    extra = {"n_kv_head": 1, "tie_embeddings": False} if arch == "qwen3" else {}
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, arch=arch, **extra))
    with torch.no_grad():  # bigger block weights: clear differences between candidates (no near-ties)
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("transformer.h."):
                p.mul_(10)
    return model.eval()


def random_ids(n, seed, high=END):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def brute_force(model, prompt, seqs, end):
    """log P(seq + [end] | prompt) for each seq, each by its own full forward (no cache)."""
    out = []
    for seq in seqs:
        logits, _ = model(torch.tensor([prompt + seq]))
        logp = F.log_softmax(logits[0].float(), -1)
        targets = seq + [end]
        out.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(targets)))
    return np.array(out)


@torch.no_grad()
def prompt_cache(model, prompt):
    cache = SlotCache(model.config, 1, "cpu", torch.float32)
    cache.plan(slice(0, 1), 0, len(prompt))
    logits, _ = model(torch.tensor([prompt]), cache=cache, pos=torch.arange(len(prompt))[None])
    return cache.k[:, 0, :, :len(prompt)], cache.v[:, 0, :, :len(prompt)], logits[0, -1]


def runs(source, longest):
    """Every contiguous run of `source` up to `longest` tokens, once each (repeats share prefixes)."""
    seen = {tuple(source[i:j]) for i in range(len(source)) for j in range(i + 1, min(len(source), i + longest) + 1)}
    return [list(s) for s in sorted(seen)]


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
@pytest.mark.parametrize("row_nodes", [3, 128])  # 3: subtrees split across rows, ancestors repeated
def test_span_search_scores_equal_brute_force(arch, row_nodes, monkeypatch):
    monkeypatch.setattr(extractive, "ROW_NODES", row_nodes)
    monkeypatch.setattr(extractive, "ROWS_PER_FORWARD", 2)
    model = tiny_model(arch)
    for seed in range(3):
        prompt, source = random_ids(15 + seed, seed), random_ids(7, 100 + seed) * 2 + random_ids(5, 200 + seed)
        seqs = runs(source, 6)
        k, v, last = prompt_cache(model, prompt)
        logprob, n_tokens = score_spans(model, k, v, last, seqs, END)
        expected = brute_force(model, prompt, seqs, END)
        assert np.allclose(logprob, expected, atol=1e-4), (arch, seed, np.abs(logprob - expected).max())
        assert n_tokens.tolist() == [len(s) + 1 for s in seqs]
        for norm in extractive.NORMS:  # the choice is the brute-force argmax
            want = expected if norm == "sum" else expected / n_tokens
            assert choose(logprob, n_tokens, norm) == int(np.argmax(want))


@pytest.mark.parametrize("norm", extractive.NORMS)
def test_extractive_rows_emit_the_brute_force_best_span_with_their_own_logprobs(norm):
    """Through engine.generate (prefill, search on the slot cache, then the planned tokens)."""
    model = tiny_model("qwen3", seed=1)
    chosen = set()
    for seed in range(4):
        prompt, source = random_ids(12, 300 + seed), random_ids(10, 400 + seed)
        seqs = runs(source, 5)
        spans = Spans([str(s) for s in seqs], seqs, END, norm)
        expected = brute_force(model, prompt, seqs, END)
        if norm == "mean":
            expected = expected / np.array([len(s) + 1 for s in seqs])
        best = seqs[int(np.argmax(expected))]
        for temperature in (0.0, 1.0):  # the answer is the likeliest span, not a draw
            got = [t for (t,) in generate(model, [prompt], 8, temperature=temperature, seed=seed, stop_ids=[END],
                                          spans=[spans])]
            assert got == best + [END], (norm, seed, temperature)
        chosen.add(len(best))
    if norm == "mean":  # the sum favours one-token answers on this model; the mean's winners vary in length
        assert len(chosen) > 1


def test_no_candidate_is_an_empty_answer():
    model = tiny_model("gpt2")
    empty = Spans([], [], END)
    assert [t for (t,) in generate(model, [random_ids(9, 1)], 8, stop_ids=[END], spans=[empty])] == [END]


def test_candidates_are_substrings_on_one_line_with_no_outer_whitespace():
    text = "长江 发源于青海。\n黄河流经九省！"
    got = candidate_texts(text, max_chars=4)
    assert len(got) == len(set(got))
    lines = text.split("\n")
    assert all(any(c in line for line in lines) and c == c.strip() and 1 <= len(c) <= 4 for c in got)
    everything = {line[i:j] for line in lines for i in range(len(line))
                  for j in range(i + 1, min(len(line), i + 4) + 1)}
    assert set(got) == {c for c in everything if c == c.strip()}
    two = "长江发源于青海。黄河流经九省。"
    gated = candidate_texts(two, max_chars=4, question="黄河流经几个省？", gate=1)
    assert "九省" in gated and "长江" not in gated and set(gated) <= set(candidate_texts(two, 4))


def test_an_answer_inside_merged_passage_tokens_can_be_emitted(tiny_tokenizer):
    """The passage spells 长河 inside a larger token (二长河), so no run of the passage's tokens is
    长河's own token; the candidate is tok.encode("长河"), and the engine emits it when it is the likeliest."""
    tok = tiny_tokenizer
    passage, question = "黄河是中国第二长河", "黄河是什么？"
    passage_ids, answer_ids = tok.encode(passage), tok.encode("长河")
    n = len(passage_ids)
    runs_of_passage = {tuple(passage_ids[i:j]) for i in range(n) for j in range(i + 1, n + 1)}
    assert tuple(answer_ids) not in runs_of_passage  # the old copying decoder could never say it
    spans = answer_spans(tok, passage, question)
    assert "长河" in spans.texts
    # a model that prefers exactly the answer's tokens, then the end token: a bias on the output layer
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.lm_head = torch.nn.Linear(16, tok.n_vocab, bias=True)
        model.lm_head.weight.zero_()
        model.lm_head.bias.fill_(-5.0)
        model.lm_head.bias[answer_ids + [tok.eot]] = 5.0
    prompt = tok.encode_passage_qa(passage, question)
    out = [t for (t,) in generate(model, [prompt], 8, stop_ids=[tok.eot], spans=[spans])]
    assert out == answer_ids + [tok.eot] and tok.decode(out) == "长河"
    assert spans.texts[spans.chosen] == "长河"
