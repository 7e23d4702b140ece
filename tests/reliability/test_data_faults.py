"""Item 1: every data fault is skipped and counted (or, with strict_data, fails naming the
sample); training never crashes mid-epoch and every good sample is trained on."""

import json
import logging
import math
from collections import Counter

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_jp import cli
from llava_jp.core.modeling import IGNORE_INDEX
from llava_jp.core.processing import IMAGE_FAULTS, ImageLoadError, load_image
from llava_jp.train.config import load_config
from llava_jp.train.data import Collator, DataError, encode_dataset, load_records
from llava_jp.train.loop import setup_model, train

from tests.reliability.faults import (
    bad_conversations,
    broken_images,
    image_sample,
    unusual_images,
    write_images,
    write_json,
)

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def faulty(train_workspace, tmp_path_factory):
    """The workspace's images plus broken and unusual ones, and a dataset using all of them."""
    root = tmp_path_factory.mktemp("faulty")
    images = root / "images"
    good = sorted(train_workspace["images"].iterdir())
    write_images(images, {p.name: p.read_bytes() for p in good[:12]})
    unusual, broken = unusual_images(), broken_images(good[0].read_bytes())
    write_images(images, {name: data for name, (data, _) in {**unusual, **broken}.items()})
    rows = [image_sample(f"good-{p.stem}", p.name) for p in good[:12]]
    rows += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": "こんにちは"},
                                                   {"from": "gpt", "value": "こんにちは！" * (i + 1)}]} for i in range(4)]
    rows += [image_sample(f"unusual-{name}", name) for name in unusual]
    rows += [image_sample(f"broken-{name}", name) for name in broken]
    rows += [record for record, _ in bad_conversations(good[0].name, MAX_LENGTH)]
    rows.append({"id": "second-answer-too-long", "conversations": [  # kept, cut back to the first answer
        {"from": "human", "value": "一つ目"}, {"from": "gpt", "value": "はい"},
        {"from": "human", "value": "二つ目"}, {"from": "gpt", "value": "あ" * (4 * MAX_LENGTH)}]})
    return {"root": root, "images": images, "data": write_json(root / "faulty.json", rows), "rows": rows,
            "broken": {f"broken-{name}": reason for name, (_, reason) in broken.items()},
            "conversations": {record["id"]: reason for record, reason in bad_conversations(good[0].name, MAX_LENGTH)},
            "unusual": unusual, "good_ids": [r["id"] for r in rows[:12 + 4 + len(unusual)]]}


def _cfg(ws, faulty, out, **kw):
    values = {"model": str(ws["base"]), "image_folder": str(faulty["images"]), "data_path": str(faulty["data"]),
              "output_dir": str(out), "per_device_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
              "save_steps": 1000, "warmup_ratio": 0.0, "max_length": MAX_LENGTH, "seed": 3}
    return load_config(None, **{**values, **kw})


def test_every_fault_is_skipped_and_counted_and_every_good_sample_trains(train_workspace, faulty, tmp_path, caplog, checked):
    caplog.set_level(logging.WARNING, logger="llava_jp.train")
    summary = train(_cfg(train_workspace, faulty, tmp_path, num_epochs=1))
    data = summary["data"]

    assert summary["steps"] == summary["total_steps"] and not summary["stopped_early"]  # the epoch finished
    assert data["dropped"] == dict(Counter(faulty["conversations"].values()))
    assert data["skipped_in_training"] == dict(Counter(faulty["broken"].values()))
    assert data["truncated"] == 1
    n_good = len(faulty["good_ids"]) + 1  # + the truncated one
    assert data["kept"] == n_good + len(faulty["broken"])  # image faults are found lazily
    assert data["trained_samples"] == n_good  # nothing good was lost
    assert set(data["skipped_in_training"]) <= set(IMAGE_FAULTS)

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_in_training"] == data["skipped_in_training"]  # the log carries the counts too
    assert all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((tmp_path / "summary.json").read_text())["data"] == data
    for sample_id, reason in faulty["broken"].items():  # each skip is logged, naming the sample
        assert any(sample_id in m and reason in m for m in caplog.messages), sample_id
    checked("conversation faults dropped", len(faulty["conversations"]))
    checked("image faults skipped", len(faulty["broken"]))
    checked("unusual images trained", len(faulty["unusual"]))


def test_strict_data_fails_naming_the_sample(train_workspace, faulty, tmp_path, capsys, checked):
    with pytest.raises(DataError, match="unknown-role"):  # a conversation fault, at tokenization
        train(_cfg(train_workspace, faulty, tmp_path / "a", strict_data=True))
    rows = [r for r in faulty["rows"] if r["id"] in faulty["good_ids"] or r["id"] == "broken-missing.png"]
    images_only = write_json(tmp_path / "one_bad_image.json", rows)
    args = ["train", "--model", str(train_workspace["base"]), "--data_path", str(images_only),
            "--image_folder", str(faulty["images"]), "--output_dir", str(tmp_path / "b"), "--per_device_batch_size", "4",
            "--num_epochs", "1", "--max_length", str(MAX_LENGTH), "--save_steps", "1000", "--strict_data", "true"]
    assert cli.main(args) == 1  # an image fault, when its batch is built: a clear error, no traceback
    assert "error: sample 'broken-missing.png': missing_image:" in capsys.readouterr().err
    checked("strict failures naming the sample", 2)


def test_a_bad_sample_leaves_the_batch_as_if_it_were_not_there(train_workspace, faulty):
    processor = setup_model(_cfg(train_workspace, faulty, "unused"))[1]
    dataset, _ = encode_dataset(*load_records(str(faulty["data"])), processor, MAX_LENGTH)
    index = {sample_id: i for i, sample_id in enumerate(dataset["id"])}
    collate = Collator(dataset, processor, str(faulty["images"]))
    good = [index[i] for i in faulty["good_ids"][:3]]
    bad = [index[i] for i in faulty["broken"]]
    with_bad = collate([good[0], bad[0], good[1], bad[1], good[2]])
    alone = collate(good)
    assert [(f[0], f[1]) for f in with_bad.pop("faults")] == [(dataset["id"][b], faulty["broken"][dataset["id"][b]])
                                                             for b in bad[:2]]
    assert alone.pop("faults") == []
    assert alone.keys() == with_bad.keys() and all(torch.equal(alone[k], with_bad[k]) for k in alone)


def test_an_all_bad_batch_trains_nothing_and_does_not_crash(train_workspace, faulty, tmp_path, checked):
    processor = setup_model(_cfg(train_workspace, faulty, "unused"))[1]
    dataset, _ = encode_dataset(*load_records(str(faulty["data"])), processor, MAX_LENGTH)
    index = {sample_id: i for i, sample_id in enumerate(dataset["id"])}
    batch = Collator(dataset, processor, str(faulty["images"]))([index[i] for i in faulty["broken"]])
    assert len(batch.pop("faults")) == len(faulty["broken"])
    assert batch["input_ids"].shape[0] == 1 and (batch["labels"] == IGNORE_INDEX).all()  # one masked row

    rows = [r for r in faulty["rows"] if r["id"] in faulty["broken"]]  # nothing but bad images
    cfg = _cfg(train_workspace, faulty, tmp_path, data_path=str(write_json(tmp_path / "bad.json", rows)),
               max_steps=2, save_steps=1)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["updates_skipped"] == 2 and summary["data"]["trained_samples"] == 0
    base = load_file(train_workspace["base"] / "model.safetensors")
    trained = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(base[k], trained[k]) for k in base)  # no data, no update
    checked("all-bad steps survived", summary["updates_skipped"])


def test_images_that_need_converting_load_and_broken_ones_name_their_reason(faulty, checked):
    for name, (_, rgb) in faulty["unusual"].items():
        image = load_image(faulty["images"] / name)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == pytest.approx(rgb, abs=2), name
    for sample_id, reason in faulty["broken"].items():
        with pytest.raises(ImageLoadError) as err:
            load_image(faulty["images"] / sample_id.removeprefix("broken-"))
        assert err.value.reason == reason and sample_id.removeprefix("broken-") in str(err.value)
    with pytest.raises(ImageLoadError) as err:
        load_image(faulty["images"])  # a directory
    assert err.value.reason == "unreadable_image"
    assert Image.MAX_IMAGE_PIXELS is not None  # the decompression-bomb guard is on
    checked("image files classified", len(faulty["unusual"]) + len(faulty["broken"]) + 1)
