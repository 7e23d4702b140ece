"""`llava-jp eval` offline: tiny saved model + tiny benchmarks in each schema + stand-in judge."""

import json

import pytest
from PIL import Image

from llava_jp.cli import main as cli_main
from llava_jp.eval import load_task, runner
from tests.fakes.eval_data import StandInJudge, write_tiny_benchmarks
from llava_jp.infer.generate import generate_answers

TOTAL_SAMPLES = 3 + 2 + 6  # ja-vg-vqa-500 QAs, in-the-wild questions, heron-bench questions


class CountingModel:
    """Wraps the real `model_generate_fn`, counting questions; raises on call ``fail_on``."""

    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.calls = 0
        self.questions = 0

    def __call__(self, model_path, max_new_tokens, device):
        generate = REAL_MODEL_GENERATE_FN(model_path, max_new_tokens, device)

        def counted(images, questions):
            self.calls += 1
            if self.calls == self.fail_on:
                raise KeyboardInterrupt("simulated Ctrl-C")
            self.questions += len(questions)
            return generate(images, questions)

        return counted


REAL_MODEL_GENERATE_FN = runner.model_generate_fn


def test_eval_command_end_to_end_resumes_without_regenerating_or_rejudging(tiny_dir, tmp_path, monkeypatch):
    sources = write_tiny_benchmarks(tmp_path / "data")
    out = tmp_path / "out"
    with StandInJudge() as judge:
        argv = [
            "eval", "--model", str(tiny_dir), "--out", str(out), "--model-name", "tiny",
            "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu",
            "--judge-base-url", judge.base_url, "--judge-model", "stand-in",
        ] + [f"--data={name}={source}" for name, source in sources.items()]

        interrupted = CountingModel(fail_on=2)
        monkeypatch.setattr(runner, "model_generate_fn", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cli_main(argv)
        assert interrupted.questions == 3  # the first batch (all of ja-vg-vqa-500) was saved
        assert judge.request_count == 0

        resumed = CountingModel()
        monkeypatch.setattr(runner, "model_generate_fn", resumed)
        assert cli_main(argv) == 0
        assert resumed.questions == TOTAL_SAMPLES - 3
        assert judge.request_count == 6  # one judgment per Heron-Bench question
        first = json.loads((out / "scores.json").read_text(encoding="utf-8"))

        again = CountingModel()
        monkeypatch.setattr(runner, "model_generate_fn", again)
        assert cli_main(argv) == 0
        assert again.calls == 0
        assert judge.request_count == 6
    assert json.loads((out / "scores.json").read_text(encoding="utf-8")) == first

    tasks = first["tasks"]
    for name in ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild"):
        assert 0.0 <= tasks[name]["score"] <= 100.0
    heron = tasks["heron-bench"]
    # The stand-in gives the reference 8 and a non-matching answer 4: every rel is 50.
    assert heron["score"] == pytest.approx(50.0) and heron["unparseable"] == 0
    assert "| **tiny** |" in (out / "results.md").read_text(encoding="utf-8")
    with Image.open(out / "radar.png") as png:
        assert png.format == "PNG"

    # Predictions made across an interruption and in batches equal one-at-a-time greedy answers.
    model, processor = runner.load_model(str(tiny_dir), "cpu")
    task = load_task("ja-vlm-bench-in-the-wild", sources["ja-vlm-bench-in-the-wild"])
    saved = [json.loads(line) for line in (out / "predictions" / "ja-vlm-bench-in-the-wild.jsonl").open(encoding="utf-8")]
    for sample, record in zip(task.samples, saved):
        alone = generate_answers(model, processor, [task.image(sample)], [sample.question], max_new_tokens=8)
        assert record == {
            "id": sample.id, "question": sample.question, "reference": sample.reference, "prediction": alone[0],
        }
