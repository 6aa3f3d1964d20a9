"""Loss normalisation over a whole optimizer step, and the module the training engine wraps.

An optimizer step sees ``G`` micro-batches on each of ``W`` ranks. Averaging per-micro-batch
means ("mean of means") would weigh a token in a short micro-batch more than one in a long
micro-batch, and would change with ``G``, ``W`` and packing. Instead every micro-batch contributes
its loss *sum* divided by a count taken over the whole step on all ranks:

* ``per_token`` (default): ``sum of token losses / supervised tokens of the step``. Every
  supervised token weighs the same, whatever batch, rank or packed row it sits in.
* ``per_sample``: each sample's mean token loss, averaged over the samples of the step.
  Every sample weighs the same, however long its answer.

Counts come from the labels before the forward pass and are summed across ranks with one
all-reduce per step, so the gradient equals that of a single process holding the whole step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monkeytune.data.collate import model_inputs
from monkeytune.model.loss import IGNORE_INDEX


def supervised_count(labels: torch.Tensor) -> int:
    """Targets after the model's shift: ``(labels[:, 1:] != -100).sum()``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sample_weights(labels: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Per-target weights ``1 / (targets of its sample)`` and the number of samples with targets.

    A sample starts wherever ``position_ids`` is 0 (each row, and each packed sample, restarts
    there); without ``position_ids`` every row is one sample.

    Args:
        labels: ``[B, T]``.
        position_ids: ``[B, T]`` or None.

    Returns:
        ``(weights [B, T] float32, samples)``: ``weights[b, t]`` weighs the target
        ``labels[b, t]`` (0 where unsupervised).
    """
    b, t = labels.shape
    if position_ids is None:
        starts = torch.zeros_like(labels, dtype=torch.bool)
        starts[:, 0] = True
    else:
        starts = position_ids == 0
        starts[:, 0] = True
    seg = torch.cumsum(starts.reshape(-1).long(), 0) - 1  # [B*T] sample id of each position
    target = labels != IGNORE_INDEX
    target[:, 0] = False  # the first position of a row is never a target (nothing precedes it)
    flat = target.reshape(-1)
    counts = torch.bincount(seg[flat], minlength=int(seg[-1]) + 1).float()
    weights = torch.zeros(b * t, dtype=torch.float32)
    weights[flat] = 1.0 / counts[seg[flat]]
    return weights.view(b, t), int((counts > 0).sum())


class TrainingModule(nn.Module):
    """What the engine wraps (DDP/FSDP/DeepSpeed): the model plus the step's loss reduction.

    Wrapping this module rather than the model lets the per-sample loss run inside the wrapped
    forward, so data-parallel gradient hooks see every parameter use.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], token_weights: torch.Tensor | None = None,
                loss_chunks: int | None = None) -> torch.Tensor:
        """Loss sum of one micro-batch: plain, or weighted per target when ``token_weights`` is given.

        Args:
            batch: A collated batch (keys the model does not take are ignored).
            token_weights: ``[B, T]`` per-target weights for the per-sample loss, or None.
            loss_chunks: LM-head calls of the loss, the same on every rank (see
                :func:`~monkeytune.model.loss.supervised_loss`); None: the batch's own count.

        Returns:
            A float32 scalar to divide by the step's count and backpropagate.
        """
        inputs = model_inputs(batch)
        return self.model(**inputs, token_weights=token_weights, loss_chunks=loss_chunks).loss_sum
