"""DPO: the loss on hand-computed numbers, preference data preparation (pairs, masks, tokenizer
check) and a short train.py DPO run on a tiny model whose reward margin must grow."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_lora import QA, TINY_TRAIN, trained_sft_run, write_qa

from checkpoint import checkpoint_reference, load_checkpoint
from data_utils import BlockData, load_meta
from dpo import dpo_loss, pair_rows, sequence_logps


def test_dpo_loss_matches_hand_computation():
    # pair 1: rewards 0.1 * (-1 - -1.5) = 0.05 and 0.1 * (-2 - -1.5) = -0.05, margin 0.1,
    #         loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443966
    # pair 2: rewards 0.1 * (-3 - -2) = -0.1 and 0.1 * (-1 - -2) = 0.1, margin -0.2,
    #         loss = log(1 + e^0.2) = 0.7981389;  mean = 0.7212678
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                                      torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.7212678, abs=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.05, -0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.05, 0.1]))


def test_sequence_logps_sums_only_masked_positions():
    logits = torch.zeros(1, 5, 4)  # uniform over 4 tokens: log p = -log 4 everywhere
    logits[0, 4, 2] = 100.0  # a masked-out position with a very different value changes nothing
    y = torch.tensor([[0, 1, 2, 3, 2]])
    mask = torch.tensor([[False, True, True, True, False]])
    assert sequence_logps(logits, y, mask).item() == pytest.approx(-3 * math.log(4), abs=1e-5)


def test_pair_rows_keep_pairs_together():
    assert pair_rows([0, 5, 3]).tolist() == [0, 1, 4, 5, 2, 3]


@pytest.fixture
def qa_file(tmp_path):
    return write_qa(tmp_path / "qa.jsonl")


def _prepare(*args):
    sys.path.insert(0, str(ROOT / "data"))
    from prepare_dpo import main

    main([str(a) for a in args])


def test_prepare_dpo_writes_pairs_whose_masks_cover_only_the_responses(tiny_run, tiny_tokenizer, qa_file, tmp_path):
    out = tmp_path / "dpo"
    _prepare("--input", qa_file, "--out", out, "--sft_run", tiny_run, "--negatives", "both",
             "--max_new_tokens", 8, "--val_fraction", 0.25)
    meta = load_meta(out)
    assert meta["kind"] == "dpo" and meta["tokenizer"]["sha256"] == tiny_tokenizer.identity.sha256
    counts = meta["counts"]
    assert counts["malformed"] == 1 and counts["pairs_read"] == len(QA)
    assert counts["pairs_train"] + counts["pairs_val"] == counts["pairs_kept"] > 0
    # a random model's 8-token answers are wrong, so every negative is the model's own answer
    assert counts["negatives"] == {"model": counts["pairs_kept"]}
    pairs = {p["prompt"]: p for p in map(json.loads, open(out / "pairs.jsonl", encoding="utf-8"))}
    assert all(p["negative"] == "model" and p["rejected"] == p["sft_answer"] for p in pairs.values())

    data = BlockData(out, "train")
    assert data.n_blocks == 2 * counts["pairs_train"]
    x, y, mask = data.batch(np.arange(data.n_blocks), kind="sft")
    for i in range(0, data.n_blocks, 2):
        prompt = tiny_tokenizer.decode(x[i, : int(mask[i].nonzero()[0])].tolist())
        pair = pairs[prompt]  # both rows start with the same prompt, chosen first
        for row, answer in ((i, pair["chosen"]), (i + 1, pair["rejected"])):
            masked = y[row][mask[row]].tolist()
            assert masked[-1] == tiny_tokenizer.eot and tiny_tokenizer.decode(masked) == answer
            assert tiny_tokenizer.decode(x[row, : int(mask[row].nonzero()[0])].tolist()) == prompt


def test_prepare_dpo_refuses_a_tokenizer_that_is_not_the_sft_runs(tiny_run, qa_file, tmp_path, capsys):
    from tokenizer import train_tokenizer

    other = train_tokenizer(["另一个分词器的训练文本。"] * 20, tmp_path / "other_tok", vocab_size=300)
    with pytest.raises(SystemExit):
        _prepare("--input", qa_file, "--out", tmp_path / "dpo", "--sft_run", tiny_run,
                 "--tokenizer", other.identity.path)
    assert "is not the tokenizer of the SFT run" in capsys.readouterr().err
    assert not (tmp_path / "dpo").exists()


def test_reward_margin_grows_over_a_short_dpo_run_of_train_py(tmp_path, tiny_tokenizer):
    import train

    qa, _, sft = trained_sft_run(tmp_path, tiny_tokenizer)
    _prepare("--input", qa, "--out", tmp_path / "dpo_data", "--sft_run", sft, "--negatives", "both",
             "--max_new_tokens", 8, "--val_fraction", 0.25)
    out = tmp_path / "dpo"
    train.main([f"--data_dir={tmp_path / 'dpo_data'}", f"--out_dir={out}", f"--init_from={sft}", *TINY_TRAIN,
                "--max_iters=25", "--eval_interval=25", "--learning_rate=3e-3", "--dpo_beta=0.1"])
    lines = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    steps = [r for r in lines if "loss" in r]
    first, last = (r for r in lines if "val_loss" in r)
    assert first["val_dpo_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert first["val_dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert sum(r["dpo_margin"] for r in steps[-5:]) / 5 > 1.0 and steps[-1]["dpo_acc"] == 1.0
    assert last["val_dpo_loss"] < first["val_dpo_loss"]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["kind"] == "dpo" and ckpt["dpo_reference"] == checkpoint_reference(sft / "best.pt")


def test_prepare_dpo_splits_by_article_like_sft(tiny_tokenizer, qa_dir, tmp_path):
    """Regression: pairs were split at random per pair, so on CMRC2018 trial 47 of 48 validation
    pairs shared a passage with training pairs, and 50 training pairs asked SFT val questions."""
    from data.prepare_sft import main as prepare_sft_main

    cmrc = qa_dir / "cmrc2018_trial.json"
    prepare_sft_main(["--input", str(cmrc), "--out", str(tmp_path / "sft"), "--tokenizer",
                      tiny_tokenizer.identity.path, "--block_size", "512"])
    _prepare("--input", cmrc, "--out", tmp_path / "dpo", "--negatives", "other", "--tokenizer",
             tiny_tokenizer.identity.path, "--block_size", 4096, "--with_context")
    pairs = [json.loads(line) for line in open(tmp_path / "dpo" / "pairs.jsonl", encoding="utf-8")]
    by_split = {s: [p for p in pairs if p["split"] == s] for s in ("train", "val")}
    assert len(by_split["val"]) > 10 and len(by_split["train"]) > 10 * len(by_split["val"])
    # prompt = passage \n question
    passages = {s: {p["prompt"].rpartition("\n")[0] for p in ps} for s, ps in by_split.items()}
    assert not passages["train"] & passages["val"], "a passage in both splits"
    articles = {s: {p.get("article") for p in ps} for s, ps in by_split.items()}
    assert not articles["train"] & articles["val"], "an article in both splits"
    sft_val = {json.loads(line)["id"] for line in open(tmp_path / "sft" / "val.jsonl", encoding="utf-8")}
    dpo_val = {p["id"] for p in by_split["val"]}
    assert sft_val and not sft_val & {p["id"] for p in by_split["train"]}
    assert sft_val <= dpo_val | (sft_val - {p["id"] for p in pairs})  # every SFT val question DPO kept is DPO val
    with pytest.raises(SystemExit):  # DRCD test is held out of every training set
        _prepare("--input", qa_dir / "drcd_test.zh-hans.json", "--out", tmp_path / "x", "--negatives", "other",
                 "--tokenizer", tiny_tokenizer.identity.path, "--block_size", 512)
