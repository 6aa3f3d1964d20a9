"""``monkeytune data check``: validate conversation files before training.

Exit status: 0 when no error was found, 1 when the data has errors, 2 when the command itself
cannot run (bad config, missing tokenizer, unknown template).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect training data")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    c = data_sub.add_parser(
        "check",
        help="validate records, roles, image tags, images and lengths; non-zero exit on errors",
        description="Validate conversation files (JSON list or JSON Lines) as training would see them.",
    )
    c.add_argument("files", nargs="+", metavar="FILE", help="data file(s)")
    c.add_argument(
        "--config",
        default=None,
        help="model preset, model folder, model config YAML or training config YAML "
        "(default: monkey-7b); a training config also supplies the tokenizer, template, "
        "max length and truncate-turns unless given here",
    )
    c.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer folder for exact token counts; without it text length is estimated "
        "(1 token per 3 UTF-8 bytes) and over-length samples are only warnings",
    )
    c.add_argument("--max-length", type=int, default=None, help="longest sample in tokens (default: 2048)")
    c.add_argument("--template", default=None, help="monkey (default) or chatml")
    c.add_argument(
        "--truncate-turns",
        action="store_true",
        default=None,
        help="accept over-long samples that fit after dropping trailing text-only exchanges",
    )
    c.add_argument(
        "--no-decode", action="store_true", help="only check that image files exist (faster)"
    )
    c.add_argument("--max-listed", type=int, default=20, help="errors/warnings listed in full (default: 20)")
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from monkeytune.data.check import check_dataset, resolve_check_settings

    def pick(given, from_config, default):
        if given is not None:
            return given
        return default if from_config is None else from_config

    try:
        settings = resolve_check_settings(args.config)
        tokenizer = None
        tokenizer_dir = pick(args.tokenizer, settings.tokenizer_dir, None)
        if tokenizer_dir is not None:
            from monkeytune.tokenizer.loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir)
        report = check_dataset(
            args.files,
            settings.for_tokenizer(tokenizer),
            tokenizer=tokenizer,
            max_length=int(pick(args.max_length, settings.max_length, 2048)),
            template=pick(args.template, settings.template, "monkey"),
            truncate_turns=bool(pick(args.truncate_turns, settings.truncate_turns, False)),
            decode_images=not args.no_decode,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(report.format(max_listed=args.max_listed))
    return 0 if report.ok else 1
