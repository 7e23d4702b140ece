import json
import torch
import torch.nn.functional as F
from PIL import Image

from llava_jp import synthetic


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(1, 3, 64, 64) / 127.5 - 1


def _square(pattern: str) -> Image.Image:
    """A red square at 16..48 px filled with `pattern`, composed as draw_sample does."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image = Image.new("RGB", (64, 64), synthetic.BACKGROUND)
    image.paste(synthetic._fill(synthetic.COLOURS["赤"], pattern), mask=mask)
    return image


def test_pattern_is_lost_at_half_resolution_and_visible_at_full():
    # the S2 low-resolution view is the image resized to 32 px (bicubic, as s2wrapper does)
    plain, vertical, horizontal = (_tensor(_square(p)) for p in synthetic.PATTERNS)
    full_inside = (..., slice(20, 44), slice(20, 44))
    low_inside = (..., slice(10, 22), slice(10, 22))
    for striped in (vertical, horizontal):
        assert (striped - plain)[full_inside].abs().max() > 0.5
        low = F.interpolate(striped, size=32, mode="bicubic") - F.interpolate(plain, size=32, mode="bicubic")
        assert low[low_inside].abs().max() < 1e-2  # equal up to 8-bit rounding of the average colour


def test_dataset_files_and_answers(tmp_path):
    paths = synthetic.write_dataset(tmp_path, n_train=6, n_test=2, seed=0)
    stage2 = json.loads(paths["stage2"].read_text(encoding="utf-8"))
    test = json.loads(paths["test"].read_text(encoding="utf-8"))
    assert len(stage2) == 6 and len(test) == 2 * len(synthetic.QUESTIONS)
    for row in stage2:
        turns = row["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) == 2 * len(synthetic.QUESTIONS)
        assert sum("<image>" in t["value"] for t in turns) == 1
    assert {r["type"] for r in test} == set(synthetic.QUESTIONS)
    assert all((paths["images"] / r["image"]).exists() for r in test)
