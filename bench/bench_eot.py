"""EOT only at true article ends vs EOT after every row piece: what it does to a short pretraining run.

    python data/prepare.py --input ../shared/data/zhwiki/zhwiki-00.jsonl --out /tmp/eot/new \
        --block_size 256 --pack --tokenizer TOK --val_fraction 0.02
    python bench/bench_eot.py --data /tmp/eot/new --input ../shared/data/zhwiki/zhwiki-00.jsonl \
        --work /tmp/eot --max_iters 150 --seeds 2 [--train_args "--n_layer=2 --batch_size=8"]

- `old` data is the new data with the PAD that closes each row cut inside an article turned back
  into EOT, which is exactly what the old prepare.py wrote (the row layout is otherwise identical:
  the piece after a cut one never fits in its row). `--check_old DIR` compares with a real old run.
- Both variants train the CPU preset (config/train_config_cpu.py) for `--max_iters`, alternating
  old/new per seed, then are scored the same way: bits per character on the *new* val.bin (true
  document ends only, so both are judged on the same targets), and the fraction of text-mode
  continuations of `--n_prompts` val-article openings (bodies of at least 400 characters, the
  first 60 as prompt) that emit EOT within 64 new tokens (sampled, temperature 1, fixed seed).
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BlockData, article_key, clean_article, evaluate_blocks, iter_jsonl, load_meta, split_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_old(new_dir, old_dir):
    """Copy of the prepared folder with the old rule: every row piece cut inside an article ends in EOT."""
    meta = load_meta(new_dir)
    old_dir.mkdir(parents=True, exist_ok=True)
    pad, eot = meta["special"]["pad"], meta["special"]["eot"]
    for split in ("train", "val"):
        rows = np.fromfile(new_dir / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, meta["block_size"]).copy()
        content = (rows != pad).sum(1)  # PAD only closes a row, so content is a prefix
        last = rows[np.arange(len(rows)), np.maximum(content - 1, 0)]
        cut = (last != eot) & (content < rows.shape[1])
        rows[np.flatnonzero(cut), content[cut]] = eot
        rows.tofile(old_dir / f"{split}.bin")
    shutil.copy(new_dir / "meta.json", old_dir / "meta.json")


def eot_count(folder):
    meta = load_meta(folder)
    return {s: int((np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]) == meta["special"]["eot"]).sum())
            for s in ("train", "val")}


def prompts(input_path, val_fraction, n):
    out = []
    for _, obj in iter_jsonl(input_path):
        body = clean_article(obj["text"])
        if len(body) >= 400 and split_of(article_key(obj), val_fraction) == "val":
            out.append(body[:60])
        if len(out) == n:
            break
    return out


def early_stops(run, texts, max_new_tokens=64, seed=0):
    from engine import generate

    ids = [run.tok.encode(t) for t in texts]
    stopped = [False] * len(ids)
    for step in generate(run.model, ids, max_new_tokens, temperature=1.0, stop_ids={run.tok.eot}, seed=seed):
        for i, t in enumerate(step):
            stopped[i] |= t == run.tok.eot
    return sum(stopped) / len(stopped)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a folder prepared by the new data/prepare.py")
    ap.add_argument("--input", required=True, help="the jsonl it was prepared from (for val prompts)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--check_old", help="a folder prepared by the old data/prepare.py, to compare with")
    ap.add_argument("--max_iters", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n_prompts", type=int, default=50)
    ap.add_argument("--train_args", default="", help="more train.py overrides, e.g. a smaller model")
    args = ap.parse_args()
    from checkpoint import load_run

    work, new = Path(args.work), Path(args.data)
    make_old(new, work / "old_rule")
    data = {"old": work / "old_rule", "new": new}
    meta = load_meta(new)
    c = meta["counts"]
    print(f"articles kept: {c['articles_train']} train / {c['articles_val']} val")
    for name, folder in data.items():
        print(f"{name}: EOT {eot_count(folder)}")
    if args.check_old:
        same = all(np.array_equal(np.fromfile(Path(args.check_old) / f"{s}.bin", dtype=meta["dtype"]),
                                  np.fromfile(data["old"] / f"{s}.bin", dtype=meta["dtype"])) for s in ("train", "val"))
        print(f"old rule reproduced byte for byte from the new data: {same}")
    texts = prompts(args.input, meta["val_fraction"], args.n_prompts)
    val = BlockData(new, "val")
    results = {"old": [], "new": []}
    for seed in range(args.seeds):
        for name in ("old", "new"):  # alternating, so machine noise hits both alike
            out = work / f"run_{name}_{seed}"
            subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "config/train_config_cpu.py"),
                            f"--data_dir={data[name]}", f"--out_dir={out}", f"--max_iters={args.max_iters}",
                            f"--eval_interval={args.max_iters}", f"--seed={1337 + seed}", *args.train_args.split()],
                           check=True, stdout=subprocess.DEVNULL)
            run = load_run(out, "last")
            bpc = evaluate_blocks(run.model, val, range(val.n_blocks), run.tok, 16, "cpu")["bpc"]
            stops = early_stops(run, texts, seed=seed)
            results[name].append({"bpc": bpc, "early_stop": stops})
            print(f"{name} seed {seed}: val bpc {bpc:.4f}, EOT within 64 tokens on {stops:.0%} of {len(texts)} prompts",
                  flush=True)
    for name, rows in results.items():
        print(f"{name}: median val bpc {statistics.median(r['bpc'] for r in rows):.4f}, "
              f"median early-stop {statistics.median(r['early_stop'] for r in rows):.0%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
