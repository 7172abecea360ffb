"""The training recipe: the qwen3 architecture (RoPE positions under left padding, the cache
contract with grouped-query attention, LoRA), the Muon/AdamW optimizer split, exact resume with
Muon, today's AdamW recipe unchanged, and the wsd schedule.

Generation through the engine is tested in test_recipe_generate.py.
"""
from types import SimpleNamespace

import pytest
import torch
from test_train import load, read_log, run

import train
from lora import apply_lora, merge_lora
from model import GPT, GPTConfig

VOCAB, BLOCK = 101, 32
QWEN = dict(arch="qwen3", block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, bias=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def qwen(seed=0, **kw):
    """A tiny qwen3 model with weights far from the init (so every part of the computation matters)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**QWEN, **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


class ListCache:
    """The cache contract the attention modules use, kept as plain lists (and the shapes it saw)."""

    def __init__(self, n_layer):
        self.k, self.v, self.shapes = [None] * n_layer, [None] * n_layer, []

    def append(self, layer, k, v):
        self.shapes.append((tuple(k.shape), tuple(v.shape)))
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        return self.k[layer], self.v[layer]


ROWS = [[5, 17, 3, 44, 9, 12, 80], [60, 2], [33, 34, 35, 36]]


def left_padded(rows):
    """idx, per-row positions and the attention mask of a left-padded batch (as the generator builds them)."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        valid[i, T - len(r):] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
    return idx, pos, mask[:, None], valid


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_left_padded_batch_equals_each_row_alone(n_kv_head):
    """A ragged, left-padded batch with per-row positions gives every row the logits it gets alone
    (positions 0..len-1), GQA included; and the positions given are the ones RoPE uses."""
    m = qwen(n_kv_head=n_kv_head)
    idx, pos, mask, valid = left_padded(ROWS)
    with torch.no_grad():
        batch, _ = m(idx, attn_mask=mask, pos=pos)
        ignored, _ = m(idx, attn_mask=mask, pos=torch.zeros_like(pos))  # were pos not used, this would agree
        for i, r in enumerate(ROWS):
            alone, _ = m(torch.tensor([r]))
            torch.testing.assert_close(batch[i, valid[i]], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(ignored[0, valid[0]], batch[0, valid[0]], atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cache_gets_rotated_kv_heads_and_decoding_equals_recomputing(n_kv_head):
    m = qwen(n_kv_head=n_kv_head)
    seq = [5, 17, 3, 44, 9, 12, 80, 7, 1, 2]
    cache = ListCache(m.config.n_layer)
    with torch.no_grad():
        full, _ = m(torch.tensor([seq]))
        m(torch.tensor([seq[:6]]), cache=cache, pos=torch.arange(6)[None])
        steps = [m(torch.tensor([[t]]), cache=cache, pos=torch.tensor([[p]]))[0][0, -1]
                 for p, t in enumerate(seq[6:], start=6)]
    head_dim = 32 // 4
    assert cache.shapes[0] == ((1, n_kv_head, 6, head_dim),) * 2  # prefill: (B, n_kv_head, T, head_dim)
    assert cache.shapes[-1] == ((1, n_kv_head, 1, head_dim),) * 2
    assert cache.k[0].shape == (1, n_kv_head, len(seq), head_dim)
    for j, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[0, 6 + j], atol=1e-5, rtol=0)


def test_config_checks_and_old_checkpoints_are_gpt2():
    assert GPTConfig(n_layer=1, n_head=2, n_embd=8).arch == "gpt2"  # model_args saved before `arch` existed
    assert not hasattr(GPT(GPTConfig(**QWEN)).transformer, "wpe")
    with pytest.raises(ValueError, match="arch must be"):
        GPTConfig(arch="llama")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(**{**QWEN, "n_kv_head": 3})
    with pytest.raises(ValueError, match="GPT-2 format"):
        GPTConfig(n_layer=1, n_head=2, n_embd=8, tie_embeddings=False)


def test_untied_output_layer_is_its_own_parameter():
    tied, untied = GPT(GPTConfig(**QWEN)), GPT(GPTConfig(**QWEN, tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == VOCAB * 32


# ----------------------------------------------------------------------------- LoRA


def test_lora_on_qwen3_targets_its_projections_and_merges_exactly():
    m = qwen(n_kv_head=2)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    apply_lora(m, rank=2, alpha=4)
    adapted = sorted({n.rsplit(".", 1)[0].split(".", 3)[-1] for n, p in m.named_parameters() if p.requires_grad})
    assert adapted == ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj",
                       "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
        unmerged, _ = m(x)
        merged, _ = merge_lora(m)(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged, qwen(n_kv_head=2)(x)[0], atol=1e-3)  # the adapter did change the model


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("kw", [dict(arch="gpt2", bias=True), dict(tie_embeddings=True), dict(tie_embeddings=False)])
def test_muon_and_adamw_groups_cover_every_trainable_parameter_once(kw):
    m = GPT(GPTConfig(**{**QWEN, **kw}))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", muon_lr=0.02)
    muon, adamw = opt.optimizers["muon"], opt.optimizers["adamw"]
    grouped = [p for o in (muon, adamw) for g in o.param_groups for p in g["params"]]
    trainable = [p for p in m.parameters() if p.requires_grad]  # a tied weight once
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    names = {id(p): n for n, p in m.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert muon_names and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in muon_names)
    assert all(m.get_parameter(n).dim() == 2 for n in muon_names)
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "transformer.wte.weight" in adamw_names
    assert ("lm_head.weight" in adamw_names) == (not m.config.tie_embeddings)
    assert [g["lr_scale"] for g in opt.param_groups] == pytest.approx([20.0, 1.0, 1.0])


def test_lora_with_muon_optimizes_only_the_adapters():
    m = apply_lora(GPT(GPTConfig(**QWEN)), rank=2, alpha=4)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in m.parameters() if p.requires_grad} and len(grouped) == 2 * 7 * 2


def _old_configure_optimizers(model, weight_decay, learning_rate, betas):
    """configure_optimizers as it was before the optimizer setting existed (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def test_adamw_setting_trains_exactly_as_before():
    models = [GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [models[0].configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", "adamw"),
            _old_configure_optimizers(models[1], 0.1, 1e-2, (0.9, 0.95))]
    cfg = SimpleNamespace(learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=None, max_iters=5)
    gen = torch.Generator().manual_seed(0)
    for it in range(5):
        x, y = torch.randint(0, VOCAB, (2, 2, 16), generator=gen)
        lr = train.lr_at(it, cfg)
        for m, opt in zip(models, opts):
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            m(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    cfg = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_iters=2, lr_decay_iters=None, max_iters=12,
                          lr_schedule="wsd", decay_frac=0.25)
    lrs = [train.lr_at(it, cfg) for it in range(14)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2:9] == [1.0] * 7  # stable until the last 25% (3 of 12 steps)
    assert lrs[9:12] == pytest.approx([1.0, 0.7, 0.4]) and lrs[12:] == [0.1, 0.1]


# ----------------------------------------------------------------------------- train.py


QWEN_MUON = ["--arch=qwen3", "--n_kv_head=1", "--tie_embeddings=False", "--optimizer=muon", "--muon_lr=0.05",
             "--lr_schedule=wsd", "--decay_frac=0.5"]


def test_resume_with_muon_is_exact(tmp_path, pretrain_dir):
    common = [*QWEN_MUON, "--dropout=0.1", "--eval_interval=3", "--lr_decay_iters=8"]
    run(pretrain_dir, tmp_path / "whole", "--max_iters=8", *common)
    run(pretrain_dir, tmp_path / "parts", "--max_iters=4", *common)
    run(pretrain_dir, tmp_path / "parts", "--max_iters=8", "--init_from=resume", *common)
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "parts" / "last.pt")
    assert set(a["optimizer"]) == {"muon", "adamw"} and a["optimizer"]["muon"]["state"]  # Muon's momentum is saved
    assert a["model_args"]["arch"] == "qwen3" and a["model_args"]["tie_embeddings"] is False
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    lrs = [line["lr"] for line in read_log(tmp_path / "whole") if "lr" in line]
    assert lrs[2:4] == [1e-2, 1e-2] and lrs[-1] < lrs[3]  # wsd: stable, then decaying


def test_muon_learns_and_its_group_gets_its_own_learning_rate(tmp_path, pretrain_dir, monkeypatch):
    seen = []
    real = train.train_step

    def spy(model, batches, optimizer, *args, **kw):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return real(model, batches, optimizer, *args, **kw)

    monkeypatch.setattr(train, "train_step", spy)
    run(pretrain_dir, tmp_path / "run", "--max_iters=6", "--eval_interval=6", "--sampling=sequential", *QWEN_MUON,
        "--warmup_iters=0", "--lr_decay_iters=100")
    assert seen[0] == pytest.approx([0.05, 1e-2, 1e-2])  # Muon's group, AdamW's two
    evals = [line["val_loss"] for line in read_log(tmp_path / "run") if "val_loss" in line]
    assert evals[-1] < evals[0] - 0.5


def test_bad_recipe_settings_are_refused(tmp_path, pretrain_dir):
    for flag, message in (("--optimizer=sgd", "optimizer must be"), ("--lr_schedule=step", "lr_schedule must be"),
                          ("--decay_frac=0", "decay_frac"), ("--arch=qwen3 --n_kv_head=3", "multiple of n_kv_head")):
        with pytest.raises(SystemExit, match=message):
            run(pretrain_dir, tmp_path / "bad", "--max_iters=1", *flag.split())


def test_gradient_accumulation_with_muon_equals_one_big_batch(tmp_path, sft_dir):
    """The summed, count-normalised loss gives Muon the same gradient however a step is split."""
    logs = []
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}"
        run(sft_dir, out, "--max_iters=3", "--sampling=sequential", f"--batch_size={batch}",
            f"--gradient_accumulation_steps={accum}", "--eval_interval=100", *QWEN_MUON)
        logs.append([line for line in read_log(out) if "loss" in line])
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
