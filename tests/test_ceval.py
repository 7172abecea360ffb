"""evaluations/ceval.py on tiny C-Eval and CMMLU folders in the official layouts, written here: the
letter log-likelihoods and accuracy equal lm-eval's own (`--model hf` on the export, same prompt), the
baselines are printed beside the model, and malformed folders give one-line errors."""
import csv
import json
from collections import Counter

import pytest
import torch

from evaluations import ceval
from export import export_hf
from inference import load_run

QUESTIONS = [  # question, A, B, C, D, answer
    ("下列哪个是中国的首都？", "上海", "北京", "广州", "深圳", "B"),
    ("长江全长约多少公里？", "6300", "5464", "4000", "1000", "A"),
    ("故宫位于哪座城市？", "南京", "西安", "北京", "杭州", "C"),
    ("Python 由谁创建？", "Guido van Rossum", "Linus", "Dennis", "Ken", "A"),
    ("黄河被称为什么？", "母亲河", "父亲河", "长河", "大河", "A"),
    ("1991 年发布的编程语言是", "C", "Python", "Go", "Rust", "B"),
    ("华北平原位于中国的", "南部", "西部", "北部", "东北", "C"),
]
DEV = [("一加一等于几？", "1", "2", "3", "4", "B", "一加一等于二。")] * 5


def write_ceval(folder, subject="computer_network"):
    """ceval-exam.zip's layout: {dev,val,test}/{subject}_{split}.csv; test has no answers."""
    for split, rows, header in (("dev", DEV, ["id", "question", "A", "B", "C", "D", "answer", "explanation"]),
                                ("val", QUESTIONS, ["id", "question", "A", "B", "C", "D", "answer"]),
                                ("test", [q[:5] for q in QUESTIONS], ["id", "question", "A", "B", "C", "D"])):
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([i, *row] for i, row in enumerate(rows))
    return folder


def write_cmmlu(folder, subject="agronomy"):
    """CMMLU's layout: {dev,test}/{subject}.csv with an unnamed index column and capitalised names."""
    for split, rows in (("dev", [d[:6] for d in DEV]), ("test", QUESTIONS)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / f"{subject}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            w.writerows([i, *row] for i, row in enumerate(rows))
    return folder


@pytest.fixture
def ceval_dir(tmp_path):
    return write_ceval(tmp_path / "ceval-exam")


def test_ceval_prints_model_chance_and_most_frequent_letter(tiny_run, ceval_dir, capsys, one_thread):
    result = ceval.main(["--out_dir", str(tiny_run), "--data", str(ceval_dir), "--device", "cpu"])
    printed = capsys.readouterr().out
    letter, count = Counter(q[5] for q in QUESTIONS).most_common(1)[0]
    assert result["n"] == len(QUESTIONS) and result["baseline_letter"] == letter
    assert result["baseline_acc"] == count / len(QUESTIONS) and result["chance"] == 0.25
    assert "ceval val, 0-shot" in printed and f"baseline_always_{letter}" in printed and "chance" in printed
    saved = json.loads((tiny_run / "eval_ceval.json").read_text())
    assert saved["metrics"]["acc"] == result["acc"] and saved["metrics"]["per_subject"]["computer_network"]["n"] == 7


def _lm_eval_task(folder, name, benchmark, subject, files):
    """A YAML task with lm-eval's ceval/cmmlu prompt over our CSVs (lm-eval's own tasks download them).
    The `datasets` CSV loader wants one set of columns in all files, so C-Eval's dev split (with its
    explanation column) is scored 0-shot only."""
    question, answer = ("question", "answer") if benchmark == "ceval" else ("Question", "Answer")
    config = {
        "task": name, "dataset_path": "csv", "dataset_kwargs": {"data_files": files},
        "test_split": "eval", **({"fewshot_split": "dev"} if "dev" in files else {}),
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice", "description": ceval.lm_eval_description(benchmark, subject),
        "doc_to_text": f"{{{{{question}.strip()}}}}\nA. {{{{A}}}}\nB. {{{{B}}}}\nC. {{{{C}}}}\nD. {{{{D}}}}\n答案：",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": f"{{{{['A', 'B', 'C', 'D'].index({answer})}}}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("suite,fewshot", [("ceval", 0), ("cmmlu", 2)])  # not "benchmark": pytest-benchmark's
def test_scores_equal_lm_evals_hf_model_on_the_export(suite, fewshot, tiny_run, tmp_path, one_thread):
    import lm_eval
    from lm_eval.tasks import TaskManager

    if suite == "ceval":
        data, subject = write_ceval(tmp_path / "data"), "computer_network"
        files = {"eval": str(data / "val" / f"{subject}_val.csv")}
    else:
        data, subject = write_cmmlu(tmp_path / "data"), "agronomy"
        files = {"eval": str(data / "test" / f"{subject}.csv"), "dev": str(data / "dev" / f"{subject}.csv")}
    assert ceval.lm_eval_description(suite, subject)  # lm-eval's own description line is used
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _lm_eval_task(tasks, f"tiny_{suite}", suite, subject, files)
    export_hf(tiny_run, tmp_path / "hf")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                  tasks=[f"tiny_{suite}"], num_fewshot=fewshot, batch_size=1, device="cpu",
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    samples = sorted(out["samples"][f"tiny_{suite}"], key=lambda s: s["doc_id"])
    theirs = [[resp[0][0] for resp in s["resps"]] for s in samples]

    run = load_run(tiny_run)
    questions = ceval.read_questions(files["eval"])
    shots = ceval.read_questions(files["dev"])[:fewshot] if fewshot else []
    predicted, ours = ceval.score_subject(run, questions, shots, ceval.lm_eval_description(suite, subject), 4)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=0)
    acc = sum(p == q["answer"] for p, q in zip(predicted, questions)) / len(questions)
    assert acc == pytest.approx(out["results"][f"tiny_{suite}"]["acc,none"])
    result = ceval.evaluate(run, data, suite, "val" if suite == "ceval" else "test", fewshot)
    assert result["acc"] == pytest.approx(acc)


def test_the_folder_layout_and_benchmark_are_recognised(tmp_path):
    assert ceval.detect_benchmark(write_ceval(tmp_path / "c")) == "ceval"
    assert ceval.detect_benchmark(write_cmmlu(tmp_path / "m")) == "cmmlu"
    assert list(ceval.subject_files(tmp_path / "m", "cmmlu", "test")) == ["agronomy"]


@pytest.mark.parametrize("argv,message", [
    (["--split", "test"], "no answer column"),
    (["--subjects", "nope"], "no val file for subject"),
    (["--fewshot", "9"], "between 0 and 5"),
])
def test_bad_requests_give_one_line_errors(tiny_run, ceval_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ceval.main(["--out_dir", str(tiny_run), "--data", str(ceval_dir), *argv])
    assert message in str(e.value) + capsys.readouterr().err


def test_malformed_files_are_refused(tiny_run, tmp_path):
    bad = write_ceval(tmp_path / "bad")
    path = bad / "val" / "computer_network_val.csv"
    path.write_text(path.read_text(encoding="utf-8").replace(",B\n", ",E\n", 1), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"computer_network_val.csv:\d+: answer 'E'"):
        ceval.main(["--out_dir", str(tiny_run), "--data", str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no CSV files"):
        ceval.main(["--out_dir", str(tiny_run), "--data", str(tmp_path / "empty")])
