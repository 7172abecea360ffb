"""checkpoint.py, the format: typed load errors (and only for files that are not checkpoints), the
schema stamp, hash-checked references, and the one-way dependencies between the modules."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from checkpoint import SCHEMA, CheckpointError, checkpoint_reference, load_checkpoint, load_referenced, save_checkpoint


class RunsCode:
    def __reduce__(self):
        return os.getpid, ()


def tiny_checkpoint():
    return {"model": {"w": torch.ones(2)}, "model_args": {"n_layer": 1}, "iter_num": 3}


def test_save_stamps_the_schema_and_a_checkpoint_without_one_still_loads(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "a.pt")
    ckpt = load_checkpoint(tmp_path / "a.pt")
    assert ckpt["schema"] == SCHEMA == 1 and ckpt["iter_num"] == 3
    torch.save(tiny_checkpoint(), tmp_path / "old.pt")  # written before the stamp existed
    assert "schema" not in load_checkpoint(tmp_path / "old.pt")
    torch.save({**tiny_checkpoint(), "schema": SCHEMA + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(tmp_path / "new.pt")


def test_files_that_are_not_checkpoints_raise_checkpoint_error(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "text.pt": b"hello", "empty.pt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="not a checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"just": torch.ones(1)}, tmp_path / "stranger.pt")
    with pytest.raises(CheckpointError, match="not a MiniGPT-zh checkpoint"):
        load_checkpoint(tmp_path / "stranger.pt")


def test_a_pickle_that_would_run_code_is_refused_without_suggesting_to_allow_it(tmp_path):
    torch.save({**tiny_checkpoint(), "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(refused.value)
    assert "refusing to load" in message and "could run code" in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), OSError(5, "Input/output error"),
                                   RuntimeError("CUDA error: an illegal memory access")])
def test_out_of_memory_and_io_errors_stay_what_they_are(tmp_path, monkeypatch, error):
    """Only "this is no checkpoint" becomes CheckpointError; a full GPU or a failing disk must not
    read as a bad file."""
    save_checkpoint(tiny_checkpoint(), tmp_path / "good.pt")

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(type(error)) as raised:
        load_checkpoint(tmp_path / "good.pt")
    assert raised.value is error and not isinstance(raised.value, CheckpointError)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_reference_refuses_a_changed_file(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "base.pt")
    reference = checkpoint_reference(tmp_path / "base.pt")
    assert load_referenced(reference, "the base")["iter_num"] == 3
    save_checkpoint({**tiny_checkpoint(), "iter_num": 4}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="the base, .* changed since this run used it"):
        load_referenced(reference, "the base")
    (tmp_path / "base.pt").unlink()
    with pytest.raises(FileNotFoundError, match="the base is missing"):
        load_referenced(reference, "the base", hint=" (hint)")


def test_dependencies_run_one_way():
    """checkpoint.py (the format) <- lora.py <- inference.py (the front end): importing a module
    never pulls in one further along."""
    code = ("import sys; import {0}; "
            "print(sorted(m for m in ('checkpoint', 'lora', 'inference', 'dpo', 'model') if m in sys.modules))")
    seen = {}
    for name in ("checkpoint", "lora", "inference"):
        done = subprocess.run([sys.executable, "-c", code.format(name)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        seen[name] = done.stdout.strip()
    assert seen == {"checkpoint": "['checkpoint']", "lora": "['checkpoint', 'lora', 'model']",
                    "inference": "['checkpoint', 'inference', 'lora', 'model']"}
