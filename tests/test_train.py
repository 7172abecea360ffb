"""train.py on tiny data and tiny models: losses, exact resume, checkpoints, stops, DDP, pretrain -> SFT.

The data directories are written (by conftest.py's `write_data`) in the format data/prepare.py and
data/prepare_sft.py produce (rows of `[tokens..., EOT, PAD...]` plus meta.json), from the
`tiny_tokenizer` fixture, so these tests do not depend on the preparation scripts. Runs go through
`train.main(argv)` in this process, except where a real process boundary is the point (Ctrl-C,
torchrun).
"""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BLOCK, ROOT, TINY_TEXT, sft_rows, write_data

import train
from data_utils import BlockData
from inference import load_run
from model import GPT, GPTConfig

TINY_MODEL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--gradient_accumulation_steps=1",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3",
              "--device=cpu", "--compile=False"]


def run(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, *flags])


def read_log(out_dir, drop=("time", "tokens_per_sec")):
    lines = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def train_lines(out_dir):
    return [line for line in read_log(out_dir) if "loss" in line]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the loss


def test_sft_loss_is_the_mean_over_answer_tokens_only(sft_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    data = BlockData(sft_dir, "train")
    x, y, mask = data.batch(np.arange(4))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=448, n_layer=1, n_head=2, n_embd=32)).eval()
    loss_sum = train.masked_loss_sum(model, x, y, mask, nullcontext())

    logits, _ = model(x)
    logp = torch.log_softmax(logits.double(), -1)
    nats, count = 0.0, 0
    for r in range(4):
        targets = y[r].tolist()
        start = targets.index(tok.answer) + 1  # answer tokens follow the separator, up to and with EOT
        end = targets.index(tok.eot)
        for t in range(start, end + 1):
            nats -= logp[r, t, targets[t]].item()
            count += 1
    assert int(mask.sum()) == count
    assert loss_sum.item() / count == pytest.approx(nats / count, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, sft_dir):
    """Rows hold different numbers of answer tokens, so a mean of micro-batch means would differ."""
    logs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch}"
        run(sft_dir, out, "--max_iters=3", "--sampling=sequential", f"--batch_size={batch}",
            f"--gradient_accumulation_steps={accum}", "--eval_interval=100")
        logs.append(train_lines(out))
    for other in logs[1:]:
        for a, b in zip(logs[0], other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    from types import SimpleNamespace

    cfg = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=None, max_iters=14)
    lrs = [train.lr_at(it, cfg) for it in range(16)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14:] == [0.1, 0.1]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_val_loss_in_the_log_equals_perplexity_py_on_the_same_blocks(tmp_path, pretrain_dir):
    """Training pads the vocabulary (448 rows for 407 tokens); load_run trims the padding. Both
    leave the padding ids out of the softmax, so the numbers agree (they differed by ~1e-3 when
    training's softmax included them)."""
    from evaluations import perplexity

    out = tmp_path / "run"
    run(pretrain_dir, out, "--max_iters=4", "--eval_interval=2")  # eval_iters * batch_size >= 6: all val blocks
    final = [line for line in read_log(out) if "val_loss" in line][-1]
    assert final["iter"] == 4
    perplexity.main(["--out_dir", str(out), "--which", "last", "--data", str(pretrain_dir), "--batch_size", "4",
                     "--device", "cpu", "--output", str(tmp_path / "ppl.json")])
    metrics = json.loads((tmp_path / "ppl.json").read_text())["metrics"]
    assert metrics["blocks"] == 6
    assert metrics["loss"] == pytest.approx(final["val_loss"], rel=1e-6, abs=0)
    assert metrics["bpc"] == pytest.approx(final["val_bpc"], rel=1e-6, abs=0)


def test_the_loss_leaves_vocabulary_padding_out_of_the_softmax():
    torch.manual_seed(0)
    padded = GPT(GPTConfig(block_size=16, vocab_size=64, n_vocab=50, n_layer=1, n_head=2, n_embd=16)).eval()
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    logits, loss = padded(x, y)
    expected = torch.nn.functional.cross_entropy(logits[..., :50].reshape(-1, 50).double(), y.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)).item())


# ----------------------------------------------------------------------------- resume and checkpoints


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_is_exact(tmp_path, pretrain_dir, sampling):
    common = ["--dropout=0.1", f"--sampling={sampling}", "--eval_interval=3", "--lr_decay_iters=8"]
    run(pretrain_dir, tmp_path / "whole", "--max_iters=8", *common)
    run(pretrain_dir, tmp_path / "parts", "--max_iters=4", *common)
    run(pretrain_dir, tmp_path / "parts", "--max_iters=8", "--init_from=resume", *common)
    whole, parts = read_log(tmp_path / "whole"), read_log(tmp_path / "parts")
    assert [line["iter"] for line in whole if "val_loss" in line] == [0, 3, 6, 8]
    assert parts == whole
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "parts" / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_drops_a_torn_last_log_line(tmp_path, pretrain_dir, capsys):
    """A kill in the middle of a write leaves half a JSON line at the end of log.jsonl."""
    common = ["--eval_interval=2", "--lr_decay_iters=6", "--sampling=sequential"]
    run(pretrain_dir, tmp_path / "whole", "--max_iters=6", *common)
    out = tmp_path / "torn"
    run(pretrain_dir, out, "--max_iters=4", *common)
    log = out / "log.jsonl"
    log.write_bytes(log.read_bytes() + b'{"schema": 1, "iter": 4, "loss": 3.1')  # no closing brace, no newline
    run(pretrain_dir, out, "--max_iters=6", "--init_from=resume", *common)
    assert "malformed lines of the training log" in capsys.readouterr().out
    assert read_log(out) == read_log(tmp_path / "whole")  # every line parses; the torn one is gone


def test_checkpoints_load_with_weights_only(tmp_path, pretrain_dir, tiny_tokenizer):
    out = tmp_path / "run"
    run(pretrain_dir, out, "--max_iters=2", "--sampling=sequential")
    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert last["iter_num"] == 2 and last["kind"] == "pretrain"
    assert last["tokenizer"] == best["tokenizer"] == tiny_tokenizer.identity.to_json()
    assert last["data_state"] == {"epoch": 0, "cursor": 8}
    assert set(last["rng"]) >= {"torch", "numpy"} and isinstance(last["rng"]["numpy"]["state"]["state"], int)
    assert "optimizer" not in best and best["best_val_loss"] == min(
        line["val_loss"] for line in read_log(out) if "val_loss" in line)
    assert last["model_args"]["vocab_size"] == 448  # 400 tokens padded to a multiple of 64
    assert last["model_args"]["n_vocab"] == tiny_tokenizer.n_vocab  # ... and the padding kept out of the loss
    assert last["schema"] == best["schema"] == 1
    assert all(line["schema"] == 1 for line in read_log(out))
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, pretrain_dir, monkeypatch):
    out = tmp_path / "run"
    run(pretrain_dir, out, "--max_iters=2")
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="simulated"):
        run(pretrain_dir, out, "--max_iters=4", "--eval_interval=1", "--init_from=resume")
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == before
    assert load(out / "last.pt")["iter_num"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, pretrain_dir):
    out = tmp_path / "run"
    run(pretrain_dir, out, "--max_iters=2", "--eval_interval=100")
    good = load(out / "last.pt")
    with pytest.raises(SystemExit, match="not finite") as stop:
        run(pretrain_dir, out, "--max_iters=20", "--eval_interval=100", "--init_from=resume",
            "--learning_rate=1e30", "--min_lr=1e30", "--warmup_iters=0", "--grad_clip=0")
    assert "last.pt" in str(stop.value.code)
    kept = load(out / "last.pt")
    assert kept["iter_num"] == 2
    for name, tensor in kept["model"].items():
        assert torch.equal(tensor, good["model"][name]) and torch.isfinite(tensor).all()


def test_scratch_refuses_to_overwrite_a_run(tmp_path, pretrain_dir):
    out = tmp_path / "run"
    run(pretrain_dir, out, "--max_iters=1")
    with pytest.raises(SystemExit, match="already holds a run"):
        run(pretrain_dir, out, "--max_iters=1")
    run(pretrain_dir, out, "--max_iters=1", "--overwrite=True")


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_saves_last_and_resuming_continues_exactly(tmp_path, pretrain_dir, signum, status):
    """Ctrl-C or SIGTERM to a real process at an arbitrary step: a non-zero exit (a stopped run is not
    a finished one: pipeline.py would mark its stage done), last.pt at that step, and the resumed
    losses equal those of a run that was never stopped (constant learning rate)."""
    out = tmp_path / "stopped"
    flags = [f"--data_dir={pretrain_dir}", *TINY_MODEL, "--eval_interval=100000", "--warmup_iters=0",
             "--min_lr=1e-2", "--sampling=sequential"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, f"--out_dir={out}", "--max_iters=100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count('"loss"') >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, output
    assert "saved" in output and "--init_from=resume" in output
    k = load(out / "last.pt")["iter_num"]
    assert k >= 3

    run(pretrain_dir, out, *flags[1:], f"--max_iters={k + 3}", "--init_from=resume")
    run(pretrain_dir, tmp_path / "whole", *flags[1:], f"--max_iters={k + 3}")
    assert train_lines(out) == train_lines(tmp_path / "whole")


# ----------------------------------------------------------------------------- fine-tuning


def test_pretrain_then_sft_then_complete(tmp_path, pretrain_dir, sft_dir):
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    run(pretrain_dir, pre, "--max_iters=6", "--eval_interval=3")
    run(sft_dir, sft, f"--init_from={pre}", "--max_epochs=1", "--eval_interval=3", "--learning_rate=3e-3")
    log = read_log(sft)
    assert log[0]["iter"] == 0 and "val_loss" in log[0]
    assert log[-1]["iter"] == math.ceil(24 / 4) and "val_loss" in log[-1]  # one epoch of 24 blocks, 4 a step
    assert all(math.isfinite(line["val_bpc"]) for line in log if "val_loss" in line)
    ckpt = load(sft / "best.pt")
    assert ckpt["kind"] == "sft" and ckpt["iter_num"] <= 6
    result = load_run(sft).complete("北京是什么？", mode="qa", max_new_tokens=8, temperature=1.0, seed=0)
    assert isinstance(result, str)
    assert load_run(sft).info["kind"] == "sft"


def test_sft_refuses_a_mismatched_block_size_or_tokenizer(tmp_path, pretrain_dir, tiny_tokenizer):
    from tokenizer import train_tokenizer

    pre = tmp_path / "pre"
    run(pretrain_dir, pre, "--max_iters=1")
    short = write_data(tmp_path / "short", tiny_tokenizer, sft_rows(tiny_tokenizer), "sft", block_size=44)
    with pytest.raises(SystemExit, match="block size 48 vs 44"):
        run(short, tmp_path / "sft1", f"--init_from={pre}", "--max_iters=1")
    other = train_tokenizer([TINY_TEXT * 2] * 10, tmp_path / "other_tok", vocab_size=300)
    foreign = write_data(tmp_path / "foreign", other, [row[:BLOCK] for row in sft_rows(other)], "sft")
    with pytest.raises(SystemExit, match="tokenizer sha256") as refused:
        run(foreign, tmp_path / "sft2", f"--init_from={pre}", "--max_iters=1")
    assert "vocabulary 448 vs 320" in str(refused.value.code)
    assert not (tmp_path / "sft2" / "last.pt").exists()


# ----------------------------------------------------------------------------- distributed


# train.py with plain SGD in place of AdamW, for the DDP equivalence below. Adam divides each
# gradient element by its own running scale, so an element whose true gradient is zero (a key bias:
# softmax ignores a shift of all keys) turns float rounding noise into a full-size step, and two
# runs that compute the same gradient differently end up apart there. SGD's step is the gradient
# times the learning rate, so equal gradients give equal weights, to the gradients' own precision.
SGD_TRAIN = """
import sys
import torch
sys.path.insert(0, {root!r})
import train

def sgd(groups, lr, betas=None, fused=None, **_):
    return torch.optim.SGD(groups, lr=lr)

torch.optim.AdamW = sgd
train.main()
"""


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_the_doubled_batch(tmp_path, sft_dir):
    """2 ranks x 2 blocks per step compute the gradient of 1 process x 4 blocks: the same loss and
    gradient norm at every step, and (with SGD, which passes the gradients through unscaled) the
    same weights after 3 steps: within 1e-5 of each weight (~100 float32 roundings) plus 0.1% of
    how far the tensor moved. Measured: at most 2.4e-5 of the movement apart; a wrongly scaled
    gradient would be ~100% apart."""
    script = tmp_path / "sgd_train.py"
    script.write_text(SGD_TRAIN.format(root=str(ROOT)))
    flags = [f"--data_dir={sft_dir}", *TINY_MODEL, "--max_iters=3", "--eval_interval=100", "--sampling=sequential"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *flags, f"--out_dir={tmp_path / 'ddp'}", "--batch_size=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    one = subprocess.run([sys.executable, str(script), *flags, f"--out_dir={tmp_path / 'one'}", "--batch_size=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    ddp_log, one_log = train_lines(tmp_path / "ddp"), train_lines(tmp_path / "one")
    assert len(ddp_log) == len(one_log) == 3
    for a, b in zip(ddp_log, one_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    run(sft_dir, tmp_path / "start", *flags[1:], "--batch_size=4", "--max_iters=0")  # the weights both start from
    a, b, start = (load(tmp_path / d / "last.pt")["model"] for d in ("ddp", "one", "start"))
    for name, tensor in a.items():
        moved = (b[name] - start[name]).abs().max().item()  # how far 3 steps took this tensor
        assert moved > 0, name
        torch.testing.assert_close(tensor, b[name], rtol=1e-5, atol=1e-3 * moved, msg=name)


def test_wandb_without_the_package_is_a_clear_error(tmp_path, pretrain_dir):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here, so the missing-package message cannot be shown")
    with pytest.raises(SystemExit, match="pip install wandb"):
        run(pretrain_dir, tmp_path / "run", "--max_iters=1", "--wandb_log=True")


MID_SAVE = """
import sys, time
import torch
sys.path.insert(0, sys.argv[2])
from checkpoint import save_checkpoint

class Slow:  # the pickler reaches this mid-save: the process sits inside save_checkpoint
    def __reduce__(self):
        print("saving", flush=True)
        time.sleep(120)
        return (int, (0,))

save_checkpoint({"model": torch.zeros(1000), "slow": Slow()}, sys.argv[1])
"""


def test_temporaries_of_a_run_killed_mid_save_are_removed_at_start(tmp_path, pretrain_dir):
    """kill -9 of a real process inside save_checkpoint leaves `.last.pt.tmpPID`; train.py removes
    it (and those of other dead pids) at start, and keeps a live process's temporaries."""
    out = tmp_path / "run"
    out.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", MID_SAVE, str(out / "last.pt"), str(ROOT)], stdout=subprocess.PIPE)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert killed.stdout.readline() == b"saving\n"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for name in (f".log.jsonl.tmp{dead.pid}", f".best.pt.tmp{live.pid}", f".notes.txt.tmp{dead.pid}"):
            (out / name).write_text("partial")
        assert (out / f".last.pt.tmp{killed.pid}").exists()  # what the kill left
        run(pretrain_dir, out, "--max_iters=1", "--eval_interval=100")
        left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
    assert left == sorted([f".best.pt.tmp{live.pid}", f".notes.txt.tmp{dead.pid}"])
    assert load(out / "last.pt")["iter_num"] == 1
