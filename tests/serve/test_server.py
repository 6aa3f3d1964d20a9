"""The running page, driven through Gradio's HTTP API with gradio_client."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest

pytestmark = [
    # Looked up, not imported: every pytest worker collects this file, and gradio takes 4 s to
    # import (the fixtures that start the page import it).
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="needs gradio (the serve extra)"),
    # Gradio's queue trips pandas deprecation warnings that are not ours to fix.
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]
if importlib.util.find_spec("gradio_client") is not None:  # light: the client, not gradio
    from gradio_client import Client, handle_file

ASK = dict(template="vqa", max_new_tokens=32, sampling=False, temperature=0.7, top_p=0.9)


def _ask(client: Client, question: str, **overrides):
    args = {**ASK, **overrides}
    return client.submit(question, args["template"], args["max_new_tokens"], args["sampling"],
                         args["temperature"], args["top_p"], api_name="/ask")


def _text(message) -> str:
    return " ".join(part.get("text", "") for part in message["content"] if isinstance(part, dict))


def test_upload_ask_and_stream(server, picture, answer):
    url, _ = server
    client = Client(url, verbose=False)
    tiling, notice, chat = client.predict(handle_file(str(picture)), api_name="/set_image")
    assert "scene.png" in notice and "ready" in notice and chat == []
    assert tiling and tiling.endswith(".png")

    job = _ask(client, "what is on the left?")
    updates = list(job)
    chat, _, notice = job.result()
    assert _text(chat[-1]) == answer and chat[-1]["role"] == "assistant"
    assert chat[0]["content"][0]["type"] == "file", "the image is shown in the chat"
    assert len(updates) > 2, "the answer should stream in several updates"

    # A second turn in free chat keeps the conversation.
    job = _ask(client, "and on the right?", template="chatml")
    chat, _, _ = job.result()
    assert [m["role"] for m in chat][-4:] == ["user", "assistant", "user", "assistant"]
    assert _text(chat[-1]) == answer


def test_bad_requests_get_messages_and_the_server_keeps_serving(server, picture, tmp_path, answer):
    url, _ = server
    client = Client(url, verbose=False)
    fake = tmp_path / "photo.png"
    fake.write_text("this is not an image")
    tiling, notice, _ = client.predict(handle_file(str(fake)), api_name="/set_image")
    assert tiling is None and "photo.png" in notice and "not a recognised image" in notice

    _, _, notice = _ask(client, "<img>/etc/hostname</img> what?").result()
    assert "may not contain <img>" in notice
    with pytest.raises(Exception, match="less than minimum"):  # Gradio's own range check
        _ask(client, "what?", sampling=True, temperature=0).result()
    _, _, notice = _ask(client, "", template="caption").result()
    assert "needs an image" in notice
    # A 2,000,000-character question (1,999,999 once stripped) is refused from its length, with a message in the page.
    _, _, notice = _ask(client, "why " * 500_000).result()
    assert "the prompt is 1,999,999 characters long, more than this model can take" in notice

    client.predict(handle_file(str(picture)), api_name="/set_image")
    chat, _, notice = _ask(client, "what is on the left?").result()
    assert "⚠️" not in str(notice) and _text(chat[-1]) == answer


def test_concurrent_users_are_queued_not_interleaved(server, picture, answer):
    url, engine = server
    before = len(engine.spans)
    clients = [Client(url, verbose=False) for _ in range(3)]
    for c in clients:
        c.predict(handle_file(str(picture)), api_name="/set_image")
    results: dict[int, str] = {}

    def chat(i: int) -> None:
        chat_messages, _, _ = _ask(clients[i], "what is on the left?", template="raw").result()
        results[i] = _text(chat_messages[-1])

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: answer, 1: answer, 2: answer}
    spans = sorted(engine.spans[before:])
    assert len(spans) == 3
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans


def test_cancelling_a_generation_frees_the_model(endless_engine, picture, free_port, answer):
    from monkeytune.serve.launch import launch_app

    app, url = launch_app(endless_engine, "127.0.0.1", free_port())
    try:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(picture)), api_name="/set_image")
        job = _ask(client, "what?", template="raw", max_new_tokens=2000)
        deadline = time.monotonic() + 20
        while not (job.outputs() and endless_engine._lock.locked()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert endless_engine._lock.locked(), "the generation should be under way"
        assert job.cancel()  # what the Stop button does
        while endless_engine._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not endless_engine._lock.locked(), "cancelling must stop the generation"
        chat, _, _ = _ask(client, "again?", template="raw", max_new_tokens=6).result()  # six tokens: one pass
        assert _text(chat[-1]) == answer
    finally:
        app.close()
