"""The eval loop with a deterministic generate_fn, tiny local benchmarks and a stand-in judge."""

import argparse
import json

import pytest
from PIL import Image

from llava_jp.eval import JudgeClient, load_task, rouge_l, run_eval, runner
from llava_jp.eval.tasks import DEFAULT_TASKS
from tests.fakes.eval_data import StandInJudge, write_tiny_benchmarks

# Fixed answers by question: some match the reference, some overlap, some miss.
ANSWERS = {
    "何色ですか？": "参照回答1です。",  # vg 101: miss; heron conv: exact for id 1 only
    "何がありますか？": "車があります。",  # vg 102: exact
    "空は何色？": "空は青いです。",  # vg 201: partial
    "これは何の写真ですか？": "公園の写真です。",  # wild 0: exact
    "季節はいつですか？": "夏です。",  # wild 1: partial
}


class Generator:
    """Records every call; optionally fails on call number ``fail_on`` (an interrupted run)."""

    def __init__(self, fail_on: int | None = None):
        self.fail_on = fail_on
        self.questions: list[str] = []
        self.calls = 0

    def __call__(self, images, questions):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        assert all(isinstance(i, Image.Image) and i.mode == "RGB" for i in images)
        self.questions += questions
        return [ANSWERS.get(q, "わかりません。") for q in questions]


@pytest.fixture()
def sources(tmp_path):
    return write_tiny_benchmarks(tmp_path / "data")


def judge_client(judge, out):
    return JudgeClient(judge.base_url, "stand-in", cache_path=out / "judge_cache.jsonl", backoff_s=0)


def expected_rouge(task_name, sources):
    task = load_task(task_name, sources[task_name])
    return rouge_l([s.reference for s in task.samples], [ANSWERS.get(s.question, "わかりません。") for s in task.samples])


def test_full_run_writes_scores_table_and_chart(tmp_path, sources):
    out = tmp_path / "out"
    with StandInJudge() as judge:
        scores = run_eval(
            list(DEFAULT_TASKS), Generator(), out, judge_client(judge, out), batch_size=2,
            model_name="tiny", sources=sources, progress=False,
        )
        assert judge.request_count == 6
    tasks = scores["tasks"]
    assert tasks["ja-vg-vqa-500"]["score"] == pytest.approx(expected_rouge("ja-vg-vqa-500", sources))
    assert tasks["ja-vg-vqa-500"]["samples"] == 3
    assert tasks["ja-vlm-bench-in-the-wild"]["score"] == pytest.approx(
        expected_rouge("ja-vlm-bench-in-the-wild", sources)
    )
    # heron: conv (10 + 4) / 2 vs 8 -> 87.5; detail and complex 4 vs 8 -> 50.
    assert tasks["heron-bench"]["score"] == pytest.approx((87.5 + 50 + 50) / 3)
    assert tasks["heron-bench"]["unparseable"] == 0

    assert json.loads((out / "scores.json").read_text(encoding="utf-8")) == json.loads(json.dumps(scores))
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| **tiny** |" in table and "| llava-jp-1.3b-v1.1 (S2) | 1.86B | 13.33 | 44.40 | 50.39 |" in table
    with Image.open(out / "radar.png") as png:
        assert png.format == "PNG" and png.size[0] > 100

    predictions = [json.loads(line) for line in (out / "predictions" / "ja-vg-vqa-500.jsonl").open(encoding="utf-8")]
    assert [(p["id"], p["prediction"]) for p in predictions] == [
        ("101", "参照回答1です。"), ("102", "車があります。"), ("201", "空は青いです。")
    ]
    details = [json.loads(line) for line in (out / "details" / "heron-bench.jsonl").open(encoding="utf-8")]
    assert details[1]["judge_scores"] == [8.0, 10.0] and details[1]["category"] == "conv"


def test_interrupted_run_resumes_without_regenerating_or_rejudging(tmp_path, sources):
    out = tmp_path / "out"
    total = 3 + 2 + 6
    with StandInJudge() as judge:
        interrupted = Generator(fail_on=2)
        with pytest.raises(KeyboardInterrupt):
            run_eval(list(DEFAULT_TASKS), interrupted, out, judge_client(judge, out), batch_size=2,
                     sources=sources, progress=False)
        assert len(interrupted.questions) == 2  # the first batch was saved before the crash

        resumed = Generator()
        first = run_eval(list(DEFAULT_TASKS), resumed, out, judge_client(judge, out), batch_size=2,
                         sources=sources, progress=False)
        assert len(resumed.questions) == total - 2
        assert judge.request_count == 6

        again = Generator()
        second = run_eval(list(DEFAULT_TASKS), again, out, judge_client(judge, out), batch_size=2,
                          sources=sources, progress=False)
        assert again.calls == 0
        assert judge.request_count == 6
    assert second == first


def test_partial_last_line_is_regenerated(tmp_path, sources):
    out = tmp_path / "out"
    run_eval(["ja-vlm-bench-in-the-wild"], Generator(), out, sources=sources, progress=False)
    path = out / "predictions" / "ja-vlm-bench-in-the-wild.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10], encoding="utf-8")  # killed mid-write
    generator = Generator()
    scores = run_eval(["ja-vlm-bench-in-the-wild"], generator, out, sources=sources, progress=False)
    assert generator.questions == ["季節はいつですか？"]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert scores["tasks"]["ja-vlm-bench-in-the-wild"]["score"] == pytest.approx(
        expected_rouge("ja-vlm-bench-in-the-wild", sources)
    )


def test_without_judge_heron_is_generated_but_not_scored(tmp_path, sources):
    out = tmp_path / "out"
    scores = run_eval(["heron-bench"], Generator(), out, sources=sources, progress=False)
    assert scores["tasks"]["heron-bench"]["score"] is None
    assert "no judge" in scores["tasks"]["heron-bench"]["note"]
    assert len((out / "predictions" / "heron-bench.jsonl").read_text(encoding="utf-8").splitlines()) == 6
    assert (out / "radar.png").exists()


def test_sakana_protocol_and_one_to_five_judge(tmp_path, sources):
    out = tmp_path / "out"
    with StandInJudge() as judge:
        scores = run_eval(["ja-vg-vqa-500"], Generator(), out, judge_client(judge, out),
                          protocol="sakana", llm_judge_rouge=True, sources=sources, progress=False)
        assert judge.request_count == 2
    result = scores["tasks"]["ja-vg-vqa-500"]
    assert (result["protocol"], result["samples"]) == ("sakana", 2)  # qas[0] of each image
    assert result["llm_judge"]["score"] == pytest.approx(2.0)  # neither answer matches exactly


def test_generate_fn_must_answer_every_question(tmp_path, sources):
    with pytest.raises(ValueError, match="1 answers for 2 questions"):
        run_eval(["ja-vlm-bench-in-the-wild"], lambda images, qs: ["x"], tmp_path,
                 sources=sources, progress=False)


def test_cli_arguments_drive_run_eval(tmp_path, sources, monkeypatch, capsys):
    generator = Generator()
    monkeypatch.setattr(runner, "model_generate_fn", lambda path, max_new_tokens, device: generator)
    parser = runner.add_eval_arguments(argparse.ArgumentParser())
    with StandInJudge() as judge:
        args = parser.parse_args(
            ["--model", str(tmp_path / "my-model"), "--out", str(tmp_path / "out"),
             "--tasks", "ja-vlm-bench-in-the-wild,heron-bench", "--batch-size", "4",
             "--judge-base-url", judge.base_url, "--judge-model", "stand-in"]
            + [f"--data={name}={src}" for name, src in sources.items()]
        )
        scores = runner.main_eval(args)
        assert judge.request_count == 6
    assert scores["model"] == "my-model"
    assert set(scores["tasks"]) == {"ja-vlm-bench-in-the-wild", "heron-bench"}
    assert "| **my-model** |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        runner.main_eval(parser.parse_args(["--model", "m", "--out", str(tmp_path), "--data", "nope"]))
    assert exit_info.value.code == 2 and "TASK=SOURCE" in capsys.readouterr().err
