"""pipeline.py's reading stages on tiny data: DRCD-style paragraphs join the index, each run is
evaluated closed-book, with the passage and with RAG through the stage commands the pipeline runs
(real subprocesses), and the report's Reading table shows what those evaluations wrote."""
import json

import pytest
from conftest import WIKI_ARTICLES

import pipeline
from data_utils import load_qa
from evaluations import baselines, report
from inference import load_run
from retrieval import Index, build_index, fit_passage

SQUAD = {"version": "tiny", "data": [{"title": "天坛", "paragraphs": [
    {"context": "天坛位于北京市东城区，是明清两代皇帝祭天的场所。", "qas": [
        {"id": "t1", "question": "天坛是做什么的场所？", "answers": [{"text": "祭天", "answer_start": 17}]},
        {"id": "t2", "question": "天坛在哪个区？", "answers": [{"text": "东城区", "answer_start": 5}]}]},
    {"context": "天坛位于北京市东城区，是明清两代皇帝祭天的场所。", "qas": [  # the same paragraph again
        {"id": "t3", "question": "谁在天坛祭天？", "answers": [{"text": "明清两代皇帝", "answer_start": 11}]}]}]}]}


def test_squad_passages_become_indexable_articles(tmp_path):
    src = tmp_path / "drcd_test.json"
    src.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    assert pipeline.squad_passages(src, tmp_path / "passages.jsonl") == 1  # distinct paragraphs only
    (line,) = (tmp_path / "passages.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line) == {"id": "drcd_test:0", "title": "天坛",
                                "text": "天坛\n\n" + SQUAD["data"][0]["paragraphs"][0]["context"]}
    build_index([tmp_path / "passages.jsonl"], tmp_path / "index", quiet=True)
    (hit,) = Index(tmp_path / "index").search("祭天", 3)
    assert hit["title"] == "天坛" and hit["text"] == SQUAD["data"][0]["paragraphs"][0]["context"]  # no title line


def test_with_passage_keeps_the_held_out_generated_pairs_that_show_one(tmp_path):
    lines = [{"id": "1", "question": "长江多长？", "answer": "6300公里", "context": "长江全长约6300公里。"},
             {"id": "2", "question": "黄河是什么？", "answer": "母亲河"},  # closed-book in SFT: no passage
             {"id": "3", "question": "故宫在哪？", "answer": "北京", "context": "  "},
             {"id": "4", "question": "天坛在哪个区？", "answer": "东城区", "source": "squad",  # human-written
              "context": "天坛位于北京市东城区。"}]
    src = tmp_path / "val.jsonl"
    src.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines) + "{broken\n", encoding="utf-8")
    assert pipeline.with_passage(src, tmp_path / "kept.jsonl") == 1
    assert [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text(encoding="utf-8").splitlines()] == lines[:1]


@pytest.mark.slow
def test_reading_stages_write_what_the_report_tables(tmp_path, tiny_run):
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "a.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in WIKI_ARTICLES),
                                  encoding="utf-8")
    drcd = tmp_path / "drcd_test.json"
    drcd.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    pipeline.squad_passages(drcd, tmp_path / "drcd_passages.jsonl")
    build_index([wiki, tmp_path / "drcd_passages.jsonl"], tmp_path / "index", quiet=True)
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join(json.dumps({"id": a["id"], "question": q, "answer": ans, "context": a["text"]},
                                           ensure_ascii=False) + "\n"
                                for a, q, ans in zip(WIKI_ARTICLES[:2], ["长江多长？", "黄河被称为什么？"],
                                                     ["约6300公里", "中华民族的母亲河"])), encoding="utf-8")

    ways = ("", "_context", "_rag", "_context_span", "_rag_span")
    stages = pipeline.reading_evals(tiny_run, {"qa": (held_out, 2, 4), "drcd": (drcd, 3, 4)}, tmp_path / "index",
                                    rag_k=2)
    assert [name for name, _ in stages] == [f"eval_{s}{w}_run" for s in ("qa", "drcd") for w in ways]
    for name, cmd in stages:
        assert cmd[cmd.index("--max_new_tokens") + 1] == 4
        pipeline.run(name, [*cmd, "--device", "cpu"], state_dir=tmp_path / "state")
    assert len(list((tmp_path / "state").glob("*.done"))) == 10  # a re-run would skip them all
    drcd_rag = json.loads((tiny_run / "eval_drcd_rag.json").read_text())
    assert drcd_rag["metrics"]["recall_at_1"] == 100.0  # every DRCD answer is in its indexed paragraph
    assert drcd_rag["settings"]["index_inputs"] == [str(wiki), str(tmp_path / "drcd_passages.jsonl")]

    report.main([str(tiny_run), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    table = md.split("## Reading")[1].split("\n\n")[2].splitlines()
    assert table[0].startswith("| run | questions | closed-book EM | closed-book F1 | with passage EM |")
    cells_of = [line.split(" | ") for line in table[2:]]
    rows = {cells[1]: cells for cells in cells_of if not cells[0].startswith("| rule: ")}
    assert set(rows) == {"qa", "drcd"}
    # under the models, the no-model rules on the same questions and passages (evaluations/baselines.py)
    rules = {(cells[0][len("| rule: "):], cells[1]): cells for cells in cells_of if cells[0].startswith("| rule: ")}
    assert set(rules) == {(r, s) for r in baselines.RULES for s in ("qa", "drcd")}
    questions, tok = load_qa(drcd), load_run(tiny_run).tok
    budget = load_run(tiny_run).model.config.block_size - 4  # the passages as qa_eval.py showed them
    expected = baselines.score_rules(questions, [fit_passage(tok, q["context"], q["question"], budget)[0]
                                                 for q in questions])
    for rule in baselines.RULES:
        assert rules[rule, "drcd"][4:6] == [report._cell(expected[rule][k]) for k in ("em", "f1")]
    assert rules["copy_question", "drcd"][2] != "–" and rules["best_overlap", "drcd"][2] == "–"  # closed-book
    for name, cells in rows.items():
        measured = [json.loads((tiny_run / f"eval_{name}{w}.json").read_text())["metrics"] for w in ways]
        assert cells[2:12] == [report._cell(m[k]) for m in measured for k in ("em", "f1")]
        assert cells[12:14] == [report._cell(measured[2]["recall_at_1"]), report._cell(measured[2]["recall_at_5"])]
        assert measured[3]["n"] == measured[1]["n"] and measured[4]["recall_at_5"] == measured[2]["recall_at_5"]
    assert rows["drcd"][14] == "`wiki`, `drcd_passages.jsonl` |"
    assert table[1].count("|") == table[0].count("|")  # the separator row has a cell per column
