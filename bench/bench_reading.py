"""Reading without a model: the baselines a reader must beat, and what cutting a long passage keeps.

    python bench/bench_reading.py --tokenizer data/tokenizer      # DRCD test's first 300, as the pipeline

- Sentence baseline: the answer is the passage sentence sharing most terms (`retrieval.analyze`:
  Han unigrams + bigrams) with the question (evaluations/baselines.py's `best_overlap` rule),
  scored with the evaluations' F1 (CMRC2018 definition;
  a long prediction holding the answer gets partial credit). A model reading the passage should beat it.
- Cutting: for the passages that do not fit the prompt budget (`block_size - max_new_tokens` tokens
  with the question), how often the gold answer stays inside the text the model is shown, two ways:
  `retrieval.fit_passage` (the sentences best matching the question; what qa_eval.py --with_context
  does) and the window's tail (what the model saw when the prompt was passed whole and the window
  kept its end).
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import load_qa  # noqa: E402
from evaluations.baselines import rule_answers  # noqa: E402
from evaluations.metrics import f1  # noqa: E402
from retrieval import fit_passage  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "qa" /
                                           "drcd_test.zh-hans.json"))
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--max_examples", type=int, default=300)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    questions = load_qa(args.input)[: args.max_examples]
    baseline = statistics.mean(f1(rule_answers(q["context"], q["question"])["best_overlap"], q["answers"])
                               for q in questions)
    budget = args.block_size - args.max_new_tokens
    long = kept_fit = kept_tail = 0
    for q in questions:
        if len(tok.encode_passage_qa(q["context"], q["question"])) <= budget:
            continue
        long += 1
        text, _ = fit_passage(tok, q["context"], q["question"], budget)
        kept_fit += any(a in text for a in q["answers"])
        tail = tok.decode(tok.encode_passage_qa(q["context"], q["question"])[-budget:])
        kept_tail += any(a in tail for a in q["answers"])
    print(f"{len(questions)} questions of {args.input}")
    print(f"sentence baseline F1: {100 * baseline:.1f}")
    print(f"passages over the {budget}-token budget: {long}; answer kept by fit_passage: {kept_fit}, "
          f"by the window's tail: {kept_tail}")


if __name__ == "__main__":
    main()
