"""The checkpoint format: saving, loading, finding checkpoints, and naming one by path and sha256.

Nothing else lives here (the loaded model as front ends use it is inference.py), so every module
may import this one and it imports none of the project's modules but two leaves (data_utils for the
atomic write, tokenizer for the file hash). docs/FORMATS.md lists the keys a checkpoint holds.

- `save_checkpoint` writes through `data_utils.atomic_write` (temporary file, fsync, rename): a
  crash mid-save leaves the previous checkpoint intact. It stamps the format version
  (`"schema": SCHEMA`); checkpoints from before the stamp load as version 1.
- Checkpoints hold only tensors and plain Python values, so `load_checkpoint` uses
  `torch.load(weights_only=True)`: a checkpoint from a stranger cannot run code. A file that is
  not a checkpoint, or one that would run code, raises `CheckpointError` with a one-line message;
  any other failure (out of memory, a missing or unreadable file) stays what it is.
- A run that depends on another run's checkpoint (a LoRA adapter on its base, DPO on its reference
  model) records it as `checkpoint_reference(path)` = {path, sha256} and reads it back with
  `load_referenced`, which refuses a file whose content changed.
"""
import pickle
from pathlib import Path

import torch

from data_utils import atomic_write
from tokenizer import file_sha256

SCHEMA = 1  # the checkpoint format version (docs/FORMATS.md)


class CheckpointError(ValueError):
    """Not a checkpoint this project can load (or one it refuses to load); the message says which."""


def save_checkpoint(obj, path):
    with atomic_write(path) as f:
        torch.save({**obj, "schema": SCHEMA}, f)


def load_checkpoint(path, device="cpu"):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                                  "values, and loading those could run code; it was not written by train.py") from None
        raise CheckpointError(f"{path} is not a checkpoint (unpickling failed: {str(e).splitlines()[0]})") from None
    except (EOFError, KeyError, ValueError) as e:  # an empty file, text, a legacy-format stranger
        raise CheckpointError(f"{path} is not a checkpoint ({type(e).__name__}: {e})") from None
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError) or "PytorchStreamReader" not in str(e):
            raise
        raise CheckpointError(f"{path} is not a checkpoint, or is truncated (its zip archive is unreadable)") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or not ({"model", "lora"} & set(ckpt)):
        raise CheckpointError(f"{path} is not a MiniGPT-zh checkpoint (it has no model_args and model/lora)")
    if ckpt.get("schema", 1) > SCHEMA:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['schema']}, newer than this code's {SCHEMA}: "
                              "update the code")
    return ckpt


def find_checkpoint(out_dir, which="best"):
    """`best.pt`, else `last.pt` (a run stopped before its first evaluation has only that)."""
    out_dir = Path(out_dir)
    for name in (f"{which}.pt", "best.pt", "last.pt"):
        if (out_dir / name).exists():
            return out_dir / name
    raise FileNotFoundError(f"no checkpoint (best.pt / last.pt) in {out_dir}")


def checkpoint_reference(path):
    """How a run names a checkpoint it depends on (an adapter's base, DPO's reference model): the
    file's absolute path and sha256."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": file_sha256(path)}


def load_referenced(reference, what, hint=""):
    """The checkpoint a reference names, refused (CheckpointError) unless its sha256 still matches;
    `what` names it in messages, `hint` says what to do when the file is missing."""
    path = Path(reference["path"])
    if not path.exists():
        raise FileNotFoundError(f"{what} is missing: {path}{hint}")
    digest = file_sha256(path)
    if digest != reference["sha256"]:
        raise CheckpointError(f"{what}, {path}, changed since this run used it (sha256 {digest[:12]}, expected "
                              f"{reference['sha256'][:12]}); refusing to use it")
    return load_checkpoint(path)
