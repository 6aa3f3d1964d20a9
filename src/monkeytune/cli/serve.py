"""``monkeytune serve [--model DIR] [--host 127.0.0.1] [--port 7860]``: the browser chat.

Exit status: 0 after Ctrl-C, 2 when there is no model to serve, the folder cannot be loaded,
Gradio is not installed or the port is taken.
"""

from __future__ import annotations

import argparse
import sys


def add_server_options(p: argparse.ArgumentParser, port: int) -> None:
    """The options every server command takes: the model folder, where to bind, how to load it,
    and the prompt layout (``serve`` and ``api``)."""
    from monkeytune.cli.options import add_prompt_template
    from monkeytune.serve.launch import DEFAULT_HOST, DEMO_ROOT

    p.add_argument("--model", default=None, metavar="DIR",
                   help=f"model folder; default: the demo's trained model under {DEMO_ROOT}/")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (default: as stored)")
    p.add_argument("--device", default=None, help="device for the model (default: cuda when available, else cpu)")
    add_prompt_template(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from monkeytune.serve.launch import DEFAULT_PORT, DEFAULT_TIME_LIMIT_S

    p = subparsers.add_parser(
        "serve",
        help="chat with a model in the browser (image upload, streaming answers)",
        description="Serve a local web page where you upload or paste an image, ask questions and "
        "watch the answer stream in. Works with monkeytune and official Monkey / Qwen-VL folders. "
        "Needs the 'serve' extra: pip install 'monkeytune[serve]'.",
    )
    add_server_options(p, DEFAULT_PORT)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted image file in MiB (default 20)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                   help=f"longest one answer may take before it is stopped (default {DEFAULT_TIME_LIMIT_S:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.serve.launch import NoModelError, exposure_warning

    try:
        from monkeytune.serve.launch import start

        import gradio  # noqa: F401
    except ImportError:
        print("monkeytune serve needs Gradio: pip install 'monkeytune[serve]'", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    try:
        app, url = start(args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                         template=args.prompt_template, max_upload_mb=args.max_upload_mb, time_limit_s=args.time_limit)
    except NoModelError as e:
        print(e, file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # unreadable folder, bad checkpoint, port in use
        print(f"monkeytune serve: {e}", file=sys.stderr)
        return 2
    print(f"Serving {args.model or 'the demo model'} on {url} (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
