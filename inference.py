"""The loaded run as every front end uses it: model + tokenizer + a description, and decoding.

    run = load_run("out/sft", device=pick_device("auto"))
    print(run.complete("羊侃的字是什么？", mode="qa", max_new_tokens=32))

- `load_run(out_dir)` -> `Run`: finds the run's checkpoint (checkpoint.py), builds the model (an
  adapter run's base + adapter merged by lora.py, so it runs at full speed), finds its tokenizer
  (the run's own copy in `out_dir/tokenizer` when its content matches the recorded identity, else
  the recorded path) and cuts the vocabulary padding off the output layer (`drop_vocab_padding`).
- `Run.stream()` turns a prompt in one of the three modes (text, qa, chat) into streamed text.
  sample.py, server.py, sample_gradio.py and the evaluations all go through it, so they agree on
  prompt layouts and decoding.
- RAG is one path for every front end: `Run.rag_prompt_ids(question, index, k, max_new_tokens)`
  searches a retrieval.py index and packs the hits before the question (`retrieval.rag_prompt`,
  the passage + question layout of SFT --with_context), returning the ids and the sources; the ids
  then go to `stream_ids` / `complete_ids` in "qa" mode (the answer stops where a qa answer does).
- Precision: `auto_dtype` is the one `dtype=auto` rule (train.py, the evaluations, the engine):
  bf16 on GPUs that have it and on CPUs with native bf16 (AVX512-BF16, AMX), float32 elsewhere.
  `load_run(..., dtype=)` casts the weights, and the engine's KV cache takes the weights' dtype;
  sampling and logprobs are computed in float32 from the logits either way.
- Dependencies run one way: checkpoint.py (the format) <- lora.py <- this module <- front ends;
  retrieval.py <- this module (retrieval never imports it).
"""
from pathlib import Path

import torch

from checkpoint import find_checkpoint, load_checkpoint
from engine import generate
from lora import model_from_lora_checkpoint
from model import GPT, GPTConfig
from retrieval import rag_prompt
from tokenizer import StreamDecoder, TokenizerId

MODES = ("text", "qa", "chat")
# Where every front end starts (sample.py, server.py, the arena); None turns a filter off.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 200, "top_p": None, "repetition_penalty": 1.0}


def pick_device(device="auto"):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# CPU features that run bf16 matmuls natively (x86: AVX512-BF16 or AMX; Arm: the BF16 extension).
# Without them PyTorch emulates bf16 through float32 plus conversions, which is slower than float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_features():
    """This CPU's feature flags, lower case: /proc/cpuinfo's `flags`/`Features` (Linux) plus what
    PyTorch itself detects (its own check also works where /proc is absent)."""
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.lower().split())
    except OSError:
        pass
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    return flags


def cpu_bf16_native(flags=None):
    """(True/False, why): does this CPU (or one with feature `flags`) compute bf16 natively?"""
    flags = cpu_features() if flags is None else {f.lower() for f in flags}
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {', '.join(found)}"
    return False, (f"the CPU has none of {', '.join(BF16_CPU_FLAGS)} (PyTorch capability "
                   f"{torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated, slower than float32")


def auto_dtype(device, flags=None):
    """(dtype name, why) for `dtype=auto`: the one rule of train.py, the evaluations and the engine.

    cuda: bfloat16 on Ampere and newer, float16 before (train.py adds a GradScaler); mps: float32
    (its autocast is partial); cpu: bfloat16 autocast only where the CPU has native bf16
    (`cpu_bf16_native`, `flags` overrides the detected features), float32 elsewhere
    (BENCHMARKS.md "bf16 and torch.compile on the CPU" has the numbers behind it).
    """
    device_type = str(device).split(":")[0]
    if device_type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return ("bfloat16", f"CUDA capability {major}.x has bf16") if major >= 8 else \
            ("float16", f"CUDA capability {major}.x has no bf16")
    if device_type == "cpu":
        native, why = cpu_bf16_native(flags)
        return ("bfloat16" if native else "float32"), why
    return "float32", f"{device_type} autocast is partial"


def inference_dtype(device, dtype="auto", flags=None):
    """The dtype the weights are cast to for inference (the engine's cache follows the weights).
    `auto` is `auto_dtype`, except float16, which would overflow without training's GradScaler: float32."""
    if dtype == "auto":
        dtype = auto_dtype(device, flags)[0]
        dtype = "float32" if dtype == "float16" else dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return dtype


def tokenizer_for(ckpt, out_dir):
    """The run's own tokenizer copy when it matches the recorded identity, else the recorded path."""
    return TokenizerId.from_json(ckpt["tokenizer"]).load(Path(out_dir) / "tokenizer")


def model_from_checkpoint(ckpt, device="cpu"):
    """The model a checkpoint holds, in eval mode; an adapter run's base + adapter, merged."""
    if "lora" in ckpt:
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

    def rag_prompt_ids(self, question, index, k=3, max_new_tokens=128):
        """(ids, sources): the top `k` passages of `index` (a retrieval.Index) for the question,
        packed before it so that prompt + `max_new_tokens` fit the window; generate from the ids
        in "qa" mode. retrieval.PromptTooLong when the question alone does not fit."""
        hits = index.search(question, k)
        return rag_prompt(self.tok, question, hits, self.model.config.block_size, max_new_tokens)

    def stream(self, prompt, mode="text", system=None, max_new_tokens=128, **sampling):
        """Yield pieces of generated text as tokens arrive (never a split character)."""
        yield from self.stream_ids(self.prompt_ids(prompt, mode, system), mode, max_new_tokens, **sampling)

    def stream_ids(self, ids, mode="qa", max_new_tokens=128, span=None, **sampling):
        """`stream` from prompt ids made already (a RAG prompt); `mode` picks the stop tokens. `span`:
        the candidates of an extractive answer (`extractive.answer_spans`), or None."""
        decoder = StreamDecoder(self.tok)
        for (token,) in generate(self.model, [ids], max_new_tokens, stop_ids=self.tok.stop_ids(mode), spans=[span],
                                 **sampling):
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
        return self.complete_ids([self.prompt_ids(p, mode, system) for p in prompts], mode, max_new_tokens, **sampling)

    @torch.no_grad()
    def prompt_logprobs(self, ids, top=0):
        """Teacher-forced logprobs of a prompt (ids, at most block_size): per token (token, its
        logprob after the tokens before it, its `top` likeliest alternatives as [(token, logprob)]
        or None when `top` is 0). The first token has nothing before it: (token, None, None). One
        forward over the whole prompt; log-softmax of the raw logits in float32, as the engine
        reports generated tokens (server.py's `echo`; lm-eval's loglikelihood requests)."""
        x = torch.tensor([list(ids)], device=next(self.model.parameters()).device)
        logits, _ = self.model(x)
        logprobs = logits[0, :-1].float().log_softmax(-1)
        chosen = logprobs.gather(-1, x[0, 1:, None])[:, 0].tolist()
        alternatives = [None] * len(chosen)
        if top:
            values, tokens = logprobs.topk(top, dim=-1)
            alternatives = [list(zip(t, v)) for t, v in zip(tokens.tolist(), values.tolist())]
        return [(ids[0], None, None)] + list(zip(ids[1:], chosen, alternatives))

    def complete_ids(self, rows, mode="qa", max_new_tokens=128, spans=None, **sampling):
        """`complete_batch` from prompt ids made already (RAG prompts). `spans`: per row, None or the
        candidates of its extractive answer (`extractive.answer_spans`)."""
        out = [[] for _ in rows]
        for step in generate(self.model, rows, max_new_tokens, stop_ids=self.tok.stop_ids(mode), spans=spans,
                             **sampling):
            for i, t in enumerate(step):
                if t is not None:
                    out[i].append(t)
        return [self.tok.decode(o) for o in out]


def drop_vocab_padding(model, n_vocab):
    """train.py pads the vocabulary to a multiple of 64 (faster matmuls). The padding ids are no
    tokens, so they are cut off the embedding and the output layer here (an untied head stays
    untied) and generation can never sample them. The loss is unchanged: training leaves them out
    of the softmax too (GPTConfig.n_vocab)."""
    head = torch.nn.Parameter(model.lm_head.weight[:n_vocab].detach().clone())
    tied = model.lm_head.weight is model.transformer.wte.weight
    model.lm_head.weight = head
    model.transformer.wte.weight = head if tied else torch.nn.Parameter(
        model.transformer.wte.weight[:n_vocab].detach().clone())
    model.lm_head.out_features = model.transformer.wte.num_embeddings = model.config.vocab_size = n_vocab
    model.config.n_vocab = n_vocab


def load_run(out_dir, which="best", device="cpu", dtype="auto"):
    """The run in `out_dir` on `device`, its weights in `dtype` (`inference_dtype`: auto is
    train.py's rule, so bf16 only on a GPU or a CPU with native bf16)."""
    dtype = inference_dtype(device, dtype)
    path = find_checkpoint(out_dir, which)
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, device)
    tok = tokenizer_for(ckpt, out_dir)
    if model.config.vocab_size > tok.n_vocab:
        drop_vocab_padding(model, tok.n_vocab)
    model.to(getattr(torch, dtype))
    cfg = ckpt["model_args"]
    info = {
        "name": Path(out_dir).resolve().name,
        "checkpoint": str(path),
        "params": model.num_params(),
        "n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "n_embd": cfg["n_embd"],
        "block_size": cfg["block_size"],
        "vocab_size": tok.n_vocab,
        "tokenizer": "gpt2" if tok.identity.is_gpt2 else tok.identity.sha256[:12],
        "kind": ckpt.get("kind", "pretrain"),
        "iter": ckpt.get("iter_num", 0),
        "val_loss": ckpt.get("best_val_loss"),
        "dtype": dtype,
    }
    return Run(model, tok, info)
