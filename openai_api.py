"""The OpenAI wire format of server.py: `/v1/completions` and `/v1/chat/completions` bodies read into
a `GenerationRequest`, their answers shaped (`OpenAIReply`), the model card, and the vLLM-style
tokenizer routes that lm-eval's remote tokenizer calls (`/tokenize`, `/detokenize`, `/tokenizer_info`).

server.py keeps the HTTP app, the workers and the routes; everything a client of the OpenAI API
sees on the wire is here, as plain functions and classes that tests call without HTTP.

Design choices:
- Prompts as clients send them. `/v1/completions` takes `prompt` as a string, a list of strings,
  a list of token ids or a list of token-id lists (langchain's `OpenAI` always sends a list; lm-eval
  sends token ids in batches): one choice per prompt times `n`, choice index = prompt * n + i.
  At most MAX_PROMPTS prompts, MAX_CHOICES choices and `MAX_PROMPT_WINDOWS` windows of prompt
  tokens in all; each prompt fits the model's window.
- `echo` (completions): the prompt's text comes back before the completion, and with `logprobs`
  each prompt token's logprob (the first token's is null: nothing precedes it). Those come from
  one teacher-forced forward over the prompt (`inference.Run.prompt_logprobs`), so lm-eval's
  loglikelihood requests (echo, `max_tokens` 1, `logprobs` 1) score exactly what `--model hf`
  scores. `max_tokens: 0` with `echo` scores without generating.
- Logprobs as OpenAI defines them. `logprobs: 0` (completions) or `logprobs: true` without
  `top_logprobs` (chat) gives the chosen token's logprob and no alternatives; `top_logprobs: k`
  gives k distinct token ids. A token's text is its UTF-8 text, or `bytes:\\xe5\\x8f` when it is
  part of a character, or a special token's spelling (`token_text`), so alternatives never collapse
  into one key of completions' dict; chat entries carry the exact `bytes` as well.
- `text_offset[i]` is where token i's text starts in the whole returned text (the prompt's text
  included under `echo`), in characters; a streamed choice's chunks go on counting from where the
  previous chunk ended. A token that completes a character begun by the one before starts at that
  character.
- Stop strings cut text, logprobs and usage alike: a token counts when its text starts before the
  cut (`Progress`), so `completion_tokens` and the logprobs never include the tokens after it.
- Chat content may be a string or a list of `{"type": "text"}` parts (joined with newlines, as
  vLLM does); the `developer` role is the system role. Other parts are a 400 naming the part.
- `presence_penalty` / `frequency_penalty` (-2..2) lower a token's logit once / each time the
  choice generated it (engine.py, per row, so batch-mates never share counts). Fields this server
  cannot honour (`logit_bias`, tools, `suffix`, ...) are refused with a 400 naming the field unless
  they carry their "off" value; never ignored.
- `/tokenize` accepts vLLM's `prompt` as well as `text`; a prompt that is exactly a special token's
  spelling is that token (how lm-eval's remote tokenizer finds the EOS id; generation prompts keep
  user text ordinary). `/tokenizer_info` names the special tokens and the context length
  (`model_max_length`, `max_model_len`), which the model card carries too.
"""
import bisect
import itertools
import json
import time
import uuid
from dataclasses import dataclass

from engine import MAX_LOGPROBS, MAX_N
from request_fields import (
    MAX_RAG_K,
    RAG_K,
    ApiError,
    GenerationRequest,
    parse_settings,
    require,
    typed,
)
from tokenizer import StreamDecoder

MAX_PROMPTS = 32  # prompts in one completions request
MAX_CHOICES = 64  # prompts x n in one request
MAX_PROMPT_WINDOWS = 16  # all prompts of a request together: at most this many windows (block_size) of tokens
MAX_TOKENIZE_CHARS = 100_000  # /tokenize input
MAX_DETOKENIZE_TOKENS = 100_000  # /detokenize input
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
GENERATION_FAILED = {"message": "generation failed", "type": "server_error"}


# ----------------------------------------------------------------------------- reading a request

def message_text(content, field):
    """A message's content as text: a string, or a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    require(isinstance(content, list), f"'{field}' must be a string or a list of text parts", field)
    texts = []
    for j, part in enumerate(content):
        require(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
                f"'{field}[{j}]' must be {{\"type\": \"text\", \"text\": \"...\"}}: only text parts are supported",
                f"{field}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def read_messages(body, limits):
    """`messages` as [{role, content}] with content as text and `developer` as `system`."""
    messages = body.get("messages")
    require(isinstance(messages, list) and messages, "'messages' must be a non-empty list of {role, content}",
            "messages")
    out = []
    for i, m in enumerate(messages):
        require(isinstance(m, dict), f"'messages[{i}]' must be an object with role and content", f"messages[{i}]")
        require(m.get("role") in ROLES, f"'messages[{i}].role' must be system, developer, user or assistant",
                f"messages[{i}].role")
        out.append({"role": ROLES[m["role"]], "content": message_text(m.get("content"), f"messages[{i}].content")})
    require(sum(len(m["content"]) for m in out) <= limits.max_prompt_chars,
            f"'messages' are longer than {limits.max_prompt_chars} characters", "messages")
    return out


def is_ids(value):
    return isinstance(value, list) and len(value) > 0 and all(type(t) is int for t in value)


def read_prompts(body, limits):
    """Completions' `prompt`: a tuple of prompts, each a string or a tuple of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                   or all(is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists", "prompt")
    require(len(prompts) <= MAX_PROMPTS, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS}", "prompt")
    for i, p in enumerate(prompts):
        field = "prompt" if prompts is not prompt else f"prompt[{i}]"
        if isinstance(p, str):
            require(len(p) <= limits.max_prompt_chars,
                    f"'{field}' is longer than {limits.max_prompt_chars} characters", field)
        else:
            require(len(p) <= limits.block_size, f"'{field}' holds {len(p)} tokens; this model reads at most "
                                                 f"{limits.block_size}", field)
            require(all(0 <= t < limits.vocab_size for t in p), f"'{field}' must hold token ids in "
                                                                f"[0, {limits.vocab_size})", field)
    return tuple(p if isinstance(p, str) else tuple(p) for p in prompts)


def read_count(body, name, description):
    value = typed(body, name, int, None, description)
    require(value is None or 0 <= value <= MAX_LOGPROBS, f"'{name}' must be between 0 and {MAX_LOGPROBS}", name)
    return value


# fields a route cannot honour; a value other than "off" is refused rather than ignored
UNSUPPORTED = ("best_of", "suffix", "logit_bias", "response_format", "tools", "tool_choice", "functions",
               "function_call")
OFF_VALUES = {"best_of": (1,), "response_format": ({"type": "text"},), "tool_choice": ("none", "auto")}
COUNT_PENALTIES = ("presence_penalty", "frequency_penalty")


def is_off(name, value):
    if value is None or value is False or (isinstance(value, (str, list, dict)) and not value):
        return True
    return any(type(value) is type(off) and value == off for off in OFF_VALUES.get(name, ()))


def read_rag(body, prompt):
    """The `rag` extension: (question, k, extractive), or None when off."""
    rag = body.get("rag", False)
    if rag is False or rag is None:
        return None
    k = rag.get("k", RAG_K) if isinstance(rag, dict) else RAG_K
    extractive = rag.get("extractive", False) if isinstance(rag, dict) else False
    require((rag is True or (isinstance(rag, dict) and set(rag) <= {"k", "extractive"})) and isinstance(k, int)
            and not isinstance(k, bool) and 1 <= k <= MAX_RAG_K and isinstance(extractive, bool),
            f"'rag' must be true, false or {{\"k\": 1..{MAX_RAG_K}, \"extractive\": true|false}}", "rag")
    if isinstance(prompt, tuple):  # completions: one question
        require(len(prompt) == 1 and isinstance(prompt[0], str), "with 'rag' the prompt must be one string", "prompt")
        return prompt[0], k, extractive
    require(prompt[-1]["role"] == "user", "with 'rag' the last message must be the user's question", "messages")
    return prompt[-1]["content"], k, extractive


def parse_openai(body, api, limits):
    """A `/v1/chat/completions` or `/v1/completions` body (per `api`) as a GenerationRequest."""
    n = typed(body, "n", int, 1, "an integer")
    require(n is not None and 1 <= n <= MAX_N, f"'n' must be between 1 and {MAX_N}", "n")
    for name in api.unsupported:
        require(is_off(name, body.get(name)), f"'{name}' is not supported by this server", name)
    stream = typed(body, "stream", bool, False, "true or false")
    stream_options = typed(body, "stream_options", dict, {}, "an object") or {}
    echo = api.read_echo(body)
    tokens_field = api.max_tokens_field(body)
    score_only = echo and type(body.get(tokens_field)) is int and body[tokens_field] == 0
    settings = parse_settings({**body, tokens_field: 1} if score_only else body, limits, tokens_field,
                              {"temperature": 1.0})
    if score_only:  # max_tokens 0 with echo: the prompt is scored, nothing is generated
        settings["max_new_tokens"] = 0
    for name in COUNT_PENALTIES:  # engine.Engine.add applies them; 0 (off) stays out of the settings
        value = typed(body, name, (int, float), 0, "a number")
        require(value is not None and -2 <= value <= 2, f"'{name}' must be between -2 and 2 (0 = off)", name)
        if value:
            settings["sampling"][name] = float(value)
    prompt, mode, rag_k, extractive = api.read_prompt(body, limits), api.mode, 0, False
    choices = (len(prompt) if isinstance(prompt, tuple) else 1) * n
    require(choices <= MAX_CHOICES, f"{choices} choices (prompts x n); at most {MAX_CHOICES}", "n")
    rag = read_rag(body, prompt)
    if rag is not None:  # an extension: answer the question from the index
        require(not echo, "'echo' does not combine with 'rag'", "echo")
        (prompt, rag_k, extractive), mode = rag, "qa"
    return GenerationRequest(prompt, mode, None, api.prompt_field, stream=stream, n=n,
                             include_usage=stream_options.get("include_usage") is True,
                             logprobs=api.read_logprobs(body), rag_k=rag_k, extractive=extractive, echo=echo,
                             **settings)


def check_prompt_tokens(ids_list, limits, scoring, field="prompt"):
    """Each prompt fits the window (with room for one new token unless it is only scored), and all
    of them together at most MAX_PROMPT_WINDOWS windows."""
    block = limits.block_size
    most = block if scoring else block - 1
    for ids in ids_list:
        require(len(ids) > 0, "the prompt is empty", field)
        require(len(ids) <= most, f"the prompt is {len(ids)} tokens; this model reads at most {most}", field)
    total = sum(len(ids) for ids in ids_list)
    require(total <= MAX_PROMPT_WINDOWS * block,
            f"the prompts hold {total} tokens; at most {MAX_PROMPT_WINDOWS * block} in one request", field)


# ----------------------------------------------------------------------------- tokens as text

def token_text(tok, token):
    """(text, UTF-8 bytes) of one token as OpenAI shows it: its text; `bytes:\\xe5\\x8f` when it is
    part of a character (OpenAI's own spelling), so no two tokens share a text; a special token's
    spelling. `bytes` is always exact."""
    raw = tok.enc.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def text_and_starts(tok, ids):
    """The text of `ids` (as streaming decodes it) and where each token's text starts in it."""
    decoder, starts, text = StreamDecoder(tok), [], []
    length = 0
    for t in ids:
        starts.append(length)
        piece = decoder.push(t)
        text.append(piece)
        length += len(piece)
    text.append(decoder.flush())
    return "".join(text), starts


@dataclass(frozen=True)
class Echo:
    """A prompt returned with its completion: its text, its tokens' logprob entries (None when no
    logprobs were asked) and where each token starts in the text."""
    text: str
    entries: object
    offsets: list


def make_echo(tok, ids, entries):
    text, starts = text_and_starts(tok, ids)
    return Echo(text, entries, starts)


class Progress:
    """One choice's generated tokens as its text goes out: where each token's text starts (offset by
    `base`, the echoed prompt's length), and how many have been sent."""

    def __init__(self, tok, job, base=0):
        self.decoder, self.job, self.base = StreamDecoder(tok), job, base
        self.starts, self.chars, self.sent, self.emitted = [], 0, 0, 0

    def upto(self, text_len):
        """How many tokens start before character `text_len` of the choice's text."""
        for t in self.job.generated[len(self.starts):]:
            self.starts.append(self.chars)
            self.chars += len(self.decoder.push(t))
        return bisect.bisect_left(self.starts, text_len)

    def end(self):
        """The tokens that count: those before a stop string's cut, else all."""
        if self.job.stop_string_hit:
            return self.upto(self.emitted)
        self.upto(0)  # every token's start known
        return self.job.tokens

    def take(self, end):
        """(entries, text offsets) of the tokens from the last taken to `end`."""
        start, self.sent = self.sent, max(self.sent, end)
        return self.job.entries[start:end], [self.base + s for s in self.starts[start:end]]


# ----------------------------------------------------------------------------- the two APIs

class CompletionsApi:
    """`/v1/completions`: prompts continued as text."""
    mode, prompt_field, id_prefix = "text", "prompt", "cmpl"
    object = chunk_object = "text_completion"
    opening = ()  # stream deltas sent before the first piece of text
    closing = ""  # the delta that carries finish_reason
    unsupported = UNSUPPORTED

    def max_tokens_field(self, body):
        return "max_tokens"

    def read_prompt(self, body, limits):
        return read_prompts(body, limits)

    def read_echo(self, body):
        return typed(body, "echo", bool, False, "true or false")

    def read_logprobs(self, body):
        return read_count(body, "logprobs", "an integer or null")

    def logprobs(self, tok, entries, offsets):
        # a prompt's first token has no logprob and no alternatives: null, as OpenAI sends it
        return {"tokens": [token_text(tok, token)[0] for token, _, _ in entries],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if lp is None else {token_text(tok, t)[0]: v for t, v in top or ()}
                                 for _, lp, top in entries],
                "text_offset": list(offsets)}

    def whole_choice(self, index, text, finish, logprobs=None):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk_choice(self, index, delta, finish, logprobs=None):
        return self.whole_choice(index, delta, finish, logprobs)

    def delta(self, piece):
        return piece


class ChatApi:
    """`/v1/chat/completions`: a conversation answered by the assistant."""
    mode, prompt_field, id_prefix = "chat", "messages", "chatcmpl"
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    opening = ({"role": "assistant", "content": ""},)
    closing = {}
    unsupported = UNSUPPORTED + ("echo",)

    def max_tokens_field(self, body):
        return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"

    def read_prompt(self, body, limits):
        return read_messages(body, limits)

    def read_echo(self, body):
        return False

    def read_logprobs(self, body):
        wanted = typed(body, "logprobs", bool, False, "true or false")
        top = read_count(body, "top_logprobs", "an integer or null")
        require(top is None or wanted or top == 0, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if wanted else None

    def logprobs(self, tok, entries, offsets=None):
        def item(token, logprob):
            text, raw = token_text(tok, token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [item(token, lp) | {"top_logprobs": [item(t, v) for t, v in top or ()]}
                            for token, lp, top in entries]}

    def whole_choice(self, index, text, finish, logprobs=None):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def chunk_choice(self, index, delta, finish, logprobs=None):
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, piece):
        return {"content": piece}


CHAT, COMPLETIONS = ChatApi(), CompletionsApi()


# ----------------------------------------------------------------------------- the answer

class OpenAIReply:
    """The OpenAI-shaped answer to one request (its jobs are its choices): a whole completion, or the
    events of a stream. `sources` (RAG) rides on the completion, or on a stream's first event.
    `echoes`: per job, the `Echo` of its prompt or None; `prompt_tokens`: the request's prompt tokens
    (default: the first job's)."""

    def __init__(self, api, model_name, jobs, include_usage=False, tok=None, sources=None, echoes=None,
                 prompt_tokens=None):
        self.api, self.jobs, self.include_usage, self.tok = api, list(jobs), include_usage, tok
        self.sources = sources
        self.echoes = list(echoes) if echoes is not None else [None] * len(self.jobs)
        self.prompt_tokens = len(self.jobs[0].ids) if prompt_tokens is None else prompt_tokens
        self.progress = [Progress(tok, job, len(echo.text) if echo else 0) for job, echo in zip(self.jobs, self.echoes)]
        self.head = {"id": f"{api.id_prefix}-{uuid.uuid4().hex[:24]}", "object": api.object,
                     "created": int(time.time()), "model": model_name}

    def usage(self):
        prompt, completion = self.prompt_tokens, sum(p.sent for p in self.progress)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, job, entries, offsets):
        return None if job.logprobs is None else self.api.logprobs(self.tok, entries, offsets)

    def whole(self, texts):
        choices = []
        for i, (job, text, echo, progress) in enumerate(zip(self.jobs, texts, self.echoes, self.progress)):
            progress.emitted = len(text)
            entries, offsets = progress.take(progress.end())
            if echo is not None:
                text, entries, offsets = echo.text + text, (echo.entries or []) + entries, echo.offsets + offsets
            choices.append(self.api.whole_choice(i, text, job.reason, self.logprobs(job, entries, offsets)))
        extra = {} if self.sources is None else {"sources": self.sources}
        return {**self.head, "choices": choices, "usage": self.usage(), **extra}

    def chunk(self, index, delta, finish=None, logprobs=None):
        choice = self.api.chunk_choice(index, delta, finish, logprobs)
        event = {**self.head, "object": self.api.chunk_object, "choices": [choice]}
        return event | ({"usage": None} if self.include_usage else {})

    def _texts(self, index, job, pieces):
        """A choice's text chunks, each with the logprobs of the tokens its text starts."""
        progress = self.progress[index]
        echo = self.echoes[index]
        if echo is not None:
            yield self.chunk(index, self.api.delta(echo.text), logprobs=self.logprobs(job, echo.entries or [],
                                                                                          echo.offsets))
        for piece in pieces:
            progress.emitted += len(piece)
            yield self.chunk(index, self.api.delta(piece),
                             logprobs=self.logprobs(job, *progress.take(progress.upto(progress.emitted))))

    def events(self, streams):
        """Events for the choices' piece streams, one choice after the other (they are generated
        together; a later choice's text waits in its job's queue)."""
        first = True
        for index, (job, pieces) in enumerate(zip(self.jobs, streams)):
            chunks = (self.chunk(index, delta) for delta in self.api.opening)
            for event in itertools.chain(chunks, self._texts(index, job, pieces)):
                if first and self.sources is not None:
                    event["sources"] = self.sources
                first = False
                yield event
            if job.reason == "error":
                yield {"error": GENERATION_FAILED}
                return
            progress = self.progress[index]
            end = progress.end()
            rest = self.logprobs(job, *progress.take(end)) if end > progress.sent else None
            yield self.chunk(index, self.api.closing, job.reason, rest)
        if self.include_usage:
            yield {**self.head, "object": self.api.chunk_object, "choices": [], "usage": self.usage()}


def sse(events):
    """Server-sent events framing: one `data:` line per event, then `data: [DONE]`."""
    for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- stop strings

class StopCutter:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops):
        self.stops, self.buffer, self.hit = stops, "", False

    def push(self, piece):
        if not self.stops:
            return piece
        self.buffer += piece
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            text, self.buffer = self.buffer[:min(found)], ""
            return text
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        text, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return text

    def flush(self):
        text, self.buffer = self.buffer, ""
        return text


# ----------------------------------------------------------------------------- models and tokenizer routes

def model_card(info):
    """The /v1/models entry of the served model: OpenAI's fields, our description, and the context
    length under the names vLLM and others use."""
    return {"id": info["name"], "object": "model", "created": 0, "owned_by": "minigpt-zh", **info,
            "max_model_len": info["block_size"], "context_length": info["block_size"]}


def find_model(info, model_id):
    """`GET /v1/models/{id}`: the card, or a 404 in OpenAI's shape."""
    if model_id != info["name"]:
        raise ApiError(404, f"The model '{model_id}' does not exist", "model", "invalid_request_error")
    return model_card(info)


def special_spellings(tok):
    """id -> spelling of each special token."""
    return {i: tok.enc.decode_single_token_bytes(i).decode("utf-8") for i in tok.special.values()}


def tokenize(tok, body, limits):
    """`POST /tokenize`: {"prompt" or "text"} -> {"tokens", "count", "max_model_len"} (vLLM's shape).
    Plain text, no prompt layout; a prompt that is exactly a special token's spelling is that token."""
    name = "prompt" if "prompt" in body else "text"
    text = typed(body, name, str, None, "a string")
    require(text is not None, "'prompt' (or 'text') is required", name)
    require(len(text) <= MAX_TOKENIZE_CHARS, f"'{name}' is longer than {MAX_TOKENIZE_CHARS} characters", name)
    typed(body, "add_special_tokens", bool, True, "true or false")  # we add none: no BOS token
    specials = {spelling: i for i, spelling in special_spellings(tok).items()}
    tokens = [specials[text]] if text in specials else tok.encode(text)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.block_size}


def detokenize(tok, body, limits):
    """`POST /detokenize`: {"tokens"} -> {"prompt", "text"} (special tokens are dropped)."""
    tokens, vocab = body.get("tokens"), limits.vocab_size
    require(isinstance(tokens, list) and len(tokens) <= MAX_DETOKENIZE_TOKENS,
            f"'tokens' must be a list of at most {MAX_DETOKENIZE_TOKENS} token ids", "tokens")
    require(all(type(t) is int and 0 <= t < vocab for t in tokens), f"'tokens' must hold integers in [0, {vocab})",
            "tokens")
    text = tok.decode(tokens)
    return {"prompt": text, "text": text}


def tokenizer_info(tok, limits):
    """`GET /tokenizer_info`: what lm-eval's remote tokenizer reads (vLLM's route): the special tokens
    and the context length. No chat template: chat prompts are laid out by the server."""
    names = special_spellings(tok)
    return {"tokenizer_class": "tiktoken", "eos_token": names[tok.eot], "bos_token": None,
            "pad_token": names.get(tok.special.get("pad")), "vocab_size": limits.vocab_size,
            "model_max_length": limits.block_size, "max_model_len": limits.block_size, "chat_template": None,
            "special_tokens": {name: {"token": names[i], "id": i} for name, i in tok.special.items()}}
