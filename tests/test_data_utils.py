"""data_utils: the loss mask on hand-built rows, BlockData sampling and resuming, reading and splitting."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data_utils import (
    BadLines,
    BlockData,
    article_key,
    atomic_write,
    find_jsonl,
    iter_jsonl,
    loss_mask,
    parse_jsonl_line,
    read_lines,
    remove_stale_temporaries,
    split_of,
    split_sentences,
    token_dtype,
    write_json,
)


def padded(ids, tok, block_size=32):
    return ids + [tok.pad] * (block_size - len(ids))


def masked_targets(rows, tok, kind, mask_eot=False):
    """The targets each row's loss mask keeps, as lists."""
    y = torch.tensor(rows)[:, 1:]
    mask = loss_mask(y, tok.special, kind, mask_eot)
    assert mask.shape == y.shape and mask.dtype == torch.bool
    return [row[keep].tolist() for row, keep in zip(y, mask)]


def test_pretrain_mask_counts_every_token_but_pad(tiny_tokenizer):
    tok = tiny_tokenizer
    text = tok.encode("北京是首都。")
    row = padded(text + [tok.eot], tok)
    assert masked_targets([row], tok, "pretrain") == [text[1:] + [tok.eot]]
    assert masked_targets([row], tok, "pretrain", mask_eot=True) == [text[1:]]
    packed = padded(text + [tok.eot] + text + [tok.eot], tok)
    assert masked_targets([packed], tok, "pretrain") == [text[1:] + [tok.eot] + text + [tok.eot]]


def test_qa_mask_is_exactly_the_answer_and_its_eot(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [padded(tok.encode_qa("北京在哪？", "华北平原"), tok), padded(tok.encode_qa("长江？", "河"), tok)]
    assert masked_targets(rows, tok, "sft") == [tok.encode("华北平原") + [tok.eot], tok.encode("河") + [tok.eot]]


def test_chat_mask_is_exactly_the_assistant_turns_and_their_end(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "system", "content": "助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "北京？"},
                {"role": "assistant", "content": "首都。"}]
    row = padded(tok.encode_chat(messages, add_generation_prompt=False), tok, 48)
    expected = tok.encode("你好！") + [tok.end] + tok.encode("首都。") + [tok.end]
    assert masked_targets([row], tok, "sft") == [expected]


def test_block_data_batches_and_sequential_epochs(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = np.array([padded(tok.encode_qa(f"问题{i}", f"答案{i}"), tok, 24) for i in range(10)], dtype=np.uint16)
    rows.tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"")
    write_json(tmp_path / "meta.json", {"block_size": 24, "dtype": "uint16", "vocab_size": tok.n_vocab,
                                        "tokenizer": tok.identity.to_json(), "special": tok.special, "kind": "sft"})
    data = BlockData(tmp_path, "train", seed=3)
    assert data.n_blocks == 10 and data.block_size == 24
    x, y, mask = data.batch([4, 1])
    assert x.tolist() == rows[[4, 1], :-1].tolist() and y.tolist() == rows[[4, 1], 1:].tolist()
    assert mask.tolist() == loss_mask(y, tok.special, "sft").tolist() and mask.any(1).all()
    assert not torch.equal(data.batch([4], kind="pretrain")[2], data.batch([4])[2])
    rng = np.random.default_rng(0)
    random_idx = data.next_indices(100, "random", rng)
    assert random_idx.min() >= 0 and random_idx.max() < 10
    again = BlockData(tmp_path, "train").next_indices(100, "random", np.random.default_rng(0))
    assert random_idx.tolist() == again.tolist()

    drawn = np.concatenate([data.next_indices(3, "sequential", rng) for _ in range(4)])  # 12 = an epoch and 2
    assert sorted(drawn[:10].tolist()) == list(range(10))
    state = data.state()
    assert state == {"epoch": 1, "cursor": 2}
    continuation = [data.next_indices(4, "sequential", rng).tolist() for _ in range(5)]
    resumed = BlockData(tmp_path, "train", seed=3)
    resumed.load_state(json.loads(json.dumps(state)))
    assert [resumed.next_indices(4, "sequential", rng).tolist() for _ in range(5)] == continuation
    epoch_1 = drawn[10:].tolist() + sum(continuation, [])[:8]
    assert sorted(epoch_1) == list(range(10)) and epoch_1 != drawn[:10].tolist()
    with pytest.raises(ValueError, match="no blocks"):
        BlockData(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        BlockData(tmp_path / "missing", "train")


def test_split_of_is_stable_and_proportional():
    assert split_of("4891097", 0.5) == split_of("4891097", 0.5)
    assert split_of("x", 0.0) == "train" and split_of("x", 1.0) == "val"
    share = sum(split_of(str(i), 0.1) == "val" for i in range(20000)) / 20000
    assert 0.09 < share < 0.11
    # fixed values: the split must never change, or pretraining validation articles leak into training
    assert [split_of(str(i), 0.5) for i in range(8)] == ["val", "train", "val"] + ["train"] * 5
    assert article_key({"id": 12, "title": "t", "text": "x"}) == "12"
    assert article_key({"title": "t", "text": "x"}) == "t" and article_key({"text": "x"}) == "x"


def test_iter_jsonl_reports_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "ok"}\nnot json\n\n\xff\xfe\n{"text": 3}\n{"text": "ok2"}\n')
    bad = BadLines(keep=2)
    assert [(n, o["text"]) for n, o in iter_jsonl(path, bad)] == [(1, "ok"), (6, "ok2")]
    assert bad.count == 3 and bad.examples == [f"{path}:2: invalid JSON (Expecting value)", f"{path}:4: invalid UTF-8"]


def test_split_sentences_keeps_punctuation_and_closing_quotes():
    assert split_sentences("他说：“好。”然后走了！对吗？最后") == ["他说：“好。”", "然后走了！", "对吗？", "最后"]
    assert split_sentences("第一段。\n第二段") == ["第一段。", "第二段"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_trimmed_batches_give_the_same_loss_and_gradient(tmp_path, tiny_tokenizer):
    """Dropping the all-padding tail of short SFT rows is exact: the model is causal."""
    from model import GPT, GPTConfig

    tok = tiny_tokenizer
    rows = np.array([padded(tok.encode_qa(f"问题{i}", "答案" * i), tok, 200) for i in range(1, 5)], dtype=np.uint16)
    rows.tofile(tmp_path / "train.bin")
    write_json(tmp_path / "meta.json", {"block_size": 200, "dtype": "uint16", "vocab_size": tok.n_vocab,
                                        "tokenizer": tok.identity.to_json(), "special": tok.special, "kind": "sft"})
    data = BlockData(tmp_path, "train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=200, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16))
    results = []
    for trim in (False, True):
        x, y, mask = data.batch([0, 1, 2, 3], trim=trim)
        model.zero_grad()
        _, loss = model(x, y, mask)
        loss.backward()
        results.append((x.size(1), loss.item(), model.lm_head.weight.grad.clone()))
    (full_len, full_loss, full_grad), (trim_len, trim_loss, trim_grad) = results
    assert full_len == 199 and trim_len == 64
    assert trim_loss == pytest.approx(full_loss, rel=1e-6) and torch.allclose(trim_grad, full_grad, atol=1e-7)


def test_deep_nesting_and_lone_surrogates_are_malformed_lines_not_crashes():
    """Regression: json.loads raised RecursionError on a deeply nested line, and a lone surrogate
    escape ("\\ud800") got through to crash later stages (split_of, writing val.jsonl)."""
    bad = BadLines()
    assert parse_jsonl_line(b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "f:1", bad) is None
    assert parse_jsonl_line(b'{"text": "a\\ud800b"}\n', "f:2", bad) is None
    assert parse_jsonl_line(b'{"text": "ok", "more": ["\\udfff"]}\n', "f:3", bad) is None
    assert bad.examples == ["f:1: JSON nested too deeply", "f:2: lone surrogate in a string",
                            "f:3: lone surrogate in a string"]
    # a surrogate *pair* is an ordinary character (an emoji), and fine
    assert parse_jsonl_line(b'{"text": "\\ud83d\\ude00"}', "f:4", bad) == {"text": "\U0001f600"} and bad.count == 3
    assert split_of("a\ud800b", 0.5) in ("train", "val")  # robust anyway


def test_over_long_lines_are_skipped_in_bounded_reads_and_numbered_right(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "one"}\n' + b"x" * 50_000 + b'\n{"text": "three"}\n' + b"y" * 3000)
    bad = BadLines()
    lines = list(read_lines(path, bad, max_bytes=1000))
    assert [n for n, _ in lines] == [1, 2, 3, 4] and lines[1][1] is None and lines[3][1] is None
    assert lines[2][1] == b'{"text": "three"}\n' and bad.count == 2
    assert bad.examples[0] == f"{path}:2: line longer than 1000 bytes"
    assert [(n, o["text"]) for n, o in iter_jsonl(path, BadLines())] == [(1, "one"), (3, "three")]


def test_find_jsonl_reports_fifos_symlink_loops_and_folders_and_never_opens_them(tmp_path):
    """Regression: these were skipped without a word."""
    (tmp_path / "good.jsonl").write_text('{"text": "x"}\n')
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it for reading would block forever
    os.symlink("loop.jsonl", tmp_path / "loop.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    skipped = BadLines()
    assert find_jsonl(tmp_path, skipped=skipped) == [tmp_path / "good.jsonl"]
    assert skipped.count == 3
    reasons = dict(e.rsplit(": ", 1) for e in skipped.examples)
    assert reasons == {str(tmp_path / "folder.jsonl"): "folder, not a regular file",
                       str(tmp_path / "loop.jsonl"): "a symlink loop, not a regular file",
                       str(tmp_path / "pipe.jsonl"): "a FIFO, not a regular file"}
    skipped = BadLines()
    assert find_jsonl(tmp_path / "pipe.jsonl", skipped=skipped) == [] and skipped.count == 1


def test_stale_temporaries_of_dead_or_old_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    names = {f".train.bin.tmp{dead.pid}": False, f".val.bin.tmp{live}": True, f".meta.json.tmp{os.getpid()}": True,
             f".other.bin.tmp{dead.pid}": True, f"train.bin.tmp{dead.pid}": True, ".val.bin.tmp12x": True}
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    old = tmp_path / f".meta.json.tmp{live}"  # a live pid, but a day old: the pid was reused
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    removed = remove_stale_temporaries(tmp_path, ("train.bin", "val.bin", "meta.json"))
    assert sorted(p.name for p in removed) == sorted([f".train.bin.tmp{dead.pid}", old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)


def test_token_dtype_by_vocabulary_size():
    assert token_dtype(400) == np.uint16 and token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_atomic_write_first_removes_stale_temporaries_of_its_own_name(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, other, live = (tmp_path / f".out.json.tmp{dead.pid}", tmp_path / f".other.json.tmp{dead.pid}",
                         tmp_path / f".out.json.tmp{os.getppid()}")
    for p in (mine, other, live):
        p.write_text("partial")
    folder = tmp_path / f".out.json.old{dead.pid}"  # folders too (retrieval.py's index moved aside)
    folder.mkdir()
    (folder / "x").write_text("x")
    with atomic_write(tmp_path / "out.json", "w") as f:
        f.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", other.name, live.name])


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"])
def test_reading_resumes_at_any_chunk_in_every_format(tmp_path, name):
    """A chunk's `resume` position, given back as `start`, yields exactly the records after it, in
    every format, also inside a parquet row group larger than a decoded batch (5000 rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_prepare import write_as

    from data_utils import PARQUET_BATCH_ROWS, chunk_records, read_chunks

    objs = [{"id": str(i), "text": f"第{i}行" + "字" * (i % 13)} for i in range(5000)]
    if name.endswith(".parquet"):  # one row group of 5000 rows: decoded 1024 at a time
        pq.write_table(pa.Table.from_pylist(objs), tmp_path / name, row_group_size=5000)
        files = [tmp_path / name]
    else:
        files = [write_as(tmp_path / name, objs)]
    files.append(write_as(tmp_path / "d.jsonl", objs[:10]))
    bad = BadLines()

    def texts(chunks):
        return [obj["text"] for c in chunks for _, obj in chunk_records(c, "text", bad)]

    chunks = list(read_chunks(files, 3000, bad))
    assert texts(chunks) == [o["text"] for o in objs + objs[:10]] and len(chunks) > 5
    inside = [c for c in chunks if c.resume[0] == 0 and c.resume[1] > PARQUET_BATCH_ROWS][:3]
    for chunk in [*inside, chunks[len(chunks) // 2], chunks[-3]]:
        rest = chunks[chunks.index(chunk) + 1:]
        assert texts(read_chunks(files, 3000, bad, start=chunk.resume)) == texts(rest)
    assert bad.count == 0
