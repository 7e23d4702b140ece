"""Every subcommand answers a user's mistake with one line naming the file / line / field / flag
and exit status 2 (cli.py catches `UserError`); programming errors keep their traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_jp.cli import SUBCOMMANDS, main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files a user might hand in by mistake."""
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.json").write_text('[{"id": 1,\n  "image": oops}]', encoding="utf-8")
    (d / "bad.jsonl").write_text('{"id": 1}\n{"id": 2,}\n', encoding="utf-8")
    (d / "bad.yaml").write_text("stage: 2\nlearning_rate: [1\n", encoding="utf-8")
    (d / "unknown_key.yaml").write_text("stage: 2\nlearnin_rate: 1e-3\n", encoding="utf-8")
    (d / "ok.json").write_text('[{"id": 1, "conversations": [{"from": "human", "value": "a"}, '
                               '{"from": "gpt", "value": "b"}]}]', encoding="utf-8")
    (d / "a_file").write_text("x", encoding="utf-8")
    return d


def _cases(d: Path, tiny_dir: Path) -> list[tuple[list[str], str]]:
    missing = str(d / "missing")
    ok = str(d / "ok.json")
    return [
        (["nonsense"], "invalid choice"),
        (["info", "--preset", "tinyy"], "did you mean tiny"),
        (["info", "--model", missing], "no such file or folder"),
        (["info", "--preset", "tiny", "--bogus"], "--bogus"),
        (["train", "--learning_rat", "1e-4"], "did you mean --learning_rate"),
        (["train", "--config", "stage3"], "did you mean stage2"),
        (["train", "--config", str(d / "bad.yaml")], "bad.yaml:3:1: malformed YAML"),
        (["train", "--config", str(d / "unknown_key.yaml")], "unknown key 'learnin_rate'; did you mean learning_rate"),
        (["train", "--preset", "tiny", "--data_path", str(d / "nope.json")], "data_path"),
        (["train", "--preset", "tiny", "--data_path", str(d / "bad.json")], "bad.json:2:12: malformed JSON"),
        (["train", "--preset", "tiny", "--data_path", str(d / "bad.jsonl")], "bad.jsonl:2:10: malformed JSON"),
        (["train", "--preset", "tinyy", "--data_path", ok], "unknown preset 'tinyy'"),
        (["train", "--preset", "tiny", "--data_path", ok, "--template", "llm-jp"], "template 'llm-jp'"),
        (["train", "--preset", "tiny", "--data_path", ok, "--image_folder", missing], "image_folder"),
        (["train", "--model", missing, "--data_path", ok], "model"),
        (["train", "--preset", "tiny", "--data_path", ok, "--max_steps", "x"], "--max_steps"),
        (["train", "--deepspeed", "ds.json"], "accelerate"),
        (["quickstart", "--out", str(d / "a_file")], "--out"),
        (["quickstart", "--stage2-steps", "many"], "--stage2-steps"),
        (["data", "check", str(d / "nope.json")], "no such file"),
        (["data", "check", str(d / "bad.json")], "bad.json:2:12: malformed JSON"),
        (["data", "convert", str(d / "nope.jsonl"), "--out", str(d / "o.json")], "no such file"),
        (["data", "mix", str(d / "bad.yaml"), "--out", str(d / "o.json")], "bad.yaml:3:1: malformed YAML"),
        (["eval", "--model", missing, "--out", str(d / "eval")], "no such file or folder"),
        (["eval", "--model", str(tiny_dir), "--out", str(d / "eval"), "--tasks", "ja-vg-vqa"], "unknown task"),
        (["chat", "--model", missing], "missing"),
        (["demo", "--model", missing], "missing"),
        (["release", "--model", missing, "--out", str(d / "rel")], "--model"),
        (["import-llava-jp", "--src", missing, "--out", str(d / "imp")], "no such folder"),
        (["cache-features", "--model", missing, "--data_path", ok, "--out", str(d / "c")], "no such file or folder"),
        (["cache-features", "--model", "tiny", "--data_path", str(d / "bad.json"), "--out", str(d / "c")],
         "malformed JSON"),
        (["bench", "--bogus"], "--bogus"),
        (["infer", "--bogus"], "error"),
        (["serve", "--bogus"], "error"),
        (["init", "--preset", "tinny", "--out", str(d / "base")], "did you mean tiny"),
        (["init", "--preset", "tiny", "--out", str(d / "a_file")], "--out"),
        (["plot", missing], "no such folder"),
        (["plot", str(d)], "no log.jsonl"),
        (["train", "--preset", "tiny", "--data_path", ok, "--report_to", "tensorbord"], "did you mean tensorboard"),
    ]


def test_every_subcommand_is_covered(bad, tiny_dir):
    covered = {argv[0] for argv, _ in _cases(bad, tiny_dir)}
    assert set(SUBCOMMANDS) <= covered, set(SUBCOMMANDS) - covered


def test_user_mistakes_are_one_line_and_exit_2(bad, tiny_dir, capsys):
    failures = []
    for argv, expected in _cases(bad, tiny_dir):
        try:
            code = cli_main(argv)
        except SystemExit as exit_:  # only --help may exit; anything else is a failure below
            code = exit_.code if exit_.code == 2 else f"SystemExit({exit_.code})"  # eval's own usage errors
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or expected not in lines[0] or "Traceback" in captured.err:
            failures.append((argv, code, captured.err[-400:]))
    assert not failures, "\n".join(map(str, failures))


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    import llava_jp.info

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(llava_jp.info, "run", broken)
    with pytest.raises(KeyError):
        cli_main(["info", "--preset", "tiny"])


def test_console_hub_id_offline_is_one_line(tmp_path):
    """In a real process (console output, no traceback): a hub id that cannot be served says so
    and says how to run offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "llava_jp.cli", "info", "--model", "nobody-here/no-such-model"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "nobody-here/no-such-model" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
