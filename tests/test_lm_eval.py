"""lm-evaluation-harness both ways, with the real package: `local-completions` against server.py on
127.0.0.1, and `--model hf` on an export (export.py) of the same tiny run. The test writes two
small YAML tasks over jsonl (a multiple-choice loglikelihood task and a generate_until task) and
runs both through lm-eval's command line, the commands README gives.

The server side uses lm-eval's defaults for a vLLM-style server: tokenized requests (lists of
token-id lists, `--batch_size` 2), the remote tokenizer (`/tokenizer_info`, `/tokenize`), and
echo + logprobs for the loglikelihoods; `max_length` is the model's window. The two agree: every
choice's loglikelihood within 1e-4, the same greedy generations. Offline: HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE keep lm-eval and `datasets` off the network (the tasks read local jsonl).
"""
import json
import os
import subprocess
import sys

import pytest
from test_server import serving

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread

MC_DOCS = [
    {"question": "长江是中国第几长河？", "choices": ["第一", "第二", "第三"], "answer": 0},
    {"question": "黄河被称为什么？", "choices": ["母亲河", "长江", "故宫"], "answer": 0},
    {"question": "故宫位于哪里？", "choices": ["上海", "北京市中心"], "answer": 1},
    {"question": "Python由谁创建？", "choices": ["Guido van Rossum", "北京", "长江"], "answer": 0},
]
GEN_DOCS = [{"question": "北京是", "answer": "中华人民共和国的首都"}, {"question": "长江", "answer": "是中国第一长河"},
            {"question": "Python是", "answer": "一种编程语言"}]


def write_tasks(folder):
    """Two lm-eval tasks over jsonl files in `folder`; returns the folder to include."""
    folder.mkdir()
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                              encoding="utf-8")
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data.format(path=folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data.format(path=folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"。\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return folder


def lm_eval_cli(model, model_args, tasks_dir, out, env, *extra):
    """`lm_eval run` on both tasks, as README gives it: {task: [filtered responses per doc]}."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args, "--tasks",
           "tiny_mc,tiny_gen", "--include_path", str(tasks_dir), "--batch_size", "2", "--log_samples",
           "--output_path", str(out), "--seed", "0", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {}
    for task in ("tiny_mc", "tiny_gen"):
        (path,) = out.glob(f"**/samples_{task}_*.jsonl")
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        found[task] = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return found


@pytest.mark.slow  # two lm_eval processes: about a minute of CPU, mostly imports
def test_lm_eval_over_http_agrees_with_lm_eval_on_the_export(run_dir, reference, tmp_path):
    pytest.importorskip("lm_eval")
    from export import export_hf

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "OMP_NUM_THREADS": "1"}
    tasks = write_tasks(tmp_path / "tasks")
    export_hf(run_dir, tmp_path / "hf")
    block = reference.info["block_size"]
    with serving(run_dir, max_batch=8, queue=32, max_new_tokens_cap=64) as (url, _):
        served = lm_eval_cli("local-completions", {"model": "tiny-sft", "base_url": f"{url}/v1/completions",
                                                   "max_length": block, "tokenized_requests": True,
                                                   "tokenizer_backend": "remote"}, tasks, tmp_path / "served", env)
    local = lm_eval_cli("hf", {"pretrained": tmp_path / "hf", "dtype": "float32"}, tasks, tmp_path / "local", env,
                        "--device", "cpu")

    assert len(served["tiny_mc"]) == len(MC_DOCS) and len(served["tiny_gen"]) == len(GEN_DOCS)
    for ours, theirs, doc in zip(served["tiny_mc"], local["tiny_mc"], MC_DOCS):
        assert len(ours) == len(theirs) == len(doc["choices"])
        assert [float(ll) for ll, _ in ours] == pytest.approx([float(ll) for ll, _ in theirs], abs=1e-4)
        assert [str(greedy) for _, greedy in ours] == [str(greedy) for _, greedy in theirs]
    worst = max(abs(float(a[0]) - float(b[0])) for ours, theirs in zip(served["tiny_mc"], local["tiny_mc"])
                for a, b in zip(ours, theirs))
    print(f"lm-eval: largest per-choice loglikelihood difference, server vs export: {worst:.2e}")
    assert served["tiny_gen"] == local["tiny_gen"]
    assert any(text[0] for text in served["tiny_gen"])  # something was generated
