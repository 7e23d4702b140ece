"""`llava-jp chat`: the terminal chat, driven through its stdin like a person typing."""

import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from llava_jp.infer.chat import ChatSession, GenerationSettings, load_model
from llava_jp.infer.chat_cli import chat_loop
from llava_jp.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, stdin="", cwd=REPO, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "llava_jp.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def test_terminal_chat_two_turns_then_another_image(tiny_dir, tmp_path):
    red, blue, broken = tmp_path / "red.png", tmp_path / "blue.png", tmp_path / "broken.jpg"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(red)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(blue)
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    script = f"何色ですか？\n形は何ですか？\n/image {broken}\n/image {blue}\n何色ですか？\n/reset\n/quit\n"
    result = run_cli(["chat", "--model", str(tiny_dir), "--image", str(red), "--max-new-tokens", "12"], script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    # what the same conversations get through the Python API (greedy, so deterministic)
    model, processor = load_model(str(tiny_dir), device="cpu")
    settings = GenerationSettings(max_new_tokens=12)
    session = ChatSession(model, processor, image=red)
    first, second = session.ask("何色ですか？", settings), session.ask("形は何ですか？", settings)
    on_blue = ChatSession(model, processor, image=blue).ask("何色ですか？", settings)
    assert len({first, second, on_blue}) == 3

    out = result.stdout
    expected_in_order = [
        f"システム> {first}\n",
        f"システム> {second}\n",
        "エラー: 画像ファイルとして読み込めませんでした",
        f"画像を読み込みました: {blue}（新しい会話を始めます）",
        f"システム> {on_blue}\n",
        "会話をリセットしました。",
        "終了します。",
    ]
    positions = [out.find(text) for text in expected_in_order]
    assert -1 not in positions and positions == sorted(positions), out
    assert out.count("ユーザー> ") == 7


def test_chat_loop_commands_and_interrupt(tiny):
    model, processor = tiny
    lines = iter(["/help", "/image", "/foo", ""])

    def read_line(prompt):
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt
        return line

    out = io.StringIO()
    chat_loop(ChatSession(model, processor), GenerationSettings(max_new_tokens=4), read_line, out)
    text = out.getvalue()
    assert "/image パス" in text and "使い方: /image" in text and "不明なコマンドです: /foo" in text
    assert text.rstrip().endswith("終了します。")


def test_without_a_model_both_front_ends_say_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["chat"]) == 2
    assert cli_main(["demo"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "llava-jp quickstart" in line and "--model" in line
