"""Low-rank adapters (LoRA) for the GPT's linear layers, written here rather than taken from PEFT.

    python train.py config/train_config_sft.py --lora_rank=8 --lora_alpha=16 --lora_targets=attn,mlp
    python lora.py merge --out_dir out/sft_lora --to out/sft_merged

Design choices:
- `LoRALinear` subclasses nn.Linear and keeps the base `weight`/`bias` under their own names, so a
  plain checkpoint loads into an adapted model unchanged and merging is just "add B @ A * scale to
  the weight and go back to nn.Linear". The adapter path is `dropout(x) @ A^T @ B^T * alpha/rank`
  with A Kaiming-uniform (as nn.Linear initialises its weight) and B zero: a fresh adapter leaves
  the model's outputs exactly as they were.
- `apply_lora` freezes everything else (embeddings, LayerNorms, biases, the tied output layer):
  only A and B train, so the optimizer holds state for them alone, and a checkpoint holds only
  them (`lora_state_dict`).
- An adapter checkpoint names its base checkpoint file by path and sha256 (keys `lora`,
  `lora_config`, `base`, and no `model`; `checkpoint.checkpoint_reference`). Loading checks the
  hash, so an adapter is never applied to weights it was not trained on (a base run that trained
  on and overwrote its best.pt, say).
- For inference the adapter is merged (`model_from_lora_checkpoint`), so `inference.load_run`
  hands sample.py, server.py, the Gradio app and export.py a plain GPT that runs at full speed.
- Of the project's modules this one imports only the checkpoint format (and the model and
  tokenizer leaves); inference.py imports it, never the other way round.
"""
import argparse
import math
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (
    CheckpointError,
    checkpoint_reference,
    find_checkpoint,
    load_checkpoint,
    load_referenced,
    save_checkpoint,
)
from model import GPT, GPTConfig
from tokenizer import TokenizerId

# which nn.Linear modules (by their name's ending) each target family covers, in gpt2 and in qwen3
TARGETS = {"attn": ("attn.c_attn", "attn.c_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"),
           "mlp": ("mlp.c_fc", "mlp.c_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen weight plus a trainable low-rank update B @ A scaled by alpha/rank."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight to discard
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # share, not copy, the base tensors
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged(self):
        """A plain nn.Linear whose weight includes the adapter's update."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scale)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def parse_targets(targets):
    """'attn,mlp' or ('attn', 'mlp') -> the target families, checked; unknown names are an error."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora targets must be a non-empty subset of {sorted(TARGETS)}, not {targets!r}")
    return tuple(t for t in TARGETS if t in names)


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_lora(model, rank, alpha, targets=("attn", "mlp"), dropout=0.0):
    """Adapt the targeted linear layers in place, freeze everything else; returns the model."""
    if rank <= 0:
        raise ValueError(f"lora rank must be positive, not {rank}")
    suffixes = tuple(suffix for family in parse_targets(targets) for suffix in TARGETS[family])
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [name for name, m in model.named_modules() if type(m) is nn.Linear and name.endswith(suffixes)]
    if not chosen:
        raise ValueError(f"no linear layer matches the lora targets {targets!r}")
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def lora_config(rank, alpha, targets, dropout):
    """The settings an adapter checkpoint records, in the form `apply_lora` takes back."""
    return {"rank": int(rank), "alpha": float(alpha), "targets": ",".join(parse_targets(targets)),
            "dropout": float(dropout)}


def lora_state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(LORA_KEYS)}


def load_lora(model, state):
    """Load adapter tensors into a model that `apply_lora` prepared with the same settings."""
    expected = {k for k in model.state_dict() if k.endswith(LORA_KEYS)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def merge_lora(model):
    """Fold every adapter into its base weight (in place) and return the now plain, trainable GPT."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- checkpoints


MERGE_HINT = " (merge the LoRA run with `python lora.py merge` into a run that does not need its base)"


def adapter_entries(model, adapter):
    """The keys an adapter run's checkpoint holds instead of `model`; adapter = {"base", "lora_config"}."""
    return {"lora": lora_state_dict(model), **adapter}


def load_adapter_run(model, ckpt):
    """Put an adapter checkpoint's base weights into `model` (a GPT of that shape), then its adapter."""
    base = load_referenced(ckpt["base"], "the base checkpoint of this LoRA adapter", MERGE_HINT)
    if "model" not in base:
        raise CheckpointError(f"the base {ckpt['base']['path']} is itself a LoRA run: "
                              "merge it first (python lora.py merge)")
    model.load_state_dict(base["model"])
    apply_lora(model, **ckpt["lora_config"])
    return load_lora(model, ckpt["lora"])


def model_from_lora_checkpoint(ckpt, device="cpu"):
    """Base + adapter, merged: what `inference.model_from_checkpoint` returns for an adapter run."""
    return merge_lora(load_adapter_run(GPT(GPTConfig(**ckpt["model_args"])), ckpt)).to(device).eval()


def setup_training(model, ckpt, source, resume, rank, alpha, targets, dropout):
    """LoRA's part of train.py's model set-up.

    `model` has the run's architecture (and the weights of `ckpt` when that is a plain checkpoint);
    `ckpt` is the checkpoint the run starts from (None from scratch), read from file `source`.
    Resuming an adapter run restores base + adapter; fine-tuning from an adapter run starts from its
    merged weights; `rank` > 0 puts new adapters on a plain run's weights. Returns what the run's
    checkpoints record about the adapter ({"base", "lora_config"}), or None when every weight trains.
    """
    if ckpt is not None and "lora" in ckpt:
        load_adapter_run(model, ckpt)
        if resume:
            return {"base": ckpt["base"], "lora_config": ckpt["lora_config"]}
        merge_lora(model)
        if rank:
            raise ValueError(f"{source} is a LoRA run: merge it (python lora.py merge) and put new adapters "
                             "on the merged run")
        return None
    if not rank:
        return None
    if ckpt is None or resume:
        raise ValueError("lora_rank > 0 needs trained weights to adapt: set init_from to a run directory")
    apply_lora(model, rank, alpha, targets, dropout)
    return {"base": checkpoint_reference(source), "lora_config": lora_config(rank, alpha, targets, dropout)}


def merge_run(out_dir, to):
    """Write a plain run directory (best.pt / last.pt / tokenizer / log) from an adapter run."""
    out_dir, to = Path(out_dir), Path(to)
    sources = [out_dir / n for n in ("best.pt", "last.pt") if (out_dir / n).exists()]
    if not sources:
        find_checkpoint(out_dir)  # raises the usual "no checkpoint" error
    to.mkdir(parents=True, exist_ok=True)
    for src in sources:
        ckpt = load_checkpoint(src)
        if "lora" not in ckpt:
            raise ValueError(f"{src} is not a LoRA adapter checkpoint (it has no 'lora' key)")
        plain = {k: v for k, v in ckpt.items() if k not in ("lora", "lora_config", "base")}
        plain["model"] = model_from_lora_checkpoint(ckpt).state_dict()
        plain["merged_from"] = {"adapter": str(src.resolve()), "base": ckpt["base"], "lora_config": ckpt["lora_config"]}
        save_checkpoint(plain, to / src.name)
        print(f"merged {src} -> {to / src.name}")
    TokenizerId.from_json(ckpt["tokenizer"]).load(out_dir / "tokenizer").save(to / "tokenizer")
    if (out_dir / "log.jsonl").exists():
        shutil.copyfile(out_dir / "log.jsonl", to / "log.jsonl")


def main(argv=None):
    ap = argparse.ArgumentParser(description="LoRA adapter runs: merge an adapter into its base.")
    sub = ap.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write a plain run directory with the adapter folded in")
    merge.add_argument("--out_dir", required=True, help="the adapter run directory")
    merge.add_argument("--to", required=True, help="the plain run directory to write")
    args = ap.parse_args(argv)
    try:
        merge_run(args.out_dir, args.to)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
