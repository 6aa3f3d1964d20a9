"""``monkeytune demo``: the embedded synthetic task end to end (data, three trainings, eval, report)."""

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
    p.add_argument("--seed", type=int, default=0, help="seed of the data, initialisation and data order")
    p.add_argument("--quick", action="store_true", help="a few samples and steps: checks the pipeline in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.demo.run import DemoSettings, run_demo

    settings = DemoSettings.quick(args.out, args.seed) if args.quick else DemoSettings(out_dir=args.out, seed=args.seed)
    settings.threads = args.threads
    settings.progress = not args.no_progress
    run_demo(settings)
    return 0
