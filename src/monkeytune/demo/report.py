"""The demo's outputs: results table, ``metrics.json``, ``loss_curves.png`` and ``examples.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # only for annotations; run.py imports this module lazily
    from monkeytune.demo.run import DemoResult

DEMO_METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss_curves.png"
EXAMPLES_PLOT = "examples.png"


def _pct(x: float | None) -> str:
    return "  -  " if x is None else f"{100 * x:5.1f}%"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def results_table(result: "DemoResult") -> str:
    """The printed summary: accuracy per kind, trainable parameters and time of every model."""
    from monkeytune.demo.run import LABELS

    rows = [("model", "fine", "coarse", "probe: windows", "probe: global", "warm-up loss", "trainable", "steps",
             "train s", "eval s")]
    for name, st in result.stages.items():
        probe = st.probe.get("accuracy", {})
        warm = st.warmup.get("loss")
        steps = f"{st.warmup['steps']} + {st.steps}" if st.warmup else str(st.steps)
        rows.append((LABELS[name], _pct(st.accuracy.get("fine")), _pct(st.accuracy.get("coarse")),
                     _pct(probe.get("windows")), _pct(probe.get("global")), "-" if warm is None else f"{warm:.3f}",
                     f"{_count(st.trainable_params)} / {_count(st.total_params)}", steps,
                     f"{st.train_seconds + st.warmup.get('seconds', 0.0):.0f}", f"{st.eval_seconds:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("probe: a linear probe's held-out accuracy on the fine answers from the frozen visual tokens; "
                 "warm-up loss: the vision warm-up run's loss at its last step (steps and train s include the run)")
    v = result.visibility
    if v:
        lines.append(f"pixels: a linear classifier reads the fine answer from the full-resolution window in "
                     f"{_pct(v['window']).strip()}, from the global view in {_pct(v['global']).strip()}, from a "
                     f"single-view image in {_pct(v['single_view']).strip()} (chance {_pct(v['chance']).strip()})")
    lines.append(f"task {result.settings.task}: total wall time {result.seconds:.0f} s "
                 "(data, two vision warm-ups, three trainings, three evaluations, report)")
    return "\n".join(lines)


def check_targets(result: "DemoResult") -> dict[str, dict[str, Any]]:
    """Each documented target with its measured value and whether it is met."""
    from monkeytune.demo.run import TARGETS

    s = result.stages
    drop = s["stage1"].accuracy.get("coarse", 0.0) - s["stage2"].accuracy.get("coarse", 0.0)
    measured = {
        "stage2_fine_min": (s["stage2"].accuracy.get("fine", 0.0), lambda v, t: v >= t),
        "baseline_fine_max": (s["baseline"].accuracy.get("fine", 1.0), lambda v, t: v <= t),
        "coarse_drop_max": (drop, lambda v, t: v <= t + 1e-9),
        "wall_seconds_max": (result.seconds, lambda v, t: v <= t),
    }
    targets = TARGETS[result.settings.task]
    return {k: {"target": targets[k], "measured": round(v, 4), "met": bool(ok(v, targets[k]))}
            for k, (v, ok) in measured.items()}


def metrics_dict(result: "DemoResult") -> dict[str, Any]:
    """Everything measured, JSON-able."""
    from monkeytune.demo.run import settings_dict

    return {
        "settings": settings_dict(result.settings),
        "data": {"root": str(result.data.root), "counts": result.data.counts},
        "models": {
            name: {
                "model_dir": str(st.model_dir),
                "run_dir": str(st.run_dir),
                "exact_match": {k: round(v, 4) for k, v in st.accuracy.items()},
                "fine_probe": st.probe,
                "trainable_params": st.trainable_params,
                "total_params": st.total_params,
                "steps": st.steps,
                "train_seconds": round(st.train_seconds, 2),
                "eval_seconds": round(st.eval_seconds, 2),
                "warmup": st.warmup,
            }
            for name, st in result.stages.items()
        },
        "targets": check_targets(result),
        "pixel_visibility": {k: round(v, 4) for k, v in result.visibility.items()},
        "wall_seconds": round(result.seconds, 2),
    }


def plot_loss_curves(result: "DemoResult", out_path: Path) -> Path:
    """Training loss of the three runs against optimizer step (read from their ``metrics.jsonl``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monkeytune.demo.run import LABELS
    from monkeytune.train.metrics import METRICS_FILE as RUN_METRICS
    from monkeytune.train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    offset = {"stage2": result.stages["stage1"].steps}  # stage 2 continues stage 1
    for name, st in result.stages.items():
        rows = [r for r in read_metrics(st.run_dir / RUN_METRICS)
                if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if rows:
            steps = [r["step"] + offset.get(name, 0) for r in rows]
            ax.plot(steps, [r["loss"] for r in rows], linewidth=1.2, label=LABELS[name])
    ax.set_xlabel("optimizer step (step 2 continues step 1)")
    ax.set_ylabel("training loss (per supervised token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("monkeytune demo: training loss")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _global_view(path: str, size: int) -> np.ndarray:
    """What a global view sees: the image bicubically halved (as the model's global view is)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    small = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0]
    return small.clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)


def plot_examples(result: "DemoResult", out_path: Path) -> Path:
    """A few test images: full image, a zoom of one part at full resolution and as the global view
    sees it, with the questions, answers and each model's predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monkeytune.demo.scene import REGIONS

    preds = {name: {p["question_id"]: p["prediction"] for p in st.predictions} for name, st in result.stages.items()}
    first = next(iter(result.stages.values())).predictions
    images: list[str] = []
    for p in first:
        if p["image"] not in images:
            images.append(p["image"])
    images = images[: max(1, result.settings.examples)]
    fig, axes = plt.subplots(len(images), 4, figsize=(15, 3.6 * len(images)), dpi=90,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.6]}, squeeze=False)
    for row, image in zip(axes, images):
        qs = [p for p in first if p["image"] == image]
        fine = next((p for p in qs if p["kind"] == "fine"), qs[0])
        k = REGIONS.index(fine["region"]) if fine.get("region") in REGIONS else 0
        full = np.asarray(Image.open(image).convert("RGB"))
        half = full.shape[0] // 2
        top, left = (k // 2) * half, (k % 2) * half
        zoom = 28  # a 28x28 crop from the middle of the part, drawn large
        cy, cx = top + half // 2, left + half // 2
        crop = full[cy - zoom // 2 : cy + zoom // 2, cx - zoom // 2 : cx + zoom // 2]
        glob = _global_view(image, half)
        gcy, gcx = cy // 2, cx // 2
        gcrop = glob[gcy - zoom // 4 : gcy + zoom // 4, gcx - zoom // 4 : gcx + zoom // 4]
        row[0].imshow(full)
        row[0].set_title(Path(image).name)
        row[1].imshow(crop, interpolation="nearest")
        row[1].set_title(f"{fine.get('region', '')}: window (full res)")
        row[2].imshow(gcrop, interpolation="nearest")
        row[2].set_title("same spot in the global view")
        for ax in row[:3]:
            ax.set_xticks([])
            ax.set_yticks([])
        lines = []
        for p in qs[:8]:
            got = "  ".join(f"{n}={preds[n].get(p['question_id'], '?')}" for n in result.stages)
            lines.append(f"{p['question'].strip()}\n   answer={p['answer']}  {got}")
        row[3].axis("off")
        row[3].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def write_report(result: "DemoResult") -> dict[str, Path]:
    """Write ``metrics.json`` and the two PNGs into the output folder and print the table."""
    out = Path(result.settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / DEMO_METRICS_FILE
    metrics_path.write_text(json.dumps(metrics_dict(result), indent=2) + "\n", encoding="utf-8")
    files = {
        "metrics": metrics_path,
        "loss_curves": plot_loss_curves(result, out / LOSS_PLOT),
        "examples": plot_examples(result, out / EXAMPLES_PLOT),
    }
    for name, st in result.stages.items():
        with open(out / f"predictions_{name}.jsonl", "w", encoding="utf-8") as f:
            for p in st.predictions:
                f.write(json.dumps(p) + "\n")
    print(results_table(result), flush=True)
    for key, t in check_targets(result).items():
        print(f"  target {key}: {t['measured']} vs {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    print(f"outputs in {out}: {', '.join(p.name for p in files.values())}, models/", flush=True)
    return files
