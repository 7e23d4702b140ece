"""`llava-jp quickstart`: the whole pipeline on a tiny model and synthetic data, on CPU.

Generates the dataset, builds the tiny preset, runs stage 1 (projector) then stage 2
(projector + LM + the tiny vision tower: no pretrained tiny encoder exists offline, so it
learns from scratch here; the full-recipe configs keep it frozen), evaluates exact-answer
accuracy on held-out images, and leaves a model directory the chat and demo load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path


from llava_jp.errors import UserError
from llava_jp.presets.init import save_base
from llava_jp.infer.chat import QUICKSTART_MODEL_DIR
from llava_jp.infer.generate import generate_answers
from llava_jp.synthetic import write_dataset
from llava_jp.train.config import TrainConfig
from llava_jp.train.checkpoint import MODEL_SUBDIR, PROJECTOR_FILE
from llava_jp.train.loop import train

DEFAULT_OUT = QUICKSTART_MODEL_DIR.parent  # chat and demo serve this model by default
EVAL_RESERVE_S = 30.0  # evaluation + saving after stage 2 (only with --time-budget)
QUIET_MINUTES = 6  # measured 5 min 56 s: docs/training.md, "Quickstart"


def evaluate(model_dir: Path, test_path: Path, image_dir: Path, batch_size: int = 64) -> dict:
    """Exact-answer accuracy, overall and per question type."""
    from llava_jp.infer.load import load_model

    model, processor = load_model(model_dir)
    model.eval()
    rows = json.loads(test_path.read_text(encoding="utf-8"))
    correct, total = defaultdict(int), defaultdict(int)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        answers = generate_answers(model, processor, [image_dir / r["image"] for r in chunk],
                                   [r["question"] for r in chunk], max_new_tokens=8)
        for row, answer in zip(chunk, answers):
            total[row["type"]] += 1
            correct[row["type"]] += int(answer == row["answer"])
    return {
        "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
        "accuracy_by_type": {k: correct[k] / total[k] for k in sorted(total)},
        "n_test": sum(total.values()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, weights and batch order (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=6000, help="synthetic training images (default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=200, help="held-out images, 3 questions each (default: %(default)s)")
    parser.add_argument("--stage1-steps", type=int, default=30, help="projector-only steps (default: %(default)s)")
    parser.add_argument("--stage2-steps", type=int, default=1200, help="stage-2 steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="optional wall-time cap for the whole run in seconds: stage 2 stops early (and the "
                             "JSON says so), so the result then depends on the machine's speed (default: no cap)")


def run(args: argparse.Namespace) -> int:
    """Fixed step counts: for a seed, the accuracy is the same on a fast and a busy machine."""
    started = time.perf_counter()
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r}: is a file, expected a folder")
    print(f"quickstart: stage 1 {args.stage1_steps} steps, stage 2 {args.stage2_steps} steps of {args.batch_size} "
          f"(about {QUIET_MINUTES} min on a quiet 2-core CPU; each stage's progress bar shows its time left)", flush=True)
    data = write_dataset(out / "data", args.train_images, args.test_images, seed=args.seed)
    base = out / "base_model"
    shutil.rmtree(base, ignore_errors=True)  # a rerun replaces the previous quickstart
    save_base("tiny", base, seed=args.seed)
    common = dict(model=str(base), image_folder=str(data["images"]), per_device_batch_size=args.batch_size,
                  seed=args.seed, logging_steps=20, save_steps=10**9, warmup_ratio=0.05, max_length=256,
                  overwrite_output_dir=True)
    train(TrainConfig(**common, stage=1, template="plain", data_path=str(data["stage1"]),
                      output_dir=str(out / "stage1"), max_steps=args.stage1_steps, learning_rate=1e-3))
    budget = None
    if args.time_budget is not None:
        budget = max(args.time_budget - (time.perf_counter() - started) - EVAL_RESERVE_S, 30.0)
    summary = train(TrainConfig(**common, stage=2, train_vision_tower=True, data_path=str(data["stage2"]),
                                pretrained_projector=str(out / "stage1" / PROJECTOR_FILE), output_dir=str(out),
                                max_steps=args.stage2_steps, learning_rate=1e-3, time_budget_s=budget))
    result = evaluate(out / MODEL_SUBDIR, data["test"], data["images"])
    result.update(model_dir=str(out / MODEL_SUBDIR), stage2_steps=summary["steps"],
                  stage2_stopped_by_time_budget=summary["stopped_early"],
                  wall_seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result, ensure_ascii=False))
    return 0
