"""``monkeytune demo``: the embedded synthetic task end to end (data, warm-ups, trainings, eval, report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and compare tiny Monkey and global-only models on a synthetic high-resolution task",
        description="Generate the synthetic scenes, train the Monkey-layout model (full, then "
        "monkey-fix-llm) and a global-view-only baseline, evaluate them and write a report.",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    p.add_argument("--task", choices=["textures", "digits", "all"], default="textures",
                   help="textures (default): synthetic 1-pixel textures, written to OUT; digits: UCI handwritten "
                   "digits, written to OUT/digits (needs the demo extra); "
                   "all: both, one after the other")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, initialisation and data order")
    p.add_argument("--quick", action="store_true", help="a few samples and steps: checks the pipeline in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from monkeytune.demo.digits import DigitsUnavailable
    from monkeytune.demo.run import DemoSettings, run_demo

    tasks = ["textures", "digits"] if args.task == "all" else [args.task]
    for task in tasks:
        out = args.out / "digits" if task == "digits" else args.out
        settings = (DemoSettings.quick(out, args.seed, task) if args.quick
                    else DemoSettings(out_dir=out, task=task, seed=args.seed))
        settings.threads = args.threads
        settings.progress = not args.no_progress
        try:
            run_demo(settings)
        except DigitsUnavailable as e:
            print(f"monkeytune demo: {e}", file=sys.stderr)
            return 2
    return 0
