"""Japanese ROUGE-L: hand-checked values from the fugashi (unidic-lite) tokens shown here."""

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from llava_jp.eval import rouge_l, rouge_l_scores
from llava_jp.eval.rouge import (
    JapaneseTokenizer,
    aggregate_rouge_l,
    bootstrap_median_of_means,
    normalize_text,
    normalize_text_sakana,
)

tokenize = JapaneseTokenizer().tokenize


def f_measure(lcs: int, n_ref: int, n_pred: int) -> float:
    p, r = lcs / n_pred, lcs / n_ref
    return 100 * 2 * p * r / (p + r)


def test_identical_strings_score_100():
    assert tokenize("私は猫です。") == ["私", "は", "猫", "です", "。"]
    assert rouge_l(["私は猫です。"], ["私は猫です。"]) == pytest.approx(100.0)


def test_disjoint_strings_score_0():
    assert tokenize("赤い車") == ["赤い", "車"]
    assert tokenize("青い空") == ["青い", "空"]
    assert rouge_l(["赤い車"], ["青い空"]) == 0.0


def test_partial_overlap_matches_lcs_of_tokens():
    ref, pred = "たかしが公園で遊んでいた。", "たかしが公園にいたようだ。"
    assert tokenize(ref) == ["たかし", "が", "公園", "で", "遊ん", "で", "い", "た", "。"]
    assert tokenize(pred) == ["たかし", "が", "公園", "に", "い", "た", "よう", "だ", "。"]
    # LCS: たかし が 公園 い た 。 = 6 of 9 and 9 tokens
    assert rouge_l([ref], [pred]) == pytest.approx(f_measure(6, 9, 9)) == pytest.approx(200 / 3)


def test_partial_overlap_different_lengths():
    ref, pred = "池のほとりです。", "ここは湖の岸です。"
    assert tokenize(ref) == ["池", "の", "ほとり", "です", "。"]
    assert tokenize(pred) == ["ここ", "は", "湖", "の", "岸", "です", "。"]
    # LCS: の です 。 = 3; P = 3/7, R = 3/5 -> F = 0.5
    assert rouge_l([ref], [pred]) == pytest.approx(f_measure(3, 5, 7)) == pytest.approx(50.0)


def test_llm_jp_eval_mm_protocol_is_mean_of_per_sample_f():
    refs = ["私は猫です。", "たかしが公園で遊んでいた。", "池のほとりです。"]
    preds = ["私は猫です。", "たかしが公園にいたようだ。", "ここは湖の岸です。"]
    assert rouge_l_scores(refs, preds) == pytest.approx([100.0, 200 / 3, 50.0])
    assert rouge_l(refs, preds) == pytest.approx((100 + 200 / 3 + 50) / 3)


def test_normalisation_removes_emoji_applies_nfkc_collapses_whitespace():
    assert normalize_text("ＡＢＣ\u3000１２３  猫です😀\n") == "ABC 123 猫です"
    assert tokenize("ＡＢＣ　１２３") == ["ABC", "123"]
    assert rouge_l(["猫です"], ["猫です😀"]) == pytest.approx(100.0)
    assert rouge_l(["ABCです"], ["ＡＢＣです"]) == pytest.approx(100.0)


def test_empty_prediction_scores_zero():
    assert rouge_l_scores(["猫です"], [""]) == [0.0]


def test_default_rouge_score_tokenizer_would_score_japanese_zero():
    # Why the custom tokenizer exists: rouge-score's own tokenizer keeps only [a-z0-9].
    score = rouge_scorer.RougeScorer(["rougeL"]).score("私は猫です", "私は猫です")
    assert score["rougeL"].fmeasure == 0.0


def test_sakana_normalisation_uses_neologdn():
    ref, pred = "すごーい景色", "すごーーーい景色"
    assert tokenize(pred) == ["すご", "ーーー", "い", "景色"]  # NFKC keeps the long vowel run
    assert JapaneseTokenizer(normalize_text_sakana).tokenize(pred) == ["すごーい", "景色"]
    assert normalize_text_sakana("ｶﾀｶﾅ〜です 😀") == "カタカナです"
    # llm-jp-eval-mm: LCS 景色 = 1; P = 1/4, R = 1/2 -> 33.3. Sakana: identical after neologdn.
    assert rouge_l_scores([ref], [pred]) == pytest.approx([100 / 3])
    assert rouge_l_scores([ref], [pred], protocol="sakana") == pytest.approx([100.0])


def test_sakana_aggregation_is_seeded_bootstrap_median_of_means():
    values = [0.0, 100.0, 50.0, 25.0, 75.0, 10.0]
    once = bootstrap_median_of_means(values, seed=3)
    assert once == bootstrap_median_of_means(values, seed=3)
    assert bootstrap_median_of_means([42.0] * 5) == 42.0
    # Same estimator as rouge-score's BootstrapAggregator (which is unseeded): both land
    # within bootstrap noise of the plain mean.
    scores = [scoring.Score(v, v, v) for v in values]
    aggregator = scoring.BootstrapAggregator()
    for s in scores:
        aggregator.add_scores({"rougeL": s})
    reference_mid = aggregator.aggregate()["rougeL"].mid.fmeasure
    assert abs(once - np.mean(values)) < 6
    assert abs(reference_mid - np.mean(values)) < 6
    assert aggregate_rouge_l(values, "sakana", seed=3) == once
    assert aggregate_rouge_l(values, "llm-jp-eval-mm") == pytest.approx(np.mean(values))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="references but"):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="protocol"):
        rouge_l(["a"], ["a"], protocol="bleu")
    with pytest.raises(ValueError, match="at least one"):
        rouge_l([], [])
