"""What every route of server.py reads from a request: typed fields, limits, shared settings.

`typed` / `require` check one field each and raise `ApiError` naming it (the routes turn it into a
JSON 4xx); `parse_settings` reads the sampling settings, token budget, stop strings and seed that
/generate and the OpenAI routes share; `GenerationRequest` is the validated request whichever
route it came from. server.py (the /generate route) and openai_api.py (the OpenAI routes) both
build on this module, so neither imports the other's parsing.
"""
import json
import math
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 10.0
PENALTY_RANGE = (0.5, 2.0)
MIN_TOP_P = 1e-6  # any top_p below the top token's probability (>= 1/vocab) keeps just that token
MAX_STOPS, MAX_STOP_CHARS = 4, 200
RAG_K, MAX_RAG_K = 3, 10  # passages retrieved per question: default and most


class ApiError(Exception):
    def __init__(self, status, message, field=None, error_type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.error_type = status, message, field, error_type



def shown(value, limit=60):
    """A short, always-encodable rendering of a client's value for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")



def typed(body, name, types, default, description):
    """body[name] (or the default) checked against `types`; JSON true/false never counts as a number."""
    value = body.get(name, default)
    if value is None:
        return None
    types = types if isinstance(types, tuple) else (types,)
    wrong_bool = isinstance(value, bool) and bool not in types
    if not isinstance(value, types) or wrong_bool or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {description}, not {shown(value)}", name)
    return value


def require(ok, message, field):
    if not ok:
        raise ApiError(400, message, field)


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this model and server."""
    block_size: int
    vocab_size: int
    max_new_tokens_cap: int

    @property
    def max_prompt_chars(self):
        return 8 * self.block_size  # a cheap bound checked before tokenizing


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, whichever route it came from."""
    prompt: object  # text, a list of {role, content} messages, or (completions) a tuple of prompts: text or ids
    mode: str  # checkpoint.MODES: how the prompt is laid out and which tokens stop the output
    system: object  # a system prompt (str) or None
    prompt_field: str  # the field named when the tokenized prompt is refused
    sampling: dict  # SAMPLING_KEYS
    max_new_tokens: int
    seed: object  # int or None
    stops: tuple
    ignore_eos: bool
    stream: bool
    include_usage: bool = False
    n: int = 1  # choices sharing one prefill (OpenAI routes)
    logprobs: object = None  # None = off, else how many top alternatives each token carries (0..5)
    rag_k: int = 0  # passages retrieved for the question (0 = no retrieval)
    extractive: bool = False  # with rag_k: the answer is the likeliest span of the passages (extractive.py)
    echo: bool = False  # completions: the prompt comes back before the completion (openai_api)


def parse_settings(body, limits, max_tokens_name, defaults):
    """Sampling settings, token budget, stop strings and seed shared by every generating route."""
    number, cap = (int, float), limits.max_new_tokens_cap
    temperature = typed(body, "temperature", number, defaults["temperature"], "a number")
    require(temperature is not None and 0 <= temperature <= MAX_TEMPERATURE,
            f"'temperature' must be between 0 (greedy) and {MAX_TEMPERATURE:g}", "temperature")
    top_k = typed(body, "top_k", int, defaults.get("top_k"), "an integer or null")
    require(top_k is None or top_k >= 0, "'top_k' must be >= 0 (0 or null = off)", "top_k")
    top_p = typed(body, "top_p", number, defaults.get("top_p"), "a number or null")
    require(top_p is None or 0 < top_p <= 1, "'top_p' must be in (0, 1]", "top_p")
    penalty = typed(body, "repetition_penalty", number, 1.0, "a number")
    low, high = PENALTY_RANGE
    require(penalty is not None and low <= penalty <= high,
            f"'repetition_penalty' must be between {low} and {high} (1 = off)", "repetition_penalty")
    max_new = typed(body, max_tokens_name, int, min(DEFAULT_MAX_NEW_TOKENS, cap), "an integer")
    require(max_new is not None and 1 <= max_new <= cap, f"'{max_tokens_name}' must be between 1 and {cap}",
            max_tokens_name)
    seed = typed(body, "seed", int, None, "an integer or null")
    require(seed is None or 0 <= seed < 2**63, "'seed' must be between 0 and 2**63 - 1", "seed")
    stop = typed(body, "stop", (str, list), None, "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    require(len(stop) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop),
            f"'stop' takes at most {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} characters", "stop")
    ignore_eos = typed(body, "ignore_eos", bool, False, "true or false")
    if temperature == 0:  # greedy ignores top-k/top-p; leaving them on would make the batch sort the vocabulary
        top_k = top_p = None
    # values that mean "off" become None, so nothing out of a float32's or an int64's range reaches torch
    top_k = None if not top_k or top_k >= limits.vocab_size else top_k
    top_p = None if top_p is None or top_p == 1 else max(float(top_p), MIN_TOP_P)
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, repetition_penalty=float(penalty))
    return dict(sampling=sampling, max_new_tokens=max_new, seed=seed, stops=tuple(stop), ignore_eos=ignore_eos)


def read_text(body, field, limits):
    text = typed(body, field, str, None, "a string")
    require(text is not None, f"'{field}' is required", field)
    require(len(text) <= limits.max_prompt_chars, f"'{field}' is longer than {limits.max_prompt_chars} characters",
            field)
    return text

