"""LLM judges: Heron-Bench (1-10, relative to GPT-4's answer) and llm-jp-eval-mm's 1-5 judge.

The judge is any OpenAI-compatible ``/chat/completions`` endpoint, reached through the ``openai``
client library (HTTP, auth, timeouts, typed errors). Every parseable reply is cached on disk
(JSONL, keyed by a SHA-256 of the request), so a re-run asks the judge nothing it has already
answered. Timeouts, retryable HTTP errors and replies without a score share one retry budget
(``max_attempts`` requests per judgment, counted); the library's own retries are off so a reply
without a score is re-asked under the same budget as a 500. A judgment that still fails is
counted as unparseable and left out of the means — never scored 0 silently.

Prompt styles for Heron-Bench:

``"heron"`` (default; turingmotors/heron ``heron/eval/eval_heron_bench.py`` with the
    ``conv``/``detail``/``complex`` rules): the judge sees the context, the question, GPT-4's
    answer as "Assistant 1" and ours as "Assistant 2", and writes both scores on its first line.
``"llm-jp-eval-mm"`` (``src/eval_mm/metrics/heron_bench_scorer.py``): the same inputs in a JSON
    prompt, the judge replies ``{"score_gpt": int, "score": int}``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai

from llava_jp.eval._jsonl import append_records, read_records
from llava_jp.eval.tasks import HERON_CATEGORIES, Sample

ENV_BASE_URL = "LLAVA_JP_JUDGE_BASE_URL"
ENV_MODEL = "LLAVA_JP_JUDGE_MODEL"
ENV_API_KEY = "LLAVA_JP_JUDGE_API_KEY"  # falls back to OPENAI_API_KEY
DEFAULT_JUDGE_MODEL = "gpt-4-0125-preview"  # the judge of the original Heron-Bench scores
HERON_STYLES = ("heron", "llm-jp-eval-mm")
_RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}

HERON_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

# Heron-Bench's rule for the conv, detail and complex categories (identical for all three).
HERON_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above. The user asks the question on observing an image. For "
    "your reference, the visual content in the image is represented with five descriptive "
    "sentences describing the same image and the bounding box coordinates of each object in the "
    "scene. These coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) "
    "with floating numbers ranging from 0 to 1. These values correspond to the top left x, top "
    "left y, bottom right x, and bottom right y. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were "
    "presented does not affect your judgment. Sentences are given in Japanese, and language is "
    "not relevant to score."
)

LLM_JP_HERON_TEMPLATE = """
You are an expert evaluator. You are given the following information:
- Context: A description of the image.
- Question: A question about the image.
- GPT-4o Answer: GPT-4o's answer to the question.
- Model Answer: The target model's answer to the question.

Your task is to evaluate each answer independently based on how well it answers the question given the context.

Please assign a score from 1 to 10 for each answer according to the following guideline:
- 10: Perfect — Completely correct, relevant, and fully addresses the question based on the context.
- 8-9: Very Good — Mostly correct with only minor inaccuracies or slight omissions.
- 6-7: Good — Generally correct but contains noticeable errors or lacks important details.
- 4-5: Poor — Significant errors or missing key points, but some relevance remains.
- 1-3: Very Poor — Mostly or completely incorrect, irrelevant, or nonsensical.

Output Format (JSON):
Return the result in the following JSON format:
```json
{{
    "score_gpt": int,
    "score": int
}}
```
Do not output anything other than the JSON.

Input:
{{
    "context": {context},
    "question": {question},
    "gpt4o_answer": {gpt4o_answer},
    "model_answer": {model_answer}
}}

Output:
"""

LLM_JP_JUDGE_SYSTEM = "You are an expert evaluator."
LLM_JP_JUDGE_TEMPLATE = """
You are an expert evaluator. You are given a (Question, Answer, Prediction) triplet. Your task is to evaluate how well the Prediction aligns with the Answer in the context of the Question.

Please assign a score from 1 to 5 based on the following criteria:

5: Excellent — The Prediction fully matches the Answer with complete correctness and relevance.
4: Good — The Prediction is mostly correct with only minor inaccuracies or missing details.
3: Fair — The Prediction is partially correct but contains noticeable errors or missing key points.
2: Poor — The Prediction is mostly incorrect or irrelevant, but there are small fragments of correctness.
1: Very Poor — The Prediction is completely incorrect or irrelevant.
Output only the score (an integer from 1 to 5). Do not add any explanation.

Triplet:
Question: {Question}
Answer: {Answer}
Prediction: {Prediction}

Your Score:
"""


@dataclass(frozen=True)
class Judgment:
    """One judge verdict: ``value`` is the parsed score(s), or None when every attempt failed."""

    value: Any
    reply: str | None
    attempts: int  # requests sent for it (0 when answered from the cache)
    error: str | None = None


class JudgeClient:
    """An OpenAI-compatible chat endpoint with an on-disk reply cache and bounded retries."""

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_JUDGE_MODEL,
        api_key: str | None = None,
        *,
        cache_path: str | Path | None = None,
        timeout: float = 120.0,
        max_attempts: int = 3,
        backoff_s: float = 2.0,
        workers: int = 4,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        # A local server needs no key, but the library refuses to start without one.
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=0
        )
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.workers = workers
        self.requests_sent = 0
        self._lock = threading.Lock()
        self._cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, str] = {}
        if self._cache_path is not None:
            self._cache = {r["key"]: r["reply"] for r in read_records(self._cache_path)}

    @classmethod
    def from_env(
        cls,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        **kwargs,
    ) -> JudgeClient | None:
        """A client from arguments, else ``LLAVA_JP_JUDGE_*`` env vars; None when no base URL."""
        base_url = base_url or os.environ.get(ENV_BASE_URL)
        if not base_url:
            return None
        return cls(
            base_url,
            model or os.environ.get(ENV_MODEL) or DEFAULT_JUDGE_MODEL,
            api_key or os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY"),
            **kwargs,
        )

    def cache_key(self, payload: dict) -> str:
        return hashlib.sha256(
            json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
        ).hexdigest()

    def _post(self, payload: dict) -> str:
        with self._lock:
            self.requests_sent += 1
        body = self._client.chat.completions.create(**payload)
        content = body.choices[0].message.content
        if not isinstance(content, str):
            raise TypeError(f"reply content is {type(content).__name__}, not text")
        return content

    def ask(
        self,
        messages: list[dict],
        parse: Callable[[str], Any],
        *,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        **extra,
    ) -> Judgment:
        """Send one chat request (or answer it from the cache) and parse the reply.

        ``parse`` returns None for a reply without a usable score; such replies, timeouts and
        retryable HTTP errors are retried up to ``max_attempts`` requests in all.
        """
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            **extra,
        }
        key = self.cache_key(payload)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            value = parse(cached)
            if value is not None:
                return Judgment(value, cached, 0)

        reply, error = None, None
        for attempt in range(1, self.max_attempts + 1):
            try:
                reply = self._post(payload)
            except openai.APIStatusError as err:
                error = f"HTTP {err.status_code}"
                if err.status_code not in _RETRYABLE_HTTP:
                    return Judgment(None, None, attempt, error)
            except openai.APIConnectionError as err:  # includes APITimeoutError
                error = f"request failed: {type(err).__name__}: {err}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
                error = f"malformed response: {err}"
            else:
                value = parse(reply)
                if value is not None:
                    self._remember(key, payload, reply)
                    return Judgment(value, reply, attempt)
                error = f"unparseable reply: {reply[:200]!r}"
            if attempt < self.max_attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return Judgment(None, reply, self.max_attempts, error)

    def _remember(self, key: str, payload: dict, reply: str) -> None:
        with self._lock:
            self._cache[key] = reply
            if self._cache_path is not None:
                append_records(self._cache_path, [{"key": key, "request": payload, "reply": reply}])

    def ask_many(self, requests: Sequence[tuple[list[dict], Callable[[str], Any], dict]]) -> list[Judgment]:
        """``ask`` for each ``(messages, parse, kwargs)`` on ``workers`` threads, in order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            futures = [pool.submit(self.ask, m, p, **kw) for m, p, kw in requests]
            return [f.result() for f in futures]


# ---- parsing ------------------------------------------------------------------------------


def _in_range(values: tuple[float, ...], low: float, high: float) -> bool:
    return all(low <= v <= high for v in values)


def parse_heron_scores(reply: str) -> tuple[float, float] | None:
    """Heron format: ``"<reference score> <model score>"`` on the first line (commas allowed)."""
    fields = reply.split("\n")[0].replace(",", " ").split()
    if len(fields) != 2:
        return None
    try:
        scores = (float(fields[0]), float(fields[1]))
    except ValueError:
        return None
    return scores if _in_range(scores, 0, 10) else None


def parse_llm_jp_heron_scores(reply: str) -> tuple[float, float] | None:
    """llm-jp-eval-mm format: a ```json block (or bare object) with ``score_gpt`` and ``score``."""
    blocks = re.findall(r"```json(.*?)```", reply, re.DOTALL) or re.findall(
        r"\{.*?\}", reply, re.DOTALL
    )
    for block in blocks:
        for text in (block.strip(), re.sub(r"[\x00-\x1F\x7F]", "", block.strip())):
            try:
                obj = json.loads(text)
                scores = (float(int(obj["score_gpt"])), float(int(obj["score"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if _in_range(scores, 0, 10):
                return scores
    return None


def parse_one_to_five(reply: str) -> int | None:
    """llm-jp-eval-mm's 1-5 judge: the first digit of the reply, which must be 1-5."""
    match = re.search(r"\d", reply)
    if match is None or not 1 <= int(match.group()) <= 5:
        return None
    return int(match.group())


# ---- Heron-Bench --------------------------------------------------------------------------


def heron_request(sample: Sample, prediction: str, style: str = "heron") -> tuple[list[dict], Callable, dict]:
    """The chat request that judges ``prediction`` on one Heron-Bench sample."""
    if style == "heron":
        content = (
            f"[Context]\n{sample.context}\n\n"
            f"[Question]\n{sample.question}\n\n"
            f"[Assistant 1]\n{sample.reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{prediction}\n\n[End of Assistant 2]\n\n"
            f"[System]\n{HERON_RULE}\n\n"
            "If it is not relevant to the context, does not answer directly, or says the wrong "
            "thing, give it a low score.\n\n"
        )
        parse, extra = parse_heron_scores, {}
    elif style == "llm-jp-eval-mm":
        content = LLM_JP_HERON_TEMPLATE.format(
            context=sample.context,
            question=sample.question,
            gpt4o_answer=sample.reference,
            model_answer=prediction,
        )
        parse, extra = parse_llm_jp_heron_scores, {"seed": 0}
    else:
        raise ValueError(f"unknown Heron-Bench judge style {style!r}; choose from {HERON_STYLES}")
    messages = [{"role": "system", "content": HERON_SYSTEM}, {"role": "user", "content": content}]
    return messages, parse, extra


def summarize_heron(categories: Sequence[str], scores: Sequence[tuple[float, float] | None]) -> dict:
    """Per category rel = 100 * mean(model) / mean(reference) over judged samples; overall =
    mean of the conv, detail and complex rels (None unless all three could be computed)."""
    per_category = {}
    for category in HERON_CATEGORIES:
        judged = [s for c, s in zip(categories, scores) if c == category and s is not None]
        failed = sum(1 for c, s in zip(categories, scores) if c == category and s is None)
        ref_mean = float(np.mean([s[0] for s in judged])) if judged else None
        model_mean = float(np.mean([s[1] for s in judged])) if judged else None
        rel = 100.0 * model_mean / ref_mean if judged and ref_mean > 0 else None
        per_category[category] = {
            "rel": rel,
            "model_mean": model_mean,
            "reference_mean": ref_mean,
            "judged": len(judged),
            "unparseable": failed,
        }
    rels = [v["rel"] for v in per_category.values()]
    return {
        "score": float(np.mean(rels)) if all(r is not None for r in rels) else None,
        "categories": per_category,
        "judged": sum(v["judged"] for v in per_category.values()),
        "unparseable": sum(v["unparseable"] for v in per_category.values()),
    }


def judge_heron(
    client: JudgeClient,
    samples: Sequence[Sample],
    predictions: Sequence[str],
    style: str = "heron",
) -> tuple[dict, list[Judgment]]:
    """Judge every Heron-Bench prediction; returns (summary, per-sample judgments)."""
    judgments = client.ask_many([heron_request(s, p, style) for s, p in zip(samples, predictions)])
    summary = summarize_heron([s.category for s in samples], [j.value for j in judgments])
    summary["style"] = style
    summary["judge_model"] = client.model
    return summary, judgments


# ---- llm-jp-eval-mm 1-5 judge (for the ROUGE-L tasks) -------------------------------------


def one_to_five_request(sample: Sample, prediction: str) -> tuple[list[dict], Callable, dict]:
    content = LLM_JP_JUDGE_TEMPLATE.format(
        Question=sample.question, Answer=sample.reference, Prediction=prediction
    )
    messages = [
        {"role": "system", "content": LLM_JP_JUDGE_SYSTEM},
        {"role": "user", "content": content},
    ]
    return messages, parse_one_to_five, {"seed": 0}


def judge_one_to_five(
    client: JudgeClient, samples: Sequence[Sample], predictions: Sequence[str]
) -> tuple[dict, list[Judgment]]:
    """llm-jp-eval-mm's LLM-as-a-judge (1-5): mean over judged samples; failures counted apart."""
    judgments = client.ask_many([one_to_five_request(s, p) for s, p in zip(samples, predictions)])
    judged = [j.value for j in judgments if j.value is not None]
    summary = {
        "score": float(np.mean(judged)) if judged else None,
        "judged": len(judged),
        "unparseable": len(judgments) - len(judged),
        "judge_model": client.model,
    }
    return summary, judgments
