"""evaluations/baselines.py: the no-model rules every reading score is shown beside, on hand cases and
through the command line."""
import json

import pytest

from evaluations import baselines
from evaluations.metrics import f1

PASSAGE = "长江是中国第一长河。长江全长约6300公里，流经十一个省级行政区。长江最后注入东海。"


def test_each_rule_answers_as_named():
    answers = baselines.rule_answers(PASSAGE, "长江全长多少公里？")
    assert answers == {"first_sentence": "长江是中国第一长河。",
                       "best_overlap": "长江全长约6300公里，流经十一个省级行政区。",
                       "copy_question": "长江全长多少公里？"}
    assert baselines.rule_answers("", "问题？")["first_sentence"] == ""
    assert baselines.rule_answers(None, "问题？")["best_overlap"] == ""


def test_scores_are_the_metrics_means_and_closed_book_has_only_copy_question():
    questions = [{"question": "长江全长多少公里？", "answers": ["约6300公里"]},
                 {"question": "长江注入哪里？", "answers": ["东海"]}]
    scores = baselines.score_rules(questions, [PASSAGE, PASSAGE])
    best = [baselines.rule_answers(PASSAGE, q["question"])["best_overlap"] for q in questions]
    assert scores["best_overlap"]["f1"] == pytest.approx(50 * (f1(best[0], ["约6300公里"]) + f1(best[1], ["东海"])))
    assert scores["first_sentence"]["f1"] == 0.0 and scores["copy_question"]["em"] == 0.0
    assert set(baselines.score_rules(questions, [None, None])) == {"copy_question"}
    assert "rule: best_overlap" in baselines.format_rules(scores, {"em": 1.0, "f1": 2.0})


def test_command_line_on_qa_jsonl(tmp_path, capsys):
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "长江注入哪里？", "answer": "东海", "context": PASSAGE},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    scores = baselines.main(["--input", str(path), "--output", str(tmp_path / "rules.json")])
    assert json.loads((tmp_path / "rules.json").read_text())["rules"] == scores
    assert "rule: first_sentence" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no question with a passage"):
        path.write_text(json.dumps({"question": "长江注入哪里？", "answer": "东海"}, ensure_ascii=False) + "\n")
        baselines.main(["--input", str(path)])
