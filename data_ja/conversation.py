"""LLaVA-format samples: roles, `<image>` tags, sample validation, Japanese share.

A sample is `{"id", "image"?: str, "conversations": [{"from", "value"}]}`.
`validate_sample` is the single definition of "well-formed" shared by `convert` (drop) and
`check` (report), and it follows the trainer's rules (llava_jp.train).
"""

from __future__ import annotations

import re
import unicodedata

IMAGE_TAG = "<image>"  # llava_jp.core.templates.IMAGE_MARKER (not imported: see normalize_conversation)
DEFAULT_MIN_JAPANESE_SHARE = 0.3
LLAVA_ROLE = {"user": "human", "assistant": "gpt"}


def normalize_conversation(raw: list[dict], sample_id: object = None) -> list[dict]:
    """`llava_jp.core.templates.normalize_conversation`, imported on first use: importing llava_jp
    loads torch and the model classes, which `translate` and `mix` do not need."""
    from llava_jp.core.templates import normalize_conversation as core_normalize

    return core_normalize(raw, sample_id)


def image_paths(sample: dict) -> list[str]:
    """The sample's image paths (empty for a text-only sample)."""
    image = sample.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def validate_sample(sample) -> list[tuple[str, str]]:
    """Every reason the trainer would reject the sample, as `(code, detail)` pairs.

    Codes: malformed_sample, empty_turn, bad_role, bad_turn_order, image_tag_mismatch. A
    trailing user turn is allowed (the trainer drops it). The conversation rules are the
    trainer's own (`llava_jp.core.templates.conversation_issues`), imported on first use.
    """
    from llava_jp.core.templates import conversation_issues

    if not isinstance(sample, dict):
        return [("malformed_sample", f"sample is {type(sample).__name__}, not an object")]
    if sample.get("image") is not None and not isinstance(sample["image"], str):
        return [("malformed_sample", "'image' must be one path (one image per sample)")]
    return conversation_issues(sample.get("conversations"), len(image_paths(sample)))


def _is_japanese_char(ch: str) -> bool:
    cp = ord(ch)
    return (0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF or 0x3400 <= cp <= 0x4DBF
            or 0x4E00 <= cp <= 0x9FFF or 0xFF66 <= cp <= 0xFF9F or ch == "々")


def japanese_share(text: str) -> float | None:
    """Share of letters that are kana/kanji; None when the text has no letters at all."""
    letters = [c for c in unicodedata.normalize("NFKC", text.replace(IMAGE_TAG, ""))
               if c.isalpha()]
    if not letters:
        return None
    return sum(map(_is_japanese_char, letters)) / len(letters)


def sample_text(sample: dict) -> str:
    return "\n".join(t.get("value", "") for t in sample.get("conversations", []))


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers_in(text: str) -> list[str]:
    """Numbers in the text, NFKC-normalised and without thousands separators."""
    return [n.replace(",", "") for n in _NUMBER.findall(unicodedata.normalize("NFKC", text))]
