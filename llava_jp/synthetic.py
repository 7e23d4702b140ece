"""A synthetic Japanese visual-QA dataset, generated on the spot (nothing binary is bundled).

Each 64 px image shows one large shape (丸 / 四角 / 三角) in one colour and a small digit in
the top-left corner, drawn with PIL's default font. Three question types: the colour and the
shape (coarse, visible at any resolution) and the digit (fine detail: about 7x9 px).
Written in the LLaVA training format (JSON + image folder) so the quickstart exercises exactly
the pipeline real data goes through.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
COLOURS = {"赤": (220, 40, 40), "青": (40, 70, 220), "緑": (40, 160, 70), "黄": (230, 200, 30), "紫": (150, 60, 190)}
SHAPES = ("丸", "四角", "三角")
QUESTIONS = {
    "color": "図形は何色ですか？",
    "shape": "図形の形は何ですか？",
    "digit": "左上の数字は何ですか？",
}


DIGIT_FONT_SIZE = 12
DIGIT_ORIGIN = (4, 1)


def draw_sample(rng: random.Random, digit_size: int = DIGIT_FONT_SIZE,
                digit_origin: tuple[int, int] = DIGIT_ORIGIN) -> tuple[Image.Image, dict[str, str]]:
    """One image and its answers per question type."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    digit = str(rng.randrange(10))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    size = rng.randint(26, 38)
    x0 = rng.randint(20, IMAGE_SIZE - size - 2)
    y0 = rng.randint(20, IMAGE_SIZE - size - 2)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "丸":
        draw.ellipse(box, fill=fill)
    elif shape == "四角":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    draw.text(digit_origin, digit, fill=(0, 0, 0), font=ImageFont.load_default(size=digit_size))
    return image, {"color": colour, "shape": shape, "digit": digit}


def write_dataset(out_dir: Path, n_train: int, n_test: int, seed: int = 0, **draw_kwargs) -> dict[str, Path]:
    """Images + stage-1 captions + stage-2 conversations + a held-out QA list.

    Returns the paths of `images/`, `stage1.json`, `stage2.json` and `test.json`.
    """
    rng = random.Random(seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    stage1, stage2, test = [], [], []
    for i in range(n_train + n_test):
        image, answers = draw_sample(rng, **draw_kwargs)
        name = f"{i:06d}.png"
        image.save(image_dir / name)
        if i >= n_train:
            test += [{"id": f"{i}-{kind}", "image": name, "type": kind, "question": QUESTIONS[kind], "answer": answers[kind]}
                     for kind in QUESTIONS]
            continue
        stage1.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nこの画像を説明してください。"},
            {"from": "gpt", "value": f"{answers['color']}色の{answers['shape']}と数字の{answers['digit']}。"},
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
