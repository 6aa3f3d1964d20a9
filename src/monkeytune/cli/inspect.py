"""``monkeytune inspect``: what a training plan trains, and the memory it needs per GPU.

Argument parsing only; the work is :mod:`monkeytune.inspection`.
"""

from __future__ import annotations

import argparse
import json
import sys

from monkeytune.memory import OPTIMIZERS, PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show which parameters a policy trains and a per-GPU memory estimate",
        description="Build the model on the meta device, resolve a training policy and print "
        "parameter counts per component plus a training-memory estimate per GPU.",
    )
    p.add_argument("--config", default=None,
                   help="model preset name (tiny, mid, monkey-7b, qwen-vl-7b) or a YAML/JSON file holding a "
                   "model config (the whole file or its 'model' key; a 'policy' key is used as the default policy)")
    p.add_argument("--policy", default=None,
                   help="policy preset (monkey, monkey-fix-llm, vision, align, lora-only, llm-lora, llm-qlora, full) or a "
                   "YAML/JSON plan file; default: the config file's 'policy' or 'monkey'")
    p.add_argument("--rule", action="append", default=[], metavar="RULE",
                   help="extra rule 'train: PATTERN' or 'freeze: PATTERN' (repeatable; applied after the policy's rules)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (monkeytune or official Monkey/Qwen-VL) instead of --config; only its "
                   "config.json is read")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--verbose", action="store_true", help="list every parameter with the rule that decided it")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the states are sharded over (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence, visual tokens included (default 2048)")
    p.add_argument("--images-per-sample", type=int, default=1, help="images per sequence (default 1)")
    p.add_argument("--precision", choices=["all", *PRECISIONS], default="all", help="precision rows to show")
    p.add_argument("--optim", choices=OPTIMIZERS, default=None,
                   help="optimizer the states are counted for (optim.name; default: the config file's, else "
                   "adamw_torch); the 8-bit ones and llm-qlora list single-process/DDP rows only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.inspection import choose_plan, inspect_plan, read_inspect_config  # noqa: PLC0415
    from monkeytune.model.spec import ModelSpec  # noqa: PLC0415
    from monkeytune.policy import PlanError  # noqa: PLC0415

    if (args.model is None) == (args.config is None):
        print("error: give exactly one of --config and --model", file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            spec, file_policy, file_optim = ModelSpec(from_dir=args.model), None, None
        else:
            spec, file_policy, file_optim = read_inspect_config(args.config)
        plan = choose_plan(args.policy, file_policy, args.rule, where=str(args.config))
        precisions = tuple(PRECISIONS) if args.precision == "all" else (args.precision,)
        optim = args.optim or file_optim or "adamw_torch"
        result = inspect_plan(spec, plan, args.gpus, args.batch_size, args.seq_len, args.images_per_sample, precisions,
                              optim)
    except (PlanError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(verbose=args.verbose), indent=2))
    else:
        print(result.to_text(verbose=args.verbose))
    return 0
