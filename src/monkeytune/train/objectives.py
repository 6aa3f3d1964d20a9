"""What a micro-batch's loss is: ``train.objective`` picks the module the engine wraps.

* ``lm`` (default): the language-model loss on the answers,
  :class:`~monkeytune.train.step.TrainingModule`.
* ``window_answer``: a grounded vision objective for records that name the grid window holding
  their answer (a top-level ``"window"`` field, the row-major index; 0 is the top-left).
  :class:`WindowAnswerObjective` reads the named window's visual tokens and learns the record's
  answer from them with a linear head, training the tower, its adapters and the connector and
  nothing of the LLM (``policy.preset vision``). Run it as a short first stage before the
  language-model stage (``examples/from-scratch-two-stage/``): a fresh vision path trained only
  through a fresh LLM learns what every token can carry (a colour) and never a shape (a digit),
  because the LLM cannot yet tell which window a question is about.

Both run in the same loop, through the same engine, precision, dataset and sampler: only the
loss and its count differ. :func:`build_training_module` is the one resolver.

**The window objective.** The head reads the *mean* of the window's RMS-normalised tokens,
because that is what the LLM can read later: its attention forms a weighted mean of the tokens
it attends to, so a detail the mean does not carry would stay out of reach. A record's answer is
scored among the answers its question takes in the data (a window answers "which colour?" and
"which digit?" alike, and one unconditioned head would have to give both); a question seen with a
single answer (free-form data) is scored against every answer. The loss of a micro-batch is the
sum of its records' cross-entropies, divided by the step's records on all ranks, as the language
loss is divided by its tokens. The head is not part of the model: the final folder holds the
model alone. Records without ``"window"`` are counted at set-up and weigh nothing. A model
without windows (a single-view baseline) reads its one view, the global view.

The answer table (which answers each question takes) is built at set-up from the dataset's own
records, in one pass over their text (no image is opened); every rank builds the same table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monkeytune.train.config import OBJECTIVES
from monkeytune.train.setup import SetupError
from monkeytune.train.step import StepCounts, TrainingModule

__all__ = ["OBJECTIVES", "WINDOW_FIELD", "WindowAnswerObjective", "WindowTable", "build_training_module",
           "window_readout", "window_table"]

logger = logging.getLogger(__name__)

WINDOW_FIELD = "window"


@dataclass
class WindowTable:
    """What the window objective knows of each record, by dataset index.

    Attributes:
        window: ``[N]`` the named window (-1: the record names none and weighs nothing).
        images: ``[N]`` images of the record (its views come first in the item, then the rest).
        question: ``[N]`` the question's id. answer: ``[N]`` the answer's id.
        answers: The distinct answers, by id.
        allowed: ``[questions, answers]`` bool, the answers each question is scored among.
        skipped: Records without the field.
    """

    window: np.ndarray
    images: np.ndarray
    question: np.ndarray
    answer: np.ndarray
    answers: list[str]
    allowed: torch.Tensor
    skipped: int


def window_table(dataset: Any, windows: int) -> WindowTable:
    """The window objective's table, from one pass over ``dataset.samples`` (text only).

    Args:
        dataset: A :class:`~monkeytune.data.dataset.ConversationDataset`.
        windows: Windows of the model's grid (0: a single-view model, which reads the global
            view whatever window a record names).

    Raises:
        SetupError: a ``window`` that is not an index of the grid, a record naming a window
            whose first message does not hold exactly one image, or no record naming a window.
    """
    n = len(dataset.samples)
    window = np.full(n, -1, dtype=np.int16)
    images = np.zeros(n, dtype=np.int16)
    question = np.zeros(n, dtype=np.int32)
    answer = np.zeros(n, dtype=np.int32)
    questions: dict[str, int] = {}
    answers: dict[str, int] = {}
    for i in range(n):
        s = dataset.samples[i]
        images[i] = sum(len(t.images) for t in s.turns)
        if WINDOW_FIELD not in s.extra:
            continue
        value = s.extra[WINDOW_FIELD]
        where = f"{s.file}:{s.line}: field '{WINDOW_FIELD}'"
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SetupError(f"{where}: expected the row-major index of a grid window (0 is the top-left), "
                             f"got {value!r}")
        if windows and value >= windows:
            raise SetupError(f"{where}: the model has {windows} windows (0..{windows - 1}), got {value}")
        if len(s.turns[0].images) != 1:
            raise SetupError(f"{where}: a record that names a window needs exactly one image in its first "
                             f"message, this one has {len(s.turns[0].images)}")
        window[i] = value
        question[i] = questions.setdefault(s.turns[0].plain_text.strip(), len(questions))
        answer[i] = answers.setdefault(s.turns[1].plain_text.strip(), len(answers))
    named = window >= 0
    if not named.any():
        raise SetupError(f"no record of {', '.join(dataset.paths)} has a '{WINDOW_FIELD}' field")
    allowed = torch.zeros(len(questions), len(answers), dtype=torch.bool)
    allowed[torch.from_numpy(question[named]).long(), torch.from_numpy(answer[named]).long()] = True
    allowed[allowed.sum(1) < 2] = True
    return WindowTable(window, images, question, answer, list(answers), allowed, int((~named).sum()))


def window_readout(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, Q, D]`` visual tokens -> ``[N, D]``: the mean of the RMS-normalised tokens."""
    return F.rms_norm(tokens.float(), (tokens.shape[-1],)).mean(1)


class WindowAnswerObjective(TrainingModule):
    """The model plus a linear head that learns each record's answer from its named window.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
        table: From :func:`window_table` on the run's dataset.
        seed: Seed of the head's initialisation.
    """

    def __init__(self, model: nn.Module, table: WindowTable, seed: int):
        super().__init__(model)
        self.table = table
        image = model.config.image
        self.windows, self.views = image.num_windows, image.num_windows + int(image.global_view)
        self.head = nn.Linear(model.config.vision.output_dim, len(table.answers))
        with torch.random.fork_rng(devices=[]):  # the model's own draws do not move
            torch.manual_seed(seed)
            self.head.reset_parameters()
        self.head.to(next(model.parameters()).device)
        # One blank view per adapter slot and the global view, weighted 0: every micro-batch runs
        # the tower the same way on every rank, whichever windows its records name (the engines
        # need the same calls and every trained weight used, as for a batch without images).
        slots = list(range(model.config.vision.lora_slots if self.windows else 0))
        self._blank_slots = torch.tensor(slots + [-1])

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _rows(self, batch: dict[str, Any]) -> tuple[list[int], list[int]]:
        """``(views, records)``: the batch position of each named view and its record's index."""
        views, records, offset = [], [], 0
        for index in batch["indices"]:
            w = int(self.table.window[index])
            if w >= 0:
                views.append(offset + (w if self.windows else self.views - 1))
                records.append(index)
            offset += int(self.table.images[index]) * self.views
        return views, records

    def counts(self, batch: dict[str, Any], per_sample: bool) -> StepCounts:
        """One target per record that names a window (``per_token`` and ``per_sample`` agree);
        the metrics' ``tokens`` and ``tokens_per_s`` count those records."""
        n = len(self._rows(batch)[1])
        return StepCounts(targets=n, samples=n, tokens=n, head_calls=0, weights=None)

    def forward(self, batch: dict[str, Any], token_weights: torch.Tensor | None = None,
                loss_chunks: int | None = None) -> torch.Tensor:
        """Cross-entropy sum of the batch's records that name a window (a float32 scalar)."""
        views, records = self._rows(batch)
        pixels, slots = batch["pixel_values"], batch["view_slots"].cpu()
        image = self.model.config.image
        blank = torch.zeros(len(self._blank_slots), 3, image.window_size, image.window_size,
                            dtype=pixels.dtype, device=pixels.device)
        pick = torch.tensor(views, dtype=torch.long)
        tokens = self.model.encode_images(torch.cat([pixels[pick.to(pixels.device)], blank]),
                                          torch.cat([slots[pick], self._blank_slots]))
        idle = tokens[len(views):].sum().float() * 0.0
        if not views:
            return idle
        logits = self.head(window_readout(tokens[: len(views)]))
        rows = np.asarray(records)
        allowed = self.table.allowed[torch.from_numpy(self.table.question[rows]).long()].to(logits.device)
        target = torch.from_numpy(self.table.answer[rows]).long().to(logits.device)
        loss = F.cross_entropy(logits.float().masked_fill(~allowed, float("-inf")), target, reduction="sum")
        return loss + idle


def build_training_module(cfg: Any, model: nn.Module, dataset: Any) -> TrainingModule:
    """The module the engine wraps for ``cfg.train.objective`` (see the module's notes).

    Raises:
        SetupError: the objective cannot run on this model or data.
    """
    objective = cfg.train.objective
    if objective == "lm":
        return TrainingModule(model)
    llm_trains = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    if llm_trains:
        raise SetupError(f"train.objective window_answer trains the vision path only, but the policy trains "
                         f"{len(llm_trains)} LLM tensors (e.g. llm.{llm_trains[0]}): use policy.preset vision")
    table = window_table(dataset, model.config.image.num_windows)
    logger.info("window_answer objective: %d records name a window (%d do not and weigh nothing), %d answers",
                int((table.window >= 0).sum()), table.skipped, len(table.answers))
    return WindowAnswerObjective(model, table, cfg.train.seed)
