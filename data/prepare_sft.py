"""SFT data: QA pairs and dialogues -> `train.bin`, `val.bin`, `val.jsonl`, `meta.json`.

    python data/prepare_sft.py --input data/qa.jsonl ../shared/data/qa ../shared/data/dialog --out data/sft

Inputs are recognised by their content, not their names:
- generated QA jsonl, one `{"question", "answer", "id"?, "title"?}` a line;
- SQuAD-style JSON (CMRC2018, DRCD): `{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`,
  with `--with_context` the prompt is the passage, a newline, then the question;
- chat jsonl, one `{"messages": [{"role": "system|user|assistant", "content"}, ...]}` a line;
- KdConv JSON: a list of `{"name", "messages": [{"message", "attrs"?}, ...]}`, turns alternating
  user/assistant from the first (the knowledge `attrs` are not used).

Design:
- One example per row: `tok.encode_qa(question, answer)` or `tok.encode_chat(messages,
  add_generation_prompt=False)` then PAD to `block_size`, so every row starts with its prompt and
  `data_utils.loss_mask` finds the answer spans from the tokens alone. An example longer than a row is
  dropped and counted, except a dialogue, which is cut at turn boundaries into several examples (each
  starting with a user turn, keeping the system message); a single exchange too long is dropped.
- Pairs are deduplicated on their normalised text. The split is by source: the pair's `id` (else
  title), the SQuAD article title, or the dialogue, hashed with `data_utils.split_of` like
  data/prepare.py, so generated pairs of a wiki article held out of pretraining are held out here too.
- The held-out QA pairs also go to `val.jsonl` (`{"id", "question", "answer", "answers"}`) for the
  evaluations. SFT sets are small (MBs), so examples are held in memory for deduplication.
- `--pretrain_data DIR` refuses a tokenizer other than the one that DIR's meta.json records.
- Malformed lines and files are counted and reported with file:line, never fatal; outputs are written
  to temporaries and renamed, meta.json last.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines, atomic_write, find_jsonl, load_meta, parse_jsonl_line, split_of, write_json  # noqa: E402
from tokenizer import TokenizerId, load_tokenizer  # noqa: E402


def normalise(text):
    return " ".join(text.split()).lower()


def qa_record(key, question, answers, source):
    return {"kind": "qa", "key": key, "question": question.strip(), "answers": answers, "source": source}


def chat_record(key, messages, source):
    return {"kind": "chat", "key": key, "messages": messages, "source": source}


def read_jsonl(path, bad, counts):
    """QA pairs or chat conversations, one a line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            obj = parse_jsonl_line(raw, where, bad, required=())
            if obj is None:
                counts["malformed"] += bool(raw.strip())
                continue
            if isinstance(obj.get("messages"), list):
                messages = chat_messages(obj["messages"])
                if messages is None:
                    bad.add(where, "messages need string 'role' (system/user/assistant) and 'content'")
                    counts["malformed"] += 1
                    continue
                first = next((m["content"] for m in messages if m["role"] == "user"), "")
                yield chat_record(str(obj.get("id") or first), messages, "chat")
            elif isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
                if not obj["question"].strip() or not obj["answer"].strip():
                    counts["no_answer"] += 1
                    continue
                key = str(obj.get("id") or obj.get("title") or obj["question"])
                yield qa_record(key, obj["question"], [obj["answer"].strip()], "qa")
            else:
                bad.add(where, "neither a QA pair (question, answer) nor a chat (messages)")
                counts["malformed"] += 1


def chat_messages(messages):
    ok = all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
             and isinstance(m.get("content"), str) for m in messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages] if ok else None


def read_json(path, bad, counts, with_context):
    """A SQuAD-style file or a KdConv dialogue file, told apart by shape."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        bad.add(f"{path}:0", f"not a readable JSON file ({type(e).__name__})")
        counts["malformed"] += 1
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        yield from squad_records(path, data["data"], bad, counts, with_context)
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


def squad_records(path, articles, bad, counts, with_context):
    for a_index, article in enumerate(articles):
        try:
            key = str(article.get("title") or article.get("id") or f"{Path(path).name}:{a_index}")
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                    if not answers or not qa["question"].strip():
                        counts["no_answer"] += 1
                        continue
                    question = qa["question"].strip()
                    if with_context:
                        question = paragraph["context"].strip() + "\n" + question
                    record = qa_record(key, question, answers, "squad")
                    record["id"] = qa.get("id")
                    yield record
        except (KeyError, TypeError, AttributeError) as e:
            bad.add(f"{path}:article {a_index}", f"unexpected SQuAD shape ({type(e).__name__}: {e})")
            counts["malformed"] += 1


def read_inputs(paths, bad, counts, with_context):
    for given in paths:
        given = Path(given)
        # a folder: its .json and .jsonl files, but not sft_generate.py's progress sidecars
        files = [given] if given.is_file() else sorted(
            p for p in find_jsonl(given, "*.json") + find_jsonl(given, "*.jsonl") if not p.name.endswith(".state.jsonl"))
        if not files:
            bad.add(str(given), "no .json or .jsonl file here")
        for path in files:
            if path.suffix == ".jsonl":
                yield from read_jsonl(path, bad, counts)
            else:
                yield from read_json(path, bad, counts, with_context)


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


def build_examples(records, tok, block_size, val_fraction, counts, keys_read):
    """(split, token ids, record) per kept example, deduplicated, in input order."""
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
        split = split_of(record["key"], val_fraction)
        if record["kind"] == "qa":
            ids = tok.encode_qa(record["question"], record["answers"][0])
            if len(ids) > block_size:
                counts["too_long"] += 1
                continue
            yield split, ids, record
        else:
            for ids in chat_pieces(tok, record["messages"], block_size, counts):
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
        raise SystemExit(f"error: {e}")
    if args.pretrain_data:
        check_tokenizer(tok, args.pretrain_data)
    dtype = np.dtype("uint16" if tok.n_vocab <= 2**16 else "uint32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad, counts, keys_read, keys = BadLines(), Counter(), set(), {"train": set(), "val": set()}
    rows = {"train": [], "val": []}
    with atomic_write(out / "val.jsonl", "w") as val_pairs:
        records = read_inputs(args.input, bad, counts, args.with_context)
        for split, ids, record in build_examples(records, tok, args.block_size, args.val_fraction, counts, keys_read):
            row = np.full(args.block_size, tok.pad, dtype=dtype)
            row[: len(ids)] = ids
            rows[split].append(row)
            keys[split].add(record["key"])
            counts["tokens"] += len(ids)
            if split == "val" and record["kind"] == "qa":
                pair = {"id": record.get("id") or record["key"], "question": record["question"],
                        "answer": record["answers"][0], "answers": record["answers"]}
                val_pairs.write(json.dumps(pair, ensure_ascii=False) + "\n")
        n_rows = len(rows["train"]) + len(rows["val"])
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
        "dialogues_split": counts["dialogues_split"], "blocks_train": len(rows["train"]),
        "blocks_val": len(rows["val"]), "tokens": counts["tokens"],
        "pad_fraction": round(1 - counts["tokens"] / (n_rows * args.block_size), 4), "bad_lines": bad.examples,
    }
    meta = {"block_size": args.block_size, "dtype": dtype.name, "vocab_size": tok.n_vocab, "tokenizer": tok.identity.to_json(), "schema": 1,
            "special": tok.special, "kind": "sft", "with_context": args.with_context,
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
    ap.add_argument("--with_context", action="store_true", help="SQuAD prompts hold the passage before the question")
    ap.add_argument("--val_fraction", type=float, default=0.05, help="share of source articles/dialogues held out")
    ap.add_argument("--pretrain_data", help="a prepared pretraining folder whose tokenizer must match")
    prepare_sft(ap.parse_args(argv))


if __name__ == "__main__":
    main()
