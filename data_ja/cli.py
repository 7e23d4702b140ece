"""`python -m data_ja <command>` (or `llava-jp data <command>`): convert, translate, check, mix."""

from __future__ import annotations

import argparse
import sys

from . import check, convert, mix, translate

COMMANDS = {
    "convert": (convert, "turing-motors Japanese LLaVA sets -> training format"),
    "translate": (translate, "English LLaVA-format file -> Japanese (API or local model)"),
    "check": (check, "validate a training file against its images and tokenizer"),
    "mix": (mix, "build a training mixture from a YAML list of sources"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the data commands as subcommands of `parser` (`llava-jp data` routes here)."""
    commands = parser.add_subparsers(dest="data_command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(commands.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.data_command][0].run(args)


def main(argv: list[str] | None = None, prog: str = "python -m data_ja") -> int:
    """Runs one data command; returns its exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
