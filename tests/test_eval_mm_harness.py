"""The released llm-jp-eval-mm harness (PyPI ``eval-mm`` 0.4.1, in its own Python 3.12
environment) runs our model through its own task classes, scorers and judge client
(``scripts/eval_mm_harness.py``), and its numbers equal ``llava-jp eval``'s on the same fixtures.

Needs ``LLAVA_JP_EVAL_MM_PYTHON``: the python of an environment where eval-mm 0.4.1 is installed
(``.ci/extra/40-eval-mm.sh`` builds one). Both routes use the same tiny saved model, greedy, and
the same loopback stand-in judge.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_jp.eval import JudgeClient, run_eval
from llava_jp.eval.runner import model_generate_fn
from llava_jp.presets.builder import build
from tests.fakes.eval_data import StandInJudge, write_heron_table, write_tiny_benchmarks

HARNESS_PYTHON = os.environ.get("LLAVA_JP_EVAL_MM_PYTHON")
pytestmark = pytest.mark.skipif(
    not HARNESS_PYTHON,
    reason="LLAVA_JP_EVAL_MM_PYTHON is not set (the python of an eval-mm==0.4.1 environment; "
    ".ci/extra/40-eval-mm.sh builds one where Python 3.12 exists)",
)
REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 8

# our task -> (harness task id, harness metrics)
HARNESS_TASKS = {
    "ja-vg-vqa-500": ("ja-vg-vqa-500", ["rougel", "llm-as-a-judge"]),
    "ja-vlm-bench-in-the-wild": ("ja-vlm-bench-in-the-wild", ["rougel", "llm-as-a-judge"]),
    "heron-bench": ("japanese-heron-bench", ["heron-bench"]),
    "jmmmu": ("jmmmu", ["jmmmu"]),
    "jdocqa": ("jdocqa", ["jdocqa", "llm-as-a-judge"]),
    "mecha-ja": ("mecha-ja", ["mecha-ja"]),
}


@pytest.fixture(scope="module")
def both_routes(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    model.save_pretrained(root / "tiny-model")
    processor.save_pretrained(root / "tiny-model")
    sources = write_tiny_benchmarks(root / "data")
    # the harness loads Heron-Bench from its one-table mirror (Silviase/Japanese-Heron-Bench)
    sources["heron-bench"] = str(write_heron_table(root / "data" / "heron-mirror" / "train.parquet"))

    with StandInJudge() as judge:
        ours = run_eval(
            list(HARNESS_TASKS), model_generate_fn(str(root / "tiny-model"), MAX_NEW_TOKENS, "cpu"),
            root / "ours", JudgeClient(judge.base_url, "stand-in", backoff_s=0), batch_size=1,
            sources=sources, heron_style="llm-jp-eval-mm", llm_judge_rouge=True, progress=False,
        )
        env = {**os.environ, "OPENAI_API_KEY": "sk-stand-in", "OPENAI_BASE_URL": judge.base_url,
               "PYTHONPATH": str(REPO)}
        harness = {}
        for name, (task_id, metrics) in HARNESS_TASKS.items():
            command = [HARNESS_PYTHON, str(REPO / "scripts" / "eval_mm_harness.py"),
                       "--llava_jp_python", sys.executable, "--device", "cpu",
                       "--model_id", "tiny-model", "--task_id", task_id, "--data", sources[name],
                       "--max_new_tokens", str(MAX_NEW_TOKENS), "--judge_model", "stand-in",
                       "--metrics", *metrics]
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
            assert done.returncode == 0, done.stderr[-3000:]
            result = root / "result" / task_id / "tiny-model"  # relative model_id: under result/
            harness[name] = {
                "predictions": [json.loads(line) for line in (result / "prediction.jsonl").open()],
                "evaluation": json.loads((result / "evaluation.jsonl").read_text()),
            }
    details = {
        name: [json.loads(line) for line in (root / "ours" / "details" / f"{name}.jsonl").open()]
        for name in HARNESS_TASKS
    }
    return ours["tasks"], details, harness


@pytest.mark.parametrize("name", list(HARNESS_TASKS))
def test_same_questions_and_answers_as_the_harness(both_routes, name):
    _, details, harness = both_routes
    predictions = harness[name]["predictions"]
    assert [p["question_id"] for p in predictions] == [d["id"] for d in details[name]]
    assert [p["text"] for p in predictions] == [d["prediction"] for d in details[name]]
    assert all(isinstance(p["text"], str) for p in predictions)


@pytest.mark.parametrize("name", ["ja-vg-vqa-500", "ja-vlm-bench-in-the-wild"])
def test_rouge_l_and_judge_equal_the_harness(both_routes, name):
    ours, details, harness = both_routes
    evaluation, predictions = harness[name]["evaluation"], harness[name]["predictions"]
    assert [p["rougel"] for p in predictions] == pytest.approx([d["rouge_l"] for d in details[name]])
    assert ours[name]["score"] == pytest.approx(evaluation["rougel"]["overall_score"])
    assert [p["llm-as-a-judge"] for p in predictions] == [d["llm_judge"] for d in details[name]]
    assert ours[name]["llm_judge"]["score"] == pytest.approx(evaluation["llm-as-a-judge"]["overall_score"])
    assert ours[name]["llm_judge"]["unparseable"] == 0


def test_heron_bench_mirror_and_prompt_equal_the_harness(both_routes):
    ours, _, harness = both_routes
    details = harness["heron-bench"]["evaluation"]["heron-bench"]["details"]
    assert ours["heron-bench"]["style"] == "llm-jp-eval-mm"
    assert ours["heron-bench"]["score"] == pytest.approx(details["overall_rel"])
    for category in ("conv", "detail", "complex"):
        assert ours["heron-bench"]["categories"][category]["rel"] == pytest.approx(details[f"{category}_rel"])
    assert details["parse_error_count"] == 0


@pytest.mark.parametrize("name", ["jmmmu", "jdocqa", "mecha-ja"])
def test_harness_metrics_equal_the_harness(both_routes, name):
    ours, details, harness = both_routes
    metric = HARNESS_TASKS[name][1][0]
    predictions = harness[name]["predictions"]
    assert [p[metric] for p in predictions] == pytest.approx([d["score"] for d in details[name]])
    assert ours[name]["score"] == pytest.approx(harness[name]["evaluation"][metric]["overall_score"])
    if name == "jdocqa":
        assert ours[name]["llm_judge"]["score"] == pytest.approx(
            harness[name]["evaluation"]["llm-as-a-judge"]["overall_score"]
        )
