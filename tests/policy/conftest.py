"""Shared fixtures of the policy tests: the real tiny model and a one-image training batch."""

from __future__ import annotations

import warnings

import pytest
import torch

from monkeytune.config import get_config
from monkeytune.model import build_model


@pytest.fixture
def tiny():
    """A fresh randomly initialised ``tiny`` model (3 ViT blocks, 2 LLM layers)."""
    torch.manual_seed(0)
    return build_model(get_config("tiny"))


@pytest.fixture(autouse=True)
def _quiet_peft():
    # peft calls a transformers API that warns about its own deprecation.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def image_batch(model, text_tokens: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sequence holding one image (all views) followed by supervised text."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    views = cfg.image.num_views
    size = cfg.image.window_size
    pixel_values = torch.randn(views, 3, size, size, generator=g)
    view_slots = torch.tensor(list(range(cfg.image.num_windows)) + [-1] * int(cfg.image.global_view))
    text = torch.randint(0, 1000, (text_tokens,), generator=g)
    ids = torch.cat([
        torch.tensor([cfg.image_start_id]),
        torch.full((cfg.tokens_per_image,), cfg.image_pad_id),
        torch.tensor([cfg.image_end_id]),
        text,
    ])[None]
    labels = ids.clone()
    labels[:, : cfg.tokens_per_image + 2] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "view_slots": view_slots}


@pytest.fixture
def make_batch():
    """:func:`image_batch` as a fixture (test modules cannot import conftest under importlib mode)."""
    return image_batch
