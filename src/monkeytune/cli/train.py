"""``monkeytune train CONFIG.yaml [--resume [PATH]] [--section.key VALUE ...]``.

Exit status: 0 on success, 2 for a configuration or setup problem (the message names the file,
line and field), 1 when training itself fails (e.g. too many non-finite steps).
Launch several processes with ``accelerate launch`` or ``torchrun``; see docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

USAGE = ("monkeytune train CONFIG.yaml [--resume [PATH]] [--resume-changed] [--print-config] "
         "[--section.key VALUE ...]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model as a YAML config says",
        usage=USAGE,
        description=(
            "Train from a YAML config; any field can be overridden as --section.key VALUE "
            "(e.g. --train.max_steps 100 --optim.lr 2e-5 --policy.preset monkey-fix-llm). "
            "--resume continues the run in checkpoint.output_dir from its latest checkpoint "
            "(or from the checkpoint folder given); it refuses a changed data file, tokenizer, model or "
            "setting that changes the model or the sample order unless --resume-changed says the change is meant."
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="training configuration file")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="--resume [PATH], --resume-changed, --print-config, and --section.key VALUE overrides")
    p.set_defaults(func=run)


def split_flags(rest: list[str]) -> tuple[str | None, bool, list[str], bool]:
    """Pull ``--resume [PATH]``, ``--resume-changed`` and ``--print-config`` out of the arguments.

    Returns:
        ``(resume, print_only, overrides, accept_changes)``; ``--resume-changed`` implies
        ``--resume`` (latest) when no ``--resume`` is given.
    """
    resume, print_only, overrides, accept = None, False, [], False
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--resume":
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                resume, i = rest[i + 1], i + 2
            else:
                resume, i = "latest", i + 1
        elif arg.startswith("--resume="):
            resume, i = arg.split("=", 1)[1] or "latest", i + 1
        elif arg == "--resume-changed":
            accept, i = True, i + 1
        elif arg == "--print-config":
            print_only, i = True, i + 1
        else:
            overrides.append(arg)
            i += 1
    if accept and resume is None:
        resume = "latest"
    return resume, print_only, overrides, accept


def run(args: argparse.Namespace) -> int:
    from monkeytune.train.config import ConfigError
    from monkeytune.train.config_load import load_config, parse_overrides

    resume, print_only, rest, accept_changes = split_flags(args.rest)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as e:
        print(f"monkeytune train: {e}", file=sys.stderr)
        return 2
    if print_only:
        print(cfg.to_yaml(), end="")
        return 0

    import logging

    from monkeytune.data.records import DataError
    from monkeytune.model.io import CheckpointError as ModelFolderError
    from monkeytune.policy import PlanError
    from monkeytune.train.checkpoint import CheckpointError
    from monkeytune.train.engine import EngineError
    from monkeytune.train.loop import TrainingError, train
    from monkeytune.train.setup import SetupError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg, resume=resume, accept_changes=accept_changes)
    except (ConfigError, SetupError, EngineError, PlanError, CheckpointError, ModelFolderError, DataError,
            FileNotFoundError) as e:
        print(f"monkeytune train: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"monkeytune train: {e}", file=sys.stderr)
        return 1
    where = result.final_dir or result.last_checkpoint or result.run_dir
    print(f"trained {result.steps} steps; output in {where}")
    return 0


if __name__ == "__main__":
    # `python -m monkeytune.cli.train CONFIG ...`: the form launchers need
    # (`accelerate launch -m monkeytune.cli.train ...`, `torchrun -m monkeytune.cli.train ...`).
    from monkeytune.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
