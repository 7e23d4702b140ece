"""JMMMU, JDocQA and MECHA-ja: loaded from parquet in their hub schemas, prompted and scored the
way llm-jp-eval-mm 0.4.1 does (tests/test_eval_mm_harness.py checks the same against the
installed harness)."""

import json

import pyarrow.parquet as pq
import pytest

from llava_jp.eval import harness_metrics as hm
from llava_jp.eval import load_task, run_eval
from llava_jp.eval.tasks import MULTI_CHOICE_PROMPT, OPEN_ENDED_PROMPT
from tests.fakes.eval_data import write_jdocqa, write_jmmmu, write_mecha_ja


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness-tasks")
    return {
        "jmmmu": str(write_jmmmu(root / "jmmmu")),
        "jdocqa": str(write_jdocqa(root / "jdocqa" / "test-00000-of-00001.parquet")),
        "mecha-ja": str(write_mecha_ja(root / "mecha" / "test-00000-of-00001.parquet")),
    }


def test_fixtures_have_the_hub_columns(sources):
    assert pq.read_schema(sources["jdocqa"]).names == [
        "question_id", "question", "answer", "answer_type", "image_0", "image_1", "image_2", "image_3"
    ]
    assert pq.read_schema(sources["mecha-ja"]).names == [
        "question", "options", "answer", "answer_type", "image", "background_text"
    ]


def test_jmmmu_prompts_images_and_subjects(sources):
    task = load_task("jmmmu", sources["jmmmu"])
    assert [s.id for s in task.samples] == ["test_Accounting_1", "test_Accounting_2", "test_Math_1"]
    first, two_images = task.samples[0], task.samples[1]
    assert first.question == f"の色は何ですか？\nA. 赤\nB. 青\nC. 緑\nD. 黄\n\n{MULTI_CHOICE_PROMPT}"
    assert two_images.question == f"との合計は何円ですか？\n\n{OPEN_ENDED_PROMPT}"
    assert two_images.image_keys == ("image_1", "image_2")
    assert task.image(first).size == (16, 16)
    assert task.image(two_images).size == (32, 16)  # side by side, as the harness's 1-image adapters


def test_jmmmu_answer_parsing():
    mc = {"question_type": "multiple-choice", "options": "['赤', '青', '緑', '黄']", "answer": "A"}
    assert hm.jmmmu_score(mc, "A") == 1
    assert hm.jmmmu_score(mc, "(A) 赤です") == 1
    assert hm.jmmmu_score(mc, "答えはBです。") == 0  # 'B' between Japanese characters -> B
    assert hm.jmmmu_score(mc, "わかりません") == 0  # no choice found: wrong (random_choice off)
    open_q = {"question_type": "open", "options": "[]", "answer": "300"}
    assert hm.jmmmu_score(open_q, "合計は300円です。") == 1
    assert hm.jmmmu_score(open_q, "よって、答えは 200") == 0
    aggregate = hm.jmmmu_aggregate(["test_Accounting_1", "test_Accounting_2", "test_Math_1"], [1, 0, 1])
    assert aggregate["score"] == pytest.approx(2 / 3)
    assert aggregate["details"]["Accounting"] == 0.5 and aggregate["details"]["Overall-Science"] == 1.0


def test_jdocqa_and_mecha_rules():
    assert hm.jdocqa_score({"answer_type": 0}, "はい", "はい、公開されています。") == 1.0
    assert hm.jdocqa_score({"answer_type": 2}, "120人", "約100人です") == 0.0
    same = "地域の交通安全を高めることが目的です。"
    assert hm.jdocqa_score({"answer_type": 3}, same, same) == pytest.approx(1.0)
    assert hm.jdocqa_score({"answer_type": 3}, "目的です。", "目的です。") == 0.0  # < 4 tokens: BLEU 0
    assert 0 < hm.jdocqa_score({"answer_type": 3}, "地域の交通安全を高めることが目的です。",
                               "交通安全を高めることが目的です。") < 1
    assert hm.mecha_score("B", "B. 犬") == 1 and hm.mecha_score("B", "犬です") == 0


ANSWERS = {"jmmmu": ["A", "300円です", "B"], "jdocqa": ["はい", "予算", "120人です", "交通安全のためです。"],
           "mecha-ja": ["B", "A", "A"]}


def test_run_eval_scores_each_task_with_its_harness_metric(tmp_path, sources):
    def generate(images, questions):
        assert all(image is not None and image.mode == "RGB" for image in images)
        return [answers.pop(0) for _ in questions]

    scores = {}
    for name in ("jmmmu", "jdocqa", "mecha-ja"):
        answers = list(ANSWERS[name])
        scores[name] = run_eval([name], generate, tmp_path / name, sources=sources, progress=False,
                                generation={"max_new_tokens": 256, "do_sample": False})["tasks"][name]
    assert scores["jmmmu"]["score"] == pytest.approx(2 / 3)
    # yes/no 1, factoid 0 ("年間予算" not in "予算"), numerical 1, open-ended BLEU in (0, 1)
    jdocqa = scores["jdocqa"]
    assert (jdocqa["details"]["yesno_exact"], jdocqa["details"]["factoid_exact"]) == (1.0, 0.0)
    assert 0 <= jdocqa["details"]["open-ended_bleu"] < 1
    assert jdocqa["score"] == pytest.approx((2 + jdocqa["details"]["open-ended_bleu"]) / 4)
    mecha = scores["mecha-ja"]
    assert mecha["score"] == pytest.approx(2 / 3)
    assert mecha["details"]["Non-Factoid"] == 1.0 and mecha["details"]["with_background"] == 1.0
    assert mecha["generation"] == {"max_new_tokens": 256, "do_sample": False}
    details = [json.loads(line) for line in (tmp_path / "mecha-ja" / "details" / "mecha-ja.jsonl").open()]
    assert [d["score"] for d in details] == [1, 1, 0]
    table = (tmp_path / "mecha-ja" / "results.md").read_text(encoding="utf-8")
    assert "| mecha-ja | accuracy (0-1) | 0.67 | — | greedy, max_new_tokens 256 |" in table


def test_jdocqa_gets_the_leaderboard_judge_and_jmmmu_does_not(tmp_path, sources):
    from llava_jp.eval import JudgeClient
    from tests.fakes.eval_data import StandInJudge

    def generate(images, questions):
        return ["はい" if "公開" in q else "A" for q in questions]

    with StandInJudge() as judge:
        client = JudgeClient(judge.base_url, "stand-in", backoff_s=0)
        scores = run_eval(["jdocqa", "jmmmu"], generate, tmp_path, client, llm_judge_rouge=True,
                          sources=sources, progress=False)["tasks"]
        assert judge.request_count == 4  # JDocQA's 4 questions; JMMMU has no judge column
    assert scores["jdocqa"]["llm_judge"]["score"] == pytest.approx((5 + 2 + 2 + 2) / 4)
    assert "llm_judge" not in scores["jmmmu"]
