"""Files and records with every data fault the trainer must survive."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds (almost) none: a few hundred bytes
    that would take gigabytes to decode, for testing the pixel limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def unusual_images() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """Valid images in modes that need converting: name -> (file bytes, expected RGB of pixel 0,0)."""
    palette = Image.new("P", (16, 12), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0  # index 0 transparent -> composited on white
    deep = Image.fromarray(np.full((12, 16), 0xC8FF, dtype=np.uint16))
    return {
        "cmyk.jpg": (encoded(Image.new("CMYK", (16, 12), (255, 0, 0, 0)), "JPEG", quality=100), (0, 255, 255)),
        "grey16.png": (encoded(deep, "PNG"), (0xC8, 0xC8, 0xC8)),
        "grey16_big_endian.tif": (encoded(Image.fromarray(np.full((12, 16), 0xC8FF, dtype=">u2")), "TIFF"),
                                  (0xC8, 0xC8, 0xC8)),
        "palette_alpha.png": (encoded(palette, "PNG"), (255, 255, 255)),
        "rgba.png": (encoded(Image.new("RGBA", (16, 12), (0, 0, 255, 0)), "PNG"), (255, 255, 255)),
    }


def broken_images(good: bytes) -> dict[str, tuple[bytes | None, str]]:
    """name -> (file bytes, or None for no file; the reason the trainer must count)."""
    return {
        "missing.png": (None, "missing_image"),
        "empty.png": (b"", "empty_image"),
        "truncated.png": (good[: len(good) // 2], "corrupt_image"),
        "notes.png": ("これは画像ではありません".encode(), "not_an_image"),
        "over_limit.png": (png_header(10_000, 10_000), "image_too_large"),  # PIL only warns here
        "bomb.png": (png_header(30_000, 30_000), "image_too_large"),  # PIL's DecompressionBombError
    }


def write_images(folder: Path, images: dict[str, bytes | None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        if data is not None:
            (folder / name).write_bytes(data)


def image_sample(sample_id: str, image: str, answer: str = "赤い丸です。") -> dict:
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n何が見えますか？"}, {"from": "gpt", "value": answer}]}


def bad_conversations(image: str, max_length: int) -> list[tuple[dict, str]]:
    """(record, the reason the trainer must give) for every conversation fault."""
    def turns(*pairs):
        return [{"from": f, "value": v} for f, v in pairs]

    return [
        ({"id": "unknown-role", "conversations": turns(("human", "やあ"), ("robot", "はい"))}, "bad_role"),
        ({"id": "empty-answer", "conversations": turns(("human", "やあ"), ("gpt", "  "))}, "empty_turn"),
        ({"id": "empty-question", "conversations": turns(("human", ""), ("gpt", "はい"))}, "empty_turn"),
        ({"id": "no-marker", "image": image, "conversations": turns(("human", "何色？"), ("gpt", "赤"))},
         "image_tag_mismatch"),
        ({"id": "two-markers", "image": image, "conversations": turns(("human", "<image><image>何色？"), ("gpt", "赤"))},
         "image_tag_mismatch"),
        ({"id": "marker-no-image", "conversations": turns(("human", "<image>何色？"), ("gpt", "赤"))},
         "image_tag_mismatch"),
        ({"id": "user-twice", "conversations": turns(("human", "a"), ("human", "b"), ("gpt", "c"))}, "bad_turn_order"),
        ({"id": "no-turns", "conversations": []}, "malformed_sample"),
        ({"id": "value-not-text", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
         "malformed_sample"),
        ({"id": "lone-surrogate", "conversations": turns(("human", "a\ud800"), ("gpt", "b"))}, "malformed_sample"),
        ({"id": "answer-too-long", "conversations": turns(("human", "長い答え"), ("gpt", "あ" * (4 * max_length)))},
         "no_complete_answer_within_max_length"),
    ]


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")  # ASCII: lone surrogates stay escaped
    return path
