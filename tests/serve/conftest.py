"""A tiny "parrot" model folder for the serve tests.

The model is a real tiny :class:`MonkeyForCausalLM` (vision tower, resampler, Qwen2 LLM) whose
weights are set so that greedy decoding always answers :data:`ANSWER`: every attention and MLP
output projection is zero, so the last hidden state is the current token's embedding, and the
embeddings and LM head form a chain ``any other token -> a1 -> a2 -> ... -> an -> <eos>`` over the
answer's tokens. The answer is thus known in advance and independent of random initialisation,
while prompts, images and streaming still go through every real code path.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from PIL import Image

from monkeytune.config import get_config
from monkeytune.model import build_model
from monkeytune.model.io import save_model
from monkeytune.tokenizer.simple import SimpleTokenizer

ANSWER = "a red square on the left"


def make_parrot(model, tokenizer, answer: str, loop: bool = False) -> None:
    """Set ``model``'s LLM weights so that greedy decoding produces ``answer`` then stops.

    With ``loop`` the answer repeats forever instead (generation only ends at its token limit).
    """
    chain = tokenizer.encode(answer)
    assert len(set(chain)) == len(chain), "answer tokens must be distinct for a token chain"
    # Prompts end in these; inside the chain they would make an answer start midway.
    assert not set(chain) & set(tokenizer.encode(" ") + tokenizer.encode("\n")), [tokenizer.decode([t]) for t in chain]
    llm = model.llm
    hidden = llm.config.hidden_size
    basis = torch.eye(hidden)
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = llm.get_input_embeddings().weight
        emb.copy_(basis[0].expand_as(emb))
        head = llm.get_output_embeddings().weight
        head.zero_()
        head[chain[0]] += 10 * basis[0]
        for i, tok in enumerate(chain):
            emb[tok] = basis[i + 1]
            nxt = chain[i + 1] if i + 1 < len(chain) else (chain[0] if loop else tokenizer.eos_id)
            head[nxt] += 10 * basis[i + 1]


def parrot(loop: bool = False):
    """``(model, tokenizer)`` of a fresh parrot model."""
    tok = SimpleTokenizer.train(
        ["a red square on the left", "what colour is the square? Answer: red", "a blue circle on the right", "left left left"] * 3,
        vocab_size=300,
    )
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    make_parrot(model, tok, ANSWER, loop=loop)
    return model, tok


@pytest.fixture(scope="session")
def parrot_dir(tmp_path_factory):
    model, tok = parrot()
    directory = tmp_path_factory.mktemp("parrot")
    save_model(model, directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="session")
def engine(parrot_dir):
    from monkeytune.serve.engine import ChatEngine

    return ChatEngine.from_dir(parrot_dir)


@pytest.fixture(scope="session")
def endless_engine():
    """An in-memory engine whose model repeats the answer until its token limit."""
    from monkeytune.serve.engine import ChatEngine

    return ChatEngine(*parrot(loop=True), name="endless")


@pytest.fixture(scope="session")
def picture(tmp_path_factory):
    """A 300x200 PNG: red square on the left, blue on the right."""
    path = tmp_path_factory.mktemp("images") / "scene.png"
    img = Image.new("RGB", (300, 200), (240, 240, 240))
    img.paste((200, 40, 40), (20, 50, 120, 150))
    img.paste((40, 60, 200), (180, 50, 280, 150))
    img.save(path)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a currently free loopback TCP port."""
    return _free_port


@pytest.fixture(scope="session")
def server(parrot_dir):
    """The chat page of the parrot model, served on a free loopback port.

    Yields ``(url, engine)``; ``engine.spans`` records the times of the first and last answer
    piece of every generation.
    """
    pytest.importorskip("gradio")
    import threading
    import time

    from monkeytune.serve.engine import ChatEngine
    from monkeytune.serve.launch import launch_app

    class RecordingEngine(ChatEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.spans: list[tuple[float, float]] = []
            self._spans_lock = threading.Lock()

        def stream(self, history, template, settings):
            # Pieces arrive while the engine lock is held, so the span from the first to the
            # last piece lies inside the generation's hold of the lock.
            first = last = None
            try:
                for text in super().stream(history, template, settings):
                    last = time.monotonic()
                    first = first or last
                    yield text
            finally:
                if first is not None:
                    with self._spans_lock:
                        self.spans.append((first, last))

    engine = RecordingEngine.from_dir(parrot_dir, name="parrot")
    app, url = launch_app(engine, "127.0.0.1", _free_port())
    yield url, engine
    app.close()


@pytest.fixture(scope="session")
def answer() -> str:
    """What the parrot model answers to anything."""
    return ANSWER
