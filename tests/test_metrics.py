"""Tests for evaluations/metrics.py: every score on hand-computed cases and edge cases.

The expected numbers are worked out in the comments from the CMRC2018 official definitions
(mixed segmentation, longest common substring F1, EM after normalisation, max over gold answers),
BLEU+1 (Lin & Och 2004) and ROUGE-L's longest common subsequence.
"""
import json
import math

import pytest
from rouge_chinese import Rouge

from data_utils import BadLines
from evaluations import metrics as m


def test_mixed_segmentation_splits_cjk_keeps_latin_words_and_digits_and_drops_punctuation():
    text = "Python是一种编程语言，由Guido van Rossum创建于1991年。"
    assert m.mixed_segment(text) == ["python", "是", "一", "种", "编", "程", "语", "言", "由", "guido", "van",
                                     "rossum", "创", "建", "于", "1991", "年"]
    assert m.normalize("  「北京」（Beijing）！  ") == "北京beijing"
    assert m.mixed_segment("《三体》--GPT-2") == ["三", "体", "gpt2"]


def test_exact_match_normalises_case_punctuation_and_takes_the_best_gold():
    assert m.exact_match("Beijing！", ["beijing"]) == 1.0
    assert m.exact_match(" 北京。", ["上海", "北京"]) == 1.0
    assert m.exact_match("北京市", ["北京"]) == 0.0
    assert m.exact_match("", ["北京"]) == 0.0
    assert m.exact_match("", [""]) == 1.0 and m.exact_match("。", [""]) == 1.0  # both empty after normalising


def test_normalisation_is_the_official_cmrc2018_scripts():
    """Cases worked through cmrc2018_evaluate.py's remove_punctuation / mixed_segmentation: only its
    sp_char list goes (lowercased, stripped), so '%', '.', '!' and the left quote stay."""
    assert m.exact_match("50%", ["50"]) == 0.0  # '%' is not in the list (the old normalisation said 1)
    assert m.f1("50%", ["50"]) == pytest.approx(2 / 3)  # nltk splits '%' off: 50/% vs 50, P 1/2, R 1
    assert m.exact_match("《红楼梦》", ["红楼梦"]) == 1.0 and m.exact_match("「北京」", ["“北京”"]) == 1.0
    assert m.exact_match("北京.", ["北京"]) == 0.0 and m.f1("北京.", ["北京"]) == pytest.approx(0.8)
    assert m.exact_match("‘北京’", ["北京"]) == 0.0  # ’ is in the list, ‘ is not
    assert m.exact_match("北京……", ["北京"]) == 0.0  # the list's '……' is two characters: never one
    assert m.exact_match("1,000", ["1000"]) == 0.0 and m.mixed_segment("1,000米") == ["1,000", "米"]
    assert m.exact_match("New  York", ["new york"]) == 0.0  # EM keeps inner spaces
    assert m.f1("New  York", ["new york"]) == 1.0  # F1's words do not
    assert m.normalize(" A-B_C*D^E/F\\G~H`I+J=K ") == "abcdefghijk"
    dropped = "".join(ch for ch in m.CMRC_PUNCTUATION if len(ch) == 1)
    assert dropped == "-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』"


def test_f1_is_the_cmrc2018_longest_common_substring_f1():
    # pred 北/京/市 (3 tokens), gold 北/京 (2): LCS 2, P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert m.f1("北京市", ["北京"]) == pytest.approx(0.8)
    # a common *substring*, not subsequence: 北/a/京 vs 北/京 share runs of 1, P = 1/3, R = 1/2, F1 = 0.4
    assert m.f1("北a京", ["北京"]) == pytest.approx(0.4)
    # English words count as one token each: guido/van/rossum/创/建 vs guido/van/rossum:
    # LCS 3, P = 3/5, R = 1, F1 = 1.2 / 1.6 = 0.75 (case and punctuation ignored)
    assert m.f1("Guido van Rossum创建。", ["guido van rossum"]) == pytest.approx(0.75)
    # digits stay one word: 约/4/分/钟/内 vs 4/分/钟: LCS 3, P = 3/5, R = 1, F1 = 0.75
    assert m.f1("约4分钟内", ["4分钟"]) == pytest.approx(0.75)
    # best over gold answers: vs 上海 -> 0; vs 北京市 (P = 1, R = 2/3) -> 0.8
    assert m.f1("北京", ["上海", "北京市"]) == pytest.approx(0.8)
    assert m.f1("北京", ["北京"]) == 1.0


def test_empty_texts_score_one_only_against_empty():
    for metric in (m.f1, m.sub_exact_match, m.bleu4, m.rouge_l):
        assert metric("", ["北京"]) == 0.0
        assert metric("北京", ["，"]) == 0.0  # a gold answer of punctuation only is empty
        assert metric("", [""]) == 1.0


def test_answers_must_be_a_non_empty_list():
    with pytest.raises(TypeError, match="list of gold answers"):
        m.f1("北京", "北京")  # a string would be scored character by character
    with pytest.raises(ValueError, match="at least one gold answer"):
        m.exact_match("北京", [])


def test_sub_exact_match_finds_the_gold_answer_inside_a_longer_prediction():
    assert m.sub_exact_match("答案是：北京。", ["北京"]) == 1.0
    assert m.sub_exact_match("The answer is GPT-2.", ["gpt2"]) == 1.0
    assert m.sub_exact_match("北京", ["北京市"]) == 0.0
    assert m.sub_exact_match("答案是北京", ["上海", "北京"]) == 1.0


def test_rouge_chinese_needs_segmented_text():
    pred, gold = "北京是首都", "北京是中国的首都"
    # the pitfall: rouge-chinese splits on spaces, so raw Chinese is one token per sentence -> 0
    assert Rouge().get_scores(pred, gold)[0]["rouge-l"]["f"] == 0.0
    # segmented by character: LCS(北京是首都, 北京是中国的首都) = 5, P = 5/5, R = 5/8,
    # F = 2PR/(P+R) = 1.25 / 1.625 = 0.76923
    assert m.rouge_l(pred, [gold]) == pytest.approx(10 / 13, abs=1e-6)
    assert m.rouge_l("北京", ["上海", "北京"]) == pytest.approx(1.0)
    # ROUGE-L uses a subsequence (unlike F1's substring): 北/a/京 vs 北/京: LCS 2, P = 2/3, R = 1 -> 0.8
    assert m.rouge_l("北a京", ["北京"]) == pytest.approx(0.8, abs=1e-6)


def test_rouge_l_with_jieba_segments_words():
    assert m.segment("北京是中国的首都", "jieba") == ["北京", "是", "中国", "的", "首都"]
    # words 北京/是/首都 vs 北京/是/中国/的/首都: LCS 3, P = 1, R = 3/5, F = 1.2 / 1.6 = 0.75
    assert m.rouge_l("北京是首都", ["北京是中国的首都"], how="jieba") == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(ValueError, match="segmentation"):
        m.segment("北京", "words")


def test_bleu4_with_add_one_smoothing_on_hand_cases():
    # abcd vs abce: p1 = 3/4; smoothed p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1); BP = 1
    assert m.bleu4("abcd", ["abce"]) == pytest.approx((3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # 北京市 vs 北京: p1 = 2/3, p2 = (1+1)/(2+1), p3 = (0+1)/(1+1), p4 = (0+1)/(0+1); c = 3 > r = 2, BP = 1
    assert m.bleu4("北京市", ["北京"]) == pytest.approx((2 / 9) ** 0.25)
    # 北京 vs 北京市: every smoothed precision is 1, BP = exp(1 - 3/2)
    assert m.bleu4("北京", ["北京市"]) == pytest.approx(math.exp(-0.5))
    # several references: clipped counts from any of them, the closest length (2, not 5) for BP
    assert m.bleu4("北京", ["长江黄河山", "北京"]) == pytest.approx(1.0)
    assert m.bleu4("上海", ["北京"]) == 0.0  # no unigram matches
    assert m.bleu4("Beijing！", ["beijing"]) == pytest.approx(1.0)  # case and punctuation normalised


def test_score_qa_and_means_in_percent():
    scores = m.score_qa("北京市", ["北京"])
    assert scores["em"] == 0.0 and scores["subem"] == 1.0 and scores["f1"] == pytest.approx(0.8)
    rows = [{"f1": 1.0}, {"f1": 0.5}]
    assert m.mean_percent(rows, ["f1"]) == {"f1": 75.0}


def test_load_qa_reads_generated_jsonl_with_per_article_ids_and_counts_bad_lines(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [{"question": "北京是什么？", "answer": "首都", "id": "12", "title": "北京"},
             {"question": "北京在哪里？", "answer": "华北", "id": "12"},
             {"question": "长江多长？", "answers": ["6300公里", "约6300公里"], "context": "长江全长约6300公里。"},
             {"question": "没有答案？"}]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{broken\n", encoding="utf-8")
    bad = BadLines()
    qa = m.load_qa(path, bad)
    assert [q["id"] for q in qa] == ["12-0", "12-1", "qa.jsonl:3-0"]
    assert qa[2]["answers"] == ["6300公里", "约6300公里"] and qa[2]["context"] == "长江全长约6300公里。"
    assert qa[0]["context"] is None
    assert bad.count == 2


def test_load_qa_reads_squad_json_with_several_answers(tmp_path):
    squad = {"version": "v1", "data": [{"title": "长江", "paragraphs": [{"context": "长江全长约6300公里。", "qas": [
        {"id": "q1", "question": "长江多长？", "answers": [{"text": "6300公里", "answer_start": 5},
                                                        {"text": "约6300公里", "answer_start": 4}]},
        {"id": "q2", "question": "没有答案？", "answers": []}]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    bad = BadLines()
    assert m.load_qa(path, bad) == [{"id": "q1", "article": "长江", "question": "长江多长？",
                                     "answers": ["6300公里", "约6300公里"], "answer_start": 5,
                                     "context": "长江全长约6300公里。"}]
    assert bad.count == 1
    path.write_text('{"data": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match="SQuAD-style"):
        m.load_qa(path)


def test_real_cmrc2018_and_drcd_files_load(qa_dir):
    for name in ("cmrc2018_trial.json", "drcd_dev.zh-hans.json"):
        qa = m.load_qa(qa_dir / name)
        assert len(qa) > 500 and all(q["answers"] and q["context"] for q in qa)
        assert len({q["id"] for q in qa}) == len(qa)
