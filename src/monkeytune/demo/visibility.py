"""Is the fine detail below the global view's resolution? A pixel-level check on the rendered scenes.

One simple classifier (the linear probe of :mod:`monkeytune.eval.probe`) reads the fine answer of
each part from three crops of the same pixels:

* ``window``: the part at full resolution, the tiled model's window view;
* ``global``: the part's quarter of the tiled model's global view (bicubic 2x downsample);
* ``single_view``: the same quarter of a single-view model's image (Pillow's antialiased resize).

Features are the crop's local contrast (absolute difference from the 2x2 mean, where a 1-pixel
alternation lives) and its plain intensity, both average-pooled to 14x14, so the classifier can
use either the detail or anything that leaks into the low frequencies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from monkeytune.config import get_config
from monkeytune.eval.probe import predict_linear_probe, fit_linear_probe
from monkeytune.vision.processor import ImageProcessor

POOLED = 14


def _features(crop: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` crop -> ``[2 * POOLED * POOLED]`` (local contrast and intensity, grey)."""
    grey = crop.mean(0, keepdim=True)[None]  # [1, 1, H, W]
    contrast = (grey - F.interpolate(F.avg_pool2d(grey, 2), scale_factor=2, mode="nearest")).abs()
    return torch.cat([F.adaptive_avg_pool2d(contrast, POOLED).flatten(), F.adaptive_avg_pool2d(grey, POOLED).flatten()])


def _crops(root: Path, rows: list[dict], window_size: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    image_cfg = dataclasses.replace(get_config("tiny").image, window_size=window_size, grid=[2, 2])
    tiled = ImageProcessor(image_cfg)
    single = ImageProcessor(dataclasses.replace(image_cfg, grid=[0, 0]))
    feats: dict[str, list[torch.Tensor]] = {"window": [], "global": [], "single_view": []}
    labels: list[str] = []
    half = window_size // 2
    for row in rows:
        path = root / row["image"]
        views, one = tiled(path).views, single(path).views[0]
        for k, part in enumerate(row["parts"].values()):
            top, left = (k // 2) * half, (k % 2) * half
            feats["window"].append(_features(views[k]))
            feats["global"].append(_features(views[-1][:, top : top + half, left : left + half]))
            feats["single_view"].append(_features(one[:, top : top + half, left : left + half]))
            labels.append(str(part.get("digit", part.get("texture"))))
    return {k: torch.stack(v) for k, v in feats.items()}, labels


def fine_detail_visibility(data_root: str | Path, window_size: int = 112, max_train: int = 400) -> dict[str, float]:
    """Held-out accuracy of reading the fine answer from each crop of the rendered test scenes.

    Args:
        data_root: A demo data folder (its ``scenes.jsonl`` says what each part shows).
        window_size: The model's view size (the images are ``2 * window_size`` pixels).
        max_train: Training scenes the classifier is fitted on.

    Returns:
        ``{"window": acc, "global": acc, "single_view": acc, "chance": acc}``.
    """
    root = Path(data_root)
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [s for s in scenes if s["split"] == "train"][:max_train]
    test = [s for s in scenes if s["split"] == "test"]
    x_train, y_train = _crops(root, train, window_size)
    x_test, y_test = _crops(root, test, window_size)
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in y_train])
    truth = torch.tensor([index.get(c, -1) for c in y_test])
    out = {}
    for name in x_train:
        mean, std, weight = fit_linear_probe(x_train[name], y, len(classes))
        out[name] = float((predict_linear_probe(x_test[name], mean, std, weight) == truth).float().mean())
    out["chance"] = float((truth == int(torch.bincount(y).argmax())).float().mean())
    return out
