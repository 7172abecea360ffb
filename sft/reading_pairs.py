"""Reading pairs by rule: short-answer questions about sentences anywhere in an article (the offline
`--backend extractive` of sft_generate.py), and the passages they are shown with.

Why this shape (issue 23): the old rules only asked about sentences that open with the article's
title, so the answer sat in the passage's opening and a rule answering "the first sentence" scored
F1 72 on the generated pairs: that is what SFT learned. Here:
- Every sentence of the article is a source. An answer is a short typed span found by a pattern,
  like the answers of DRCD/CMRC2018 (median 4-6 characters): a date (when), a number with its unit
  (how many), a place after 位于/在/出生于 (where), an agent after 由 or a role (who), a title in
  《》 or a quoted term (what), a name after 又称/简称 (alias). The question is the span's clause
  with a wh-word in the span's place (cloze style), lightly paraphrased: asides in brackets dropped,
  a pronoun subject replaced by the title, a verb swapped for a synonym, and the title put first
  when the clause does not name it, so the question can also be asked closed-book.
- Families are balanced per article (round robin over the families found, seeded by the article
  id, so runs are deterministic) and `max_qa` pairs are kept per article.
- Passages (`chunks`): the article cut into consecutive runs of whole sentences of at most
  `max_chars`, fixed before any question is asked. A pair is shown the chunk that holds its answer,
  so the passage never depends on where the answer is inside it, and since questions come from
  every sentence the answer's place in the passage is spread (`position_histogram`, by tenths).
  The LLM backend uses the same chunks (`chunk_for`).
- Pure functions of the article text: no model, no network; thousands of articles a second.
"""
import random
import re
from collections import Counter

from retrieval import sentence_spans  # noqa: F401 (re-exported: sft_generate uses it)

# ----------------------------------------------------------------------------- passages


def chunks(text, max_chars):
    """(start, end) of consecutive runs of whole sentences of `text`, each at most `max_chars` long
    (a single longer sentence is its own chunk, cut at `max_chars`). They depend on the text only."""
    out, start, end = [], None, None
    for a, b in sentence_spans(text):
        if start is not None and b - start > max_chars:
            out.append((start, end))
            start = None
        if start is None:
            start = a
        end = min(b, start + max_chars)
    if start is not None:
        out.append((start, end))
    return out


def chunk_for(text, at, length, max_chars, spans=None):
    """The chunk of `text` (see `chunks`; `spans`: those chunks, when known) that holds
    text[at:at+length] whole, or None."""
    for a, b in spans if spans is not None else chunks(text, max_chars):
        if a <= at and at + length <= b:
            return text[a:b]
    return None


def position_histogram(pairs):
    """How many pairs have their answer starting in each tenth of their passage (10 counts)."""
    counts = [0] * 10
    for pair in pairs:
        context, answer = pair.get("context") or "", pair["answer"]
        at = context.find(answer)
        if at >= 0 and context:
            counts[min(9, int(10 * at / len(context)))] += 1
    return counts


# ----------------------------------------------------------------------------- spans

_HAN = "\u4e00-\u9fff"
_NUM = r"[0-9０-９]+(?:[.,][0-9０-９]+)*"
_CN_NUM = r"[一二三四五六七八九十两百千]+"
_UNITS = ("平方公里|平方千米|平方米|公里|千米|公尺|英里|英尺|米|公顷|吨|公斤|千克|克|美元|港元|元|人次|"
          "万人|人|名|位|个|座|所|家|种|次|届|部|本|首|集|场|层|条|户|间|辆|架|艘|枚|项|篇|卷|章|块|"
          "支|队|国|省|县|岁|倍|度|分钟|小时|天|年|%|％")
_DATE = rf"(?:公元前?|西元前?)?{_NUM}年(?:{_NUM}月)?(?:{_NUM}日)?|{_NUM}月{_NUM}日|{_NUM}世纪(?:[0-9０-９]+年代)?"
_PLACE_END = ("省|市|县|区|州|国|镇|乡|村|岛|山|河|江|湖|海|城|郡|府|街|路|站|港|湾|半岛|地区|大学|学院|"
              "中学|医院|机场|公园|寺|宫|桥")
_PLACE_CHAR = rf"(?:(?![的在于和与及或是为之其并])[{_HAN}])"
_ROLE = "导演|主演|作者|作曲|作词|编剧|创办人|创始人|创办者|校长|主席|总统|市长|首任|监督|设计师|建筑师|主持人|教练"
_BY_VERB = ("开发|创作|执导|导演|编剧|设计|制作|出版|发行|编写|撰写|创办|创立|创建|建造|兴建|主演|主持|作曲|"
            "作词|演唱|经营|运营|管理|主办|研发|生产|制造|发明|提出|发现|命名|翻译|指挥|领导|统治|收购")

# (family, pattern, group holding the answer, wh-word maker)
_FAMILIES = (
    ("when", re.compile(rf"(?<![0-9０-９])({_DATE})"), 1, None),
    ("how_many", re.compile(rf"(?<![0-9０-９.－\-~～至到])({_NUM}(?:多|余)?(?:万|亿)?)({_UNITS})(?![0-9０-９])"),
     0, None),
    ("how_many", re.compile(rf"(?<![{_HAN}第])({_CN_NUM})(个|座|所|家|种|次|届|部|名|位|条|项|支)"), 0, None),
    ("where", re.compile(rf"(?:位于|坐落于|座落于|地处|出生于|生于|来自|设于|迁至|前往|毕业于|葬于|在)"
                         rf"((?:{_PLACE_CHAR}{{1,6}}?(?:{_PLACE_END})){{1,4}})(?!的|{_PLACE_CHAR}*(?:{_PLACE_END}))"),
     1, None),
    ("who", re.compile(rf"由([{_HAN}·]{{2,8}}?)(?:{_BY_VERB})"), 1, None),
    ("who", re.compile(rf"(?:{_ROLE})(?:为|是|：)([{_HAN}·]{{2,6}})(?=[，。；、和与及（]|$)"), 1, None),
    ("what", re.compile(r"(《[^《》]{1,14}》)"), 1, None),
    ("what", re.compile(r"[“「]([^“”「」]{2,10})[”」]"), 1, None),
    ("alias", re.compile(r"(又称|又名|又译|亦称|也称|通称|简称|别称|旧称|原名|俗称|本名|英语：|英文：)"
                         r"[“「]?([^，,。；;、）)“”「」（(]{2,14})"), 2, None),
)
_WH = {"when": "什么时候", "where": "哪里", "who": "谁", "what": "什么", "alias": "什么"}
_CLAUSE = re.compile(r"[^，,；;。！？!?：:]+[，,；;。！？!?：:]*")
_ASIDE = re.compile(r"[（(][^（）()]*[)）]")
_PRONOUN = re.compile(r"^(?:他们|她们|它们|他|她|它|其|该[^，。]{0,3}?(?=[是在于为由曾])|此)")
_SYNONYMS = (("位于", "坐落在"), ("成立于", "创立于"), ("出生于", "生于"), ("担任", "出任"), ("称为", "叫做"),
             ("拥有", "有"), ("包括", "包含"), ("目前", "现在"), ("之后", "以后"), ("由于", "因为"),
             ("进行", "开展"), ("开始", "起"), ("曾经", "曾"), ("举行", "举办"), ("获得", "取得"))
_TAIL = "，,；;。！？!?：: "


def _wh_for(family, answer, unit=""):
    if family == "how_many":
        return "几" + unit if re.fullmatch(_CN_NUM, answer[: -len(unit)] if unit else answer) else "多少" + unit
    if family == "when":
        if re.fullmatch(rf"(?:公元前?|西元前?)?{_NUM}年", answer):
            return "哪一年"
        return "哪个世纪" if "世纪" in answer else "什么时候"
    return _WH[family]


def _spans(sentence):
    """(family, start, end, wh-word) of every typed answer span in a sentence."""
    found, taken = [], set()
    for family, pattern, group, _ in _FAMILIES:
        for m in pattern.finditer(sentence):
            a, b = m.span(group)
            if family == "how_many":
                unit = m.group(2)
                if unit == "年" and re.fullmatch(r"[0-9]{3,4}", m.group(1)):
                    continue  # a year, asked as "when"
                wh = _wh_for(family, m.group(0), unit)
            elif family == "alias":  # asked about the title: "X又称什么？", "X的英文名是什么？"
                verb = m.group(1)
                wh = "的英文名是什么" if verb.startswith("英") else verb + "什么"
            else:
                wh = _wh_for(family, m.group(group))
            if b - a < 2 or any(i in taken for i in range(a, b)):
                continue
            taken.update(range(a, b))
            found.append((family, a, b, wh))
    return found


def _base(title):
    """The title without a trailing disambiguation: '长江 (消歧义)' -> '长江'."""
    return re.sub(r"\s*[（(][^（）()]*[)）]$", "", title).strip()


def _question(title, sentence, a, b, wh, rng):
    """The cloze question for the span sentence[a:b], or None when the clause is too thin."""
    clauses = [(m.start(), m.end()) for m in _CLAUSE.finditer(sentence)]
    k = next((i for i, (s, e) in enumerate(clauses) if s <= a < e), None)
    if k is None or b > clauses[k][1]:
        return None
    if a > 0 and b < len(sentence) and sentence[a - 1] in "“「" and sentence[b] in "”」":
        a, b = a - 1, b + 1  # the quote marks go with the quoted answer
    start, end = clauses[k]
    # a clause that is little more than the answer ("1950年，") takes the next one as its predicate
    first = last = k
    while (end - start) - (b - a) < 6 and (last + 1 < len(clauses) or first > 0):
        if last + 1 < len(clauses):  # the next clause, else the one before
            last += 1
            end = clauses[last][1]
        else:
            first -= 1
            start = clauses[first][0]
    text = sentence[start:a] + "\ue000" + sentence[b:end]
    text = _ASIDE.sub("", text).strip(_TAIL)
    if start == 0:
        text = _PRONOUN.sub(title, text, count=1)
    if rng.random() < 0.5:
        for old, new in rng.sample(_SYNONYMS, len(_SYNONYMS)):
            if old in text:
                text = text.replace(old, new, 1)
                break
    if "\ue000" not in text or len(text.replace("\ue000", "")) < 4:
        return None
    text = text.replace("\ue000", wh)
    base = _base(title)
    if base and base not in text and title not in text:
        text = rng.choice(("{}，{}", "{}：{}", "关于{}，{}")).format(base, text)
    return text + "？"


def cloze_pairs(title, text, seed, max_question_chars=48, max_answer_chars=20, limit=None):
    """Candidate pairs {question, answer, family, at} from every sentence of `text`, families
    interleaved (round robin, shuffled within a family by `seed`); at most `limit` of them (the
    questions are only built for the spans taken, so a long article costs little more)."""
    rng, by_family = random.Random(seed), {}
    for s, e in sentence_spans(text):
        sentence = text[s:e]
        for family, a, b, wh in _spans(sentence):
            if len(sentence[a:b].strip()) <= max_answer_chars:
                by_family.setdefault(family, []).append((s, sentence, a, b, wh))
    for items in by_family.values():
        rng.shuffle(items)
    families, out, seen = sorted(by_family), [], set()
    rng.shuffle(families)
    while any(by_family.values()) and (limit is None or len(out) < limit):
        for family in families:
            if not by_family[family] or (limit is not None and len(out) >= limit):
                continue
            s, sentence, a, b, wh = by_family[family].pop()
            answer = sentence[a:b].strip()
            if family == "alias":
                base = _base(title)
                question = f"{base}{wh}？" if base and (s == 0 or sentence.startswith((title, base))) else None
            else:
                question = _question(title, sentence, a, b, wh, rng)
            if not question or len(question) > max_question_chars or answer in question or question in seen:
                continue
            seen.add(question)
            out.append({"question": question, "answer": answer, "family": family, "at": s + a})
    return out


def family_counts(pairs):
    return Counter(p.get("family", "other") for p in pairs)


class Balance:
    """Keeps the answers' places in their passages spread over a run: a pair whose answer starts in
    a tenth of its passage that already holds more than `slack` times the median tenth's count (plus
    a few, so the first pairs are not refused) is skipped. Deterministic for a given input order."""

    def __init__(self, slack=1.15, grace=20):
        self.counts, self.slack, self.grace = [0] * 10, slack, grace

    def take(self, pair):
        tenth = position_histogram([pair]).index(1) if pair["answer"] in pair["context"] else None
        if tenth is None:
            return False
        median = sorted(self.counts)[5]
        if self.counts[tenth] > self.slack * median + self.grace:
            return False
        self.counts[tenth] += 1
        return True
