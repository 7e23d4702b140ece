import json
import os

import pytest
import torch
from PIL import Image

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.cli import main
from llava_jp.train.features import FeatureCache, fill, open_for_training
from llava_jp.train.config import load_config
from llava_jp.train.data import Collator, encode_dataset, load_records
from llava_jp.train.loop import train

BF16_RTOL = 2e-2  # features are stored in bf16 (8 mantissa bits)


@pytest.fixture(scope="module")
def workspace(train_workspace):
    return train_workspace


def _load(ws):
    model = LlavaJpForConditionalGeneration.from_pretrained(ws["base"]).eval()
    return model, LlavaJpProcessor.from_pretrained(ws["base"])


def _images(ws):
    return [r["image"] for r in json.loads(ws["stage1"].read_text(encoding="utf-8"))]


def test_cached_features_give_the_uncached_loss(workspace, tmp_path):
    model, processor = _load(workspace)
    names = _images(workspace)[:3]
    cache = FeatureCache.for_model(tmp_path, model, processor)
    assert fill(cache, model, processor, names, workspace["images"], batch_size=2, shard_size=2)["computed"] == 3
    batch = processor(conversations=[[{"role": "user", "content": "<image>\n説明して"},
                                      {"role": "assistant", "content": "赤い丸です。"}]] * 3,
                      images=[workspace["images"] / n for n in names])
    pixels = batch.pop("pixel_values")
    with torch.no_grad():
        features = cache.load(names)
        assert features.dtype == torch.bfloat16 and features.shape == (3, model.num_image_tokens, model.projector_input_width)
        torch.testing.assert_close(features.float(), model.encode_images(pixels), rtol=BF16_RTOL, atol=1e-2)
        uncached = model(**batch, pixel_values=pixels).loss
        cached = model(**batch, image_features=features).loss
    torch.testing.assert_close(cached, uncached, rtol=1e-3, atol=1e-3)


def test_stage1_training_from_the_cache_matches_training_from_pixels(workspace, tmp_path):
    assert main(["cache-features", "--model", str(workspace["base"]), "--data_path", str(workspace["stage1"]),
                 "--image_folder", str(workspace["images"]), "--out", str(tmp_path / "cache"), "--shard_size", "10"]) == 0
    common = dict(model=str(workspace["base"]), image_folder=str(workspace["images"]), data_path=str(workspace["stage1"]),
                  stage=1, template="plain", per_device_batch_size=8, learning_rate=1e-3, logging_steps=1,
                  save_steps=1000, warmup_ratio=0.0, max_length=256, seed=3, max_steps=3)
    train(load_config(None, output_dir=str(tmp_path / "pixels"), **common))
    train(load_config(None, output_dir=str(tmp_path / "cached"), feature_cache=str(tmp_path / "cache"), **common))

    def losses(out):
        return [json.loads(line)["loss"] for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]

    assert len(losses("cached")) == 3
    torch.testing.assert_close(torch.tensor(losses("cached")), torch.tensor(losses("pixels")), rtol=1e-3, atol=1e-3)


def test_a_changed_image_is_stale_and_only_it_is_recomputed(workspace, tmp_path):
    model, processor = _load(workspace)
    folder = tmp_path / "images"
    folder.mkdir()
    names = _images(workspace)[:4]
    for n in names:
        (folder / n).write_bytes((workspace["images"] / n).read_bytes())
    cache = FeatureCache.for_model(tmp_path / "cache", model, processor)
    fill(cache, model, processor, names, folder)
    assert cache.stale(names, folder) == []
    open_for_training(tmp_path / "cache", model, processor, names, folder)

    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / names[1])
    stat = (folder / names[1]).stat()
    os.utime(folder / names[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.stale(names, folder) == [names[1]]
    with pytest.raises(ValueError, match=r"1 of 4 images are missing or changed .*cache-features"):
        open_for_training(tmp_path / "cache", model, processor, names, folder)
    before = cache.load(names)
    reopened = FeatureCache.for_model(tmp_path / "cache", model, processor)
    assert fill(reopened, model, processor, names, folder) == {"computed": 1, "faults": 0}
    after = FeatureCache.for_model(tmp_path / "cache", model, processor).load(names)  # read back from disk
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]]) and not torch.equal(after[1], before[1])
    with torch.no_grad():
        fresh = model.encode_images(processor.preprocess_images([folder / names[1]]))[0]
    torch.testing.assert_close(after[1].float(), fresh, rtol=BF16_RTOL, atol=1e-2)


def test_a_changed_vision_weight_or_config_invalidates_the_cache(workspace, tmp_path):
    model, processor = _load(workspace)
    names = _images(workspace)[:2]
    cache = FeatureCache.for_model(tmp_path, model, processor)
    fill(cache, model, processor, names, workspace["images"])
    with torch.no_grad():
        model.vision_tower.encoder.layers[0].mlp.fc1.weight[0, 0] += 0.5
    changed = FeatureCache.for_model(tmp_path, model, processor)
    assert changed.dir != cache.dir and changed.stale(names, workspace["images"]) == names
    with pytest.raises(ValueError, match="2 of 2 images"):
        open_for_training(tmp_path, model, processor, names, workspace["images"])
    model, processor = _load(workspace)
    assert FeatureCache.for_model(tmp_path, model, processor).dir == cache.dir
    model.config.vision_feature_layer = -3
    assert FeatureCache.for_model(tmp_path, model, processor).dir != cache.dir
    model, processor = _load(workspace)
    processor.image_processor.image_mean = [0.4, 0.5, 0.5]
    assert FeatureCache.for_model(tmp_path, model, processor).dir != cache.dir


def test_an_interrupted_shard_is_ignored_and_rewritten(workspace, tmp_path):
    model, processor = _load(workspace)
    names = _images(workspace)[:3]
    cache = FeatureCache.for_model(tmp_path, model, processor)
    fill(cache, model, processor, names[:1], workspace["images"])
    (cache.dir / "shard-00001.bin").write_bytes(b"partial")  # killed before its listing was written
    reopened = FeatureCache.for_model(tmp_path, model, processor)
    assert reopened.stale(names, workspace["images"]) == names[1:]
    fill(reopened, model, processor, names, workspace["images"])
    assert FeatureCache.for_model(tmp_path, model, processor).load(names).shape[0] == 3


def test_an_unloadable_image_is_recorded_and_its_sample_skipped_like_without_the_cache(workspace, tmp_path):
    model, processor = _load(workspace)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = json.loads(workspace["stage1"].read_text(encoding="utf-8"))[:4]
    for r in rows:
        (folder / r["image"]).write_bytes((workspace["images"] / r["image"]).read_bytes())
    (folder / rows[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / rows[2]["image"]).unlink()
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    names = [r["image"] for r in rows]
    cache = FeatureCache.for_model(tmp_path / "cache", model, processor)
    assert fill(cache, model, processor, names, folder) == {"computed": 2, "faults": 2}
    assert cache.stale(names, folder) == []  # known bad, unchanged: nothing to recompute
    cache = open_for_training(tmp_path / "cache", model, processor, names, folder)
    processor.template = "plain"
    dataset, _ = encode_dataset(*load_records(str(data)), processor, 256)
    cached = Collator(dataset, processor, str(folder), feature_cache=cache)(list(range(4)))
    uncached = Collator(dataset, processor, str(folder))(list(range(4)))
    assert [f[:2] for f in cached["faults"]] == [f[:2] for f in uncached["faults"]]
    assert {f[1] for f in cached["faults"]} == {"not_an_image", "missing_image"}
    assert cached["image_features"].shape[0] == uncached["pixel_values"].shape[0] == 2
    assert torch.equal(cached["input_ids"], uncached["input_ids"])
    (folder / rows[2]["image"]).write_bytes((workspace["images"] / rows[2]["image"]).read_bytes())  # back again
    assert cache.stale(names, folder) == [rows[2]["image"]]
    assert fill(cache, model, processor, names, folder) == {"computed": 1, "faults": 0}
    assert rows[2]["image"] not in FeatureCache.for_model(tmp_path / "cache", model, processor).faults


def test_feature_cache_needs_a_frozen_tower():
    with pytest.raises(ValueError, match="feature_cache: .*frozen"):
        load_config(None, preset="tiny", data_path="x.json", feature_cache="c", train_vision_tower=True)
