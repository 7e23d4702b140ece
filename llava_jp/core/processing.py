"""`LlavaJpProcessor`: (conversation or prompt, images) -> input_ids, attention_mask, labels, pixel_values."""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image as transformers_load_image
from transformers.processing_utils import MultiModalData

from .modeling import IGNORE_INDEX
from .templates import IMAGE_MARKER, add_image_token, content_text, get_template
from .vision import DEFAULT_LAYOUT, LLAVA_JP_V1_1_LAYOUT

ImageLike = Image.Image | str | os.PathLike
# Longer sides are shrunk to this before padding and resizing: the padded square of a
# 40000 x 1 image would need 4.8 GB, and the image processor works in float32. Far above any
# model input (S2: 768 px), so ordinary images are untouched.
MAX_PREPROCESS_SIDE = 4096
PROMPT_LAYOUTS = (DEFAULT_LAYOUT, LLAVA_JP_V1_1_LAYOUT)


class ImageLoadError(ValueError):
    """An image that cannot be used. `reason` is one of `IMAGE_FAULTS`; the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# why an image file cannot be used, as counted by the trainer (`llava_jp.train.data`)
IMAGE_FAULTS = ("missing_image", "unreadable_image", "empty_image", "not_an_image", "corrupt_image", "image_too_large")


def load_image(image: ImageLike, max_pixels: int | None = None) -> Image.Image:
    """Open an image (path or PIL), apply its EXIF orientation, and convert it to RGB.

    Transparent images are composited on white; CMYK, greyscale, palette and 16-bit images are
    converted to RGB. Files larger than `max_pixels` (default: PIL's `Image.MAX_IMAGE_PIXELS`,
    whose decompression-bomb guard stays on) are refused from the header, before decoding.
    Every failure is an `ImageLoadError` (a ValueError) whose `reason` says what was wrong:
    PIL's decoders raise many exception types on damaged files, callers handle one.
    """
    name = "image" if isinstance(image, Image.Image) else os.fspath(image)
    try:
        return _to_rgb(image if isinstance(image, Image.Image) else _open(image, name, max_pixels))
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError("missing_image", f"{name}: no such file") from None
    except UnidentifiedImageError:
        reason, what = ("empty_image", "empty file") if _is_empty(image) else ("not_an_image", "not an image PIL can read")
        raise ImageLoadError(reason, f"{name}: {what}") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError("image_too_large", f"{name}: {err}") from None
    except OSError as err:
        # the file system's refusal; other OSErrors (PIL's, or a seek to where a damaged header points) mean the bytes
        if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)) or err.errno == errno.EIO:
            raise ImageLoadError("unreadable_image", f"{name}: {err}") from None
        raise ImageLoadError("corrupt_image", f"{name}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- a damaged file can make a decoder raise SyntaxError, struct.error, ...
        raise ImageLoadError("corrupt_image", f"{name}: {type(err).__name__}: {err}") from None


def _open(path: str | os.PathLike, name: str, max_pixels: int | None) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():  # PIL warns above its limit; the check below refuses instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)  # reads the header only; PIL refuses 2x its limit here
    with opened:
        width, height = opened.size
        if limit is not None and width * height > limit:
            raise ImageLoadError("image_too_large", f"{name}: {width}x{height} = {width * height:,} pixels "
                                                    f"> the limit of {limit:,}")
        opened.load()
        return opened.copy() if opened.mode != "P" else opened.convert("RGBA")


def _is_empty(image) -> bool:
    try:
        return os.path.getsize(image) == 0
    except (OSError, TypeError):
        return False


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit (and 32-bit integer) greyscale: keep the top 8 of 16 bits; numpy reads any byte order
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    return image.convert("RGB") if image.mode != "RGB" else image


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `fill` (LLaVA's pad mode: the image mean colour), image centred."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _check_encodable(text: str) -> None:
    """Text the tokenizer can take: lone surrogates (JSON escapes like "\\ud800") are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode ({err.reason} at character {err.start}): {text[:40]!r}") from None


def _pil_image_processor(image_processor):
    """The same image processor (every setting) on transformers' PIL backend."""
    name = type(image_processor).__name__
    if name.endswith("Pil"):
        return image_processor
    import transformers

    pil_class = getattr(transformers, name + "Pil", None)
    if pil_class is None:
        raise ValueError(f"image_backend 'pil': transformers has no {name}Pil")
    settings = {k: v for k, v in image_processor.to_dict().items() if k != "image_processor_type"}
    return pil_class(**settings)


# keyword arguments transformers' callers (pipelines, apply_chat_template) pass that change nothing
# here: batches are always padded, the template adds the special tokens it needs
_ACCEPTED_NOOP_KWARGS = {"padding", "add_special_tokens", "return_attention_mask", "legacy"}


class LlavaJpProcessor(ProcessorMixin):
    """Turns conversations, or prompts, and images into model inputs (a `BatchFeature`).

    Each `<image>` (a special token of the tokenizer, `image_token` / `image_token_id`) becomes
    `num_image_tokens` copies of `image_token_id`. Text is tokenized segment by segment
    (context, answer, context, ...), so the supervised tokens of every answer are exactly
    `tokenizer(answer) + [eos]` (**where labels are masked**: `encode_conversation`); a
    label/answer mismatch cannot happen, whatever the tokenizer does at segment boundaries.
    Prompts for generation go through the same function, so training and generation see
    identical token sequences.

    `text` may be a prompt rendered by `apply_chat_template` (it starts with the template's
    system text and user prefix; it is parsed back into messages, never wrapped again) or a
    bare question, which is wrapped as one user turn (`<image>\n` is put in front when an
    image is given and the question has no `<image>`).

    prompt_layout "llava-jp-v1.1-compat" (set by `llava-jp import-llava-jp` only) reproduces the
    predecessor's prompts: it tokenized the text before each `<image>` as its own chunk with
    the tokenizer's default special tokens, so whatever the tokenizer appends (llm-jp v1's end
    token) comes right before the image features.

    image_backend "pil" resizes with PIL (the image processor's `...Pil` class), as
    transformers 4.x did and the predecessor's checkpoints were trained with; transformers 5
    saves an image processor without its backend, so the choice is kept here, across
    save/load. None: transformers' default (torchvision).
    """

    image_token = IMAGE_MARKER

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        template: str = "llm-jp-v1",
        num_image_tokens: int = 729,
        pad_to_square: bool = True,
        prompt_layout: str = DEFAULT_LAYOUT,
        image_token_id: int | None = None,
        image_backend: str | None = None,
        **kwargs,
    ):
        """`image_token_id` is ignored: the id is the tokenizer's `<image>`, added here when the
        tokenizer lacks it (processors saved before it was a token stored -200)."""
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout: expected one of {PROMPT_LAYOUTS}, got {prompt_layout!r}")
        if image_backend not in (None, "pil"):
            raise ValueError(f"image_backend: expected null or 'pil', got {image_backend!r}")
        self.image_backend = image_backend
        if image_backend == "pil" and image_processor is not None:
            image_processor = _pil_image_processor(image_processor)
        self.prompt_layout = prompt_layout
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.pad_to_square = pad_to_square
        get_template(template)
        if chat_template is None or IMAGE_MARKER not in chat_template:
            # earlier versions saved a template for string content only
            chat_template = get_template(template).jinja()
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._image_token_id = add_image_token(tokenizer) if tokenizer is not None else None

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    # -- images ------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> (n, 3, S, S) normalised pixel values."""
        prepared = []
        fill = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
        for image in images:
            if isinstance(image, str) and image.startswith(("http://", "https://")):
                image = transformers_load_image(image)  # as every transformers processor does
            image = load_image(image)
            if max(image.size) > MAX_PREPROCESS_SIDE:
                image = image.copy()
                image.thumbnail((MAX_PREPROCESS_SIDE, MAX_PREPROCESS_SIDE), Image.Resampling.BICUBIC)
            if self.pad_to_square:
                image = expand_to_square(image, fill)
            prepared.append(image)
        return self.image_processor(prepared, return_tensors="pt")["pixel_values"]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image for images of the given (height, width) sizes: always
        `num_image_tokens` (every image is padded and resized to one square). vLLM asks this."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))

    # -- text --------------------------------------------------------------------------------
    def _special_prefix(self) -> list[int]:
        """Ids the tokenizer puts before a text of its own accord (e.g. BOS for Llama)."""
        if not hasattr(self, "_prefix_cache"):
            with_special = self.tokenizer("あ", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("あ", add_special_tokens=False)["input_ids"]
            cut = len(with_special) - len(without)
            has_prefix = cut > 0 and with_special[cut:] == without
            self._prefix_cache = with_special[:cut] if has_prefix else []
        return self._prefix_cache

    def _special_suffix(self) -> list[int]:
        """Ids the tokenizer puts after a text of its own accord (e.g. llm-jp v1's end token)."""
        with_special = self.tokenizer("あ", add_special_tokens=True)["input_ids"]
        without = self.tokenizer("あ", add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(without) + 1):
            if with_special[start:start + len(without)] == without:
                return with_special[start + len(without):]
        return []

    def encode_conversation(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> dict[str, list[int]]:
        """Normalised messages -> `input_ids` and `labels` (lists, unpadded).

        Labels are IGNORE_INDEX everywhere except each assistant answer and its end token.
        """
        template = get_template(self.template)
        segments = template.segments(messages, add_generation_prompt=add_generation_prompt)
        texts = [seg.text for seg in segments if seg.kind != "image"]
        for text in texts:
            _check_encodable(text)
        # special-token strings typed in the text ("<EOD|LLM-jp>", "<s>", "<image>") stay text: a
        # user cannot end a turn or forge a conversation or an image by typing them
        encoded = iter(self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                       if texts else [])
        eos = self.tokenizer.eos_token_id
        if template.append_end_token and eos is None:
            raise ValueError(f"template {template.name!r} needs an end token but the tokenizer has no eos_token")
        input_ids = list(self._special_prefix())
        labels = [IGNORE_INDEX] * len(input_ids)
        before_image = self._special_suffix() if self.prompt_layout == LLAVA_JP_V1_1_LAYOUT else []
        for seg in segments:
            if seg.kind == "image":
                input_ids += before_image
                labels += [IGNORE_INDEX] * len(before_image)
                input_ids += [self.image_token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                continue
            ids = list(next(encoded))
            if seg.kind == "answer":
                if template.append_end_token:
                    ids.append(eos)
                input_ids += ids
                labels += ids
            else:
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
        return {"input_ids": input_ids, "labels": labels}

    def prompt_messages(self, text: str, has_image: bool) -> tuple[list[dict], bool]:
        """`text` as messages: a rendered prompt parsed back (see the class docstring), or a
        question wrapped as one user turn. Returns (messages, ends with the generation prompt)."""
        template = get_template(self.template)
        if template.prompt_prefix and text.startswith(template.prompt_prefix):
            return template.parse(text, self.tokenizer.eos_token or "")
        if has_image and IMAGE_MARKER not in text:
            text = IMAGE_MARKER + "\n" + text
        return [{"role": "user", "content": text}], True

    def pad(self, features: list[dict], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a list of encoded samples into a batch (`labels` only where every sample has them)."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": []}
        with_labels = all("labels" in f for f in features)
        if with_labels:
            batch["labels"] = []
        for f in features:
            n = length - len(f["input_ids"])
            def place(values, fill):
                return [fill] * n + list(values) if padding_side == "left" else list(values) + [fill] * n
            batch["input_ids"].append(place(f["input_ids"], pad_id))
            batch["attention_mask"].append(place([1] * len(f["input_ids"]), 0))
            if with_labels:
                batch["labels"].append(place(f["labels"], IGNORE_INDEX))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    def __call__(
        self,
        images: ImageLike | Sequence | None = None,
        text: str | Sequence[str] | None = None,
        conversations: list[dict] | Sequence[list[dict]] | None = None,
        add_generation_prompt: bool | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        return_mm_token_type_ids: bool = False,
        return_text_replacement_offsets: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Batch inputs for the model, as a `BatchFeature`.

        text: prompt(s) rendered by `apply_chat_template`, or bare question(s) (class docstring).
            Texts with an answer after the last user turn give `labels`.
        conversations: message lists (string or list content); with assistant answers they give
            `labels`; `add_generation_prompt` ends them with the assistant prefix.
        images: one image per `<image>`, in order: a flat list over the batch, one list per
            sample, or (for questions) one entry per text, None for a text-only sample.
        return_mm_token_type_ids / return_text_replacement_offsets: what vLLM asks for to find
            each image's placeholder run (token types 1 = image; character spans of each `<image>`
            in the prompt and of its expansion).
        Prompts for generation are left-padded by default, training batches right-padded.
        """
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"LlavaJpProcessor takes images and text only, not {modality}")
        if kwargs.pop("truncation", None):  # vLLM passes truncation=False; cutting a prompt would drop image tokens
            raise ValueError("LlavaJpProcessor does not truncate prompts (image placeholders must stay whole)")
        unknown = sorted(set(kwargs) - _ACCEPTED_NOOP_KWARGS)
        if unknown:
            raise TypeError(f"LlavaJpProcessor got unexpected keyword argument(s) {unknown}")
        if (text is None) == (conversations is None):
            raise ValueError("pass exactly one of `text` or `conversations`")
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            per_sample = _images_per_sample(images, [t.count(IMAGE_MARKER) for t in texts])
            parsed = [self.prompt_messages(t, bool(ims)) for t, ims in zip(texts, per_sample)]
            conversations = [messages for messages, _ in parsed]
            generation = [gen for _, gen in parsed]
        else:
            single = bool(conversations) and isinstance(conversations[0], dict)
            conversations = [conversations] if single else list(conversations)
            markers = [sum(content_text(m["content"]).count(IMAGE_MARKER) for m in c if m["role"] == "user")
                       for c in conversations]
            per_sample = _images_per_sample(images, markers)
            generation = [bool(add_generation_prompt)] * len(conversations)
        wanted = [sum(content_text(m["content"]).count(IMAGE_MARKER) for m in c if m["role"] == "user")
                  for c in conversations]
        if wanted != [len(ims) for ims in per_sample]:
            raise ValueError(f"the conversations have {sum(wanted)} <image> markers but "
                             f"{sum(len(ims) for ims in per_sample)} images were given (one image per <image>)")
        features = [self.encode_conversation(c, g) for c, g in zip(conversations, generation)]
        for f, g in zip(features, generation):
            if g:
                f.pop("labels")
        given = [im for ims in per_sample for im in ims]
        batch = self.pad(features, padding_side or ("left" if any(generation) else "right"))
        if given:
            batch["pixel_values"] = self.preprocess_images(given)
        if return_mm_token_type_ids:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        if return_text_replacement_offsets:
            template = get_template(self.template)
            eos = self.tokenizer.eos_token or ""
            rendered = [template.render(c, eos, add_generation_prompt=g) for c, g in zip(conversations, generation)]
            batch["text_replacement_offsets"] = [self._replacement_offsets(r) for r in rendered]
        if return_tensors is None:
            batch = {k: v.tolist() if isinstance(v, torch.Tensor) and k != "pixel_values" else v
                     for k, v in batch.items()}
        elif return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' (or None) is supported, got {return_tensors!r}")
        return BatchFeature(batch)

    def _replacement_offsets(self, text: str) -> list[dict]:
        """Where each `<image>` of `text` is and where its expansion lands (transformers' format)."""
        offsets, shift, replacement = [], 0, IMAGE_MARKER * self.num_image_tokens
        start = text.find(IMAGE_MARKER)
        while start >= 0:
            end = start + len(IMAGE_MARKER)
            offsets.append({"type": "image", "span": (start, end), "new_span": (start + shift, start + shift + len(replacement)),
                            "text": IMAGE_MARKER, "replacement": replacement})
            shift += len(replacement) - len(IMAGE_MARKER)
            start = text.find(IMAGE_MARKER, end)
        return offsets


def _images_per_sample(images, markers: list[int]) -> list[list]:
    """Images grouped by sample. Accepted: None, one image, one list per sample, a flat list in
    marker order, or (when some sample has no `<image>`, i.e. questions) one entry per sample with
    None for text-only samples."""
    if images is None:
        return [[] for _ in markers]
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    images = list(images)
    if images and all(isinstance(im, (list, tuple)) for im in images):
        if len(images) != len(markers):
            raise ValueError(f"got {len(markers)} texts but image lists for {len(images)}")
        return [list(im) for im in images]
    if all(markers) or not any(im is None for im in images) and len(images) != len(markers):
        flat = [im for im in images if im is not None]
        if len(flat) != sum(markers):
            raise ValueError(f"the prompts have {sum(markers)} <image> markers but {len(flat)} images were given")
        grouped, it = [], iter(flat)
        for n in markers:
            grouped.append([next(it) for _ in range(n)])
        return grouped
    if len(images) != len(markers):
        raise ValueError(f"got {len(markers)} texts but {len(images)} images")
    grouped = [[im] if im is not None else [] for im in images]
    for i, (ims, n) in enumerate(zip(grouped, markers)):
        if n and len(ims) != n:
            raise ValueError(f"sample {i}: {n} <image> markers but {len(ims)} images were given")
    return grouped
