"""Retrieval benchmark: character bigrams vs jieba words, on recall, build time, memory and query speed.

    python bench/bench_retrieval.py                       # 3 wiki files + the QA passages, both analyzers
    python bench/bench_retrieval.py --wiki_files all --analyzers bigram   # the whole shared wiki
    python bench/bench_retrieval.py --findable_in data/index  # answers present in a built wiki index

- The questions: CMRC2018 trial and DRCD dev (human-written, answers are spans of a wiki passage).
  Their passages are almost all missing from the shared zhwiki dump (the script counts how many gold
  titles it holds), so the index is the wiki files PLUS every QA passage (each SQuAD paragraph as an
  article with its title, id `qa:<set>:<article>:<paragraph>`), chunked like the wiki: the wiki
  passages are the distractors.
- Recall@k (retrieval.recall_at_k) three ways: `passage` = a top-k passage comes from the question's
  own paragraph; `answer` = a top-k passage contains a gold answer (lenient: short answers such as
  a year occur in unrelated passages); `either`.
- Findable: the share of questions whose gold answer occurs in some wiki passage at all (candidates
  from the bigram postings of the answer, then checked as a substring; QA passages excluded).
- Each build runs in its own process (`python retrieval.py`), so its time and peak RSS are its own;
  with --repeats > 1 the analyzers alternate and medians are reported.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import retrieval  # noqa: E402

QA_SETS = {"cmrc2018_trial": "cmrc2018_trial.json", "drcd_dev": "drcd_dev.zh-hans.json"}


def qa_sets(qa_dir):
    """{set: (passages as wiki-like articles, questions with their gold)}."""
    out = {}
    for name, filename in QA_SETS.items():
        data = json.loads((Path(qa_dir) / filename).read_text(encoding="utf-8"))["data"]
        articles, questions = [], []
        for a_index, article in enumerate(data):
            for p_index, paragraph in enumerate(article["paragraphs"]):
                pid = f"qa:{name}:{a_index}:{p_index}"
                # a title line first, as in the wiki dump, so clean_article treats both alike
                articles.append({"id": pid, "title": article["title"],
                                 "text": article["title"] + "\n\n" + paragraph["context"]})
                for qa in paragraph["qas"]:
                    answers = [a["text"] for a in qa["answers"] if a["text"].strip()]
                    if answers:
                        questions.append({"question": qa["question"], "answers": answers, "article_id": pid,
                                          "title": article["title"]})
        out[name] = (articles, questions)
    return out


def build(analyzer, inputs, out):
    cmd = [sys.executable, str(ROOT / "retrieval.py"), "--input", *map(str, inputs), "--out", str(out),
           "--analyzer", analyzer, "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(out) / "meta.json").read_text())


def answer_in_wiki(index, answer):
    """Does `answer` occur in some non-QA passage? Candidates share all its terms (postings), then a substring check."""
    terms = set(retrieval.analyze(answer, index.analyzer))
    ids = index.term_ids_of(list(terms))
    if not terms or len(ids) < len(terms):  # a term no passage has
        return False
    s = index.bm25.scores
    postings = sorted((np.asarray(s["indices"][s["indptr"][i]:s["indptr"][i + 1]]) for i in ids), key=len)
    rows = postings[0]
    for p in postings[1:]:
        rows = np.intersect1d(rows, p, assume_unique=True)
    for row in rows[:2000].tolist():
        p = index.passage(row)
        if not p["article_id"].startswith("qa:") and answer in p["text"]:
            return True
    return False


def evaluate(index, questions, ks=(1, 5)):
    t0 = time.perf_counter()
    hits = [index.search(q["question"], max(ks)) for q in questions]
    ms = 1000 * (time.perf_counter() - t0) / len(questions)
    golds = {"passage": [{"article_ids": [q["article_id"]]} for q in questions],
             "answer": [{"answers": q["answers"]} for q in questions],
             "either": [{"answers": q["answers"], "article_ids": [q["article_id"]]} for q in questions]}
    recall = {f"{how}@{k}": 100 * retrieval.recall_at_k(hits, g, k) for how, g in golds.items() for k in ks}
    return recall, ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wiki", default=str(ROOT.parent / "shared" / "data" / "zhwiki"))
    ap.add_argument("--qa", default=str(ROOT.parent / "shared" / "data" / "qa"))
    ap.add_argument("--wiki_files", default="3", help="how many wiki files (sorted) to index, or 'all'")
    ap.add_argument("--analyzers", nargs="+", default=list(retrieval.ANALYZERS), choices=retrieval.ANALYZERS)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", help="keep the built indexes in this folder")
    ap.add_argument("--findable_in", help="only count the answers that occur in this built (wiki-only) index")
    args = ap.parse_args()
    if args.findable_in:
        with retrieval.Index(args.findable_in) as index:
            for name, (_, questions) in qa_sets(args.qa).items():
                findable = sum(any(answer_in_wiki(index, a) for a in q["answers"]) for q in questions)
                print(f"{name}: {findable} of {len(questions)} questions ({100 * findable / len(questions):.1f}%) "
                      f"have a gold answer in some passage of {args.findable_in} ({len(index):,} passages)")
        return

    files = sorted(Path(args.wiki).glob("*.jsonl"))
    files = files if args.wiki_files == "all" else files[: int(args.wiki_files)]
    sets = qa_sets(args.qa)
    wiki_titles = set()
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                try:
                    wiki_titles.add(json.loads(line).get("title"))
                except (ValueError, AttributeError, RecursionError):
                    pass
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_retrieval_"))
    qa_dir = work / "qa_passages"
    qa_dir.mkdir(parents=True, exist_ok=True)
    with open(qa_dir / "qa.jsonl", "w", encoding="utf-8") as f:
        for articles, _ in sets.values():
            f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in articles)
    wiki_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"index: {len(files)} wiki files ({wiki_mb:.0f} MB) + {sum(len(a) for a, _ in sets.values())} QA paragraphs")

    metas = {a: [] for a in args.analyzers}
    for _ in range(args.repeats):
        for analyzer in args.analyzers:  # alternating, so machine noise hits both alike
            metas[analyzer].append(build(analyzer, files + [qa_dir], work / f"index_{analyzer}"))

    rows = []
    for analyzer in args.analyzers:
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            index = retrieval.Index(work / f"index_{analyzer}")
            index.search("长江", 1)  # the first search touches the memory-mapped arrays
            loads.append(time.perf_counter() - t0)
        meta = metas[analyzer][-1]
        row = {"analyzer": analyzer, "passages": meta["passages"], "vocab": meta["vocab"],
               "build_s": statistics.median(m["seconds"] for m in metas[analyzer]),
               "peak_rss_mb": statistics.median(m["peak_rss_mb"] for m in metas[analyzer]),
               "load_s": statistics.median(loads)}
        for name, (_, questions) in sets.items():
            recall, ms = evaluate(index, questions)
            row.update({f"{name} {k}": v for k, v in recall.items()})
            row[f"{name} ms/query"] = ms
        rows.append(row)
        if analyzer == "bigram":
            for name, (_, questions) in sets.items():
                findable = sum(any(answer_in_wiki(index, a) for a in q["answers"]) for q in questions)
                titled = sum(q["title"] in wiki_titles for q in questions)
                print(f"{name}: {len(questions)} questions; gold title in the wiki files: {titled}; "
                      f"gold answer occurs in some wiki passage: {findable} ({100 * findable / len(questions):.1f}%)")
        index.close()

    keys = list(rows[0])
    width = max(map(len, keys))
    print(f"\n{'':<{width}}  " + "  ".join(f"{r['analyzer']:>10}" for r in rows))
    for k in keys[1:]:
        print(f"{k:<{width}}  "
              + "  ".join(f"{r[k]:>10.1f}" if isinstance(r[k], float) else f"{r[k]:>10}" for r in rows))
    if len(rows) == 2:
        a, b = rows
        print(f"\nratios {b['analyzer']}/{a['analyzer']}: build time {b['build_s'] / a['build_s']:.2f}x, "
              f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, load {b['load_s'] / a['load_s']:.2f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
