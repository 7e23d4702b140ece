"""The training data path: DataLoader settings, worker processes, and the loader benchmark."""

import json
from pathlib import Path

import pytest

from llava_jp.train.config import load_config
from llava_jp.train.data import loader_workers
from llava_jp.train.loop import train


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_worker_processes_feed_the_same_batches_as_the_training_process(train_workspace, tmp_path):
    ws = train_workspace
    common = dict(model=str(ws["base"]), image_folder=str(ws["images"]), data_path=str(ws["mixed"]),
                  per_device_batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=1000,
                  warmup_ratio=0.0, max_length=256, seed=3, max_steps=3)
    train(load_config(None, **common, output_dir=str(tmp_path / "in_process"), dataloader_num_workers=0))
    train(load_config(None, **common, output_dir=str(tmp_path / "workers"), dataloader_num_workers=2,
                      dataloader_prefetch_factor=2))
    assert _losses(tmp_path / "workers") == pytest.approx(_losses(tmp_path / "in_process"), rel=1e-6)
    record = json.loads((tmp_path / "workers" / "log.jsonl").read_text().splitlines()[-1])
    assert record["data_s"] >= 0 and record["compute_s"] > 0


def test_loader_settings_in_the_recipe_and_their_validation(monkeypatch):
    for stage in ("stage1", "stage2"):
        cfg = load_config(stage)
        assert cfg.dataloader_num_workers >= 2 and cfg.dataloader_pin_memory and cfg.dataloader_persistent_workers
    assert load_config("stage1", ["--dataloader_num_workers", "0"]).dataloader_num_workers == 0
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        load_config("stage1", ["--dataloader_num_workers", "-1"])
    with pytest.raises(ValueError, match="dataloader_prefetch_factor"):
        load_config("stage1", ["--dataloader_prefetch_factor", "0"])
    # unset: none on CPU (the step needs the cores), up to 8 per GPU process on CUDA
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert loader_workers(None) == 0 and loader_workers(3) == 3
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None) == 8


def test_loader_bench_times_the_collator_and_sizes_workers_against_the_gpu():
    from benchmarks.loader import run_loader_bench

    report = run_loader_bench([0, 1], images=4, batch_size=2, batches=2, log=lambda *a: None)
    assert report["image_size"] == 768 and report["images_per_s_per_worker"] > 0
    assert report["per_image"]["cpu"]["preprocess_s"] > 0
    assert [r["workers"] for r in report["loader"]] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in report["loader"])
    for stage in ("stage1", "stage2"):
        demand = report["gpu_demand"][stage]
        assert demand["samples_per_s"] > 0 and demand["workers_needed"] >= 1
    # stage 2 trains the LM too: more work per sample, fewer samples per second
    assert report["gpu_demand"]["stage2"]["tflop_per_sample"] > report["gpu_demand"]["stage1"]["tflop_per_sample"]
