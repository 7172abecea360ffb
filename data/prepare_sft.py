"""SFT data: QA pairs and dialogues -> `train.bin`, `val.bin`, `val.jsonl`, `meta.json`.

    python data/prepare_sft.py --input data/qa.jsonl ../shared/data/qa ../shared/data/dialog --out data/sft
    python data/prepare_sft.py --input data/qa.jsonl ../shared/data/qa --out data/sft_read \
        --with_context --context_mix 0.5     # reading: half the pairs show their passage

Inputs are recognised by their content, not their names, through the readers of data_utils:
- QA jsonl (`qa_fields`), one `{"question", "answer" | "answers", "context"?, "id"?, "title"?}` a line
  (sft/sft_generate.py writes the passage a pair was made from as `context`);
- SQuAD-style JSON (`squad_questions`: CMRC2018, DRCD), with a passage and answer offset per question;
- chat jsonl, one `{"messages": [{"role": "system|user|assistant", "content"}, ...]}` a line;
- KdConv JSON: a list of `{"name", "messages": [{"message", "attrs"?}, ...]}`, turns alternating
  user/assistant from the first (the knowledge `attrs` are not used).
Held-out evaluation files (`data_utils.TRAINING_HELD_OUT`: DRCD test) are never read, even inside a
folder given as input; they, FIFOs, symlink loops and folders named `*.json[l]` are reported.

Design:
- One example per row: `tok.encode_qa(question, answer)` or `tok.encode_chat(messages,
  add_generation_prompt=False)` then PAD to `block_size`, so every row starts with its prompt and
  `data_utils.loss_mask` finds the answer spans from the tokens alone. An example longer than a row is
  dropped and counted, except a dialogue, which is cut at turn boundaries into several examples (each
  starting with a user turn, keeping the system message); a single exchange too long is dropped.
- Reading (`--with_context`): a pair that carries its passage is laid out by
  `tok.encode_passage_qa(passage, question, answer)` (the passage, a newline, the question: the one
  layout qa_eval.py and prepare_dpo.py use too). A passage too long for the block is cut by the one
  windowing function (`retrieval.fit_passage`, through `window`): a training pair's around its
  answer, the answer's place in the cut drawn from a per-example seeded generator (deterministic,
  but not always in the middle); a held-out pair's around its question, never its answer, as
  qa_eval.py cuts it, and val.jsonl keeps the whole passage for qa_eval.py to fit.
  `--context_mix F` gives the passage to a fraction F of the generated pairs (a hash of the question
  decides, so it does not depend on order) and leaves the rest closed-book: one model learns both
  to read and to remember. Reading-comprehension sets (SQuAD-style: CMRC2018, DRCD) always carry
  theirs: their questions are written about the passage, and their articles are mostly not in the
  pretraining corpus, so closed-book they teach only guessing. meta.json counts `with_passage`
  and `passages_cut`.
- `--human_weight N` writes each human-written (SQuAD-style) training row N times: about 4,500 of
  them beside 170k generated ones would otherwise be a few percent of SFT (issue 23's "human sets
  weighted up"); held-out rows are never repeated. meta.json counts `human_repeats`.
- Pairs are deduplicated on their normalised text. The split is by source: the pair's `id` (else
  title), the SQuAD article title, or the dialogue, hashed with `data_utils.split_of` like
  data/prepare.py, so generated pairs of a wiki article held out of pretraining are held out here too.
- The held-out QA pairs also go to `val.jsonl` (`{"id", "question", "answer", "answers",
  "source", "context"?}`, source `qa` for jsonl pairs or `squad`, context = the passage shown) for
  the evaluations; pipeline.py scores the generated pairs (`qa`) apart from the human-written
  ones. SFT sets are small (MBs), so examples are held in memory for deduplication.
- `--pretrain_data DIR` refuses a tokenizer other than the one that DIR's meta.json records.
- Malformed lines and files (bad JSON or UTF-8, nesting too deep, lone surrogates, over-long lines)
  are counted and reported with file:line, never fatal; outputs are written to temporaries and
  renamed, meta.json last; temporaries left by a killed run are removed at the next start.
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

if not __package__:  # run as a script (python data/prepare_sft.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import (  # noqa: E402
    BadJSON,
    BadLines,
    atomic_write,
    find_jsonl,
    held_out_of_training,
    load_meta,
    parse_jsonl_line,
    qa_fields,
    read_json_file,
    read_lines,
    remove_stale_temporaries,
    split_of,
    squad_questions,
    token_dtype,
    write_json,
)

OUTPUTS = ("train.bin", "val.bin", "val.jsonl", "meta.json")
from retrieval import PromptTooLong, fit_passage  # noqa: E402
from tokenizer import TokenizerId, load_tokenizer  # noqa: E402


def normalise(text):
    return " ".join(text.split()).lower()


def qa_record(key, question, answers, source, context=None, answer_start=None, qid=None):
    return {"kind": "qa", "key": key, "question": question, "answers": answers, "source": source,
            "context": context, "answer_start": answer_start, "id": qid}


def chat_record(key, messages, source):
    return {"kind": "chat", "key": key, "messages": messages, "source": source}


def read_jsonl(path, bad, counts):
    """QA pairs (`data_utils.qa_fields`, with their passage when they carry one) or chat
    conversations, one a line."""
    for lineno, raw in read_lines(path, bad):
        where = f"{path}:{lineno}"
        obj = parse_jsonl_line(raw, where, bad, required=())
        if obj is None:
            counts["malformed"] += raw is None or bool(raw.strip())
            continue
        if isinstance(obj.get("messages"), list):
            messages = chat_messages(obj["messages"])
            if messages is None:
                bad.add(where, "messages need string 'role' (system/user/assistant) and 'content'")
                counts["malformed"] += 1
                continue
            first = next((m["content"] for m in messages if m["role"] == "user"), "")
            yield chat_record(str(obj.get("id") or first), messages, "chat")
        elif (q := qa_fields(obj)) is not None:
            if not q["question"] or not q["answers"]:
                counts["no_answer"] += 1
                continue
            yield qa_record(q["article"], q["question"], q["answers"], "qa", q["context"])
        else:
            bad.add(where, "neither a QA pair (question, answer) nor a chat (messages)")
            counts["malformed"] += 1


def chat_messages(messages):
    ok = all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
             and isinstance(m.get("content"), str) for m in messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages] if ok else None


def read_json(path, bad, counts):
    """A SQuAD-style file (`data_utils.squad_questions`) or a KdConv dialogue file, told apart by shape."""
    data = read_json_file(path)
    if isinstance(data, BadJSON):
        bad.add(f"{path}:0", f"not a readable JSON file ({data})")
        counts["malformed"] += 1
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        before = bad.count
        for q in squad_questions(path, data, bad):
            if not q["question"] or not q["answers"]:
                counts["no_answer"] += 1
                continue
            yield qa_record(q["article"], q["question"], q["answers"], "squad", q["context"], q["answer_start"],
                            q["id"])
        counts["malformed"] += bad.count - before
    elif isinstance(data, list) and all(isinstance(d, dict) and isinstance(d.get("messages"), list) for d in data):
        for index, dialogue in enumerate(data):
            turns = [m.get("message") for m in dialogue["messages"] if isinstance(m, dict)]
            if not turns or not all(isinstance(t, str) for t in turns):
                bad.add(f"{path}:dialogue {index}", "a turn without a 'message' string")
                counts["malformed"] += 1
                continue
            messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
            yield chat_record(f"{Path(path).name}:{index}", messages, "kdconv")
    else:
        bad.add(f"{path}:0", "unrecognised JSON layout (expected SQuAD-style or KdConv)")
        counts["malformed"] += 1


def read_inputs(paths, bad, counts, skipped):
    """Records of every input; held-out evaluation files (`data_utils.TRAINING_HELD_OUT`, DRCD test)
    are never opened, and paths that are not regular files go to `skipped`."""
    for given in paths:
        files = find_jsonl(given, ("*.json", "*.jsonl"), skipped)
        if Path(given).is_dir():  # its .json and .jsonl files, but not sft_generate.py's progress sidecars
            files = [p for p in files if not p.name.endswith(".state.jsonl")]
            if not files:
                bad.add(str(given), "no .json or .jsonl file here")
        for path in files:
            if held_out_of_training(path):
                skipped.add(str(path), "held out of training (an evaluation set)")
                counts["held_out_files"] += 1
            elif path.suffix == ".jsonl":
                yield from read_jsonl(path, bad, counts)
            else:
                yield from read_json(path, bad, counts)


HELD_OUT_ANSWER_ROOM = 64  # tokens a held-out window leaves for the answer: qa_eval.py's --max_new_tokens


def window(tok, record, question, answer, block_size, rng, split):
    """The passage a pair is shown in its example, through the one windowing function
    (`retrieval.fit_passage`), so that the whole example fits `block_size`, or None when it cannot.

    Training pairs are cut around their answer, its place in the window drawn from `rng` (seeded per
    example: deterministic, and the answer is not always in the middle or the opening); None when the
    answer is not inside the cut. Held-out pairs are cut as qa_eval.py --with_context cuts them:
    around the question, never the answer, leaving `HELD_OUT_ANSWER_ROOM` tokens for it, so the
    passage a held-out question is shown does not depend on its answer; None when the example with
    its answer then does not fit."""
    passage, answer_start = record["context"], record["answer_start"]
    if answer_start is None and answer in passage:  # generated pairs: the answer is a span of the passage
        answer_start = passage.find(answer)
    try:
        if split == "val":
            text, _ = fit_passage(tok, passage, question, block_size - HELD_OUT_ANSWER_ROOM)
            return text if len(tok.encode_passage_qa(text, question, answer)) <= block_size else None
        text, _ = fit_passage(tok, passage, question, block_size, answer=answer, answer_start=answer_start,
                              place=rng.random())
    except PromptTooLong:
        return None
    return None if answer_start is not None and answer not in text else text


def chat_pieces(tok, messages, block_size, counts):
    """Token ids of a conversation, cut at user turns into pieces that each fit a row."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while turns and turns[-1]["role"] != "assistant":  # nothing to learn after the last answer
        turns = turns[:-1]
    exchanges, current = [], []
    for m in turns:
        if m["role"] == "user" and current and current[-1]["role"] == "assistant":
            exchanges.append(current)
            current = []
        current.append(m)
    if current:
        exchanges.append(current)
    pieces, piece = [], []
    for exchange in exchanges:
        if len(tok.encode_chat(system + piece + exchange, add_generation_prompt=False)) <= block_size:
            piece += exchange
            continue
        if piece:
            pieces.append(piece)
        if len(tok.encode_chat(system + exchange, add_generation_prompt=False)) <= block_size:
            piece = exchange
        else:
            counts["too_long"] += 1
            piece = []
    if piece:
        pieces.append(piece)
    counts["dialogues_split"] += len(pieces) > 1
    return [tok.encode_chat(system + p, add_generation_prompt=False) for p in pieces]


def carries_passage(record, context_mix):
    """A coin of probability `context_mix` per pair, seeded by the pair itself (split_of's hash with
    its own salt), so which pairs show their passage does not depend on input order or other pairs."""
    return split_of(f"{record['key']}\0{record['question']}", context_mix, salt="minigpt-context") == "val"


def build_examples(records, tok, args, counts, keys_read):
    """(split, token ids, record) per kept example, deduplicated, in input order.

    With `--with_context`, a SQuAD-style pair is shown its passage, and a jsonl pair that carries
    one is with probability `--context_mix` (decided by a hash of the question, so independent of
    order); the passage is cut to fit the block (`window`: around the answer for training, around the
    question for held-out pairs). Other pairs are
    closed-book.
    """
    seen = set()
    for record in records:
        counts["examples_read"] += 1
        keys_read.add(record["key"])
        counts[f"read_{record['source']}"] += 1
        if record["kind"] == "qa":
            fingerprint = ("qa", normalise(record["question"]), normalise(record["answers"][0]))
        else:
            fingerprint = ("chat",) + tuple(normalise(m["content"]) for m in record["messages"])
        if fingerprint in seen:
            counts["duplicate"] += 1
            continue
        seen.add(fingerprint)
        split = split_of(record["key"], args.val_fraction)
        if record["kind"] == "chat":
            for ids in chat_pieces(tok, record["messages"], args.block_size, counts):
                yield split, ids, record
            continue
        question, answer = record["question"], record["answers"][0]
        record["passage"] = None
        reads = record["source"] == "squad" or carries_passage(record, args.context_mix)
        if args.with_context and record["context"] and reads:
            rng = random.Random(f"{args.seed}\0{record['key']}\0{question}")
            record["passage"] = window(tok, record, question, answer, args.block_size, rng, split)
            if record["passage"] is None:
                counts["too_long"] += 1
                continue
            counts["with_passage"] += 1
            counts["passages_cut"] += record["passage"] != record["context"]
            ids = tok.encode_passage_qa(record["passage"], question, answer)
        else:
            ids = tok.encode_qa(question, answer)
        if len(ids) > args.block_size:
            counts["too_long"] += 1
            continue
        yield split, ids, record


def check_tokenizer(tok, pretrain_data):
    """Refuse to build SFT data with a tokenizer other than the pretraining data's."""
    theirs = load_meta(pretrain_data)["tokenizer"]
    if TokenizerId.from_json(theirs) != tok.identity:
        raise SystemExit(f"error: tokenizer mismatch: {pretrain_data}/meta.json was made with {theirs}, "
                         f"but --tokenizer gives {tok.identity.to_json()}; use the pretraining tokenizer")


def prepare_sft(args):
    try:
        tok = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.pretrain_data:
        check_tokenizer(tok, args.pretrain_data)
    dtype = token_dtype(tok.n_vocab)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out, OUTPUTS):
        print(f"removed {stale}, left by a run that was killed")
    bad, skipped, counts = BadLines(), BadLines(), Counter()
    keys_read, keys = set(), {"train": set(), "val": set()}
    rows = {"train": [], "val": []}
    with atomic_write(out / "val.jsonl", "w") as val_pairs:
        records = read_inputs(args.input, bad, counts, skipped)
        for split, ids, record in build_examples(records, tok, args, counts, keys_read):
            row = np.full(args.block_size, tok.pad, dtype=dtype)
            row[: len(ids)] = ids
            # human-written reading pairs weighted up: their training row repeated (never a held-out one)
            repeat = args.human_weight if split == "train" and record["source"] == "squad" else 1
            rows[split].extend([row] * repeat)
            counts["human_repeats"] += repeat - 1
            keys[split].add(record["key"])
            counts["tokens"] += len(ids)
            if split == "val" and record["kind"] == "qa":
                pair = {"id": record.get("id") or record["key"], "question": record["question"],
                        "answer": record["answers"][0], "answers": record["answers"], "source": record["source"]}
                if record["passage"] is not None:  # for qa_eval --with_context: the whole passage, which
                    pair["context"] = record["context"]  # it fits around the question (never the answer)
                val_pairs.write(json.dumps(pair, ensure_ascii=False) + "\n")
        n_rows = len(rows["train"]) + len(rows["val"])
        skipped.report("inputs not read")
        if n_rows == 0:
            bad.report()
            raise SystemExit(f"error: no usable example in {args.input}")
        (out / "meta.json").unlink(missing_ok=True)  # the old meta must never describe the new bins
        for split in ("train", "val"):
            with atomic_write(out / f"{split}.bin") as f:
                f.write(np.array(rows[split], dtype=dtype).reshape(-1, args.block_size).tobytes())
    dropped = {reason: counts[reason] for reason in ("malformed", "duplicate", "too_long", "no_answer")}
    summary = {
        "articles_read": len(keys_read), "articles_kept": len(keys["train"] | keys["val"]),
        "examples_read": counts["examples_read"], "examples_kept": n_rows, "dropped": dropped,
        "read_by_source": {k[5:]: v for k, v in counts.items() if k.startswith("read_")},
        "dialogues_split": counts["dialogues_split"], "with_passage": counts["with_passage"],
        "passages_cut": counts["passages_cut"], "held_out_files": counts["held_out_files"],
        "human_repeats": counts["human_repeats"],
        "skipped_paths": skipped.examples, "blocks_train": len(rows["train"]),
        "blocks_val": len(rows["val"]), "tokens": counts["tokens"],
        "pad_fraction": round(1 - counts["tokens"] / (n_rows * args.block_size), 4), "bad_lines": bad.examples,
    }
    meta = {"block_size": args.block_size, "dtype": dtype.name, "vocab_size": tok.n_vocab,
            "tokenizer": tok.identity.to_json(), "schema": 1, "special": tok.special, "kind": "sft",
            "with_context": args.with_context, "context_mix": args.context_mix if args.with_context else None,
            "val_fraction": args.val_fraction, "counts": summary}
    write_json(out / "meta.json", meta)
    bad.report()
    print(f"examples: {summary['examples_read']} read {summary['read_by_source']}, {n_rows} kept, dropped {dropped}, "
          f"{summary['dialogues_split']} dialogues split")
    print(f"blocks of {args.block_size}: {summary['blocks_train']} train / {summary['blocks_val']} val, "
          f"pad fraction {summary['pad_fraction']:.1%} -> {out}/train.bin, val.bin, val.jsonl, meta.json")
    if not rows["val"]:
        print("warning: no validation example (raise --val_fraction for a set this small)")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description="QA pairs / dialogues -> SFT train.bin / val.bin / val.jsonl / meta.json.")
    ap.add_argument("--input", nargs="+", required=True, help="files or folders (*.json, *.jsonl), several allowed")
    ap.add_argument("--out", default="data/sft")
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer folder (must exist) or gpt2")
    ap.add_argument("--with_context", action="store_true",
                    help="QA pairs that carry a passage (SQuAD, jsonl 'context') show it before the question")
    ap.add_argument("--context_mix", type=float, default=1.0,
                    help="with --with_context: the fraction of the jsonl pairs with a passage that are shown it "
                         "(the rest closed-book; SQuAD-style pairs always are)")
    ap.add_argument("--seed", type=int, default=1337, help="for where the answer sits in a cut passage")
    ap.add_argument("--human_weight", type=int, default=1,
                    help="write each SQuAD-style (human-written) training row this many times (1-100)")
    ap.add_argument("--val_fraction", type=float, default=0.05, help="share of source articles/dialogues held out")
    ap.add_argument("--pretrain_data", help="a prepared pretraining folder whose tokenizer must match")
    args = ap.parse_args(argv)
    if not 0 <= args.context_mix <= 1:
        ap.error("--context_mix must be between 0 and 1")
    if not 1 <= args.human_weight <= 100:
        ap.error("--human_weight must be between 1 and 100")
    prepare_sft(args)


if __name__ == "__main__":
    main()
