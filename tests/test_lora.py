"""LoRA: a fresh adapter changes nothing, merging is exact, only adapters train, adapter runs load
through inference.load_run (base verified by sha256) and merge into a plain run, and train.py
trains, saves and resumes adapter runs."""
import json
import sys

import pytest
import torch
from conftest import ROOT, make_run

from checkpoint import checkpoint_reference, load_checkpoint, save_checkpoint
from inference import load_run, model_from_checkpoint
from lora import LoRALinear, adapter_entries, apply_lora, lora_state_dict, merge_lora, merge_run, setup_training

QA = [("中国的首都是哪里？", "北京"), ("长江全长多少？", "约6300公里"), ("黄河被称为什么？", "母亲河"),
      ("故宫是什么？", "明清两代的皇家宫殿"), ("Python由谁创建？", "Guido van Rossum"),
      ("上海位于哪里？", "长江入海口"), ("Python创建于哪一年？", "1991年"), ("中国第一长河是什么？", "长江")]
TINY_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--gradient_accumulation_steps=1",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=0", "--learning_rate=1e-2", "--min_lr=1e-3",
              "--device=cpu", "--compile=False"]


def write_qa(path):
    """Two questions per article, as sft/sft_generate.py writes them, plus one broken line."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QA):
            f.write(json.dumps({"question": q, "answer": a, "id": f"article{i // 2}"}, ensure_ascii=False) + "\n")
        f.write("{broken\n")
    return path


def trained_sft_run(tmp_path, tok):
    """(qa file, SFT data dir, SFT run dir) made by the real pipeline: data/prepare_sft.py, then a
    few train.py steps, so later runs can fine-tune from it."""
    import train

    sys.path.insert(0, str(ROOT / "data"))
    from prepare_sft import main as prepare_sft

    qa = write_qa(tmp_path / "qa.jsonl")
    data, run = tmp_path / "sft_data", tmp_path / "sft"
    prepare_sft(["--input", str(qa), "--out", str(data), "--block_size", "64", "--tokenizer", tok.identity.path,
                 "--val_fraction", "0.3"])
    train.main([f"--data_dir={data}", f"--out_dir={run}", *TINY_TRAIN, "--max_iters=2", "--eval_interval=2"])
    return qa, data, run


def _base(run_dir):
    return model_from_checkpoint(load_checkpoint(run_dir / "best.pt"))


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


def _perturb_adapters(model, seed=1):
    """Trained adapters are non-zero; give B random values so merging has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_zero_initialised_adapter_leaves_outputs_unchanged(tiny_run):
    model = _base(tiny_run)
    ids = _ids(model.config.vocab_size)
    before = model(ids)[0]
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(ids)[0], before)


def test_merged_and_unmerged_outputs_match(tiny_run):
    model = apply_lora(_base(tiny_run), rank=4, alpha=16, targets="attn,mlp")
    _perturb_adapters(model)
    ids = _ids(model.config.vocab_size)
    adapted = model(ids)[0]
    assert not torch.allclose(adapted, _base(tiny_run)(ids)[0], atol=1e-4)  # the adapter does something
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids)[0], adapted, atol=1e-5, rtol=0)


def test_trainable_parameter_count(tiny_run):
    # tiny run: n_layer=2, n_embd=C=32, rank r=4; a Linear(in, out) adapter has r * (in + out)
    # attn.c_attn 32->96: 4*128 = 512, attn.c_proj 32->32: 4*64 = 256,
    # mlp.c_fc 32->128: 4*160 = 640, mlp.c_proj 128->32: 4*160 = 640  => 2048 per layer, 4096 in all
    model = apply_lora(_base(tiny_run), rank=4, alpha=8)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4096
    attn_only = apply_lora(_base(tiny_run), rank=4, alpha=8, targets="attn")
    assert sum(p.numel() for p in attn_only.parameters() if p.requires_grad) == 2 * (512 + 256)


def test_only_adapter_parameters_get_gradients(tiny_run):
    model = apply_lora(_base(tiny_run), rank=4, alpha=8)
    _perturb_adapters(model)  # with B = 0 the gradient of A would be zero too
    ids = _ids(model.config.vocab_size)
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_bad_targets_are_refused(tiny_run):
    with pytest.raises(ValueError, match="lora targets"):
        apply_lora(_base(tiny_run), rank=4, alpha=8, targets="attn,ffn")


def _adapter_run(tiny_run, tiny_tokenizer, out_dir):
    """An adapter run directory as train.py writes it: adapter + base reference, no `model`."""
    base_ckpt = load_checkpoint(tiny_run / "best.pt")
    model = model_from_checkpoint(base_ckpt)
    adapter = setup_training(model, base_ckpt, tiny_run / "best.pt", False, 4, 8, "attn,mlp", 0.0)
    _perturb_adapters(model)
    ckpt = {k: v for k, v in base_ckpt.items() if k != "model"} | adapter_entries(model, adapter)
    out_dir.mkdir()
    tiny_tokenizer.save(out_dir / "tokenizer")
    save_checkpoint(ckpt, out_dir / "best.pt")
    return model.eval()


def test_adapter_checkpoint_round_trip_through_load_run(tiny_run, tiny_tokenizer, tmp_path):
    adapted = _adapter_run(tiny_run, tiny_tokenizer, tmp_path / "lora")
    ckpt = load_checkpoint(tmp_path / "lora" / "best.pt")
    assert "model" not in ckpt and set(ckpt["lora"]) == set(lora_state_dict(adapted))
    run = load_run(tmp_path / "lora")
    ids = _ids(adapted.config.vocab_size)
    torch.testing.assert_close(run.model(ids)[0], adapted(ids)[0], atol=1e-5, rtol=0)
    assert run.complete("北京", mode="qa", max_new_tokens=5, temperature=0) is not None

    merge_run(tmp_path / "lora", tmp_path / "merged")
    merged_ckpt = load_checkpoint(tmp_path / "merged" / "best.pt")
    assert "lora" not in merged_ckpt and "model" in merged_ckpt
    (tiny_run / "best.pt").unlink()  # a merged run no longer needs its base
    torch.testing.assert_close(load_run(tmp_path / "merged").model(ids)[0], adapted(ids)[0], atol=1e-5, rtol=0)


def test_changed_or_missing_base_is_refused(tiny_run, tiny_tokenizer, tmp_path):
    _adapter_run(tiny_run, tiny_tokenizer, tmp_path / "lora")
    make_run(tiny_run, tiny_tokenizer, seed=7)  # the base run retrained: same path, other weights
    with pytest.raises(ValueError, match="changed since this run used it"):
        load_run(tmp_path / "lora")
    (tiny_run / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="base checkpoint of this LoRA adapter is missing"):
        load_run(tmp_path / "lora")


def test_setup_training_resumes_refines_or_refuses(tiny_run, tiny_tokenizer, tmp_path):
    adapted = _adapter_run(tiny_run, tiny_tokenizer, tmp_path / "lora")
    ckpt = load_checkpoint(tmp_path / "lora" / "best.pt")
    ids = _ids(adapted.config.vocab_size)
    resumed = model_from_checkpoint(load_checkpoint(tiny_run / "best.pt"))  # any weights: the base replaces them
    adapter = setup_training(resumed, ckpt, tmp_path / "lora" / "best.pt", True, 0, 16, "attn,mlp", 0.0)
    assert adapter == {"base": ckpt["base"], "lora_config": ckpt["lora_config"]}
    assert any(isinstance(m, LoRALinear) for m in resumed.modules())
    torch.testing.assert_close(resumed.eval()(ids)[0], adapted(ids)[0], atol=1e-5, rtol=0)

    full = model_from_checkpoint(load_checkpoint(tiny_run / "best.pt"))  # fine-tune all weights of the adapter run
    assert setup_training(full, ckpt, tmp_path / "lora" / "best.pt", False, 0, 16, "attn,mlp", 0.0) is None
    assert all(p.requires_grad for p in full.parameters())
    torch.testing.assert_close(full.eval()(ids)[0], adapted(ids)[0], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="needs trained weights"):
        setup_training(full, None, None, False, 8, 16, "attn,mlp", 0.0)
    with pytest.raises(ValueError, match="is a LoRA run: merge it"):
        setup_training(full, ckpt, tmp_path / "lora" / "best.pt", False, 8, 16, "attn,mlp", 0.0)


def test_train_py_saves_only_the_adapter_and_resumes_it(tmp_path, tiny_tokenizer):
    import train

    _, data, sft = trained_sft_run(tmp_path, tiny_tokenizer)
    out = tmp_path / "lora"
    flags = [f"--data_dir={data}", f"--out_dir={out}", *TINY_TRAIN, "--eval_interval=4", "--lora_rank=4",
             "--lora_alpha=8", "--lora_targets=attn"]
    train.main([*flags, f"--init_from={sft}", "--max_iters=4"])
    ckpt = load_checkpoint(out / "last.pt")
    assert "model" not in ckpt and ckpt["base"] == checkpoint_reference(sft / "best.pt")
    assert ckpt["lora_config"] == {"rank": 4, "alpha": 8.0, "targets": "attn", "dropout": 0.0}
    assert set(ckpt["lora"]) == {f"transformer.h.0.attn.{m}.lora_{ab}" for m in ("c_attn", "c_proj") for ab in "AB"}
    ids = _ids(tiny_tokenizer.n_vocab)
    tuned, base = load_run(out, "last").model(ids)[0], load_run(sft).model(ids)[0]
    assert not torch.allclose(tuned, base, atol=1e-4)  # the adapter learned something

    train.main([*flags, "--init_from=resume", "--max_iters=6"])
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["iter_num"] == 6 and "model" not in resumed and resumed["base"] == ckpt["base"]
