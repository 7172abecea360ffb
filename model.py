"""The GPT decoder and the one token generator everything samples with.

Model (nanoGPT's, GPT-2 shaped so it exports to `transformers` unchanged): token + learned position
embeddings, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings, GPT-2 init with
residual projections scaled by 1/sqrt(2 * n_layer). Attention goes through
`F.scaled_dot_product_attention`: `is_causal` in training (flash / memory-efficient kernels on GPU),
an explicit mask only when a batch of prompts is left-padded.

Generation (`generate`): prefill the prompts once into a KV cache, then one token per step. Prompts
of different lengths are left-padded; pad keys are masked and each row has its own positions, so a
row's tokens do not depend on what else is in the batch. The window is `block_size - 1` tokens
(what training sees); when a row would pass it, the window slides: the cache is rebuilt from the
last half of the window (a rebuild every window/2 steps instead of every step). It yields one list per step: the new token of each row,
or None once the row has stopped, and is used by sample.py, server.py, sample_gradio.py and the
evaluations alike.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 512
    vocab_size: int = 32000
    n_vocab: int | None = None  # the tokenizer's ids; those from here to vocab_size are padding, left out of the loss
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases; keeping them makes the export to transformers exact


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # is_causal aligns the mask top-left, so it is only right when queries and keys coincide
        causal = attn_mask is None and T == k.size(2) and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
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
        convention; token embeddings are tied to the output layer, so they count once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, loss_mask=None, cache=None, attn_mask=None, pos=None):
        """Logits, and the loss when `targets` are given.

        Training: `idx`/`targets` (B, T); the loss is the mean cross-entropy over positions where
        `loss_mask` is true (all positions when it is None). Generation passes a `cache`, explicit
        `pos` (B, T) and, for padded batches, an `attn_mask`; then only the last position's logits
        are computed.
        """
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, attn_mask)
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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases, LayerNorm gains); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * L * H * Q * T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


class KVCache:
    """Keys and values of every layer for a batch, preallocated to `block_size` positions."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (the same for every row; rows are left-padded)

    def append(self, layer, k, v):
        T = k.size(2)
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if layer == self.k.size(0) - 1:
            self.length = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _prefill(model, rows, device):
    """Left-pad `rows` (lists of ids), run them through a fresh cache; return (cache, valid, logits)."""
    B, T = len(rows), max(len(r) for r in rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, model.config.block_size, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        valid[i, T - len(r):T] = True
    idx, valid = idx.to(device), valid.to(device)
    pos = (valid[:, :T].long().cumsum(1) - 1).clamp(min=0)
    mask = None
    if not bool(valid[:, :T].all()):
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # a pad query attends to itself so that no row of the softmax is empty (NaN)
        mask = (causal & valid[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=device)
        mask = mask[:, None]
    cache = KVCache(model.config, B, device, next(model.parameters()).dtype)
    logits, _ = model(idx, cache=cache, attn_mask=mask, pos=pos)
    return cache, valid, logits[:, -1, :]


def _sample(logits, temperature, top_k, top_p, generator):
    """Next token per row. Each argument is a (B, 1) tensor; temperature 0 means greedy."""
    greedy = logits.argmax(-1)
    logits = logits / temperature.clamp(min=1e-5)
    if top_k is not None:
        # a partial top-k instead of sorting the whole vocabulary: the k-th largest logit of each
        # row is its threshold (rows with top_k 0 keep everything)
        kth = logits.topk(min(int(top_k.max()), logits.size(-1)), dim=-1).values
        kth = kth.gather(-1, (top_k.clamp(min=1) - 1).clamp(max=kth.size(-1) - 1))
        logits = logits.masked_fill((logits < kth) & (top_k > 0), float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    sampled = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return torch.where(temperature.squeeze(-1) == 0, greedy, sampled)


def _per_row(value, B, device, dtype, none_as):
    """A (B, 1) tensor from a scalar or a per-row list; None means "off" (`none_as`)."""
    values = value if isinstance(value, (list, tuple)) else [value] * B
    return torch.tensor([[none_as if v is None else v] for v in values], device=device, dtype=dtype)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, stop_ids=(), seed=None):
    """Stream tokens for a batch of prompts (lists of ids): yields [token or None per row] per step.

    Sampling settings are scalars or one value per row. A row stops after yielding a token in
    `stop_ids` or after `max_new_tokens`; the generator ends when every row has stopped. Closing it
    early stops the work.
    """
    model.eval()
    device = next(model.parameters()).device
    B, V = len(prompts), model.config.vocab_size
    # training sees block_size - 1 positions (x = row[:-1]), so the last position embedding is never
    # trained: the window is one shorter than block_size
    window = model.config.block_size - 1
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows = [list(p)[-window:] for p in prompts]  # a prompt longer than the window keeps its end
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    temp = _per_row(temperature, B, device, torch.float32, 1.0)
    k = _per_row(top_k, B, device, torch.long, 0)
    k = k if bool((k > 0).any()) else None
    p = _per_row(top_p, B, device, torch.float32, 1.0)
    p = p if bool((p < 1.0).any()) else None
    penalty = _per_row(repetition_penalty, B, device, torch.float32, 1.0)
    use_penalty = bool((penalty != 1.0).any())
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    if use_penalty:
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r, device=device)] = True
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)

    cache, valid, logits = _prefill(model, rows, device)
    for step in range(max_new_tokens):
        logits = logits.float()
        if use_penalty:
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        nxt = _sample(logits, temp, k, p, generator)
        out = [int(t) if r else None for t, r in zip(nxt.tolist(), running.tolist())]
        yield out
        running &= ~torch.isin(nxt, stop)
        if step == max_new_tokens - 1 or not bool(running.any()):
            return
        if use_penalty:
            seen[torch.arange(B, device=device), nxt] = True
        for i, t in enumerate(out):
            if t is not None:
                rows[i].append(t)
        if cache.length == window:  # window full: slide it, rebuilding the cache from the tail
            rows = [r[-(window // 2):] for r in rows]
            cache, valid, logits = _prefill(model, rows, device)
            continue
        valid[:, cache.length] = True
        pos = (valid[:, :cache.length + 1].sum(1, keepdim=True) - 1)
        mask = None if bool(valid[:, :cache.length + 1].all()) else valid[:, None, None, :cache.length + 1]
        logits, _ = model(nxt[:, None], cache=cache, attn_mask=mask, pos=pos)
        logits = logits[:, -1, :]
