"""The ``monkeytune`` command: argument parsing only; each subcommand calls the library.

Each subcommand lives in its own module under ``monkeytune.cli`` and defines
``register(subparsers)``, which adds its parser and sets ``func`` to a function taking the
parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under monkeytune.cli, in the order they appear in --help.
SUBCOMMANDS = [
    "smoke", "demo",
    "data",
    "compose", "inspect",
    "train", "tokenizer",
    "chat", "score", "eval", "probe", "export",
    "serve", "api",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monkeytune",
        description="Fine-tune high-resolution multimodal models the Monkey way.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"monkeytune.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
