"""Run metrics: a JSON Lines log, the experiment trackers, a progress bar and a loss plot.

``metrics.jsonl`` holds one object per logged optimizer step (``step``, ``epoch``, ``loss``,
``lr`` (the highest), ``lr/<component>`` (each trained component's rate, e.g.
``lr/vision_adapters``, ``lr/resampler``, ``lr/llm_layers``), ``grad_norm``, ``tokens``,
``tokens_per_s``, ``samples``, ``skipped``, ``time``). The same numbers go to the trackers of
``log.trackers`` (:mod:`monkeytune.train.trackers`) as ``train/<name>``. On resume
the lines after the checkpoint's step are dropped, so the file always describes one consistent
history. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from monkeytune.train.checkpoint import write_text_atomic
from monkeytune.train.trackers import finish_trackers, log_to_trackers

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def json_line(row: dict[str, Any]) -> str:
    """One JSON Lines record; NaN and inf become ``null`` (bare ``NaN`` is not valid JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics file (a missing file reads as empty; a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


class MetricsLog:
    """Append-only metrics, mirrored to the run's experiment trackers.

    Args:
        run_dir: Run folder (``metrics.jsonl`` goes there).
        enabled: False on non-main ranks (then every call is a no-op).
        accelerator: The run's accelerator; rows go to its trackers (started by
            :func:`monkeytune.train.trackers.start_trackers`), if any.
        resume_step: Drop existing lines with ``step`` greater than this; None starts afresh.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, accelerator=None,
                 resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._acc = accelerator
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        # Through a temporary file: a crash here must not lose the history kept so far.
        write_text_atomic(self.path, "".join(json_line(r) for r in kept))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(row))
        if self._acc is not None and self._acc.trackers:
            log_to_trackers(self._acc, row)

    def close(self) -> None:
        """Finish the trackers (safe to call again, e.g. after a crash)."""
        if self._acc is not None:
            finish_trackers(self._acc)


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Draw loss (and learning rate) against step into a PNG; None when there is nothing to draw."""
    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; safe inside headless jobs
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", linewidth=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", linewidth=0.8, alpha=0.7, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("training loss")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


class Progress:
    """A tqdm bar over optimizer steps showing loss, lr and tokens/s (its ETA comes from tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            logger.info(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
