"""data/prepare_sft.py: row layouts per input kind, dedup, grouped split, tokenizer check, bad input."""
import json

import numpy as np
import pytest
import torch

from data.prepare import main as prepare_main
from data.prepare_sft import main as prepare_sft_main
from data_utils import loss_mask, split_of
from tokenizer import train_tokenizer


def write(path, obj=None, lines=None):
    text = json.dumps(obj, ensure_ascii=False) if lines is None else "".join(
        json.dumps(o, ensure_ascii=False) + "\n" for o in lines)
    path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path, tok, *inputs, extra=(), block_size=128, out="sft"):
    prepare_sft_main(["--input", *map(str, inputs), "--out", str(tmp_path / out), "--tokenizer", tok.identity.path,
                      "--block_size", str(block_size), *extra])
    out = tmp_path / out
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    rows = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]).reshape(-1, block_size) for s in ("train", "val")}
    val_pairs = [json.loads(line) for line in (out / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    return meta, rows, val_pairs


def all_rows(rows):
    return np.concatenate([rows["train"], rows["val"]])


def unpadded(row, tok):
    content = row[row != tok.pad].tolist()
    assert row[: len(content)].tolist() == content  # PAD only at the end
    return content


def answer_tokens(row, tok, special):
    """The target tokens the SFT loss mask keeps for one row."""
    y = torch.from_numpy(row[1:].astype(np.int64))[None]
    return y[loss_mask(y, special, "sft")].tolist()


PAIRS = [{"id": "a1", "question": "北京是哪个国家的首都？", "answer": "中华人民共和国"},
         {"id": "a1", "question": "故宫在哪里？", "answer": "北京市中心"},
         {"id": "a2", "question": "长江有多长？", "answer": "约6300公里"},
         {"id": "a3", "question": "  长江有多长？ ", "answer": "约6300公里"},  # a duplicate once normalised
         {"id": "a4", "question": "Python是谁创建的？", "answer": "Guido van Rossum"}]


def test_qa_jsonl_layout_and_dedup(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    meta, rows, _ = run(tmp_path, tok, write(tmp_path / "qa.jsonl", lines=PAIRS))
    kept = [unpadded(r, tok) for r in all_rows(rows)]
    expected = [tok.encode_qa(p["question"].strip(), p["answer"]) for p in PAIRS if p["id"] != "a3"]
    assert sorted(kept) == sorted(expected)
    assert meta["kind"] == "sft" and meta["counts"]["dropped"]["duplicate"] == 1
    for row in all_rows(rows):
        content = unpadded(row, tok)
        answer_start = content.index(tok.answer) + 1
        assert answer_tokens(row, tok, meta["special"]) == content[answer_start:]  # answer + closing EOT


def test_pairs_of_one_article_share_a_split_and_val_jsonl(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [{"id": f"art{i // 3}", "question": f"第{i}个问题？", "answer": f"答案{i}"} for i in range(300)]
    meta, rows, val_pairs = run(tmp_path, tok, write(tmp_path / "qa.jsonl", lines=pairs),
                                extra=["--val_fraction", "0.2"])
    expected_val = [p for p in pairs if split_of(p["id"], 0.2) == "val"]
    assert 0 < len(expected_val) < 150 and len(expected_val) % 3 == 0
    assert [(p["id"], p["question"], p["answer"]) for p in val_pairs] == \
        [(p["id"], p["question"], p["answer"]) for p in expected_val]
    assert sorted(unpadded(r, tok) for r in rows["val"]) == sorted(tok.encode_qa(p["question"], p["answer"])
                                                                   for p in expected_val)
    assert meta["counts"]["blocks_val"] == len(expected_val) and meta["counts"]["articles_read"] == 100


SQUAD = {"version": "v1", "data": [
    {"id": "1", "title": "北京", "paragraphs": [{"context": "北京是中华人民共和国的首都。", "qas": [
        {"id": "q1", "question": "北京是哪国的首都？", "answers": [{"text": "中华人民共和国", "answer_start": 3},
                                                                {"text": "中华人民共和国", "answer_start": 3}]},
        {"id": "q2", "question": "没有答案？", "answers": []}]}]},
    {"id": "2", "title": "长江", "paragraphs": [{"context": "长江" * 200, "qas": [
        {"id": "q3", "question": "长江有多长？", "answers": [{"text": "约6300公里"}, {"text": "6300公里"}]}]}]},
]}


def test_squad_with_and_without_context(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write(tmp_path / "squad.json", SQUAD)
    meta, rows, _ = run(tmp_path, tok, path, extra=["--val_fraction", "1"], block_size=96, out="plain")
    assert sorted(unpadded(r, tok) for r in rows["val"]) == sorted(
        [tok.encode_qa("北京是哪国的首都？", "中华人民共和国"), tok.encode_qa("长江有多长？", "约6300公里")])
    meta, rows, val_pairs = run(tmp_path, tok, path, extra=["--val_fraction", "1", "--with_context"], block_size=96)
    shown = "北京是中华人民共和国的首都。\n北京是哪国的首都？"
    assert unpadded(rows["val"][0], tok) == tok.encode_qa(shown, "中华人民共和国")
    # a held-out passage too long for the block is cut around the question, as qa_eval.py shows it,
    # even when the answer is not in it: what a held-out question is shown never looks at its answer
    assert len(rows["val"]) == 2 and tok.decode(unpadded(rows["val"][1], tok)).startswith("长江长江")
    assert meta["counts"]["dropped"] == {"malformed": 0, "duplicate": 0, "too_long": 0, "no_answer": 1}
    # val.jsonl keeps the question and the whole passage apart, as qa_eval.py --with_context reads them
    assert val_pairs[0] == {"id": "q1", "question": "北京是哪国的首都？", "answer": "中华人民共和国",
                            "answers": ["中华人民共和国"], "source": "squad", "context": "北京是中华人民共和国的首都。"}
    assert val_pairs[1]["context"] == "长江" * 200


CHAT = [{"id": "c1", "messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                                  {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "北京在哪？"},
                                  {"role": "assistant", "content": "华北平原。"}]},
        {"id": "c2", "messages": [{"role": "user", "content": "hi"}, {"role": "moderator", "content": "?"}]}]


def test_chat_jsonl_layout_and_mask(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    meta, rows, _ = run(tmp_path, tok, write(tmp_path / "chat.jsonl", lines=CHAT))
    (row,) = all_rows(rows)
    assert unpadded(row, tok) == tok.encode_chat(CHAT[0]["messages"], add_generation_prompt=False)
    expected = tok.encode("你好！") + [tok.end] + tok.encode("华北平原。") + [tok.end]
    assert answer_tokens(row, tok, meta["special"]) == expected
    assert meta["counts"]["dropped"]["malformed"] == 1 and "chat.jsonl:2" in meta["counts"]["bad_lines"][0]


def kdconv(n_turns, long_turn=None):
    turns = [{"message": f"第{i}句话。"} for i in range(n_turns)]
    if long_turn is not None:
        turns[long_turn]["message"] = "很长的话" * 60
    return {"name": "电影", "messages": turns}


def test_kdconv_turns_alternate_and_long_dialogues_split_at_turns(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    meta, rows, _ = run(tmp_path, tok, write(tmp_path / "kdconv_x.json", [kdconv(4), kdconv(30)]), block_size=96)
    short = tok.encode_chat([{"role": ("user", "assistant")[i % 2], "content": f"第{i}句话。"} for i in range(4)],
                            add_generation_prompt=False)
    contents = [unpadded(r, tok) for r in all_rows(rows)]
    assert contents.count(short) == 1
    pieces = [c for c in contents if c != short]
    assert len(pieces) >= 3 and meta["counts"]["dialogues_split"] == 1
    assert "".join(tok.decode(p) for p in pieces) == "".join(f"第{i}句话。" for i in range(30))  # every turn, in order
    for piece in pieces:
        assert piece[0] == tok.user and piece[-2:] == [tok.end, tok.eot] and len(piece) <= 96
    assert meta["counts"]["read_by_source"] == {"kdconv": 2}


def test_exchange_longer_than_a_row_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    meta, rows, _ = run(tmp_path, tok, write(tmp_path / "kdconv_y.json", [kdconv(4, long_turn=1)]), block_size=96)
    rest = [{"role": "user", "content": "第2句话。"}, {"role": "assistant", "content": "第3句话。"}]
    assert [unpadded(r, tok) for r in all_rows(rows)] == [tok.encode_chat(rest, add_generation_prompt=False)]
    assert meta["counts"]["dropped"]["too_long"] == 1


def test_tokenizer_must_match_the_pretraining_data(tmp_path, tiny_tokenizer):
    wiki = write(tmp_path / "wiki.jsonl",
                 lines=[{"id": str(i), "text": f"标题\n\n{'北京是首都。' * 20}"} for i in range(5)])
    prepare_main(["--input", str(wiki), "--out", str(tmp_path / "pre"), "--tokenizer", tiny_tokenizer.identity.path,
                  "--quiet", "--val_fraction", "0"])
    qa = write(tmp_path / "qa.jsonl", lines=PAIRS)
    run(tmp_path, tiny_tokenizer, qa, extra=["--pretrain_data", str(tmp_path / "pre")])
    other = train_tokenizer(["完全不同的训练文本。"] * 10, tmp_path / "other", vocab_size=300)
    with pytest.raises(SystemExit, match="tokenizer mismatch"):
        run(tmp_path, other, qa, extra=["--pretrain_data", str(tmp_path / "pre")], out="refused")
    assert not (tmp_path / "refused" / "meta.json").exists()
    with pytest.raises(SystemExit, match="no tokenizer"):
        prepare_sft_main(["--input", str(qa), "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "none")])


def test_bad_input_is_counted_and_nothing_usable_fails(tmp_path, tiny_tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"question": "q?", "answer": "a"}\n{broken\n\xff\n{"question": 1}\n\n'
                     b'{"question": "' + "长".encode() * 400 + b'", "answer": "a"}\n')
    (tmp_path / "odd.json").write_text('{"something": "else"}')
    meta, rows, _ = run(tmp_path, tiny_tokenizer, path, tmp_path / "odd.json")
    c = meta["counts"]
    assert c["examples_kept"] == 1 and c["dropped"]["malformed"] == 4 and c["dropped"]["too_long"] == 1
    assert [e.split(": ")[0] for e in c["bad_lines"]] == [f"{path}:2", f"{path}:3", f"{path}:4",
                                                          f"{tmp_path}/odd.json:0"]
    with pytest.raises(SystemExit, match="no usable example"):
        run(tmp_path, tiny_tokenizer, tmp_path / "odd.json", out="empty")
    assert not (tmp_path / "empty" / "train.bin").exists()


def test_shared_squad_and_kdconv_files(tmp_path, tiny_tokenizer, qa_dir):
    from conftest import need_shared
    dialog = need_shared("dialog", "kdconv_travel_dev.json")
    meta, rows, val_pairs = run(tmp_path, tiny_tokenizer, qa_dir / "cmrc2018_trial.json", dialog,
                                extra=["--val_fraction", "0.1"], block_size=256)
    c = meta["counts"]
    assert c["read_by_source"]["squad"] >= 1000 and c["read_by_source"]["kdconv"] == 150
    assert c["examples_kept"] == c["blocks_train"] + c["blocks_val"] > 1000
    assert val_pairs and all(p["question"] and p["answer"] for p in val_pairs)
    for row in all_rows(rows)[::50]:
        assert row[0] != tiny_tokenizer.pad and answer_tokens(row, tiny_tokenizer, meta["special"])


def test_folder_input_skips_progress_sidecars_and_empty_answers(tmp_path, tiny_tokenizer):
    folder = tmp_path / "generated"
    folder.mkdir()
    write(folder / "qa.jsonl", lines=PAIRS[:2] + [{"id": "a9", "question": "空答案？", "answer": " "}])
    write(folder / "qa.state.jsonl", lines=[{"id": "a1", "status": "ok", "reason": ""}])
    meta, rows, _ = run(tmp_path, tiny_tokenizer, folder)
    c = meta["counts"]
    assert c["examples_kept"] == 2 and c["dropped"]["no_answer"] == 1 and c["dropped"]["malformed"] == 0


def test_hostile_lines_are_malformed_not_crashes(tmp_path, tiny_tokenizer):
    """Regression: a deeply nested line crashed prepare_sft.py (RecursionError) and a lone surrogate
    crashed it in split_of (UnicodeEncodeError)."""
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"question": "q?", "answer": "a"}\n'
                     b'{"question": ' + b"[" * 3000 + b"]" * 3000 + b', "answer": "a"}\n'
                     b'{"id": "\\udc80", "question": "q2?", "answer": "b"}\n'
                     b'{"question": "' + b"x" * 5_000_000 + b'", "answer": "a"}\n')
    (tmp_path / "deep.json").write_bytes(b'{"data": ' + b"[" * 3000 + b"]" * 3000 + b"}")
    meta, rows, _ = run(tmp_path, tiny_tokenizer, path, tmp_path / "deep.json")
    c = meta["counts"]
    assert c["examples_kept"] == 1 and c["dropped"]["malformed"] == 4
    assert [e.split(": ", 1)[1] for e in c["bad_lines"]] == [
        "JSON nested too deeply", "lone surrogate in a string", "line longer than 4194304 bytes",
        "not a readable JSON file (JSON nested too deeply)"]


def test_window_keeps_the_answer_for_training_and_ignores_it_for_held_out_pairs(tiny_tokenizer):
    import random

    from data.prepare_sft import HELD_OUT_ANSWER_ROOM, window

    tok, rng = tiny_tokenizer, random.Random(0)
    words = ["北京", "上海", "长江", "黄河", "故宫", "Python", "，", "。", "1991年", "中国"]
    starts = []
    for case in range(300):
        passage = "".join(rng.choice(words) for _ in range(rng.randint(20, 400)))
        answer_start = rng.randrange(0, len(passage) - 4)
        answer = passage[answer_start:answer_start + rng.randint(1, 4)]
        block_size = rng.choice([48, 64, 96, 128])
        record = {"context": passage, "answer_start": answer_start}
        cut = window(tok, record, "问题是什么？", answer, block_size, random.Random(case), "train")
        assert cut is not None and cut in passage
        assert len(tok.encode_passage_qa(cut, "问题是什么？", answer)) <= block_size
        offset = passage.index(cut) if cut != passage else 0
        assert offset <= answer_start and answer_start + len(answer) <= offset + len(cut)  # the answer is inside
        if cut != passage:
            starts.append((answer_start - offset) / max(len(cut) - len(answer), 1))
    assert len(starts) > 100  # most cases had to be cut
    assert min(starts) < 0.2 and max(starts) > 0.8  # the answer's place in the cut varies
    long = {"context": "长" * 500, "answer_start": 0}
    assert window(tok, long, "问题？", "长" * 400, 64, random.Random(0), "train") is None  # cannot fit

    # held out: the window is the question's, whatever the answer (and wherever it is)
    passage = "黄河是中国第二长河。" * 6 + "长江全长约6300公里，是中国第一长河。" + "故宫位于北京。" * 8
    held_out = {w for answer, at in (("6300公里", passage.index("6300")), ("故宫", 0), ("黄河", 0), ("北京", None))
                for w in [window(tok, {"context": passage, "answer_start": at}, "长江全长多少公里？", answer, 128,
                                 random.Random(answer), "val")]}
    assert len(held_out) == 1 and "长江全长约6300公里" in held_out.pop()
    from retrieval import fit_passage
    shown, _ = fit_passage(tok, passage, "长江全长多少公里？", 128 - HELD_OUT_ANSWER_ROOM)  # as qa_eval.py cuts it
    assert window(tok, {"context": passage, "answer_start": None}, "长江全长多少公里？", "x", 128,
                  random.Random(1), "val") == shown


SQUAD_LONG = {"data": [{"title": f"文章{i}", "paragraphs": [{
    "context": "北京是首都。" * (5 + 3 * i) + f"答案{i}在这里。" + "上海是城市。" * (20 - i),
    "qas": [{"id": f"q{i}", "question": f"第{i}个问题？",
             "answers": [{"text": f"答案{i}", "answer_start": 6 * (5 + 3 * i)}]}]}]} for i in range(12)]}


def test_with_context_cuts_passages_around_the_answer_and_mixes_closed_book(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write(tmp_path / "cmrc.json", SQUAD_LONG)
    generated = write(tmp_path / "gen.jsonl", lines=[{"id": "g1", "question": "长江多长？", "answer": "6300公里",
                                                      "context": "长江全长约6300公里，是第一长河。"}])
    meta, rows, _ = run(tmp_path, tok, path, generated, extra=["--val_fraction", "0", "--with_context"],
                        block_size=80, out="all")
    c = meta["counts"]
    assert c["examples_kept"] == c["with_passage"] == 13 and c["passages_cut"] == 12 and c["dropped"]["too_long"] == 0
    for row in rows["train"]:
        content = unpadded(row, tok)
        prompt, answer = content[:content.index(tok.answer)], tok.decode(answer_tokens(row, tok, meta["special"]))
        passage, _, question = tok.decode(prompt).rpartition("\n")
        assert answer in passage and question.endswith("？")
    assert tok.encode_passage_qa("长江全长约6300公里，是第一长河。", "长江多长？", "6300公里") in \
        [unpadded(r, tok) for r in rows["train"]]
    again = run(tmp_path, tok, path, generated, extra=["--val_fraction", "0", "--with_context"], block_size=80,
                out="again")[1]
    assert np.array_equal(again["train"], rows["train"])  # seeded: the same cuts every run

    # the mix: a share of the generated pairs read, the rest are closed-book; SQuAD-style pairs always read
    many = write(tmp_path / "many.jsonl", lines=[{"id": f"g{i}", "question": f"长江第{i}问？", "answer": f"{i}公里",
                                                  "context": f"长江全长约{i}公里。"} for i in range(12)])
    meta, rows, val_pairs = run(tmp_path, tok, path, many, extra=["--val_fraction", "0.5", "--with_context",
                                                                  "--context_mix", "0.5"], block_size=80, out="mix")
    texts = [tok.decode(unpadded(r, tok)) for r in all_rows(rows)]
    squad_read = [t for t in texts if "问题" in t and "\n" in t]
    generated_read = [t for t in texts if "长江第" in t and "\n" in t]
    assert len(squad_read) == 12 and 0 < len(generated_read) < 12 and meta["context_mix"] == 0.5
    assert meta["counts"]["with_passage"] == len(squad_read) + len(generated_read)
    assert {p["source"] for p in val_pairs} == {"qa", "squad"}  # the evaluations tell generated from human apart
    assert all("context" in p for p in val_pairs if p["source"] == "squad")
    # --human_weight: each human-written training row written N times, the held-out ones once
    heavy = run(tmp_path, tok, path, many, extra=["--val_fraction", "0.5", "--with_context", "--context_mix", "0.5",
                                                    "--human_weight", "3"], block_size=80, out="heavy")
    human_train = sum("问题" in tok.decode(unpadded(r, tok)) for r in rows["train"])
    assert sum("问题" in tok.decode(unpadded(r, tok)) for r in heavy[1]["train"]) == 3 * human_train > 0
    assert np.array_equal(heavy[1]["val"], rows["val"]) and heavy[0]["counts"]["human_repeats"] == 2 * human_train
    # val.jsonl keeps the whole passage: qa_eval.py fits it around the question, never the answer
    contexts = {d["title"]: d["paragraphs"][0]["context"] for d in SQUAD_LONG["data"]}
    assert all(p["context"] in contexts.values() for p in val_pairs if p["source"] == "squad")


def test_drcd_test_is_never_read_for_training(tmp_path, tiny_tokenizer, capsys):
    folder = tmp_path / "qa"
    folder.mkdir()
    write(folder / "cmrc2018_trial.json", SQUAD)
    held_out = {"data": [{"title": "测试", "paragraphs": [{"context": "测试段落。", "qas": [
        {"id": "t1", "question": "留出的问题？", "answers": [{"text": "测试", "answer_start": 0}]}]}]}]}
    write(folder / "drcd_test.zh-hans.json", held_out)
    meta, rows, val_pairs = run(tmp_path, tiny_tokenizer, folder, extra=["--val_fraction", "0.5"])
    assert meta["counts"]["held_out_files"] == 1 and meta["counts"]["read_by_source"] == {"squad": 2}
    assert "held out of training" in capsys.readouterr().out
    texts = [tiny_tokenizer.decode(unpadded(r, tiny_tokenizer)) for r in all_rows(rows)]
    assert texts and not any("留出" in t for t in texts)
    with pytest.raises(SystemExit, match="no usable example"):  # named explicitly: still not read
        run(tmp_path, tiny_tokenizer, folder / "drcd_test.zh-hans.json", out="explicit")


def test_one_squad_reader_for_training_and_evaluation(tmp_path, tiny_tokenizer, qa_dir):
    """prepare_sft.py and the evaluations (data_utils.load_qa) read the same questions and answers."""
    from data_utils import load_qa

    path = qa_dir / "cmrc2018_trial.json"
    _, _, val_pairs = run(tmp_path, tiny_tokenizer, path, extra=["--val_fraction", "1"], block_size=1024)
    evaluated = {q["id"]: (q["question"], q["answers"]) for q in load_qa(path)}
    assert len(val_pairs) > 900
    assert all(evaluated[p["id"]] == (p["question"], p["answers"]) for p in val_pairs)
