"""Serve under a bounded hostile load: the server must stay up with bounded memory.

Starts ``monkeytune serve`` on the loopback address in a subprocess (a tiny random model unless
``--model`` is given) and sends ``--requests`` chat requests, ``--concurrency`` at a time, through
Gradio's HTTP API (``gradio_client``). The requests cycle through these kinds:

* ``normal``: a small picture and a short question;
* ``endless``: a short question with up to 2048 new tokens (the time limit stops those that run
  too long; a random model often ends earlier on its own);
* ``long``: a 100,000-character question;
* ``huge``: a 2,000,000-character question;
* ``bomb``: a 20000x20000 PNG of a few KiB (400 megapixels when decoded);
* ``non-image``: a text file named ``.png``.

Reported per kind: requests, how they ended (answer, message in the page, or client error) and
latencies; for the server: the peak resident set (``VmHWM`` of the server process), the resident
set at the end, and whether it still answers. The run is bounded: ``--requests`` requests and a
``--deadline`` on the whole load, after which it stops waiting. Nothing listens beyond 127.0.0.1.

Usage: ``python bench/serve_load.py [--requests 50] [--concurrency 4] [--time-limit 20]``.
The last line printed is a JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

KINDS = ["normal", "endless", "long", "huge", "bomb", "non-image"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_model(folder: Path) -> Path:
    """A tiny random model with a small trained tokenizer (answers are gibberish, which is fine)."""
    import torch

    from monkeytune.config import get_config
    from monkeytune.model import build_model
    from monkeytune.model.io import save_model
    from monkeytune.tokenizer.simple import SimpleTokenizer

    tok = SimpleTokenizer.train(["a red square on the left", "what colour is the square? Answer: red"] * 4,
                                vocab_size=300)
    torch.manual_seed(0)
    model = build_model(get_config("tiny").matched_to_tokenizer(tok)).eval()
    save_model(model, folder / "model", tokenizer=tok)
    return folder / "model"


def make_inputs(folder: Path) -> dict[str, Path]:
    from PIL import Image

    picture = folder / "scene.png"
    img = Image.new("RGB", (300, 200), (240, 240, 240))
    img.paste((200, 40, 40), (20, 50, 120, 150))
    img.save(picture)
    bomb = folder / "bomb.png"
    Image.new("1", (20000, 20000), 0).save(bomb, optimize=True)  # 400 Mpx, a few KiB on disk
    fake = folder / "photo.png"
    fake.write_text("this is not an image\n" * 100)
    return {"picture": picture, "bomb": bomb, "fake": fake}


def one_request(client, kind: str, files: dict[str, Path]) -> tuple[str, str]:
    """Send one request of ``kind``; returns ``(outcome, detail)``."""
    from gradio_client import handle_file

    image = {"bomb": files["bomb"], "non-image": files["fake"]}.get(kind, files["picture"])
    _, notice, _ = client.predict(handle_file(str(image)), api_name="/set_image")
    if kind in ("bomb", "non-image"):
        return ("message" if "⚠️" in str(notice) else "accepted"), str(notice)[:160]
    question = {"long": "why " * 25_000, "huge": "why " * 500_000}.get(kind, "what is on the left?")
    max_new = 2048 if kind == "endless" else 16
    chat, _, notice = client.predict(question, "vqa", max_new, False, 0.7, 0.9, api_name="/ask")
    if notice and "⚠️" in str(notice):
        return "message", str(notice)[:160]
    return "answer", ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: a tiny random model)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=20.0, help="the server's per-request time limit (s)")
    p.add_argument("--deadline", type=float, default=900.0, help="stop waiting for the load after this (s)")
    args = p.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = Path(args.model) if args.model else make_model(folder)
        files = make_inputs(folder)
        port = _free_port()
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        server = subprocess.Popen(
            [sys.executable, "-c", "import sys; from monkeytune.cli import main; sys.exit(main(sys.argv[1:]))",
             "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--time-limit", str(args.time_limit)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            started = time.monotonic()
            while True:
                line = server.stdout.readline()
                if "Serving" in line:
                    break
                if server.poll() is not None or time.monotonic() - started > 300:
                    raise SystemExit(f"the server did not start: {line}")
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # drain
            rss_start = _status(server.pid, "VmRSS")
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(_status(server.pid, "VmRSS"))
                    stop.wait(0.2)

            threading.Thread(target=sample, daemon=True).start()
            local = threading.local()

            def run(i: int) -> dict:
                kind = KINDS[i % len(KINDS)]
                if not hasattr(local, "client"):
                    local.client = Client(url, verbose=False)
                t0 = time.monotonic()
                try:
                    outcome, detail = one_request(local.client, kind, files)
                except Exception as e:  # noqa: BLE001 - counted as a client-side failure
                    outcome, detail = "error", f"{type(e).__name__}: {e}"[:160]
                return {"kind": kind, "outcome": outcome, "detail": detail, "seconds": time.monotonic() - t0}

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                futures = [pool.submit(run, i) for i in range(args.requests)]
                done, pending = wait(futures, timeout=args.deadline)
                for f in pending:
                    f.cancel()
            wall = time.monotonic() - t0
            stop.set()
            results = [f.result() for f in done]
            try:
                alive = urllib.request.urlopen(url, timeout=10).status == 200
            except OSError:
                alive = False
            summary = {
                "requests": args.requests, "finished": len(results), "unfinished": len(pending),
                "concurrency": args.concurrency, "time_limit_s": args.time_limit, "wall_s": round(wall, 1),
                "server_alive": alive and server.poll() is None,
                "server_rss_start_mib": round(rss_start / 2**20, 1),
                "server_rss_peak_mib": round(max([_status(server.pid, "VmHWM"), *samples]) / 2**20, 1),
                "server_rss_end_mib": round(_status(server.pid, "VmRSS") / 2**20, 1),
                "kinds": {},
            }
            for kind in KINDS:
                rows = [r for r in results if r["kind"] == kind]
                if not rows:
                    continue
                outcomes: dict[str, int] = {}
                for r in rows:
                    outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
                secs = sorted(r["seconds"] for r in rows)
                summary["kinds"][kind] = {"count": len(rows), "outcomes": outcomes,
                                          "median_s": round(secs[len(secs) // 2], 2), "max_s": round(secs[-1], 2),
                                          "example": rows[0]["detail"]}
            print(f"{'kind':<10} {'count':>5}  {'outcomes':<28} {'median s':>8} {'max s':>7}  example")
            for kind, k in summary["kinds"].items():
                print(f"{kind:<10} {k['count']:>5}  {json.dumps(k['outcomes']):<28} {k['median_s']:>8} "
                      f"{k['max_s']:>7}  {k['example'][:70]}")
            print(f"server alive: {summary['server_alive']}; RSS start {summary['server_rss_start_mib']} MiB, "
                  f"peak {summary['server_rss_peak_mib']} MiB, end {summary['server_rss_end_mib']} MiB; "
                  f"{summary['finished']}/{args.requests} requests in {summary['wall_s']} s")
            print(json.dumps(summary))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
