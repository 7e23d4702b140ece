"""llm-jp-eval-mm's metrics for JMMMU, JDocQA and MECHA-ja, as the harness defines them.

Ported from ``eval_mm/metrics/{jmmmu,jdocqa,mecha_ja}_scorer.py`` of the PyPI release ``eval-mm``
0.4.1 (Apache-2.0), so a leaderboard row can be filled without installing the harness (it pins
``datasets==2.18.0`` and needs Python >= 3.12). ``tests/test_eval_mm_harness.py`` scores the same
predictions with the installed harness and requires equal numbers.

- JMMMU (MMMU's rules): the reply is parsed to a choice letter (multiple choice) or to strings
  and numbers (open questions); accuracy per subject, per domain and overall (instance-weighted).
- JDocQA: yes/no, factoid and numerical answers score 1 when the normalised reference is a
  substring of the normalised reply; open-ended answers score sentence BLEU (sacrebleu, MeCab
  tokenizer) / 100; overall = mean over all questions.
- MECHA-ja: 1 when the answer letter occurs in the reply; overall, Factoid / Non-Factoid and
  with / without background text.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from collections import defaultdict

import numpy as np

# ---- JMMMU ------------------------------------------------------------------------------------

DOMAIN_SUBJECTS = {
    "Art and Psychology": ["Design", "Music", "Psychology"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy", "Public_Health",
    ],
    "Tech and Engineering": [
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
        "Energy_and_Power", "Materials", "Mechanical_Engineering",
    ],
}
_PUNCTUATION = [",", ".", "!", "?", ";", ":", "'", "、", "。", "！", "？", "；", "："]
_JAPANESE_CHAR = r"[\u3040-\u30FF\u4E00-\u9FFF]"


def subject_of(sample_id: str) -> str:
    """``test_Accounting_12`` -> ``Accounting``."""
    split = sample_id.split("_")[0]
    match = re.search(rf"^{split}_(.+?)_\d+$", sample_id)
    if match is None:
        raise ValueError(f"jmmmu: id {sample_id!r} is not <split>_<subject>_<n>")
    return match.group(1)


def parse_multi_choice(response: str, choices: list[str], index2ans: dict[str, str]) -> str | None:
    """The choice letter a reply names (MMMU's rules plus the harness's Japanese-context rule);
    None when it names none (the harness's default, ``random_choice=False``)."""
    for char in _PUNCTUATION:
        response = response.strip(char)
    response = " " + response + " "
    index_ans, with_brackets = True, False
    candidates = [c for c in choices if f"({c})" in response]
    if candidates:
        with_brackets = True
    if not candidates:
        candidates = [c for c in choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in choices if re.search(rf"{_JAPANESE_CHAR}{c}{_JAPANESE_CHAR}", response)]
    if not candidates:
        candidates = [c for c in choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [i for i, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = not candidates
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        marker = "({})" if with_brackets else " {} "
        starts = [response.rfind(marker.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[int(np.argmax(starts))]


def _extract_numbers(text: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text)
    japanese = re.findall(r"(\d+)(?:つ|個|度|円|人|年|匹|台|%)", text)
    return with_commas + scientific + simple + japanese


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def _normalize(text: str) -> list:
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


# The harness's list, including its missing comma ("解答は、" "回答は" is one string).
_KEY_INDICATORS = ["よって", "よって、", "答えは", "答えは、", "最終的に", "最終的に、", "解答は",
                   "解答は、回答は", "回答は、"]


def parse_open_response(response: str) -> list:
    """Candidate answers (strings and numbers) in an open-question reply (MMMU's rules)."""
    response = response.strip().strip("。")
    parts = re.split(r"[。！？.]\s*|\n", response)
    keys = []
    for index, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (["＝", "="] if index == len(parts) - 1 else [])
        shortest = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _PUNCTUATION:
            keys.append(shortest)
    keys = keys or [response]
    candidates = keys + [n for key in keys for n in _extract_numbers(key)]
    return list({value for c in candidates for value in _normalize(c)})


def jmmmu_score(fields: dict, prediction: str) -> int:
    """1 when the reply answers the JMMMU question correctly, else 0."""
    answer = fields["answer"]
    if fields["question_type"] == "multiple-choice":
        options = ast.literal_eval(fields["options"])
        choices = [chr(ord("A") + i) for i in range(len(options))]
        parsed = parse_multi_choice(prediction, choices, dict(zip(choices, options)))
        return int(parsed in answer if isinstance(answer, list) else parsed == answer)
    golds = [v for a in (answer if isinstance(answer, list) else [answer]) for v in _normalize(a)]
    for pred in parse_open_response(prediction):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return 1
        elif pred in golds:
            return 1
    return 0


def jmmmu_aggregate(ids: list[str], scores: list[int]) -> dict:
    """Accuracy per subject and domain (instance-weighted), and overall (the headline)."""
    by_subject = defaultdict(list)
    for sample_id, score in zip(ids, scores):
        by_subject[subject_of(sample_id)].append(score)
    acc = {s: (sum(v) / len(v), len(v)) for s, v in by_subject.items()}

    def weighted(subjects) -> float:
        total = sum(acc[s][1] for s in subjects)
        return sum(acc[s][0] * acc[s][1] for s in subjects) / total if total else 0.0

    details = {}
    for domain, subjects in DOMAIN_SUBJECTS.items():
        present = [s for s in subjects if s in acc]
        details[f"Overall-{domain}"] = round(weighted(present), 5)
        details.update({s: round(acc[s][0], 5) for s in present})
    overall = weighted(list(acc))
    details["Overall"] = round(overall, 5)
    return {"score": overall, "details": details}


# ---- JDocQA -----------------------------------------------------------------------------------

JDOCQA_OPEN_ENDED = 3


def jdocqa_normalize(text: str) -> str:
    text = text.replace("です", "").replace("。", "").replace("、", "").replace(" ", "").strip()
    return unicodedata.normalize("NFKC", text)


def bleu_ja(reference: str, prediction: str) -> float:
    """Sentence BLEU with sacrebleu's MeCab tokenizer, in [0, 1] (the harness's settings)."""
    from sacrebleu import sentence_bleu

    return sentence_bleu(
        hypothesis=prediction, references=[reference], smooth_method="exp", smooth_value=0.0,
        tokenize="ja-mecab", use_effective_order=False, lowercase=False,
    ).score / 100


def jdocqa_score(fields: dict, reference: str, prediction: str) -> float:
    if fields["answer_type"] == JDOCQA_OPEN_ENDED:
        return bleu_ja(reference, prediction)
    return float(jdocqa_normalize(reference) in jdocqa_normalize(prediction))


def jdocqa_aggregate(answer_types: list[int], scores: list[float]) -> dict:
    from llava_jp.eval.tasks import JDOCQA_ANSWER_TYPES

    details = {}
    for index, name in enumerate(JDOCQA_ANSWER_TYPES):
        values = [s for t, s in zip(answer_types, scores) if t == index]
        key = f"{name}_bleu" if index == JDOCQA_OPEN_ENDED else f"{name}_exact"
        details[key] = sum(values) / len(values) if values else 0.0
    overall = sum(scores) / len(scores) if scores else 0.0
    details["overall"] = overall
    return {"score": overall, "details": details}


# ---- MECHA-ja ---------------------------------------------------------------------------------


def mecha_score(reference: str, prediction: str) -> int:
    """1 when the answer letter occurs anywhere in the reply (the harness's rule)."""
    return int(reference in prediction)


def mecha_aggregate(fields: list[dict], scores: list[int]) -> dict:
    groups = defaultdict(list)
    for f, score in zip(fields, scores):
        groups["overall"].append(score)
        groups["Factoid" if f["answer_type"] == 0 else "Non-Factoid"].append(score)
        groups["with_background" if f["background_text"] else "without_background"].append(score)

    def mean(values) -> float:
        return sum(values) / len(values) if values else 0.0

    details = {k: mean(groups[k]) for k in
               ("overall", "Factoid", "Non-Factoid", "with_background", "without_background")}
    return {"score": details["overall"], "details": details}
