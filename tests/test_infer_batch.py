"""`llava-jp infer`: batched answers to a JSONL file, resumable after a kill, input mistakes in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import llava_jp.infer.batch as batch_module
from llava_jp.cli import main as cli_main
from llava_jp.infer.chat import load_model
from llava_jp.infer.generate import generate_answers

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 0), (128, 0, 128), (0, 200, 200), (90, 90, 90), (255, 140, 0)]
QUESTIONS = ["何色ですか？", "この画像について説明してください。", "図形の形は何ですか？"]


def write_questions(folder: Path, n: int = 16) -> Path:
    """n questions in LLaVA's question-file style (question_id/image/text), one text-only
    question and one without an id (keyed by its line number)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/{i}.png"
        Image.new("RGB", (32 + i, 40), COLOURS[i % len(COLOURS)]).save(folder / name)
        lines.append({"question_id": f"q{i}", "image": name, "text": QUESTIONS[i % len(QUESTIONS)]})
    lines[3] = {"question_id": "q3", "image": None, "text": "日本の首都はどこですか？"}
    lines[5] = {"image": lines[5]["image"], "question": "<image>\n" + QUESTIONS[0]}  # no id: line 6
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


def answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key(record: dict) -> str:
    return str(record.get("question_id", record.get("id")))


def test_answers_are_generate_answers_batches_and_a_killed_run_re_answers_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_questions(tmp_path)
    args = ["--model", str(tiny_dir), "--data", str(data), "--batch-size", "2", "--max-new-tokens", "24"]

    # reference: the whole file in one run, against generate_answers called directly
    reference_out = tmp_path / "reference.jsonl"
    assert cli_main(["infer", *args, "--out", str(reference_out)]) == 0
    assert "16/16" in capsys.readouterr().err  # the progress bar
    reference = answers(reference_out)
    assert [key(r) for r in reference] == [f"q{i}" if i != 5 else "6" for i in range(16)]
    assert reference[5] == {"id": 6, "image": "images/5.png", "question": "<image>\n何色ですか？", "answer": reference[5]["answer"]}
    model, processor = load_model(str(tiny_dir), "cpu")
    first = [Image.open(data.parent / "images/0.png"), Image.open(data.parent / "images/1.png")]
    assert [r["answer"] for r in reference[:2]] == generate_answers(model, processor, first, QUESTIONS[:2], max_new_tokens=24)
    assert all(r["answer"] for r in reference)
    assert len({r["answer"] for r in reference}) > 1

    # the same run killed after its first batch(es), then resumed
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "llava_jp.cli", "infer", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the infer run never wrote its first batch"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before_kill = [key(r) for r in answers(out)]
    assert 2 <= len(before_kill) < 16, f"the run was not killed mid-way ({len(before_kill)} answers)"

    asked = []

    def spy(model, processor, images, questions, **kwargs):
        asked.extend(questions)
        return generate_answers(model, processor, images, questions, **kwargs)

    monkeypatch.setattr(batch_module, "generate_answers", spy)
    assert cli_main(["infer", *args, "--out", str(out)]) == 0
    assert f"{len(before_kill)}/16" in capsys.readouterr().err  # the bar starts where the last run stopped
    assert len(asked) == 16 - len(before_kill)
    resumed = answers(out)
    assert sorted(map(key, resumed)) == sorted(map(key, reference))  # every question once
    assert {key(r): r for r in resumed} == {key(r): r for r in reference}

    asked.clear()
    assert cli_main(["infer", *args, "--out", str(out)]) == 0  # all answered: nothing is asked
    assert asked == [] and answers(out) == resumed


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n', "questions.jsonl:2: id '1' already used on line 1"),
    ('{"question_id": 1, "text": "a"}\n{oops\n', "questions.jsonl:2: not valid JSON"),
    ('{"question_id": 1, "image": "missing.png", "text": "a"}\n', "questions.jsonl:1: image file"),
    ('{"question_id": 1, "image": null}\n', "questions.jsonl:1: needs a non-empty string field 'question'"),
    ('["a"]\n', "questions.jsonl:1: expected a JSON object"),
    (None, "questions.jsonl: no such file"),
])
def test_input_mistakes_are_one_line_errors_before_the_model_loads(tmp_path, capsys, content, message):
    data = tmp_path / "questions.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    code = cli_main(["infer", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("llava-jp infer: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a.jsonl").exists()


def test_an_unreadable_image_names_the_question_and_file(tiny_dir, tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data.write_text('{"question_id": "x", "image": "broken.png", "text": "何色？"}\n', encoding="utf-8")
    code = cli_main(["infer", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "question 'x'" in err and "broken.png" in err and "Traceback" not in err
