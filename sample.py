"""Sample from a trained run in the terminal: continue a passage, answer questions, or chat.

    python sample.py --out_dir=out/pretrain --start="北京是"                  # text: prompt + continuation
    python sample.py --out_dir=out/sft --mode=qa --start="羊侃的字是什么？"    # qa: only the answer
    python sample.py --out_dir=out/sft --mode=qa --start=FILE:prompts.txt      # one prompt per line
    python sample.py --out_dir=out/sft --mode=chat --system="你是一个乐于助人的助手。"
    python sample.py --out_dir=out/sft --mode=rag --rag data/index --start="长江全长多少公里？"  # read, then answer

Design:
- Everything goes through `inference.load_run` and `Run.stream`, so prompt layouts, stop tokens
  and decoding are exactly those of the server, the web UI and the evaluations; this file only
  parses flags and prints. Pieces are flushed as they arrive, so output streams.
- Flags are nanoGPT-style `--key=value` (argparse also takes `--key value`).
- Sample i of a prompt uses seed `seed + i`, so one sample can be reproduced alone. Chat turn n
  uses `seed + n` for the same reason.
- rag retrieves the `--rag_k` best passages of a retrieval.py index and packs them before the
  question (`Run.rag_prompt_ids`, the one RAG path), prints the answer, then the sources it read
  (a title, with "(cut)" when only the passage's beginning fit the window).
- Chat keeps the conversation as messages and drops the oldest turns (a user message with its
  reply) until prompt + `max_new_tokens` fit in the model's `block_size`: the model never sees a
  context it was not trained on, and the latest question always survives.
"""
import argparse
import sys
from pathlib import Path

from checkpoint import CheckpointError
from extractive import answer_spans
from inference import MODES, SAMPLING_DEFAULTS, load_run, pick_device
from retrieval import Index, IndexFolderError, PromptTooLong, sources_text

SAMPLE_MODES = (*MODES, "rag")


def optional(kind):
    """An argparse type that also accepts "none" (switch the option off)."""
    def parse(text):
        return None if text.lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Sample from a trained MiniGPT-zh run.")
    ap.add_argument("--out_dir", default="out", help="run directory holding best.pt / last.pt")
    ap.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint to load")
    ap.add_argument("--mode", choices=SAMPLE_MODES, default="text",
                    help="text: continue a passage; qa: answer a question; chat: interactive conversation; "
                         "rag: answer a question from retrieved passages (needs --rag)")
    ap.add_argument("--rag", default=None, help="retrieval.py index folder for --mode=rag")
    ap.add_argument("--rag_k", type=int, default=3, help="passages retrieved per question (rag mode)")
    ap.add_argument("--extractive", action="store_true",
                    help="rag mode: the answer is the likeliest span of the retrieved passages (no invented text)")
    ap.add_argument("--start", default="\n", help="prompt text, or FILE:path with one prompt per line")
    ap.add_argument("--system", default=None, help="system prompt (persona) for chat mode")
    ap.add_argument("--num_samples", type=int, default=1, help="samples per prompt (text and qa)")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"], help="0 = greedy")
    ap.add_argument("--top_k", type=optional(int), default=SAMPLING_DEFAULTS["top_k"],
                    help="keep the k likeliest tokens; none = off")
    ap.add_argument("--top_p", type=optional(float), default=SAMPLING_DEFAULTS["top_p"],
                    help="nucleus sampling mass; none = off")
    ap.add_argument("--repetition_penalty", type=float, default=SAMPLING_DEFAULTS["repetition_penalty"],
                    help="> 1 discourages repeats")
    ap.add_argument("--seed", type=optional(int), default=1337, help="none = a different sample each run")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    return ap.parse_args(argv)


def read_prompts(start):
    """The prompts named by --start: the text itself, or the non-empty lines of FILE:path."""
    if not start.startswith("FILE:"):
        return [start]
    path = Path(start[len("FILE:"):])
    if not path.is_file():
        raise SystemExit(f"--start: no such prompt file {path}")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"--start: {path} holds no prompts")
    return prompts


def sampling_settings(args, seed_offset):
    seed = None if args.seed is None else args.seed + seed_offset
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed)


def emit(pieces, out):
    """Print streamed pieces as they come; return the whole text."""
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


def format_sources(sources):
    """The sources block printed after a RAG answer: one title per passage the model read."""
    if not sources:
        return "sources: none (no passage shares a term with the question, or none fit the window)\n"
    return "sources:\n" + "".join(f"  {i}. {s['title'] or '(untitled)'}{' (cut)' if s['cut'] else ''}\n"
                                   for i, s in enumerate(sources, 1))


def sample_prompts(run, args, out, index=None):
    for prompt in read_prompts(args.start):
        for i in range(args.num_samples):
            if args.mode == "text":
                out.write(prompt)
            if args.mode == "rag":
                try:
                    ids, sources = run.rag_prompt_ids(prompt, index, args.rag_k, args.max_new_tokens)
                except PromptTooLong as e:
                    raise SystemExit(f"error: {e}") from None
                span = answer_spans(run.tok, sources_text(sources), prompt) if args.extractive else None
                emit(run.stream_ids(ids, "qa", span=span, **sampling_settings(args, i)), out)
                out.write("\n" + format_sources(sources))
            else:
                emit(run.stream(prompt, args.mode, **sampling_settings(args, i)), out)
            out.write("\n---------------\n")
            out.flush()


def fit_history(run, history, system, max_new_tokens):
    """The most recent turns whose prompt leaves room for `max_new_tokens` within block_size."""
    budget = run.model.config.block_size - max_new_tokens
    turns = list(history)
    while len(turns) > 1 and len(run.prompt_ids(turns, "chat", system)) > budget:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
    return turns


def chat(run, args, out, lines):
    out.write("chat: /reset clears the history, /quit (or Ctrl-D) leaves\n")
    history, turn = [], 0
    while True:
        out.write("你: ")
        out.flush()
        line = lines.readline()
        if not line:  # EOF
            out.write("\n")
            break
        line = line.strip()
        if line == "/quit":
            break
        if line == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if not line:
            continue
        history = fit_history(run, history + [{"role": "user", "content": line}], args.system,
                              args.max_new_tokens)
        out.write("助手: ")
        reply = emit(run.stream(history, "chat", args.system, **sampling_settings(args, turn)), out)
        out.write("\n")
        history.append({"role": "assistant", "content": reply})
        turn += 1


def main(argv=None, out=None, lines=None):
    args = parse_args(argv)
    out = out or sys.stdout
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise SystemExit("--num_samples and --max_new_tokens must be at least 1")
    if (args.mode == "rag") != (args.rag is not None):
        raise SystemExit("--mode=rag and --rag INDEX go together")
    if args.extractive and args.mode != "rag":
        raise SystemExit("--extractive copies the answer from retrieved passages: it needs --mode=rag")
    if not 1 <= args.rag_k <= 100:
        raise SystemExit("--rag_k must be between 1 and 100")
    try:
        index = Index(args.rag) if args.rag else None
    except IndexFolderError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        run = load_run(args.out_dir, args.which, pick_device(args.device))
    except (CheckpointError, FileNotFoundError) as e:  # a refused or broken checkpoint, a missing run
        raise SystemExit(f"error: {e}") from None
    if args.max_new_tokens >= run.model.config.block_size:
        print(f"note: max_new_tokens {args.max_new_tokens} reaches block_size {run.model.config.block_size}; "
              "the context window will slide", file=sys.stderr)
    if args.mode == "chat":
        chat(run, args, out, lines or sys.stdin)
    else:
        sample_prompts(run, args, out, index)


if __name__ == "__main__":
    main()
