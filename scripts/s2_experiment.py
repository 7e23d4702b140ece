"""Does S2 help? The tiny model with and without S2 on the bundled synthetic task, at equal steps.

Both variants are the quickstart's recipe (tiny preset, stage 1 projector then stage 2 with the
tiny tower trained from scratch, same data, same steps, same seeds); the only difference is
`s2_scales`: [32, 64] (the 64 px image seen whole at 32 px and as 2x2 crops of 32 px) or none
(the image resized to 32 px). Accuracy is exact-answer accuracy per question type on held-out
images. Results: docs/experiments.md.

    python scripts/s2_experiment.py --seeds 0 1 --out runs/s2_experiment
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from llava_jp.presets.builder import build, load_preset
from llava_jp.quickstart import evaluate
from llava_jp.synthetic import write_dataset
from llava_jp.train.config import TrainConfig
from llava_jp.train.checkpoint import MODEL_SUBDIR, PROJECTOR_FILE
from llava_jp.train.loop import train

# name -> (s2_scales, s2_split_size, tower input size, projector_pixel_shuffle). "single-64" is a
# reference, not the baseline: the tower sees the 64 px image whole, at 4x the image tokens (64
# instead of 16) of the other two. "s2-shuffle2" is S2 with 2x2 token compression (16 -> 4 tokens).
VARIANTS = {"s2": ([32, 64], 32, 32, 1), "single": (None, None, 32, 1), "single-64": (None, None, 64, 1),
            "s2-shuffle2": ([32, 64], 32, 32, 2)}
DEFAULT_VARIANTS = ["s2", "single"]


def run_one(variant: str, seed: int, data: dict, out: Path, args) -> dict:
    preset = load_preset("tiny")
    scales, split, size, shuffle = VARIANTS[variant]
    vision = dataclasses.replace(preset.vision, s2_scales=scales, s2_split_size=split,
                                 config={**preset.vision.config, "image_size": size})
    preset = dataclasses.replace(preset, vision=vision, projector_pixel_shuffle=shuffle)
    torch.manual_seed(seed)
    model, processor = build(preset, pretrained=False)
    base = out / "base_model"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    common = dict(model=str(base), image_folder=str(data["images"]), per_device_batch_size=args.batch_size,
                  seed=seed, logging_steps=50, save_steps=10**9, warmup_ratio=0.05, max_length=256)
    started = time.perf_counter()
    train(TrainConfig(**common, stage=1, template="plain", data_path=str(data["stage1"]),
                      output_dir=str(out / "stage1"), max_steps=args.stage1_steps, learning_rate=1e-3))
    summary = train(TrainConfig(**common, stage=2, train_vision_tower=not args.frozen_vision,
                                data_path=str(data["stage2"]), pretrained_projector=str(out / "stage1" / PROJECTOR_FILE),
                                output_dir=str(out), max_steps=args.steps, learning_rate=1e-3))
    result = evaluate(out / MODEL_SUBDIR, data["test"], data["images"])
    return {"variant": variant, "seed": seed, "steps": summary["steps"], "final_loss": summary["final_loss"],
            "train_seconds": round(time.perf_counter() - started, 1), **result}


def table(rows: list[dict]) -> str:
    kinds = sorted(rows[0]["accuracy_by_type"])
    lines = ["| variant | seed | steps | " + " | ".join(kinds) + " | overall | train s |",
             "|---|---|---|" + "---|" * (len(kinds) + 2)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | "
                     + " | ".join(f"{r['accuracy_by_type'][k]:.3f}" for k in kinds)
                     + f" | {r['accuracy']:.3f} | {r['train_seconds']:.0f} |")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            lines.append(f"| {variant} mean (min-max) | | | " + " | ".join(
                f"{statistics.mean(r['accuracy_by_type'][k] for r in mine):.3f} "
                f"({min(r['accuracy_by_type'][k] for r in mine):.3f}-{max(r['accuracy_by_type'][k] for r in mine):.3f})"
                for k in kinds) + f" | {statistics.mean(r['accuracy'] for r in mine):.3f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/s2_experiment"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=1200, help="stage-2 steps, equal for every variant")
    parser.add_argument("--stage1-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--frozen-vision", action="store_true", help="keep the (random) tower frozen, as the real recipe does")
    args = parser.parse_args()
    rows = []
    results = args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        data = write_dataset(args.out / f"data-{seed}", args.train_images, args.test_images, seed=seed)
        for variant in args.variants:
            row = run_one(variant, seed, data, args.out / f"{variant}-{seed}", args)
            rows.append(row)
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(json.dumps(row, ensure_ascii=False), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
