"""Multi-node training on one machine: two torchrun launchers (`--nnodes=2`, c10d rendezvous on
loopback, gloo, one CPU process each) train exactly what one launcher with `--nproc_per_node=2`
trains; validation scores the same blocks whatever the world size; a run resumes under another.

The comparisons: the two-launcher and one-launcher runs are the same computation (same ranks, same
collectives), so their logs and weights are equal bit for bit. A single process with
batch_size=4 trains the same global batch, so it agrees to float32 rounding, and validates on the
same 12 blocks (3 global batches of 4; the old rule, eval_iters x batch_size per rank, took 6 on
two ranks and 12 on one). Tolerance: rel 1e-4 on losses after AdamW steps, 1e-6 before any step.
"""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, pretrain_rows, write_data
from test_train import TINY_MODEL, load, read_log, run

FLAGS = ["--batch_size=2", "--eval_iters=3", "--eval_interval=2", "--lr_decay_iters=6", "--sampling=sequential"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launcher_flags, data_dir, out_dir, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_flags, str(ROOT / "train.py"),
           f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, *FLAGS, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return "".join(outs)


def by_iter(log, key):
    return {line["iter"]: line[key] for line in log if key in line}


@pytest.mark.slow
def test_two_launchers_train_as_one_and_resume_under_another_world_size(tmp_path, tiny_tokenizer):
    pretrain_dir = write_data(tmp_path / "data", tiny_tokenizer, pretrain_rows(tiny_tokenizer, n=50), "pretrain",
                              n_val=20)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                       "--rdzv_id=minigpt-test"], pretrain_dir, tmp_path / "nodes", "--max_iters=4") for _ in range(2)]
    out_nodes = finish(nodes)
    one = finish([torchrun(["--standalone", "--nproc_per_node=2"], pretrain_dir, tmp_path / "launcher",
                           "--max_iters=4")])
    for out in (out_nodes, one):
        assert "2 process(es)" in out and "the 2 ranks hold identical weights" in out  # checked at each eval
        assert "validating on 12 of 20 blocks" in out
    log_nodes, log_one = read_log(tmp_path / "nodes"), read_log(tmp_path / "launcher")
    assert log_nodes == log_one and len(by_iter(log_nodes, "loss")) == 4 and len(by_iter(log_nodes, "val_loss")) == 3
    a, b = load(tmp_path / "nodes" / "last.pt"), load(tmp_path / "launcher" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    # one process with the same global batch: the same validation blocks and losses
    run(pretrain_dir, tmp_path / "single", *FLAGS, "--batch_size=4", "--max_iters=6")
    log_single = read_log(tmp_path / "single")
    assert by_iter(log_nodes, "val_loss")[0] == pytest.approx(by_iter(log_single, "val_loss")[0], rel=1e-6)
    for key in ("loss", "val_loss"):
        for it, value in by_iter(log_nodes, key).items():
            assert value == pytest.approx(by_iter(log_single, key)[it], rel=1e-4), (key, it)

    # the two-node run continues in one process (world size 2 -> 1) where the single run went on
    shutil.copytree(tmp_path / "nodes", tmp_path / "resumed")
    run(pretrain_dir, tmp_path / "resumed", *FLAGS, "--batch_size=4", "--max_iters=6",
        "--init_from=resume")
    log_resumed = read_log(tmp_path / "resumed")
    assert sorted(by_iter(log_resumed, "loss")) == [0, 1, 2, 3, 4, 5]
    for key in ("loss", "val_loss"):
        for it in (4, 5, 6):
            if it in by_iter(log_single, key):
                assert by_iter(log_resumed, key)[it] == pytest.approx(by_iter(log_single, key)[it], rel=1e-4)
