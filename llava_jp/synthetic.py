"""A synthetic Japanese visual-QA dataset, generated on the spot (nothing binary is bundled).

Each 64 px image shows one large shape (丸 / 四角 / 三角) in one colour, filled with one of
three patterns: 縦じま / 横じま (1-px stripes of the colour and the background) or 無地 (a flat
fill of their average colour). Three question types: colour and shape (coarse, visible at any
resolution) and pattern, the fine-detail type: halving the resolution turns either stripe
pattern into exactly the flat average colour, so the pattern is visible only at full
resolution (the S2 high-resolution crops), never in a 32 px view of the image.
Written in the LLaVA training format (JSON + image folder) so the quickstart exercises exactly
the pipeline real data goes through.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (245, 245, 245)
COLOURS = {"赤": (220, 40, 40), "青": (40, 70, 220), "緑": (40, 160, 70), "黄": (230, 200, 30), "紫": (150, 60, 190)}
SHAPES = ("丸", "四角", "三角")
PATTERNS = ("無地", "縦じま", "横じま")
QUESTIONS = {
    "color": "図形は何色ですか？",
    "shape": "図形の形は何ですか？",
    "pattern": "図形の模様は何ですか？",
}


def _fill(colour: tuple[int, int, int], pattern: str) -> Image.Image:
    """A full-size fill: stripes of colour/background, or their flat average."""
    if pattern == "無地":
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple((c + b) // 2 for c, b in zip(colour, BACKGROUND)))
    fill = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(fill)
    for i in range(0, IMAGE_SIZE, 2):
        line = [(i, 0), (i, IMAGE_SIZE)] if pattern == "縦じま" else [(0, i), (IMAGE_SIZE, i)]
        draw.line(line, fill=colour, width=1)
    return fill


def draw_sample(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    """One image and its answers per question type."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    pattern = rng.choice(PATTERNS)
    size = rng.randint(30, 44)
    x0 = rng.randint(2, IMAGE_SIZE - size - 2)
    y0 = rng.randint(2, IMAGE_SIZE - size - 2)
    box = (x0, y0, x0 + size, y0 + size)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "丸":
        draw.ellipse(box, fill=255)
    elif shape == "四角":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=255)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    image.paste(_fill(COLOURS[colour], pattern), mask=mask)
    return image, {"color": colour, "shape": shape, "pattern": pattern}


def caption(answers: dict[str, str]) -> str:
    return f"{answers['color']}色で{answers['pattern']}の{answers['shape']}。"


def write_dataset(out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """Images + stage-1 captions + stage-2 conversations + a held-out QA list.

    Returns the paths of `images/`, `stage1.json`, `stage2.json` and `test.json`.
    """
    rng = random.Random(seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    stage1, stage2, test = [], [], []
    for i in range(n_train + n_test):
        image, answers = draw_sample(rng)
        name = f"{i:06d}.png"
        image.save(image_dir / name)
        if i >= n_train:
            test += [{"id": f"{i}-{kind}", "image": name, "type": kind, "question": QUESTIONS[kind], "answer": answers[kind]}
                     for kind in QUESTIONS]
            continue
        stage1.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nこの画像を説明してください。"},
            {"from": "gpt", "value": caption(answers)},
        ]})
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)
        turns = []
        for j, kind in enumerate(kinds):
            question = ("<image>\n" if j == 0 else "") + QUESTIONS[kind]
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answers[kind]}]
        stage2.append({"id": str(i), "image": name, "conversations": turns})
    paths = {"images": image_dir}
    for name, rows in (("stage1", stage1), ("stage2", stage2), ("test", test)):
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return paths
