"""data/prepare.py: block boundaries, cleaning, the split, parallel determinism, bad input, atomicity."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from conftest import ROOT

from data.prepare import article_sentences
from data.prepare import main as prepare_main
from data_utils import clean_article, split_of


def article(i, n_sentences=6):
    """A wiki-style line: title, blank line, paragraphs of sentences of varied length."""
    sentences = [f"第{i}座城市的第{k}条河流{'很长' * (k % 4)}，流经{'北方平原' * (1 + (i + k) % 3)}。"
                 for k in range(n_sentences)]
    body = "".join(sentences[: n_sentences // 2]) + "\n" + "".join(sentences[n_sentences // 2:])
    return {"id": str(1000 + i), "title": f"城市{i}", "text": f"城市{i}\n\n{body}"}


def write_jsonl(path, objs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


def run(tmp_path, tok, input_path, *extra, out="out"):
    prepare_main(["--input", str(input_path), "--out", str(tmp_path / out), "--tokenizer", tok.identity.path,
                  "--quiet", *extra])
    out = tmp_path / out
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    rows = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]).reshape(-1, meta["block_size"])
            for s in ("train", "val")}
    return meta, rows


def row_content(row, tok):
    """The tokens of a non-packed row, after checking its layout: [tokens, EOT only at an article end, PAD...]."""
    special = np.flatnonzero(np.isin(row, [tok.pad, tok.eot]))
    end = special[0] if len(special) else len(row)
    assert end > 0 and (row[end + (row[end] == tok.eot):] == tok.pad).all()
    return row[:end].tolist()


def documents(rows, tok):
    """The texts between EOTs once every PAD is dropped: one per article when EOT marks only article ends."""
    stream = rows[rows != tok.pad]
    eots = np.flatnonzero(stream == tok.eot)
    assert len(eots) and eots[-1] == len(stream) - 1, "the last article ends with EOT"
    return [tok.decode(piece.tolist()) for piece in np.split(stream[: eots[-1]], eots[:-1] + 1)]


def test_rows_are_whole_sentences_and_keep_every_article(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    objs = [article(i, n_sentences=2 + i % 9) for i in range(30)]
    meta, rows = run(tmp_path, tok, write_jsonl(tmp_path / "in.jsonl", objs), "--block_size", "128",
                     "--val_fraction", "0", "--min_chars", "1", "--workers", "1")
    assert rows["val"].shape == (0, 128) and rows["train"].shape[1] == 128
    texts = [tok.decode(row_content(r, tok)) for r in rows["train"]]
    bodies = [clean_article(o["text"]) for o in objs]
    assert "".join(texts) == "".join(bodies)  # nothing lost, nothing added, in order
    # every row starts at a sentence start and ends at a sentence end of one article
    sentence_ends = set()
    offset = 0
    for body in bodies:
        for sentence in article_sentences(body):
            offset += len(sentence)
            sentence_ends.add(offset)
    offset = 0
    for text in texts:
        assert offset in sentence_ends | {0} and offset + len(text) in sentence_ends
        offset += len(text)
    assert len(texts) > len(objs)  # long articles went on in further rows
    c = meta["counts"]
    assert c["blocks_train"] == len(texts) and c["sentences_split"] == 0
    assert c["tokens"] == sum(len(row_content(r, tok)) for r in rows["train"])
    assert c["pad_fraction"] == pytest.approx((rows["train"] == tok.pad).mean(), abs=1e-4)


def test_paragraph_newlines_are_kept_inside_an_article():
    body = clean_article("标题\n\n第一句。第二句！\n第三句")
    assert article_sentences(body) == ["第一句。", "第二句！\n", "第三句"]
    assert "".join(article_sentences(body)) == body


def test_over_long_sentence_is_cut_at_token_boundaries_and_counted(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_sentence = "北京上海长江黄河故宫" * 30 + "。"
    obj = {"id": "1", "text": f"长句\n\n短句开头。{long_sentence}短句结尾。"}
    meta, rows = run(tmp_path, tok, write_jsonl(tmp_path / "in.jsonl", [obj]), "--block_size", "32",
                     "--val_fraction", "0", "--workers", "1")
    contents = [row_content(r, tok) for r in rows["train"]]
    assert meta["counts"]["sentences_split"] == 1
    assert sum(len(c) >= 29 for c in contents) >= 2  # the cut pieces fill their rows
    texts = [tok.decode(c) for c in contents]
    assert "".join(texts) == clean_article(obj["text"])  # and no character was cut in two
    assert tok.decode(contents[0]) == "短句开头。"  # the short sentence before is not glued to a piece


def test_pack_shares_rows_and_cuts_padding(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    objs = [article(i, n_sentences=2) for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", objs)
    plain_meta, _ = run(tmp_path, tok, path, "--block_size", "256", "--val_fraction", "0", "--min_chars", "1",
                        out="plain")
    meta, rows = run(tmp_path, tok, path, "--block_size", "256", "--val_fraction", "0", "--min_chars", "1", "--pack")
    assert meta["counts"]["pad_fraction"] < plain_meta["counts"]["pad_fraction"]
    assert meta["counts"]["blocks_train"] < len(objs)
    for row in rows["train"]:  # PAD only closes a row: nothing follows it
        pads = np.flatnonzero(row == tok.pad)
        assert not len(pads) or (row[pads[0]:] == tok.pad).all()
    assert documents(rows["train"], tok) == [clean_article(o["text"]) for o in objs]


@pytest.mark.parametrize("pack", [[], ["--pack"]])
def test_eot_only_where_an_article_ends(tmp_path, tiny_tokenizer, pack):
    """Regression: rows cut inside an article used to end in EOT too (173,519 EOT for 91,350 articles
    on the shared corpus), teaching the model that documents end at arbitrary points."""
    tok = tiny_tokenizer
    objs = [article(i, n_sentences=2 + i % 12) for i in range(40)]
    meta, rows = run(tmp_path, tok, write_jsonl(tmp_path / "in.jsonl", objs), "--block_size", "48",
                     "--val_fraction", "0", "--min_chars", "1", *pack)
    assert len(rows["train"]) > len(objs)  # long articles do go on in further rows
    assert int((rows["train"] == tok.eot).sum()) == len(objs)
    assert meta["counts"]["eot_train"] == len(objs)
    assert documents(rows["train"], tok) == [clean_article(o["text"]) for o in objs]
    # a row cut inside an article ends in PAD, which the pretraining loss mask never counts
    import torch

    from data_utils import loss_mask
    y = torch.from_numpy(rows["train"][:, 1:].astype(np.int64))
    assert not loss_mask(y, tok.special, "pretrain")[y == tok.pad].any()
    assert loss_mask(y, tok.special, "pretrain")[y == tok.eot].all()
    assert not loss_mask(y, tok.special, "pretrain", mask_eot=True)[y == tok.eot].any()


def test_cleaning_in_the_pipeline(tmp_path, tiny_tokenizer):
    text = ("北京\n\n北京（）是首都（，）。简称「」京《》。\n历史.\n"
            "<div>北京有-{故宫}-。</div>“”长城&amp;颐和园<|endoftext|>。\n\n")
    assert clean_article(text) == "北京是首都。简称京。\n北京有故宫。长城&颐和园<|endoftext|>。"
    meta, rows = run(tmp_path, tiny_tokenizer, write_jsonl(tmp_path / "in.jsonl", [{"id": "7", "text": text}]),
                     "--val_fraction", "0", "--min_chars", "10")
    # row_content checks the only EOT is the structural one: the spelling in the text stayed text
    assert tiny_tokenizer.decode(row_content(rows["train"][0], tiny_tokenizer)) == clean_article(text)


def test_split_is_by_article_deterministic_and_order_free(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    objs = [article(i) for i in range(200)]
    assert split_of("1000", 0.3) == split_of("1000", 0.3)
    expected_val = {o["id"] for o in objs if split_of(o["id"], 0.3) == "val"}
    assert 30 < len(expected_val) < 90
    meta_a, rows_a = run(tmp_path, tok, write_jsonl(tmp_path / "a.jsonl", objs), "--val_fraction", "0.3", out="a")
    meta_b, rows_b = run(tmp_path, tok, write_jsonl(tmp_path / "b.jsonl", objs[::-1]), "--val_fraction", "0.3", out="b")
    decode_rows = lambda rows: {tok.decode(row_content(r, tok)) for r in rows}  # noqa: E731
    val_texts = {clean_article(o["text"]) for o in objs if o["id"] in expected_val}
    assert decode_rows(rows_a["val"]) == decode_rows(rows_b["val"]) == val_texts
    assert not decode_rows(rows_a["train"]) & val_texts
    assert meta_a["counts"]["articles_val"] == len(expected_val)


def test_output_does_not_depend_on_workers(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [article(i) for i in range(300)])
    for pack in ([], ["--pack"]):
        results = [run(tmp_path, tiny_tokenizer, path, "--workers", str(w), "--chunk_bytes", "4096",
                       "--val_fraction", "0.2", *pack, out=f"w{w}") for w in (1, 2)]
        (meta_1, rows_1), (meta_2, rows_2) = results
        for split in ("train", "val"):
            assert np.array_equal(rows_1[split], rows_2[split])
        assert meta_1["counts"]["tokens"] == meta_2["counts"]["tokens"]


def test_malformed_input_is_counted_not_fatal(tmp_path, tiny_tokenizer, capsys):
    folder = tmp_path / "in"
    good = write_jsonl(folder / "a.jsonl", [article(1), article(2)])
    with open(good, "ab") as f:
        f.write(b'{"text": "broken\n')  # line 3
        f.write(b'{"title": "no text"}\n')  # line 4
        f.write(b'{"text": "\xff\xfe bad bytes"}\n')  # line 5
        f.write(b"[1, 2]\n\n")  # line 6, then a blank line
        f.write(json.dumps(article(3)).encode() + b"\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "empty.jsonl").write_bytes(b"")
    meta, rows = run(tmp_path, tiny_tokenizer, folder, "--val_fraction", "0")
    c = meta["counts"]
    assert c["articles_read"] == 7 and c["articles_kept"] == 3
    assert c["dropped"]["malformed"] == 4 and c["empty_files"] == 1
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in c["bad_lines"]] == ["0", "3", "4", "5", "6"]
    assert "invalid UTF-8" in " ".join(c["bad_lines"]) and "skipped 5 malformed lines" in capsys.readouterr().out


def test_nothing_usable_exits_non_zero_and_writes_nothing(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "太短"}, {"id": 1}])
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--input", str(path), "--out", str(tmp_path / "out"), "--tokenizer",
                      tiny_tokenizer.identity.path, "--quiet"])
    assert exit_info.value.code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    with pytest.raises(SystemExit):
        prepare_main(["--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--quiet"])


def test_interrupted_run_keeps_the_previous_output(tmp_path, tiny_tokenizer):
    """SIGKILL mid-write: the old bins and meta.json stay as they were, no new train.bin appears."""
    tok = tiny_tokenizer
    small = write_jsonl(tmp_path / "small.jsonl", [article(i) for i in range(5)])
    run(tmp_path, tok, small, "--val_fraction", "0")
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = write_jsonl(tmp_path / "big.jsonl", [article(i, 40) for i in range(2000)])
    proc = subprocess.Popen([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(big), "--out", str(out),
                             "--tokenizer", tok.identity.path, "--workers", "1", "--chunk_bytes", "65536"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(p.name.startswith(".train.bin") and p.stat().st_size for p in out.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "prepare.py ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert after == before


def test_meta_fields(tmp_path, tiny_tokenizer):
    meta, rows = run(tmp_path, tiny_tokenizer, write_jsonl(tmp_path / "in.jsonl", [article(i) for i in range(50)]),
                     "--val_fraction", "0.2", "--block_size", "64")
    assert meta["block_size"] == 64 and meta["dtype"] == "uint16" and meta["kind"] == "pretrain"
    assert meta["vocab_size"] == tiny_tokenizer.n_vocab and meta["tokenizer"] == tiny_tokenizer.identity.to_json()
    assert meta["schema"] == 1
    assert meta["special"] == tiny_tokenizer.special
    c = meta["counts"]
    for key in ("articles_read", "articles_kept", "dropped", "blocks_train", "blocks_val", "tokens", "chars",
                "pad_fraction", "sentences_split", "tokens_train", "tokens_val", "chars_train", "chars_val"):
        assert key in c
    assert (c["blocks_train"], c["blocks_val"]) == (len(rows["train"]), len(rows["val"]))
    assert c["tokens"] == c["tokens_train"] + c["tokens_val"] and c["chars"] == c["chars_train"] + c["chars_val"]
    assert c["chars"] == sum(len(clean_article(article(i)["text"]).replace("\n", "")) for i in range(50))


def test_trains_a_tokenizer_when_absent(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [article(i) for i in range(40)])
    prepare_main(["--input", str(path), "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"),
                  "--vocab_size", "300", "--val_fraction", "0", "--quiet"])
    assert "training a 300-token tokenizer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (tmp_path / "tok" / "ranks.tiktoken").exists() and meta["tokenizer"]["path"] == str(tmp_path / "tok")


def test_hostile_input_is_counted_never_fatal_and_bounded(tmp_path, tiny_tokenizer, capsys):
    """Regression: a deeply nested line crashed the run (RecursionError); a FIFO, a symlink loop and a
    folder named *.jsonl were skipped without a word; one huge line was read whole into memory."""
    folder = tmp_path / "in"
    path = write_jsonl(folder / "a.jsonl", [article(1)])
    with open(path, "ab") as f:
        f.write(b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}\n")  # line 2
        f.write(b'{"id": "9", "text": "\\ud800' + "长".encode() * 60 + b'"}\n')  # line 3
        f.write(b'{"text": "' + "长".encode() * 20_000 + b'"}\n')  # line 4: 60 kB, over the limit below
        f.write(json.dumps(article(2)).encode() + b"\n")
    os.mkfifo(folder / "pipe.jsonl")
    os.symlink("loop.jsonl", folder / "loop.jsonl")
    (folder / "dir.jsonl").mkdir()
    meta, rows = run(tmp_path, tiny_tokenizer, folder, "--val_fraction", "0", "--max_line_bytes", "8000",
                     "--chunk_bytes", "4096", "--workers", "1")
    c = meta["counts"]
    assert c["articles_kept"] == 2 and c["articles_read"] == 5 and c["dropped"]["malformed"] == 3
    assert sorted(c["bad_lines"]) == [f"{path}:2: JSON nested too deeply", f"{path}:3: lone surrogate in a string",
                                      f"{path}:4: line longer than 8000 bytes"]
    assert c["skipped_paths"] == 3
    out = capsys.readouterr().out
    assert "skipped 3 paths that are not regular files" in out and "a FIFO" in out and "symlink loop" in out
    assert documents(rows["train"], tiny_tokenizer) == [clean_article(article(i)["text"]) for i in (1, 2)]


def test_temporaries_of_a_killed_run_are_removed_at_start(tmp_path, tiny_tokenizer):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f".train.bin.tmp{dead.pid}", out / f".meta.json.tmp{dead.pid}"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    (out / "notes.tmp1").write_text("not ours")
    run(tmp_path, tiny_tokenizer, write_jsonl(tmp_path / "in.jsonl", [article(1)]), "--val_fraction", "0")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.tmp1", "train.bin", "val.bin"]


# ----------------------------------------------------------------------------- corpus formats, mixes, shards


def write_as(path, objs):
    """The same records as .jsonl, .jsonl.gz, .jsonl.zst or parquet (row groups of 7 rows), by suffix."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(objs), path, row_group_size=7)
    else:
        path.write_bytes(lines)
    return path


def read_outputs(out):
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    names = meta.get("shards", {s: [f"{s}.bin"] for s in ("train", "val")})
    return meta, {s: b"".join((out / n).read_bytes() for n in names[s]) for s in ("train", "val")}


def test_compressed_and_parquet_inputs_give_byte_identical_output(tmp_path, tiny_tokenizer):
    """.jsonl.gz, .jsonl.zst and parquet (read in row groups, chunks smaller than a group) give the
    bytes plain jsonl gives for the same records, also through the tokenizer's sampler."""
    from tokenizer import sample_texts

    objs = [article(i) for i in range(60)]
    outputs = {}
    for name in ("in.jsonl", "in.jsonl.gz", "in.jsonl.zst", "in.parquet"):
        path = write_as(tmp_path / name.replace(".", "_") / name, objs)
        run(tmp_path, tiny_tokenizer, path, "--val_fraction", "0.2", "--chunk_bytes", "2000", out=f"out_{name}")
        outputs[name] = read_outputs(tmp_path / f"out_{name}")
        assert list(sample_texts(path, 10_000)) == list(sample_texts(tmp_path / "in_jsonl", 10_000))
    plain_meta, plain = outputs["in.jsonl"]
    assert plain_meta["counts"]["articles_kept"] == 60 and plain["train"] and plain["val"]
    for name, (meta, bins) in outputs.items():
        assert bins == plain, name
        assert meta["counts"]["tokens"] == plain_meta["counts"]["tokens"]


def test_text_field_and_clean_none_keep_web_text(tmp_path, tiny_tokenizer):
    """--text_field content --clean none: no title line dropped, no heading removed; only NFC, line
    breaks, control characters, tabs and blank lines are touched; short documents still dropped."""
    tok = tiny_tokenizer
    web = "标题行也是正文.\r\n第一段有\x00控制\x07字符\t和制表符。\n\n\nCafe\u0301 用分解的重音写成。\u2028新的一行。"
    objs = [{"content": web, "url": "u1"}, {"content": "太短。", "url": "u2"}, {"text": "没有 content 字段。" * 9}]
    meta, rows = run(tmp_path, tok, write_jsonl(tmp_path / "web.jsonl", objs), "--text_field", "content",
                     "--clean", "none", "--val_fraction", "0", "--min_chars", "20")
    expected = "标题行也是正文.\n第一段有控制字符 和制表符。\nCafé 用分解的重音写成。\n新的一行。"
    assert documents(rows["train"], tok) == [expected]
    assert meta["counts"]["dropped"] == {"malformed": 1, "too_short": 1, "mixed_out": 0}
    assert meta["sources"][0]["clean"] == "none" and meta["sources"][0]["text_field"] == "content"
    # one setting per input: the web file as it is, the wiki without its title line
    wiki = write_jsonl(tmp_path / "wiki.jsonl", [article(1)])
    prepare_main(["--input", str(tmp_path / "web.jsonl"), str(wiki), "--text_field", "content", "text",
                  "--clean", "none", "wiki", "--val_fraction", "0", "--min_chars", "20", "--out", str(tmp_path / "two"),
                  "--tokenizer", tok.identity.path, "--quiet"])
    meta, bins = read_outputs(tmp_path / "two")
    rows = np.frombuffer(bins["train"], dtype=meta["dtype"]).reshape(-1, meta["block_size"])
    assert documents(rows, tok) == [expected, clean_article(article(1)["text"])]
    assert [(s["text_field"], s["clean"]) for s in meta["sources"]] == [("content", "none"), ("text", "wiki")]
    with pytest.raises(SystemExit):
        prepare_main(["--input", str(wiki), "--clean", "none", "wiki", "--out", str(tmp_path / "x")])


def test_weighted_mix_is_deterministic_and_recorded(tmp_path, tiny_tokenizer):
    """wiki:2 web:0.5 takes every wiki training article twice, a fixed half of the web ones once,
    validation articles at most once; the same bytes on every run; the mix is in meta.json."""
    tok = tiny_tokenizer
    wiki = write_jsonl(tmp_path / "wiki" / "a.jsonl", [article(i) for i in range(40)])
    web = write_as(tmp_path / "web" / "b.parquet", [{"id": f"w{i}", "text": f"网页{i}\n\n" +
                                                     article(100 + i)["text"].split("\n\n")[1]} for i in range(80)])
    args = ("--val_fraction", "0.2", "--input", f"{wiki.parent}:2", f"{web.parent}:0.5")
    prepare_main(["--out", str(tmp_path / "mix"), "--tokenizer", tok.identity.path, "--quiet", *args])
    prepare_main(["--out", str(tmp_path / "again"), "--tokenizer", tok.identity.path, "--quiet", *args])
    meta, bins = read_outputs(tmp_path / "mix")
    assert read_outputs(tmp_path / "again")[1] == bins
    rows = {s: np.frombuffer(bins[s], dtype=meta["dtype"]).reshape(-1, meta["block_size"]) for s in bins}
    train, val = Counter(documents(rows["train"], tok)), Counter(documents(rows["val"], tok))
    wiki_docs = {clean_article(article(i)["text"]) for i in range(40)}
    web_docs = {article(100 + i)["text"].split("\n\n")[1] for i in range(80)}
    assert set(train) | set(val) <= wiki_docs | web_docs and max(val.values()) == 1
    assert all(train[d] == 2 for d in wiki_docs - set(val)) and not set(train) & set(val)
    web_train = [d for d in train if d in web_docs]
    web_val = [d for d in val if d in web_docs]
    assert all(train[d] == 1 for d in web_train) and 0.3 < (len(web_train) + len(web_val)) / 80 < 0.7
    sources = meta["sources"]
    assert [(s["input"], s["weight"]) for s in sources] == [(str(wiki.parent), 2.0), (str(web.parent), 0.5)]
    assert sources[1]["articles_train"] == len(web_train) and meta["counts"]["dropped"]["mixed_out"] > 0
    assert sum(s["tokens_train"] for s in sources) == meta["counts"]["tokens_train"]
    with pytest.raises(SystemExit):  # a mistyped input is an error, not a silently different mix
        prepare_main(["--out", str(tmp_path / "typo"), "--input", str(wiki.parent), f"{tmp_path / 'wbe'}:0.5"])
    assert not (tmp_path / "typo").exists()


def test_files_held_out_of_training_are_never_read(tmp_path, tiny_tokenizer, capsys):
    """pipeline.py writes data/drcd_test_passages.jsonl: prepare.py on data/ must not pretrain on it."""
    folder = tmp_path / "data"
    write_jsonl(folder / "wiki.jsonl", [article(i) for i in range(3)])
    write_jsonl(folder / "drcd_test_passages.jsonl", [article(50 + i) for i in range(3)])
    meta, rows = run(tmp_path, tiny_tokenizer, folder, "--val_fraction", "0")
    assert documents(rows["train"], tiny_tokenizer) == [clean_article(article(i)["text"]) for i in range(3)]
    assert "held out of training" in capsys.readouterr().out and meta["counts"]["skipped_paths"] == 1


def test_bad_records_in_every_format_are_counted_not_fatal(tmp_path, tiny_tokenizer, capsys):
    folder = tmp_path / "in"
    write_as(folder / "a.parquet", [article(1), {"id": "x", "text": None}])
    (folder / "b.parquet").write_bytes(b"PAR1 not really")
    good = zstandard_bytes([article(2)] * 1)
    (folder / "c.jsonl.zst").write_bytes(good[: len(good) // 2])  # truncated stream
    write_as(folder / "d.jsonl.gz", [article(3)])
    write_as(folder / "e.parquet", [{"id": "y", "body": "no text column"}])
    meta, rows = run(tmp_path, tiny_tokenizer, folder, "--val_fraction", "0")
    assert documents(rows["train"], tiny_tokenizer) == [clean_article(article(i)["text"]) for i in (1, 3)]
    out = capsys.readouterr().out
    assert "a.parquet:row 1" in out and "unreadable parquet" in out and "no column 'text'" in out
    assert meta["counts"]["dropped"]["malformed"] >= 1


def zstandard_bytes(objs):
    import zstandard

    return zstandard.ZstdCompressor().compress("".join(json.dumps(o, ensure_ascii=False) + "\n"
                                                       for o in objs).encode())


def test_shards_are_one_dataset_to_the_loader(tmp_path, tiny_tokenizer):
    """--shard_tokens writes numbered shards of whole blocks whose concatenation is the unsharded
    output, and BlockData reads them as one array."""
    from data_utils import BlockData

    path = write_jsonl(tmp_path / "in.jsonl", [article(i, 12) for i in range(80)])
    common = ["--input", str(path), "--tokenizer", tiny_tokenizer.identity.path, "--quiet", "--block_size", "64",
              "--val_fraction", "0.1"]
    prepare_main([*common, "--out", str(tmp_path / "one")])
    prepare_main([*common, "--out", str(tmp_path / "sharded"), "--shard_tokens", "2000"])
    _, one = read_outputs(tmp_path / "one")
    meta, sharded = read_outputs(tmp_path / "sharded")
    assert sharded == one and len(meta["shards"]["train"]) > 3
    sizes = [(tmp_path / "sharded" / n).stat().st_size for n in meta["shards"]["train"]]
    assert set(sizes[:-1]) == {32 * 64 * 2} and 0 < sizes[-1] <= 32 * 64 * 2  # ceil(2000/64) blocks each
    a, b = BlockData(tmp_path / "one", "train"), BlockData(tmp_path / "sharded", "train")
    assert a.n_blocks == b.n_blocks
    idx = np.array([0, 31, 32, a.n_blocks - 1, 5, 64])
    assert all((x == y).all() for x, y in zip(a.batch(idx), b.batch(idx)))
    # a later unsharded run into the same folder leaves no stale shard behind
    prepare_main([*common, "--out", str(tmp_path / "sharded")])
    assert not list((tmp_path / "sharded").glob("*-*.bin")) and read_outputs(tmp_path / "sharded")[1] == one


def test_killed_sharded_run_resumes_at_its_last_shard(tmp_path, tiny_tokenizer):
    """SIGKILL after a shard was checkpointed: the next run says it resumes, re-does only what came
    after the checkpoint, and ends with the bytes of an uninterrupted run."""
    tok = tiny_tokenizer
    big = write_as(tmp_path / "big.jsonl.zst", [article(i, 30) for i in range(1500)])
    args = ["--input", str(big), "--tokenizer", tok.identity.path, "--workers", "1", "--chunk_bytes", "16384",
            "--block_size", "128", "--shard_tokens", "20000", "--quiet"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "data" / "prepare.py"), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / ".prepare-progress.json").exists():
        assert proc.poll() is None and time.time() < deadline, "prepare.py ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    progress = json.loads((out / ".prepare-progress.json").read_text())
    assert not (out / "meta.json").exists() and progress["writers"]["train"]["done"]
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "resuming the killed run" in result.stdout
    prepare_main([*args, "--out", str(tmp_path / "fresh")])
    assert read_outputs(out)[1] == read_outputs(tmp_path / "fresh")[1]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
