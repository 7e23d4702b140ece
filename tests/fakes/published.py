"""Stand-ins for the public Japanese training sets and eval-mm's Heron-Bench mirror, in the
exact file names and layouts they are published in (ECOSYSTEM.md), with tiny images."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

PRETRAIN_FILE = "llava_pretrain_blip_laion_cc_sbu_558k_ja.jsonl"  # turing-motors/LLaVA-Pretrain-JA
INSTRUCT_FILE = "llava_v1_5_instruct_620k_ja_v2.jsonl"  # turing-motors/LLaVA-v1.5-Instruct-620K-JA
HERON_MIRROR_FILE = "data/train-00000-of-00001.parquet"  # Silviase/Japanese-Heron-Bench, split train

COLOURS = {"赤": (220, 20, 20), "青": (20, 40, 220), "緑": (20, 180, 40)}


def _image(root: Path, relative: str, colour: tuple[int, int, int]) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 36), colour).save(path)
    return relative


def write_pretrain_jsonl(root: Path, images: Path, n: int = 12) -> Path:
    """LLaVA-Pretrain-JA: one JSON object per line; English in each turn's `value`, Japanese in
    `jp`; `image` a path relative to LLaVA-Pretrain's images folder."""
    lines = []
    for i in range(n):
        name, colour = list(COLOURS.items())[i % len(COLOURS)]
        image = _image(images, f"{i:05d}/{i:09d}.jpg", colour)
        lines.append({"id": f"{i:09d}", "image": image, "conversations": [
            {"from": "human", "value": "Give a brief description of the image.\n<image>",
             "jp": "画像の簡単な説明をしてください。\n<image>"},
            {"from": "gpt", "value": f"a {name} square", "jp": f"{name}い四角"}]})
    path = root / PRETRAIN_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


def write_instruct_jsonl(root: Path, images: Path, n: int = 12) -> Path:
    """LLaVA-v1.5-Instruct-620K-JA v2: Japanese in `value`; `image` a string, or a list of one
    path on some rows; text-only rows have no `image`."""
    lines = []
    for i in range(n):
        name, colour = list(COLOURS.items())[i % len(COLOURS)]
        row = {"id": f"{i:012d}", "conversations": [
            {"from": "human", "value": "<image>\n画像の色は何ですか？"}, {"from": "gpt", "value": f"{name}です。"}]}
        if i % 4 == 3:  # text-only
            row["conversations"] = [{"from": "human", "value": "日本の首都は？"}, {"from": "gpt", "value": "東京です。"}]
        else:
            image = _image(images, f"coco/train2017/{i:012d}.jpg", colour)
            row["image"] = [image] if i % 2 else image
        lines.append(row)
    path = root / INSTRUCT_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


def write_heron_mirror(root: Path) -> Path:
    """Silviase/Japanese-Heron-Bench as a dataset repository: one parquet file under data/."""
    from tests.fakes.eval_data import write_heron_table

    write_heron_table(root / HERON_MIRROR_FILE)
    return root
