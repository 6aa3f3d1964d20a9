"""Linear probes on a model's visual tokens: can the vision features tell the answers apart?

When a fine-tuned model answers badly, the probe says which half failed. It freezes the model,
encodes every image once, and fits a multinomial logistic regression (L2-regularised, by L-BFGS)
from the visual tokens to the reference answers:

* a high probe accuracy with bad answers: the features are there, the LLM does not route them
  (the question to the right tokens, or the tokens to the answer);
* a probe near chance: the vision tower never learned to see the detail.

The answer to a question depends on the question as well as the image (``top-left`` or
``bottom-right``?), so one probe is fitted per distinct question text and the accuracies are
pooled. Two feature sets are probed side by side: the window views' tokens (concatenated) and the
global view's. A single-view model has only the latter.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from monkeytune.eval.runner import read_eval_records

logger = logging.getLogger(__name__)


class ProbeError(ValueError):
    """Data a probe cannot be fitted on (no answers, a single class, too few records)."""


@dataclass
class ProbeResult:
    """Held-out accuracy of the probes, per feature set.

    Attributes:
        accuracy: ``{"windows": acc, "global": acc}`` (``windows`` absent without windows).
        chance: Accuracy of always answering each question's most frequent training answer.
        records: Held-out records scored.
        groups: Distinct questions probed.
        per_group: ``{question: {"windows": acc, "global": acc}}``.
        unscored: Held-out records left out because their question has no training records
            with two different answers (logged, and printed by :meth:`to_text`).
    """

    accuracy: dict[str, float]
    chance: float
    records: int
    groups: int
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    unscored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": {k: round(v, 4) for k, v in self.accuracy.items()}, "chance": round(self.chance, 4),
                "records": self.records, "groups": self.groups, "unscored": self.unscored}

    def to_text(self) -> str:
        parts = [f"{name} tokens {100 * acc:.1f}%" for name, acc in self.accuracy.items()]
        return (f"linear probe on {self.records} held-out answers ({self.groups} questions): " + ", ".join(parts)
                + f" (majority answer {100 * self.chance:.1f}%)"
                + (f"; {self.unscored} held-out records unscored (no training records of their question "
                   "with two answers)" if self.unscored else ""))


@torch.no_grad()
def visual_features(model: Any, images: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Visual tokens of each image, flattened per feature set.

    Args:
        model: A :class:`~monkeytune.model.monkey.MonkeyForCausalLM` (any grid).
        images: Image paths.

    Returns:
        ``{"windows": [N, W * Q * D], "global": [N, Q * D]}`` float32 on the CPU (``windows``
        only when the model has windows; ``W`` windows, ``Q`` queries, ``D`` the output width).
    """
    from monkeytune.vision.processor import ImageProcessor

    processor = ImageProcessor(model.config.image)
    views = processor.num_views
    rows, cols = model.config.image.grid
    windows = rows * cols
    model.eval()
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        pixels, slots = processor.batch(chunk)
        tokens = model.encode_images(pixels.to(model.device, model.dtype), slots.to(model.device))
        tokens = tokens.float().cpu().view(len(chunk), views, -1)  # [B, V, Q * D]
        if windows:
            out["windows"].append(tokens[:, :windows].flatten(1))
        if model.config.image.global_view:
            out["global"].append(tokens[:, -1])
    return {name: torch.cat(parts) for name, parts in out.items()}


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3,
                     steps: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features.

    Args:
        x: ``[N, F]`` features.
        y: ``[N]`` class indices in ``[0, classes)``.
        l2: Weight of the squared-norm penalty (mean loss scale).

    Returns:
        ``(mean [F], std [F], weight [F + 1, classes])``: predict with
        ``cat([(x - mean) / std, 1]) @ weight``.
    """
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], dim=1).double()
    weight = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    # Ten curvature pairs, as scipy's L-BFGS-B keeps: torch's default of 100 makes each step's
    # two-loop recursion 10x longer and took most of a fit's time, for the same accuracy.
    opt = torch.optim.LBFGS([weight], max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight, y) + l2 * weight[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, weight.detach().float()


def predict_linear_probe(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class indices ``[N]`` of ``x`` ``[N, F]`` under a probe from :func:`fit_linear_probe`."""
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], dim=1)
    return (z @ weight).argmax(dim=1)


def _label(record: dict[str, Any], where: str) -> str:
    answer = record.get("answer")
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if not isinstance(answer, str):
        raise ProbeError(f"{where}: question {record.get('question_id')!r} has no reference answer to probe for")
    return answer.strip()


def probe(model: Any, train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]] | None = None,
          folds: int = 5, limit: int | None = None, group: Callable[[dict], str] | None = None,
          steps: int = 100) -> ProbeResult:
    """Fit probes on ``train`` records and score them on ``test`` (or by ``folds``-fold cross-validation).

    Args:
        model: The model whose visual tokens are probed (kept frozen).
        train, test: Records with ``image``, ``question`` and ``answer`` (as
            :func:`~monkeytune.eval.runner.read_eval_records` returns them).
        folds: Cross-validation folds when ``test`` is None.
        limit: Use at most this many records of each file (the first ones).
        group: The probe a record belongs to (default: its question text); records of one group
            must ask the same thing of different images.
        steps: L-BFGS iterations of each probe fit.

    Raises:
        ProbeError: no usable records, or no question with two answers in its training records.
    """
    train = [r for r in train if r.get("image")][:limit]
    test = None if test is None else [r for r in test if r.get("image")][:limit]
    if not train or (test is not None and not test):
        raise ProbeError("the probe needs records with an image and an answer")
    images = sorted({r["image"] for r in train} | ({r["image"] for r in test} if test else set()))
    feats = visual_features(model, images)
    row = {image: i for i, image in enumerate(images)}
    if test is None:
        splits = [([r for i, r in enumerate(train) if i % folds != k],
                   [r for i, r in enumerate(train) if i % folds == k]) for k in range(folds)]
    else:
        splits = [(list(train), list(test))]
    key = group or (lambda r: r["question"])
    correct: dict[str, int] = defaultdict(int)
    majority = scored = 0
    group_correct: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    group_scored: dict[str, int] = defaultdict(int)
    for fit_records, held_out in splits:
        by_question: dict[str, list[dict]] = defaultdict(list)
        for r in fit_records:
            by_question[key(r)].append(r)
        for question, recs in by_question.items():
            targets = [r for r in held_out if key(r) == question]
            labels = sorted({_label(r, "train") for r in recs})
            if not targets or len(labels) < 2:
                continue  # nothing to score, or nothing to tell apart
            index = {a: i for i, a in enumerate(labels)}
            y = torch.tensor([index[_label(r, "train")] for r in recs])
            truth = [index.get(_label(r, "test"), -1) for r in targets]  # an unseen answer counts wrong
            counts = torch.bincount(y, minlength=len(labels))
            majority += sum(t == int(counts.argmax()) for t in truth)
            scored += len(targets)
            group_scored[question] += len(targets)
            for name, x in feats.items():
                mean, std, weight = fit_linear_probe(x[[row[r["image"]] for r in recs]], y, len(labels), steps=steps)
                pred = predict_linear_probe(x[[row[r["image"]] for r in targets]], mean, std, weight)
                hits = sum(int(p) == t for p, t in zip(pred.tolist(), truth))
                correct[name] += hits
                group_correct[question][name] += hits
    unscored = sum(len(held) for _, held in splits) - scored
    if unscored:
        logger.warning("probe: %d held-out records unscored: no training records of their question with two answers",
                       unscored)
    if not scored:
        raise ProbeError("no question has two different answers in the training records and held-out records to score")
    per_group = {q: {name: group_correct[q][name] / n for name in feats} for q, n in group_scored.items()}
    return ProbeResult({name: correct[name] / scored for name in feats}, majority / scored, scored, len(per_group),
                       per_group, unscored)


def probe_files(model_dir: str | Path, data: str | Path, test: str | Path | None = None, folds: int = 5,
                limit: int | None = None, dtype: str = "auto", device: str | None = None) -> ProbeResult:
    """:func:`probe` on a model folder and evaluation (or training) files (no tokenizer needed)."""
    from monkeytune.generate import DTYPES
    from monkeytune.model.io import load_model

    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(model_dir, dtype=DTYPES[dtype], device=device)
    return probe(model, read_eval_records(data), read_eval_records(test) if test else None, folds=folds, limit=limit)
