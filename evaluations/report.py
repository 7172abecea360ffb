"""A markdown report comparing runs on every evaluation they have, with bar charts and loss curves.

    python evaluations/report.py out/pretrain out/sft [--out report/]

- Reads each run directory's `eval_*.json` (written by perplexity.py, rouge_l.py, qa_eval.py) and
  `log.jsonl`; nothing is recomputed, so the report is quick and shows exactly what was measured.
- One row per run, one column per metric found (`<eval>.<metric>`; counts such as `n` stay out);
  a run without an evaluation shows "–". Results measured on different inputs or settings are not
  comparable, so each evaluation lists its input and settings per run and flags a mismatch.
- One bar chart per evaluation (a panel per metric, a bar per run, its value written on it) and the
  loss curves of the runs that have a log.jsonl, drawn by `visualize.plot_runs` (smoothed training
  loss, validation loss), the same figure `python visualize.py` makes.
- "Reading" table (`reading_rows`): for each question set evaluated several ways by qa_eval.py,
  `<set>` closed-book, `<set>_context` with the gold passage, `<set>_rag` with retrieved passages
  and `_span` of the last two with extractive decoding (the pipeline's `qa` = held-out generated
  questions and `drcd` = DRCD test), one row per run and set: EM/F1 of each way, retrieval
  recall@1/@5 and the index the RAG numbers used; under each set, the no-model rules' rows
  (`baseline_rows`, from the `baselines` qa_eval.py wrote beside the model's numbers).
- Bar charts use the Agg backend (no display needed) and ASCII labels only: a CJK run name would
  need a CJK font, so such a run is labelled by its position ("run 2") and the table gives its name.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if not __package__:  # run as a script (python evaluations/report.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import atomic_write  # noqa: E402
from visualize import plot_runs  # noqa: E402

COUNTS = {"n", "tokens", "chars", "blocks"}
LOWER_IS_BETTER = {"loss", "ppl", "bpc"}


def load_run_dir(run_dir, index):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    results = {}
    for path in sorted(run_dir.glob("eval_*.json")):
        try:
            results[path.stem[len("eval_"):]] = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"skipped {path}: not a result file ({e})")
    name = run_dir.resolve().name
    info = next((r["run"] for r in results.values() if "run" in r), {})
    return {"name": name, "dir": str(run_dir), "label": name if name.isascii() else f"run {index}",
            "info": info, "results": results, "has_log": (run_dir / "log.jsonl").exists()}


def metric_columns(runs):
    """{evaluation: [metric, ...]} in order of first appearance, over every run."""
    columns = {}
    for run in runs:
        for evaluation, result in run["results"].items():
            for metric, number in result.get("metrics", {}).items():
                wanted = metric not in COUNTS and isinstance(number, (int, float))
                if wanted and metric not in columns.setdefault(evaluation, []):
                    columns[evaluation].append(metric)
    return {e: ms for e, ms in columns.items() if ms}


def value(run, evaluation, metric):
    v = run["results"].get(evaluation, {}).get("metrics", {}).get(metric)
    return v if isinstance(v, (int, float)) else None


def save_figure(fig, path):
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_evaluation(runs, evaluation, metrics, path):
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics) + 1, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        labels = [r["label"] for r in runs]
        values = [value(r, evaluation, metric) for r in runs]
        bars = ax.bar(range(len(runs)), [v or 0.0 for v in values], color=[f"C{i % 10}" for i in range(len(runs))])
        ax.bar_label(bars, [_cell(v) for v in values], fontsize=7)
        ax.set_ylim(0, 1.15 * max(v or 0.0 for v in values) or 1.0)  # room for the labels; all-zero stays readable
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
    fig.suptitle(evaluation)
    fig.tight_layout()
    save_figure(fig, path)


def _cell(v):
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"


READING_WAYS = (("", "closed-book"), ("_context", "with passage"), ("_rag", "RAG"),
                ("_context_span", "passage, extractive"), ("_rag_span", "RAG, extractive"))
WAY_SUFFIXES = tuple(way for way, _ in READING_WAYS if way)


def reading_rows(runs, columns):
    """Rows of the Reading table: (run, set, [EM, F1] per way, recall@1, recall@5, index), for every
    question set `S` that has `S_context` or `S_rag` results."""
    sets = [e for e in columns if not e.endswith(WAY_SUFFIXES) and any(e + way in columns for way in WAY_SUFFIXES)]
    rows = []
    for name in sets:
        for r in runs:
            if not any(name + way in r["results"] for way, _ in READING_WAYS):
                continue
            rag = r["results"].get(f"{name}_rag", {})
            index = (rag.get("settings") or {}).get("index_inputs")
            cells = [_cell(value(r, name + way, m)) for way, _ in READING_WAYS for m in ("em", "f1")]
            rows.append([r["name"], name, *cells, _cell(value(r, f"{name}_rag", "recall_at_1")),
                         _cell(value(r, f"{name}_rag", "recall_at_5")),
                         ", ".join(f"`{Path(p).name}`" for p in index) if index else "–"])
        rows += baseline_rows(runs, name)
    return rows


def baseline_rows(runs, name):
    """Rows `rule: R` of the Reading table for set `name`: the no-model rules (evaluations/baselines.py)
    as qa_eval.py scored them beside the model on the same questions and passages, taken from the
    first run that has them for each way ("–" where a rule does not apply, e.g. passages closed-book)."""
    rules = {}
    for way, _ in READING_WAYS:
        found = next((r["results"][name + way]["baselines"] for r in runs
                      if isinstance(r["results"].get(name + way, {}).get("baselines"), dict)), {})
        for rule, scores in found.items():
            rules.setdefault(rule, {})[way] = scores
    rows = []
    for rule, by_way in rules.items():
        cells = [_cell((by_way.get(way) or {}).get(m)) for way, _ in READING_WAYS for m in ("em", "f1")]
        rows.append([f"rule: {rule}", name, *cells, "–", "–", "–"])
    return rows


def markdown(runs, columns, images):
    lines = ["# MiniGPT-zh evaluation report", "", "## Runs", "",
             "| run | directory | kind | iter | params |", "|---|---|---|---|---|"]
    for r in runs:
        info = r["info"]
        lines.append(f"| {r['name']} | `{r['dir']}` | {info.get('kind', '–')} | {_cell(info.get('iter'))} | "
                     f"{_cell(info.get('params'))} |")
    header = [f"{e}.{m}" for e, ms in columns.items() for m in ms]
    lines += ["", "## Metrics", "",
              "Percentages for QA and ROUGE metrics (higher is better); loss, ppl and bpc lower is better.", "",
              "| run | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for r in runs:
        cells = (_cell(value(r, e, m)) for e, ms in columns.items() for m in ms)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    reading = reading_rows(runs, columns)
    if reading:
        ways = [w for _, w in READING_WAYS]
        lines += ["", "## Reading: closed-book, with the passage, with retrieved passages (RAG)", "",
                  ("EM / F1 in percent; recall@k: percent of questions with a gold answer inside one of the "
                   "top-k retrieved passages; index: what the RAG passages were retrieved from. Rows `rule: …` "
                   "are no-model answerers on the same questions and passages (evaluations/baselines.py): "
                   "the passage's first sentence, the sentence sharing most characters and bigrams with the "
                   "question, the question itself; a model that reads must beat them."), "",
                  "| run | questions | " + " | ".join(f"{w} {m}" for w in ways for m in ("EM", "F1"))
                  + " | recall@1 | recall@5 | index |", "|---|---|" + "---|" * (2 * len(ways) + 3)]
        lines += ["| " + " | ".join(row) + " |" for row in reading]
    for evaluation in columns:
        lines += ["", f"### {evaluation}", ""]
        measured = [(r["name"], r["results"][evaluation]) for r in runs if evaluation in r["results"]]
        setups = {json.dumps([res.get("input"), res.get("settings")], sort_keys=True) for _, res in measured}
        if len(setups) > 1:
            lines += ["**Warning: the runs were evaluated on different inputs or settings; not comparable.**", ""]
        for name, res in measured:
            settings = json.dumps(res.get("settings"), ensure_ascii=False)
            lines.append(f"- {name}: input `{res.get('input')}`, settings `{settings}`")
        lines += ["", f"![{evaluation}]({images[evaluation]})"]
    if "losses" in images:
        lines += ["", "## Loss curves", "", f"![loss curves]({images['losses']})"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare runs on their eval_*.json results and loss curves.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="report", help="folder for report.md and the PNG figures")
    args = p.parse_args(argv)

    runs = [load_run_dir(d, i) for i, d in enumerate(args.runs, 1)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = metric_columns(runs)
    images = {}
    for evaluation, metrics in columns.items():
        images[evaluation] = f"{evaluation}.png"
        plot_evaluation(runs, evaluation, metrics, out / images[evaluation])
    logged = [r["dir"] for r in runs if r["has_log"]]
    if logged:
        images["losses"] = "losses.png"
        plot_runs(logged, out / images["losses"])
    with atomic_write(out / "report.md", "w") as f:
        f.write(markdown(runs, columns, images))
    print(f"wrote {out / 'report.md'} ({len(runs)} runs, {sum(map(len, columns.values()))} metrics, "
          f"{len(images)} figures)")


if __name__ == "__main__":
    main()
