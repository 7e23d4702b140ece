"""The `llava-jp` command. Each subcommand lives next to the code it drives; this file only
routes: a subcommand is (module, help), and the module has `add_arguments(parser)` and
`run(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from llava_jp.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llava_jp.info", "parameter counts and image-token shape of a preset or model"),
    "train": ("llava_jp.train.loop", "train one stage from a YAML config (--key value overrides any field)"),
    "init": ("llava_jp.presets.init", "save a preset's model (random or downloaded weights) as the base both stages start from"),
    "plot": ("llava_jp.train.curves", "draw the loss and learning-rate curves of one or several runs into a PNG"),
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
# these parse their own arguments (their `run` gets them as `args.overrides`; --help included)
OWN_PARSER = {"train"}
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _import(module_name: str):
    """A subcommand's module; `benchmarks` is not installed, it runs from a source checkout."""
    if module_name.startswith("benchmarks.") and (SOURCE_ROOT / "benchmarks").is_dir() and str(SOURCE_ROOT) not in sys.path:
        sys.path.append(str(SOURCE_ROOT))
    return importlib.import_module(module_name)


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line (naming the flag) and exit status 2, not the usage block."""

    def error(self, message):
        raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A `UserError` (a mistake in what the user gave) prints one line and
    returns 2; any other exception is a programming error and keeps its traceback."""
    # bitsandbytes warns on import (CPU) about an optional hub kernel package no command uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    given = sys.argv[1:] if argv is None else argv
    command = f"llava-jp {given[0]}" if given and given[0] in SUBCOMMANDS else "llava-jp"
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in OWN_PARSER:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        if getattr(args, "_unavailable", None):
            raise UserError(args._unavailable)
        code = _import(args._module).run(args)
    except UserError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-jp", description="Japanese vision-language models, LLaVA style.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # modules are imported lazily so `llava-jp info` does not pay for training imports
        own = name in OWN_PARSER
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=not own)
        p.set_defaults(_module=module_name)
        if own:
            continue
        try:
            _import(module_name).add_arguments(p)
        except ModuleNotFoundError as err:
            if not module_name.startswith("benchmarks."):
                raise
            p.set_defaults(_unavailable=f"needs a source checkout of llava-jp ({err})")
    return parser


if __name__ == "__main__":
    sys.exit(main())
