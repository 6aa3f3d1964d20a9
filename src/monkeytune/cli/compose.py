"""``monkeytune compose --vision DIR --llm DIR --out DIR``: a Monkey-style model from two pretrained parts.

See :mod:`monkeytune.model.compose` for what the folder holds. Exit status 2 when a part folder
cannot be read or the parts do not fit together.
"""

from __future__ import annotations

import argparse
import sys


def _grid(text: str) -> list[int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2x2, got {text!r}") from None
    return [rows, cols]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compose",
        help="build a Monkey-style model from a transformers vision encoder and causal LM",
        description="Join a pretrained transformers vision encoder (CLIP, SigLIP, DINOv2, a LLaVA vision tower) "
        "and a causal LM folder into a monkeytune model folder: per-window adapters on the encoder "
        "(zero-initialised), a fresh connector, and the LLM's tokenizer with the image tokens added. "
        "Folders holding only config.json compose into a configuration for monkeytune inspect.",
    )
    p.add_argument("--vision", required=True, metavar="DIR", help="vision encoder folder (or a CLIP/SigLIP/LLaVA folder)")
    p.add_argument("--llm", required=True, metavar="DIR", help="causal LM folder, with its tokenizer")
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--grid", type=_grid, default=[2, 2], metavar="RxC", help="windows per image (default 2x2; 0x0: none)")
    p.add_argument("--no-global-view", dest="global_view", action="store_false", help="no whole-image view")
    p.add_argument("--window-size", type=int, default=None, metavar="PX",
                   help="view side in pixels (default: the encoder's native image size)")
    p.add_argument("--connector", choices=["resampler", "mlp"], default="resampler",
                   help="resampler (Monkey's, --queries tokens a view) or mlp (LLaVA's, a token per patch)")
    p.add_argument("--queries", type=int, default=256, metavar="N", help="resampler tokens per view (a square)")
    p.add_argument("--pixel-shuffle", type=int, default=1, metavar="S",
                   help="mlp: fold SxS patches into one token (bounds tokens per view)")
    p.add_argument("--feature-layer", type=int, default=-1, metavar="K",
                   help="encoder hidden state to use: -1 the last, -2 the penultimate (LLaVA)")
    p.add_argument("--keep-cls", action="store_true", help="mlp: keep the class token")
    p.add_argument("--adapter-targets", nargs="+", default=None, metavar="NAME",
                   help="encoder linear layers with per-window adapters (default: attention and MLP projections)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new parts' initialisation (default 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype of the output (default: the LLM's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.generate import DTYPES
    from monkeytune.model.compose import ComposeError, ComposeOptions, compose
    from monkeytune.model.io import ModelFolderError

    options = ComposeOptions(
        grid=args.grid, global_view=args.global_view, window_size=args.window_size, connector=args.connector,
        queries=args.queries, pixel_shuffle=args.pixel_shuffle, feature_layer=args.feature_layer,
        keep_cls=args.keep_cls, adapter_targets=args.adapter_targets, seed=args.seed,
        dtype=DTYPES[args.dtype],
    )
    try:
        out = compose(args.vision, args.llm, args.out, options)
    except (ComposeError, ModelFolderError, ValueError) as e:
        print(f"monkeytune compose: {e}", file=sys.stderr)
        return 2
    print(f"wrote composed model folder {out}")
    return 0
