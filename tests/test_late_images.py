"""Truncation and late images: a sample is kept only if every one of its image tokens fits."""

import json

from PIL import Image

from llava_jp.train.data import Collator, encode_dataset, load_records


def _rows(image_path: str) -> list[dict]:
    """A long first exchange, the image only in the second user turn (LLaVA-Instruct has these)."""
    return [
        {"id": "late", "image": image_path, "conversations": [
            {"from": "human", "value": "こんにちは。" * 12},
            {"from": "gpt", "value": "はい、元気です。" * 12},
            {"from": "human", "value": "<image>\nこれは何色ですか？"},
            {"from": "gpt", "value": "赤です。"}]},
        {"id": "early", "image": image_path, "conversations": [
            {"from": "human", "value": "<image>\nこれは何色ですか？"},
            {"from": "gpt", "value": "赤です。"}]},
    ]


def test_a_sample_whose_image_tokens_fall_after_max_length_is_dropped_and_counted(tiny, tmp_path):
    # item 4: the cut kept the image but dropped its placeholders; the collator still sent the
    # pixels and the model raised for the whole batch, mid-run
    model, processor = tiny
    Image.new("RGB", (40, 30), (220, 10, 10)).save(tmp_path / "red.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_rows("red.png"), ensure_ascii=False), encoding="utf-8")
    full, _ = encode_dataset(*load_records(str(path)), processor, max_length=4096)
    late = full["input_ids"][0]
    first_image = late.index(processor.image_token_id)
    limit = first_image  # the first answer fits, the image does not
    assert len(full["input_ids"][1]) <= limit  # the early sample fits whole
    dataset, report = encode_dataset(*load_records(str(path)), processor, max_length=limit)
    assert report.dropped == {"image_beyond_max_length": 1}, report.as_dict()
    assert dataset["id"] == ["early"]
    batch = Collator(dataset, processor, str(tmp_path))(list(range(len(dataset))))
    batch.pop("faults")
    assert model(**batch).loss.isfinite()


def test_a_cut_inside_the_image_tokens_still_drops_the_sample(tiny, tmp_path):
    _, processor = tiny
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_rows("x.png")[1:], ensure_ascii=False), encoding="utf-8")
    full, _ = encode_dataset(*load_records(str(path)), processor, max_length=4096)
    start = full["input_ids"][0].index(processor.image_token_id)
    _, report = encode_dataset(*load_records(str(path)), processor, max_length=start + 3)
    assert report.dropped == {"image_cut_by_max_length": 1}
