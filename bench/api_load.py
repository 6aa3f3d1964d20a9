"""Load on ``monkeytune api``: throughput at concurrency 1, 4 and 16, latencies, refusals, memory.

Starts ``monkeytune api`` on the loopback address in a subprocess (a tiny random model unless
``--model`` is given, see :func:`make_model`) and, at each concurrency, sends the same
``--requests`` requests through one pooled HTTP client (threads), cycling through these kinds:

* ``normal``: a small picture (base64) and a question, 16 new tokens;
* ``stream``: the same with ``stream: true`` (server-sent events read to ``[DONE]``);
* ``long``: a question with up to 128 new tokens;
* ``hostile``: in turn a bad base64 string, non-image bytes, a 400-megapixel PNG header, an
  unknown content part, a prompt over the model's length and a 9 MiB body (the server's limit
  is set to 8 MiB); each must be refused with an OpenAI-shaped error while the server is busy
  with the others.

Reported side by side: answers/s and generated tokens/s at each concurrency and the ratio of
16 to 1, the mean batch, p50 and p95 latency of answers, the refusals' latency (median, p95,
max; per kind in the JSON), and the server's peak resident set (``VmHWM``). The levels take
turns (``--rounds``), so that the machine's other load, which drifts, weighs on each alike; the
ratio of each round's 16 to its 1 is printed too (least, median, most), which shows how much the
machine moved during the run. The run is bounded: ``--requests`` per level and a ``--deadline``
per level. Nothing listens beyond 127.0.0.1.

Usage: ``python bench/api_load.py [--requests 192] [--rounds 6] [--batch-size 16] [--preset-vision]``.
The last line printed is a JSON object with all figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

LEVELS = (1, 4, 16)
KINDS = ["normal", "stream", "long", "normal", "hostile", "stream", "normal", "long"]
HOSTILE = ["bad-base64", "non-image", "bomb", "unknown-part", "too-long", "oversized"]


def make_model(folder: Path, preset_vision: bool = False) -> Path:
    """A tiny random model with a small trained tokenizer (answers are gibberish, which is fine).

    The LLM is the ``tiny`` preset's. Its vision tower is cut to one layer on 112-pixel windows
    unless ``preset_vision``: on a CPU, the preset's tower (3 layers, five 224-pixel views per
    image) costs about 60 ms per image whatever the batch, which would measure the tower's
    arithmetic rather than the server's batching.
    """
    import dataclasses

    import torch

    from monkeytune.config import get_config
    from monkeytune.model import build_model
    from monkeytune.model.io import save_model
    from monkeytune.tokenizer.simple import SimpleTokenizer

    tok = SimpleTokenizer.train(["a red square on the left", "what colour is the square? Answer: red"] * 4,
                                vocab_size=320)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    if not preset_vision:
        cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
        cfg.image = dataclasses.replace(cfg.image, window_size=112)
    torch.manual_seed(0)
    save_model(build_model(cfg).eval(), folder / "model", tokenizer=tok)
    return folder / "model"


def _png(size=(300, 200)) -> bytes:
    from PIL import Image

    img = Image.new("RGB", size, (240, 240, 240))
    img.paste((200, 40, 40), (20, 50, 120, 150))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _image(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}


def request_body(kind: str, i: int, picture: bytes, hostile: int = 0) -> tuple[str, dict]:
    """``(name, body)`` of request ``i`` of ``kind``; ``hostile`` picks the hostile kind."""
    question = {"type": "text", "text": f"what is on the left? ({i})"}
    body = {"model": "m", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user",
                                                                           "content": [_image(picture), question]}]}
    if kind == "stream":
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "long":
        body.update(max_tokens=128, messages=[{"role": "user", "content": f"tell me everything ({i})"}])
    if kind != "hostile":
        return kind, body
    name = HOSTILE[hostile % len(HOSTILE)]
    content = {
        "bad-base64": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
        "non-image": [_image(b"this is not an image\n" * 100), question],
        "bomb": [_image(_bomb()), question],
        "unknown-part": [{"type": "input_audio", "input_audio": {"data": ""}}],
        "too-long": "why " * 500_000,
        "oversized": "x" * (9 * 2**20),  # the server takes at most 8 MiB here
    }[name]
    body["messages"] = [{"role": "user", "content": content}]
    return name, body


def encode(name: str, body: dict) -> tuple[str, bytes, bool]:
    """``(name, JSON bytes, streamed)``: bodies are encoded once, so latencies are the server's."""
    return name, json.dumps(body).encode(), bool(body.get("stream"))


def send(client, url: str, name: str, body: bytes, stream: bool) -> dict:
    """Send one request; ``{"name", "status", "seconds", "tokens"}``."""
    headers = {"Content-Type": "application/json"}
    started = time.monotonic()
    tokens = 0
    if stream:
        with client.stream("POST", url, content=body, headers=headers) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    else:
        r = client.post(url, content=body, headers=headers)
        status = r.status_code
        if status == 200:
            tokens = r.json()["usage"]["completion_tokens"]
        elif not ("error" in r.json() and {"message", "type", "param", "code"} <= set(r.json()["error"])):
            status = -status  # not an OpenAI-shaped error
    return {"name": name, "status": status, "seconds": time.monotonic() - started, "tokens": tokens}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _health(client, url: str) -> dict:
    return client.get(url.split("/v1/")[0] + "/health").json()


def run_round(client, url: str, bodies: list[tuple[str, bytes, bool]], concurrency: int, deadline: float) -> dict:
    """Send ``bodies`` ``concurrency`` at a time; the raw results, the time taken and the batches run."""
    before = _health(client, url)
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(send, client, url, *body) for body in bodies]
        wait(futures, timeout=deadline)
        results = [f.result() for f in futures if f.done() and not f.exception()]
    elapsed = time.monotonic() - started
    after = _health(client, url)
    return {"results": results, "seconds": elapsed, "sent": len(bodies),
            "batches": after["steps"] - before["steps"],
            "batched": after["step_rows"] - before["step_rows"]}


def summarize(concurrency: int, rounds: list[dict]) -> dict:
    """The figures of one concurrency level over its rounds."""
    results = [r for one in rounds for r in one["results"]]
    elapsed = sum(one["seconds"] for one in rounds)
    answers = [r for r in results if r["status"] == 200]
    refusals = [r for r in results if r["name"] in HOSTILE]
    return {
        "concurrency": concurrency, "seconds": elapsed, "answers": len(answers),
        "answers_per_s": len(answers) / elapsed, "tokens_per_s": sum(r["tokens"] for r in answers) / elapsed,
        "p50_ms": 1000 * _pct([r["seconds"] for r in answers], 0.5),
        "p95_ms": 1000 * _pct([r["seconds"] for r in answers], 0.95),
        "refusals": len(refusals), "refused_ok": sum(400 <= r["status"] < 500 for r in refusals),
        "refusal_p50_ms": 1000 * _pct([r["seconds"] for r in refusals], 0.5),
        "refusal_p95_ms": 1000 * _pct([r["seconds"] for r in refusals], 0.95),
        "refusal_max_ms": 1000 * max((r["seconds"] for r in refusals), default=float("nan")),
        "refusal_max_ms_by_kind": {k: round(1000 * max(r["seconds"] for r in refusals if r["name"] == k), 1)
                                   for k in sorted({r["name"] for r in refusals})},
        "mean_batch": sum(one["batched"] for one in rounds) / max(1, sum(one["batches"] for one in rounds)),
        "statuses": sorted({str(r["status"]) for r in results}),
        "lost": sum(one["sent"] for one in rounds) - len(results),
    }


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def start_server(model: Path, log: Path, batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    code = "import sys; from monkeytune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "api", "--model", str(model), "--port", "0",
                             "--batch-size", str(batch_size), "--time-limit", "60", "--max-body-mb", "8",
                             "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()  # "Serving ... on http://127.0.0.1:PORT/v1 (Ctrl-C to stop)"
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
    return proc, line.split("on ", 1)[1].split()[0]


def round_ratios(rounds: dict[int, list[dict]]) -> list[float]:
    """Answers/s of each round at the highest concurrency over the same round's at the lowest."""
    def rate(one: dict) -> float:
        return sum(r["status"] == 200 for r in one["results"]) / one["seconds"]

    return [rate(most) / rate(one) if rate(one) else float("nan")
            for one, most in zip(rounds[LEVELS[0]], rounds[LEVELS[-1]])]


def print_table(levels: list[dict], rss: int, per_round: list[float]) -> None:
    cols = [("concurrency", "{:>11}"), ("answers", "{:>7}"), ("answers_per_s", "{:>9.2f}"),
            ("tokens_per_s", "{:>8.1f}"), ("mean_batch", "{:>5.1f}"), ("p50_ms", "{:>7.0f}"), ("p95_ms", "{:>7.0f}"),
            ("refused_ok", "{:>7}"), ("refusal_p50_ms", "{:>8.1f}"), ("refusal_p95_ms", "{:>8.1f}"),
            ("refusal_max_ms", "{:>8.1f}")]
    print("concurrency answers answers/s tokens/s batch  p50 ms  p95 ms refused ref p50  ref p95  ref max (ms)")
    for level in levels:
        print(" ".join(fmt.format(level[key]) for key, fmt in cols))
    one, most = levels[0], levels[-1]
    answers, tokens = most["answers_per_s"] / one["answers_per_s"], most["tokens_per_s"] / one["tokens_per_s"]
    print(f"ratio {most['concurrency']} vs {one['concurrency']}: answers/s x{answers:.2f}, tokens/s x{tokens:.2f}")
    print(f"per round: least x{min(per_round):.2f}, median x{statistics.median(per_round):.2f}, "
          f"most x{max(per_round):.2f}")
    print(f"server peak RSS: {rss / 2**20:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: a tiny random model)")
    p.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    p.add_argument("--mix", default=",".join(KINDS),
                   help=f"the kinds of request, cycled (default {','.join(KINDS)})")
    # Six rounds of 32: on a 2-core machine whose speed drifts by a third within seconds, three
    # rounds left the ratio of 16 to 1 a tenth or more apart from run to run.
    p.add_argument("--rounds", type=int, default=6,
                   help="the levels take turns this many times, each with its share of the requests, so that a "
                   "change in the machine's other load falls on every level alike")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--deadline", type=float, default=120.0, help="seconds allowed per level")
    p.add_argument("--preset-vision", action="store_true",
                   help="keep the tiny preset's vision tower (default: a one-layer tower, see make_model)")
    p.add_argument("--threads", type=int, default=1,
                   help="the server's --threads (default 1: the tiny model gains nothing from more)")
    args = p.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = Path(args.model) if args.model else make_model(folder, args.preset_vision)
        proc, base = start_server(model, folder / "server.log", args.batch_size, args.threads)
        try:
            url = base + "/chat/completions"
            picture = _png()
            kinds = [args.mix.split(",")[i % len(args.mix.split(","))] for i in range(args.requests)]
            bodies = [encode(*request_body(kind, i, picture, kinds[:i].count("hostile")))
                      for i, kind in enumerate(kinds)]
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            with httpx.Client(timeout=120, limits=limits) as client:
                for body in bodies[:2]:
                    send(client, url, *body)  # warm-up
                rounds: dict[int, list[dict]] = {c: [] for c in LEVELS}
                share = -(-len(bodies) // args.rounds)
                for r in range(args.rounds):
                    for c in LEVELS:
                        part = bodies[r * share : (r + 1) * share]
                        rounds[c].append(run_round(client, url, part, c, args.deadline / args.rounds))
                levels = [summarize(c, rounds[c]) for c in LEVELS]
                per_round = round_ratios(rounds)
                alive = _health(client, url)["status"] == "ok"
            rss = _peak_rss(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    print_table(levels, rss, per_round)
    print(json.dumps({"levels": levels, "server_peak_rss_bytes": rss, "alive_after": alive,
                      "ratio_answers_per_round": per_round,
                      "ratio_answers": levels[-1]["answers_per_s"] / levels[0]["answers_per_s"],
                      "ratio_tokens": levels[-1]["tokens_per_s"] / levels[0]["tokens_per_s"]}))


if __name__ == "__main__":
    main()
