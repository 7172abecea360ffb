"""The generation engine: batch-independent decoding with iteration-level scheduling.

Everything that turns a model into tokens lives here (model.py is only the network). Two entry
points:

- `Engine(model, max_batch, prefill_chunk)`: requests come and go. `add()` queues one, `cancel()`
  drops it, `step()` runs one scheduler iteration (one decode step for every running row, then
  admission and prefill of waiting requests) and returns the tokens it produced as `Event`s. The
  server drives it from one worker thread; the engine itself holds no locks and no threads.
- `generate(model, prompts, ...)`: a batch of prompts, one list per step (token or None per row),
  built on the Engine. Used by sample.py, checkpoint.py (arena, evaluations) and the benchmarks.

Design:
- A row's tokens are a function of its own prompt and settings only, never of its batch-mates.
  Each row has its own cache length, positions (0..len-1), window and random generator. The
  window is `block_size - 1` tokens (training never sees the last position); a row whose own
  length reaches it slides alone: its cache is rebuilt from the last half of its own window (one
  rebuild every window/2 tokens instead of one per token).
- Slot cache: `(n_layer, max_batch, n_kv_head, block_size, head_dim)`, every row left-aligned in
  its slot, so no padding and no per-row offsets. Decoding rows are kept compact in slots [0, n)
  (when one leaves, the last one moves into its slot), so a decode step reads the cache through
  views, and when all lengths are equal (a same-length batch) it needs no mask at all. The model
  only sees `cache.append(layer, k, v)`, which returns all keys/values of the rows being run.
- Prefill runs apart from decoding, in chunks of `prefill_chunk` tokens per row per step and about
  `prefill_chunk` tokens per step in all (at least one chunk), so a long prompt does not stall the
  running streams. A row whose window slid is rebuilt first and in one piece (it is a running
  stream). Rows whose chunks have the same offset and length share one forward.
- Sampling: one uniform per sampled token from the row's own `torch.Generator` (CPU, seeded with
  the row's seed), then inverse CDF over the filtered probabilities, batched. Greedy rows draw
  nothing. A row whose filtered distribution is empty or not finite falls back to greedy, alone.
  Penalties change the logits first: `repetition_penalty` on every token seen (prompt included),
  OpenAI's `presence_penalty` / `frequency_penalty` by the row's own counts of generated tokens.
- `n > 1` (up to 4) rows share one prefill: the cache is copied into their slots, and row i uses
  seed + i.
- Extractive answers (`span`, an `extractive.Spans`): when such a row's prompt is prefilled, the
  maximum-likelihood candidate span is found by teacher forcing over the row's own slot cache
  (`extractive.search`), and the row then emits its tokens and the end token, whatever the sampling
  settings (the answer is the model's likeliest span, not a draw); logprobs stay the model's own. A
  small reader that has not learned to copy invents names that are in no passage; held to spans it
  answers from the text. No candidate (no passage) gives the end token alone: an empty answer.
"""
import math
import numbers
from collections import deque
from itertools import groupby
from typing import NamedTuple

import torch

from extractive import Spans, search

MAX_LOGPROBS = 5
MAX_N = 4
PENALTY_RANGE = (0.01, 100.0)  # repetition_penalty outside it is refused: it only destroys the text
COUNT_PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty: OpenAI's range


class Event(NamedTuple):
    """One generated token. `request` is what `Engine.add` returned, `index` the row of that request
    (0..n-1). `logprob` is log_softmax of the model's raw logits (before temperature and penalty)
    at `token`; `top_logprobs` the likeliest (token, logprob) pairs when asked for, else None.
    `finish_reason` is "stop" (a stop id), "length" (max_new_tokens) or None (more follows)."""
    request: int
    index: int
    token: int
    logprob: float
    top_logprobs: list | None
    finish_reason: str | None


# ----------------------------------------------------------------------------- the cache

class SlotCache:
    """Keys and values of every layer for `max_batch` slots of `block_size` positions each.

    Before each forward the engine `plan`s which slots it runs and where their new tokens go; the
    model's attention then calls `append(layer, k, v)` and gets back every key/value of those rows.
    """

    def __init__(self, config, max_batch, device, dtype):
        n_kv_head = getattr(config, "n_kv_head", None) or config.n_head
        shape = (config.n_layer, max_batch, n_kv_head, config.block_size, config.n_embd // config.n_head)
        # zeros, not empty: a short row's attention reads the positions past its end with weight 0,
        # and 0 * NaN from uninitialised memory would still be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.plan(slice(0, 0), 0, 0)

    def plan(self, rows, start, end):
        """The next forward runs slots `rows` (a slice or a LongTensor); its tokens go to positions
        [start, start + T). `start` is an int, or a LongTensor of per-row positions for one new token
        per row; `end` is the number of positions the attention reads (the longest row)."""
        self.rows, self.start, self.end = rows, start, end

    def append(self, layer, k, v):
        ks, vs = self.k[layer], self.v[layer]
        if isinstance(self.start, int):
            ks[self.rows, :, self.start:self.start + k.size(2)] = k
            vs[self.rows, :, self.start:self.start + k.size(2)] = v
        else:  # one token per row, each at its own position
            rows = torch.arange(k.size(0), device=k.device)
            ks[rows, :, self.start] = k[:, :, 0]
            vs[rows, :, self.start] = v[:, :, 0]
        return ks[self.rows, :, :self.end], vs[self.rows, :, :self.end]

    def copy(self, src, dst, length):
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap(self, a, b, length_a, length_b):
        """Exchange the first `length_*` positions of slots a and b (0 = nothing worth keeping)."""
        if length_a and length_b:
            for t in (self.k, self.v):
                keep = t[:, a, :, :length_a].clone()
                t[:, a, :, :length_b] = t[:, b, :, :length_b]
                t[:, b, :, :length_a] = keep
        elif length_a:
            self.copy(a, b, length_a)
        elif length_b:
            self.copy(b, a, length_b)


# ----------------------------------------------------------------------------- sampling

def _integer(name, x, low, high):
    """`x` as an int, or ValueError when it is no integer or outside [low, high] (None = open)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be an integer, not {x!r}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name} must be in [{low}, {'...' if high is None else high}], not {x}")
    return int(x)


def check_sampling(temperature, top_k, top_p, repetition_penalty, vocab_size):
    """Validated sampling settings for one row: (temperature, top_k, top_p, penalty) with top_k
    clamped to the vocabulary (0 = off) and top_p 1.0 when off. Raises ValueError."""
    def real(name, x):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number, not {x!r}")
        return float(x)

    temperature = real("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temperature}")
    top_k = _integer("top_k (0 or None = off)", 0 if top_k is None else top_k, 0, None)
    top_p = 1.0 if top_p is None else real("top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    penalty = real("repetition_penalty", repetition_penalty)
    if not PENALTY_RANGE[0] <= penalty <= PENALTY_RANGE[1]:
        raise ValueError(f"repetition_penalty must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}] (1 = off), "
                         f"not {penalty}")
    return temperature, min(int(top_k), vocab_size), top_p, penalty


def check_count_penalties(presence_penalty, frequency_penalty):
    """(presence, frequency) as floats in COUNT_PENALTY_RANGE (0 = off), or ValueError."""
    out = []
    for name, x in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) \
                or not COUNT_PENALTY_RANGE[0] <= x <= COUNT_PENALTY_RANGE[1]:
            raise ValueError(f"{name} must be a number in [{COUNT_PENALTY_RANGE[0]}, {COUNT_PENALTY_RANGE[1]}] "
                             f"(0 = off), not {x!r}")
        out.append(float(x))
    return tuple(out)


def sample_tokens(logits, temperature, top_k, top_p, uniform):
    """Next token per row of `logits` (m, V), float32.

    `temperature` (m,) float, 0 = greedy; `top_k` (m,) long, 0 = off; `top_p` (m,) float, 1 = off;
    `uniform` (m,) in (0, 1]: the row's own random number (ignored by greedy rows). Inverse CDF:
    the first token whose cumulative probability reaches uniform * total, so a token of
    probability 0 is never chosen and no renormalisation is needed.
    """
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    x = logits / temperature.clamp(min=1e-5)[:, None]
    if bool((top_k > 0).any()):
        # a partial top-k instead of sorting the whole vocabulary: the k-th largest logit of each
        # row is its threshold
        kth = x.topk(int(top_k.max()), dim=-1).values
        kth = kth.gather(-1, (top_k.clamp(min=1) - 1)[:, None])
        x = x.masked_fill((x < kth) & (top_k > 0)[:, None], float("-inf"))
    if bool((top_p < 1).any()):
        sorted_x, order = x.sort(-1, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first always stays, so
        # a top_p that underflows to 0 is greedy, not empty
        drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
        drop[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    cdf = x.softmax(-1).cumsum(-1)
    total = cdf[:, -1]
    picked = torch.searchsorted(cdf, (uniform * total)[:, None]).squeeze(-1).clamp(max=logits.size(-1) - 1)
    usable = hot & torch.isfinite(total) & (total > 0)
    return torch.where(usable, picked, greedy)


# ----------------------------------------------------------------------------- the engine

class _Row:
    """One output stream: a request has n of them."""

    def __init__(self, request, index, tokens, max_new_tokens, settings, stop_ids, seed, logprobs, span=None):
        self.request, self.index = request, index
        self.tokens = tokens  # the row's window: cached tokens first, then those still to run
        self.length = 0  # cache positions filled (tokens[:length])
        self.slot = None
        self.decoding = False  # in the compact decode region [0, n_decoding)
        self.produced, self.max_new_tokens = 0, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.penalty = settings
        self.stop_ids, self.logprobs = stop_ids, logprobs
        self.generator = torch.Generator().manual_seed(seed % 2**64)
        self.seen = None  # (V,) bool of tokens seen, only when a repetition penalty is on
        self.presence, self.frequency = 0.0, 0.0  # OpenAI's penalties on the tokens generated so far
        self.counts = None  # (V,) float: how often each token was generated, only when one of them is on
        self.stepped = -1  # the last step that emitted a token of this row
        self.siblings = []  # rows of the same request waiting for this row's prefill
        self.span = span  # an extractive.Spans, or None
        self.plan = None  # an extractive row's answer (tokens + end), found when its prompt is prefilled


class Engine:
    """Continuous batching over a slot cache; see the module docstring. Not thread-safe: one
    thread calls add/cancel/step."""

    def __init__(self, model, max_batch=16, prefill_chunk=256):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1")
        self.model = model.eval()
        param = next(model.parameters())
        self.device, config = param.device, model.config
        self.vocab_size, self.window = config.vocab_size, config.block_size - 1
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.cache = SlotCache(config, max_batch, self.device, param.dtype)
        self.slots = [None] * max_batch  # the row in each slot
        self.n_decoding = 0
        self.waiting = deque()  # requests (lists of rows) not admitted yet
        self.prefilling = []  # rows in a slot whose window is not (fully) in the cache
        self.requests = {}  # request id -> its rows still alive
        self.next_id = 0
        self.steps = 0

    # ---- the public interface

    def add(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
            stop_ids=(), seed=None, logprobs=0, n=1, span=None, presence_penalty=0.0,
            frequency_penalty=0.0):
        """Queue a request; return its id (the `request` of its events).

        `ids`: the prompt (a prompt longer than the window keeps its end). Sampling settings as in
        `generate`; a row stops after a token in `stop_ids` or after `max_new_tokens`. `seed` None
        draws one from torch's generator. `logprobs` (0..5): how many top alternatives each event
        carries. `n` (1..4, at most max_batch): rows sharing one prefill, row i seeded with seed + i.
        `span`: an `extractive.Spans`, the candidates of an extractive answer (its end token must be
        a stop id); the rows then emit the likeliest candidate. `presence_penalty`,
        `frequency_penalty` (-2..2, OpenAI's): subtracted from a token's logit once it was generated,
        and per time it was. Raises ValueError on bad settings; nothing is queued then."""
        ids = list(ids)
        if not ids:
            raise ValueError("every prompt needs at least one token")
        if not all(isinstance(t, numbers.Integral) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size})")
        _integer("max_new_tokens", max_new_tokens, 1, None)
        _integer("logprobs", logprobs, 0, MAX_LOGPROBS)
        _integer("n", n, 1, min(MAX_N, self.max_batch))  # more rows than slots would never be admitted
        if seed is not None:
            _integer("seed", seed, None, None)
        if not all(isinstance(t, numbers.Integral) for t in stop_ids):
            raise ValueError("stop_ids must be integers")
        if span is not None:
            if not isinstance(span, Spans):
                raise ValueError("a span must be an extractive.Spans (extractive.answer_spans)")
            if span.end not in stop_ids:
                raise ValueError("an extractive answer ends with its end token: it must be one of stop_ids")
            if not all(0 <= t < self.vocab_size for seq in span.ids for t in seq):
                raise ValueError(f"span token ids must be in [0, {self.vocab_size})")
        settings = check_sampling(temperature, top_k, top_p, repetition_penalty, self.vocab_size)
        counting = check_count_penalties(presence_penalty, frequency_penalty)
        if seed is None:  # drawn from torch's global generator, so torch.manual_seed still reproduces runs
            seed = int(torch.randint(0, 2**62, (1,)))
        request, self.next_id = self.next_id, self.next_id + 1
        ids, stop_ids = ids[-self.window:], frozenset(int(t) for t in stop_ids)
        rows = [_Row(request, i, list(ids), int(max_new_tokens), settings, stop_ids, int(seed) + i, int(logprobs),
                     span) for i in range(n)]
        if settings[3] != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(ids, device=self.device)] = True
            for row in rows:
                row.seen = seen.clone()
        if any(counting):
            for row in rows:
                row.presence, row.frequency = counting
                row.counts = torch.zeros(self.vocab_size, device=self.device)
        rows[0].siblings = rows[1:]
        self.requests[request] = rows
        self.waiting.append(rows)
        return request

    def cancel(self, request):
        """Drop a request, queued or running; its slots are free at once. False if it was gone."""
        rows = self.requests.pop(request, None)
        if rows is None:
            return False
        if self.waiting and rows in self.waiting:
            self.waiting.remove(rows)
        for row in sorted(rows, key=lambda r: -1 if r.slot is None else r.slot, reverse=True):
            if row.slot is not None:
                self._leave(row)
        return True

    def has_work(self):
        return bool(self.requests)

    def running(self):
        """Rows holding a slot (decoding or being prefilled)."""
        return sum(row is not None for row in self.slots)

    @torch.no_grad()
    def step(self):
        """One scheduler iteration; returns the Events it produced (at most one per row)."""
        self.steps += 1
        events = []
        self._decode(events)
        self._admit()
        self._prefill(events)
        return events

    # ---- slots

    def _swap(self, a, b):
        if a == b:
            return
        ra, rb = self.slots[a], self.slots[b]
        self.cache.swap(a, b, ra.length if ra else 0, rb.length if rb else 0)
        self.slots[a], self.slots[b] = rb, ra
        for row, slot in ((ra, b), (rb, a)):
            if row is not None:
                row.slot = slot

    def _leave_decoding(self, row):
        """Move a row out of the decode region, keeping the region compact."""
        self._swap(row.slot, self.n_decoding - 1)
        self.n_decoding -= 1
        row.decoding = False

    def _leave(self, row):
        """Free a row's slot (finished or cancelled)."""
        row.length = 0  # nothing of it worth copying
        if row.decoding:
            self._leave_decoding(row)
        if row in self.prefilling:
            self.prefilling.remove(row)
        self.slots[row.slot], row.slot = None, None
        alive = self.requests.get(row.request)
        if alive is not None:
            alive.remove(row)
            if not alive:
                del self.requests[row.request]

    def _admit(self):
        free = [s for s in range(self.n_decoding, self.max_batch) if self.slots[s] is None]
        while self.waiting and len(self.waiting[0]) <= len(free):
            rows = self.waiting.popleft()
            for row in rows:
                row.slot = free.pop(0)
                self.slots[row.slot] = row
            self.prefilling.append(rows[0])

    # ---- the two kinds of forward

    def _decode(self, events):
        n = self.n_decoding
        if n == 0:
            return
        rows = self.slots[:n]
        lengths = [row.length for row in rows]
        idx = torch.tensor([[row.tokens[row.length]] for row in rows], device=self.device)
        pos = torch.tensor(lengths, device=self.device)[:, None]
        end = max(lengths) + 1
        if min(lengths) == end - 1:  # a same-length batch: plain slices, no mask
            self.cache.plan(slice(0, n), lengths[0], end)
            mask = None
        else:
            self.cache.plan(slice(0, n), pos[:, 0], end)
            mask = (torch.arange(end, device=self.device) <= pos)[:, None, None, :]
        logits, _ = self.model(idx, cache=self.cache, attn_mask=mask, pos=pos)
        for row in rows:
            row.length += 1
        self._emit(rows, logits[:, -1, :], events)
        for row in rows:
            if row.slot is not None and row.length == 0:  # slid: back to prefill, its cache is rebuilt
                self._leave_decoding(row)
                self.prefilling.append(row)

    def _prefill(self, events):
        work, budget = [], self.prefill_chunk
        # rows whose window slid are running streams: they go first and in one piece (half a
        # window), so a long prompt being prefilled never stalls them
        for row in sorted(self.prefilling, key=lambda r: r.produced == 0):
            if budget <= 0:
                break
            if row.stepped == self.steps:  # one token per row per step
                continue
            size = len(row.tokens) - row.length
            size = size if row.produced else min(size, self.prefill_chunk)
            work.append((row, size))
            budget -= size
        if not work:
            return
        done, done_logits = [], []
        work.sort(key=lambda w: (w[0].length, w[1]))
        for (start, size), group in groupby(work, key=lambda w: (w[0].length, w[1])):
            rows = [row for row, _ in group]
            slots = [row.slot for row in rows]
            contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
            where = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=self.device)
            idx = torch.tensor([row.tokens[start:start + size] for row in rows], device=self.device)
            pos = torch.arange(start, start + size, device=self.device).expand(len(rows), size)
            mask = None
            if start > 0:  # queries see the cached prefix and the chunk causally
                mask = torch.ones(size, start + size, dtype=torch.bool, device=self.device).tril(start)
            self.cache.plan(where, start, start + size)
            logits, _ = self.model(idx, cache=self.cache, attn_mask=mask, pos=pos)
            for i, row in enumerate(rows):
                row.length += size
                if row.length == len(row.tokens):
                    done.append(row)
                    done_logits.append(logits[i, -1])
        if not done:
            return
        ready, ready_logits = [], []
        for row, logit in zip(done, done_logits):
            self.prefilling.remove(row)
            if row.span is not None and row.plan is None:  # the answer is searched once, on the prompt's cache
                room = min(row.max_new_tokens, self.window - row.length + 1)
                cached = slice(0, row.length)
                row.plan = search(self.model, row.span, self.cache.k[:, row.slot, :, cached],
                                  self.cache.v[:, row.slot, :, cached], logit, room)
                for sibling in row.siblings:
                    sibling.plan = row.plan
            for sibling in row.siblings:  # n > 1: the shared prefill is copied
                self.cache.copy(row.slot, sibling.slot, row.length)
                sibling.tokens, sibling.length = list(row.tokens), row.length
            group = [row] + row.siblings
            row.siblings = []
            ready += group
            ready_logits += [logit] * len(group)
        self._emit(ready, torch.stack(ready_logits), events)
        for row in ready:
            if row.slot is None:
                continue
            if row.length == 0:  # slid right away: prefill again next step
                self.prefilling.append(row)
            else:  # into the decode region
                self._swap(row.slot, self.n_decoding)
                self.n_decoding += 1
                row.decoding = True

    # ---- choosing tokens

    def _emit(self, rows, logits, events):
        """Choose each row's next token from its logits (m, V), append the events, and move each
        row on: finished rows leave, a row at the window slides (its cache is emptied, its window
        keeps its last half: `length == 0` marks it for a new prefill)."""
        raw = logits.float()
        logits = raw
        penalised = [i for i, row in enumerate(rows) if row.seen is not None]
        if penalised:
            logits = raw.clone()
            idx = torch.tensor(penalised, device=self.device)
            seen = torch.stack([rows[i].seen for i in penalised])
            penalty = torch.tensor([rows[i].penalty for i in penalised], device=self.device)[:, None]
            sub = logits[idx]
            logits[idx] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        counted = [i for i, row in enumerate(rows) if row.counts is not None]
        if counted:  # OpenAI's penalties: logit - presence * [count > 0] - frequency * count
            logits = logits.clone() if logits is raw else logits
            idx = torch.tensor(counted, device=self.device)
            counts = torch.stack([rows[i].counts for i in counted])
            presence = torch.tensor([rows[i].presence for i in counted], device=self.device)[:, None]
            frequency = torch.tensor([rows[i].frequency for i in counted], device=self.device)[:, None]
            logits[idx] = logits[idx] - presence * (counts > 0) - frequency * counts
        uniform = [1.0 - float(torch.rand(1, generator=row.generator)) if row.temperature > 0 else 1.0
                   for row in rows]  # (0, 1]
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        if all(row.temperature == 0 for row in rows):
            tokens = logits.argmax(-1)
        else:
            tokens = sample_tokens(logits, column([r.temperature for r in rows], torch.float32),
                                   column([r.top_k for r in rows], torch.long),
                                   column([r.top_p for r in rows], torch.float32), column(uniform, torch.float32))
        planned = [i for i, row in enumerate(rows) if row.plan is not None]
        if planned:  # extractive rows emit their answer, token by token
            tokens = tokens.clone()
            for i in planned:
                tokens[i] = rows[i].plan[rows[i].produced]
        lse = raw.logsumexp(-1)
        chosen = (raw.gather(-1, tokens[:, None])[:, 0] - lse).tolist()
        top = None
        want = max(row.logprobs for row in rows)
        if want:
            values, ids = (raw - lse[:, None]).topk(want, dim=-1)
            top = list(zip(ids.tolist(), values.tolist()))
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.produced += 1
            row.stepped = self.steps
            if row.seen is not None:
                row.seen[token] = True
            if row.counts is not None:
                row.counts[token] += 1
            finish = "stop" if token in row.stop_ids else "length" if row.produced >= row.max_new_tokens else None
            alternatives = None
            if row.logprobs:
                alternatives = list(zip(top[i][0][:row.logprobs], top[i][1][:row.logprobs]))
            events.append(Event(row.request, row.index, token, chosen[i], alternatives, finish))
            if finish:
                self._leave(row)
                continue
            row.tokens.append(token)
            if row.length == self.window:  # the window is full: slide, keeping its last half
                row.tokens = row.tokens[-(self.window // 2):]
                row.length = 0


# ----------------------------------------------------------------------------- a batch at once

def _per_row(value, B, name):
    """One value per row from a scalar or a per-row list."""
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} values for {B} prompts")
        return list(value)
    return [value] * B


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, stop_ids=(), seed=None, spans=None):
    """Stream tokens for a batch of prompts (lists of ids): yields [token or None per row] per step.

    Sampling settings and `seed` are scalars or one value per row; an int seed seeds every row with
    it (so identical prompts with one seed give identical samples: pass seed + i for different
    ones). Each row's tokens are exactly what it would get alone. A row stops after yielding a token
    in `stop_ids` or after `max_new_tokens` and yields None afterwards; the generator ends when
    every row has stopped. Closing it early stops the work. `spans`: per row, None or an
    `extractive.Spans` (the row emits the likeliest candidate span, `Engine.add`).
    """
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts")
    spans = [None] * B if spans is None else list(spans)
    if len(spans) != B:
        raise ValueError(f"spans needs one value for each of the {B} prompts")
    engine = Engine(model, max_batch=B, prefill_chunk=B * model.config.block_size)  # every prompt at once
    settings = [_per_row(v, B, name) for v, name in ((temperature, "temperature"), (top_k, "top_k"),
                                                      (top_p, "top_p"), (repetition_penalty, "repetition_penalty"),
                                                      (seed, "seed"))]
    rows = [engine.add(prompt, max_new_tokens, temperature=t, top_k=k, top_p=p, repetition_penalty=r,
                       stop_ids=stop_ids, seed=s, span=span)
            for prompt, t, k, p, r, s, span in zip(prompts, *settings, spans)]
    row_of = {request: i for i, request in enumerate(rows)}
    # rows advance in step, but a row whose window slides or whose prompt is long can lag a step:
    # tokens wait here until every running row has one, so step k holds each row's k-th token
    pending = [deque() for _ in range(B)]
    finished = [False] * B
    while True:
        while all(pending[i] or finished[i] for i in range(B)) and any(pending):
            yield [pending[i].popleft() if pending[i] else None for i in range(B)]
        if all(finished):
            return
        for event in engine.step():
            i = row_of[event.request]
            pending[i].append(event.token)
            finished[i] = finished[i] or event.finish_reason is not None
