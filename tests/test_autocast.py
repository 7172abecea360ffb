"""dtype=auto and compile=auto (issue 20): the rule's both branches, bf16 generation's promises, and
torch.compile in a real (tiny) CPU training run.

The CPU's bf16 support is forced through `inference.cpu_features` (the one detector every caller
goes through), so both branches of the rule run on any machine; the bf16 runs themselves are real
(PyTorch emulates bf16 where the CPU lacks it: slow, but the same numbers).
"""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import inference
import train
from engine import generate
from inference import auto_dtype, cpu_bf16_native, inference_dtype, load_run
from model import GPT, GPTConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=1", "--learning_rate=1e-2", "--min_lr=1e-3",
        "--device=cpu", "--arch=qwen3", "--max_iters=3", "--eval_interval=3"]
# bf16 keeps 8 bits of mantissa: a logprob of a tiny model differs from float32 by well under this
LOGPROB_TOL = 0.05


def force_cpu(monkeypatch, flags):
    monkeypatch.setattr(inference, "cpu_features", lambda: set(flags))


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, "float32"),  # this project's avx2-only EPYC: bf16 would be emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # EPYC Zen 4, Cooper Lake
    ({"avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, "bfloat16"),  # Arm with the BF16 extension (Graviton 3, Apple M2+)
    (set(), "float32"),
])
def test_auto_dtype_follows_the_cpus_bf16_support(flags, expected):
    dtype, why = auto_dtype("cpu", flags)
    assert dtype == expected
    assert ("emulated" in why) == (expected == "float32")
    assert inference_dtype("cpu", "auto", flags) == expected
    assert auto_dtype("mps")[0] == "float32"


def test_the_detector_reads_this_cpu():
    flags = inference.cpu_features()
    native, why = cpu_bf16_native()
    assert native == any(f in flags for f in inference.BF16_CPU_FLAGS)
    assert native == (auto_dtype("cpu")[0] == "bfloat16")
    with pytest.raises(ValueError, match="dtype must be"):
        inference_dtype("cpu", "int8")


@pytest.mark.parametrize("native", [False, True])
def test_training_takes_the_auto_choice_and_says_why(tmp_path, pretrain_dir, monkeypatch, capsys, native):
    force_cpu(monkeypatch, {"avx512_bf16"} if native else {"avx2"})
    out = tmp_path / "run"
    train.main([f"--data_dir={pretrain_dir}", f"--out_dir={out}", *TINY])
    said = capsys.readouterr().out
    dtype = "bfloat16" if native else "float32"
    assert f"precision: {dtype} (" in said and f"training: cpu, {dtype}," in said
    assert "compile off (" in said  # a 3-step run never repays a warm-up
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["val_loss"]) for x in lines if "val_loss" in x)
    run = load_run(out, device="cpu")  # inference takes the same choice
    assert run.info["dtype"] == dtype and next(run.model.parameters()).dtype == getattr(torch, dtype)


def test_compile_auto_rule():
    gain = train.CPU_COMPILE["bfloat16"]
    warm_s = gain["warmup_s"]
    # break-even: T eager seconds save T (1 - 1/speedup); the run must save more than the warm-up
    break_even_s = warm_s / (1 - 1 / gain["speedup"])
    flops_per_s = train.CPU_EAGER_FLOPS_PER_THREAD
    short, why_short = train.choose_compile("auto", "cpu", "bfloat16", 0.5 * break_even_s * flops_per_s)
    long, why_long = train.choose_compile("auto", "cpu", "bfloat16", 2 * break_even_s * flops_per_s)
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):  # inductor's CPU code needs one
        assert (short, long) == (False, False) and "no C++ compiler" in why_long
        return
    assert (short, long) == (False, True)
    assert "does not repay" in why_short and "repays" in why_long
    # twice the threads halve the run's time: the same run no longer repays it
    assert not train.choose_compile("auto", "cpu", "bfloat16", 2 * break_even_s * flops_per_s, threads=4)[0]
    fp32, why = train.choose_compile("auto", "cpu", "float32", 1e20)
    assert fp32 == (train.CPU_COMPILE["float32"]["speedup"] > 1), why
    assert train.choose_compile("auto", "mps", "float32", 1e20)[0] is False
    assert train.choose_compile(True, "cpu", "float32") == (True, "set")
    assert train.choose_compile(False, "cuda", "bfloat16") == (False, "set")
    with pytest.raises(train.TrainingError, match="compile must be"):
        train.choose_compile("yes", "cpu", "float32")


@pytest.mark.slow  # inductor compiles the training and the evaluation graphs: ~100 CPU-s on this machine
def test_a_compiled_cpu_run_trains_like_the_eager_one(tmp_path, pretrain_dir, capsys):
    """torch.compile on the CPU, in a real 3-step run of a 1-layer model: the same losses as eager."""
    logs = {}
    for flag in ("False", "True"):
        out = tmp_path / flag
        train.main([f"--data_dir={pretrain_dir}", f"--out_dir={out}", *TINY, f"--compile={flag}", "--dtype=float32"])
        logs[flag] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "compile on (set)" in capsys.readouterr().out
    eager, compiled = ([x.get("loss", x.get("val_loss")) for x in logs[k]] for k in ("False", "True"))
    assert len(eager) == len(compiled) >= 4
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) for a, b in zip(eager, compiled)), (eager, compiled)


# ----------------------------------------------------------------------------- bf16 generation


@pytest.fixture(scope="module")
def models():
    """A tiny qwen3 model in float32 and its bf16 copy (weights cast, as load_run does)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=32, arch="qwen3", bias=False))
    with torch.no_grad():  # sharper logits than the 0.02 init, so rounding could matter
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval(), copy.deepcopy(model).to(torch.bfloat16).eval()


PROMPTS = [[5, 17, 33, 2], [40, 41], [7, 8, 9, 10, 11, 12, 13], [90]]


def tokens(model, prompts, n=12, **kw):
    out = [[] for _ in prompts]
    for step in generate(model, prompts, n, **kw):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


def test_bf16_greedy_is_the_same_alone_and_batched(models):
    _, bf16 = models
    batched = tokens(bf16, PROMPTS, temperature=0)
    assert batched == [tokens(bf16, [p], temperature=0)[0] for p in PROMPTS]


def test_bf16_seeds_reproduce_and_batch_mates_do_not_matter(models):
    _, bf16 = models
    kw = dict(temperature=1.0, top_k=50, seed=123)
    first = tokens(bf16, PROMPTS, **kw)
    assert first == tokens(bf16, PROMPTS, **kw)
    assert first[1] == tokens(bf16, [PROMPTS[1]], **kw)[0]


def test_bf16_logprobs_are_within_tolerance_of_float32(models):
    """The bf16 engine's logprob of each token it chose against a float32 forward over the same text."""
    fp32, bf16 = models
    from engine import Engine

    engine = Engine(bf16, max_batch=4)
    ids = {engine.add(p, 16, temperature=0, logprobs=1): p for p in PROMPTS}
    events = {}
    while engine.has_work():
        for e in engine.step():
            events.setdefault(e.request, []).append(e)
    worst = 0.0
    for request, prompt in ids.items():
        chosen = [e.token for e in events[request]]
        seq = torch.tensor([prompt + chosen])
        with torch.no_grad():
            logits, _ = fp32(seq)
        ref = F.log_softmax(logits[0].float(), -1)
        for k, e in enumerate(events[request]):
            worst = max(worst, abs(e.logprob - float(ref[len(prompt) - 1 + k, e.token])))
    assert 0 < worst < LOGPROB_TOL, worst


def test_load_run_and_perplexity_take_the_dtype(tmp_path, tiny_run, pretrain_dir):
    from evaluations import perplexity

    assert load_run(tiny_run, device="cpu", dtype="float32").info["dtype"] == "float32"
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        perplexity.main(["--out_dir", str(tiny_run), "--data", str(pretrain_dir), "--dtype", dtype,
                         "--output", str(out), "--device", "cpu"])
        results[dtype] = json.loads(Path(out).read_text())
    loss32, loss16 = (results[d]["metrics"]["loss"] for d in ("float32", "bfloat16"))
    assert results["bfloat16"]["settings"]["dtype"] == "bfloat16"
    assert loss32 != loss16 and abs(loss32 - loss16) < 0.01 * loss32


# ----------------------------------------------------------------------------- the MLP option (item 5)


def test_relu2_mlp_has_swiglus_parameter_count_and_trains(tmp_path, pretrain_dir):
    shape = dict(block_size=64, vocab_size=96, n_layer=2, n_head=6, n_embd=192, arch="qwen3", bias=False)
    swiglu, relu2 = GPT(GPTConfig(**shape)), GPT(GPTConfig(**shape, mlp_act="relu2"))
    assert abs(relu2.num_params() / swiglu.num_params() - 1) < 0.01
    x = torch.tensor([[1, 2, 3, 4]])
    h = relu2.transformer.h[0].mlp
    assert torch.equal(h(relu2.transformer.wte(x)), h.down_proj(F.relu(h.up_proj(relu2.transformer.wte(x))) ** 2))
    with pytest.raises(ValueError, match="mlp_act must be"):
        GPTConfig(**shape, mlp_act="gelu")
    with pytest.raises(ValueError, match="qwen3 setting"):
        GPTConfig(block_size=64, vocab_size=96, n_layer=1, n_head=2, n_embd=32, mlp_act="relu2")
    out = tmp_path / "relu2"
    train.main([f"--data_dir={pretrain_dir}", f"--out_dir={out}", *TINY, "--mlp_act=relu2", "--compile=False"])
    run = load_run(out, device="cpu")
    assert run.model.config.mlp_act == "relu2" and run.complete("北京", max_new_tokens=3, temperature=0) is not None
    from export import hf_config

    with pytest.raises(ValueError, match="cannot be exported"):
        hf_config(run.model.config, run.tok)
