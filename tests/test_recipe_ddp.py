"""Muon under DDP: two gloo processes with half the batch each train what one process with the whole
batch does (qwen3, Muon for the matrices, AdamW for the rest).

Tolerances that cannot flake: Muon orthogonalises in bfloat16, so float32 rounding differences of
the all-reduced gradient may flip a bfloat16 rounding. The first step's loss and gradient norm
(before any update) must agree to float32 rounding; the final weights must agree to within 5% of
how far training moved them (a rank that trained on its own half batch, or skipped the
all-reduce, misses by far more than that).
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_train import TINY_MODEL, load, run, train_lines

RECIPE = ["--arch=qwen3", "--n_head=2", "--n_kv_head=1", "--optimizer=muon", "--muon_lr=0.05", "--lr_schedule=wsd"]


@pytest.mark.slow
def test_two_ddp_processes_with_muon_equal_one_process_with_the_doubled_batch(tmp_path, sft_dir):
    flags = [f"--data_dir={sft_dir}", *TINY_MODEL, *RECIPE, "--max_iters=3", "--eval_interval=100",
             "--sampling=sequential"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *flags, f"--out_dir={tmp_path / 'ddp'}", "--batch_size=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "muon" in done.stdout
    run(sft_dir, tmp_path / "one", *flags[1:], "--batch_size=4")
    run(sft_dir, tmp_path / "init", *flags[1:], "--batch_size=4", "--max_iters=0")

    ddp, one = train_lines(tmp_path / "ddp"), train_lines(tmp_path / "one")
    assert len(ddp) == len(one) == 3
    assert ddp[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert ddp[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    for a, b in zip(ddp[1:], one[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    a, b, init = (load(tmp_path / name / "last.pt")["model"] for name in ("ddp", "one", "init"))
    for name, start in init.items():
        moved = (b[name] - start).norm()
        assert moved > 0, name  # every parameter trained
        assert (a[name] - b[name]).norm() <= 0.05 * moved, name
    assert len(load(tmp_path / "ddp" / "last.pt")["optimizer"]["muon"]["state"]) > 0
    assert torch.is_tensor(a["transformer.h.0.attn.q_proj.weight"])
