"""Chat with a model: one image, a multi-turn conversation, streamed answers.

`ChatSession` is the Python API both front ends (`llava-jp chat`, `llava-jp demo`) use:

    session = ChatSession(model, processor, image="cat.jpg")
    print(session.ask("この画像について説明してください。"))      # one shot
    turn = session.send("猫は何匹いますか？")                     # streamed
    for piece in turn:
        print(piece, end="", flush=True)

The history holds plain text; when the prompt is built, the image marker goes into the first
user turn that is still in context, so trimming old turns never loses the image.
Messages meant for the person chatting (`ChatError`, `Turn.notice`) are in Japanese.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image, UnidentifiedImageError
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from llava_jp.core.processing import ImageLike, load_image
from llava_jp.core.templates import IMAGE_MARKER

# Where `llava-jp quickstart` writes its model; the front ends serve it when no --model is given.
QUICKSTART_MODEL_DIR = Path("quickstart_out") / "model"
# Larger images are refused before decoding (PIL's own decompression-bomb guard stays on too).
MAX_IMAGE_PIXELS = 40_000_000
# Used when the LM's config names no context length.
FALLBACK_CONTEXT_LENGTH = 2048

class ChatError(ValueError):
    """A problem to show to the person chatting (the message is in Japanese)."""


# -- images ----------------------------------------------------------------------------------
def load_chat_image(image: ImageLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image for chatting, refusing files that are not images or are too large.

    The size is read from the header before any pixel is decoded.
    """
    use_smaller = f"{max_pixels:,} 画素以下の画像を使ってください。"
    try:
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            with Image.open(image) as probe:  # reads the header only
                width, height = probe.size
        if width * height <= max_pixels:
            return load_image(image, max_pixels=max_pixels)
    except Image.DecompressionBombError:
        raise ChatError(f"画像が大きすぎます。{use_smaller}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ChatError("画像ファイルとして読み込めませんでした。PNG や JPEG などの画像を選んでください。") from None
    raise ChatError(f"画像が大きすぎます（{width}×{height} = {width * height:,} 画素）。{use_smaller}")


# -- generation settings -----------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings. temperature 0 means greedy decoding.

    `repetition_penalty` applies to the tokens generated so far, not to the prompt (system
    text, question, image placeholders): `generate_kwargs(prompt_length=...)` says where the
    answer starts.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    # field -> (lowest, highest) accepted value; the demo's sliders use the same ranges
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "max_new_tokens": (1, 2048),
        "temperature": (0.0, 2.0),
        "top_p": (0.05, 1.0),
        "repetition_penalty": (1.0, 2.0),
    }

    def __post_init__(self):
        for f in fields(self):
            low, high = self.RANGES[f.name]
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ChatError(f"{f.name} は数値にしてください（{value!r} が指定されました）。")
            if not low <= value <= high:  # NaN fails here too
                raise ChatError(f"{f.name} は {low} 以上 {high} 以下にしてください（{value} が指定されました）。")
        if int(self.max_new_tokens) != self.max_new_tokens:
            raise ChatError(f"max_new_tokens は整数にしてください（{self.max_new_tokens} が指定されました）。")

    def generate_kwargs(self, prompt_length: int | None = None) -> dict:
        """Keyword arguments for `generate`; with `prompt_length`, the repetition penalty skips
        the prompt's first `prompt_length` tokens (`generate` sees the prompt ids)."""
        kwargs = {"max_new_tokens": int(self.max_new_tokens)}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs["do_sample"] = False
        if self.repetition_penalty != 1.0:
            if prompt_length is None:
                kwargs["repetition_penalty"] = self.repetition_penalty
            else:
                kwargs["logits_processor"] = LogitsProcessorList(
                    [RepetitionPenaltyLogitsProcessor(self.repetition_penalty, prompt_ignore_length=prompt_length)])
        return kwargs


def context_length(model) -> int:
    """Positions the LM can attend over (prompt + answer)."""
    text_config = model.config.text_config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(text_config, name, None)
        if value:
            return int(value)
    return FALLBACK_CONTEXT_LENGTH


# -- the session -----------------------------------------------------------------------------
class _StopOnEvent(StoppingCriteria):
    """Ends generation when the reader stops listening (closed stream, Ctrl-C, disconnect)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class JapaneseTextStreamer(TextIteratorStreamer):
    """Releases text as soon as it ends in a Japanese character: transformers' streamer holds
    text back until a space or a kanji, so kana-only Japanese would arrive in one piece."""

    def _is_chinese_char(self, cp: int) -> bool:
        # CJK punctuation, hiragana, katakana, full-width forms (U+FFFD, a partial byte, waits)
        return super()._is_chinese_char(cp) or 0x3000 <= cp <= 0x30FF or 0xFF00 <= cp <= 0xFFEF


class ChatSession:
    """One image (or none) and a conversation about it, answered by `model`.

    messages: the history as `{"role": "user"|"assistant", "content": str}` without `<image>`
        markers; it is what the model sees (turns trimmed for length are removed from it).
    """

    def __init__(
        self,
        model,
        processor,
        image: ImageLike | None = None,
        messages: list[dict] | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.model = model
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        self.image = None if image is None else load_chat_image(image, max_image_pixels)
        self.messages = [dict(m) for m in messages or []]
        self.context_length = context_length(model)

    def set_image(self, image: ImageLike | None) -> None:
        """Chat about another image: the conversation starts over (one image per conversation)."""
        self.image = None if image is None else load_chat_image(image, self.max_image_pixels)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        self.messages = []

    def prompt_messages(self, history: list[dict], question: str) -> list[dict]:
        """`history` + the question, the image marker at the start of the first user turn."""
        messages = [dict(m) for m in history] + [{"role": "user", "content": question}]
        if self.image is not None:
            messages[0]["content"] = IMAGE_MARKER + "\n" + messages[0]["content"]
        return messages

    def _fit(self, question: str, max_new_tokens: int) -> list[dict]:
        """The most recent history such that prompt + answer fit the context: the oldest
        (question, answer) pairs are dropped first."""
        budget = self.context_length - max_new_tokens
        history = self.messages
        while True:
            messages = self.prompt_messages(history, question)
            n_tokens = len(self.processor.encode_conversation(messages, add_generation_prompt=True)["input_ids"])
            if n_tokens <= budget:
                return history
            if not history:
                raise ChatError(
                    f"質問が長すぎます（プロンプト {n_tokens} トークン + 最大生成 {max_new_tokens} トークンが"
                    f"文脈長 {self.context_length} トークンを超えます）。質問を短くするか、最大生成トークン数を減らしてください。"
                )
            history = history[2:]

    def send(self, question: str, settings: GenerationSettings | None = None) -> Turn:
        """Start answering `question`; iterate the returned `Turn` for the streamed text."""
        question = question.replace(IMAGE_MARKER, "").strip()
        if not question:
            raise ChatError("質問を入力してください。")
        settings = settings or GenerationSettings()
        history = self._fit(question, int(settings.max_new_tokens))
        return Turn(self, history, question, settings)

    def ask(self, question: str, settings: GenerationSettings | None = None) -> str:
        """Answer `question` in one go (the turn is added to the history)."""
        turn = self.send(question, settings)
        for _ in turn:
            pass
        return turn.text


class StreamedAnswer:
    """What every streamed answer offers its front end (local `Turn`, the demo's remote turn):
    iterate once over text pieces (`_stream`), `text`, `dropped_turns` and its `notice`."""

    dropped_turns: int
    _started: bool

    @property
    def notice(self) -> str | None:
        if not self.dropped_turns:
            return None
        return f"会話が長くなったため、古いやり取り {self.dropped_turns} 回分をモデルの文脈から外しました。"

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Turn can be iterated only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[str]:
        raise NotImplementedError


class Turn(StreamedAnswer):
    """An answer being generated. Iterating yields text pieces as they are decoded (iterate
    once). When the answer is complete, or the reader stops early (closes the iterator), the
    question and the answer shown so far join the session's history; after an error, nothing does.

    dropped_turns / notice: how many of the oldest exchanges were left out to fit the context,
    and a Japanese sentence saying so (None when nothing was dropped).
    """

    def __init__(self, session: ChatSession, history: list[dict], question: str, settings: GenerationSettings):
        self.session = session
        self.history = history
        self.question = question
        self.dropped_turns = (len(session.messages) - len(history)) // 2
        self.settings = settings
        self.text = ""
        self.finished = False
        self._started = False


    def _stream(self) -> Iterator[str]:
        session = self.session
        processor, model = session.processor, session.model
        images = [session.image] if session.image is not None else None
        messages = session.prompt_messages(self.history, self.question)
        batch = processor(conversations=messages, images=images, add_generation_prompt=True).to(model.device)
        streamer = JapaneseTextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        errors: list[BaseException] = []

        def work():
            try:
                model.generate(
                    **batch, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    **self.settings.generate_kwargs(prompt_length=batch["input_ids"].shape[1]),
                )
            except BaseException as err:  # handed to the reader, which re-raises it
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, name="llava-jp-generate", daemon=True)
        thread.start()
        interrupted = False
        try:
            for piece in streamer:
                if not self.text:
                    piece = piece.lstrip()
                if piece:
                    self.text += piece
                    yield piece
            thread.join()
            if errors:
                raise errors[0]
            self.finished = True
        except GeneratorExit:  # the reader stopped early: what it showed is kept
            interrupted = True
            raise
        finally:
            stop.set()
            thread.join()
            self.text = self.text.rstrip()
            if self.finished or (interrupted and self.text):
                self._commit()

    def _commit(self) -> None:
        self.session.messages = self.history + [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.text},
        ]


# -- loading -----------------------------------------------------------------------------------
def resolve_model(name_or_path: str | None) -> str:
    """The model to chat with: the one given, else the quickstart's model if it exists."""
    if name_or_path:
        return name_or_path
    if (QUICKSTART_MODEL_DIR / "config.json").exists():
        return str(QUICKSTART_MODEL_DIR)
    raise ChatError(
        f"モデルがありません: --model DIR_OR_HUB_ID を指定するか、`llava-jp quickstart` を実行して "
        f"./{QUICKSTART_MODEL_DIR.as_posix()} を作ってください。"
    )


def load_model(name_or_path: str | None = None, device: str = "auto"):
    """(model, processor) from a saved directory or hub id, in eval mode on `device`
    ("auto": the GPU in bf16 when there is one, else the CPU in float32), via the one loader."""
    from llava_jp.infer.load import default_device, inference_dtype
    from llava_jp.infer.load import load_model as load

    path = resolve_model(name_or_path)
    if device == "auto":
        device = default_device()
    try:
        model, processor = load(path, dtype=inference_dtype(device), device=device)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ChatError(f"モデルを読み込めませんでした（{path}）: {first_line}") from None
    return model.eval(), processor
