"""Correctness on the accelerator: what only a GPU run can break (bf16 kernels, torch.compile, CUDA
RNG state in checkpoints). Marked `gpu`; bench/gpu_check.py runs them.

They run on CUDA when it is there and skip otherwise, except that `GPU_CHECK_DEVICE=cpu` (what
`gpu_check.py --smoke` sets) runs the same code on the CPU, so CI proves the tests themselves work.
"""
import os

import pytest
import torch

from engine import Engine
from model import GPT, GPTConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device():
    wanted = os.environ.get("GPU_CHECK_DEVICE")
    if wanted:
        return wanted
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (GPU_CHECK_DEVICE=cpu runs these tests on the CPU)")
    return "cuda"


def tiny(arch, device, dtype=torch.float32, block_size=64):
    torch.manual_seed(0)
    extra = dict(n_kv_head=2, tie_embeddings=False) if arch == "qwen3" else {}
    config = GPTConfig(arch=arch, block_size=block_size, vocab_size=256, n_layer=2, n_head=4, n_embd=64,
                       bias=arch == "gpt2", **extra)
    return GPT(config).to(device, dtype).eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_cached_decoding_matches_recomputing_in_bf16(device, arch):
    """Greedy decoding through the KV cache, beyond the window, against full forwards over the same
    tokens: bf16 rounding differs between the two paths, so log-probabilities agree within bf16's
    precision and the greedy choice agrees almost everywhere."""
    model = tiny(arch, device, torch.bfloat16, block_size=32)
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(model, max_batch=1)
    engine.add(prompt, 40, temperature=0)
    events = []
    while engine.has_work():
        events += engine.step()
    window = model.config.block_size - 1
    context, agree, worst = prompt[-window:], 0, 0.0
    with torch.no_grad():
        for event in events:
            logprobs = model(torch.tensor([context], device=device))[0][0, -1].float().log_softmax(-1)
            agree += int(logprobs.argmax()) == event.token
            worst = max(worst, abs(float(logprobs[event.token]) - event.logprob))
            # the engine's window: once a row's cache is full it keeps the last half (with the new token)
            full = len(context) == window
            context = context + [event.token]
            if full:
                context = context[-(window // 2):]
    assert worst < 0.15, worst
    assert agree >= 0.9 * len(events), (agree, len(events))


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_compiled_loss_equals_eager(device, arch):
    model = tiny(arch, device).train()
    x = torch.randint(0, 256, (4, 63), generator=torch.Generator().manual_seed(2)).to(device)
    backend = "inductor" if device == "cuda" else "aot_eager"  # CPU: the same tracing, no C++ build
    compiled = torch.compile(model, backend=backend)
    bf16 = device == "cuda"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        eager = model(x, x)[1]
        traced = compiled(x, x)[1]
    assert abs(float(eager) - float(traced)) <= (2e-2 if bf16 else 1e-5) * abs(float(eager))
    traced.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_resume_is_exact_on_the_device(device, tmp_path, tiny_tokenizer):
    """train.py on the device: 4 steps, stop, resume to 8 equals 8 straight (losses and weights).
    On CUDA with compile, kernels are deterministic for a fixed shape on one GPU, so this is exact
    up to bf16's reproducibility; a tolerance of 1e-3 on the loss keeps it meaningful."""
    import json

    from conftest import pretrain_rows, write_data
    from test_train import TINY_MODEL

    import train

    data = write_data(tmp_path / "data", tiny_tokenizer, pretrain_rows(tiny_tokenizer), "pretrain")
    flags = [f for f in TINY_MODEL if not f.startswith(("--device", "--compile"))]
    common = [f"--data_dir={data}", *flags, f"--device={device}", "--eval_interval=4", "--lr_decay_iters=8",
              "--dropout=0.1"]
    train.main([f"--out_dir={tmp_path / 'whole'}", "--max_iters=8", *common])
    train.main([f"--out_dir={tmp_path / 'parts'}", "--max_iters=4", *common])
    train.main([f"--out_dir={tmp_path / 'parts'}", "--max_iters=8", "--init_from=resume", *common])

    def losses(run):
        lines = [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines() if x.strip()]
        return [(x["iter"], x["loss"]) for x in lines if "loss" in x]

    whole, parts = losses("whole"), losses("parts")
    assert [i for i, _ in whole] == [i for i, _ in parts]
    tolerance = 1e-3 if device == "cuda" else 0.0
    assert all(abs(a - b) <= tolerance for (_, a), (_, b) in zip(whole, parts)), (whole, parts)
