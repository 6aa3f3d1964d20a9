"""Options that several commands share, declared once."""

from __future__ import annotations

import argparse

from monkeytune.prompts import TEMPLATES

DEFAULT_HELP = ("the prompt layout (default: the one the model folder records, else chatml for chat checkpoints, "
                "else vqa with a warning)")


class _Renamed(argparse.Action):
    """``--template`` on a command that prompts: one line naming the option to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} names a conversation template (as data.template does); the prompt "
                     "layout of this command is --prompt-template")


def add_prompt_template(p: argparse.ArgumentParser, help: str = DEFAULT_HELP) -> None:
    """``--prompt-template`` (dest ``prompt_template``): how a question is laid out around its turn.

    ``--template`` stays the conversation template of ``data check`` and ``tokenizer train``, one
    name for one meaning; here it is refused with a pointer to the new name.
    """
    p.add_argument("--prompt-template", choices=TEMPLATES, default=None, help=help)
    p.add_argument("--template", nargs="?", action=_Renamed, help=argparse.SUPPRESS)
