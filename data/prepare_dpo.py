"""Build preference pairs for DPO and write them as paired SFT blocks.

    python data/prepare_dpo.py --input ../shared/data/qa/cmrc2018_trial.json --out data/dpo \
        --sft_run out/sft
    python data/prepare_dpo.py --input sft/sft_saves.jsonl --negatives other --tokenizer data/tokenizer

Input: SQuAD-style JSON (CMRC2018 / DRCD dev; DRCD test is held out and refused) or QA jsonl
(`{"question", "answer", "id"}`, as sft/sft_generate.py writes it), both read by `data_utils.load_qa`,
or ready preference jsonl (`{"prompt", "chosen", "rejected"}`, used as is). Output in `--out`: `pairs.jsonl` (every
pair kept, with where its negative came from), `train.bin` / `val.bin` and `meta.json` (kind "dpo").

Design choices:
- chosen = the gold answer. rejected (`--negatives`): `model` = the SFT model's own answer
  (greedy, qa mode, through the evaluations' `complete_all`) when it is wrong, i.e. its F1
  against the gold answers (`evaluations.metrics.f1`, CMRC2018's character-level F1) is below
  `--max_f1` (questions it already answers right are skipped); `other` = the
  answer of a question about another article (a fluent, on-format but wrong answer, as related
  work used for KTO negatives); `both` (default) = the model's answer when wrong, else another
  article's. Pairs are closed-book, question -> answer, as in the default SFT data; with
  `--with_context` the prompt is `tokenizer.passage_qa_prompt` (the passage, a newline, the
  question: the one layout of prepare_sft.py and qa_eval.py under the same flag).
- Split by article, not by pair: `data_utils.split_of` of the article key, the same key and hash as
  prepare_sft.py, so with the same `--val_fraction` (0.05 both) a question in the SFT `val.jsonl`
  is a DPO validation pair, and no passage or article has pairs in both splits.
- Row 2i = prompt + chosen, row 2i+1 = prompt + rejected, each `tok.encode_qa(prompt, a)` padded
  with PAD to `block_size`, so `loss_mask(kind="sft")` marks exactly the two responses and a pair
  never straddles train and val. A pair whose longer row does not fit is dropped and counted.
- The tokenizer is the SFT run's (the policy and reference must read the same ids); a
  `--tokenizer` that differs from it is refused rather than silently producing unusable data.
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

if not __package__:  # run as a script (python data/prepare_dpo.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import (  # noqa: E402
    BadLines,
    atomic_write,
    count_chars,
    held_out_of_training,
    iter_jsonl,
    load_qa,
    remove_stale_temporaries,
    split_of,
    token_dtype,
    write_json,
)
from evaluations.metrics import complete_all, f1  # noqa: E402
from tokenizer import load_tokenizer, passage_qa_prompt  # noqa: E402

OUTPUTS = ("train.bin", "val.bin", "pairs.jsonl", "meta.json")


def read_examples(paths, bad, with_context=False):
    """QA examples (`data_utils.load_qa`: id, article, question, answers, context) with their prompt
    and the group of questions they share a passage (else an article) with, and ready preference rows.
    Held-out evaluation files (`data_utils.TRAINING_HELD_OUT`, DRCD test) are refused."""
    qa, preference = [], []
    for path in map(Path, paths):
        if held_out_of_training(path):
            raise ValueError(f"{path} is held out of training (an evaluation set): DPO may not train on it")
        first = next(iter_jsonl(path, BadLines(), required=()), (0, {}))[1] if path.suffix == ".jsonl" else {}
        if "chosen" not in first:
            for q in load_qa(path, bad):
                if with_context and not q["context"]:
                    bad.add(f"{path}:{q['id']}", "no context for --with_context")
                    continue
                q["prompt"] = passage_qa_prompt(q["context"], q["question"]) if with_context else q["question"]
                q["group"] = q["context"] or q["article"]
                qa.append(q)
            continue
        for _, obj in iter_jsonl(path, bad, required=("prompt", "chosen", "rejected")):
            preference.append({k: obj[k] for k in ("prompt", "chosen", "rejected")} | {"negative": "given"})
    return qa, preference


def split_key(pair):
    """What a pair is split by: its article, the same key and hash as prepare_sft.py (so a question
    held out of SFT is held out here too, and no passage is in both splits); a ready preference row
    by its prompt."""
    return pair.get("article") or pair["prompt"]


def other_answer(example, qa, max_f1, rng, tries=20):
    """The answer of a question about another article that does not happen to be right."""
    for _ in range(tries):
        other = qa[rng.randrange(len(qa))]
        if other["group"] != example["group"] and f1(other["answers"][0], example["answers"]) < max_f1:
            return other["answers"][0]
    return None


def build_pairs(qa, negatives, model_said, max_f1, seed, counts):
    rng = random.Random(seed)
    pairs = []
    for i, ex in enumerate(qa):
        pair = {"prompt": ex["prompt"], "chosen": ex["answers"][0], "id": ex["id"], "article": ex["article"],
                "group": ex["group"]}
        score = f1(model_said[i], ex["answers"]) if model_said else None
        if score is not None:
            pair["sft_answer"], pair["sft_f1"] = model_said[i], round(score, 4)
        if score is not None and score < max_f1:  # an empty answer is a wrong answer too
            pair |= {"rejected": model_said[i], "negative": "model"}
        elif negatives == "model":
            counts["dropped"]["model_right"] += 1
            continue
        else:
            rejected = other_answer(ex, qa, max_f1, rng)
            if rejected is None:
                counts["dropped"]["no_other_answer"] += 1
                continue
            pair |= {"rejected": rejected, "negative": "other"}
        pairs.append(pair)
    return pairs


def pair_blocks(pairs, tok, block_size, counts):
    """(kept pairs, rows) with rows 2i / 2i+1 = chosen / rejected, padded to block_size."""
    kept, rows = [], []
    for pair in pairs:
        chosen, rejected = (tok.encode_qa(pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        if chosen == rejected:
            counts["dropped"]["identical"] += 1
        elif max(len(chosen), len(rejected)) > block_size:
            counts["dropped"]["too_long"] += 1
        else:
            kept.append(pair)
            rows += [r + [tok.pad] * (block_size - len(r)) for r in (chosen, rejected)]
    return kept, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build DPO preference pairs and write them as paired SFT blocks.")
    ap.add_argument("--input", nargs="+", required=True, help="SQuAD JSON, QA jsonl or preference jsonl files")
    ap.add_argument("--out", default="data/dpo")
    ap.add_argument("--sft_run", help="the SFT run directory (its tokenizer; its answers as negatives)")
    ap.add_argument("--negatives", choices=("model", "other", "both"), default="both")
    ap.add_argument("--tokenizer", help="only with --negatives other and no --sft_run; must match the SFT run's")
    ap.add_argument("--block_size", type=int, help="default: the SFT run's block_size")
    ap.add_argument("--with_context", action="store_true",
                    help="prompt = passage + newline + question, as prepare_sft.py / qa_eval.py --with_context")
    ap.add_argument("--max_f1", type=float, default=0.5, help="a model answer below this F1 counts as wrong")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--gen_batch_size", type=int, default=32)
    ap.add_argument("--limit", type=int, help="use only the first N QA examples")
    ap.add_argument("--val_fraction", type=float, default=0.05,
                    help="share of articles held out; keep it equal to prepare_sft.py's (0.05) so SFT val stays val")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)

    run = None
    if args.sft_run:
        from inference import load_run, pick_device
        run = load_run(args.sft_run, device=pick_device(args.device))
    elif args.negatives != "other" or not args.tokenizer:
        ap.error("--sft_run is needed (for model negatives, and for its tokenizer)")
    tok = run.tok if run else load_tokenizer(args.tokenizer)
    if run and args.tokenizer and load_tokenizer(args.tokenizer).identity != tok.identity:
        ap.error(f"--tokenizer {args.tokenizer} is not the tokenizer of the SFT run {args.sft_run}")
    block_size = args.block_size or (run.info["block_size"] if run else None)
    if not block_size:
        ap.error("--block_size is needed without --sft_run")

    bad = BadLines()
    try:
        qa, preference = read_examples(args.input, bad, args.with_context)
    except ValueError as e:
        ap.error(str(e))
    qa = qa[: args.limit] if args.limit else qa
    counts = {"pairs_read": len(qa) + len(preference), "articles_read": len({q["article"] for q in qa}),
              "dropped": Counter()}
    model_said = None
    if args.negatives != "other" and qa:
        model_said = complete_all(run, [q["prompt"] for q in qa], "qa", args.gen_batch_size, args.max_new_tokens)
        scores = [f1(said, q["answers"]) for said, q in zip(model_said, qa)]
        counts["sft_f1"] = round(100 * sum(scores) / len(scores), 2)  # the SFT model's F1 before DPO, in percent
    pairs = preference + build_pairs(qa, args.negatives, model_said, args.max_f1, args.seed, counts)
    pairs, rows = pair_blocks(pairs, tok, block_size, counts)
    if len(pairs) < 2:
        sys.exit(f"only {len(pairs)} usable pairs (dropped: {dict(counts['dropped'])}); need at least 2")

    split = {"train": [], "val": []}
    for i, pair in enumerate(pairs):
        split[split_of(split_key(pair), args.val_fraction)].append(i)
    if not split["train"]:
        sys.exit(f"all {len(pairs)} pairs fell in the validation split (lower --val_fraction)")
    if not split["val"]:
        print(f"warning: no validation pair among {len(pairs)} (raise --val_fraction for a set this small)")
    n_val = len(split["val"])
    dtype = token_dtype(tok.n_vocab)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out, OUTPUTS):
        print(f"removed {stale}, left by a run that was killed")
    for name, idx in split.items():
        block_rows = [rows[2 * i + k] for i in idx for k in (0, 1)]
        with atomic_write(out / f"{name}.bin") as f:
            f.write(np.array(block_rows, dtype=dtype).tobytes())
    val = set(split["val"])
    with atomic_write(out / "pairs.jsonl", "w") as f:
        for i, pair in enumerate(pairs):
            row = {k: v for k, v in pair.items() if k != "group"}  # a group may be a whole passage
            f.write(json.dumps(row | {"split": "val" if i in val else "train"}, ensure_ascii=False) + "\n")
    tokens = np.array(rows)
    counts |= {
        "pairs_kept": len(pairs), "pairs_train": len(split["train"]), "pairs_val": n_val,
        "articles_kept": len({p["article"] for p in pairs if "article" in p}),
        "negatives": dict(Counter(p["negative"] for p in pairs)),
        "blocks_train": 2 * len(split["train"]), "blocks_val": 2 * n_val,
        "tokens": int((tokens != tok.pad).sum()),
        "chars": sum(count_chars(p["prompt"]) + count_chars(p["chosen"]) + count_chars(p["rejected"]) for p in pairs),
        "pad_fraction": round(float((tokens == tok.pad).mean()), 4),
        "malformed": bad.count, "dropped": dict(counts["dropped"]),
    }
    write_json(out / "meta.json", {"block_size": block_size, "dtype": dtype.name, "vocab_size": tok.n_vocab,
                                   "tokenizer": tok.identity.to_json(), "schema": 1, "special": tok.special,
                                   "kind": "dpo",
                                   "sft_run": str(Path(args.sft_run).resolve()) if run else None,
                                   "counts": counts})
    bad.report()
    print(json.dumps(counts, ensure_ascii=False))
    print(f"wrote {len(pairs)} pairs ({counts['negatives']}) -> {out}")


if __name__ == "__main__":
    main()
