"""Loading a folder for the API and serving it with uvicorn, blocking or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from monkeytune.serve.api import APIServer, APISettings

__all__ = ["DEFAULT_API_PORT", "RunningAPI", "bind", "load_api", "serve_forever", "start_in_thread"]

DEFAULT_API_PORT = 8000


def load_api(model_dir: str | Path, settings: APISettings = APISettings(), dtype: str = "auto",
             device: str | None = None, template: str | None = None, name: str | None = None) -> APIServer:
    """Load a monkeytune or official folder and build its API.

    Args:
        model_dir: The folder.
        settings: Limits, key and batching (``template`` and ``model_name`` are filled in here).
        dtype, device: As in ``monkeytune chat``.
        template: Prompt template; default: the one the folder records (see ``default_template``).
        name: Model id in ``/v1/models``; default: the folder's name.

    Raises:
        ModelFolderError: the folder cannot be loaded.
    """
    from monkeytune.generate import default_template, load_for_inference

    model, tokenizer = load_for_inference(model_dir, dtype=dtype, device=device)
    model.eval()
    template = template or default_template(model, str(model_dir))
    settings = replace(settings, template=template, model_name=name or Path(model_dir).resolve().name)
    return APIServer(model, tokenizer, settings)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one).

    Raises:
        OSError: the address is taken or cannot be bound (the caller reports it in one line).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it each small response waits ~40 ms for the client's delayed acknowledgement.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn(server: APIServer, log_level: str) -> Any:
    import uvicorn

    # No access log: it would be one line per request on a busy server. Keep-alive as OpenAI
    # clients reuse connections.
    config = uvicorn.Config(server.app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=5, lifespan="off")
    return uvicorn.Server(config)


def serve_forever(server: APIServer, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve on ``sock`` until interrupted (Ctrl-C, SIGTERM), then stop the batcher."""
    try:
        _uvicorn(server, log_level).run(sockets=[sock])
    finally:
        server.close()
        sock.close()


class RunningAPI:
    """A server running in a background thread (tests, benchmarks). ``url`` ends in ``/v1``."""

    def __init__(self, server: APIServer, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = server
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._uv = _uvicorn(server, log_level)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self.sock]},
                                        name="monkeytune-api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uv.started:
            self.stop()
            raise RuntimeError("the API server did not start")

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(10)
        self.server.close()
        self.sock.close()


def start_in_thread(server: APIServer, host: str = "127.0.0.1", port: int = 0) -> RunningAPI:
    """Serve ``server`` in a background thread; returns once it accepts connections."""
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    return RunningAPI(server, host, port)
