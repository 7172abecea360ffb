"""Export to Hugging Face transformers: the model gives our logits, the tokenizer our ids (with the
special tokens at the same ids), a LoRA run exports merged, and export -> import round-trips; for
arch=gpt2 as GPT2LMHeadModel, for arch=qwen3 (GQA, untied head) as Qwen3ForCausalLM."""
import pytest
import torch
from test_lora import TINY_TRAIN, trained_sft_run

import export
from checkpoint import load_checkpoint
from export import export_hf, hf_tokenizer, import_hf
from inference import load_run, model_from_checkpoint
from tokenizer import load_tokenizer

TEXTS = ["北京是中华人民共和国的首都，位于华北平原北部。", "Python is a programming language created in 1991!",
         "混合 text：长江全长约6300公里, Guido van Rossum 😀\n\n  the end  ",
         "'s 's 're I'm  \t\n tabs"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _our_logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def _hf_logits(folder, ids):
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(ids).logits


def _sequences(vocab):
    return torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(0))


def test_exported_model_and_tokenizer_match_ours(tiny_run, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    export_hf(tiny_run, tmp_path / "hf")
    run = load_run(tiny_run)
    ids = _sequences(run.model.config.vocab_size)
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), _our_logits(run.model, ids), atol=1e-4, rtol=0)

    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = loader.from_pretrained(tmp_path / "hf")
        for text in TEXTS:
            assert loaded(text)["input_ids"] == tiny_tokenizer.encode(text), text
            assert loaded.decode(tiny_tokenizer.encode(text)) == text
        assert (loaded.eos_token_id, loaded.bos_token_id) == (tiny_tokenizer.eot, tiny_tokenizer.eot)
        assert loaded.pad_token_id == tiny_tokenizer.pad
        for name, idx in tiny_tokenizer.special.items():
            spelling = tiny_tokenizer.enc.decode_single_token_bytes(idx).decode()
            assert loaded.convert_tokens_to_ids(spelling) == idx, name


def test_gpt2_tokenizer_converts_exactly():
    tok = load_tokenizer("gpt2")
    hf = hf_tokenizer(tok)
    for text in TEXTS:
        assert hf.encode(text).ids == tok.encode(text), text
    assert hf.token_to_id("<|endoftext|>") == tok.eot and hf.token_to_id("<|pad|>") == tok.pad


def test_lora_run_of_train_py_exports_merged_with_its_padded_vocabulary(tmp_path, tiny_tokenizer):
    import train

    _, data, sft = trained_sft_run(tmp_path, tiny_tokenizer)
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'lora'}", f"--init_from={sft}", *TINY_TRAIN,
                "--max_iters=3", "--eval_interval=3", "--lora_rank=2", "--lora_alpha=4"])
    export_hf(tmp_path / "lora", tmp_path / "hf")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "lora" / "best.pt"))  # base + adapter, merged
    assert model.config.vocab_size > tiny_tokenizer.n_vocab  # train.py pads it to a multiple of 64
    ids = _sequences(tiny_tokenizer.n_vocab)
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), _our_logits(model, ids), atol=1e-4, rtol=0)
    # imported back, it fits train.py again: fine-tune it on the same data
    import_hf(tmp_path / "hf", tmp_path / "imported", tiny_tokenizer.identity.path, kind="sft")
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'again'}", f"--init_from={tmp_path / 'imported'}",
                *TINY_TRAIN, "--max_iters=1", "--eval_interval=1"])


def test_export_then_import_round_trips(tiny_run, tiny_tokenizer, tmp_path):
    export_hf(tiny_run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported", tiny_tokenizer.identity.path, kind="sft")
    ids = _sequences(tiny_tokenizer.n_vocab)
    original, imported = load_run(tiny_run), load_run(tmp_path / "imported")
    torch.testing.assert_close(_our_logits(imported.model, ids), _our_logits(original.model, ids), atol=0, rtol=0)
    assert imported.info["kind"] == "sft" and imported.tok.identity.sha256 == tiny_tokenizer.identity.sha256


def test_import_refuses_a_tokenizer_with_another_vocabulary(tiny_run, tmp_path):
    from tokenizer import train_tokenizer

    export_hf(tiny_run, tmp_path / "hf")
    other = train_tokenizer(["另一个分词器的训练文本，词表不同。"] * 20, tmp_path / "other_tok", vocab_size=300)
    with pytest.raises(ValueError, match="is not that of the tokenizer"):
        import_hf(tmp_path / "hf", tmp_path / "imported", other.identity.path)


# ----------------------------------------------------------------------------- qwen3


QWEN3 = ["--arch=qwen3", "--n_head=4", "--n_kv_head=2", "--tie_embeddings=False", "--rope_theta=500.0",
         "--optimizer=muon", "--learning_rate=3e-2"]


@pytest.fixture
def qwen3_run(tmp_path, tiny_tokenizer):
    """A qwen3 run trained by train.py (GQA, untied output layer, Muon): (run dir, its data)."""
    import train

    _, data, sft = trained_sft_run(tmp_path, tiny_tokenizer)
    run = tmp_path / "qwen3"
    train.main([f"--data_dir={data}", f"--out_dir={run}", *TINY_TRAIN, *QWEN3, "--max_iters=4", "--eval_interval=4"])
    return run, data


def test_qwen3_run_exports_to_qwen3_for_causal_lm_and_imports_back(qwen3_run, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    run, _ = qwen3_run
    export.main(["--run", str(run), "--to", "hf", str(tmp_path / "hf")])
    model = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    assert model.config.vocab_size > tiny_tokenizer.n_vocab and model.config.n_kv_head == 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, Qwen3ForCausalLM) and hf.config.num_key_value_heads == 2
    assert not hf.config.tie_word_embeddings and hf.config.rope_parameters["rope_theta"] == 500.0
    ids = _sequences(tiny_tokenizer.n_vocab)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, _our_logits(model, ids), atol=1e-4, rtol=0)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tiny_tokenizer.encode(text), text

    # back, by the command line with the new spelling: the same weights, and load_run keeps the
    # output layer untied when it trims the vocabulary padding
    export.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"),
                 "--tokenizer", tiny_tokenizer.identity.path])
    imported = load_checkpoint(tmp_path / "imported" / "best.pt")
    assert {k: imported["model_args"][k] for k in ("arch", "n_kv_head", "tie_embeddings", "rope_theta")} == \
        {"arch": "qwen3", "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 500.0}
    torch.testing.assert_close(_our_logits(model_from_checkpoint(imported), ids), _our_logits(model, ids),
                               atol=0, rtol=0)
    a, b = load_run(run).model, load_run(tmp_path / "imported").model
    assert a.lm_head.weight is not a.transformer.wte.weight
    torch.testing.assert_close(_our_logits(b, ids), _our_logits(a, ids), atol=0, rtol=0)


def test_lora_on_a_qwen3_run_exports_merged(qwen3_run, tiny_tokenizer, tmp_path):
    import train

    run, data = qwen3_run
    train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'lora'}", f"--init_from={run}", *TINY_TRAIN,
                "--max_iters=2", "--eval_interval=2", "--lora_rank=2", "--lora_alpha=4", "--learning_rate=0.1"])
    export_hf(tmp_path / "lora", tmp_path / "hf", which="last")  # best.pt may be iteration 0's, a zero adapter
    merged = model_from_checkpoint(load_checkpoint(tmp_path / "lora" / "last.pt"))
    base = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    from transformers import Qwen3ForCausalLM

    ids = _sequences(tiny_tokenizer.n_vocab)
    with torch.no_grad():
        theirs = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    torch.testing.assert_close(theirs, _our_logits(merged, ids), atol=1e-4, rtol=0)
    assert not torch.allclose(theirs, _our_logits(base, ids), atol=1e-4)  # the adapter is in the export


def test_old_out_dir_spelling_and_command_line_errors(tiny_run, tiny_tokenizer, tmp_path):
    export.main(["--out_dir", str(tiny_run), "--to", "hf", str(tmp_path / "hf")])  # the run to export
    export.main(["--from", "hf", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "back"),  # the run to write
                 "--tokenizer", tiny_tokenizer.identity.path])
    assert (tmp_path / "back" / "best.pt").exists()
    for argv in (["--to", "hf", str(tmp_path / "x")], ["--from", "hf", str(tmp_path / "hf")],
                 ["--run", str(tiny_run), "--from", "hf", str(tmp_path / "hf"), "--tokenizer", "gpt2"]):
        with pytest.raises(SystemExit):
            export.main(argv)


def test_import_refuses_a_qwen3_model_it_cannot_compute(tiny_tokenizer, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="attention biases.*head_dim 16"):
        import_hf(tmp_path / "hf", tmp_path / "imported", tiny_tokenizer.identity.path)
    assert not (tmp_path / "imported").exists()
