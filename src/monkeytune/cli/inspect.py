"""``monkeytune inspect``: what a training plan trains, and the memory it needs per GPU.

The model is built on the meta device, so even ``monkey-7b`` is inspected in a second without
allocating its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monkeytune.memory import OPTIMIZERS, PRECISIONS, estimate_all, format_memory, summarize


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
                   help="policy preset (monkey, monkey-fix-llm, lora-only, llm-lora, llm-qlora, full) or a "
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
                   "adamw_torch); the 8-bit ones and llm-qlora list single-process/DDP rows only"),
    p.set_defaults(func=run)


def _load_config(spec: str) -> tuple[Any, Any, str | None]:
    """Return ``(ModelConfig, policy data or None, optim.name or None)`` for a preset name or a config file.

    The file is a model config (the whole file or its ``model`` key) or a training config, whose
    ``model`` section may be ``{preset: ...}``, ``{config: ...}`` or ``{from: FOLDER}``. For the
    first two, a ``tokenizer`` folder sets the image token ids and the vocabulary, as training
    does. Of a training ``policy`` section only the plan (``preset``, ``rules``, ``lora``) is
    used: learning rates and unfreezing stages do not change what trains at the start.
    """
    from monkeytune.config import PRESETS, config_from_section, get_config  # noqa: PLC0415

    path = Path(spec)
    if spec in PRESETS and not path.is_file():
        return get_config(spec), None, None
    if not path.is_file():
        raise ValueError(f"--config {spec!r} is neither a model preset ({', '.join(sorted(PRESETS))}) nor a file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # noqa: PLC0415

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise different types; both mean a malformed file
        raise ValueError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    policy = data.get("policy")
    if isinstance(policy, dict):
        policy = {k: v for k, v in policy.items() if k in ("preset", "rules", "lora")}
    optim = data.get("optim")
    optim_name = optim.get("name") if isinstance(optim, dict) else None
    model = data["model"] if "model" in data else {k: v for k, v in data.items() if k != "policy"}
    try:
        cfg = config_from_section(model, f"{path}: model config")
        if isinstance(model, dict) and model.get("tokenizer") and "from" not in model:
            from monkeytune.tokenizer.loading import load_tokenizer  # noqa: PLC0415

            cfg = cfg.matched_to_tokenizer(load_tokenizer(model["tokenizer"]))
        cfg.validate()
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: model config: {message}") from None
    if optim_name is not None and optim_name not in OPTIMIZERS:
        raise ValueError(f"{path}: optim.name must be one of {list(OPTIMIZERS)}, got {optim_name!r}")
    return cfg, policy, optim_name


def quantized_targets(plan: Any) -> tuple[str, ...]:
    """The LLM linear layers a plan stores in 4 bits (the LoRA targets of ``llm-qlora``), else ``()``."""
    from monkeytune.policy import DEFAULT_LLM_LORA, get_preset  # noqa: PLC0415

    if get_preset(plan.preset).llm_lora != "qlora":
        return ()
    return tuple((plan.lora or {}).get("target_modules", DEFAULT_LLM_LORA["target_modules"]))


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from monkeytune.model import build_model  # noqa: PLC0415
    from monkeytune.model.io import folder_config  # noqa: PLC0415
    from monkeytune.policy import PRESETS as POLICY_PRESETS  # noqa: PLC0415
    from monkeytune.policy import PlanError, TrainPlan, plan_report  # noqa: PLC0415

    if (args.model is None) == (args.config is None):
        print("error: give exactly one of --config and --model", file=sys.stderr)
        return 2
    if min(args.gpus, args.batch_size, args.seq_len) < 1 or args.images_per_sample < 0:
        print("error: --gpus, --batch-size and --seq-len must be >= 1, --images-per-sample >= 0", file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            cfg, file_policy, file_optim = folder_config(args.model), None, None
        else:
            cfg, file_policy, file_optim = _load_config(args.config)
        if args.policy is None:
            plan = TrainPlan.from_config(file_policy, source=f"{args.config}: policy")
        elif args.policy in POLICY_PRESETS:
            plan = TrainPlan(args.policy)
        elif Path(args.policy).is_file():
            plan = TrainPlan.from_file(args.policy)
        else:
            raise PlanError(f"--policy {args.policy!r} is neither a preset ({', '.join(POLICY_PRESETS)}) nor a file")
        if args.rule:
            plan = plan.with_rules(args.rule, where="--rule")
        with torch.device("meta"):
            model = build_model(cfg)
            report = plan_report(model, plan)
    except (PlanError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(report.decisions, cfg, quantized_targets(plan))
    optim = args.optim or file_optim or "adamw_torch"
    precisions = tuple(PRECISIONS) if args.precision == "all" else (args.precision,)
    estimates = estimate_all(summary, cfg, args.gpus, args.batch_size, args.seq_len, args.images_per_sample,
                             precisions, optim)
    if args.json:
        out = {
            "config": cfg.name,
            "policy": report.to_dict(verbose=args.verbose),
            "memory": {
                "gpus": args.gpus, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "images_per_sample": args.images_per_sample, "optim": optim, "unit": "bytes",
                "quantized_4bit_params": summary.quantized,
                "estimates": [e.to_dict() for e in estimates],
            },
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"model: {cfg.name}")
        print(report.to_text(verbose=args.verbose))
        print()
        print(format_memory(estimates, args.batch_size, args.seq_len))
    return 0
