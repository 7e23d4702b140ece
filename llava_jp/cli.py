"""The `llava-jp` command. Each subcommand lives next to the code it drives; this file only
routes: a subcommand is (module, help), and the module has `add_arguments(parser)` and
`run(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llava_jp.info", "parameter counts and image-token shape of a preset or model"),
    "train": ("llava_jp.train.loop", "train one stage from a YAML config (--key value overrides any field)"),
    "quickstart": ("llava_jp.quickstart", "the whole pipeline on a tiny model and synthetic data, on CPU"),
    "data": ("data_ja.cli", "Japanese training data: convert, translate, check, mix"),
    "eval": ("llava_jp.eval.runner", "score a model on JA-VG-VQA-500, JA-VLM-Bench-In-the-Wild and Heron-Bench"),
    "chat": ("llava_jp.chat_cli", "chat about an image in the terminal (Japanese, streamed, multi-turn)"),
    "demo": ("llava_jp.demo", "Japanese web chat demo (Gradio; needs the [demo] extra)"),
    "release": ("llava_jp.release", "write a hub release folder (remote code, card), verify it loads without llava-jp, push"),
    "import-llava-jp": ("llava_jp.import_llava_jp", "convert a predecessor (LLaVA-JP v1.x) checkpoint into this format"),
    "cache-features": ("llava_jp.feature_cache", "compute frozen vision-tower features once for stage-1 training"),
    "bench": ("llava_jp.bench", "time training steps and generation against transformers' LLaVA; full-size memory"),
}
ACCEPTS_OVERRIDES = {"train"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-jp", description="Japanese vision-language models, LLaVA style.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # modules are imported lazily so `llava-jp info` does not pay for training imports
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ACCEPTS_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    code = importlib.import_module(args._module).run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
