"""`llava-jp bench --loader`: how many images per second the training collator prepares, per
worker, against what a GPU consumes (`benchmarks/flops.py`).

The images are JPEGs made locally with COCO's shapes (640 x 480, 480 x 640, 640 x 427,
500 x 375; quality 90; photo-like content of ~100-200 KB, as LLaVA-Pretrain's COCO/CC images),
the processor is the `llava-jp-1.3b-s2` preset's (pad to square, 768 px for S2, SigLIP
normalisation), and the batches go through the trainer's own `Collator` and a `DataLoader` set
up as `llava-jp train` sets it up (`llava_jp.train.data.make_loader`). The per-image split
(decode vs pad/resize/normalise) is timed in-process on one thread, in wall and CPU time: a
worker owns one core on a training node, so CPU seconds per image give its images/s even when
this machine is shared; the DataLoader runs' wall-clock images/s show the workers at work.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.flops import gpu_demand, model_for_counting
from llava_jp.core.processing import load_image
from llava_jp.presets.builder import build_config, build_processor, load_preset, load_tokenizer

COCO_SHAPES = [(640, 480), (480, 640), (640, 427), (500, 375)]


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """`n` photo-like JPEGs: smooth colour fields (upsampled noise) plus fine texture, q=90."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = COCO_SHAPES[i % len(COCO_SHAPES)]
        coarse = Image.fromarray(rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8))
        base = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        texture = rng.normal(0, 12, (h, w, 1)).astype(np.int16)
        pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def _processor(preset_name: str):
    preset = load_preset(preset_name)
    tokenizer = load_tokenizer("builtin:bpe-ja")
    config = build_config(preset, pretrained=False, tokenizer=tokenizer)
    return build_processor(preset, config, tokenizer, num_image_tokens=729), config


def per_image_split(processor, paths: list[Path]) -> dict:
    """Seconds per image: JPEG decode + RGB conversion, then pad/resize/normalise, on one torch
    thread as in a DataLoader worker (torch gives each worker one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _per_image_split(processor, paths)
    finally:
        torch.set_num_threads(threads)


def _per_image_split(processor, paths: list[Path]) -> dict:
    processor.preprocess_images([load_image(paths[0])])  # warm-up
    wall = {"decode_s": [], "preprocess_s": []}
    cpu = {"decode_s": [], "preprocess_s": []}
    for p in paths:
        t0, c0 = time.perf_counter(), time.thread_time()
        image = load_image(p)
        t1, c1 = time.perf_counter(), time.thread_time()
        processor.preprocess_images([image])
        t2, c2 = time.perf_counter(), time.thread_time()
        for out, a, b, c in ((wall, t0, t1, t2), (cpu, c0, c1, c2)):
            out["decode_s"].append(b - a)
            out["preprocess_s"].append(c - b)
    # CPU time of this thread: what one worker costs on a core of its own, even on a busy machine
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def loader_throughput(processor, folder: Path, names: list[str], workers: int, batch_size: int,
                      batches: int, pin_memory: bool) -> dict:
    """Images/s through the trainer's Collator + DataLoader with `workers` worker processes
    (worker start-up excluded: the trainer keeps its workers for the whole run)."""
    from llava_jp.train.config import TrainConfig
    from llava_jp.train.data import Collator, encode_dataset, load_records, make_loader

    records = [{"id": str(i), "image": n, "conversations": [
        {"from": "human", "value": "<image>\n写真を説明してください。"},
        {"from": "gpt", "value": "テーブルの上に赤いりんごと青いコップが置かれています。"}]}
        for i, n in enumerate(names)]
    data_file = folder / "data.json"
    data_file.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    processor.template = "plain"
    dataset, _ = encode_dataset(*load_records(str(data_file)), processor, max_length=2048)
    order = [[(b * batch_size + j) % len(dataset) for j in range(batch_size)] for b in range(batches + 1)]
    cfg = TrainConfig(preset="tiny", data_path=str(data_file), dataloader_num_workers=workers,
                      dataloader_pin_memory=pin_memory)
    loader = make_loader(order, Collator(dataset, processor, str(folder)), cfg)
    it = iter(loader)
    next(it)  # workers started and warm
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        assert batch["pixel_values"].shape[0] == batch_size
    seconds = time.perf_counter() - start
    del it, loader
    return {"workers": workers, "images_per_s": batch_size * batches / seconds}


def run_loader_bench(workers: list[int], images: int = 64, batch_size: int = 8, batches: int = 8,
                     preset_name: str = "llava-jp-1.3b-s2", pin_memory: bool | None = None, log=print) -> dict:
    """The collator's images/s (in-process split, then per DataLoader worker count) and the GPU demand."""
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    processor, config = _processor(preset_name)
    demand = gpu_demand(model_for_counting(config))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_images(folder, images)
        sizes = [os.path.getsize(folder / n) for n in names]
        split = per_image_split(processor, [folder / n for n in names[:16]])
        for kind in ("cpu", "wall"):
            log(f"per image ({config.image_size} px, one thread, {kind} time): decode {split[kind]['decode_s'] * 1e3:.1f} ms, "
                f"pad/resize/normalise {split[kind]['preprocess_s'] * 1e3:.1f} ms (JPEG {statistics.mean(sizes) / 1e3:.0f} KB mean)")
        runs = []
        for w in workers:
            r = loader_throughput(processor, folder, names, w, batch_size, batches, pin_memory)
            r["images_per_s_per_worker"] = r["images_per_s"] / max(w, 1)
            runs.append(r)
            log(f"{w} worker(s): {r['images_per_s']:.1f} images/s ({r['images_per_s_per_worker']:.1f} per worker)")
    per_worker = 1 / (split["cpu"]["decode_s"] + split["cpu"]["preprocess_s"])
    report = {"image_size": config.image_size, "jpeg_kb_mean": statistics.mean(sizes) / 1e3, "per_image": split,
              "images_per_s_per_worker": per_worker, "loader": runs, "cpu_count": os.cpu_count(),
              "gpu_demand": {"peak_tflops": demand["peak_tflops"], "mfu": demand["mfu"]}}
    for stage in (1, 2):
        need = demand[f"stage{stage}"]["samples_per_s"]
        report["gpu_demand"][f"stage{stage}"] = {
            "tflop_per_sample": demand[f"stage{stage}"]["flops"] / 1e12, "samples_per_s": need,
            "workers_needed": math.ceil(need / per_worker)}
        log(f"stage {stage}: {demand[f'stage{stage}']['flops'] / 1e12:.2f} TFLOP/sample -> H200 at "
            f"{demand['mfu']:.0%} MFU consumes {need:.1f} samples/s = {math.ceil(need / per_worker)} worker(s) "
            f"at {per_worker:.1f} images/s each (CPU time)")
    return report
