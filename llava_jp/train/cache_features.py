"""`llava-jp cache-features`: fill a feature cache (`features.py`) for a training set's images."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from llava_jp.train.data import load_records
from llava_jp.train.features import FeatureCache, fill


# -- CLI -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved llava-jp model directory, or a preset name / YAML")
    parser.add_argument("--data_path", required=True, help="training data (LLaVA JSON/JSONL, datasets dir, hub id)")
    parser.add_argument("--image_folder", default="", help="folder the samples' image paths are relative to")
    parser.add_argument("--out", required=True, help="cache directory (shared by runs; one subfolder per vision tower)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--shard_size", type=int, default=256, help="images per shard file (~3.4 MB each at full size)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="tower compute dtype (auto: bfloat16 on CUDA, float32 on CPU); features are stored in bf16")


def _load_model(name: str, dtype: torch.dtype):
    from llava_jp.infer.load import load_model

    model, processor = load_model(name, dtype=dtype)  # only the tower runs; fingerprints use bf16-rounded weights either way
    return model.eval(), processor


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, processor = _load_model(args.model, dtype)
    model.vision_tower.to(device)  # only the tower runs
    records, _ = load_records(args.data_path)
    images = [im for im in records["image"] if im]
    cache = FeatureCache.for_model(args.out, model, processor)
    counts = fill(cache, model, processor, images, args.image_folder, args.batch_size, args.shard_size, progress=True)
    print(json.dumps({"cache": str(cache.dir), "images": len(set(images)), **counts,
                      "reused": len(set(images)) - counts["computed"] - counts["faults"],
                      "faults_by_reason": dict(Counter(f[0] for f in cache.faults.values()))}, ensure_ascii=False))
    return 0
