"""Starting the web chat: which model, which address, and the warning when it is not local-only."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEMO_ROOT", "NoModelError", "exposure_warning", "find_demo_model", "launch_app", "start"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# A 100,000-character question once held the single generation slot for 91 s; prompts are now
# bounded by the model's length, and no answer may hold the slot longer than this.
DEFAULT_TIME_LIMIT_S = 120.0
DEMO_ROOT = Path("outputs/demo")
# The demo writes its models to <root>/models/<stage>; the Monkey-way fine-tuned one is served
# first, then its from-scratch starting point (the single-view baseline only as a last resort).
DEMO_PREFERENCE = ("models/stage2", "models/stage1")


class NoModelError(FileNotFoundError):
    """No ``--model`` was given and no trained demo model exists; the message says how to get one."""


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    )


def find_demo_model(root: str | Path = DEMO_ROOT) -> Path:
    """The demo's trained model under ``root``.

    ``models/stage2`` (the demo model fine-tuned the Monkey way), else ``models/stage1``, else
    the newest other model folder, with ``final/`` folders of training runs first. Mid-run
    checkpoints (under ``checkpoints/``) are never chosen.

    Raises:
        NoModelError: nothing trained there yet, with the commands that make a model.
    """
    root = Path(root)
    for preferred in DEMO_PREFERENCE:
        if _is_model_dir(root / preferred):
            return root / preferred
    candidates = [root] if _is_model_dir(root) else []
    if root.is_dir():
        for path in sorted(root.rglob("config.json")):
            parts = path.relative_to(root).parts
            if len(parts) <= 4 and "checkpoints" not in parts and _is_model_dir(path.parent):
                candidates.append(path.parent)
    if not candidates:
        raise NoModelError(
            f"no model given and no trained demo model in {root}/.\n"
            "Run the embedded demo (about 10 minutes on a CPU), which leaves its models there:\n"
            "    monkeytune demo\n"
            "or train a tiny model (about a minute on a CPU) and serve it:\n"
            "    monkeytune train examples/tiny-cpu.yaml\n"
            "    monkeytune serve --model runs/tiny-cpu/final\n"
            "or serve any monkeytune or official Monkey / Qwen-VL folder:\n"
            "    monkeytune serve --model PATH/TO/MODEL"
        )
    return max(candidates, key=lambda p: (p.name == "final", (p / "config.json").stat().st_mtime))


def exposure_warning(host: str) -> str | None:
    """A warning when ``host`` makes the page reachable from other machines, else None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"WARNING: serving on {host}, not on the loopback address: anyone who can reach this machine "
        "can use the model and upload files, with no password. Use --host 127.0.0.1 unless you mean it."
    )


def start(
    model_dir: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    dtype: str = "auto",
    device: str | None = None,
    template: str | None = None,
    max_upload_mb: float = 20.0,
    time_limit_s: float | None = None,
):
    """Load a model and start serving the chat page in the background.

    Call ``app.block_thread()`` to serve until interrupted, ``app.close()`` to stop.

    Args:
        model_dir: Model folder; None serves the demo's trained model (see :func:`find_demo_model`).
        host: Address to bind.
        port: TCP port.
        dtype: Weight dtype: ``auto`` (as stored), ``float32``, ``bfloat16`` or ``float16``.
        device: Where the model runs (default: ``cuda`` when available, else ``cpu``).
        template: Preselected prompt template (default from the model).
        max_upload_mb: Largest accepted upload in MiB.
        time_limit_s: Longest one answer may take (default: the engine's, 120 s).

    Returns:
        ``(app, url)``: the running :class:`gradio.Blocks` and its local address.

    Raises:
        NoModelError: no model given and no demo model trained.
    """
    from monkeytune.serve.engine import ChatEngine
    from monkeytune.serve.uploads import UploadLimits

    if model_dir is None:
        model_dir = find_demo_model()
    limits = UploadLimits(max_bytes=int(max_upload_mb * 2**20))
    extra = {} if time_limit_s is None else {"time_limit_s": time_limit_s}
    engine = ChatEngine.from_dir(model_dir, dtype=dtype, device=device, template=template, limits=limits, **extra)
    return launch_app(engine, host, port)


def launch_app(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """Serve the page of a loaded :class:`~monkeytune.serve.engine.ChatEngine` in the background.

    Nothing leaves the machine: no share link, no analytics, no web fonts, no server-side
    rendering process.

    Returns:
        ``(app, url)``.
    """
    from monkeytune.serve.app import CSS, THEME, build_app

    app = build_app(engine)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        max_file_size=engine.limits.max_bytes,
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
    )
    return app, url
