"""The main job, one command: corpus -> tokenizer -> data -> pretrain -> QA pairs -> SFT -> index -> evaluations
-> report.

    python pipeline.py [--corpus DIR] [--base_url URL --model NAME] [--preset auto|cpu|gpu] [--context_mix 0.5]

Design:
- Each stage is the project's own command line (printed before it runs), so the pipeline is also
  the tutorial: every step can be re-run by hand with the same flags.
- A stage is skipped when its completion marker exists (`out/pipeline/<stage>.done`, written only
  after the stage's command succeeded), so an interrupted pipeline resumes where it stopped; an
  interrupted training stage resumes from its `last.pt` (`init_from=resume`).
- The held-out protocol (README, "Does fine-tuning teach the model what it read?"): QA pairs are
  generated from articles of the pretraining *train* split only; prepare_sft.py splits them by
  article with the same hash (`split_of`) and a larger fraction (5% vs 1%), so its validation
  pairs ask about articles the model read in pretraining but never saw questions about. Both
  checkpoints are scored on those pairs.
- Reading: the SFT set mixes closed-book pairs with pairs shown their passage
  (`prepare_sft.py --with_context --context_mix F`, F = `--context_mix`), so one model learns to
  remember and to read; the human-written reading sets beside the corpus (`--human_qa`:
  CMRC2018 trial and DRCD dev, always with their passage) teach reading on questions people
  ask. A BM25 index (retrieval.py) is built over the corpus plus the DRCD test paragraphs
  (`squad_passages`: almost none of DRCD's articles are in the wiki dump, so a wiki-only index
  could not find their passages; DRCD test is never trained on). Both checkpoints answer the
  held-out generated questions that carry their passage (`with_passage`: the context_mix coin's
  share of the generated pairs in data/sft/val.jsonl, the same questions asked all three ways)
  and a DRCD test sample three ways (`reading_evals`): closed-book (`qa`, `drcd`), with the gold
  passage (`*_context`, cut to the window around the sentences that match the question) and with
  retrieved passages (`*_rag`, which also scores recall@1/@5). The report's "Reading" table puts
  them side by side.
- Reading data without shortcuts (issue 23): the offline generator asks short-answer questions
  (who, when, where, how many, what, aliases; cloze style) about sentences anywhere in an article,
  and shows each pair the fixed chunk of its article that holds the answer, so the answer's place
  in the passage is spread (sft_generate.py prints the histogram by tenths). Held-out pairs keep
  their whole passage, which qa_eval.py fits around the question, never the answer
  (`retrieval.fit_passage`, the one windowing function). The `shortcuts` stage prints the no-model
  rules (evaluations/baselines.py) on the held-out generated pairs, and every qa_eval.py result
  carries the rules' scores on its own questions, which the report's Reading table shows as rows.
- Corpus order: --corpus; data/wiki/ when it holds jsonl; ../shared/data/zhwiki; else download a
  public subset with data/download_wiki.py.
- Presets: with no GPU the CPU configs (about 11 minutes of pretraining on 2 cores, with an 8k-token
  tokenizer: the output layer is most of a small model's compute); with a GPU the full configs and
  the default 32k tokenizer.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_utils import BadLines, article_key, find_jsonl, iter_jsonl, read_json_file, split_of, squad_questions

ROOT = Path(__file__).resolve().parent
PY = sys.executable
SHARED_QA = ROOT.parent / "shared" / "data" / "qa"  # CMRC2018 trial, DRCD dev (SFT) and DRCD test (held out)


def find_corpus(arg):
    if arg:
        return Path(arg)
    for candidate in (ROOT / "data" / "wiki", ROOT.parent / "shared" / "data" / "zhwiki"):
        if candidate.is_dir() and find_jsonl(candidate):
            return candidate
    print("no local corpus found: downloading a public Chinese Wikipedia subset into data/wiki/")
    run("download", [PY, "data/download_wiki.py", "--out", "data/wiki"], marker=False)
    return ROOT / "data" / "wiki"


def run(stage, cmd, marker=True, state_dir=ROOT / "out" / "pipeline"):
    """Run one stage's command unless its marker says it already finished; stop the pipeline on failure."""
    done = state_dir / f"{stage}.done"
    if marker and done.exists():
        print(f"[{stage}] done earlier, skipping ({done})")
        return
    print(f"\n[{stage}] $ {' '.join(map(str, cmd))}", flush=True)
    t0 = time.time()
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"[{stage}] failed with exit code {result.returncode}; fix the problem and re-run "
                 "pipeline.py: finished stages are skipped")
    print(f"[{stage}] finished in {time.time() - t0:.0f}s")
    if marker:
        state_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"cmd": list(map(str, cmd)), "seconds": round(time.time() - t0)}) + "\n")


def train_cmd(config, out_dir, overrides):
    """Resume an interrupted training stage from its last.pt instead of starting over."""
    resume = ["--init_from=resume"] if (ROOT / out_dir / "last.pt").exists() else []
    return [PY, "train.py", config, f"--out_dir={out_dir}", *overrides, *resume]


def pretrain_articles(corpus, val_fraction, out_path):
    """Articles of the pretraining train split (the QA generator reads only these)."""
    if out_path.exists():
        return out_path
    tmp = out_path.with_suffix(".tmp")
    kept = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in find_jsonl(corpus):
            for _, obj in iter_jsonl(path):
                if split_of(article_key(obj), val_fraction) == "train":
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    kept += 1
    tmp.replace(out_path)
    print(f"{kept} pretraining-train articles -> {out_path}")
    return out_path


def squad_passages(path, out_path):
    """The distinct paragraphs of SQuAD-style JSON (DRCD test) as wiki-like jsonl articles, one per
    paragraph ({id, title, text}; the text starts with a title line, as a wiki article does), for
    retrieval.py to index beside the corpus. Returns the number written; malformed parts are skipped
    and reported."""
    bad, seen = BadLines(), {}
    data = read_json_file(path)
    for q in squad_questions(path, data, bad):
        if q["context"] and q["context"] not in seen:
            seen[q["context"]] = q["article"]
    bad.report()
    tmp = Path(out_path).with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (context, title) in enumerate(seen.items()):
            article = {"id": f"{Path(path).stem}:{i}", "title": title, "text": f"{title}\n\n{context}"}
            f.write(json.dumps(article, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    return len(seen)


def with_passage(src, out_path):
    """The generated QA pairs of val.jsonl `src` that carry a passage (`context`), into `out_path`;
    returns how many. prepare_sft.py --context_mix shows the passage to a share of the pairs only, and
    the three ways of asking must be scored on the same questions; the human-written pairs
    (`source` squad) are not the generated questions this set measures."""
    kept = 0
    tmp = Path(out_path).with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _, obj in iter_jsonl(src, required=("question",)):
            generated = obj.get("source", "qa") == "qa"
            if generated and isinstance(obj.get("context"), str) and obj["context"].strip():
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                kept += 1
    tmp.replace(out_path)
    return kept


def reading_evals(run_dir, question_sets, index, rag_k=3):
    """(stage, command) of the closed-book, with-passage and RAG evaluations of one run, the last two
    also extractive (answers held to runs of the passages). question_sets: {name: (QA file, max
    questions, max new tokens)}; results go to RUN/eval_<name>[_context|_rag][_span].json."""
    stages = []
    rag = ["--rag", index, "--rag_k", rag_k]
    for name, (path, n, max_new_tokens) in question_sets.items():
        common = ["--out_dir", run_dir, "--input", path, "--max_examples", n, "--max_new_tokens", max_new_tokens]
        for suffix, extra in (("", []), ("_context", ["--with_context"]), ("_rag", rag),
                              ("_context_span", ["--with_context", "--extractive"]),
                              ("_rag_span", [*rag, "--extractive"])):
            stages.append((f"eval_{name}{suffix}_{Path(run_dir).name}",
                           [PY, "evaluations/qa_eval.py", *common, *extra, "--name", name + suffix]))
    return stages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus",
                    help="folder of wiki jsonl (default: data/wiki, then ../shared/data/zhwiki, then download)")
    ap.add_argument("--preset", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--base_url",
                    help="OpenAI-compatible LLM server for QA generation (default: the offline extractive backend)")
    ap.add_argument("--model", default="local-model", help="model name on --base_url")
    ap.add_argument("--api_key", default=None)
    ap.add_argument("--qa_articles", type=int, default=40000, help="articles sent to QA generation")
    ap.add_argument("--eval_questions", type=int, default=300, help="held-out questions scored per model")
    ap.add_argument("--drcd_questions", type=int, default=300, help="DRCD test questions scored per model (0: none)")
    ap.add_argument("--context_mix", type=float, default=0.5,
                    help="share of SFT pairs shown with their passage (prepare_sft.py --context_mix)")
    ap.add_argument("--rag_k", type=int, default=3, help="passages retrieved per question in the RAG evaluations")
    ap.add_argument("--human_qa", default=str(SHARED_QA) if SHARED_QA.is_dir() else "none",
                    help="SQuAD-style QA (file or folder) added to SFT with their passages: human-written "
                         "reading (default ../shared/data/qa when present; DRCD test there is never trained on; "
                         "none: leave out)")
    args = ap.parse_args(argv)

    gpu = args.preset == "gpu" or (args.preset == "auto" and torch.cuda.is_available())
    corpus = find_corpus(args.corpus)
    block = 512 if gpu else 256
    pre_cfg, sft_cfg = ("config/train_config.py", "config/train_config_sft.py") if gpu else \
        ("config/train_config_cpu.py", "config/train_config_sft_cpu.py")
    print(f"corpus: {corpus}\npreset: {'gpu' if gpu else 'cpu'} (block_size {block})")

    # on a CPU the output layer dominates the compute: an 8k vocabulary trains ~2.5x faster than 32k
    vocab = [] if gpu else ["--vocab_size", 8192, "--max_chars", 8_000_000]
    run("tokenizer", [PY, "tokenizer.py", "--input", corpus, "--out", "data/tokenizer", *vocab])
    run("prepare", [PY, "data/prepare.py", "--input", corpus, "--out", "data/processed", "--block_size", block,
                    "--tokenizer", "data/tokenizer", "--pack"])
    run("pretrain", train_cmd(pre_cfg, "out/pretrain", ["--data_dir=data/processed"]))

    val_fraction = json.loads((ROOT / "data/processed/meta.json").read_text())["val_fraction"]
    articles = pretrain_articles(corpus, val_fraction, ROOT / "data" / "pretrain_train_articles.jsonl")
    qa = ["--input", articles, "--output", "data/qa_generated.jsonl", "--limit", args.qa_articles]
    if args.base_url:
        qa += ["--backend", "llm", "--base_url", args.base_url, "--model", args.model]
        qa += ["--api_key", args.api_key] if args.api_key else []
    else:
        qa += ["--backend", "extractive"]
    run("qa_generation", [PY, "sft/sft_generate.py", *qa])
    human = [] if args.human_qa == "none" else [args.human_qa]
    run("prepare_sft", [PY, "data/prepare_sft.py", "--input", "data/qa_generated.jsonl", *human, "--out", "data/sft",
                        "--block_size", block, "--tokenizer", "data/tokenizer", "--pretrain_data", "data/processed",
                        "--with_context", "--context_mix", args.context_mix])
    run("sft", train_cmd(sft_cfg, "out/sft", ["--data_dir=data/sft", "--init_from=out/pretrain"]))

    # the index: the corpus, plus DRCD test's paragraphs so that its questions can find them
    held_out = ROOT / "data" / "held_out_with_passage.jsonl"
    kept = with_passage(ROOT / "data" / "sft" / "val.jsonl", held_out)
    print(f"{kept} held-out pairs carry their passage -> {held_out}")
    # the shortcuts a reader must beat, on the held-out generated pairs as qa_eval shows them (the
    # whole passage fitted around the question): answering with the passage's first sentence, with
    # the sentence that best matches the question, or with the question itself
    run("shortcuts", [PY, "evaluations/baselines.py", "--input", held_out, "--max_examples", args.eval_questions,
                      "--tokenizer", "data/tokenizer", "--budget", block - 64,
                      "--output", "out/pipeline/shortcuts_qa.json"], marker=False)
    question_sets = {"qa": (held_out, args.eval_questions, 64)}
    index_inputs = [corpus]
    drcd = SHARED_QA / "drcd_test.zh-hans.json"
    if args.drcd_questions > 0 and drcd.is_file():
        passages = ROOT / "data" / "drcd_test_passages.jsonl"
        if not passages.exists():
            print(f"{squad_passages(drcd, passages)} DRCD test paragraphs -> {passages}")
        index_inputs.append(passages)
        # DRCD's answers are short spans (95% within 14 characters, the longest 46 in the sample):
        # 32 new tokens hold them and halve the time of the answers that never stop
        question_sets["drcd"] = (drcd, args.drcd_questions, 32)
    elif args.drcd_questions > 0:
        print(f"no {drcd}: the DRCD evaluations are skipped")
    run("index", [PY, "retrieval.py", "--input", *index_inputs, "--out", "data/index", "--quiet"])

    for run_dir in ("out/pretrain", "out/sft"):
        name = Path(run_dir).name
        run(f"eval_ppl_{name}", [PY, "evaluations/perplexity.py", "--out_dir", run_dir, "--data", "data/processed",
                                 "--max_blocks", "400"])
        for stage, cmd in reading_evals(run_dir, question_sets, "data/index", args.rag_k):
            run(stage, cmd)
    run("report", [PY, "evaluations/report.py", "out/pretrain", "out/sft", "--out", "report"], marker=False)

    print(f"\nreport: {ROOT / 'report' / 'report.md'}")
    print("try the model:   python sample.py --out_dir=out/sft --mode=qa --start=\"长江是什么？\"")
    print("let it read:     python sample.py --out_dir=out/sft --mode=rag --rag data/index "
          "--start=\"长江全长多少公里？\"")
    print("serve it:        python server.py --out_dir out/sft   (add --host 0.0.0.0 --api_key KEY for your LAN)")
    print("compare models:  python sample_gradio.py --models out/pretrain out/sft")


if __name__ == "__main__":
    main()
