"""Shared helpers for the data tests: a character tokenizer, a small config, image and file writers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image

from monkeytune.config import ImageConfig, get_config

SPECIALS = ("<|endoftext|>", "<img>", "</img>", "<imgpad>", "<|im_start|>", "<|im_end|>")
OFFSET = 16


class CharTokenizer:
    """One token per character (id = code point + 16); specials take ids 0..5.

    Small and fully predictable, so expected ids and label masks can be written by hand.
    """

    def __init__(self):
        self._specials = {name: i for i, name in enumerate(SPECIALS)}
        self.eos_id = self.pad_id = 0
        self.image_start_id, self.image_end_id, self.image_pad_id = 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return OFFSET + 0x110000

    def encode(self, text: str) -> list[int]:
        return [OFFSET + ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        names = {i: n for n, i in self._specials.items()}
        return "".join(
            ("" if skip_special else names[i]) if i < OFFSET else chr(i - OFFSET) for i in ids
        )

    def special_id(self, token: str) -> int:
        return self._specials[token]


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def cfg(tok):
    """The tiny preset with 28-pixel views and 4 queries: 5 views x 4 = 20 tokens per image."""
    base = get_config("tiny")
    return dataclasses.replace(
        base,
        image=ImageConfig(grid=[2, 2], window_size=28, global_view=True),
        vision=dataclasses.replace(base.vision, n_queries=4),
        image_start_id=tok.image_start_id,
        image_end_id=tok.image_end_id,
        image_pad_id=tok.image_pad_id,
    )


def make_image(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write records one per line; ``raw_lines`` replaces line ``k`` (1-based) verbatim."""
    lines = [json.dumps(r) for r in records]
    for k, text in (raw_lines or {}).items():
        lines[k - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def conv(*pairs: tuple[str, str], roles=("user", "assistant"), id=None) -> dict:
    turns = []
    for q, a in pairs:
        turns.append({"from": roles[0], "value": q})
        turns.append({"from": roles[1], "value": a})
    rec = {"conversations": turns}
    if id is not None:
        rec["id"] = id
    return rec


@pytest.fixture
def h():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        make_image=make_image, write_jsonl=write_jsonl, write_json=write_json, conv=conv
    )


def assert_same_items(a, b) -> None:
    """Two lists of dataset items are identical: ids, image counts, and every tensor."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and x["num_images"] == y["num_images"]
        for key in ("input_ids", "labels", "pixel_values", "view_slots"):
            assert torch.equal(x[key], y[key]), key
