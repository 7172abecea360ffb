"""Export to Hugging Face transformers: the model gives our logits, the tokenizer our ids (with the
special tokens at the same ids), a LoRA run exports merged, and export -> import round-trips; for
arch=gpt2 as GPT2LMHeadModel, for arch=qwen3 (GQA, untied head) as Qwen3ForCausalLM."""
import pytest
import torch
from conftest import SHARED_DATA
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
    n = tiny_tokenizer.n_vocab  # the export leaves the padding out
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), _our_logits(model, ids)[..., :n], atol=1e-4, rtol=0)
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
    n = tiny_tokenizer.n_vocab
    ids = _sequences(n)
    with torch.no_grad():
        assert hf(ids).logits.shape[-1] == n  # the padding rows are cut off, as load_run cuts them
        torch.testing.assert_close(hf(ids).logits, _our_logits(model, ids)[..., :n], atol=1e-4, rtol=0)
        # so transformers' log-probabilities are the server's (load_run's), as lm-eval --model hf reads them
        torch.testing.assert_close(hf(ids).logits.log_softmax(-1),
                                   _our_logits(load_run(run).model, ids).log_softmax(-1), atol=1e-4, rtol=0)
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
    assert imported["model_args"]["vocab_size"] == model.config.vocab_size  # padded again, as train.py pads
    torch.testing.assert_close(_our_logits(model_from_checkpoint(imported), ids)[..., :n],
                               _our_logits(model, ids)[..., :n], atol=0, rtol=0)
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
    n = tiny_tokenizer.n_vocab
    torch.testing.assert_close(theirs, _our_logits(merged, ids)[..., :n], atol=1e-4, rtol=0)
    assert not torch.allclose(theirs, _our_logits(base, ids)[..., :n], atol=1e-4)  # the adapter is in the export


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


# ----------------------------------------------------------------------------- chat template, generation


CHATS = [[{"role": "user", "content": "北京是"}],
         [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "长江是中国第一长河吗？"}],
         [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
          {"role": "user", "content": "Python is a programming language"}],
         [{"role": "user", "content": "故宫位于北京市中心"}],
         [{"role": "user", "content": "黄河"}]]
MAX_NEW = 12


def sample_py_chat_replies(run_dir, messages):
    """sample.py --mode=chat's greedy reply to the last user message after `messages` (system prompt
    by --system, the history typed in: each earlier user line gets the model's own reply)."""
    import io

    import sample

    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    lines = [m["content"] for m in messages if m["role"] == "user"]
    out = io.StringIO()
    argv = [f"--out_dir={run_dir}", "--mode=chat", "--temperature=0", f"--max_new_tokens={MAX_NEW}"]
    sample.main(argv + ([f"--system={system}"] if system else []), out=out, lines=io.StringIO("\n".join(lines) + "\n"))
    return [part.split("\n你: ")[0] for part in out.getvalue().split("助手: ")[1:]]


def _greedy_ours(run, ids):
    from engine import generate

    return [step[0] for step in generate(run.model, [ids], MAX_NEW, temperature=0.0,
                                         stop_ids=run.tok.stop_ids("chat"))]


def test_export_carries_the_chat_template_and_generates_what_sample_py_does(tiny_run, tiny_tokenizer, tmp_path,
                                                                             one_thread):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    export_hf(tiny_run, tmp_path / "hf")
    assert "<|user|>" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == [tiny_tokenizer.eot, tiny_tokenizer.end] and gen.pad_token_id == tiny_tokenizer.pad
    run = load_run(tiny_run)
    for messages in CHATS:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == tiny_tokenizer.encode_chat(messages)
        ours = _greedy_ours(run, ids)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        assert theirs == ours, messages
        if len(messages) <= 2:  # one user line: sample.py's reply is this generation, as text
            assert sample_py_chat_replies(tiny_run, messages) == [hf_tok.decode(theirs, skip_special_tokens=True)]
    # a finished conversation is our training layout (it ends with <|endoftext|>)
    done = CHATS[2] + [{"role": "assistant", "content": "是的"}]
    expected = tiny_tokenizer.encode_chat(done, add_generation_prompt=False)
    assert hf_tok.apply_chat_template(done)["input_ids"] == expected


def test_batched_generate_pads_on_the_left_and_equals_unbatched(tiny_run, tiny_tokenizer, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf(tiny_run, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_tok.padding_side == "left"
    batch = hf_tok.apply_chat_template(CHATS, add_generation_prompt=True, padding=True, return_tensors="pt",
                                       return_dict=True)
    with torch.no_grad():
        together = hf.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    width = batch["input_ids"].size(1)
    run = load_run(tiny_run)
    for row, messages in enumerate(CHATS):
        alone = _greedy_ours(run, tiny_tokenizer.encode_chat(messages))
        got = together[row, width:].tolist()
        assert got[:len(alone)] == alone and set(got[len(alone):]) <= {tiny_tokenizer.pad}, messages


def test_gpt2_export_records_n_ctx_for_llama_cpp(tiny_run, tmp_path):
    import json

    export_hf(tiny_run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == load_run(tiny_run).model.config.block_size


# ----------------------------------------------------------------------------- GGUF


def test_gguf_holds_our_weights_tokens_template_and_an_ollama_modelfile(tiny_run, tiny_tokenizer, tmp_path):
    import gguf

    from tokenizer import KIMI_K2_PATTERN

    export.main(["--run", str(tiny_run), "--to", "gguf", str(tmp_path / "g" / "tiny.gguf")])
    reader = gguf.GGUFReader(tmp_path / "g" / "tiny.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert tiny_tokenizer.enc._pat_str == KIMI_K2_PATTERN and field("tokenizer.ggml.pre") == "kimi-k2"
    tokens, spell = field("tokenizer.ggml.tokens"), export.byte_spelling()
    assert len(tokens) == tiny_tokenizer.n_vocab
    for i in range(tiny_tokenizer.n_vocab):
        raw = tiny_tokenizer.enc.decode_single_token_bytes(i)
        assert tokens[i] == (raw.decode() if tiny_tokenizer.is_special(i) else "".join(spell[b] for b in raw))
    assert (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id")) == \
        (tiny_tokenizer.eot, tiny_tokenizer.end)
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == export.chat_template(tiny_tokenizer)
    model = load_run(tiny_run).model
    weights = {t.name: t for t in reader.tensors}
    torch.testing.assert_close(torch.from_numpy(weights["token_embd.weight"].data.copy()),
                               model.transformer.wte.weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(torch.from_numpy(weights["blk.1.attn_qkv.weight"].data.copy()),
                               model.transformer.h[1].attn.c_attn.weight.detach(), atol=0, rtol=0)
    assert "output.weight" not in weights  # tied: llama.cpp reuses the token embedding
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n") and 'PARAMETER stop "<|end|>"' in modelfile
    assert "<|user|>" in modelfile and f"num_ctx {model.config.block_size}" in modelfile


def test_gguf_export_refuses_a_tokenizer_llama_cpp_would_split_otherwise(tmp_path):
    from conftest import TINY_TEXT, make_run

    from tokenizer import HAN_RUNS_PATTERN, train_tokenizer

    old = train_tokenizer([TINY_TEXT] * 20, tmp_path / "old_tok", vocab_size=400, pattern=HAN_RUNS_PATTERN)
    run = make_run(tmp_path / "old_run", old)
    with pytest.raises(SystemExit, match="pattern llama.cpp does not implement"):
        export.main(["--run", str(run), "--to", "gguf", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(SystemExit):
        export.main(["--run", str(run), "--to", "onnx", str(tmp_path / "x")])


# llama.cpp itself (llama-cpp-python, built from its sdist): the GGUF splits text as we do and gives
# sample.py's greedy tokens. Texts chosen where the split patterns of tokenizers differ.
SPLIT_CASES = TEXTS + ["I'm sure they'll say it's 'OK', DON'T 'S 've", "一九〇〇年，人々，々〇", "㐀䶵𠀀𪜀丽 豈",
                       "1234567 ١٢٣ ²³ Ⅻ", "e\u0301 café\u0301 , ,,, !!  ?", "\t\t \n \r\n\n  x\n ",
                       "かなカナ 한국어 ſ's",
                       "price: $3.50/kg — “引号”《书名》", "  ", "\n", "a  b   c    "]


def wiki_lines(n):
    from data_utils import iter_jsonl

    path = SHARED_DATA / "zhwiki" / "zhwiki-13.jsonl"
    if not path.exists():
        return []
    lines = []
    for _, obj in iter_jsonl(path):
        lines += [line for line in obj["text"].split("\n") if line.strip()]
        if len(lines) >= n:
            break
    return lines[:n]


def _llama(path, n_ctx):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                        "llama-cpp-python builds llama.cpp from source)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, seed=0, verbose=False)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_llama_cpp_tokenizes_as_we_do_and_gives_sample_py_greedy_tokens(arch, tiny_run, tiny_tokenizer, tmp_path,
                                                                         request, one_thread):
    run_dir = tiny_run if arch == "gpt2" else request.getfixturevalue("qwen3_run")[0]
    run = load_run(run_dir)
    export.main(["--run", str(run_dir), "--to", "gguf", str(tmp_path / "m.gguf")])
    llm = _llama(tmp_path / "m.gguf", run.model.config.block_size)
    for text in SPLIT_CASES + wiki_lines(200):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tiny_tokenizer.encode(text), text
    stop = tiny_tokenizer.stop_ids("chat")
    for messages in CHATS:
        ids = tiny_tokenizer.encode_chat(messages)
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if token in stop or len(theirs) == MAX_NEW:
                break
        assert theirs == _greedy_ours(run, ids), messages
