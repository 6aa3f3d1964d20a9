"""A short real end-to-end pass of a model: a synthetic image through tiling, forward, backward, generation.

Used by ``monkeytune smoke`` to check an installation in seconds, and as a worked example of the
library's pieces fitting together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from monkeytune.config import ModelConfig
from monkeytune.model import MonkeyForCausalLM
from monkeytune.vision.processor import ImageProcessor


def synthetic_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A colourful RGB image with fine 1-pixel stripes in each quadrant (``size`` is (width, height))."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for qy in range(2):
        for qx in range(2):
            colour = rng.integers(0, 256, size=3)
            block = np.broadcast_to(colour, (h // 2, w // 2, 3)).copy()
            block[:: 2] = 255  # horizontal one-pixel stripes
            arr[qy * (h // 2) : (qy + 1) * (h // 2), qx * (w // 2) : (qx + 1) * (w // 2)] = block
    return Image.fromarray(arr)


@dataclass
class SmokeReport:
    views: tuple[int, ...]
    visual_tokens: int
    sequence_length: int
    loss: float
    adapter_grad_norm: float
    generated: list[int]
    seconds: float


def run_smoke(config: ModelConfig, seed: int = 0, new_tokens: int = 8) -> SmokeReport:
    """Tile a synthetic image, run forward + backward with a supervised answer, then generate."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = MonkeyForCausalLM(config)
    processor = ImageProcessor(config.image)
    canvas_h, canvas_w = config.image.canvas_size
    processed = processor(synthetic_image((canvas_w + 37, canvas_h - 21), seed))
    n = config.tokens_per_image
    prompt = [1, 2, config.image_start_id, *[config.image_pad_id] * n, config.image_end_id, 3, 4]
    answer = [5, 6, 7]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    model.train()
    out = model(ids, labels=labels, pixel_values=processed.views, view_slots=processed.slots)
    out.loss.backward()
    grads = [p.grad.norm() for name, p in model.named_parameters() if "lora" in name and p.grad is not None]
    model.eval()
    gen = model.generate(
        torch.tensor([prompt]), pixel_values=processed.views, view_slots=processed.slots,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
    )
    return SmokeReport(
        views=tuple(processed.views.shape),
        visual_tokens=n,
        sequence_length=ids.shape[1],
        loss=out.loss.item(),
        adapter_grad_norm=float(torch.stack(grads).norm()) if grads else 0.0,
        generated=gen[0].tolist(),
        seconds=time.perf_counter() - start,
    )
