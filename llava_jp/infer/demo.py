"""`llava-jp demo`: a Japanese web chat (Gradio): upload an image, talk about it over many turns.

Every browser tab (Gradio session) keeps its own `Conversation` in a `gr.State`, so concurrent
users never see each other's turns. The model is either loaded in this process (shared; the
queue runs one generation at a time) or served elsewhere behind an OpenAI-compatible API
(`--backend openai --base-url ...`: a vLLM server batches the users' requests, so several run
at once). Needs the `[demo]` extra (gradio, openai).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llava_jp.infer.chat import MAX_IMAGE_PIXELS, ChatError, ChatSession, GenerationSettings, load_chat_image
from llava_jp.infer.chat_cli import add_model_arguments

logger = logging.getLogger(__name__)

TITLE = "llava-jp デモ"
EXAMPLE_QUESTIONS = (
    "この画像について説明してください。",
    "何色の図形がありますか？",
    "図形の形は何ですか？",
    "画像に書かれている数字は何ですか？",
)
SLIDER_LABELS = {
    "temperature": ("温度（temperature）", "0 で貪欲法（毎回同じ回答）、大きいほど多様", 0.05),
    "top_p": ("top_p", "確率の高い候補から累積でこの割合までを使う", 0.05),
    "max_new_tokens": ("最大生成トークン数", "回答の長さの上限", 1),
    "repetition_penalty": ("繰り返しペナルティ", "1 で無効。生成済みのトークンの繰り返しを抑える", 0.05),
}
# generations in flight at once when a server (vLLM) answers: it batches them
REMOTE_CONCURRENCY = 16
INTERNAL_ERROR = "内部エラーで回答できませんでした。サーバーのログを確認してください。"
# Japanese first: the default theme would fetch a web font, and the demo must work offline.
FONTS = ["IPAPGothic", "Noto Sans CJK JP", "Hiragino Sans", "Meiryo", "sans-serif"]


@dataclass
class Conversation:
    """One browser session's chat: the image, what the model sees, and what the page shows."""

    image: Image.Image | None = None
    messages: list[dict] = field(default_factory=list)
    display: list[dict] = field(default_factory=list)


# -- example images (drawn at startup: the repository holds no binary files) --------------------
def make_example_images(directory: Path) -> dict[str, Path]:
    """Draw a few simple pictures to ask about (coloured shapes, a digit): {Japanese label: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    drawings = {
        "赤い丸": ("red_circle", lambda d: d.ellipse((48, 48, 208, 208), fill=(220, 30, 30))),
        "青い四角": ("blue_square", lambda d: d.rectangle((56, 56, 200, 200), fill=(30, 60, 220))),
        "緑の三角": ("green_triangle", lambda d: d.polygon([(128, 40), (220, 210), (36, 210)], fill=(30, 170, 60))),
        "数字の7": ("digit_seven", lambda d: d.text((128, 128), "7", fill=(0, 0, 0), anchor="mm",
                                                    font=ImageFont.load_default(size=160))),
    }
    paths = {}
    for label, (name, draw) in drawings.items():
        image = Image.new("RGB", (256, 256), (255, 255, 255))
        draw(ImageDraw.Draw(image))
        paths[label] = directory / f"{name}.png"
        image.save(paths[label])
    return paths


# -- handlers (plain functions of (inputs, state) -> outputs, testable without a browser) --------
class DemoHandlers:
    """What the page's events do. The model is shared; all per-user data is in `Conversation`.

    The model: `model` + `processor` loaded here, or `remote`, a `RemoteModel` (an
    OpenAI-compatible server; model and processor are then None).
    """

    def __init__(self, model=None, processor=None, max_image_pixels: int = MAX_IMAGE_PIXELS, remote=None):
        if (remote is None) == (model is None):
            raise ValueError("DemoHandlers needs a model and processor, or a remote model, not both")
        self.model = model
        self.processor = processor
        self.remote = remote
        self.max_image_pixels = max_image_pixels

    def session(self, state: Conversation):
        """A chat session over `state`'s image and history, on this demo's model."""
        if self.remote is not None:
            from llava_jp.infer.remote import RemoteChatSession

            return RemoteChatSession(self.remote, image=state.image, messages=state.messages,
                                     max_image_pixels=self.max_image_pixels)
        return ChatSession(self.model, self.processor, image=state.image, messages=state.messages,
                           max_image_pixels=self.max_image_pixels)

    def load_image(self, path: str | None, state: Conversation | None):
        """New image -> (preview, state, chat display, status). A new image starts a new chat;
        a file that cannot be used leaves the current chat as it was."""
        state = state or Conversation()
        if path is None:
            return None, Conversation(), [], "画像を外しました。画像なしでも質問できます。"
        try:
            image = load_chat_image(path, self.max_image_pixels)
        except ChatError as err:
            return _unchanged(), state, state.display, f"⚠️ {err}"
        except Exception:
            logger.exception("loading %s failed", path)
            return _unchanged(), state, state.display, "⚠️ 画像を読み込めませんでした。別の画像を試してください。"
        status = f"画像を読み込みました（{image.width}×{image.height}）。日本語で質問してください。"
        return image, Conversation(image=image), [], status

    def reset(self, state: Conversation | None):
        """Forget the chat, keep the image -> (state, chat display, status)."""
        image = state.image if state else None
        return Conversation(image=image), [], "会話をリセットしました。"

    def respond(self, question: str, state: Conversation | None, temperature, top_p, max_new_tokens, repetition_penalty):
        """Stream an answer -> yields (chat display, state, status, question box)."""
        state = state or Conversation()
        try:
            settings = GenerationSettings(max_new_tokens, temperature, top_p, repetition_penalty)  # it checks them
            session = self.session(state)
            turn = session.send(question or "", settings)
        except ChatError as err:
            yield state.display, state, f"⚠️ {err}", question
            return
        display = state.display + [{"role": "user", "content": turn.question}, {"role": "assistant", "content": ""}]
        notice = f"ℹ️ {turn.notice}" if turn.notice else ""
        yield display, state, notice or "回答を生成しています…", ""
        try:
            with closing(iter(turn)) as stream:  # a closed page stops the generation too
                for piece in stream:
                    display[-1] = {"role": "assistant", "content": display[-1]["content"] + piece}
                    yield display, state, notice or "回答を生成しています…", ""
        except ChatError as err:  # a remote server refused or failed
            yield state.display, state, f"⚠️ {err}", turn.question
            return
        except Exception:
            logger.exception("generation failed")
            yield state.display, state, f"⚠️ {INTERNAL_ERROR}", turn.question
            return
        display[-1] = {"role": "assistant", "content": turn.text}  # as the history keeps it (trailing spaces trimmed)
        state = Conversation(image=state.image, messages=session.messages, display=display)
        yield display, state, " ".join(s for s in (notice, "回答しました。") if s), ""


def _unchanged():
    import gradio as gr

    return gr.update()


# -- the page ------------------------------------------------------------------------------------
def build_demo(model=None, processor=None, max_image_pixels: int = MAX_IMAGE_PIXELS, example_dir: Path | None = None,
               remote=None):
    """The Gradio app (a `gr.Blocks`, queue configured); start it with `serve`.
    The model: `model` + `processor`, or `remote` (a `RemoteModel`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from llava_jp.infer.chat import context_length

    handlers = DemoHandlers(model, processor, max_image_pixels, remote)
    example_dir = example_dir or Path(tempfile.mkdtemp(prefix="llava-jp-demo-"))
    example_images = make_example_images(example_dir)
    ranges = dict(GenerationSettings.RANGES)
    # leave at least half of the context to the prompt
    ranges["max_new_tokens"] = (1, min(ranges["max_new_tokens"][1], (remote.context_length if remote else context_length(model)) // 2))
    defaults = GenerationSettings(max_new_tokens=min(GenerationSettings().max_new_tokens, ranges["max_new_tokens"][1]))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n画像をアップロードして、日本語で質問してください。続けて質問すると、同じ画像について会話を続けます。")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="画像ファイル（PNG・JPEG など）", type="filepath", elem_id="image-upload")
                preview = gr.Image(label="会話中の画像", type="pil", interactive=False, elem_id="image-preview", height=240,
                                   buttons=["fullscreen"])
                gr.Examples([[str(p)] for p in example_images.values()], inputs=[upload], label="画像の例",
                            example_labels=list(example_images))
                with gr.Accordion("生成の設定", open=False):
                    sliders = []
                    for name, (label, info, step) in SLIDER_LABELS.items():
                        low, high = ranges[name]
                        sliders.append(gr.Slider(low, high, value=getattr(defaults, name), step=step, label=label,
                                                 info=info, elem_id=f"slider-{name.replace('_', '-')}"))
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="会話", elem_id="chatbot", height=420, buttons=["copy", "copy_all"])
                status = gr.Markdown("画像をアップロードするか、下の例から選んでください。", elem_id="status")
                with gr.Row():
                    question = gr.Textbox(label="質問", placeholder=EXAMPLE_QUESTIONS[0], elem_id="question", scale=5)
                    send = gr.Button("送信", variant="primary", elem_id="send", scale=1)
                reset = gr.Button("会話をリセット", elem_id="reset")
                gr.Examples([[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="質問の例")

        upload.change(handlers.load_image, [upload, state], [preview, state, chatbot, status], api_name="load_image")
        gr.on([question.submit, send.click], handlers.respond, [question, state, *sliders],
              [chatbot, state, status, question], api_name="chat")
        reset.click(handlers.reset, [state], [state, chatbot, status], api_name="reset")
        chatbot.clear(handlers.reset, [state], [state, chatbot, status], api_name=False)
    # in-process: one generation at a time (the model is shared, and a CPU gains nothing from
    # running two); a remote server batches concurrent requests itself
    demo.queue(default_concurrency_limit=REMOTE_CONCURRENCY if remote else 1, max_size=64)
    return demo


def serve(demo, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Start the app on host:port (returns at once with block=False)."""
    import gradio as gr

    return demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False,
        theme=gr.themes.Default(font=FONTS, font_mono=["monospace"]), max_file_size="64mb", quiet=not block,
        show_error=True,  # API callers see why a value was refused (our handlers never raise)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    remote = parser.add_argument_group("a model served elsewhere (--backend openai)")
    remote.add_argument("--backend", choices=("local", "openai"), default="local",
                        help="local: load --model here; openai: talk to an OpenAI-compatible server (vLLM)")
    remote.add_argument("--base-url", default=None, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    remote.add_argument("--model-name", default=None, help="served model to use (default: the only one listed)")
    remote.add_argument("--api-key", default=None, help="the server's key, if it wants one (default: env OPENAI_API_KEY)")


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    from llava_jp.infer.chat import load_model, resolve_model

    model = processor = remote = None
    try:
        if find_spec("gradio") is None:
            raise ChatError("gradio がインストールされていません: pip install 'llava-jp[demo]'")
        if args.backend == "openai":
            from llava_jp.infer.remote import RemoteModel

            if not args.base_url:
                raise ChatError("--backend openai には --base-url（例: http://127.0.0.1:8000/v1）が必要です。")
            remote = RemoteModel(args.base_url, args.model_name, args.api_key)
        else:
            if args.base_url or args.model_name:
                raise ChatError("--base-url と --model-name は --backend openai と一緒に使ってください。")
            model, processor = load_model(resolve_model(args.model), args.device)
    except ChatError as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 2
    serve(build_demo(model, processor, args.max_image_pixels, remote=remote), args.host, args.port)
    return 0
