"""Japanese ROUGE-L exactly as the community scores JA-VG-VQA-500 and JA-VLM-Bench-In-the-Wild.

Two protocols, both Google ``rouge-score``'s ROUGE-L (LCS F-measure) over MeCab tokens
(fugashi ``-Owakati`` with the ``unidic-lite`` dictionary) — rouge-score's default tokenizer
drops every Japanese character and would score 0:

``"llm-jp-eval-mm"`` (llm-jp/llm-jp-eval-mm, ``src/eval_mm/metrics/rougel_scorer.py``)
    Text normalised by removing emoji, Unicode NFKC and collapsing whitespace; one F-measure
    x 100 per sample; the score is the plain mean over samples.

``"sakana"`` (SakanaAI/evolutionary-model-merge, ``evomerge/eval/metrics.py``)
    Same emoji removal, then ``neologdn.normalize`` instead of NFKC, whitespace collapsed.
    Sakana aggregates "over the corpus" with rouge-score's ``BootstrapAggregator``: the per-sample
    F-measures are resampled with replacement 1000 times and the score is the median (50th
    percentile) of the 1000 resample means. It is *not* a pooled corpus LCS; it estimates the
    mean per-sample F and differs from it only by bootstrap noise. Sakana's own run is unseeded;
    ours uses a fixed seed so a score is reproducible. Only ``qas[0]`` of each JA-VG-VQA-500
    image is a sample under this protocol (selected in :mod:`llava_jp.eval.tasks`).
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Callable, Sequence

import emoji
import numpy as np
from rouge_score import rouge_scorer

PROTOCOLS = ("llm-jp-eval-mm", "sakana")
BOOTSTRAP_SAMPLES = 1000  # rouge_score.scoring.BootstrapAggregator default

# Both reference implementations strip these ranges after the per-character emoji check.
_EMOJI_RANGES = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff"
    "\U0001f1e0-\U0001f1ff\U00002702-\U000027b0]+"
)


def remove_emoji(text: str) -> str:
    """Drop every code point ``emoji.is_emoji`` accepts, then the fixed pictograph ranges.

    Per-character like the reference, so joiners (U+200D) and variation selectors of
    multi-code-point emoji survive, exactly as they do there.
    """
    text = "".join(ch for ch in text if not emoji.is_emoji(ch))
    return _EMOJI_RANGES.sub("", text)


def normalize_text(text: str) -> str:
    """llm-jp-eval-mm normalisation: emoji removed, NFKC, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", remove_emoji(text)).split())


def normalize_text_sakana(text: str) -> str:
    """Sakana normalisation: emoji removed, ``neologdn.normalize``, whitespace collapsed."""
    try:
        import neologdn
    except ImportError as err:  # optional: only the Sakana protocol needs it
        raise ImportError(
            'protocol="sakana" needs neologdn: pip install "llava-jp[sakana]"'
        ) from err
    return " ".join(neologdn.normalize(remove_emoji(text)).split())


@functools.lru_cache(maxsize=1)
def _tagger():
    import fugashi
    import unidic_lite

    # Name the dictionary explicitly: a bare Tagger() prefers full `unidic` when installed,
    # which tokenizes differently from the unidic-lite the reference scores were made with.
    dicdir = unidic_lite.DICDIR
    rc = os.path.join(dicdir, "mecabrc")
    return fugashi.Tagger(f'-Owakati -d "{dicdir}" -r "{rc}"')


class JapaneseTokenizer:
    """The tokenizer object rouge-score calls: normalise, then MeCab word segmentation."""

    def __init__(self, normalize: Callable[[str], str] = normalize_text):
        self.normalize = normalize

    def tokenize(self, text: str) -> list[str]:
        return _tagger().parse(self.normalize(text)).split()


def _normalizer(protocol: str) -> Callable[[str], str]:
    if protocol == "llm-jp-eval-mm":
        return normalize_text
    if protocol == "sakana":
        return normalize_text_sakana
    raise ValueError(f"unknown ROUGE-L protocol {protocol!r}; choose one of {PROTOCOLS}")


def rouge_l_scores(
    references: Sequence[str], predictions: Sequence[str], protocol: str = "llm-jp-eval-mm"
) -> list[float]:
    """Per-sample ROUGE-L F-measure x 100 (an empty reference or prediction scores 0)."""
    if len(references) != len(predictions):
        raise ValueError(
            f"{len(references)} references but {len(predictions)} predictions"
        )
    scorer = rouge_scorer.RougeScorer(
        ["rougeL"], tokenizer=JapaneseTokenizer(_normalizer(protocol))
    )
    return [
        100.0 * scorer.score(ref, pred)["rougeL"].fmeasure
        for ref, pred in zip(references, predictions)
    ]


def bootstrap_median_of_means(
    values: Sequence[float], n_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> float:
    """What ``BootstrapAggregator(...).aggregate()[...].mid`` computes, with a seeded RNG."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(n_samples, len(data)))].mean(axis=1)
    return float(np.percentile(means, 50))


def rouge_l(
    references: Sequence[str],
    predictions: Sequence[str],
    protocol: str = "llm-jp-eval-mm",
    *,
    seed: int = 0,
) -> float:
    """Japanese ROUGE-L (0-100) of ``predictions`` against ``references`` under ``protocol``.

    ``"llm-jp-eval-mm"``: mean of per-sample F x 100. ``"sakana"``: bootstrap median of the
    per-sample means (see the module docstring); ``seed`` fixes its resampling.
    """
    return aggregate_rouge_l(rouge_l_scores(references, predictions, protocol), protocol, seed=seed)


def aggregate_rouge_l(scores: Sequence[float], protocol: str, *, seed: int = 0) -> float:
    """The benchmark score from per-sample scores: mean, or Sakana's bootstrap median."""
    _normalizer(protocol)  # validates the name
    if not scores:
        raise ValueError("ROUGE-L needs at least one sample")
    if protocol == "sakana":
        return bootstrap_median_of_means(scores, seed=seed)
    return float(np.mean(scores))
