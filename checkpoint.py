"""Saving and loading runs, and the loaded model as every front end uses it.

- `save_checkpoint` writes to a temporary file, fsyncs and renames: a crash mid-save leaves the
  previous checkpoint intact.
- Checkpoints hold only tensors and plain Python values, so `load_checkpoint` can use
  `torch.load(weights_only=True)`: a checkpoint from a stranger cannot run code.
- A run directory (`out_dir`) holds `best.pt`, `last.pt`, `log.jsonl` and a copy of its tokenizer
  in `tokenizer/`, so a run copied to another machine (a peer's server) is self-contained.
- `load_run(out_dir)` -> `Run`: model + tokenizer + a description; `Run.stream()` turns a prompt in
  one of the three modes (text, qa, chat) into streamed text. sample.py, server.py,
  sample_gradio.py and the evaluations all go through it, so they agree on prompt layouts and
  decoding.
"""
import os
from pathlib import Path

import torch

from model import GPT, GPTConfig, generate
from tokenizer import StreamDecoder, load_tokenizer

MODES = ("text", "qa", "chat")


def pick_device(device="auto"):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def save_checkpoint(obj, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, device="cpu"):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a checkpoint at all
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e


def find_checkpoint(out_dir, which="best"):
    """`best.pt`, else `last.pt` (a run stopped before its first evaluation has only that)."""
    out_dir = Path(out_dir)
    for name in (f"{which}.pt", "best.pt", "last.pt"):
        if (out_dir / name).exists():
            return out_dir / name
    raise FileNotFoundError(f"no checkpoint (best.pt / last.pt) in {out_dir}")


def tokenizer_for(ckpt, out_dir):
    """The run's own tokenizer copy when it matches the recorded hash, else the recorded path."""
    ident = ckpt["tokenizer"]
    if ident == "gpt2":
        return load_tokenizer("gpt2")
    local = Path(out_dir) / "tokenizer"
    for candidate in (local, Path(ident["path"])):
        if (candidate / "tokenizer.json").exists():
            tok = load_tokenizer(candidate)
            if tok.identity["sha256"] == ident["sha256"]:
                return tok
    raise FileNotFoundError(f"the tokenizer of {out_dir} (sha256 {ident['sha256'][:12]}) is neither in "
                            f"{local} nor at {ident['path']}")


def model_from_checkpoint(ckpt, device="cpu"):
    if "lora" in ckpt:  # an adapter run: lora.py loads its base (hash-checked) and merges the adapter
        from lora import model_from_lora_checkpoint
        return model_from_lora_checkpoint(ckpt, device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


class Run:
    """A loaded model with its tokenizer; `info` describes it for /health, /v1/models and reports."""

    def __init__(self, model, tok, info):
        self.model, self.tok, self.info = model, tok, info

    def prompt_ids(self, prompt, mode="text", system=None):
        """Token ids for a prompt: text continues a passage, qa adds the answer separator, chat
        takes a list of {role, content} messages (or one user message as a string)."""
        if mode == "text":
            return self.tok.encode(prompt)
        if mode == "qa":
            return self.tok.encode_qa(prompt)
        if mode == "chat":
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if system:
                messages = [{"role": "system", "content": system}] + messages
            return self.tok.encode_chat(messages)
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")

    def stream(self, prompt, mode="text", system=None, max_new_tokens=128, **sampling):
        """Yield pieces of generated text as tokens arrive (never a split character)."""
        ids = self.prompt_ids(prompt, mode, system)
        decoder = StreamDecoder(self.tok)
        for (token,) in generate(self.model, [ids], max_new_tokens, stop_ids=self.tok.stop_ids(mode), **sampling):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def complete(self, prompt, mode="text", **kw):
        return "".join(self.stream(prompt, mode, **kw))

    def complete_batch(self, prompts, mode="text", system=None, max_new_tokens=128, **sampling):
        """Whole completions for many prompts at once (batched generation; evaluations use it)."""
        rows = [self.prompt_ids(p, mode, system) for p in prompts]
        out = [[] for _ in rows]
        for step in generate(self.model, rows, max_new_tokens, stop_ids=self.tok.stop_ids(mode), **sampling):
            for i, t in enumerate(step):
                if t is not None:
                    out[i].append(t)
        return [self.tok.decode(o) for o in out]


def drop_vocab_padding(model, n_vocab):
    """train.py pads the vocabulary to a multiple of 64 (faster matmuls). The padding ids are no
    tokens, so they are cut off the embedding and output layer here and generation can never sample them."""
    head = torch.nn.Parameter(model.lm_head.weight[:n_vocab].detach().clone())
    tied = model.lm_head.weight is model.transformer.wte.weight
    model.lm_head.weight = head
    model.transformer.wte.weight = head if tied else torch.nn.Parameter(model.transformer.wte.weight[:n_vocab].detach().clone())
    model.lm_head.out_features = model.transformer.wte.num_embeddings = model.config.vocab_size = n_vocab


def load_run(out_dir, which="best", device="cpu"):
    path = find_checkpoint(out_dir, which)
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, device)
    tok = tokenizer_for(ckpt, out_dir)
    if model.config.vocab_size > tok.n_vocab:
        drop_vocab_padding(model, tok.n_vocab)
    cfg = ckpt["model_args"]
    info = {
        "name": Path(out_dir).resolve().name,
        "checkpoint": str(path),
        "params": model.num_params(),
        "n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "n_embd": cfg["n_embd"],
        "block_size": cfg["block_size"],
        "vocab_size": tok.n_vocab,
        "tokenizer": "gpt2" if tok.identity == "gpt2" else tok.identity["sha256"][:12],
        "kind": ckpt.get("kind", "pretrain"),
        "iter": ckpt.get("iter_num", 0),
        "val_loss": ckpt.get("best_val_loss"),
    }
    return Run(model, tok, info)
