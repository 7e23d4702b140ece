"""`llava-jp init --preset NAME --out DIR`: build a preset's model once and save it, so that stage 1
and stage 2 both start from exactly these weights (`--model DIR`).

A preset with hub ids downloads the same weights every time, but one whose vision tower or LM
has no `name_or_path` (the tiny preset) gets fresh random weights on every build: training
stage 1 and stage 2 each from `--preset` would pair a projector with a tower and LM it never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llava_jp.errors import UserError
from llava_jp.presets.builder import build, preset_names


def save_base(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Build `preset` (random parts seeded by `seed`) and save model + processor into `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {str(out)!r}: exists and is not an empty folder")
    torch.manual_seed(seed)
    model, processor = build(preset, pretrained=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help=f"bundled preset ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("--out", required=True, help="new or empty folder for the base model")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights of parts without a name_or_path")


def run(args: argparse.Namespace) -> int:
    out = save_base(args.preset, args.out, args.seed)
    print(json.dumps({"base_model": str(out), "next": f"llava-jp train --config stage1 --model {out} ..."}))
    return 0
