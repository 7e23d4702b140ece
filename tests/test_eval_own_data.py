"""`llava-jp eval --data my_test.json`: a held-out set in LLaVA format, scored with exact match,
Japanese ROUGE-L and the 1-5 judge, per question type, resumable."""

import argparse
import json

import pytest

from llava_jp.eval import rouge_l, runner
from tests.fakes.eval_data import StandInJudge, tiny_image

RECORDS = [
    {"id": "a", "image": "a.png", "question_type": "色",
     "conversations": [{"from": "human", "value": "<image>\n何色ですか？"}, {"from": "gpt", "value": "赤です。"}]},
    {"id": "b", "image": "b.png", "question_type": "色",
     "conversations": [{"from": "human", "value": "背景は何色？<image>"}, {"from": "gpt", "value": "青い背景です。"},
                       {"from": "human", "value": "明るいですか？"}, {"from": "gpt", "value": "はい。"}]},
    {"id": "c", "type": "知識",
     "conversations": [{"from": "ユーザー", "value": "日本の首都は？"}, {"from": "システム", "value": "東京です。"}]},
]
ANSWERS = {"何色ですか？": "赤です。", "背景は何色？": "背景は緑です。", "明るいですか？": "はい。",
           "日本の首都は？": "大阪です。"}


class Generator:
    def __init__(self):
        self.questions, self.images = [], []

    def __call__(self, images, questions):
        self.questions += questions
        self.images += images
        return [ANSWERS[q] for q in questions]


@pytest.fixture()
def own(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tiny_image("red").save(folder / "a.png")
    tiny_image("blue").save(folder / "b.png")
    path = tmp_path / "my_test.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return path, folder


def run(tmp_path, monkeypatch, generator, *extra):
    monkeypatch.setattr(runner, "model_generate_fn", lambda path, max_new_tokens, device: generator)
    parser = runner.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path / "model-a"), "--out", str(tmp_path / "out"), *extra])
    return runner.main_eval(args)


def test_own_data_exact_match_rouge_judge_and_types(tmp_path, monkeypatch, own, capsys):
    path, folder = own
    generator = Generator()
    with StandInJudge() as judge:
        scores = run(tmp_path, monkeypatch, generator, "--data", str(path), "--image-folder", str(folder),
                     "--judge-base-url", judge.base_url, "--llm-judge-rouge")
        assert judge.request_count == 4
    assert set(scores["tasks"]) == {"my_test"}  # no benchmark runs unless --tasks asks for it
    result = scores["tasks"]["my_test"]
    # every (question, answer) pair is a sample; <image> removed; a record without image is text-only
    assert generator.questions == ["何色ですか？", "背景は何色？", "明るいですか？", "日本の首都は？"]
    assert [i is None for i in generator.images] == [False, False, False, True]
    assert generator.images[0].getpixel((0, 0)) == (255, 0, 0)
    references = ["赤です。", "青い背景です。", "はい。", "東京です。"]
    predictions = [ANSWERS[q] for q in generator.questions]
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["score"] == pytest.approx(rouge_l(references, predictions))
    assert result["llm_judge"]["score"] == pytest.approx((5 + 2 + 5 + 2) / 4)
    by_type = result["by_type"]
    assert by_type["exact_match"] == {"知識": {"mean": 0.0, "samples": 1}, "色": {"mean": pytest.approx(200 / 3), "samples": 3}}
    assert by_type["llm_judge"]["色"]["mean"] == pytest.approx(4.0)
    table = capsys.readouterr().out
    assert "| 色 | 3 | 66.67 |" in table and "| 知識 | 1 | 0.00 | " in table
    assert result["generation"]["max_new_tokens"] == 256
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / "predictions" / "my_test.jsonl").open()]
    assert ids == ["a", "b", "b#1", "c"]

    again = Generator()  # resumed: nothing generated or judged twice
    with StandInJudge() as judge:
        second = run(tmp_path, monkeypatch, again, "--data", str(path), "--image-folder", str(folder),
                     "--judge-base-url", judge.base_url, "--llm-judge-rouge")
        assert judge.request_count == 0
    assert again.questions == [] and second["tasks"] == scores["tasks"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{]", "not valid JSON"),
        ('{"id": 1}', "JSON list"),
        (('[{"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "q"}, '
          '{"from": "gpt", "value": "a"}]}]'), "missing.png"),
        ('[{"id": "x", "conversations": [{"from": "robot", "value": "q"}]}]', "unknown role"),
    ],
)
def test_bad_own_data_is_named_with_exit_2(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, monkeypatch, Generator(), "--data", str(path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(path) in err and message in err


def test_flat_question_answer_records_as_in_the_quickstart_test_set(tmp_path, own):
    from llava_jp.eval.tasks import load_own_data

    _, folder = own
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"id": "1-color", "image": "a.png", "type": "color",
                                 "question": "図形は何色ですか？", "answer": "赤"}], ensure_ascii=False))
    task = load_own_data(path, folder)
    (sample,) = task.samples
    assert (sample.id, sample.question, sample.reference, sample.category) == ("1-color", "図形は何色ですか？", "赤", "color")
    assert task.image(sample).getpixel((0, 0)) == (255, 0, 0)
