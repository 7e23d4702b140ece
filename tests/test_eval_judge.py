"""LLM judges against a local stand-in server: scoring, caching, retries, failure accounting."""

import time

import pytest

from llava_jp.eval import JudgeClient, judge_heron, judge_one_to_five
from llava_jp.eval.judge import (
    HERON_RULE,
    HERON_SYSTEM,
    parse_heron_scores,
    parse_llm_jp_heron_scores,
    parse_one_to_five,
    summarize_heron,
)
from llava_jp.eval.tasks import Sample
from tests.fakes.eval_data import StandInJudge

HERON = [
    Sample(str(i), f"質問{i}", f"参照{i}", i, category=c, context=f"画像{i}の説明")
    for i, c in enumerate(["conv", "conv", "detail", "detail", "complex", "complex"])
]
# conv: both match the reference (10/8); detail: one does (7/8); complex: none (4/8).
HERON_PREDICTIONS = ["参照0", "参照1", "参照2", "違う", "違う", "違う"]
EXPECTED_RELS = {"conv": 125.0, "detail": 87.5, "complex": 50.0}


def client(judge: StandInJudge, **kw) -> JudgeClient:
    kw.setdefault("backoff_s", 0.0)
    return JudgeClient(judge.base_url, "stand-in-judge", "sk-test", **kw)


def test_heron_scores_relative_to_reference_per_category():
    with StandInJudge() as judge:
        summary, judgments = judge_heron(client(judge), HERON, HERON_PREDICTIONS)
        assert judge.request_count == 6
    assert {c: v["rel"] for c, v in summary["categories"].items()} == pytest.approx(EXPECTED_RELS)
    assert summary["score"] == pytest.approx((125 + 87.5 + 50) / 3)
    assert summary["categories"]["detail"]["model_mean"] == pytest.approx(7.0)
    assert (summary["judged"], summary["unparseable"]) == (6, 0)
    assert judgments[0].value == (8.0, 10.0) and judgments[0].attempts == 1


def test_heron_request_matches_the_original_prompt_layout():
    with StandInJudge() as judge:
        judge_heron(client(judge), HERON[:1], ["私の答え"])
        payload = judge.payloads[0]
    assert payload["model"] == "stand-in-judge"
    assert (payload["temperature"], payload["max_tokens"]) == (0.0, 1024)
    system, user = payload["messages"]
    assert system == {"role": "system", "content": HERON_SYSTEM}
    assert user["content"] == (
        "[Context]\n画像0の説明\n\n[Question]\n質問0\n\n"
        "[Assistant 1]\n参照0\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\n私の答え\n\n[End of Assistant 2]\n\n"
        f"[System]\n{HERON_RULE}\n\n"
        "If it is not relevant to the context, does not answer directly, or says the wrong thing, "
        "give it a low score.\n\n"
    )


def test_llm_jp_eval_mm_heron_style():
    with StandInJudge() as judge:
        summary, _ = judge_heron(client(judge), HERON, HERON_PREDICTIONS, style="llm-jp-eval-mm")
        payloads = judge.payloads
    assert any('"gpt4o_answer": 参照0,\n' in p["messages"][1]["content"] for p in payloads)
    assert all(p["seed"] == 0 for p in payloads)
    assert {c: v["rel"] for c, v in summary["categories"].items()} == pytest.approx(EXPECTED_RELS)
    assert summary["style"] == "llm-jp-eval-mm"


def test_cached_replies_are_not_asked_again(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    with StandInJudge() as judge:
        first, _ = judge_heron(client(judge, cache_path=cache), HERON, HERON_PREDICTIONS)
        assert judge.request_count == 6
        again, judgments = judge_heron(client(judge, cache_path=cache), HERON, HERON_PREDICTIONS)
        assert judge.request_count == 6  # everything came from the cache file
        assert all(j.attempts == 0 for j in judgments)
        # A changed prediction is a new request; only that one is asked.
        judge_heron(client(judge, cache_path=cache), HERON, ["新しい答え"] + HERON_PREDICTIONS[1:])
        assert judge.request_count == 7
    assert again == first


def test_http_500_is_retried():
    with StandInJudge(faults=["500", "500"]) as judge:
        _, judgments = judge_heron(client(judge, workers=1), HERON[:1], HERON_PREDICTIONS[:1])
        assert judge.request_count == 3
    assert judgments[0].value == (8.0, 10.0) and judgments[0].attempts == 3


def test_timeout_and_malformed_body_are_retried():
    with StandInJudge(faults=[("sleep", 1.0), "malformed"]) as judge:
        start = time.monotonic()
        _, judgments = judge_heron(client(judge, workers=1, timeout=0.2), HERON[:1], ["違う"])
        assert time.monotonic() - start < 1.0  # did not wait for the slow reply
        assert judge.request_count == 3
    assert judgments[0].value == (8.0, 4.0)


def test_persistent_garbage_is_counted_and_excluded_not_scored_zero(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with StandInJudge(faults=["garbage"] * 3) as judge:
        summary, judgments = judge_heron(
            client(judge, workers=1, max_attempts=3, cache_path=cache), HERON, HERON_PREDICTIONS
        )
        assert judge.request_count == 3 + 5
    assert judgments[0].value is None and "unparseable reply" in judgments[0].error
    conv = summary["categories"]["conv"]
    assert (conv["judged"], conv["unparseable"], conv["rel"]) == (1, 1, pytest.approx(125.0))
    assert (summary["judged"], summary["unparseable"]) == (5, 1)
    assert summary["score"] == pytest.approx((125 + 87.5 + 50) / 3)
    # The failure was not cached, so a re-run asks only for it.
    with StandInJudge() as judge:
        judge_heron(client(judge, cache_path=cache), HERON, HERON_PREDICTIONS)
        assert judge.request_count == 1


def test_client_errors_are_not_retried():
    with StandInJudge(faults=["401"]) as judge:
        _, judgments = judge_heron(client(judge, workers=1), HERON[:1], ["x"])
        assert judge.request_count == 1
    assert (judgments[0].value, judgments[0].error) == (None, "HTTP 401")


def test_unreachable_judge_fails_every_judgment_but_returns():
    judge = JudgeClient("http://127.0.0.1:9", "m", max_attempts=2, backoff_s=0.0, timeout=1)
    summary, judgments = judge_heron(judge, HERON, HERON_PREDICTIONS)
    assert summary["score"] is None and summary["unparseable"] == 6
    assert all(j.error.startswith("request failed") for j in judgments)


def test_one_to_five_judge_for_rouge_tasks():
    samples = [Sample(str(i), f"質問{i}", f"答え{i}", i) for i in range(3)]
    with StandInJudge(faults=["garbage"] * 2) as judge:
        summary, judgments = judge_one_to_five(
            client(judge, workers=1, max_attempts=2), samples, ["答え0", "答え1", "違う"]
        )
        payload = judge.payloads[-1]
    assert [j.value for j in judgments] == [None, 5, 2]
    assert summary == {
        "score": pytest.approx(3.5),
        "judged": 2,
        "unparseable": 1,
        "judge_model": "stand-in-judge",
    }
    assert payload["messages"][0]["content"] == "You are an expert evaluator."
    assert "Question: 質問2\nAnswer: 答え2\nPrediction: 違う\n" in payload["messages"][1]["content"]


def test_reply_parsers():
    assert parse_heron_scores("8 6\nBecause...") == (8.0, 6.0)
    assert parse_heron_scores("7.5, 9") == (7.5, 9.0)
    assert parse_heron_scores("Assistant 1: 8\nAssistant 2: 6") is None
    assert parse_heron_scores("11 3") is None
    assert parse_llm_jp_heron_scores('ok ```json\n{"score_gpt": 9, "score": 3}\n``` done') == (9.0, 3.0)
    assert parse_llm_jp_heron_scores('{"score": 3, "score_gpt": 9}') == (9.0, 3.0)
    assert parse_llm_jp_heron_scores('{"score": 3}') is None
    assert parse_one_to_five("Score: 4") == 4
    assert parse_one_to_five("0") is None and parse_one_to_five("none") is None


def test_summary_without_a_category_has_no_overall_score():
    summary = summarize_heron(["conv", "detail"], [(8, 8), (8, 4)])
    assert summary["categories"]["complex"]["rel"] is None
    assert summary["score"] is None


def test_from_env(monkeypatch):
    for var in ("LLAVA_JP_JUDGE_BASE_URL", "LLAVA_JP_JUDGE_MODEL", "LLAVA_JP_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert JudgeClient.from_env() is None
    monkeypatch.setenv("LLAVA_JP_JUDGE_BASE_URL", "http://judge.local/v1/")
    monkeypatch.setenv("LLAVA_JP_JUDGE_MODEL", "judge-x")
    judge = JudgeClient.from_env()
    assert (judge.base_url, judge.model) == ("http://judge.local/v1", "judge-x")
    assert judge._client.api_key == "sk-env"
    assert JudgeClient.from_env(model="other").model == "other"
