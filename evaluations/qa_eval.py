"""Question answering scores of a run: EM, F1 (CMRC2018 definitions), SubEM, ROUGE-L and BLEU-4.

    python evaluations/qa_eval.py --out_dir out/sft --input FILE [--with_context] [--max_examples N]
        [--max_new_tokens 64] [--batch_size 16]

- FILE: generated QA jsonl (`{"question", "answer", "id"}`) or SQuAD-style JSON (CMRC2018, DRCD,
  XQuAD: several gold answers per question; every metric takes the best over them).
- Closed-book by default: the prompt is the question alone in the SFT layout
  (`question <|answer|>`), which measures what the model remembers from pretraining. With
  `--with_context` the passage comes first, `tokenizer.passage_qa_prompt` (passage, newline,
  question), the one layout data/prepare_sft.py and data/prepare_dpo.py use under the same flag.
- Greedy decoding, batched through `Run.complete_batch`, stopping at <|endoftext|>.
- Writes `OUT_DIR/eval_qa.json` (`eval_qa_context.json` with context): means in percent, and every
  question's prediction and scores in `pred_qa[_context].jsonl` beside it, to read the failures.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import load_run, pick_device  # noqa: E402
from data_utils import BadLines  # noqa: E402
from evaluations.metrics import (complete_all, default_output, format_table, load_qa, mean_percent,  # noqa: E402
                                 predictions_path, score_qa, write_predictions, write_results)
from tokenizer import passage_qa_prompt  # noqa: E402

METRICS = ("em", "f1", "subem", "rouge_l", "bleu4")


def main(argv=None):
    p = argparse.ArgumentParser(description="EM / F1 / SubEM / ROUGE-L / BLEU-4 of a run's answers.")
    p.add_argument("--out_dir", required=True, help="run directory")
    p.add_argument("--input", required=True, help="QA jsonl or SQuAD-style JSON")
    p.add_argument("--with_context", action="store_true", help="put the passage before the question")
    p.add_argument("--max_examples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--which", default="best")
    p.add_argument("--output", default=None, help="result JSON (default OUT_DIR/eval_qa[_context].json)")
    args = p.parse_args(argv)

    bad = BadLines()
    questions = load_qa(args.input, bad)[: args.max_examples]
    bad.report()
    if not questions:
        sys.exit(f"error: no usable questions in {args.input}")
    if args.with_context:
        missing = sum(1 for q in questions if not q["context"])
        if missing:
            sys.exit(f"error: --with_context, but {missing} questions in {args.input} have no context "
                     "(SQuAD-style JSON, or jsonl lines with a 'context' field, carry one)")
        prompts = [passage_qa_prompt(q["context"], q["question"]) for q in questions]
    else:
        prompts = [q["question"].strip() for q in questions]

    run = load_run(args.out_dir, args.which, pick_device(args.device))
    predictions = complete_all(run, prompts, "qa", args.batch_size, args.max_new_tokens)
    rows = [{"id": q["id"], "question": q["question"], "prediction": pred, "answers": q["answers"],
             **score_qa(pred, q["answers"])} for q, pred in zip(questions, predictions)]

    name = "qa_context" if args.with_context else "qa"
    output = args.output or default_output(args.out_dir, name)
    write_predictions(predictions_path(output), rows)
    metrics = {**mean_percent(rows, METRICS), "n": len(rows)}
    settings = {"with_context": args.with_context, "max_examples": args.max_examples,
                "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "which": args.which}
    write_results(output, name, run, args.input, settings, metrics)
    print(format_table({"run": run.info["name"], **metrics}))
    print(f"wrote {output} and {predictions_path(output)}")


if __name__ == "__main__":
    main()
