"""No-model answerers: the rules every reading score is shown beside.

    python evaluations/baselines.py --input data/held_out_with_passage.jsonl [--max_examples 300]
        [--tokenizer data/tokenizer --budget 224] [--output FILE]

A reading score means little alone: on data where the answer sits in the passage's opening, a model
that copies the first sentence scores well without reading (issue 23: the first-sentence rule scored
F1 72 on the old generated pairs). Three rules, scored with the same EM/F1 as the models
(`metrics.score_qa`):
- `first_sentence`: the passage's first sentence. High when answers cluster in the opening.
- `best_overlap`: the passage sentence sharing most Han characters and bigrams with the question
  (`retrieval.best_sentence`, the anchor the windowing uses). High when the question is a copy of
  its sentence; a reader must beat it by picking the span inside the sentence.
- `copy_question`: the question itself. Catches metrics that reward echoing.
The rules see the passage the model is shown: qa_eval.py passes its fitted window (or the RAG
passages); this command fits each passage around the question with `--tokenizer`/`--budget`, as
qa_eval.py would, or takes it whole without them.
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script (python evaluations/baselines.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines, load_qa, split_sentences, write_json  # noqa: E402
from evaluations.metrics import exact_match, f1  # noqa: E402
from retrieval import best_sentence, fit_passage  # noqa: E402

RULES = ("first_sentence", "best_overlap", "copy_question")


def rule_answers(passage, question):
    """{rule: answer} for one question; the passage rules answer '' when there is no passage."""
    sentences = [s for s in split_sentences(passage or "") if s.strip()]
    return {"first_sentence": sentences[0] if sentences else "",
            "best_overlap": sentences[best_sentence(sentences, question)] if sentences else "",
            "copy_question": question}


def score_rules(questions, passages):
    """{rule: {"em", "f1"}} in percent over the questions, each with the passage it is shown
    (None: closed-book, where only `copy_question` applies)."""
    totals = {}
    for q, passage in zip(questions, passages):
        for rule, answer in rule_answers(passage, q["question"]).items():
            if passage is None and rule != "copy_question":
                continue
            t = totals.setdefault(rule, {"em": 0.0, "f1": 0.0, "n": 0})
            t["em"] += exact_match(answer, q["answers"])
            t["f1"] += f1(answer, q["answers"])
            t["n"] += 1
    return {rule: {"em": 100 * t["em"] / t["n"], "f1": 100 * t["f1"] / t["n"]}
            for rule, t in totals.items() if t["n"]}


def format_rules(scores, model=None):
    """A few lines: the model's EM/F1 (when given) above each rule's."""
    rows = ([("model", model)] if model else []) + [(f"rule: {r}", s) for r, s in scores.items()]
    return "\n".join(f"{name:<22} EM {s['em']:5.1f}  F1 {s['f1']:5.1f}" for name, s in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="EM/F1 of the no-model rules (first sentence, best-overlap "
                                            "sentence, copy the question) on a QA set with passages.")
    p.add_argument("--input", required=True, help="QA jsonl with 'context', or SQuAD-style JSON")
    p.add_argument("--max_examples", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="fit each passage around the question as qa_eval.py does")
    p.add_argument("--budget", type=int, default=224, help="with --tokenizer: the prompt's token budget")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    args = p.parse_args(argv)
    bad = BadLines()
    try:
        questions = [q for q in load_qa(args.input, bad) if q.get("context")][: args.max_examples]
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    bad.report()
    if not questions:
        sys.exit(f"error: no question with a passage in {args.input}")
    passages = [q["context"] for q in questions]
    if args.tokenizer:
        from tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        passages = [fit_passage(tok, q["context"], q["question"], args.budget)[0] for q in questions]
    scores = score_rules(questions, passages)
    print(f"no-model rules on {len(questions)} questions of {args.input}:")
    print(format_rules(scores))
    if args.output:
        write_json(Path(args.output), {"input": str(args.input), "n": len(questions), "rules": scores})
    return scores


if __name__ == "__main__":
    main()
