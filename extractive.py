"""Extractive answers: the maximum-likelihood span of the passages a model was shown.

    spans = answer_spans(tok, passages_text, question)         # the candidates (front ends build them)
    engine.add(prompt_ids, 32, stop_ids=[tok.eot], span=spans)  # the engine searches, then emits the winner

- Candidates (`answer_spans`): every substring of the shown passages that starts and ends on a
  character (Python str slicing cannot cut one) and is at most `max_chars` characters long; not
  across lines (a RAG prompt puts one passage a line), never starting or ending with whitespace,
  deduplicated by text. `gate` > 0 keeps only substrings of the `gate` sentences sharing most
  terms with the question (`retrieval.overlaps`, the bigrams BM25, `fit_passage` and the
  best-overlap rule use). The default is 1: issue 23 measured it best with the pipeline's
  fine-tuned model (DRCD test F1 14.9, against 9.6 over every sentence), and it is
  10x cheaper (BENCHMARKS.md, "Max-likelihood span search").
- Each candidate is written as `tok.encode(text)`: the tokens the model was trained to emit for that
  answer. An answer whose characters sit inside merged passage tokens (the passage has `长江大桥`
  as one token, the answer is `长江`) is a candidate like any other; copying passage tokens could not
  say it (9 to 14% of DRCD dev answers, issue 23).
- Score (`score_spans`): log P(tokens + [end] | prompt), by teacher forcing over the prompt's key/value
  cache. The candidates form a trie (shared prefixes are run once); its nodes are packed into rows
  of `ROW_NODES`, each row closed under ancestors (a subtree that does not fit starts a new row
  that repeats its ancestor chain), run in batches of rows with a tree mask: a node sees the whole
  prompt, its ancestors and itself, at position prompt length + depth - 1. That equals running each
  candidate alone after the prompt (tested against full forwards). The model's `forward` returns only
  the last position's logits under a cache, so the hidden states are read off its final norm
  (a forward hook) and put through its output layer here, only for the nodes that need them.
- Choice (`choose`): `norm` "sum" is the joint log-probability; "mean" (the default; issue 23: F1
  9.6 against the sum's 6.9) divides by the tokens scored (the answer's plus the end token), so long
  spans are not penalised for their length alone. Ties go to the earlier candidate (shorter,
  earlier in the passage).
- The engine (engine.py) calls `search` when an extractive row's prompt is prefilled, with the row's
  slot cache, and then emits the winner's tokens and the end token, with the model's own logprobs.
  The search runs inside that engine step (about 0.3 CPU-seconds for a 500-character passage with
  the CPU preset's model), so other streams wait that long once.
  An empty candidate set (no passage was shown) answers with the end token alone: an empty answer.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data_utils import split_sentences
from retrieval import overlaps

MAX_SPAN_CHARS = 24
NORMS = ("sum", "mean")
DEFAULT_NORM = "mean"
DEFAULT_GATE = 1  # sentences kept by the lexical gate (0 = every sentence)
ROW_NODES = 128  # trie nodes packed into one row of a scoring forward
ROWS_PER_FORWARD = 8
MAX_CANDIDATES = 50_000  # a safety limit: 2,000 characters of passages at the default length


@dataclass
class Spans:
    """An extractive row's candidate answers: `texts`, their tokens `ids` (`tok.encode(text)`),
    the token that ends an answer (`end`, the EOT) and how scores are compared (`norm`)."""
    texts: list
    ids: list
    end: int
    norm: str = DEFAULT_NORM
    chosen: int | None = field(default=None, compare=False)  # set by `search`: the winner's index

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if len(self.texts) != len(self.ids):
            raise ValueError("one token list per candidate text")
        if len(self.ids) > MAX_CANDIDATES:
            raise ValueError(f"{len(self.ids)} candidate spans; at most {MAX_CANDIDATES}")


def gated_sentences(text, question, gate):
    """The `gate` sentences of `text` sharing most terms with `question` (ties: the earlier), in
    text order; all of them when `gate` is 0 or there is no question."""
    sentences = [s for s in split_sentences(text) if s.strip()]
    if not gate or not question or len(sentences) <= gate:
        return sentences
    overlap = overlaps(sentences, question)
    keep = sorted(sorted(range(len(sentences)), key=lambda i: -overlap[i])[:gate])
    return [sentences[i] for i in keep]


def candidate_texts(text, max_chars=MAX_SPAN_CHARS, question=None, gate=0):
    """Every substring of `text`'s lines (of the gated sentences when `gate` > 0) of 1..max_chars
    characters that neither starts nor ends with whitespace, each once, in order of first place."""
    pieces = gated_sentences(text, question, gate) if gate else (text or "").split("\n")
    seen = {}
    for piece in pieces:
        for i, c in enumerate(piece):
            if c.isspace():
                continue
            for j in range(i + 1, min(len(piece), i + max_chars) + 1):
                if not piece[j - 1].isspace():
                    seen.setdefault(piece[i:j], None)
    return list(seen)


def answer_spans(tok, text, question=None, max_chars=MAX_SPAN_CHARS, gate=DEFAULT_GATE, norm=DEFAULT_NORM):
    """The candidates of an extractive answer to `question` from the passages `text` (one a line;
    None or empty: no candidate, so the answer is empty)."""
    texts = candidate_texts(text or "", max_chars, question, gate)
    return Spans(texts, tok.encode_batch(texts) if texts else [], tok.eot, norm)


# ----------------------------------------------------------------------------- scoring


class _Trie:
    """The candidates' token sequences as a trie; node 0 is the prompt's end."""

    def __init__(self, seqs):
        self.children, self.token, self.parent, self.depth = [{}], [-1], [-1], [0]
        self.ends = []
        for seq in seqs:
            node = 0
            for t in seq:
                nxt = self.children[node].get(t)
                if nxt is None:
                    nxt = len(self.token)
                    self.children[node][t] = nxt
                    self.children.append({})
                    self.token.append(t)
                    self.parent.append(node)
                    self.depth.append(self.depth[node] + 1)
                node = nxt
            self.ends.append(node)

    def rows(self, size):
        """Rows of at most max(size, depth + 1) node ids, each closed under ancestors (the root
        excepted), every node in at least one row; preorder, so a row holds whole subtrees."""
        size = max(size, max(self.depth) + 1)
        rows, row, stack = [], [], list(reversed(self.children[0].values()))
        while stack:
            node = stack.pop()
            if len(row) >= size:
                rows.append(row)
                chain, up = [], self.parent[node]
                while up > 0:
                    chain.append(up)
                    up = self.parent[up]
                row = chain[::-1]
            row.append(node)
            stack.extend(reversed(self.children[node].values()))
        return rows + ([row] if row else [])


class _Prefix:
    """A cache for `GPT.forward`: every row attends over the same prompt keys/values (n_layer, KV,
    L, D) and then over its own tokens."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def append(self, layer, k, v):
        B = k.size(0)
        return (torch.cat((self.k[layer].expand(B, -1, -1, -1), k), dim=2),
                torch.cat((self.v[layer].expand(B, -1, -1, -1), v), dim=2))


def _row_batch(trie, rows, L, device):
    """Tokens (B, T), positions (B, T) and the tree mask (B, 1, T, L + T) of a batch of rows."""
    T = max(len(r) for r in rows)
    idx = np.zeros((len(rows), T), dtype=np.int64)
    pos = np.full((len(rows), T), L, dtype=np.int64)
    seen = np.zeros((len(rows), T, T), dtype=bool)
    for b, row in enumerate(rows):
        local = {}
        for e, node in enumerate(row):
            idx[b, e], pos[b, e] = trie.token[node], L + trie.depth[node] - 1
            p = local.get(trie.parent[node])
            if p is not None:
                seen[b, e] = seen[b, p]
            seen[b, e, e] = True
            local[node] = e
        seen[b, len(row):, :] = np.eye(T, dtype=bool)[len(row):]  # padding sees the prompt and itself
    mask = torch.cat((torch.ones(len(rows), T, L, dtype=torch.bool), torch.from_numpy(seen)), dim=2)
    return (torch.from_numpy(idx).to(device), torch.from_numpy(pos).to(device), mask[:, None].to(device))


@torch.no_grad()
def score_spans(model, prefix_k, prefix_v, first_logits, seqs, end):
    """(log P(seq + [end] | prompt) per seq, tokens scored per seq) as float64 numpy arrays.

    `prefix_k` / `prefix_v` (n_layer, n_kv_head, L, head_dim): the prompt's cache; `first_logits`
    (V,): the model's logits after the prompt. Every seq must be non-empty and fit the window
    (L + len(seq) <= block_size)."""
    trie = _Trie(seqs)
    n_nodes, L = len(trie.token), prefix_k.size(2)
    edge = np.zeros(n_nodes)  # log P(node's token | its parent's path)
    stop = np.zeros(n_nodes)  # log P(end | node's path)
    first = F.log_softmax(first_logits.float(), -1)
    for t, child in trie.children[0].items():
        edge[child] = float(first[t])
    home = set()  # nodes whose log-probs are read already (a repeated ancestor is read once)
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda mod, inp, out: hidden.append(out))
    try:
        rows = trie.rows(ROW_NODES)
        for start in range(0, len(rows), ROWS_PER_FORWARD):
            batch = rows[start:start + ROWS_PER_FORWARD]
            idx, pos, mask = _row_batch(trie, batch, L, prefix_k.device)
            hidden.clear()
            model(idx, cache=_Prefix(prefix_k, prefix_v), attn_mask=mask, pos=pos)
            where, nodes = [], []
            for b, row in enumerate(batch):
                for e, node in enumerate(row):
                    if node not in home:
                        home.add(node)
                        where.append(b * idx.size(1) + e)
                        nodes.append(node)
            h = hidden[-1].flatten(0, 1)[torch.tensor(where, device=hidden[-1].device)]
            logp = F.log_softmax(model.lm_head(h).float(), -1)
            stop[nodes] = logp[:, end].double().cpu().numpy()
            kids = [(i, c, t) for i, node in enumerate(nodes) for t, c in trie.children[node].items()]
            if kids:
                at, child, tok = (torch.tensor(x, device=logp.device) for x in zip(*kids))
                edge[child.cpu().numpy()] = logp[at, tok].double().cpu().numpy()
    finally:
        hook.remove()
    path = np.zeros(n_nodes)
    for node in range(1, n_nodes):  # a parent is always made before its children
        path[node] = path[trie.parent[node]] + edge[node]
    ends = np.array(trie.ends, dtype=np.int64)
    return path[ends] + stop[ends], np.array([trie.depth[e] + 1 for e in ends], dtype=np.float64)


def choose(logprob, n_tokens, norm=DEFAULT_NORM):
    """Index of the best candidate under `norm` (ties: the first), or None when there is none."""
    if len(logprob) == 0:
        return None
    score = logprob if norm == "sum" else logprob / n_tokens
    return int(np.argmax(score))


def search(model, spans, prefix_k, prefix_v, first_logits, max_tokens):
    """The answer an extractive row emits: the best candidate's tokens then `spans.end`; only
    candidates of at most `max_tokens` tokens (with the end token) are scored. Sets `spans.chosen`."""
    keep = [i for i, s in enumerate(spans.ids) if s and len(s) + 1 <= max_tokens]
    best = None
    if keep:
        logprob, n = score_spans(model, prefix_k, prefix_v, first_logits, [spans.ids[i] for i in keep], spans.end)
        best = keep[choose(logprob, n, spans.norm)]
    spans.chosen = best
    return ([] if best is None else list(spans.ids[best])) + [spans.end]
