"""Can the demo's vision path learn the fine answers when it is told them directly?

A diagnostic for the from-scratch recipe (README, "A second task from real data"): the demo
model's vision tower and resampler are trained on single windows with a linear head on the
window's visual tokens and the window's own fine answer as the label, no LLM in between. Every
variant starts from the same random initialisation, sees the same batches and is scored on the
same held-out windows, side by side in one run:

* ``tower`` / ``resampler``: peak learning rates (0 freezes), AdamW, no warm-up;
* ``readout``: ``resampler`` (the 4 visual tokens, flattened: what the LLM receives), ``window``
  (the mean of the 4 RMS-normalised visual tokens: what the window_answer warm-up trains, and about
  what the LLM's attention can read), ``vit`` (the 16 ViT tokens flattened, no pooling) or
  ``mean`` (the ViT tokens averaged).

Before training, a linear probe on the frozen random features of each readout gives the
information the initialisation already carries.

Usage: ``python bench/vision_direct.py [--task digits] [--steps 300] [--scenes 1000]``; the data is
rendered into a temporary folder (the ``demo`` extra for digits). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from monkeytune.demo.generator import generate_dataset
from monkeytune.demo.run import demo_model_config
from monkeytune.demo.scene import REGIONS
from monkeytune.model.monkey import MonkeyForCausalLM
from monkeytune.train.objectives import window_readout
from monkeytune.vision.processor import ImageProcessor

# (tower lr, resampler and head lr, readout)
VARIANTS = [
    (1e-3, 1e-3, "resampler"),
    (3e-4, 3e-4, "resampler"),
    (1e-4, 1e-3, "resampler"),
    (3e-5, 1e-3, "resampler"),
    (0.0, 1e-3, "resampler"),
    (3e-5, 1e-3, "window"),
    (0.0, 1e-3, "window"),
    (1e-3, 1e-3, "mean"),
    (1e-3, 1e-3, "vit"),
]


def load_windows(root, split: str, limit: int, cfg, names: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """The windows of ``split``'s scenes: views ``[M, 3, S, S]``, slots ``[M]``, answer ids ``[M]``.

    ``names`` maps answers to ids and grows with new answers; pass the same dict for every split.
    """
    proc = ImageProcessor(cfg.image)
    views, slots, labels = [], [], []
    with open(root / "scenes.jsonl", encoding="utf-8") as f:
        for line in f:
            scene = json.loads(line)
            if scene["split"] != split:
                continue
            processed = proc(Image.open(root / scene["image"]).convert("RGB"))
            for k, region in enumerate(REGIONS):
                part = scene["parts"][region]
                answer = part.get("digit", part.get("texture"))
                views.append(processed.views[k])
                slots.append(k)
                labels.append(names.setdefault(answer, len(names)))
            if len(views) >= limit:
                break
    return torch.stack(views), torch.tensor(slots), torch.tensor(labels)


def readout(model: MonkeyForCausalLM, kind: str, views: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[M, F]`` features of the windows for the head."""
    feats = model.vision(views, slots)  # [M, L, width]
    if kind == "mean":
        return feats.mean(1)
    if kind == "vit":
        return feats.flatten(1)
    side = views.shape[-1] // model.config.vision.patch_size
    tokens = model.resampler(feats, (side, side))
    if kind == "window":
        return window_readout(tokens)
    return tokens.flatten(1)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 300) -> float:
    """Accuracy of a logistic regression on standardised frozen features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    head = nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(a), train_y) + 1e-3 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(b).argmax(1) == test_y).float().mean())


def train_variant(cfg, data, tower_lr: float, head_lr: float, kind: str, steps: int, batch: int, seed: int) -> dict:
    """Train one variant from the shared initialisation; test accuracy every 50 steps."""
    xtr, str_, ytr, xte, ste, yte, classes = data
    torch.manual_seed(seed)
    model = MonkeyForCausalLM(cfg)
    with torch.no_grad():
        width = readout(model, kind, xtr[:2], str_[:2]).shape[1]
    head = nn.Linear(width, classes)
    groups = [{"params": list(head.parameters()), "lr": head_lr}]
    if tower_lr:
        groups.append({"params": list(model.vision.parameters()), "lr": tower_lr})
    if kind in ("resampler", "window"):
        groups.append({"params": list(model.resampler.parameters()), "lr": head_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xtr), (batch,), generator=order)
        loss = F.cross_entropy(head(readout(model, kind, xtr[idx], str_[idx])), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                acc = float((head(readout(model, kind, xte, ste)).argmax(1) == yte).float().mean())
            curve.append((step, round(loss.item(), 3), round(acc, 4)))
    return {"tower_lr": tower_lr, "resampler_lr": head_lr, "readout": kind, "test_accuracy": curve[-1][2],
            "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=["digits", "textures"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scenes", type=int, default=1000, help="training scenes (4 windows each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = demo_model_config()
    with tempfile.TemporaryDirectory() as tmp:
        gen = generate_dataset(tmp, task=args.task, seed=args.seed, n_train=args.scenes, n_val=1, n_test=50,
                               progress=False)
        names: dict[str, int] = {}
        xtr, str_, ytr = load_windows(gen.root, "train", 4 * args.scenes, cfg, names)
        xte, ste, yte = load_windows(gen.root, "test", 200, cfg, names)
    classes = int(max(ytr.max(), yte.max())) + 1
    data = (xtr, str_, ytr, xte, ste, yte, classes)
    print(f"{args.task}: {len(xtr)} training windows, {len(xte)} test windows, {classes} answers, "
          f"majority {float(torch.bincount(yte).max() / len(yte)):.1%}")

    torch.manual_seed(args.seed)
    fresh = MonkeyForCausalLM(cfg)
    probes = {}
    sub = slice(0, min(2000, len(xtr)))
    for kind in ("resampler", "window", "vit", "mean"):
        with torch.no_grad():
            train_x, test_x = readout(fresh, kind, xtr[sub], str_[sub]), readout(fresh, kind, xte, ste)
        probes[kind] = linear_probe(train_x, ytr[sub], test_x, yte, classes)
    print("linear probe on the random initialisation: " + ", ".join(f"{k} {v:.1%}" for k, v in probes.items()))

    rows = []
    print(f"{'tower lr':>9} {'resampler lr':>13} {'readout':>10} {'test acc':>9}  curve (step: acc)")
    for tower_lr, head_lr, kind in VARIANTS:
        row = train_variant(cfg, data, tower_lr, head_lr, kind, args.steps, args.batch, args.seed)
        rows.append(row)
        curve = " ".join(f"{s}:{a:.0%}" for s, _, a in row["curve"])
        print(f"{tower_lr:>9g} {head_lr:>13g} {kind:>10} {row['test_accuracy']:>9.1%}  {curve}", flush=True)
    print(json.dumps({"task": args.task, "init_probe": probes, "variants": rows}))


if __name__ == "__main__":
    main()
