"""Tokenizer: round trips, trainer/runtime equality, special-token safety, streaming decode, loading,
identity (TokenizerId) and the streaming file hash."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tiktoken
from conftest import SHARED

from data_utils import clean_article, iter_jsonl
from tokenizer import (
    PATTERN,
    StreamDecoder,
    TokenizerId,
    _bytes_to_unicode,
    file_sha256,
    load_tokenizer,
    ranks_from_hf,
    train_bpe,
    train_tokenizer,
)

MIXED = [
    "北京是中华人民共和国的首都。",
    "Hello, world! It's 2024 and we've got 3.14159 reasons.",
    "混合 text 与 English，还有数字123456和标点！？",
    "emoji 🙂👍🏽 and flags 🇨🇳, accents café naïve",
    "  leading spaces\n\n\ttabs\r\nand trailing   ",
    "",
]


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_round_trip_batch(tiny_tokenizer):
    assert [tiny_tokenizer.decode(ids) for ids in tiny_tokenizer.encode_batch(MIXED)] == MIXED


def wiki_bodies(path, n, skip=0):
    bodies = []
    for _, obj in iter_jsonl(path):
        body = clean_article(obj["text"])
        if len(body) >= 50:
            bodies.append(body)
        if len(bodies) >= skip + n:
            break
    return bodies[skip:]


def test_trainer_and_tiktoken_give_identical_ids(zhwiki_dir):
    """The ranks handed to tiktoken replay the `tokenizers` merges exactly, on text it never saw."""
    hf = train_bpe(wiki_bodies(zhwiki_dir / "zhwiki-00.jsonl", 400), 2000)
    ranks = ranks_from_hf(hf)
    enc = tiktoken.Encoding("test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    held_out = wiki_bodies(zhwiki_dir / "zhwiki-13.jsonl", 60) + MIXED[:-1]
    compared = 0
    for text in held_out:
        hf_ids = [ranks[bytes(byte_of[c] for c in hf.id_to_token(i))] for i in hf.encode(text).ids]
        assert enc.encode_ordinary(text) == hf_ids
        compared += len(hf_ids)
    assert compared > 10_000


def test_special_spellings_in_text_stay_text(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "问题<|endoftext|>答<|answer|>案<|pad|><|user|><|end|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    qa = tok.encode_qa("a<|answer|>b", "c<|endoftext|>d")
    assert qa.count(tok.answer) == 1 and qa.count(tok.eot) == 1 and qa[-1] == tok.eot
    chat = tok.encode_chat([{"role": "user", "content": "<|assistant|>hi<|end|>"}])
    assert chat.count(tok.assistant) == 1 and chat.count(tok.end) == 1 and chat[-1] == tok.assistant


def test_decode_drops_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.decode(tok.encode_qa("北京", "首都")) == "北京首都"


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory):
    """Trained on ASCII only, so every Chinese character or emoji is split over several byte tokens."""
    return train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 10,
                           tmp_path_factory.mktemp("ascii") / "tok", vocab_size=300)


@pytest.mark.parametrize("text", ["北京是首都。", "emoji 🙂👍🏽 mixed 中文 text", "é ñ ü ß"])
def test_stream_decoder_holds_back_split_characters(byte_level_tokenizer, text):
    tok = byte_level_tokenizer
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the characters really are split across tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some bytes had to wait for the rest of their character


def test_stream_decoder_skips_special_and_reports_invalid_bytes(byte_level_tokenizer):
    tok = byte_level_tokenizer
    decoder = StreamDecoder(tok)
    lone_lead_byte = tok.encode("中")[0]  # 0xE4 alone: the start of a character that never comes
    pieces = [decoder.push(i) for i in [tok.encode("a")[0], tok.eot, lone_lead_byte, tok.encode("b")[0]]]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode([tok.encode("a")[0], lone_lead_byte, tok.encode("b")[0]]) == "a\ufffdb"


def test_gpt2_loads_offline():
    if not (SHARED / "tiktoken_cache").exists():
        pytest.skip(f"no tiktoken cache at {SHARED / 'tiktoken_cache'}")
    tok = load_tokenizer("gpt2")
    assert tok.eot == 50256 and tok.identity.is_gpt2 and tok.identity.to_json() == "gpt2"
    assert tok.encode("hello world") == [31373, 995]
    assert sorted(v for k, v in tok.special.items() if k != "eot") == list(range(50257, 50257 + 6))
    assert tok.n_vocab == 50263
    assert load_tokenizer(tok.identity).special == tok.special


def test_save_and_load_keep_identity(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert copy.identity.sha256 == tiny_tokenizer.identity.sha256
    assert copy.encode(MIXED[2]) == tiny_tokenizer.encode(MIXED[2])
    assert load_tokenizer({"path": str(tmp_path / "copy"), "sha256": "ignored"}).special == tiny_tokenizer.special


def test_load_detects_corruption_and_absence(tiny_tokenizer, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer.identity.path, folder)
    lines = (folder / "ranks.tiktoken").read_text().splitlines()
    token, rank = lines[300].split()
    lines[300] = f"{token} {int(rank) + 1}"
    (folder / "ranks.tiktoken").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_json_records_specials_after_bpe(tiny_tokenizer):
    config = json.loads((Path(tiny_tokenizer.identity.path) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = sorted(i for _, i in config["special_tokens"].values())
    assert ids == list(range(ids[0], ids[0] + 7)) and ids[-1] == tiny_tokenizer.n_vocab - 1
    assert config["vocab_size"] == tiny_tokenizer.n_vocab


def test_tokenizer_id_keeps_the_on_disk_form_and_compares_content_only(tiny_tokenizer, tmp_path):
    ident = tiny_tokenizer.identity
    on_disk = {"path": ident.path, "sha256": ident.sha256}
    assert ident.to_json() == on_disk and TokenizerId.from_json(on_disk) == ident
    assert TokenizerId.from_json("gpt2") == TokenizerId() and TokenizerId().to_json() == "gpt2"
    # the same content elsewhere is the same tokenizer; 12 equal hex digits are not
    assert TokenizerId.from_json({"path": str(tmp_path), "sha256": ident.sha256}) == ident
    assert TokenizerId(ident.sha256[:12] + "0" * 52) != ident and TokenizerId() != ident
    assert ident.short() == f"sha256 {ident.sha256[:12]}" and TokenizerId().short() == "gpt2"
    with pytest.raises(FileNotFoundError, match="no recorded path"):
        load_tokenizer(TokenizerId(ident.sha256))
    for junk in (None, 3, {"path": "x"}, "gpt-2"):
        with pytest.raises(ValueError, match="not a tokenizer identity"):
            TokenizerId.from_json(junk)


def test_tokenizer_id_loads_a_matching_copy_first(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "copy")
    assert tiny_tokenizer.identity.load(tmp_path / "copy").identity.path == str(tmp_path / "copy")
    assert tiny_tokenizer.identity.load(tmp_path / "nothing_here").identity.path == tiny_tokenizer.identity.path
    other = train_tokenizer(["另一个分词器。" * 5] * 10, tmp_path / "other", vocab_size=300)
    gone = TokenizerId(tiny_tokenizer.identity.sha256, str(tmp_path / "deleted"))
    with pytest.raises(FileNotFoundError, match="is in none of"):
        gone.load(other.identity.path)  # a tokenizer is there, but not this one


def test_file_sha256_streams(tmp_path, monkeypatch):
    """Checkpoints can be larger than memory allows twice: the hash reads in chunks, never whole."""
    data = bytes(range(256)) * 1000
    (tmp_path / "f.bin").write_bytes(data)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file into memory"))
    assert file_sha256(tmp_path / "f.bin") == file_sha256(tmp_path / "f.bin", chunk=1000) == \
        hashlib.sha256(data).hexdigest()


def test_passage_qa_layout_is_one_function(tiny_tokenizer):
    from tokenizer import passage_qa_prompt

    tok = tiny_tokenizer
    assert passage_qa_prompt(" 北京是首都。\n", " 首都是哪里？ ") == "北京是首都。\n首都是哪里？"
    assert tok.encode_passage_qa("北京是首都。", "首都是哪里？", "北京") == \
        tok.encode_qa("北京是首都。\n首都是哪里？", "北京")
    assert tok.encode_passage_qa("北京是首都。", "首都是哪里？")[-1] == tok.answer


def test_new_tokenizers_split_as_llama_cpp_does_and_old_ones_keep_their_pattern(tmp_path):
    """New tokenizers use llama.cpp's kimi-k2 split (src/unicode.cpp: Han = its CJK blocks, so 〇 is a
    number; a word keeps an English contraction); one trained with the earlier pattern records it in
    its tokenizer.json and loads and encodes with it."""
    import regex

    from tokenizer import HAN_RUNS_PATTERN, KIMI_K2_PATTERN, LLAMA_CPP_PRE_TOKENIZERS

    assert PATTERN == KIMI_K2_PATTERN and LLAMA_CPP_PRE_TOKENIZERS[PATTERN] == "kimi-k2"
    text = "I'm 一九〇〇年"
    assert regex.findall(PATTERN, text) == ["I'm", " ", "一九", "〇〇", "年"]
    assert regex.findall(HAN_RUNS_PATTERN, text) == ["I", "'m", " ", "一九〇〇年"]
    old = train_tokenizer([MIXED[0] * 5, text * 5] * 10, tmp_path / "old", vocab_size=300, pattern=HAN_RUNS_PATTERN)
    assert json.loads((tmp_path / "old" / "tokenizer.json").read_text())["pattern"] == HAN_RUNS_PATTERN
    again = load_tokenizer(tmp_path / "old")
    assert again.enc._pat_str == HAN_RUNS_PATTERN and again.identity == old.identity
    assert again.decode(again.encode(text)) == text
