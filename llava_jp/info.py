"""`llava-jp info`: parameter counts per component, computed on the meta device."""

from __future__ import annotations

import argparse
import json

import torch

from llava_jp.presets.builder import count_parameters, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help=f"bundled preset ({', '.join(preset_names())}) or a YAML file")
    group.add_argument("--model", help="a saved model directory or hub id")


def model_info(model_dir: str) -> dict:
    """Counts for a saved model, from its config alone."""
    from transformers import AutoConfig

    from llava_jp import LlavaJpForConditionalGeneration

    from llava_jp.errors import loading

    with loading(model_dir, "--model"):
        config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlavaJpForConditionalGeneration(config)
    return count_parameters(model=model)


def run(args: argparse.Namespace) -> int:
    info = count_parameters(args.preset) if args.preset else model_info(args.model)
    print(json.dumps(info, ensure_ascii=False, indent=2))
    return 0
