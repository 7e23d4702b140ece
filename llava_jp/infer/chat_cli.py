"""`llava-jp chat`: a multi-turn chat in the terminal, answers streamed as they are generated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from llava_jp.infer.chat import MAX_IMAGE_PIXELS, ChatError, ChatSession, GenerationSettings, load_model

HELP = """コマンド:
  /image パス   別の画像を読み込む（会話は最初から）
  /reset        会話をリセットする（画像はそのまま）
  /help         このヘルプを表示する
  /quit         終了する（/exit、Ctrl-D も可）"""

USER_PROMPT = "ユーザー> "
ASSISTANT_PROMPT = "システム> "


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --device, shared with `llava-jp demo`."""
    parser.add_argument("--model", default=None,
                        help="saved model directory or hub id (default: ./quickstart_out/model if present)")
    parser.add_argument("--device", default="auto", help="torch device (default: the GPU if any, else the CPU)")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="refuse larger images (default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", default=None, help="image to talk about (can be changed with /image)")
    defaults = GenerationSettings()
    for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("repetition_penalty", float)):
        low, high = GenerationSettings.RANGES[name]
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=f"{low}..{high} (default: %(default)s)")


def chat_loop(
    session: ChatSession, settings: GenerationSettings, read_line: Callable[[str], str] = input, stdout: TextIO | None = None
) -> None:
    """Read questions and commands until /quit, Ctrl-C or end of input; stream each answer.

    read_line(prompt) returns one line and raises EOFError at the end (like `input`).
    """
    stdout = stdout or sys.stdout
    print("画像について日本語で質問してください。/help でコマンド一覧を表示します。", file=stdout, flush=True)
    while True:
        try:
            line = read_line(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            print("\n終了します。", file=stdout)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                print("終了します。", file=stdout)
                return
            if command == "/help":
                print(HELP, file=stdout)
            elif command == "/reset":
                session.reset()
                print("会話をリセットしました。", file=stdout)
            elif command == "/image":
                _load_image(session, argument.strip(), stdout)
            else:
                print(f"不明なコマンドです: {command}\n{HELP}", file=stdout)
            continue
        _answer(session, line, settings, stdout)


def _load_image(session: ChatSession, path: str, stdout: TextIO) -> None:
    if not path:
        print("使い方: /image 画像ファイルのパス", file=stdout)
        return
    try:
        session.set_image(path)
    except ChatError as err:
        print(f"エラー: {err}", file=stdout)
        return
    print(f"画像を読み込みました: {path}（新しい会話を始めます）", file=stdout)


def _answer(session: ChatSession, question: str, settings: GenerationSettings, stdout: TextIO) -> None:
    try:
        turn = session.send(question, settings)
    except ChatError as err:
        print(f"エラー: {err}", file=stdout)
        return
    if turn.notice:
        print(f"（{turn.notice}）", file=stdout)
    print(ASSISTANT_PROMPT, end="", file=stdout, flush=True)
    stream = iter(turn)
    try:
        for piece in stream:
            print(piece, end="", file=stdout, flush=True)
    except KeyboardInterrupt:
        stream.close()
        print("\n（中断しました）", file=stdout)
        return
    print(file=stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
        model, processor = load_model(args.model, args.device)
        session = ChatSession(model, processor, max_image_pixels=args.max_image_pixels)
        if args.image:
            session.set_image(args.image)
    except ChatError as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 2
    if args.image:
        print(f"画像: {args.image}")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    chat_loop(session, settings)
    return 0
