"""The `llava-jp` command. Each subcommand lives next to the code it drives; this file only
routes: a subcommand is (module, help), and the module has `add_arguments(parser)` and
`run(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llava_jp.info", "parameter counts and image-token shape of a preset or model"),
    "train": ("llava_jp.train.loop", "train one stage from a YAML config (--key value overrides any field)"),
    "quickstart": ("llava_jp.quickstart", "the whole pipeline on a tiny model and synthetic data, on CPU"),
    "data": ("data_ja.cli", "Japanese training data: convert, translate, check, mix"),
    "eval": ("llava_jp.eval.runner", "score a model on the Japanese VLM benchmarks (llm-jp-eval-mm metrics) or on your own held-out set"),
    "infer": ("llava_jp.infer.batch", "answer a JSONL file of image questions in batches (resumable)"),
    "serve": ("llava_jp.infer.serve", "serve a released model with vLLM's OpenAI-compatible server (vLLM installed separately)"),
    "chat": ("llava_jp.infer.chat_cli", "chat about an image in the terminal (Japanese, streamed, multi-turn)"),
    "demo": ("llava_jp.infer.demo", "Japanese web chat demo (Gradio; needs the [demo] extra)"),
    "release": ("llava_jp.hub.release", "write a hub release folder (remote code, card), verify it loads without llava-jp, push"),
    "import-llava-jp": ("llava_jp.hub.import_v1", "convert a predecessor (LLaVA-JP v1.x) checkpoint into this format"),
    "cache-features": ("llava_jp.train.cache_features", "compute frozen vision-tower features once for stage-1 training"),
    "bench": ("benchmarks.bench", "time training steps and generation against transformers' LLaVA; full-size memory"),
}
ACCEPTS_OVERRIDES = {"train"}
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _import(module_name: str):
    """A subcommand's module; `benchmarks` is not installed, it runs from a source checkout."""
    if module_name.startswith("benchmarks.") and (SOURCE_ROOT / "benchmarks").is_dir() and str(SOURCE_ROOT) not in sys.path:
        sys.path.append(str(SOURCE_ROOT))
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-jp", description="Japanese vision-language models, LLaVA style.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # modules are imported lazily so `llava-jp info` does not pay for training imports
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            _import(module_name).add_arguments(p)
        except ModuleNotFoundError as err:
            if not module_name.startswith("benchmarks."):
                raise
            p.set_defaults(_unavailable=f"llava-jp {name}: needs a source checkout of llava-jp ({err})")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ACCEPTS_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    code = _import(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
