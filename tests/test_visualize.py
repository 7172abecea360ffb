"""visualize.py: a PNG from synthetic logs with malformed lines, counted and skipped; the EMA; resumed
runs; the command line."""
import json
import math

import numpy as np
import pytest

import visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, with_tokens=True, scale=1.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(0, 300, 10):
        line = {"iter": i, "loss": scale * (3 + 5 * math.exp(-i / 80)), "lr": 6e-4 * min(1, i / 50),
                "tokens_per_sec": 1234.0}
        if with_tokens:
            line["tokens"] = i * 4096
        lines.append(json.dumps(line))
        if i % 100 == 0:
            lines.append(json.dumps({"iter": i, "val_loss": scale * (3.3 + 5 * math.exp(-i / 80)),
                                     "val_ppl": 30.0, "val_bpc": 2.0}))
    lines += [
        "this is not json",
        json.dumps({"iter": 7, "loss": "nan-ish"}),   # wrong type
        json.dumps({"iter": 8, "loss": float("nan")}),  # not finite
        json.dumps(["a", "list"]),
        json.dumps({"event": "checkpoint saved"}),   # another kind of line: ignored, not malformed
        '{"iter": 310, "loss": 2.9, "lr"',            # a half-written last line
    ]
    (run_dir / "log.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return run_dir


def test_png_from_logs_with_malformed_lines(tmp_path):
    runs = [write_log(tmp_path / "pretrain"), write_log(tmp_path / "sft", with_tokens=False, scale=0.8)]
    out = tmp_path / "loss.png"
    summary = visualize.plot_runs(runs, out, smooth=0.9)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert summary == {name: {"train": 30, "eval": 3, "skipped": 5} for name in ("pretrain", "sft")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_read_log_keeps_the_last_line_of_a_repeated_iteration(tmp_path):
    (tmp_path / "log.jsonl").write_text(
        '{"iter": 0, "loss": 9.0}\n{"iter": 10, "loss": 5.0}\n{"iter": 10, "loss": 4.0}\n{"iter": 20, "loss": 3.0}\n')
    train, evals = visualize.read_log(tmp_path)
    assert [(t["iter"], t["loss"]) for t in train] == [(0, 9.0), (10, 4.0), (20, 3.0)] and evals == []


def test_ema_is_bias_corrected():
    assert np.allclose(visualize.ema([5.0, 5.0, 5.0], 0.9), [5.0, 5.0, 5.0])
    assert np.allclose(visualize.ema([1.0, 3.0], 0.0), [1.0, 3.0])
    assert np.allclose(visualize.ema([1.0, 3.0], 0.5), [1.0, (0.25 + 1.5) / 0.75])


def test_missing_log_and_bad_smoothing_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        visualize.plot_runs([tmp_path], tmp_path / "x.png")
    with pytest.raises(ValueError, match="smooth"):
        visualize.plot_runs([write_log(tmp_path / "run")], tmp_path / "x.png", smooth=1.0)


def test_command_line(tmp_path, capsys):
    run = write_log(tmp_path / "run")
    out = tmp_path / "curves.png"
    visualize.main([str(run / "log.jsonl"), "-o", str(out), "--smooth", "0.5"])
    assert out.read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "30 train points, 3 eval points, skipped 5 malformed lines" in printed


def write_timed_log(run_dir, seconds_per_iter):
    """A run whose lines carry `time` as train.py writes it; eval lines too, except the last one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"iter": i, "loss": 5 - i / 100, "lr": 1e-3, "time": i * seconds_per_iter} for i in range(0, 101, 10)]
    lines += [{"iter": 0, "val_loss": 5.0, "time": 0.0}, {"iter": 50, "val_loss": 4.6, "time": 50 * seconds_per_iter},
              {"iter": 100, "val_loss": 4.1}]
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return run_dir


def test_x_values_against_time_use_each_lines_time():
    train = [{"iter": 0, "loss": 5.0, "time": 1.0}, {"iter": 10, "loss": 4.0, "time": 21.0}]
    evals = [{"iter": 0, "val_loss": 5.0, "time": 0.5}, {"iter": 5, "val_loss": 4.5}]
    x, val_x = visualize.x_values(train, evals, "time")
    assert x.tolist() == [1.0, 21.0]
    assert val_x.tolist() == [0.5, 11.0]  # its own time, or interpolated over the train lines
    assert visualize.x_values([{"iter": 0, "loss": 1.0}], [], "time") is None
    assert visualize.x_values(train, evals, "iter")[1].tolist() == [0.0, 5.0]


def test_plot_against_time_and_a_log_without_time(tmp_path):
    fast, slow = write_timed_log(tmp_path / "fast", 0.5), write_timed_log(tmp_path / "slow", 2.0)
    out = tmp_path / "time.png"
    visualize.main([str(fast), str(slow), "-o", str(out), "--x", "time"])
    assert out.read_bytes().startswith(PNG_MAGIC)
    (tmp_path / "untimed").mkdir()
    (tmp_path / "untimed" / "log.jsonl").write_text('{"iter": 0, "loss": 5.0}\n')
    with pytest.raises(SystemExit, match="no run's log has a time field"):
        visualize.main([str(tmp_path / "untimed"), "-o", str(tmp_path / "x.png"), "--x", "time"])
    with pytest.raises(ValueError, match="x must be"):
        visualize.plot_runs([fast], tmp_path / "x.png", x="tokens")
