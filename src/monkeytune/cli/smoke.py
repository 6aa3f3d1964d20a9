"""``monkeytune smoke``: a seconds-long end-to-end pass of a model on a synthetic image."""

from __future__ import annotations

import argparse

from monkeytune.config import get_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("smoke", help="tile a synthetic image, run forward/backward and generate with a fresh model")
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.smoke import run_smoke

    cfg = get_config(args.preset)
    r = run_smoke(cfg, seed=args.seed)
    print(f"model preset      : {cfg.name}")
    print(f"views             : {r.views} (grid {cfg.image.grid}, global view {cfg.image.global_view})")
    print(f"visual tokens     : {r.visual_tokens} per image; sequence length {r.sequence_length}")
    print(f"loss (3 answer tokens): {r.loss:.4f}; adapter gradient norm {r.adapter_grad_norm:.3e}")
    print(f"greedy generation : {r.generated}")
    print(f"done in {r.seconds:.2f}s")
    return 0
