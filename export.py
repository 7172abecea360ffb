"""Export a run to the Hugging Face `transformers` format or to GGUF (llama.cpp, Ollama, LM Studio),
and import a `transformers` model back.

    python export.py --run out/sft --to hf exports/sft_hf
    python export.py --run out/sft --to gguf exports/sft.gguf      # + exports/Modelfile for Ollama
    python export.py --from hf exports/sft_hf --out out/imported --tokenizer data/tokenizer

`--run` is always a run directory that is read, `--out` a run directory that is written (the old
`--out_dir` still works for either: it means the run to export, or the run an import writes).

The export is a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load offline: `config.json` + `model.safetensors`, and `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json`. An `arch=gpt2` run becomes a `GPT2LMHeadModel`, an `arch=qwen3` run a
`Qwen3ForCausalLM`.

Design choices:
- Both architectures in model.py are the transformers ones computed the same way, so the export is
  a renaming (`hf_name`, the one weight mapping; bench/bench_model.py uses it too):
  - gpt2: the state-dict names already match `GPT2LMHeadModel`; only the four projection matrices
    are transposed (GPT-2 stores them as Conv1D, in x out). tanh GELU is GPT-2's "gelu_new",
    LayerNorm eps is 1e-5, embeddings are tied; a run trained without biases exports zero biases.
  - qwen3: `transformer.h.i` -> `model.layers.i`, `attn` -> `self_attn`, ln_1/ln_2 ->
    input/post_attention_layernorm, wte -> embed_tokens, ln_f -> norm; no transposes. RMSNorm eps
    1e-6, head_dim = n_embd / n_head, default RoPE with the run's rope_theta, no sliding window.
- The tokenizer is rebuilt from our tiktoken ranks with the `tokenizers` library as a byte-level
  BPE: the vocabulary is each rank's bytes in GPT-2's byte-to-unicode spelling, id = rank; the
  merges are recovered by replaying BPE on each token's bytes with only lower ranks allowed (the
  standard tiktoken -> HF conversion), in rank order. Like tiktoken, a pre-token that is itself in
  the vocabulary is taken whole (`ignore_merges`). Pre-tokenizer = Split(our PATTERN, isolated) +
  ByteLevel without its own regex, so both split text identically. Special tokens keep their ids.
  One deliberate difference: the HF tokenizer turns a literal "<|endoftext|>" in text into the
  special token, while our `encode` keeps user text ordinary.
- The transformers export carries our chat layout as a Jinja `chat_template` in tokenizer_config.json
  (`apply_chat_template` gives `Tokenizer.encode_chat`'s ids), pads on the left (batched generation
  equals unbatched), and its generation_config.json stops at <|endoftext|> or <|end|>.
- GGUF is written with the `gguf` package, named as llama.cpp's convert_hf_to_gguf.py names the
  transformers export. It is exact only because the tokenizer's split pattern is one llama.cpp
  implements (tokenizer.LLAMA_CPP_PRE_TOKENIZERS: our pattern is its kimi-k2 pre-tokenizer); a
  tokenizer with another pattern is refused rather than exported to tokenise differently. The merge
  list holds every split of every token (`gguf_merges`), so llama.cpp's pair-rank BPE replays
  tiktoken's; bench/bench_llama_cpp.py and tests/test_export.py compare llama.cpp with us.
- The vocabulary padding train.py adds (a multiple of 64; the padding ids are no tokens and left
  out of training's softmax) is cut off, as `inference.load_run` cuts it: otherwise transformers'
  softmax would give the untrained padding rows probability mass, and `lm-eval --model hf` would
  score the export up to 0.1 nats away from the server. An import pads it back with zero rows
  (`pad_vocab`), so an export imported back fits train.py's checks. A LoRA run exports merged
  (`inference.model_from_checkpoint` folds the adapter in).
- Import requires the run's tokenizer in our format (`--tokenizer`), since a run directory keeps a
  tiktoken tokenizer; when the HF folder has a `tokenizer.json`, its vocabulary must agree with it.
  A model model.py cannot compute exactly (another activation, biases in Qwen3 attention, a head
  size other than n_embd / n_head, sliding windows, scaled RoPE) is refused with a ValueError.
"""
import argparse
import json
import math
import os
from pathlib import Path

import torch

from checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from inference import SAMPLING_DEFAULTS, drop_vocab_padding, load_run, model_from_checkpoint, tokenizer_for
from model import GPT, GPTConfig
from tokenizer import LLAMA_CPP_PRE_TOKENIZERS, load_tokenizer

GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# our name piece -> Qwen3's, applied in this order (and backwards, reversed, for an import)
QWEN3_NAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
               (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
               (".attn.", ".self_attn."), ("transformer.h.", "model.layers."))


def hf_name(name, arch, to_hf=True):
    """The transformers name of our parameter `name` (or ours of theirs, to_hf=False)."""
    if arch == "gpt2":
        return name
    pairs = QWEN3_NAMES if to_hf else [(theirs, ours) for ours, theirs in reversed(QWEN3_NAMES)]
    for old, new in pairs:
        name = name.replace(old, new)
    return name


def _transposed(name, arch):
    return arch == "gpt2" and name.endswith(GPT2_CONV1D)


def hf_state_dict(model, theirs):
    """Our model's weights as a state dict for the transformers model whose state dict is `theirs`
    (float32, contiguous). A name with no counterpart is an error, except GPT-2 biases of a run
    trained without them (exported as zeros)."""
    arch, ours, state = model.config.arch, model.state_dict(), {}
    for name in theirs:
        mine = hf_name(name, arch, to_hf=False)
        if mine in ours:
            tensor = ours[mine].t() if _transposed(mine, arch) else ours[mine]
            state[name] = tensor.float().contiguous()
        elif arch == "gpt2" and name.endswith(".bias") and not model.config.bias:
            state[name] = torch.zeros_like(theirs[name])
        else:
            raise ValueError(f"the HF model has {name}, which this run does not")
    return state


def load_hf_state_dict(model, theirs):
    """Put a transformers state dict (`theirs`) into our `model` of the same shape."""
    arch = model.config.arch
    model.load_state_dict({name: (theirs[hf_name(name, arch)].t() if _transposed(name, arch)
                                  else theirs[hf_name(name, arch)]).contiguous() for name in model.state_dict()})
    return model


def byte_spelling():
    """GPT-2's map from bytes to printable characters, in which byte-level BPE vocabularies are spelled:
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


# ----------------------------------------------------------------------------- tokenizer


def _bpe_parts(ranks, token, max_rank):
    """The pieces BPE ends with on `token`'s bytes when only ranks below `max_rank` may merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min((ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1))
        if best[0] >= max_rank:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that gives the same ids as our tiktoken-based `tok`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = tok.enc._mergeable_ranks
    spell = byte_spelling()
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


def special_spelling(tok, name):
    """How the special token `name` (eot, user, end, ...) of `tok` is written."""
    return tok.enc.decode_single_token_bytes(tok.special[name]).decode()


def chat_template(tok):
    """The Jinja chat template of our chat layout (`Tokenizer.encode_chat`): <|role|> content <|end|> per
    message, then <|assistant|> for a prompt or <|endoftext|> for a finished conversation. The
    OpenAI `developer` role is a system message, as the server treats it."""
    s = {name: special_spelling(tok, name) for name in ("system", "user", "assistant", "end", "eot")}
    return (
        "{%- for message in messages -%}"
        "{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"
        f"{{%- if role == 'system' -%}}{{{{- '{s['system']}' -}}}}"
        f"{{%- elif role == 'user' -%}}{{{{- '{s['user']}' -}}}}"
        f"{{%- elif role == 'assistant' -%}}{{{{- '{s['assistant']}' -}}}}"
        "{%- else -%}{{- raise_exception('unknown chat role ' + role + ' (expected system, user or assistant)') -}}"
        "{%- endif -%}"
        f"{{{{- message['content'] + '{s['end']}' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{s['assistant']}' -}}}}"
        f"{{%- else -%}}{{{{- '{s['eot']}' -}}}}{{%- endif -%}}"
    )


def save_hf_tokenizer(tok, folder, max_length):
    """tokenizer.json + tokenizer_config.json (with the chat template, padding on the left so that a
    batch of prompts ends where generation starts) + special_tokens_map.json."""
    from transformers import PreTrainedTokenizerFast

    spelling = {i: s for s, i in tok.enc._special_tokens.items()}
    named = {"eot", "pad"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tok), model_max_length=max_length, padding_side="left",
        bos_token=spelling[tok.eot], eos_token=spelling[tok.eot], pad_token=spelling[tok.pad],
        additional_special_tokens=[spelling[i] for n, i in tok.special.items() if n not in named],
        chat_template=chat_template(tok),
    )
    # in tokenizer_config.json, where every tool looks (not transformers' newer chat_template.jinja)
    fast.save_pretrained(folder, save_jinja_files=False)


def save_generation_config(cfg, tok, folder):
    """generation_config.json: generation stops at <|endoftext|> or <|end|> (a chat turn's end), and
    never picks a vocabulary padding id (train.py pads the vocabulary; those rows are no tokens)."""
    from transformers import GenerationConfig

    padding = list(range(tok.n_vocab, cfg.vocab_size))
    GenerationConfig(bos_token_id=tok.eot, eos_token_id=[tok.eot, tok.end], pad_token_id=tok.pad,
                     suppress_tokens=padding or None).save_pretrained(folder)


# ----------------------------------------------------------------------------- model


def hf_config(cfg, tok):
    """The transformers config of our GPTConfig `cfg` (special token ids from `tok`)."""
    ids = dict(bos_token_id=tok.eot, eos_token_id=tok.eot, pad_token_id=tok.pad)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        # n_ctx: llama.cpp's convert_hf_to_gguf.py reads the context length from it
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_ctx=cfg.block_size,
                          n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                          layer_norm_epsilon=1e-5, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=cfg.dropout, tie_word_embeddings=True, **ids)
    from transformers import Qwen3Config

    if getattr(cfg, "mlp_act", "swiglu") != "swiglu":  # model.py's ReLU-squared MLP has no Qwen3 counterpart
        raise ValueError(f"mlp_act={cfg.mlp_act!r}: Qwen3ForCausalLM has only a SwiGLU MLP, so this run cannot be "
                         f"exported (train with mlp_act='swiglu' to export)")
    return Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, hidden_act="silu",
                       max_position_embeddings=cfg.block_size, rms_norm_eps=1e-6,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, use_sliding_window=False,
                       attention_dropout=cfg.dropout,
                       rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)}, **ids)


def hf_model_class(arch):
    import transformers

    return transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.Qwen3ForCausalLM


def export_hf(run_dir, folder, which="best"):
    path = find_checkpoint(run_dir, which)
    ckpt = load_checkpoint(path)
    model, tok = model_from_checkpoint(ckpt), tokenizer_for(ckpt, run_dir)
    if model.config.vocab_size > tok.n_vocab:  # the padding rows are no tokens: the softmax must not see them
        drop_vocab_padding(model, tok.n_vocab)
    cfg = model.config
    hf_model = hf_model_class(cfg.arch)(hf_config(cfg, tok))
    hf_model.load_state_dict(hf_state_dict(model, hf_model.state_dict()))
    folder = Path(folder)
    hf_model.save_pretrained(folder)
    save_hf_tokenizer(tok, folder, cfg.block_size)
    save_generation_config(cfg, tok, folder)
    print(f"exported {run_dir} ({path}) -> {folder} ({type(hf_model).__name__})")


# ----------------------------------------------------------------------------- GGUF (llama.cpp, Ollama, LM Studio)


def gguf_pre_tokenizer(tok):
    """llama.cpp's name (`tokenizer.ggml.pre`) for how `tok` splits text before BPE, or a ValueError:
    llama.cpp splits text only in the ways its source implements, so a GGUF of a tokenizer whose
    pattern has no twin there would give other token ids than training did."""
    if tok.identity.is_gpt2:
        return "gpt-2"
    pre = LLAMA_CPP_PRE_TOKENIZERS.get(tok.enc._pat_str)
    if pre is None:
        raise ValueError(
            "this run's tokenizer splits text with a pattern llama.cpp does not implement (tokenizers "
            "trained before the llama.cpp export kept Han runs by Unicode script, HAN_RUNS_PATTERN), so "
            "llama.cpp would tokenise it differently; retrain the tokenizer with the current tokenizer.py "
            "(its pattern is llama.cpp's kimi-k2) and the model on it, or use `--to hf`")
    return pre


def gguf_merges(ranks, spell):
    """llama.cpp's BPE merges that replay tiktoken exactly. tiktoken joins any two adjacent pieces whose
    concatenation is a token, the lowest-ranked first; llama.cpp joins only listed pairs, the
    lowest-listed first. So every split of every token into two tokens is listed, in the token's rank
    order (not only the pair the trainer merged, which is all the HF tokenizer needs)."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        for cut in range(1, len(token)):
            if token[:cut] in ranks and token[cut:] in ranks:
                merges.append(spell(token[:cut]) + " " + spell(token[cut:]))
    return merges


def add_gguf_tokenizer(writer, tok):
    """The tokenizer in GGUF's terms: byte-level BPE ("gpt2" model), its pre-tokenizer, tokens by id in
    GPT-2's byte spelling, special tokens as control tokens, merges, and the chat template."""
    import gguf

    ranks, byte_char = tok.enc._mergeable_ranks, byte_spelling()
    spell = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    text_of = {rank: spell(token) for token, rank in ranks.items()}
    text_of.update({i: special_spelling(tok, name) for name, i in tok.special.items()})
    if sorted(text_of) != list(range(tok.n_vocab)):
        raise ValueError("the tokenizer's ids are not 0..n_vocab-1; GGUF lists tokens by id")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tok))
    writer.add_token_list([text_of[i] for i in range(tok.n_vocab)])
    writer.add_token_types([gguf.TokenType.CONTROL if tok.is_special(i) else gguf.TokenType.NORMAL
                            for i in range(tok.n_vocab)])
    writer.add_token_merges(gguf_merges(ranks, spell))
    writer.add_bos_token_id(tok.eot)
    writer.add_eos_token_id(tok.eot)
    writer.add_eot_token_id(tok.end)  # with eos, where llama.cpp stops generating (a chat turn's end)
    writer.add_pad_token_id(tok.pad)
    writer.add_add_bos_token(False)  # our prompts start with no BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(tok))


def add_gguf_model(writer, model, tok):
    """Hyperparameters and float32 weights, named as llama.cpp's convert_hf_to_gguf.py names those of
    our `--to hf` export (gguf's tensor name map; GPT-2's Conv1D matrices back to (out, in))."""
    import gguf

    cfg = model.config
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if cfg.arch == "gpt2":
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_feed_forward_length(cfg.mlp_hidden)
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_key_length(cfg.n_embd // cfg.n_head)
        writer.add_value_length(cfg.n_embd // cfg.n_head)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(1e-6)
    arch = gguf.MODEL_ARCH.GPT2 if cfg.arch == "gpt2" else gguf.MODEL_ARCH.QWEN3
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    theirs = hf_model_class(cfg.arch)(hf_config(cfg, tok)).state_dict()
    for name, tensor in hf_state_dict(model, theirs).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses the token embedding when there is no output matrix
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers
        if _transposed(name, cfg.arch):
            tensor = tensor.t()
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())


def ollama_modelfile(gguf_name, tok, block_size):
    """An Ollama Modelfile for the GGUF: our chat layout as a Go template, the turn-ending stop tokens,
    and sample.py's sampling defaults (Ollama's own differ: top_p 0.9, repeat_penalty 1.1)."""
    s = {name: special_spelling(tok, name) for name in ("system", "user", "assistant", "end", "eot")}
    template = ("{{- range .Messages }}"
                f'{{{{- if eq .Role "system" }}}}{s["system"]}'
                f'{{{{- else if eq .Role "assistant" }}}}{s["assistant"]}'
                f"{{{{- else }}}}{s['user']}{{{{- end }}}}"
                f"{{{{ .Content }}}}{s['end']}"
                f"{{{{- end }}}}{s['assistant']}")
    return "\n".join([
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{s["end"]}"',
        f'PARAMETER stop "{s["eot"]}"',
        f"PARAMETER num_ctx {block_size}",
        f"PARAMETER temperature {SAMPLING_DEFAULTS['temperature']}",
        f"PARAMETER top_k {SAMPLING_DEFAULTS['top_k']}",
        "PARAMETER top_p 1.0",
        f"PARAMETER repeat_penalty {SAMPLING_DEFAULTS['repetition_penalty']}",
        "",
    ])


def export_gguf(run_dir, path, which="best"):
    """A GGUF file for llama.cpp / Ollama / LM Studio, float32, the vocabulary padding dropped, a LoRA
    run merged (`load_run`); an Ollama `Modelfile` beside it. Written to a temporary file, then renamed."""
    import gguf

    run = load_run(run_dir, which)
    model, tok, path = run.model, run.tok, Path(path)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2 if model.config.arch == "gpt2" else gguf.MODEL_ARCH.QWEN3]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(run.info["name"])
        add_gguf_tokenizer(writer, tok)
        add_gguf_model(writer, model, tok)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    modelfile = path.parent / "Modelfile"
    modelfile.with_name("Modelfile.tmp").write_text(ollama_modelfile(path.name, tok, model.config.block_size),
                                                    encoding="utf-8")
    os.replace(modelfile.with_name("Modelfile.tmp"), modelfile)
    print(f"exported {run_dir} ({run.info['checkpoint']}) -> {path} ({arch}, pre-tokenizer "
          f"{gguf_pre_tokenizer(tok)}) and {modelfile}")


def model_args_from_hf(c, folder):
    """Our GPTConfig fields for a transformers config, or a ValueError when model.py cannot compute it exactly."""
    if c.model_type == "gpt2":
        if c.activation_function != "gelu_new" or c.n_inner not in (None, 4 * c.n_embd):
            raise ValueError(f"{folder} is not GPT-2 shaped the way model.py is (activation "
                             f"{c.activation_function}, n_inner {c.n_inner}); cannot import it")
        return dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                    n_embd=c.n_embd, dropout=float(c.resid_pdrop), bias=True)
    if c.model_type == "qwen3":
        rope = c.rope_parameters or {}
        problems = [what for what, bad in (
            (f"activation {c.hidden_act}", c.hidden_act != "silu"), ("attention biases", c.attention_bias),
            (f"head_dim {c.head_dim} != hidden_size / heads", c.head_dim * c.num_attention_heads != c.hidden_size),
            ("sliding-window attention", c.use_sliding_window),
            (f"RoPE type {rope.get('rope_type')}", rope.get("rope_type", "default") != "default"),
            (f"rms_norm_eps {c.rms_norm_eps}", c.rms_norm_eps != 1e-6)) if bad]
        if problems:
            raise ValueError(f"{folder} is a Qwen3 model that model.py does not compute exactly "
                             f"({', '.join(problems)})")
        return dict(arch="qwen3", block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                    n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                    n_kv_head=c.num_key_value_heads, rope_theta=float(rope.get("rope_theta", 10000.0)),
                    tie_embeddings=bool(c.tie_word_embeddings), mlp_hidden=c.intermediate_size,
                    dropout=float(c.attention_dropout), bias=False)
    raise ValueError(f"{folder} holds a {c.model_type!r} model; only gpt2 and qwen3 import")


def pad_vocab(model, args, multiple=64):
    """(model, its args) with the vocabulary padded to a `multiple` as train.py pads it: zero rows
    for the padding ids, which `n_vocab` keeps out of the loss's softmax and load_run cuts off."""
    n_vocab = args["vocab_size"]
    padded = math.ceil(n_vocab / multiple) * multiple
    args = {**args, "vocab_size": padded, "n_vocab": n_vocab}
    if padded == n_vocab:
        return model, args
    bigger = GPT(GPTConfig(**args))
    ours = model.state_dict()
    for name, target in bigger.state_dict().items():
        if ours[name].shape != target.shape:  # the embedding and the output layer: rows per id
            ours[name] = torch.cat([ours[name], ours[name].new_zeros(padded - n_vocab, *ours[name].shape[1:])])
    bigger.load_state_dict(ours)
    return bigger, args


def import_hf(folder, run_dir, tokenizer, kind="pretrain"):
    """A run directory `run_dir` from a GPT-2 or Qwen3 HF model folder and our tokenizer for it."""
    from transformers import AutoConfig

    args = model_args_from_hf(AutoConfig.from_pretrained(folder), folder)
    hf_model = hf_model_class(args.get("arch", "gpt2")).from_pretrained(folder)
    tok = load_tokenizer(tokenizer)
    if args["vocab_size"] < tok.n_vocab:
        raise ValueError(f"the model's vocabulary ({args['vocab_size']}) is smaller than the tokenizer's "
                         f"({tok.n_vocab})")
    hf_vocab = Path(folder) / "tokenizer.json"
    if hf_vocab.exists():
        theirs = json.loads(hf_vocab.read_text(encoding="utf-8"))["model"]["vocab"]
        if theirs != json.loads(hf_tokenizer(tok).to_str())["model"]["vocab"]:
            raise ValueError(f"the vocabulary in {hf_vocab} is not that of the tokenizer {tokenizer}")
    model, args = pad_vocab(load_hf_state_dict(GPT(GPTConfig(**args)), hf_model.state_dict()), args)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / "tokenizer")
    ckpt = {"model": model.state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": None,
            "tokenizer": tok.identity.to_json(), "kind": kind, "config": {"imported_from": str(Path(folder).resolve())}}
    for name in ("best.pt", "last.pt"):
        save_checkpoint(ckpt, run_dir / name)
    print(f"imported {folder} -> {run_dir}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a run to Hugging Face transformers format or GGUF, or import "
                                             "a transformers model.")
    ap.add_argument("--run", help="export: the run directory to read")
    ap.add_argument("--out", help="import: the run directory to write")
    ap.add_argument("--out_dir", help="the older spelling: --run for an export, --out for an import")
    ap.add_argument("--to", nargs=2, metavar=("FORMAT", "PATH"),
                    help="export: `--to hf DIR` (transformers folder) or `--to gguf FILE` (llama.cpp, Ollama)")
    ap.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "DIR"), help="import: `--from hf DIR`")
    ap.add_argument("--tokenizer", help="import: our tokenizer folder (or gpt2) for the model")
    ap.add_argument("--kind", default="pretrain", help="import: the kind recorded in the checkpoint (pretrain/sft)")
    ap.add_argument("--which", default="best", help="export: best or last checkpoint")
    args = ap.parse_args(argv)
    if bool(args.to) == bool(args.source):
        ap.error("give exactly one of --to FORMAT PATH and --from hf DIR")
    fmt, folder = args.to or args.source
    if fmt not in (("hf", "gguf") if args.to else ("hf",)):
        ap.error(f"an export's formats are hf and gguf, an import's hf; not {fmt!r}")
    if args.to:
        if args.out:
            ap.error("an export reads --run DIR and writes the --to path; --out is for imports")
        run_dir = args.run or args.out_dir
        if not run_dir:
            ap.error("an export needs --run DIR (the run directory to export)")
        try:
            (export_hf if fmt == "hf" else export_gguf)(run_dir, folder, args.which)
        except ValueError as e:
            raise SystemExit(f"export failed: {e}") from None
        return
    if args.run:
        ap.error("an import writes --out DIR; --run is for exports")
    run_dir = args.out or args.out_dir
    if not run_dir or not args.tokenizer:
        ap.error("--from needs --out DIR (the run to write) and --tokenizer "
                 "(the tokenizer folder the model was trained with)")
    try:
        import_hf(folder, run_dir, args.tokenizer, args.kind)
    except ValueError as e:
        raise SystemExit(f"import failed: {e}") from None


if __name__ == "__main__":
    main()
