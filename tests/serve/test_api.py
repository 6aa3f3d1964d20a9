"""``monkeytune api`` through the real ``openai`` client, against one loopback server per module.

The model is a tiny random one (saved like a trained folder, nothing from a hub): its answers are
arbitrary token sequences, so equality with ``monkeytune chat`` and between alone and batched
generation is a real check of prompts, images, padding and decoding.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from monkeytune.cli import main  # noqa: E402
from monkeytune.config import get_config  # noqa: E402
from monkeytune.generate import GenerationSettings, generate_ids, prompt_ids, stop_ids  # noqa: E402
from monkeytune.model import build_model  # noqa: E402
from monkeytune.model.io import save_model  # noqa: E402
from monkeytune.serve.api import APISettings  # noqa: E402
from monkeytune.serve.api_launch import load_api, start_in_thread  # noqa: E402
from monkeytune.serve.api_request import RequestLimits  # noqa: E402
from monkeytune.tokenizer.simple import SimpleTokenizer  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["what is in the picture? Answer: a red square", "Generate the detailed caption in English: a cat",
         "the quick brown fox jumps over the lazy dog", "how many boxes are there? two boxes"]
# A question the model answers with 3000 tokens and more (no end-of-text): holds the worker busy.
BUSY = "the quick brown fox"


def png_bytes(size=(60, 40), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=20000, height=20000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, a few dozen bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def ask(text: str, image: bytes | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=320)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=1)
    torch.manual_seed(0)
    save_model(build_model(cfg).eval(), root / "model", tokenizer=tok)
    (root / "red.png").write_bytes(png_bytes())
    limits = RequestLimits(max_body_bytes=2**20, max_image_bytes=256 * 2**10, max_image_pixels=1_000_000)
    settings = APISettings(api_key=KEY, limits=limits, max_batch_size=4, max_queue=6, time_limit_s=60)
    server = load_api(root / "model", settings)
    running = start_in_thread(server)
    client = openai.OpenAI(base_url=running.url, api_key=KEY, max_retries=0, timeout=60)
    yield SimpleNamespace(root=root, server=server, url=running.url, client=client, tok=tok)
    running.stop()


def complete(api, messages, **kw):
    kw.setdefault("temperature", 0)
    return api.client.chat.completions.create(model="model", messages=messages, **kw)


def test_models_and_health(api):
    assert [m.id for m in api.client.models.list().data] == ["model"]
    health = httpx.get(api.url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == "model" and health["max_batch_size"] == 4


def test_plain_answer_with_an_image_equals_chat(api, capsys):
    question = "what is in the picture?"
    assert main(["chat", "--model", str(api.root / "model"), "--image", str(api.root / "red.png"), question,
                 "--max-new-tokens", "12"]) == 0
    expected = capsys.readouterr().out.strip()
    reply = complete(api, ask(question, (api.root / "red.png").read_bytes()), max_tokens=12)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.model == "model"
    tpi = api.server.model.config.tokens_per_image
    assert reply.usage.prompt_tokens > tpi and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_answer_arrives_in_pieces_and_equals_the_plain_one(api):
    messages = ask("how many boxes are there?", png_bytes(colour=(30, 30, 200)))
    plain = complete(api, messages, max_tokens=10)
    chunks = list(complete(api, messages, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # On the wire: OpenAI's chunk objects as server-sent events, ending with [DONE].
    with httpx.stream("POST", api.url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "m", "messages": messages, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"object":"chat.completion.chunk"' in lines[0]


def test_multi_turn_follows_the_conversation_template(api):
    model, tok = api.server.model, api.tok
    image = api.root / "red.png"
    messages = ask("what is in the picture?", image.read_bytes()) + [
        {"role": "assistant", "content": "a red square"}, {"role": "user", "content": "how many boxes are there?"}]
    reply = complete(api, messages, max_tokens=8).choices[0].message.content
    # The monkey template: each user turn in the vqa layout, its answer and <|endoftext|>.
    history = [(f"<img>{image}</img> what is in the picture? Answer: ", "a red square")]
    ids, paths = prompt_ids("vqa", tok, model.config.tokens_per_image, "how many boxes are there?", None, history)
    expected = generate_ids(model, tok, [(ids, paths)], GenerationSettings(8), stop_ids(tok, "vqa"))[0]
    assert reply == tok.decode(expected).strip()


@contextlib.contextmanager
def busy(api):
    """The model busy with a long streamed answer (3000 tokens, seconds) until the block ends.

    Leaving the block hangs up, which ends that answer at its next token.
    """
    body = {"model": "m", "messages": ask(BUSY), "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", api.url + "/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # the first chunk
        until(lambda: api.server.batcher.running == 1)
        yield
    until(lambda: not api.server.batcher.running)


def until(condition, seconds=10.0) -> float:
    """Wait for ``condition``; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "timed out waiting"
        time.sleep(0.005)
    return time.monotonic() - started


def test_greedy_answers_are_the_same_alone_and_batched(api):
    questions = [("what is in the picture?", png_bytes()), ("how many boxes are there?", None),
                 ("the lazy dog", png_bytes((90, 30), (20, 200, 20))), ("a", None)]
    alone = [complete(api, ask(q, im), max_tokens=16).choices[0].message.content for q, im in questions]
    together: dict[int, str] = {}
    workers = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, complete(api, ask(*questions[i]), max_tokens=16).choices[0].message.content)) for i in range(4)]
    batcher = api.server.batcher
    with busy(api):  # the four join the long answer while it decodes, whenever they arrive
        before = batcher.step_count
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        steps = list(batcher.recent)[before - batcher.step_count:]
    assert max(steps) >= 3 and min(steps) >= 1
    assert [together[i] for i in range(4)] == alone


@pytest.mark.parametrize("messages, extra, status, code", [
    (ask("hi", b"this is not an image at all"), {}, 400, "invalid_image"),
    (ask("hi", bomb_png()), {}, 413, "image_too_large"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,&&&"}}]}], {},
     400, "invalid_base64"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], {}, 400, "invalid_content_part"),
    (ask("why " * 60_000), {}, 400, "context_length_exceeded"),
    (ask("hi"), {"max_tokens": 5000}, 400, "context_length_exceeded"),
    (ask("x" * 1_100_000), {}, 413, "request_too_large"),
    (ask("hi <img>/etc/hostname</img>"), {}, 400, "invalid_value"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}], {},
     400, "file_urls_disabled"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}], {},
     400, "unsupported_image_url"),
    (ask("hi"), {"n": 2}, 400, "invalid_value"),
    (ask("hi"), {"temperature": 3}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(api, messages, extra, status, code):
    with pytest.raises(openai.APIStatusError) as caught:
        complete(api, messages, **extra)
    error = caught.value.body
    assert caught.value.status_code == status and error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_keys_routes_and_json_are_checked(api):
    base = api.url
    r = httpx.post(base + "/chat/completions", json={"messages": ask("hi")})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(base + "/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "incorrect API key"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(base + "/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(base + "/nothing/here", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert complete(api, ask("hi"), max_tokens=2).choices[0].message is not None  # still serving


def test_a_full_queue_is_refused_at_once_while_the_model_is_busy(api, monkeypatch):
    # One row at a time: the busy answer fills the batch, so the others wait in the queue.
    monkeypatch.setattr(api.server.batcher, "max_batch_size", 1)
    waiting = [threading.Thread(target=complete, args=(api, ask("a")), kwargs={"max_tokens": 2}) for _ in range(6)]
    with busy(api):
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError):
            complete(api, ask("hi"), max_tokens=10_000)
        assert time.monotonic() - started < 1.0, "a refusal must not wait for the model"
        for w in waiting:
            w.start()
        until(lambda: api.server.batcher.waiting == 6)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as caught:
            complete(api, ask("one more"), max_tokens=2)
        assert time.monotonic() - started < 1.0
        assert caught.value.body["code"] == "queue_full" and caught.value.response.headers["retry-after"] == "1"
    for w in waiting:
        w.join(60)


def test_the_time_limit_ends_a_request_with_503(api):
    server = api.server
    server.settings = dataclasses.replace(server.settings, time_limit_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            complete(api, ask(BUSY), max_tokens=2000)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "timeout"
        assert time.monotonic() - started < 5
        with pytest.raises(openai.APIError, match="time limit"):
            list(complete(api, ask(BUSY), max_tokens=2000, stream=True))
    finally:
        server.settings = dataclasses.replace(server.settings, time_limit_s=60)
    until(lambda: not server.batcher.running)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_taking_a_slot(api, stream):
    body = {"model": "m", "messages": ask(BUSY), "max_tokens": 3000, "stream": stream}
    if stream:
        with httpx.stream("POST", api.url + "/chat/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the connection at once
            next(lines)
            until(lambda: api.server.batcher.running == 1)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(api.url + "/chat/completions", json=body, headers=AUTH, timeout=0.5)
    # The answer would take seconds more; the model is free at the next token.
    assert until(lambda: not api.server.batcher.running, seconds=2.0) < 2.0
    assert complete(api, ask("a"), max_tokens=2).choices[0].finish_reason in ("stop", "length")
