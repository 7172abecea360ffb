"""End-to-end tests of the evaluation scripts on tiny random runs and tiny data written here.

One test runs perplexity.py as users do (`python evaluations/perplexity.py` in a subprocess, which
also checks that a script in evaluations/ finds the repository's modules); the rest call
`main(argv)` in-process to save interpreter starts.
The numbers are checked against an independent computation (a plain forward pass and
cross-entropy), not against the code under test.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_TEXT

from data_utils import count_chars, split_sentences
from evaluations import perplexity, qa_eval, report, rouge_l
from inference import load_run

BLOCK = 64


def write_blocks(data_dir, tok, rows, kind, identity=None):
    """train.bin / val.bin / meta.json as data/prepare*.py lay them out: [ids..., EOT, PAD...] rows."""
    data_dir.mkdir(parents=True, exist_ok=True)
    blocks = np.full((len(rows), BLOCK), tok.pad, dtype=np.uint16)
    for i, ids in enumerate(rows):
        blocks[i, :len(ids)] = ids[:BLOCK]
    for split in ("train", "val"):
        blocks.tofile(data_dir / f"{split}.bin")
    meta = {"block_size": BLOCK, "dtype": "uint16", "vocab_size": tok.n_vocab, "kind": kind,
            "tokenizer": identity or tok.identity.to_json(), "special": tok.special, "counts": {}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return blocks


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "evaluations" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def reference_loss(model, blocks, mask_of):
    """Sum of cross-entropy over the masked targets, the number of them, computed directly."""
    x = torch.from_numpy(blocks[:, :-1].astype(np.int64))
    y = torch.from_numpy(blocks[:, 1:].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(x)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    mask = mask_of(y).reshape(-1)
    return float(losses[mask].sum()), int(mask.sum())


def check_consistent(metrics):
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-9)
    nats = metrics["loss"] * metrics["tokens"]
    assert metrics["bpc"] == pytest.approx(nats / math.log(2) / metrics["chars"], rel=1e-9)


def test_perplexity_on_pretraining_data_matches_a_direct_computation(tmp_path, tiny_run, tiny_tokenizer):
    tok = tiny_tokenizer
    sentences = split_sentences(TINY_TEXT)
    rows = [tok.encode(s)[:BLOCK - 1] + [tok.eot] for s in sentences]
    blocks = write_blocks(tmp_path / "data", tok, rows, "pretrain")

    out = tmp_path / "ppl.json"
    proc = run_script("perplexity.py", "--out_dir", tiny_run, "--data", tmp_path / "data", "--batch_size", 3,
                      "--device", "cpu", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "ppl" in proc.stdout and "bpc" in proc.stdout
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    nats, tokens = reference_loss(load_run(tiny_run).model, blocks, lambda y: y != tok.pad)
    assert metrics["tokens"] == tokens and metrics["blocks"] == len(rows)
    assert metrics["loss"] == pytest.approx(nats / tokens, rel=1e-4)
    # the targets are every row but its first token; EOT has no characters
    assert metrics["chars"] == sum(count_chars(tok.decode(r[1:])) for r in rows)
    check_consistent(metrics)
    assert result["run"]["name"] == "run" and result["settings"]["kind"] == "pretrain"
    assert result["eval"] == "perplexity_pretrain_val"


def test_perplexity_on_sft_data_scores_answers_only_and_max_blocks(tmp_path, tiny_run, tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [("北京是什么？", "中国的首都"), ("长江多长？", "约6300公里"), ("Python是什么？", "一种编程语言")]
    write_blocks(tmp_path / "sft", tok, [tok.encode_qa(q, a) for q, a in pairs], "sft")
    perplexity.main(["--out_dir", str(tiny_run), "--data", str(tmp_path / "sft"), "--max_blocks", "2",
                     "--device", "cpu"])
    metrics = json.loads((tiny_run / "eval_perplexity_sft_val.json").read_text())["metrics"]
    # answer tokens and their closing EOT count; the characters are the answers'
    assert metrics["tokens"] == sum(len(tok.encode(a)) + 1 for _, a in pairs[:2])
    assert metrics["chars"] == sum(len(a) for _, a in pairs[:2])
    assert metrics["blocks"] == 2
    check_consistent(metrics)


def test_perplexity_refuses_data_from_another_tokenizer(tmp_path, tiny_run, tiny_tokenizer):
    write_blocks(tmp_path / "data", tiny_tokenizer, [[1, 2, tiny_tokenizer.eot]], "pretrain",
                 identity={"path": "elsewhere", "sha256": "0" * 64})
    with pytest.raises(SystemExit, match="tokenized with"):
        perplexity.main(["--out_dir", str(tiny_run), "--data", str(tmp_path / "data"), "--device", "cpu"])


SQUAD = {"version": "tiny", "data": [{"title": "中国", "paragraphs": [
    {"context": "北京是中华人民共和国的首都。", "qas": [
        {"id": "q1", "question": "中国的首都是哪里？", "answers": [{"text": "北京", "answer_start": 0},
                                                            {"text": "北京市", "answer_start": 0}]},
        {"id": "q2", "question": "北京是什么？", "answers": [{"text": "首都", "answer_start": 11}]}]},
    {"context": "长江是中国第一长河，全长约6300公里。", "qas": [
        {"id": "q3", "question": "长江多长？", "answers": [{"text": "约6300公里", "answer_start": 12}]}]}]}]}


def test_qa_eval_with_context_writes_scored_predictions(tmp_path, tiny_run):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--with_context", "--max_new_tokens", "8",
                  "--batch_size", "2", "--device", "cpu"])
    result = json.loads((tiny_run / "eval_qa_context.json").read_text())
    rows = [json.loads(line) for line in (tiny_run / "pred_qa_context.jsonl").open(encoding="utf-8")]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"] and all(r["schema"] == 1 for r in rows)
    assert rows[0]["answers"] == ["北京", "北京市"]
    for key in ("em", "f1", "subem", "rouge_l", "bleu4"):
        assert result["metrics"][key] == pytest.approx(100 * sum(r[key] for r in rows) / 3)
    assert result["metrics"]["n"] == 3 and result["settings"]["with_context"] is True
    # the no-model rules beside the model, on the same questions and the passages it was shown
    from evaluations.baselines import RULES
    from evaluations.metrics import f1
    assert set(result["baselines"]) == set(RULES)
    copy_question = 100 * sum(f1(q["question"], [a["text"] for a in q["answers"]])
                              for p in SQUAD["data"][0]["paragraphs"] for q in p["qas"]) / 3
    assert result["baselines"]["copy_question"]["f1"] == pytest.approx(copy_question)
    # the prompt is context + newline + question in the qa layout, decoded greedily
    run = load_run(tiny_run)
    expected = run.complete("北京是中华人民共和国的首都。\n中国的首都是哪里？", "qa", max_new_tokens=8, temperature=0.0)
    assert rows[0]["prediction"] == expected.strip()


def test_qa_eval_with_context_cuts_a_long_passage_to_the_matching_sentences(tmp_path, tiny_run):
    from retrieval import fit_passage

    key = "长江全长约6300公里。"
    context = "黄河是母亲河。" * 12 + key + "故宫位于北京。" * 12
    answer = {"text": "约6300公里", "answer_start": context.index("约")}
    data = {"data": [{"title": "长江", "paragraphs": [{"context": context, "qas": [
        {"id": "long", "question": "长江全长多少？", "answers": [answer]}]},
        {"context": "北京是首都。", "qas": [{"id": "short", "question": "北京是什么？",
                                           "answers": [{"text": "首都", "answer_start": 3}]}]}]}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--with_context", "--max_new_tokens", "6",
                  "--device", "cpu"])
    rows = [json.loads(line) for line in (tiny_run / "pred_qa_context.jsonl").open(encoding="utf-8")]
    result = json.loads((tiny_run / "eval_qa_context.json").read_text())
    assert [r["passage_cut"] for r in rows] == [True, False] and result["metrics"]["passages_cut"] == 1
    run = load_run(tiny_run)
    budget = run.model.config.block_size - 6
    assert len(run.tok.encode_passage_qa(context, "长江全长多少？")) > budget  # the window could not hold it
    passage, cut = fit_passage(run.tok, context, "长江全长多少？", budget)
    assert cut and key in passage
    expected = run.complete(passage + "\n长江全长多少？", "qa", max_new_tokens=6, temperature=0.0)
    assert rows[0]["prediction"] == expected.strip()


def test_qa_eval_extractive_answers_are_runs_of_the_passages(tmp_path, tiny_run, tiny_index):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    common = ["--out_dir", str(tiny_run), "--input", str(path), "--max_new_tokens", "8", "--device", "cpu"]
    qa_eval.main([*common, "--with_context", "--extractive"])
    result = json.loads((tiny_run / "eval_qa_context_span.json").read_text())
    rows = [json.loads(line) for line in (tiny_run / "pred_qa_context_span.jsonl").open(encoding="utf-8")]
    assert result["settings"]["extractive"] is True and len(rows) == 3
    contexts = {"q1": "北京是中华人民共和国的首都。", "q2": "北京是中华人民共和国的首都。",
                "q3": "长江是中国第一长河，全长约6300公里。"}
    for row in rows:  # whole characters of the passage, never invented text
        assert row["prediction"] and row["prediction"] in contexts[row["id"]], row
    qa_eval.main([*common, "--with_context"])
    free = [json.loads(line)["prediction"] for line in (tiny_run / "pred_qa_context.jsonl").open(encoding="utf-8")]
    assert any(p not in contexts[r["id"]] for p, r in zip(free, rows))  # the random model, unheld, invents

    qa_eval.main([*common, "--rag", str(tiny_index), "--rag_k", "2", "--extractive"])
    rows = [json.loads(line) for line in (tiny_run / "pred_qa_rag_span.jsonl").open(encoding="utf-8")]
    run = load_run(tiny_run)
    from retrieval import Index

    index = Index(tiny_index)
    for row in rows:
        _, sources = run.rag_prompt_ids(row["question"], index, 2, 8)
        read = "\n".join(s["text"] for s in sources)
        assert not sources or row["prediction"] in read, row
    with pytest.raises(SystemExit):
        qa_eval.main([*common, "--extractive"])  # closed-book: nothing to copy from


def test_qa_eval_closed_book_on_jsonl_and_context_required(tmp_path, tiny_run):
    path = tmp_path / "qa.jsonl"
    pairs = [("北京是什么？", "首都"), ("长江多长？", "约6300公里")]
    path.write_text("\n".join(json.dumps({"question": q, "answer": a, "id": "7"}, ensure_ascii=False)
                              for q, a in pairs) + "\n", encoding="utf-8")
    out = tmp_path / "res" / "eval_closed.json"
    qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--max_new_tokens", "4", "--device", "cpu",
                  "--output", str(out)])
    rows = [json.loads(line) for line in (tmp_path / "res" / "pred_closed.jsonl").open(encoding="utf-8")]
    assert [(r["id"], r["question"], r["answers"]) for r in rows] == [("7-0", "北京是什么？", ["首都"]),
                                                                     ("7-1", "长江多长？", ["约6300公里"])]
    with pytest.raises(SystemExit, match="no context"):
        qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--with_context", "--device", "cpu"])


def test_qa_eval_rag_scores_recall_at_k_and_answers_from_retrieved_passages(tmp_path, tiny_run, tiny_index):
    # gold answers: 1) in the top passage, 2) only in a lower-ranked passage, 3) in no passage at all
    questions = [("紫禁城是什么？", "皇家宫殿"), ("长江发源于唐古拉山脉，那么黄河被称为什么？", "母亲河"),
                 ("长江多长？", "八千公里")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a, "id": str(i)}, ensure_ascii=False) + "\n"
                            for i, (q, a) in enumerate(questions)), encoding="utf-8")
    from retrieval import Index

    index = Index(tiny_index)
    ranked = [[h["title"] for h in index.search(q, 5)] for q, _ in questions]
    assert ranked[0][0] == "故宫" and ranked[1][0] == "长江" and "黄河" in ranked[1]  # the cases above hold
    qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--rag", str(tiny_index), "--rag_k", "2",
                  "--max_new_tokens", "6", "--device", "cpu"])
    result = json.loads((tiny_run / "eval_qa_rag.json").read_text())
    rows = [json.loads(line) for line in (tiny_run / "pred_qa_rag.jsonl").open(encoding="utf-8")]
    assert result["metrics"]["recall_at_1"] == pytest.approx(100 / 3)
    assert result["metrics"]["recall_at_5"] == pytest.approx(200 / 3)
    assert [r["hit_rank"] for r in rows] == [1, 2, None] and [r["retrieved"] for r in rows] == ranked
    assert result["settings"]["rag"] == str(tiny_index) and result["settings"]["rag_k"] == 2
    for key in ("em", "f1"):
        assert result["metrics"][key] == pytest.approx(100 * sum(r[key] for r in rows) / 3)
    # each answer is generated from the RAG prompt Run.rag_prompt_ids builds (the one RAG path)
    run = load_run(tiny_run)
    ids, sources = run.rag_prompt_ids(questions[0][0], index, 2, 6)
    assert rows[0]["sources"] == [{k: s[k] for k in ("title", "article_id", "cut")} for s in sources]
    assert rows[0]["prediction"] == run.complete_ids([ids], "qa", max_new_tokens=6, temperature=0.0)[0].strip()
    with pytest.raises(SystemExit):
        qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--rag", str(tiny_index), "--with_context"])
    with pytest.raises(SystemExit, match="no index at"):
        qa_eval.main(["--out_dir", str(tiny_run), "--input", str(path), "--rag", str(tmp_path / "none")])


def test_rouge_l_continuation_prompts_with_the_first_sentence(tmp_path, tiny_run, capsys):
    wiki = tmp_path / "wiki.jsonl"
    articles = [
        {"id": "1", "title": "北京", "text": "北京\n\n北京是中国的首都。北京位于华北平原。北京有故宫。"},
        {"id": "2", "title": "短", "text": "短\n\n只有一句。"},  # nothing to continue: skipped
        {"id": "3", "title": "长江", "text": "长江\n\n长江是中国第一长河。\n全长约6300公里。"},
    ]
    wiki.write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in articles) + "\n", encoding="utf-8")
    rouge_l.main(["--out_dir", str(tiny_run), "--input", str(wiki), "--ref_chars", "10", "--max_new_tokens", "6",
                  "--device", "cpu"])
    rows = [json.loads(line) for line in (tiny_run / "pred_rouge_l_continuation.jsonl").open(encoding="utf-8")]
    assert [(r["id"], r["prompt"], r["answers"]) for r in rows] == [
        ("1", "北京是中国的首都。", ["北京位于华北平原。"]),  # the next sentence would pass 10 characters
        ("3", "长江是中国第一长河。", ["全长约6300公里。"])]
    result = json.loads((tiny_run / "eval_rouge_l_continuation.json").read_text())
    assert result["metrics"]["rouge_l"] == pytest.approx(100 * sum(r["rouge_l"] for r in rows) / 2)
    assert result["settings"]["temperature"] == 0.0 and result["settings"]["segment"] == "char"
    assert "rouge_l" in capsys.readouterr().out


def test_rouge_l_qa_mode_on_squad_json(tmp_path, tiny_run):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    rouge_l.main(["--out_dir", str(tiny_run), "--input", str(path), "--mode", "qa", "--max_examples", "2",
                  "--max_new_tokens", "4", "--segment", "jieba", "--device", "cpu"])
    result = json.loads((tiny_run / "eval_rouge_l_qa.json").read_text())
    assert result["metrics"]["n"] == 2 and result["settings"]["segment"] == "jieba"


def fake_run(run_dir, name, iters, metrics):
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.jsonl", "w") as f:
        for i in range(iters):
            f.write(json.dumps({"iter": i * 10, "loss": 5 - i * 0.1, "lr": 1e-3}) + "\n")
            if i % 5 == 0:
                f.write(json.dumps({"iter": i * 10, "val_loss": 5.2 - i * 0.1, "val_ppl": 1.0, "val_bpc": 1.0}) + "\n")
        f.write("{torn line\n")
    for evaluation, values in metrics.items():
        result = {"eval": evaluation, "run": {"name": name, "iter": iters * 10, "params": 1234, "kind": "sft"},
                  "input": "dev.json", "settings": {"max_new_tokens": 8}, "metrics": values}
        (run_dir / f"eval_{evaluation}.json").write_text(json.dumps(result))
    return run_dir


def test_report_compares_runs_on_every_metric_found(tmp_path):
    pretrain_results = {"perplexity_pretrain_val": {"loss": 3.0, "ppl": 20.1, "bpc": 2.9, "tokens": 100}}
    sft_results = {"perplexity_pretrain_val": {"loss": 3.2, "ppl": 24.5, "bpc": 3.1, "tokens": 100},
                   "qa": {"em": 10.0, "f1": 35.5, "subem": 20.0, "rouge_l": 30.0, "bleu4": 12.0, "n": 50}}
    a = fake_run(tmp_path / "pretrain", "pretrain", 20, pretrain_results)
    b = fake_run(tmp_path / "sft", "sft", 12, sft_results)
    (b / "eval_broken.json").write_text("{half a result")
    report.main([str(a), str(b), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("| run | perplexity_pretrain_val.loss | perplexity_pretrain_val.ppl | perplexity_pretrain_val.bpc "
            "| qa.em |") in md
    assert "tokens" not in md.split("## Metrics")[1].split("\n\n")[2]  # counts are not metrics
    assert "| pretrain | 3 | 20.10 | 2.9 | – | – | – | – | – |" in md
    assert "| sft | 3.2 | 24.50 | 3.1 | 10.00 | 35.50 | 20.00 | 30.00 | 12.00 |" in md
    for image in ("perplexity_pretrain_val.png", "qa.png", "losses.png"):
        assert f"]({image})" in md
        assert (tmp_path / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
