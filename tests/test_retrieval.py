"""retrieval.py: passages, BM25 search on a small built corpus, malformed input, save/load, recall, RAG prompts."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, WIKI_ARTICLES

import retrieval
from retrieval import (
    Index,
    PromptTooLong,
    analyze,
    build_index,
    chunk_passages,
    fit_passage,
    rag_prompt,
    recall_at_k,
)

ARTICLES = WIKI_ARTICLES


def write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b"\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    write_jsonl(tmp_path / "wiki" / "a.jsonl", ARTICLES)
    return tmp_path / "wiki"


@pytest.mark.parametrize("analyzer", retrieval.ANALYZERS)
def test_search_finds_the_right_passage(corpus, tmp_path, analyzer):
    meta, bad = build_index([corpus], tmp_path / "index", analyzer=analyzer, quiet=True)
    assert meta["passages"] == 4 and meta["articles"] == 4 and bad.count == 0
    index = Index(tmp_path / "index")
    for question, title in [("紫禁城位于哪里？", "故宫"), ("母亲河是哪条河？", "黄河"),
                            ("长江全长多少公里", "长江"), ("who created python", "Python")]:
        hits = index.search(question, k=2)
        assert hits[0]["title"] == title, (question, hits)
        assert hits[0]["score"] >= hits[-1]["score"] > 0
        assert set(hits[0]) >= {"score", "title", "article_id", "text"}
    top = index.search("唐古拉山脉", k=5)
    assert top[0]["article_id"] == "1" and "唐古拉山脉" in top[0]["text"]
    assert index.search("量子色动力学", k=3) == []  # no shared term: nothing, not arbitrary passages
    assert index.search("，。？！", k=3) == [] and index.search("", k=3) == []  # no term at all
    assert index.term_ids_of(["故宫", "不存在的词"]) == index.term_ids_of(["故宫"]) != []


def test_search_limits(corpus, tmp_path):
    build_index([corpus], tmp_path / "index", quiet=True)
    index = Index(tmp_path / "index")
    assert len(index.search("中国", k=1000)) <= 4
    for bad_k in (0, -1, retrieval.MAX_K + 1):
        with pytest.raises(ValueError):
            index.search("中国", k=bad_k)
    with pytest.raises(ValueError):
        index.search("长" * (retrieval.MAX_QUERY_CHARS + 1))


def test_save_load_round_trip(corpus, tmp_path):
    meta, _ = build_index([corpus], tmp_path / "index", quiet=True)
    index = Index(tmp_path / "index")
    assert len(index) == meta["passages"]
    texts = [index.passage(i)["text"] for i in range(len(index))]
    assert texts[0].startswith("长江是中国第一长河") and texts[3].startswith("Python是")
    before = index.search("皇家宫殿", k=3)
    index.close()
    again = Index(tmp_path / "index").search("皇家宫殿", k=3)
    assert again == before and before[0]["title"] == "故宫"


def test_rebuild_is_atomic_and_failure_keeps_the_old_index(corpus, tmp_path):
    out = tmp_path / "index"
    build_index([corpus], out, quiet=True)
    empty = write_jsonl(tmp_path / "empty" / "e.jsonl", [b"not json"])
    with pytest.raises(ValueError, match="no usable article"):
        build_index([empty.parent], out, quiet=True)
    assert Index(out).search("紫禁城", k=1)[0]["title"] == "故宫"  # the old index is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "index", "wiki"]  # no temporary left
    write_jsonl(corpus / "b.jsonl", [{"id": "5", "title": "泰山", "text": "泰山\n\n泰山位于山东省泰安市。"}])
    build_index([corpus], out, quiet=True)
    assert Index(out).search("泰安", k=1)[0]["title"] == "泰山"


def test_malformed_lines_are_counted_not_fatal(tmp_path, capsys):
    lines = ARTICLES[:2] + [
        b"{not json",
        b"\xff\xfe bad utf-8",
        b'{"id": "9", "title": "x"}',  # no text
        b'{"id": "8", "title": "s", "text": "s\\n\\n\\ud800\\u5b57\\u3002"}',  # lone surrogate
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested too deeply
        b"[1, 2]",
        b"",
        b'{"id": "7", "title": "stub", "text": "stub\\n\\n"}',  # nothing left after cleaning: empty, not malformed
    ]
    folder = write_jsonl(tmp_path / "wiki" / "a.jsonl", lines).parent
    assert retrieval.main(["--input", str(folder), "--out", str(tmp_path / "index"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipped 6 malformed lines" in out
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["malformed"] == 6 and meta["articles"] == 2 and meta["empty_articles"] == 1
    reasons = " ".join(meta["bad_lines"])
    for why in ("invalid JSON", "invalid UTF-8", "no string field 'text'", "lone surrogate"):
        assert why in reasons
    assert Index(tmp_path / "index").search("母亲河", k=1)[0]["title"] == "黄河"


def test_nested_too_deeply_is_reported(tmp_path):
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    folder = write_jsonl(tmp_path / "wiki" / "a.jsonl", ARTICLES[:1] + [deep]).parent
    meta, bad = build_index([folder], tmp_path / "index", quiet=True)
    assert meta["malformed"] == 1 and bad.examples == [f"{folder / 'a.jsonl'}:2: JSON nested too deeply"]


def test_main_errors_are_exit_codes(tmp_path, capsys):
    assert retrieval.main(["--index", str(tmp_path / "nothing"), "--query", "长江"]) == 1
    assert "no index at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        retrieval.main([])


def test_analyzers():
    assert analyze("长江ABC 12年", "bigram") == ["长", "江", "长江", "abc", "12", "年"]
    assert "长江" in analyze("长江是中国第一长河", "jieba")
    assert all(t.strip("，。？ ") for t in analyze("你好，世界。 ？", "jieba"))
    with pytest.raises(ValueError):
        analyze("x", "words")


def test_chunk_passages_cut_at_sentence_ends():
    body = "第一句话。第二句话！\n第三句话？" + "长" * 25 + "。"
    passages = chunk_passages(body, passage_chars=12)
    assert passages[:2] == ["第一句话。第二句话！", "第三句话？"]
    assert all(len(p) <= 12 for p in passages)
    assert "".join(passages) == body.replace("\n", "")  # nothing lost
    with pytest.raises(ValueError):
        chunk_passages(body, 0)


# ----------------------------------------------------------------------------- recall


def test_recall_at_k():
    hits = [[{"text": "长江全长约6300公里", "title": "长江", "article_id": "1"}, {"text": "黄河", "title": "黄河"}],
            [{"text": "无关", "title": "x"}, {"text": "故宫又称紫禁城", "title": "故宫"}],
            []]
    golds = [["6300公里"], ["紫禁城"], ["任何"]]
    assert recall_at_k(hits, golds, 1) == pytest.approx(1 / 3)
    assert recall_at_k(hits, golds, 2) == pytest.approx(2 / 3)  # the empty hit list is a miss
    assert recall_at_k(hits, golds, 100) == pytest.approx(2 / 3)


def test_recall_several_gold_answers_and_gold_passages():
    hits = [[{"text": "故宫又称紫禁城", "title": "故宫", "article_id": "3"}]]
    assert recall_at_k(hits, [["不在", "紫禁城"]], 1) == 1.0  # any gold answer will do
    assert recall_at_k(hits, [["不在", "也不在"]], 1) == 0.0
    assert recall_at_k(hits, [{"answers": ["不在"], "article_ids": ["3"]}], 1) == 1.0
    assert recall_at_k(hits, [{"titles": ["故宫"]}], 1) == 1.0
    assert recall_at_k(hits, [{"titles": ["长江"], "article_ids": ["1"]}], 1) == 0.0
    assert recall_at_k([["紫禁城在北京"]], [["紫禁城"]], 1) == 1.0  # plain passage strings


def test_recall_empty_answers_never_match():
    hits = [[{"text": "anything at all", "title": ""}]]
    assert recall_at_k(hits, [[""]], 1) == 0.0
    assert recall_at_k(hits, [["  "]], 1) == 0.0
    assert recall_at_k(hits, [[]], 1) == 0.0
    assert recall_at_k(hits, [{"titles": [""]}], 1) == 0.0
    with pytest.raises(ValueError):
        recall_at_k([], [], 1)
    with pytest.raises(ValueError):
        recall_at_k(hits, [["a"]], 0)
    with pytest.raises(ValueError):
        recall_at_k(hits, [["a"], ["b"]], 1)
    with pytest.raises(TypeError):
        recall_at_k(hits, ["anything"], 1)


# ----------------------------------------------------------------------------- RAG prompt


def hit(title, text, article_id="0"):
    return {"title": title, "text": text, "article_id": article_id}


def test_rag_prompt_layout_is_the_sft_context_layout(tiny_tokenizer):
    hits = [hit("长江", "长江全长约6300公里。", "1"), hit("黄河", "黄河是母亲河。", "2")]
    ids, sources = rag_prompt(tiny_tokenizer, "长江多长？", hits, block_size=512, max_new_tokens=32)
    expected = tiny_tokenizer.encode_passage_qa("长江：长江全长约6300公里。\n黄河：黄河是母亲河。", "长江多长？")
    assert ids == expected and ids[-1] == tiny_tokenizer.answer
    assert [s["title"] for s in sources] == ["长江", "黄河"] and not any(s["cut"] for s in sources)
    assert [s["article_id"] for s in sources] == ["1", "2"]
    assert [s["text"] for s in sources] == ["长江：长江全长约6300公里。", "黄河：黄河是母亲河。"]  # what the model read


def test_rag_prompt_always_fits(tiny_tokenizer):
    tok = tiny_tokenizer
    rng = random.Random(0)
    pool = "北京是中华人民共和国的首都，位于华北平原北部。上海是中国最大的城市之一。Python 1991年。"
    seen_cut = seen_none = 0
    for trial in range(150):
        hits = [hit(f"标题{i}", "".join(rng.choice(pool) for _ in range(rng.randint(1, 300))), str(i))
                for i in range(rng.randint(0, 6))]
        question = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        block_size = rng.randint(8, 400)
        max_new_tokens = rng.randint(0, block_size - 1)
        try:
            ids, sources = rag_prompt(tok, question, hits, block_size, max_new_tokens)
        except PromptTooLong:
            assert len(tok.encode_qa(question.strip())) > block_size - max_new_tokens
            continue
        assert len(ids) <= block_size - max_new_tokens, trial
        assert ids[-1] == tok.answer
        assert [s["title"] for s in sources] == [h["title"] for h in hits[:len(sources)]]  # rank order
        assert all(not s["cut"] for s in sources[:-1])
        parts = [retrieval.format_passage(h) for h in hits[:len(sources)]]
        if sources and sources[-1]["cut"]:  # cut at the last character that fits
            parts[-1] = parts[-1][:sources[-1]["chars"] + 1]
            assert len(tok.encode_passage_qa("\n".join(parts), question)) > block_size - max_new_tokens
            seen_cut += 1
        elif len(sources) < len(hits):  # the next passage had no room for min_chars
            parts.append(retrieval.format_passage(hits[len(sources)])[:16])
            assert len(tok.encode_passage_qa("\n".join(parts), question)) > block_size - max_new_tokens
            seen_cut += 1
        seen_none += not sources
    assert seen_cut > 20 and seen_none > 5  # the trials covered cutting and no room at all


def test_rag_prompt_cuts_the_last_passage_to_fill_the_window(tiny_tokenizer):
    tok = tiny_tokenizer
    long_text = "长江是中国第一长河。" * 40
    hits = [hit("黄河", "黄河是母亲河。"), hit("长江", long_text), hit("故宫", "故宫位于北京。")]
    budget = 120
    ids, sources = rag_prompt(tok, "长江多长？", hits, block_size=budget + 10, max_new_tokens=10)
    assert [(s["title"], s["cut"]) for s in sources] == [("黄河", False), ("长江", True)]
    assert sources[1]["text"] == retrieval.format_passage(hits[1])[:sources[1]["chars"]]
    assert budget - 3 <= len(ids) <= budget  # filled up to the character that no longer fits
    text = tok.decode(ids)
    assert text.startswith("黄河：黄河是母亲河。\n长江：长江是中国") and "故宫" not in text


def test_rag_prompt_rejects_what_cannot_fit(tiny_tokenizer):
    with pytest.raises(PromptTooLong):
        rag_prompt(tiny_tokenizer, "长江" * 100, [], block_size=20, max_new_tokens=5)
    with pytest.raises(ValueError):
        rag_prompt(tiny_tokenizer, "长江", [], block_size=10, max_new_tokens=10)
    ids, sources = rag_prompt(tiny_tokenizer, "长江？", [hit("长江", "长江很长。" * 50)],
                              block_size=12, max_new_tokens=2)
    assert sources == [] and ids == tiny_tokenizer.encode_qa("长江？")  # no room: the question alone


FILLER = ["黄河是中国第二长河，流经九个省区。", "故宫位于北京市中心，是明清两代的皇家宫殿。",
          "上海是中国最大的城市之一。", "泰山是五岳之首，位于山东省。", "西湖位于浙江省杭州市西部。",
          "敦煌莫高窟始建于十六国的前秦时期。"]


def test_fit_passage_keeps_the_sentences_that_match_the_question(tiny_tokenizer):
    tok = tiny_tokenizer
    rng = random.Random(1)
    key = "长江发源于青藏高原的唐古拉山脉，全长约6300公里。"
    question = "长江全长多少公里？"
    grown = 0
    for trial in range(40):
        sentences = [rng.choice(FILLER) for _ in range(rng.randint(0, 12))]
        at = len(sentences)
        sentences += [key] + [rng.choice(FILLER) for _ in range(rng.randint(0, 12))]
        passage = "".join(sentences)
        budget = rng.randint(len(tok.encode_passage_qa(key, question)), 200)
        text, cut = fit_passage(tok, passage, question, budget)
        assert len(tok.encode_passage_qa(text, question)) <= budget, trial
        assert cut == (text != passage)
        # a run of whole sentences around the matching one, that grew while it could on either side
        runs = [(lo, hi) for lo in range(at + 1) for hi in range(at + 1, len(sentences) + 1)
                if "".join(sentences[lo:hi]) == text]
        assert runs, trial
        lo, hi = runs[0]
        for wider in (sentences[lo - 1:hi] if lo > 0 else None, sentences[lo:hi + 1] if hi < len(sentences) else None):
            assert wider is None or len(tok.encode_passage_qa("".join(wider), question)) > budget, trial
        grown += hi - lo > 1
    assert grown > 10  # the trials covered windows of several sentences


def test_fit_passage_whole_short_and_too_long(tiny_tokenizer):
    tok = tiny_tokenizer
    assert fit_passage(tok, "长江很长。", "长江多长？", 100) == ("长江很长。", False)
    long_sentence = "长江" + "很" * 400 + "长。"
    text, cut = fit_passage(tok, "黄河是母亲河。" + long_sentence, "长江多长？", 40)
    assert cut and long_sentence.startswith(text) and len(tok.encode_passage_qa(text, "长江多长？")) <= 40
    assert len(tok.encode_passage_qa(long_sentence[:len(text) + 1], "长江多长？")) > 40  # the longest prefix
    with pytest.raises(PromptTooLong):
        fit_passage(tok, "长江很长。" * 50, "长江" * 100, 30)


def test_a_build_killed_mid_way_leaves_temporaries_the_next_build_removes(corpus, tmp_path):
    """kill -9 of a real `retrieval.py` build: its `.index.tmpPID` stays behind; the next build
    removes it and the `.index.oldPID` of a dead build, keeps those of a live pid and other names."""
    big = write_jsonl(tmp_path / "big" / "a.jsonl", [{"id": str(i), "title": f"条目{i}", "text": f"条目{i}\n\n"
                      + "".join(random.Random(i).sample("长江黄河故宫泰山北京上海山东河流城市历史", 12)) * 8}
                                                     for i in range(20000)])
    out = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, str(ROOT / "retrieval.py"), "--input", str(big), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / f".index.tmp{proc.pid}"
    deadline = time.monotonic() + 60
    while not (killed / "passages.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed.is_dir()  # what the kill left
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".index.old{dead.pid}", f".index.tmp{live.pid}", f".index.old{live.pid}",
                     f".other.tmp{dead.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "meta.json").write_text("{}")
        build_index([corpus], out, quiet=True)
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    finally:
        live.kill()
        live.wait()
    assert left == sorted([f".index.old{live.pid}", f".index.tmp{live.pid}", f".other.tmp{dead.pid}"])
    assert Index(out).search("紫禁城", k=1)[0]["title"] == "故宫"
