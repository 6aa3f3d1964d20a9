"""``monkeytune api [--model DIR] [--port 8000]``: an OpenAI-compatible HTTP API for a model folder.

A command of its own rather than ``serve --api``: it needs no Gradio, its options (key, batch
size, queue, body and image limits, image root) mean nothing to the page, and OpenAI clients
expect their own port. Exit status: 0 after Ctrl-C, 2 for bad options, a folder that cannot be
loaded, a missing web stack or a port that cannot be bound (one line each).
"""

from __future__ import annotations

import argparse
import os
import sys

KEY_ENV = "MONKEYTUNE_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    from monkeytune.cli.serve import add_server_options
    from monkeytune.serve.launch import DEFAULT_TIME_LIMIT_S

    p = subparsers.add_parser(
        "api",
        help="serve a model over an OpenAI-compatible HTTP API (batched, streaming)",
        description="Serve POST /v1/chat/completions (text and base64 images, streaming), GET /v1/models and "
        "GET /health for a monkeytune or official Monkey / Qwen-VL folder. Requests arriving together are "
        "generated together. Needs starlette and uvicorn (pip install 'monkeytune[serve]').",
    )
    add_server_options(p, 8000)
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (default: ${KEY_ENV} if set, else no key)")
    p.add_argument("--name", default=None, help="model id in /v1/models and responses (default: the folder's name)")
    p.add_argument("--batch-size", type=int, default=8, help="most requests generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="tokens generated when a request sets no max_tokens (default 256)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                   help=f"longest a request may take, waiting included; then 503 (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image in MiB (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="largest image width x height, read before decoding (default 50,000,000)")
    p.add_argument("--max-images", type=int, default=8, help="most images in one request (default 8)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="allow file:// image URLs naming files under DIR (default: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per operation (torch.set_num_threads; default: torch's, one per core). On a "
                   "shared or small machine 1 is often much faster: threads that wait for each other at every "
                   "operation cost more than they give")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace):
    """:class:`APISettings` from the options; ValueError with a one-line message when one is out of range."""
    from pathlib import Path

    from monkeytune.serve.api import APISettings
    from monkeytune.serve.api_request import RequestLimits

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    for name in ("batch_size", "max_tokens", "max_image_pixels", "max_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more, got {args.max_queue}")
    for name in ("time_limit", "max_body_mb", "max_image_mb"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be above 0, got {getattr(args, name)}")
    root = None
    if args.image_root is not None:
        root = Path(args.image_root).expanduser()
        if not root.is_dir():
            raise ValueError(f"--image-root {args.image_root}: not a folder")
    limits = RequestLimits(int(args.max_body_mb * 2**20), int(args.max_image_mb * 2**20), args.max_image_pixels,
                           args.max_images, root)
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV) or None
    return APISettings(api_key=key, limits=limits, default_max_tokens=args.max_tokens, time_limit_s=args.time_limit,
                       max_batch_size=args.batch_size, max_queue=args.max_queue)


def run(args: argparse.Namespace) -> int:
    from monkeytune.serve.launch import NoModelError, exposure_warning, find_demo_model

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("monkeytune api needs starlette and uvicorn: pip install 'monkeytune[serve]'", file=sys.stderr)
        return 2
    from monkeytune.model.io import ModelFolderError
    from monkeytune.serve.api_launch import bind, load_api, serve_forever

    try:
        settings = _settings(args)
        sock = bind(args.host, args.port)  # before loading: a taken port is reported at once
    except (ValueError, OSError) as e:
        print(f"monkeytune api: {e}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host)
    if warning and settings.api_key is None:
        print(warning.replace("use the model and upload files", "use the API"), file=sys.stderr)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        model_dir = args.model or find_demo_model()
        server = load_api(model_dir, settings, args.dtype, args.device, args.prompt_template, args.name)
    except (NoModelError, ModelFolderError, OSError, ValueError) as e:
        sock.close()
        print(f"monkeytune api: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    s = server.settings
    print(f"Serving {s.model_name} (template {s.template}, batches of up to {s.max_batch_size}) on "
          f"http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        serve_forever(server, sock, args.log_level)
    except KeyboardInterrupt:
        pass
    return 0
