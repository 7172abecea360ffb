"""ROUGE-L of a run's generations against references, in two modes (as the original project had).

    python evaluations/rouge_l.py --out_dir out/sft --input FILE [--mode continuation|qa]
        [--max_examples 200] [--max_new_tokens 64] [--temperature 0] [--seed 0] [--segment char|jieba]

- continuation: FILE (or a folder) is wiki jsonl of held-out articles. Each article is cleaned
  with `clean_article` and split with `split_sentences` (as for pretraining); the prompt is its
  first sentence, the reference the sentences after it up to `--ref_chars` characters (at least
  one; a longer one is cut), about what `--max_new_tokens` tokens can cover.
- qa: FILE is generated QA jsonl or SQuAD-style JSON; the prompt is the question (qa layout), the
  references its gold answers (ROUGE-L is the best over them).
- Greedy by default (`--temperature 0`), and seeded when sampling, so a run's score is repeatable;
  prompts are generated in batches through `Run.complete_batch`.
- Texts are segmented before `rouge-chinese` scores them (it splits on spaces; see metrics.py):
  by character by default, with jieba words on request.
- Writes `OUT_DIR/eval_rouge_l_<mode>.json` and the per-example predictions beside it
  (`pred_rouge_l_<mode>.jsonl`).
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script (python evaluations/rouge_l.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines, clean_article, find_jsonl, iter_jsonl, split_sentences  # noqa: E402
from evaluations.metrics import (  # noqa: E402
    complete_all,
    default_output,
    format_table,
    load_qa,
    mean_percent,
    predictions_path,
    rouge_l,
    write_predictions,
    write_results,
)
from inference import load_run, pick_device  # noqa: E402


def continuation_examples(path, max_examples, ref_chars, bad):
    """Held-out articles as {id, prompt, answers}: first sentence -> the next `ref_chars` characters."""
    files = find_jsonl(path)
    if not files:
        raise FileNotFoundError(f"no jsonl files at {path}")
    examples = []
    for file in files:
        for lineno, obj in iter_jsonl(file, bad):
            sentences = split_sentences(clean_article(obj["text"]))
            if len(sentences) < 2:
                continue  # nothing to continue towards
            reference = ""
            for sentence in sentences[1:]:
                if reference and len(reference) + len(sentence) > ref_chars:
                    break
                reference += sentence
            examples.append({"id": str(obj.get("id", f"{file.name}:{lineno}")), "prompt": sentences[0],
                             "answers": [reference[:ref_chars]]})
            if len(examples) == max_examples:
                return examples
    return examples


def main(argv=None):
    p = argparse.ArgumentParser(description="ROUGE-L of generated continuations or answers.")
    p.add_argument("--out_dir", required=True, help="run directory")
    p.add_argument("--input", required=True, help="wiki jsonl (continuation) or QA jsonl / SQuAD JSON (qa)")
    p.add_argument("--mode", choices=("continuation", "qa"), default="continuation")
    p.add_argument("--max_examples", type=int, default=200)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--ref_chars", type=int, default=100, help="continuation: reference length in characters")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment", choices=("char", "jieba"), default="char")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--which", default="best")
    p.add_argument("--output", default=None, help="result JSON (default OUT_DIR/eval_rouge_l_<mode>.json)")
    args = p.parse_args(argv)

    bad = BadLines()
    if args.mode == "continuation":
        examples = continuation_examples(args.input, args.max_examples, args.ref_chars, bad)
    else:
        examples = [{"id": q["id"], "prompt": q["question"], "answers": q["answers"]}
                    for q in load_qa(args.input, bad)[: args.max_examples]]
    bad.report()
    if not examples:
        sys.exit(f"error: no usable examples in {args.input}")

    run = load_run(args.out_dir, args.which, pick_device(args.device))
    mode = "text" if args.mode == "continuation" else "qa"
    predictions = complete_all(run, [e["prompt"] for e in examples], mode, args.batch_size,
                               args.max_new_tokens, args.temperature, args.seed)
    rows = [{**e, "prediction": pred, "rouge_l": rouge_l(pred, e["answers"], args.segment)}
            for e, pred in zip(examples, predictions)]

    name = f"rouge_l_{args.mode}"
    output = args.output or default_output(args.out_dir, name)
    write_predictions(predictions_path(output), rows)
    metrics = {**mean_percent(rows, ["rouge_l"]), "n": len(rows)}
    settings = {k: getattr(args, k) for k in ("mode", "max_examples", "max_new_tokens", "ref_chars", "temperature",
                                              "seed", "segment", "which")}
    write_results(output, name, run, args.input, settings, metrics)
    print(format_table({"run": run.info["name"], **metrics}))
    print(f"wrote {output} and {predictions_path(output)}")


if __name__ == "__main__":
    main()
