"""``monkeytune probe --model DIR --data FILE``: can the model's visual tokens tell the answers apart?

Fits a linear probe per question on the frozen visual tokens (window views and global view) and
prints the held-out accuracy next to the majority-answer baseline. See :mod:`monkeytune.eval.probe`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from monkeytune.cli.chat import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probe on a model's visual tokens: did vision or routing fail?",
        description="Encode every image with the model's vision tower and resampler, fit one linear probe "
        "per question from the visual tokens to the reference answers, and report held-out accuracy for the "
        "window tokens and the global view's tokens.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, type=Path,
                   help="records with image, question and answer (evaluation JSONL or a training file)")
    p.add_argument("--test", type=Path, default=None, help="held-out records (default: cross-validation on --data)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds without --test (default 5)")
    p.add_argument("--limit", type=int, default=None, help="use at most N records of each file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.eval.probe import ProbeError, probe_files
    from monkeytune.eval.runner import EvalDataError
    from monkeytune.model.io import ModelFolderError
    from monkeytune.vision.image import ImageLoadError

    if args.folds < 2 or (args.limit is not None and args.limit < 1):
        print("monkeytune probe: --folds must be >= 2 and --limit >= 1", file=sys.stderr)
        return 2
    try:
        result = probe_files(args.model, args.data, args.test, args.folds, args.limit, args.dtype,
                             args.device)
    except (ProbeError, EvalDataError, ModelFolderError, ImageLoadError, FileNotFoundError) as e:
        print(f"monkeytune probe: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0
