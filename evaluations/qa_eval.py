"""Question answering scores of a run: EM, F1 (CMRC2018 definitions), SubEM, ROUGE-L and BLEU-4.

    python evaluations/qa_eval.py --out_dir out/sft --input FILE [--with_context | --rag INDEX [--rag_k 3]]
        [--extractive] [--max_examples N] [--max_new_tokens 64] [--batch_size 16] [--name NAME]

- FILE: generated QA jsonl (`{"question", "answer", "id"}`) or SQuAD-style JSON (CMRC2018, DRCD,
  XQuAD: several gold answers per question; every metric takes the best over them).
- Closed-book by default: the prompt is the question alone in the SFT layout
  (`question <|answer|>`), which measures what the model remembers from pretraining. With
  `--with_context` the passage comes first, `tokenizer.passage_qa_prompt` (passage, newline,
  question), the one layout data/prepare_sft.py and data/prepare_dpo.py use under the same flag. A
  passage that would not leave room for `--max_new_tokens` in the window is cut to the sentences
  that best match the question (`retrieval.fit_passage`; no gold answer is used), rather than
  letting the window drop its beginning.
- With `--rag INDEX` the passages come from a retrieval.py index instead: the `--rag_k` best for
  the question, packed before it by `Run.rag_prompt_ids` (the one RAG path: sample.py and the arena
  use it too). Retrieval is scored as well: recall@1 and recall@5 (`retrieval.recall_at_k`), the
  share of questions with a gold answer's text inside one of the top 1 / 5 passages, in percent.
- `--extractive` (with a passage or RAG): the answer is the span of the passages the model finds
  likeliest (`extractive.answer_spans`, searched by the engine): the model still chooses where the
  answer starts and ends, but cannot invent text that is not there. The plain numbers measure
  what the model writes; these, the reader it becomes when held to the text.
- Beside the model, the no-model rules (evaluations/baselines.py: the passage's first sentence,
  the sentence sharing most characters and bigrams with the question, the question itself) are
  scored on the same questions and the same passages shown, printed under the table and written
  as `baselines` in the result file, so no number is read without them.
- Greedy decoding, batched through `Run.complete_batch`, stopping at <|endoftext|>.
- Writes `OUT_DIR/eval_<name>.json`, name `qa` (`qa_context` with context, `qa_rag` with RAG,
  `_span` added with --extractive, or `--name`): means in percent, and every question's
  prediction and scores in `pred_<name>.jsonl` beside it, to read the failures (RAG lines also list
  the passages read and the retrieval hits).
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script (python evaluations/qa_eval.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines  # noqa: E402
from evaluations.baselines import format_rules, score_rules  # noqa: E402
from evaluations.metrics import (  # noqa: E402
    complete_all,
    default_output,
    format_table,
    load_qa,
    mean_percent,
    predictions_path,
    score_qa,
    write_predictions,
    write_results,
)
from extractive import answer_spans  # noqa: E402
from inference import load_run, pick_device  # noqa: E402
from retrieval import (  # noqa: E402
    Index,
    IndexFolderError,
    PromptTooLong,
    fit_passage,
    is_hit,
    recall_at_k,
    sources_text,
)
from tokenizer import passage_qa_prompt  # noqa: E402

METRICS = ("em", "f1", "subem", "rouge_l", "bleu4")
RECALL_KS = (1, 5)


def retrieve_all(run, index, questions, k, max_new_tokens):
    """RAG prompts and retrieval scores: (prompt ids, per-question fields, {recall_at_1, recall_at_5},
    the passage text each prompt holds, or None when it holds none).

    A question too long for the window even alone is an error for the caller (PromptTooLong)."""
    rows, fields, ranked, texts = [], [], [], []
    for q in questions:
        ids, sources = run.rag_prompt_ids(q["question"], index, k, max_new_tokens)
        hits = index.search(q["question"], max(RECALL_KS))
        rows.append(ids)
        ranked.append(hits)
        texts.append(sources_text(sources))
        gold = {"answers": q["answers"]}
        read = [{"title": s["title"], "article_id": s["article_id"], "cut": s["cut"]} for s in sources]
        fields.append({"sources": read,
                       "retrieved": [h["title"] for h in hits],
                       "hit_rank": next((r for r, h in enumerate(hits, 1) if is_hit(h, gold)), None)})
    golds = [q["answers"] for q in questions]
    recall = {f"recall_at_{k}": 100 * recall_at_k(ranked, golds, k) for k in RECALL_KS}
    return rows, fields, recall, texts


def passage_prompts(run, questions, max_new_tokens):
    """--with_context prompts: each question after its passage, cut to the window around the
    sentences that match the question (`retrieval.fit_passage`) when prompt + answer would not fit;
    per question whether its passage was cut; and the passages as shown."""
    budget = run.model.config.block_size - max_new_tokens
    prompts, fields, texts = [], [], []
    for q in questions:
        passage, cut = fit_passage(run.tok, q["context"], q["question"], budget)
        prompts.append(passage_qa_prompt(passage, q["question"]))
        fields.append({"passage_cut": cut})
        texts.append(passage)
    return prompts, fields, texts


def main(argv=None):
    p = argparse.ArgumentParser(description="EM / F1 / SubEM / ROUGE-L / BLEU-4 of a run's answers.")
    p.add_argument("--out_dir", required=True, help="run directory")
    p.add_argument("--input", required=True, help="QA jsonl or SQuAD-style JSON")
    p.add_argument("--with_context", action="store_true", help="put the passage before the question")
    p.add_argument("--rag", default=None, help="retrieval.py index: retrieve the passages (RAG) and score recall@k")
    p.add_argument("--rag_k", type=int, default=3, help="passages retrieved per question for the prompt")
    p.add_argument("--extractive", action="store_true",
                   help="with --with_context or --rag: answers are the likeliest span of the passages (extractive.py)")
    p.add_argument("--name", default=None, help="result name: eval_<name>.json (default qa, qa_context, qa_rag)")
    p.add_argument("--max_examples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights' precision; auto: bf16 where the GPU/CPU computes it natively (as train.py)")
    p.add_argument("--which", default="best")
    p.add_argument("--output", default=None, help="result JSON (default OUT_DIR/eval_qa[_context].json)")
    args = p.parse_args(argv)

    if args.rag and args.with_context:
        p.error("--with_context gives the gold passage, --rag retrieves passages: choose one")
    if args.extractive and not (args.rag or args.with_context):
        p.error("--extractive copies answers from the passages: it needs --with_context or --rag")
    if not 1 <= args.rag_k <= 100:
        p.error("--rag_k must be between 1 and 100")
    if args.name is not None and not args.name.replace("_", "").isalnum():
        p.error("--name: letters, digits and _ only")
    try:
        index = Index(args.rag) if args.rag else None
    except IndexFolderError as e:
        sys.exit(f"error: {e}")

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

    run = load_run(args.out_dir, args.which, pick_device(args.device), args.dtype)
    prompts = [q["question"].strip() for q in questions]
    extra, recall, texts = [{} for _ in questions], {}, None
    if args.with_context:
        try:
            prompts, extra, texts = passage_prompts(run, questions, args.max_new_tokens)
        except PromptTooLong as e:
            sys.exit(f"error: {e}")
    if index is not None:
        try:
            prompts, extra, recall, texts = retrieve_all(run, index, questions, args.rag_k, args.max_new_tokens)
        except PromptTooLong as e:
            sys.exit(f"error: {e}")
    spans = [answer_spans(run.tok, t, q["question"]) for t, q in zip(texts, questions)] if args.extractive else None
    predictions = complete_all(run, prompts, "qa", args.batch_size, args.max_new_tokens, spans=spans)
    rows = [{"id": q["id"], "question": q["question"], "prediction": pred, "answers": q["answers"],
             **score_qa(pred, q["answers"]), **more} for q, pred, more in zip(questions, predictions, extra)]

    name = args.name or ("qa_rag" if index is not None else "qa_context" if args.with_context else "qa")
    name += "_span" if args.extractive and not args.name else ""
    output = args.output or default_output(args.out_dir, name)
    write_predictions(predictions_path(output), rows)
    metrics = {**mean_percent(rows, METRICS), **recall, "n": len(rows)}
    if args.with_context:
        metrics["passages_cut"] = sum(r["passage_cut"] for r in rows)
    settings = {"with_context": args.with_context, "extractive": args.extractive, "max_examples": args.max_examples,
                "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "which": args.which}
    if index is not None:
        settings |= {"rag": str(args.rag), "rag_k": args.rag_k, "index_passages": len(index),
                     "index_inputs": index.meta.get("inputs")}
    # the no-model rules on the same questions and the same passages the model was shown
    baselines = score_rules(questions, texts if texts is not None else [None] * len(questions))
    write_results(output, name, run, args.input, settings, metrics, baselines)
    print(format_table({"run": run.info["name"], **metrics}))
    print(format_rules(baselines, {"em": metrics["em"], "f1": metrics["f1"]}))
    print(f"wrote {output} and {predictions_path(output)}")


if __name__ == "__main__":
    main()
