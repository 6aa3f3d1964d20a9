"""Grounded vision warm-up: teach a fresh vision tower and resampler what the windows show, before step 1.

Trained from scratch through the LLM, the vision path only learns what the language loss reaches
while the LLM cannot yet tell which window a question is about. Details that need the *shape* of
what a window shows (a handwritten digit) are never learnt that way: the resampler settles on
what every token can carry (a colour) and a probe of the window tokens stays at chance.

When the training records say which window holds the answer (a top-level ``"window"`` field, the
row-major index of the grid window; 0 is the top-left), the warm-up trains the tower, its
per-window adapters and the resampler directly on that. For ``vision_warmup.steps`` steps a
linear head reads the named window's visual tokens and learns, by cross-entropy, the record's
answer among the answers its question takes in the data: a window answers "which colour?" and
"which digit?" alike, and one unconditioned head would have to give both. A question seen with a
single answer (free-form data) is scored against every answer. AdamW runs at the section's rates,
decayed to zero on a cosine over the steps.

The head reads the *mean* of the window's RMS-normalised tokens, because that is what the LLM
can read later: its attention forms a weighted mean of the tokens it attends to, so a detail the
mean does not carry would stay out of reach. The head is thrown away afterwards; the model's
weights are all the warm-up leaves.

A model without windows (the single-view baseline) warms its one view, the global view, on the
same records. Records without ``"window"`` are counted and not used.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monkeytune.train.config import VisionWarmupSection

logger = logging.getLogger(__name__)

WINDOW_FIELD = "window"
# Processed views kept in memory (float16) so each image is decoded and cut once, not every time
# it is drawn: the demo's 6000 windows take 450 MiB. Past this, views are processed when drawn.
VIEW_CACHE_BYTES = 2 * 2**30


class VisionWarmupError(ValueError):
    """Data or a model the warm-up cannot use; the message names the file, line and field."""


@dataclass
class WindowExample:
    """One record the warm-up uses: an image, the view that holds the answer, the question, the answer."""

    image: Any  # monkeytune.data.messages.ImageRef
    window: int
    question: str
    answer: str


@dataclass
class VisionWarmupResult:
    """What the warm-up did.

    Attributes:
        examples: Records used.
        skipped: Records without a ``window`` field.
        answers: Distinct answers the head told apart.
        curve: ``[(step, mean loss, accuracy)]`` over each logging interval.
        seconds: Wall time.
    """

    examples: int
    skipped: int
    answers: int
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "skipped": self.skipped, "answers": self.answers,
                "curve": [{"step": s, "loss": round(lo, 4), "accuracy": round(a, 4)} for s, lo, a in self.curve],
                "seconds": round(self.seconds, 1)}


def window_examples(samples: Sequence[Any], windows: int) -> tuple[list[WindowExample], int]:
    """The records that name a window, checked.

    Args:
        samples: Validated :class:`~monkeytune.data.messages.Sample` objects.
        windows: Windows of the model's grid (0 for a single-view model: every example then
            uses the global view, whatever window it names).

    Returns:
        ``(examples, skipped)``: ``skipped`` counts the samples without the field.

    Raises:
        VisionWarmupError: a ``window`` that is not an index of the grid, or a record whose first
            message does not hold exactly one image, naming the file, line and field.
    """
    examples, skipped = [], 0
    for s in samples:
        if WINDOW_FIELD not in s.extra:
            skipped += 1
            continue
        value = s.extra[WINDOW_FIELD]
        where = f"{s.file}:{s.line}: field '{WINDOW_FIELD}'"
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VisionWarmupError(f"{where}: expected the row-major index of a grid window (0 is the "
                                    f"top-left), got {value!r}")
        if windows and value >= windows:
            raise VisionWarmupError(f"{where}: the model has {windows} windows (0..{windows - 1}), got {value}")
        images = s.turns[0].images
        if len(images) != 1:
            raise VisionWarmupError(f"{where}: a record that names a window needs exactly one image in its "
                                    f"first message, this one has {len(images)}")
        examples.append(WindowExample(images[0], value if windows else -1, s.turns[0].plain_text.strip(),
                                      s.turns[1].plain_text.strip()))
    return examples, skipped


def window_readout(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, Q, D]`` visual tokens -> ``[N, D]``: the mean of the RMS-normalised tokens."""
    return F.rms_norm(tokens.float(), (tokens.shape[-1],)).mean(1)


def warm_up_vision(model: nn.Module, examples: Sequence[WindowExample], settings: VisionWarmupSection, seed: int,
                   log_every: int = 50,
                   progress: Callable[[int, float, float], None] | None = None) -> VisionWarmupResult:
    """Train ``model.vision`` and ``model.resampler`` to tell the examples' answers apart from the named view.

    Args:
        model: A :class:`~monkeytune.model.monkey.MonkeyForCausalLM` in fp32.
        examples: From :func:`window_examples` (at least one).
        settings: Steps, batch size and rates (the run config's ``vision_warmup`` section).
        seed: Seed of the head's initialisation and of the record order.
        log_every: Steps per point of the curve.
        progress: Called as ``progress(step, loss, accuracy)`` at each point of the curve.

    Returns:
        :class:`VisionWarmupResult`. The model's other weights are untouched and nothing else is kept.
    """
    from monkeytune.data.views import ViewCache, open_image
    from monkeytune.vision.processor import ImageProcessor

    if not examples:
        raise VisionWarmupError("no training record names a window")
    start = time.perf_counter()
    answers = sorted({e.answer for e in examples})
    index = {a: i for i, a in enumerate(answers)}
    labels = torch.tensor([index[e.answer] for e in examples])
    questions: dict[str, int] = {}
    asked = torch.tensor([questions.setdefault(e.question, len(questions)) for e in examples])
    allowed = torch.zeros(len(questions), len(answers), dtype=torch.bool)  # the answers each question takes
    allowed[asked, labels] = True
    allowed[allowed.sum(1) < 2] = True
    processor = ImageProcessor(model.config.image)
    cache = ViewCache(VIEW_CACHE_BYTES)
    wanted: dict[str, set[int]] = {}
    for e in examples:
        wanted.setdefault(e.image.source, set()).add(e.window)

    def view(example: WindowExample) -> torch.Tensor:
        cached = cache.get((example.image.source, example.window))
        if cached is not None:
            return cached[0]
        views = processor(open_image(example.image, model.config.image.max_pixels)).views
        # Keep every view of this image that some record asks about: each image is decoded once.
        # Window -1 is the global view, the last one. float16 keeps the detail: its steps are
        # ~0.001 of the normalised range, a 1-level texture ~0.015.
        for window in sorted(wanted[example.image.source]):
            cache.put((example.image.source, window), views[window].to(torch.float16))
        return views[example.window].to(torch.float16)

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(model.config.vision.output_dim, len(answers))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    head.to(device)
    optimizer = torch.optim.AdamW([
        {"params": list(model.vision.parameters()), "lr": settings.vision_lr},
        {"params": list(model.resampler.parameters()) + list(head.parameters()), "lr": settings.lr},
    ], weight_decay=0.0)
    # Both rates decay to zero on a cosine: the last steps settle the features instead of
    # jittering around them (on the demo's digits, +3 points of held-out probe accuracy at 600 steps).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: 0.5 * (1.0 + math.cos(math.pi * min(done, settings.steps) / settings.steps)))
    was_training = model.training
    model.train()
    curve, losses, hits, seen = [], 0.0, 0, 0
    for step in range(1, settings.steps + 1):
        idx = torch.randint(0, len(examples), (settings.batch_size,), generator=generator).tolist()
        pixels = torch.stack([view(examples[i]) for i in idx]).to(device, torch.float32)
        slots = torch.tensor([examples[i].window for i in idx])  # a window's adapter slot is its index
        logits = head(window_readout(model.encode_images(pixels, slots.to(device))))
        logits = logits.masked_fill(~allowed[asked[idx]].to(device), float("-inf"))
        target = labels[idx].to(device)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses += loss.item() * len(idx)
        hits += int((logits.argmax(1) == target).sum())
        seen += len(idx)
        if step % log_every == 0 or step == settings.steps:
            curve.append((step, losses / seen, hits / seen))
            if progress is not None:
                progress(*curve[-1])
            losses, hits, seen = 0.0, 0, 0
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return VisionWarmupResult(len(examples), 0, len(answers), curve, time.perf_counter() - start)
