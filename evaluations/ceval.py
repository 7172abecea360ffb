"""C-Eval and CMMLU: Chinese multiple choice, scored the way lm-evaluation-harness scores them.

    python evaluations/ceval.py --out_dir out/sft --data ~/data/ceval-exam            # C-Eval, val split
    python evaluations/ceval.py --out_dir out/sft --data ~/data/cmmlu --fewshot 5     # CMMLU, test split

`--data` is the folder of the official CSVs, unpacked as published (nothing is downloaded):
- C-Eval (ceval-exam.zip): `{dev,val,test}/{subject}_{split}.csv` (or all in one folder), columns
  id,question,A,B,C,D,answer[,explanation]. The test split has no answers, so the default is val.
- CMMLU (cmmlu_v1_0_1.zip): `{dev,test}/{subject}.csv`, columns (unnamed index),Question,A,B,C,D,Answer.
  The default split is test, as lm-eval's.
`--benchmark auto` tells them apart by the file names (`*_val.csv` / `*_dev.csv` is C-Eval).

Design choices:
- The prompt and the score are lm-eval's (tasks ceval-valid_* and cmmlu_*): the subject's description
  (read from the installed lm-eval task files when there are some; none otherwise), `--fewshot`
  solved examples from the dev split (the first N, as lm-eval's first_n sampler), each
  "question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：" + " " + letter, separated by a blank line, then
  the question. Each letter's continuation " A" .. " D" is scored by its log-likelihood after that
  context and the highest wins (acc; lm-eval's acc_norm divides by the continuation's length in
  bytes, the same for the four letters, so it equals acc). Context and continuation are split as
  lm-eval's `_encode_pair` does (encode the whole, then cut after the context's tokens), and a
  context longer than the model's window keeps its last block_size tokens, as lm-eval's hf model does.
- Beside the model: chance (one over the number of choices) and the no-model baseline of always
  answering the letter most frequent among the scored questions (the best a constant answer can do).
- The total is the mean over all questions (lm-eval's weight_by_size); per-subject accuracies go into
  the result file (`OUT_DIR/eval_ceval.json` or `eval_cmmlu.json`).
"""
import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import torch

if not __package__:  # run as a script: the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evaluations.metrics import default_output, format_table, write_results  # noqa: E402
from inference import load_run, pick_device  # noqa: E402

LETTERS = ("A", "B", "C", "D")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test"}
LM_EVAL_TASK = {"ceval": "ceval-valid_{}", "cmmlu": "cmmlu_{}"}  # task names in lm-eval's task folders
MAX_FEWSHOT = 5  # the dev split of both holds five examples per subject


class DataError(ValueError):
    """The data folder is not in the official format (missing files or columns, a bad answer)."""


def detect_benchmark(folder):
    names = [p.name for p in Path(folder).rglob("*.csv")]
    if not names:
        raise DataError(f"no CSV files under {folder}: unpack ceval-exam.zip or CMMLU's zip there")
    return "ceval" if any(n.endswith(("_val.csv", "_dev.csv", "_test.csv")) for n in names) else "cmmlu"


def subject_files(folder, benchmark, split):
    """{subject: CSV path} of one split."""
    folder = Path(folder)
    if benchmark == "ceval":
        files = {p.name[:-len(f"_{split}.csv")]: p for p in folder.rglob(f"*_{split}.csv")}
    else:
        files = {p.stem: p for p in (folder / split).glob("*.csv")}
    if not files:
        layout = f"{{subject}}_{split}.csv" if benchmark == "ceval" else f"{split}/{{subject}}.csv"
        raise DataError(f"no {benchmark} {split} files ({layout}) under {folder}")
    return dict(sorted(files.items()))


def read_questions(path, need_answer=True):
    """The questions of one official CSV: [{question, A, B, C, D, answer}]; C-Eval's lower-case and
    CMMLU's capitalised column names both read."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = {c.lower(): c for c in reader.fieldnames or [] if c}
        missing = [c for c in ("question", *[x.lower() for x in LETTERS]) if c not in columns]
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)} (columns: {reader.fieldnames})")
        if need_answer and "answer" not in columns:
            raise DataError(f"{path} has no answer column (C-Eval's test split hides its answers: use --split val)")
        questions = []
        for line, row in enumerate(reader, start=2):
            q = {"question": row[columns["question"]] or "", **{x: row[columns[x.lower()]] or "" for x in LETTERS}}
            if need_answer:
                q["answer"] = (row[columns["answer"]] or "").strip()
                if q["answer"] not in LETTERS:
                    raise DataError(f"{path}:{line}: answer {q['answer']!r} is not one of {', '.join(LETTERS)}")
            questions.append(q)
    return questions


def doc_to_text(q):
    """lm-eval's doc_to_text of both tasks."""
    return f"{q['question'].strip()}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\n答案："


def lm_eval_description(benchmark, subject):
    """The subject's description line from the installed lm-eval task files ("" when there are none)."""
    try:
        import lm_eval
        import yaml
    except ImportError:
        return ""
    task = LM_EVAL_TASK[benchmark].format(subject)
    path = Path(lm_eval.__file__).parent / "tasks" / benchmark / f"{task}.yaml"
    if not path.exists():
        return ""
    return yaml.safe_load(path.read_text(encoding="utf-8")).get("description", "")


def build_context(question, shots, description):
    """description + solved examples (each ending in " letter", then a blank line) + the question."""
    examples = "".join(doc_to_text(s) + " " + s["answer"] + "\n\n" for s in shots)
    return description + examples + doc_to_text(question)


def encode_pair(tok, context, continuation):
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the whole
    is encoded and cut after the context's own tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16):
    """Sum of log p(continuation | context) per (context ids, continuation ids), lm-eval's way: the
    last block_size + 1 tokens of the pair, the final one only as a target."""
    block, device = model.config.block_size, next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [(requests[i][0] + requests[i][1])[-(block + 1):] for i in batch]
        width = max(len(s) - 1 for s in seqs)
        x = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            x[row, :len(s) - 1] = torch.tensor(s[:-1])  # padding after a row: causal, so never read
        logp = torch.log_softmax(model(x.to(device))[0].float(), dim=-1)
        for row, i in enumerate(batch):
            n, s = len(requests[i][1]), seqs[row]
            targets = torch.tensor(s[-n:], device=device)
            positions = torch.arange(len(s) - 1 - n, len(s) - 1, device=device)
            out[i] = logp[row, positions, targets].sum().item()
    return out


def score_subject(run, questions, shots, description, batch_size):
    """(list of predicted letters, list of per-letter log-likelihoods) for one subject's questions."""
    requests = []
    for q in questions:
        context = build_context(q, shots, description)
        requests += [encode_pair(run.tok, context, " " + letter) for letter in LETTERS]
    scores = loglikelihoods(run.model, requests, batch_size)
    rows = [scores[i:i + len(LETTERS)] for i in range(0, len(scores), len(LETTERS))]
    return [LETTERS[max(range(len(LETTERS)), key=r.__getitem__)] for r in rows], rows


def evaluate(run, folder, benchmark, split, fewshot=0, subjects=None, max_questions=None, batch_size=16):
    """{"subjects": {name: {n, acc}}, "n", "acc", "chance", "baseline_letter", "baseline_acc"}."""
    files = subject_files(folder, benchmark, split)
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise DataError(f"no {split} file for subject(s) {', '.join(unknown)} (there are: {', '.join(files)})")
        files = {s: files[s] for s in subjects}
    dev = subject_files(folder, benchmark, "dev") if fewshot else {}
    per_subject, answers, correct = {}, [], 0
    for subject, path in files.items():
        questions = read_questions(path)[:max_questions]
        if subject not in dev and fewshot:
            raise DataError(f"--fewshot needs the dev split of {subject}")
        shots = read_questions(dev[subject])[:fewshot] if fewshot else []
        predicted, _ = score_subject(run, questions, shots, lm_eval_description(benchmark, subject), batch_size)
        right = sum(p == q["answer"] for p, q in zip(predicted, questions))
        per_subject[subject] = {"n": len(questions), "acc": right / max(len(questions), 1)}
        answers += [q["answer"] for q in questions]
        correct += right
    if not answers:
        raise DataError(f"the {split} files under {folder} hold no questions")
    letter, count = Counter(answers).most_common(1)[0]
    return {"subjects": per_subject, "n": len(answers), "acc": correct / len(answers), "chance": 1 / len(LETTERS),
            "baseline_letter": letter, "baseline_acc": count / len(answers)}


def main(argv=None):
    p = argparse.ArgumentParser(description="C-Eval / CMMLU accuracy of a run (lm-eval's letter log-likelihood).")
    p.add_argument("--out_dir", required=True, help="run directory (best.pt / last.pt)")
    p.add_argument("--data", required=True, help="folder of the official CSVs (ceval-exam or cmmlu, unpacked)")
    p.add_argument("--benchmark", default="auto", choices=("auto", "ceval", "cmmlu"))
    p.add_argument("--split", default=None, help="C-Eval: val (default) or dev; CMMLU: test (default) or dev")
    p.add_argument("--fewshot", type=int, default=0, help=f"solved dev examples before each question (0-{MAX_FEWSHOT})")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    p.add_argument("--max_questions", type=int, default=None, help="score only the first N questions per subject")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--which", default="best", help="best or last checkpoint")
    p.add_argument("--output", default=None, help="result JSON (default OUT_DIR/eval_<benchmark>.json)")
    args = p.parse_args(argv)
    if not 0 <= args.fewshot <= MAX_FEWSHOT:
        p.error(f"--fewshot must be between 0 and {MAX_FEWSHOT}")
    if args.max_questions is not None and args.max_questions < 1 or not 1 <= args.batch_size <= 1024:
        p.error("--max_questions must be at least 1 and --batch_size between 1 and 1024")
    if not Path(args.data).is_dir():
        raise SystemExit(f"error: no folder {args.data} (download and unpack the official CSVs; see README)")
    try:
        benchmark = detect_benchmark(args.data) if args.benchmark == "auto" else args.benchmark
        split = args.split or DEFAULT_SPLIT[benchmark]
        run = load_run(args.out_dir, args.which, pick_device(args.device))
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        result = evaluate(run, args.data, benchmark, split, args.fewshot, subjects, args.max_questions,
                          args.batch_size)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    metrics = {"questions": result["n"], "subjects": len(result["subjects"]), "acc": result["acc"],
               "chance": result["chance"], f"baseline_always_{result['baseline_letter']}": result["baseline_acc"]}
    print(f"{benchmark} {split}, {args.fewshot}-shot, run {run.info['name']}:")
    print(format_table(metrics))
    settings = {"benchmark": benchmark, "split": split, "fewshot": args.fewshot, "subjects": args.subjects,
                "max_questions": args.max_questions}
    output = args.output or default_output(args.out_dir, benchmark)
    write_results(output, benchmark, run, args.data, settings, {**metrics, "per_subject": result["subjects"]})
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
