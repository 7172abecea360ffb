"""Max-likelihood span search (extractive.py): its speed, and its quality against a rule with no model.

    python bench/bench_span.py speed [--questions 20] [--chars 500] [--threads 2]
    python bench/bench_span.py quality --out_dir out/sft --input ../shared/data/qa/drcd_test.zh-hans.json \
        [--max_examples 300] [--output bench/results/span_quality.json]
    python bench/bench_span.py quality --tokenizer data/tokenizer      # the rules alone, no model

speed: a random-weight model of the CPU preset's shape (config/train_config_cpu.py: n_layer, n_head,
n_embd, arch, tie_embeddings; block 512 so that a 500-character passage fits; speed does not depend
on what the weights say, only on the candidate and trie sizes) and the pipeline's 8k tokenizer
(`--tokenizer`, default data/tokenizer). Each question of DRCD test whose paragraph has at least
`--chars` characters gets the first `--chars` of it as its passage, and the whole extractive answer is
timed as every front end runs it: candidates (`extractive.answer_spans`), prefill, the search, the
answer's tokens (`engine.generate`). The variants (every sentence, or the lexical gate's best
sentence) alternate per question, so both see the same machine load; medians of wall time and of
the process's CPU time (all threads: on a shared machine the wall time measures the neighbours).

quality: the run answers each question of `--input` with its passage shown as qa_eval.py
--with_context shows it (`passage_prompts`). All candidates (every sentence) are scored once per
question (`extractive.score_spans` over the prompt's cache), and each variant picks its winner among
them: the sum or the mean of log-probs, over every sentence or over the `gate` best sentences (the
gated candidates are a subset of all). Beside them, two rules with no model: the passage sentence
sharing most characters and bigrams with the question (the issue's best-overlap-sentence rule) and
the passage's first sentence. F1 / EM are evaluations.metrics.score_qa's (best over the gold answers).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

import torch  # noqa: E402

import extractive  # noqa: E402
from data_utils import load_qa, split_sentences  # noqa: E402
from engine import SlotCache, generate  # noqa: E402
from evaluations.metrics import score_qa  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from retrieval import analyze  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DRCD_TEST = ROOT.parent / "shared" / "data" / "qa" / "drcd_test.zh-hans.json"


def preset_model(vocab_size, block_size=512):
    settings = {}
    exec((ROOT / "config" / "train_config_cpu.py").read_text(), settings)
    shape = {k: settings[k] for k in ("n_layer", "n_head", "n_embd", "arch", "tie_embeddings") if k in settings}
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, **shape)).eval(), shape


def speed(args):
    tok = load_tokenizer(args.tokenizer)
    model, shape = preset_model(tok.n_vocab)
    questions = [q for q in load_qa(args.input) if len(q["context"]) >= args.chars][: args.questions]
    variants = {"all sentences": 0, "gate 1 sentence": 1}
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    sizes = {name: [] for name in variants}
    for q in [questions[0]] + questions:  # the first is a warm-up, not counted
        for name, gate in variants.items():
            passage = q["context"][: args.chars]
            start, start_cpu = time.perf_counter(), time.process_time()
            spans = extractive.answer_spans(tok, passage, q["question"], gate=gate)
            ids = tok.encode_passage_qa(passage, q["question"])
            for _ in generate(model, [ids], 32, temperature=0.0, stop_ids=[tok.eot], spans=[spans]):
                pass
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            sizes[name].append(len(spans.ids))
    result = {"model": shape, "chars": args.chars, "threads": torch.get_num_threads(), "questions": len(questions)}
    for name in variants:
        result[name] = {"median_s": round(statistics.median(times[name][1:]), 3),
                        "max_s": round(max(times[name][1:]), 3),
                        "median_cpu_s": round(statistics.median(cpu[name][1:]), 3),
                        "max_cpu_s": round(max(cpu[name][1:]), 3),
                        "median_candidates": statistics.median(sizes[name][1:])}
    return result


def best_sentence(passage, question):
    """The issue's rule: the sentence sharing most terms (characters and bigrams) with the question."""
    sentences = [s for s in split_sentences(passage) if s.strip()] or [passage]
    wanted = set(analyze(question))
    return max(sentences, key=lambda s: len(wanted & set(analyze(s))))


@torch.no_grad()
def prompt_cache(model, ids):
    cache = SlotCache(model.config, 1, "cpu", next(model.parameters()).dtype)
    cache.plan(slice(0, 1), 0, len(ids))
    logits, _ = model(torch.tensor([ids]), cache=cache, pos=torch.arange(len(ids))[None])
    return cache.k[:, 0, :, : len(ids)], cache.v[:, 0, :, : len(ids)], logits[0, -1]


def quality(args):
    from types import SimpleNamespace

    from evaluations.qa_eval import passage_prompts
    from inference import load_run

    if args.out_dir:
        run = load_run(args.out_dir)
    else:  # the rules alone: the passages as a model of --block_size with this tokenizer would see them
        run = SimpleNamespace(tok=load_tokenizer(args.tokenizer), model=None)
        run.model = SimpleNamespace(config=SimpleNamespace(block_size=args.block_size))
    tok, model = run.tok, run.model
    questions = load_qa(args.input)[: args.max_examples]
    prompts, _, passages = passage_prompts(run, questions, args.max_new_tokens)
    variants = [(norm, gate) for gate in (0, 1, 2) for norm in extractive.NORMS] if args.out_dir else []
    rows = {f"{norm}, gate {gate}": [] for norm, gate in variants}
    rows |= {"rule: best-overlap sentence": [], "rule: first sentence": []}
    reach = {"a gold answer is a candidate (every sentence)": [], "... in the gate's best sentence": [],
             "... in the gate's best 2 sentences": [], "... is a run of the passage's tokens (greedy copying)": []}
    start = time.perf_counter()
    for q, prompt, passage in zip(questions, prompts, passages):
        golds = [a for a in q["answers"] if a.strip()]
        for hits, gate in zip(list(reach.values())[:3], (0, 1, 2)):
            hits.append(bool(set(golds) & set(extractive.candidate_texts(passage, question=q["question"], gate=gate))))
        ids = tok.encode(passage)
        reach["... is a run of the passage's tokens (greedy copying)"].append(any(
            len(g) <= extractive.MAX_SPAN_CHARS and is_run(tok.encode(g), ids) for g in golds))
        rows["rule: best-overlap sentence"].append(score_qa(best_sentence(passage, q["question"]), q["answers"]))
        first = next((s for s in split_sentences(passage) if s.strip()), "")
        rows["rule: first sentence"].append(score_qa(first, q["answers"]))
        if not variants:
            continue
        ids = tok.encode_qa(prompt)
        spans = extractive.answer_spans(tok, passage, q["question"], gate=0)
        room = min(args.max_new_tokens, model.config.block_size - 1 - len(ids) + 1)
        keep = [i for i, s in enumerate(spans.ids) if len(s) + 1 <= room]
        k, v, last = prompt_cache(model, ids)
        logprob, n = extractive.score_spans(model, k, v, last, [spans.ids[i] for i in keep], tok.eot)
        where = {spans.texts[i]: j for j, i in enumerate(keep)}
        for norm, gate in variants:
            allowed = [where[t] for t in extractive.candidate_texts(passage, question=q["question"], gate=gate)
                       if t in where] if gate else list(range(len(keep)))
            best = extractive.choose(logprob[allowed], n[allowed], norm)
            pred = "" if best is None else spans.texts[keep[allowed[best]]]
            rows[f"{norm}, gate {gate}"].append(score_qa(pred, q["answers"]))
    table = {name: {"f1": round(100 * statistics.mean(r["f1"] for r in scores), 1),
                    "em": round(100 * statistics.mean(r["em"] for r in scores), 1)} for name, scores in rows.items()}
    return {"run": str(args.out_dir or "none: rules only"), "input": str(args.input), "n": len(questions),
            "seconds_per_question": round((time.perf_counter() - start) / len(questions), 3), "table": table,
            "reachable_percent": {k: round(100 * statistics.mean(v), 1) for k, v in reach.items()}}


def is_run(needle, haystack):
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("speed", "quality"))
    p.add_argument("--input", default=str(DRCD_TEST), help="SQuAD-style JSON (DRCD test)")
    p.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"), help="speed: the tokenizer folder")
    p.add_argument("--questions", type=int, default=20, help="speed: questions timed")
    p.add_argument("--chars", type=int, default=500, help="speed: passage length in characters")
    p.add_argument("--out_dir", help="quality: the run directory (none: the rules alone)")
    p.add_argument("--block_size", type=int, default=256, help="quality without --out_dir: the window passages fit")
    p.add_argument("--max_examples", type=int, default=300)
    p.add_argument("--max_new_tokens", type=int, default=64, help="quality: as qa_eval.py's (the passage budget)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="write the result JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = speed(args) if args.what == "speed" else quality(args)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out)


if __name__ == "__main__":
    main()
