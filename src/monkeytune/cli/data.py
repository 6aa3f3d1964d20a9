"""``monkeytune data check`` validates conversation files before training; ``monkeytune data
convert`` rewrites any supported format as Monkey's ``<img>path</img>`` records for inspection.

Exit status of ``check``: 0 when no error was found, 1 when the data has errors, 2 when the
command itself cannot run (bad config, missing tokenizer, unknown template or format).
``convert``: 0 on success, 2 when the input has errors (each one listed) or cannot be read.
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
        description="Validate conversation files (JSON list, JSON Lines, or parquet / arrow tables and "
                    "save_to_disk folders with embedded images) as training would see them.",
    )
    c.add_argument("files", nargs="+", metavar="FILE", help="data file(s), or hf:NAME for a datasets name")
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
    c.add_argument(
        "--columns", default=None, metavar="MAPPING",
        help="the data's own names of record fields, a YAML mapping such as '{messages: dialog, images: pics}' "
        "(default: a training config's data.columns)",
    )
    c.add_argument(
        "--load-options", default=None, metavar="MAPPING",
        help="datasets.load_dataset keyword arguments for hf:NAME entries, a YAML mapping such as "
        "'{name: ai2d, split: train}' (default: a training config's data.load_options)",
    )
    _format_options(c)
    c.set_defaults(func=run_check)

    v = data_sub.add_parser(
        "convert",
        help="write any supported input as Monkey JSON Lines (for inspection) or as parquet with the images inside",
        description="Read IN in any supported format (monkey, llava, sharegpt, openai; JSON, JSON Lines or a "
        "table) and write OUT: as Monkey-format JSON Lines with absolute image paths (images held in "
        "the input are written as files into OUT's folder, OUT-stem_images/), or, when OUT ends in "
        ".parquet, as one parquet file of sharegpt rows with every image's bytes inside, or, when OUT is "
        "a folder (existing, or written with a trailing /), as parquet shards train-00000-of-0000N.parquet "
        "there. One pass: memory does not grow with the input.",
    )
    v.add_argument("input", metavar="IN", help="data file, table or save_to_disk folder")
    v.add_argument("output", metavar="OUT", help="JSON Lines file, .parquet file, or folder of parquet shards to write")
    v.add_argument("--shard-mb", type=float, default=500, metavar="MB",
                   help="largest shard written to a folder (default 500, as datasets shards)")
    _format_options(v)
    v.set_defaults(func=run_convert)


def _format_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default=None,
        choices=["auto", "monkey", "llava", "sharegpt", "openai"],
        help="record layout (default: auto, detected per file; see docs/data.md)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="folder relative image paths resolve against (default: each data file's folder)",
    )
    p.add_argument(
        "--allow-empty-answers",
        action="store_true",
        default=None,
        help="accept assistant turns without text (an error by default)",
    )


def run_check(args: argparse.Namespace) -> int:
    from monkeytune.data.check import check_with_settings, read_check_settings

    try:
        settings = read_check_settings(
            args.config, tokenizer=args.tokenizer, template=args.template, max_length=args.max_length,
            truncate_turns=args.truncate_turns, format=args.format, image_root=args.image_root,
            allow_empty_answers=args.allow_empty_answers, columns=_mapping(args.columns, "--columns"),
            load_options=_mapping(args.load_options, "--load-options"),
        )
        report = check_with_settings(args.files, settings, decode_images=not args.no_decode)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(report.format(max_listed=args.max_listed))
    return 0 if report.ok else 1


def _mapping(text: str | None, flag: str) -> dict | None:
    """A YAML mapping given on the command line (None when not given).

    Raises:
        ValueError: not a YAML mapping.
    """
    if text is None:
        return None
    import yaml  # noqa: PLC0415

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{flag}: not YAML ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a mapping such as '{{messages: dialog}}', got {text!r}")
    return value


def run_convert(args: argparse.Namespace) -> int:
    from monkeytune.data.convert import convert_file
    from monkeytune.data.errors import DataError

    errors: list[DataError] = []
    try:
        written, fmt = convert_file(
            args.input, args.output, errors, format=args.format or "auto",
            image_root=args.image_root, allow_empty_answers=bool(args.allow_empty_answers), shard_mb=args.shard_mb,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    for e in errors:
        print(f"error: {e.describe()}")
    print(f"{args.input}: read as {fmt}; wrote {written} records to {args.output}"
          + (f"; {len(errors)} records with errors not written" if errors else ""))
    return 2 if errors else 0
