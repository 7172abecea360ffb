"""Scores and plumbing shared by the evaluation scripts (perplexity, rouge_l, qa_eval, report).

Scoring (all per example in [0, 1]; the scripts report means in percent, as CMRC2018 does):
- `normalize` / `mixed_segment` follow the official CMRC2018 evaluation script
  (cmrc2018_evaluate.py: `remove_punctuation`, `mixed_segmentation(rm_punc=True)`): lowercase,
  strip, then drop exactly the characters of its list `sp_char` (`CMRC_PUNCTUATION` below):
  - : _ * ^ / \\ ~ ` + = ， 。 ： ？ ！ “ ” ； ’ 《 》 · 、 「 」 （ ） － ～ 『 』 (its item '……' is two
  characters, so it never equals one character and a lone … stays, as there). Nothing else goes:
  not '%' ("50%" is not an exact match for "50"), not '.', ',', '(' or the left quote ‘. EM compares
  these strings as they are (inner spaces kept). For F1 each character of U+4E00-U+9FA5 is one
  token; the runs between are split as nltk.word_tokenize does for these texts (on whitespace, each
  ASCII punctuation mark its own token, numbers with inner '.' or ',' one token), without nltk.
- `f1`: from the longest common *substring* of the two token lists (the official `find_lcs`),
  P = lcs/len(prediction), R = lcs/len(gold), max over gold answers. `exact_match`: normalised
  strings equal, max over gold answers. `sub_exact_match`: a normalised gold answer occurs inside
  the normalised prediction (the usual SubEM for generative QA, where models add words).
- Empty texts: the official script scores empty-vs-empty F1 as 0 but EM as 1; here both empty
  scores 1 for every metric and one side empty scores 0, so the metrics agree with each other.
- `rouge_l`: `rouge-chinese` splits on spaces, so raw Chinese is one "word" per sentence and scores
  0 against anything not identical; texts are segmented first (by character by default, with
  jieba on request) and the tokens joined by spaces.
- `bleu4`: character-level sentence BLEU with the add-one smoothing of Lin & Och (2004, "BLEU+1":
  n-gram precisions for n >= 2 are (matches + 1) / (total + 1)), clipped counts and the closest
  reference length over several references. A few lines, so no extra dependency (nltk).

Plumbing: QA inputs come from `data_utils.load_qa` (the one reader the data scripts share, re-exported
here for the evaluation scripts), batched generation through
`Run.complete_batch`, atomic result and prediction files, and the small table every script prints.
"""
import json
import math
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data_utils import atomic_write, load_qa, write_json  # noqa: F401 (load_qa: the evaluations' QA reader)

# cmrc2018_evaluate.py's sp_char, in its order
CMRC_PUNCTUATION = ("-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”",
                    "；", "’", "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』")
_DROPPED = frozenset(c for c in CMRC_PUNCTUATION if len(c) == 1)
_ASCII_PUNCT = r"!-/:-@\[-`{-~"
# between Han characters: a number with inner . or , (nltk keeps "3.14", "1,000"), else a run of
# anything but spaces and ASCII punctuation, else one ASCII punctuation mark
_WORD = re.compile(rf"[0-9]+(?:[.,][0-9]+)+|[^\s{_ASCII_PUNCT}]+|[{_ASCII_PUNCT}]")


def normalize(text):
    """The official `remove_punctuation`: lowercase, strip, drop the `CMRC_PUNCTUATION` characters."""
    return "".join(ch for ch in text.lower().strip() if ch not in _DROPPED)


def mixed_segment(text):
    """The official `mixed_segmentation(text, rm_punc=True)`: one token per Han character
    (U+4E00-U+9FA5), the runs between split into words (`_WORD`)."""
    tokens, run = [], []
    for ch in normalize(text):
        if "\u4e00" <= ch <= "\u9fa5":
            tokens += _WORD.findall("".join(run))
            tokens.append(ch)
            run = []
        else:
            run.append(ch)
    return tokens + _WORD.findall("".join(run))


def segment(text, how="char"):
    """Tokens for ROUGE: `char` = mixed segmentation, `jieba` = jieba words of the normalised text."""
    if how == "char":
        return mixed_segment(text)
    if how == "jieba":
        import jieba

        return [w for w in jieba.lcut(normalize(text)) if w.strip()]
    raise ValueError(f"segmentation must be 'char' or 'jieba', not {how!r}")


def _best_over(answers, score):
    if isinstance(answers, str):
        raise TypeError("answers must be a list of gold answers, not one string")
    if not answers:
        raise ValueError("an example needs at least one gold answer")
    return max(score(a) for a in answers)


def _empty_rule(pred_tokens, gold_tokens):
    """1 when both sides are empty, 0 when only one is; None when both have tokens."""
    if pred_tokens and gold_tokens:
        return None
    return float(not pred_tokens and not gold_tokens)


def exact_match(prediction, answers):
    return _best_over(answers, lambda a: float(normalize(prediction) == normalize(a)))


def sub_exact_match(prediction, answers):
    pred = normalize(prediction)

    def score(answer):
        gold = normalize(answer)
        empty = _empty_rule(pred, gold)
        return empty if empty is not None else float(gold in pred)

    return _best_over(answers, score)


def longest_common_substring(a, b):
    """Length of the longest run of tokens that a and b share contiguously (dynamic programming)."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def f1(prediction, answers):
    pred = mixed_segment(prediction)

    def score(answer):
        gold = mixed_segment(answer)
        empty = _empty_rule(pred, gold)
        if empty is not None:
            return empty
        common = longest_common_substring(pred, gold)
        return 2 * common / (len(pred) + len(gold))  # = 2PR / (P + R)

    return _best_over(answers, score)


def rouge_l(prediction, answers, how="char"):
    from rouge_chinese import Rouge

    pred = segment(prediction, how)

    def score(answer):
        gold = segment(answer, how)
        empty = _empty_rule(pred, gold)
        if empty is not None:
            return empty
        return Rouge(metrics=["rouge-l"]).get_scores(" ".join(pred), " ".join(gold))[0]["rouge-l"]["f"]

    return _best_over(answers, score)


def _ngrams(chars, n):
    return Counter(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))


def bleu4(prediction, answers):
    pred = list(normalize(prediction).replace(" ", ""))
    refs = [list(normalize(a).replace(" ", "")) for a in answers]
    if not refs:
        raise ValueError("an example needs at least one gold answer")
    if not pred:
        return float(not any(refs))
    log_precision = 0.0
    for n in range(1, 5):
        counts = _ngrams(pred, n)
        most_in_a_ref = Counter()
        for ref in refs:
            most_in_a_ref |= _ngrams(ref, n)
        matches = sum(min(c, most_in_a_ref[g]) for g, c in counts.items())
        total = sum(counts.values())
        smooth = 0 if n == 1 else 1
        if matches + smooth == 0:
            return 0.0
        log_precision += math.log((matches + smooth) / (total + smooth)) / 4
    ref_len = min((abs(len(r) - len(pred)), len(r)) for r in refs)[1]
    brevity = 1.0 if len(pred) > ref_len else math.exp(1 - ref_len / len(pred))
    return brevity * math.exp(log_precision)


def score_qa(prediction, answers, how="char"):
    return {"em": exact_match(prediction, answers), "f1": f1(prediction, answers),
            "subem": sub_exact_match(prediction, answers), "rouge_l": rouge_l(prediction, answers, how),
            "bleu4": bleu4(prediction, answers)}


def mean_percent(rows, keys):
    return {k: 100 * sum(r[k] for r in rows) / max(len(rows), 1) for k in keys}


# ----------------------------------------------------------------------------- running and writing


def complete_all(run, prompts, mode, batch_size, max_new_tokens, temperature=0.0, seed=0, spans=None):
    """Completions for every prompt, `batch_size` at a time; batch i samples with seed + i. A prompt
    is text, or token ids made already (a RAG prompt, `Run.rag_prompt_ids`). `spans`: per prompt,
    the text its answer must be copied from (extractive decoding), or None."""
    out = []
    batches = range(0, len(prompts), batch_size)
    for i, start in enumerate(tqdm(batches, desc="generating", unit="batch", disable=len(batches) < 2)):
        batch = prompts[start:start + batch_size]
        complete = run.complete_ids if batch and not isinstance(batch[0], str) else run.complete_batch
        extra = {} if spans is None else {"spans": spans[start:start + batch_size]}
        out += complete(batch, mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i, **extra)
    return [text.strip() for text in out]


def default_output(out_dir, name):
    return Path(out_dir) / f"eval_{name}.json"


def predictions_path(output):
    output = Path(output)
    return output.with_name(output.stem.replace("eval_", "pred_", 1) + ".jsonl")


def write_predictions(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"schema": 1, **row}, ensure_ascii=False) + "\n")  # docs/FORMATS.md


def write_results(output, name, run, input_path, settings, metrics, baselines=None):
    """The result file the report reads: which run, on what, with which settings, and the numbers
    (`baselines`: the no-model rules' {rule: {em, f1}} on the same questions, evaluations/baselines.py)."""
    result = {"eval": name, "run": {k: run.info[k] for k in ("name", "iter", "params", "kind", "checkpoint")},
              "input": str(input_path), "settings": settings, "metrics": metrics}
    if baselines is not None:
        result["baselines"] = baselines
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_json(output, result)
    return result


def format_table(metrics):
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in metrics.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
