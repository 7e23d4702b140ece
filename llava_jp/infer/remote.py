"""Chat with a model served elsewhere, through an OpenAI-compatible chat API (a vLLM server,
`llava-jp serve`, or any other), with the same session interface as `ChatSession`:

    remote = RemoteModel("http://127.0.0.1:8000/v1")
    session = RemoteChatSession(remote, image="cat.jpg")
    print(session.ask("この画像について説明してください。"))

The image travels once, inside the first user message that is still in context, as a PNG data
URL (lossless: the server sees the pixels the local model would see). The server applies the
model's chat template, so prompts match `ChatSession`'s for a llava-jp model. Needs the
`openai` client library (`pip install 'llava-jp[demo]'`).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator

from PIL import Image

from llava_jp.core.processing import ImageLike
from llava_jp.core.templates import IMAGE_MARKER
from llava_jp.infer.chat import (FALLBACK_CONTEXT_LENGTH, MAX_IMAGE_PIXELS, ChatError, GenerationSettings,
                                 StreamedAnswer, load_chat_image)


class RemoteModel:
    """A model behind an OpenAI-compatible server: the client, the model name, its context length.

    model_name: the served model to use; None picks the only one the server lists.
    """

    def __init__(self, base_url: str, model_name: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0):
        try:
            import openai
        except ImportError:
            raise ChatError("openai がインストールされていません: pip install 'llava-jp[demo]'") from None
        self.openai = openai
        self.base_url = base_url
        # local servers need no key, but the client insists on one
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                    timeout=timeout, max_retries=1)
        try:
            served = list(self.client.models.list())
        except openai.APIError as err:
            raise ChatError(f"サーバー {base_url} に接続できませんでした: {_first_line(err)}") from None
        names = [m.id for m in served]
        if model_name is None:
            if len(names) != 1:
                raise ChatError(f"サーバーのモデルが {len(names)} 個あります（{', '.join(names)}）。--model-name で選んでください。")
            model_name = names[0]
        elif model_name not in names:
            raise ChatError(f"サーバーにモデル {model_name} がありません（あるもの: {', '.join(names) or 'なし'}）。")
        self.model_name = model_name
        # vLLM lists each model's context length as max_model_len
        listed = next(m for m in served if m.id == model_name)
        self.context_length = int(getattr(listed, "max_model_len", None) or FALLBACK_CONTEXT_LENGTH)

    def stream(self, messages: list[dict], settings: GenerationSettings):
        """Start a streamed chat completion (closing it stops the generation on the server)."""
        kwargs = {"max_tokens": int(settings.max_new_tokens), "temperature": float(settings.temperature),
                  "top_p": float(settings.top_p)}  # temperature 0 is greedy, as in GenerationSettings
        if settings.repetition_penalty != 1.0:
            kwargs["extra_body"] = {"repetition_penalty": float(settings.repetition_penalty)}
        return self.client.chat.completions.create(model=self.model_name, messages=messages, stream=True, **kwargs)


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class RemoteChatSession:
    """`ChatSession`'s interface (send/ask/reset/set_image, `messages`) over a `RemoteModel`.

    The history is trimmed the way `ChatSession` trims it, oldest exchange first, but only when
    the server refuses the prompt as too long (the client does not know the tokenizer).
    """

    def __init__(self, remote: RemoteModel, image: ImageLike | None = None, messages: list[dict] | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.remote = remote
        self.max_image_pixels = max_image_pixels
        self.image = None if image is None else load_chat_image(image, max_image_pixels)
        self._image_url = None if self.image is None else image_data_url(self.image)
        self.messages = [dict(m) for m in messages or []]
        self.context_length = remote.context_length

    def set_image(self, image: ImageLike | None) -> None:
        self.image = None if image is None else load_chat_image(image, self.max_image_pixels)
        self._image_url = None if self.image is None else image_data_url(self.image)
        self.reset()

    def reset(self) -> None:
        self.messages = []

    def prompt_messages(self, history: list[dict], question: str) -> list[dict]:
        """OpenAI chat messages: `history` + the question, the image first in the first user turn."""
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        messages.append({"role": "user", "content": question})
        if self._image_url is not None:
            messages[0]["content"] = [{"type": "image_url", "image_url": {"url": self._image_url}},
                                      {"type": "text", "text": messages[0]["content"]}]
        return messages

    def send(self, question: str, settings: GenerationSettings | None = None) -> RemoteTurn:
        """Send `question` (the request goes out now, so a refusal is raised here, as
        `ChatSession.send` raises a prompt that does not fit); iterate the turn for the text."""
        question = question.replace(IMAGE_MARKER, "").strip()
        if not question:
            raise ChatError("質問を入力してください。")
        return RemoteTurn(self, question, settings or GenerationSettings())

    def ask(self, question: str, settings: GenerationSettings | None = None) -> str:
        turn = self.send(question, settings)
        for _ in turn:
            pass
        return turn.text


class RemoteTurn(StreamedAnswer):
    """An answer being streamed from the server; `Turn`'s interface (iterate once, `text`,
    `notice`, `dropped_turns`; the exchange joins the history when complete or stopped early).
    Server and connection failures are `ChatError`s in Japanese."""

    def __init__(self, session: RemoteChatSession, question: str, settings: GenerationSettings):
        self.session = session
        self.question = question
        self.settings = settings
        self.history = session.messages
        self.dropped_turns = 0
        self.text = ""
        self.finished = False
        self._started = False
        self._response = self._open()


    def _open(self):
        openai = self.session.remote.openai
        while True:
            messages = self.session.prompt_messages(self.history, self.question)
            try:
                return self.session.remote.stream(messages, self.settings)
            except openai.BadRequestError as err:
                if not self.history:  # the question alone does not fit (or another refusal)
                    raise ChatError(f"サーバーが質問を受け付けませんでした: {_first_line(err)}") from None
                self.history = self.history[2:]
                self.dropped_turns += 1
            except openai.APIError as err:
                raise ChatError(f"サーバーから回答を得られませんでした: {_first_line(err)}") from None

    def _stream(self) -> Iterator[str]:
        openai = self.session.remote.openai
        stream = self._response
        interrupted = False
        try:
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece and not self.text:
                    piece = piece.lstrip()
                if piece:
                    self.text += piece
                    yield piece
            self.finished = True
        except GeneratorExit:
            interrupted = True
            raise
        except openai.APIError as err:
            raise ChatError(f"サーバーから回答を得られませんでした: {_first_line(err)}") from None
        finally:
            stream.close()
            self.text = self.text.rstrip()
            if self.finished or (interrupted and self.text):
                self.session.messages = self.history + [
                    {"role": "user", "content": self.question},
                    {"role": "assistant", "content": self.text},
                ]
