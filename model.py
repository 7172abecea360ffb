"""The GPT decoder (the network only; generation lives in engine.py).

Two architectures, one `GPT` class, chosen by `GPTConfig.arch` (checkpoints without it are gpt2):

- `gpt2` (nanoGPT's, GPT-2 shaped so it exports to `transformers`' GPT2LMHeadModel unchanged):
  token + learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP, biases, tied
  input/output embeddings.
- `qwen3` (the Qwen3 decoder, so it exports to Qwen3ForCausalLM unchanged): no position table but
  rotary embeddings (RoPE, `rope_theta`) on queries and keys, RMSNorm, a per-head RMSNorm on queries
  and keys before RoPE (QK-norm keeps attention logits bounded at high learning rates), a SwiGLU MLP,
  no biases, `n_kv_head` key/value heads shared by groups of query heads (GQA: a smaller KV cache),
  and a tied or untied output layer (`tie_embeddings`). `mlp_act='relu2'` swaps SwiGLU for a
  ReLU-squared MLP of the same parameter count (measured in BENCHMARKS.md; not exportable, since
  Qwen3ForCausalLM has no such MLP).

Both use GPT-2's init (normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer)) and
`F.scaled_dot_product_attention`: `is_causal` in training (flash / memory-efficient kernels on GPU),
an explicit mask only when the caller passes one. RoPE angles come from explicit positions `pos`, so
a row's positions are its own whatever else is in the batch. Attention modules talk to a cache
through one call, `k, v = cache.append(layer, k, v)` with k/v shaped (B, n_kv_head, T, head_dim),
keys already rotated.

`configure_optimizers` gives AdamW alone (today's recipe) or Muon for the hidden weight matrices
plus AdamW for embeddings, the output layer and the 1-D gains (see its docstring).

For generation, `forward` takes a `cache` (engine.py's slot cache: each attention layer calls
`cache.append(layer, k, v)` and attends over what it returns), per-row positions `pos` and an
`attn_mask`; the model knows nothing about slots, windows or sampling.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ARCHS = ("gpt2", "qwen3")
MLP_ACTS = ("swiglu", "relu2")


@dataclass
class GPTConfig:
    block_size: int = 512
    vocab_size: int = 32000
    n_vocab: int | None = None  # the tokenizer's ids; those from here to vocab_size are padding, left out of the loss
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases; keeping them makes the export to transformers exact (gpt2 only)
    arch: str = "gpt2"
    # qwen3 only
    n_kv_head: int = None  # key/value heads (GQA); None: n_head
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    mlp_hidden: int = None  # MLP width; None: GELU's 4x in parameters (SwiGLU: 8/3 * n_embd up to a multiple of 64)
    mlp_act: str = "swiglu"  # qwen3's MLP: 'swiglu' (Qwen3's, exports) or 'relu2' (ReLU squared, nanochat's; no export)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2" and (self.n_kv_head != self.n_head or not self.tie_embeddings):
            raise ValueError("arch gpt2 has n_kv_head == n_head and tied embeddings (the GPT-2 format)")
        if self.arch == "qwen3" and (self.n_embd // self.n_head) % 2:
            raise ValueError("the head size n_embd // n_head must be even (RoPE rotates pairs)")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTS}, not {self.mlp_act!r}")
        if self.arch == "gpt2" and self.mlp_act != "swiglu":
            raise ValueError("arch gpt2 has GPT-2's GELU MLP: mlp_act is a qwen3 setting")
        # the same parameter count either way: 3 matrices of 8/3 n_embd (SwiGLU) or 2 of 4 n_embd (ReLU^2)
        gated = self.mlp_act == "swiglu"
        self.mlp_hidden = self.mlp_hidden or (64 * math.ceil(8 * self.n_embd / 3 / 64) if gated else 4 * self.n_embd)


# ----------------------------------------------------------------------------- gpt2


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, layer=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, cache, layer, attn_mask, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def attend(q, k, v, cache, layer, attn_mask, dropout_p):
    """Causal attention of q (B, H, T, D) over k, v (B, KV, T, D) and whatever the cache holds before them."""
    if cache is not None:
        k, v = cache.append(layer, k, v)
    # is_causal aligns the mask top-left, so it is only right when queries and keys coincide
    causal = attn_mask is None and q.size(2) == k.size(2) and q.size(2) > 1
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout_p, **gqa)


# ----------------------------------------------------------------------------- qwen3


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalised in float32, then a learned gain (eps 1e-6)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_angles(pos, head_dim, theta):
    """(cos, sin) of RoPE for positions `pos` ((T,) or (B, T)), shaped to broadcast over (B, H, T, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)  # Qwen/Llama's "rotate half" layout: pairs (i, i + D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D): one set of positions per row
    return angles.cos(), angles.sin()


def apply_rope(x, rope):
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RotaryAttention(nn.Module):
    """Qwen3 attention: QK-norm per head, RoPE, grouped key/value heads, no biases."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.dropout = config.n_head, config.n_kv_head, config.dropout
        self.head_dim = hd = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, config.n_embd, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache=None, layer=None, attn_mask=None):
        B, T, _ = x.size()
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # keys are cached rotated
        y = attend(q, k, v, cache, layer, attn_mask, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class ReLU2(nn.Module):
    """ReLU squared (Primer; nanochat's MLP): up, relu(x)^2, down. No gate, so two matrices."""

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.relu(self.up_proj(x)).square()))


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        qwen = config.arch == "qwen3"
        norm = (lambda: RMSNorm(config.n_embd)) if qwen else (lambda: nn.LayerNorm(config.n_embd, bias=config.bias))
        self.ln_1 = norm()
        self.attn = RotaryAttention(config) if qwen else CausalSelfAttention(config)
        self.ln_2 = norm()
        self.mlp = (SwiGLU if config.mlp_act == "swiglu" else ReLU2)(config) if qwen else MLP(config)

    def forward(self, x, rope=None, cache=None, layer=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        qwen = config.arch == "qwen3"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if qwen else {"wpe": nn.Embedding(config.block_size, config.n_embd)}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd) if qwen else nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out of the non-embedding count (nanoGPT's
        convention; tied token embeddings count once, with the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def forward(self, idx, targets=None, loss_mask=None, cache=None, attn_mask=None, pos=None):
        """Logits, and the loss when `targets` are given.

        Training: `idx`/`targets` (B, T); the loss is the mean cross-entropy over positions where
        `loss_mask` is true (all positions when it is None). Generation passes a `cache`, explicit
        `pos` (B, T) and, for padded batches, an `attn_mask`; then only the last position's logits
        are computed.
        """
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x, rope = self.transformer.wte(idx), None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_angles(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i, attn_mask)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x if cache is None else x[:, [-1], :]), None
        logits = self.lm_head(x)
        n = self.config.n_vocab or logits.size(-1)  # padding ids are no tokens: not in the softmax
        losses = F.cross_entropy(logits[..., :n].flatten(0, 1).float(), targets.reshape(-1), reduction="none")
        if loss_mask is None:
            return logits, losses.mean()
        mask = loss_mask.reshape(-1).to(losses.dtype)
        return logits, (losses * mask).sum() / mask.sum().clamp(min=1)

    def param_groups(self):
        """(hidden matrices, everything else) among the trainable parameters: the 2-D weights inside
        the blocks, which Muon orthogonalises, and the embeddings, output layer and 1-D gains/biases,
        which AdamW keeps (Muon is made for the hidden layers' matrices only)."""
        hidden, other = [], []
        for name, p in self.named_parameters():  # a tied weight appears once, under its first name
            if p.requires_grad:
                (hidden if p.dim() == 2 and name.startswith("transformer.h.") else other).append(p)
        return hidden, other

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0):
        """AdamW on every parameter (`optimizer='adamw'`), or Muon for the hidden matrices with AdamW
        for the rest (`'muon'`). AdamW decays matrices only (not biases or norm gains); fused on CUDA.

        Each param group carries `lr_scale`, its learning rate relative to `learning_rate`, so one
        schedule drives both (train.py sets lr = schedule * lr_scale); AdamW's groups have 1.0.
        """
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
        hidden, other = self.param_groups()
        adamw_params = hidden + other if optimizer == "adamw" else other
        groups = [
            {"params": [p for p in adamw_params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in adamw_params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                  **({"fused": True} if fused else {}))
        if optimizer == "adamw":
            return adamw
        muon = torch.optim.Muon([{"params": hidden, "lr_scale": muon_lr / learning_rate}], lr=muon_lr,
                                weight_decay=muon_weight_decay, momentum=muon_momentum)
        return Optimizers(muon=muon, adamw=adamw)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * L * H * Q * T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


class Optimizers:
    """Several optimizers stepped as one: what train.py and torch.amp.GradScaler use of an optimizer
    (param_groups, step, zero_grad, state_dict, load_state_dict), with one state dict per name."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]

    def step(self, closure=None):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"the saved optimizer state is for {sorted(state)}, not {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

