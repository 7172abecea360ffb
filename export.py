"""Export a run to the Hugging Face `transformers` format, and import a GPT-2-shaped model back.

    python export.py --out_dir out/sft --to hf exports/sft_hf
    python export.py --from hf exports/sft_hf --out_dir out/imported --tokenizer data/tokenizer

The export is a folder that `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained`
load offline: `config.json` + `model.safetensors`, and `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json`.

Design choices:
- The model is GPT-2 shaped on purpose (model.py), so the export is a renaming-free copy: the
  state-dict names already match `GPT2LMHeadModel`; only the four projection matrices are
  transposed (GPT-2 stores them as Conv1D, in x out). tanh GELU is GPT-2's "gelu_new", LayerNorm
  eps is 1e-5, embeddings are tied; a run trained without biases exports zero biases.
- The tokenizer is rebuilt from our tiktoken ranks with the `tokenizers` library as a byte-level
  BPE: the vocabulary is each rank's bytes in GPT-2's byte-to-unicode spelling, id = rank; the
  merges are recovered by replaying BPE on each token's bytes with only lower ranks allowed (the
  standard tiktoken -> HF conversion), in rank order. Like tiktoken, a pre-token that is itself in
  the vocabulary is taken whole (`ignore_merges`). Pre-tokenizer = Split(our PATTERN, isolated) +
  ByteLevel without its own regex, so both split text identically. Special tokens keep their ids.
  One deliberate difference: the HF tokenizer turns a literal "<|endoftext|>" in text into the
  special token, while our `encode` keeps user text ordinary.
- The vocabulary stays padded as train.py trained it (ids past the tokenizer's never occur), so an
  export imported back fits train.py's checks. A LoRA run exports merged
  (`inference.model_from_checkpoint` folds the adapter in).
- Import requires the run's tokenizer in our format (`--tokenizer`), since a run directory keeps a
  tiktoken tokenizer; when the HF folder has a `tokenizer.json`, its vocabulary must agree with it.
"""
import argparse
import json
from pathlib import Path

import torch

from checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from inference import model_from_checkpoint, tokenizer_for
from model import GPT, GPTConfig
from tokenizer import _bytes_to_unicode, load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ----------------------------------------------------------------------------- tokenizer


def _bpe_parts(ranks, token, max_rank):
    """The pieces BPE ends with on `token`'s bytes when only ranks below `max_rank` may merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min(((ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)))
        if best[0] >= max_rank:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that gives the same ids as our tiktoken-based `tok`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = tok.enc._mergeable_ranks
    spell = _bytes_to_unicode()
    as_text = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) == 2:  # else BPE never builds it: reachable only as a whole pre-token
                merges.append((as_text(parts[0]), as_text(parts[1])))
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    wrong = [s for s, i in specials if hf.token_to_id(s) != i]
    if wrong:
        raise ValueError(f"special tokens {wrong} would get other ids in the HF tokenizer "
                         "(their ids must follow the BPE vocabulary)")
    return hf


def save_hf_tokenizer(tok, folder, max_length):
    from transformers import PreTrainedTokenizerFast

    spelling = {i: s for s, i in tok.enc._special_tokens.items()}
    named = {"eot", "pad"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tok), model_max_length=max_length,
        bos_token=spelling[tok.eot], eos_token=spelling[tok.eot], pad_token=spelling[tok.pad],
        additional_special_tokens=[spelling[i] for n, i in tok.special.items() if n not in named],
    )
    fast.save_pretrained(folder)


# ----------------------------------------------------------------------------- model


def export_hf(out_dir, folder, which="best"):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = find_checkpoint(out_dir, which)
    ckpt = load_checkpoint(path)
    # the checkpoint's model as trained, padded vocabulary included (load_run would trim it), so that
    # an imported export fits train.py's data checks again
    model, tok = model_from_checkpoint(ckpt), tokenizer_for(ckpt, out_dir)
    cfg = model.config
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tok.eot, eos_token_id=tok.eot, pad_token_id=tok.pad, tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name in ours:
            state[name] = (ours[name].t() if name.endswith(CONV1D) else ours[name]).float().contiguous()
        elif name.endswith(".bias") and not cfg.bias:
            state[name] = torch.zeros_like(tensor)
        else:
            raise ValueError(f"the HF model has {name}, which this run does not")
    hf_model.load_state_dict(state)
    folder = Path(folder)
    hf_model.save_pretrained(folder)
    save_hf_tokenizer(tok, folder, cfg.block_size)
    print(f"exported {out_dir} ({path}) -> {folder}")


def import_hf(folder, out_dir, tokenizer, kind="pretrain"):
    """A run directory from a GPT-2-shaped HF model folder and our tokenizer for it."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(folder)
    c = hf_model.config
    if c.activation_function != "gelu_new" or c.n_inner not in (None, 4 * c.n_embd):
        raise ValueError(f"{folder} is not GPT-2 shaped the way model.py is (activation {c.activation_function}, "
                         f"n_inner {c.n_inner}); cannot import it")
    tok = load_tokenizer(tokenizer)
    if c.vocab_size < tok.n_vocab:
        raise ValueError(f"the model's vocabulary ({c.vocab_size}) is smaller than the tokenizer's ({tok.n_vocab})")
    hf_vocab = Path(folder) / "tokenizer.json"
    if hf_vocab.exists():
        theirs = json.loads(hf_vocab.read_text(encoding="utf-8"))["model"]["vocab"]
        if theirs != json.loads(hf_tokenizer(tok).to_str())["model"]["vocab"]:
            raise ValueError(f"the vocabulary in {hf_vocab} is not that of the tokenizer {tokenizer}")
    args = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                n_embd=c.n_embd, dropout=float(c.resid_pdrop), bias=True)
    model = GPT(GPTConfig(**args))
    theirs = hf_model.state_dict()
    model.load_state_dict({name: (theirs[name].t() if name.endswith(CONV1D) else theirs[name]).contiguous()
                           for name in model.state_dict()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir / "tokenizer")
    ckpt = {"model": model.state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": None,
            "tokenizer": tok.identity.to_json(), "kind": kind, "config": {"imported_from": str(Path(folder).resolve())}}
    for name in ("best.pt", "last.pt"):
        save_checkpoint(ckpt, out_dir / name)
    print(f"imported {folder} -> {out_dir}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Export a run to Hugging Face transformers format, or import one.")
    ap.add_argument("--out_dir", required=True, help="the run directory to export (or, with --from, to write)")
    ap.add_argument("--to", nargs=2, metavar=("FORMAT", "DIR"), help="export: `--to hf DIR`")
    ap.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "DIR"), help="import: `--from hf DIR`")
    ap.add_argument("--tokenizer", help="import: our tokenizer folder (or gpt2) for the model")
    ap.add_argument("--kind", default="pretrain", help="import: the kind recorded in the checkpoint (pretrain/sft)")
    ap.add_argument("--which", default="best", help="export: best or last checkpoint")
    args = ap.parse_args()
    if bool(args.to) == bool(args.source):
        ap.error("give exactly one of --to hf DIR and --from hf DIR")
    fmt, folder = args.to or args.source
    if fmt != "hf":
        ap.error(f"the only format is hf, not {fmt!r}")
    if args.to:
        export_hf(args.out_dir, folder, args.which)
    elif not args.tokenizer:
        ap.error("--from needs --tokenizer (the tokenizer folder the model was trained with)")
    else:
        import_hf(folder, args.out_dir, args.tokenizer, args.kind)
