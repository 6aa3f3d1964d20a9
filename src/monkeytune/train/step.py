"""One optimizer step, top to bottom.

step counts -> forward -> backward -> clip -> step -> schedule -> log -> checkpoint

One step is ``grad_accum`` micro-batches on every process. Their supervised-token (or
sample) counts are summed over all ranks first, and each micro-batch then backpropagates
``loss_sum / step_count``, so the update is the same whatever the split into micro-batches
and processes (see below). Everything that differs between engines
(DDP, FSDP2, DeepSpeed, the fp16 loss scaler) sits behind :class:`~monkeytune.train.engine.Engine`.

**Loss normalisation over a whole optimizer step.**

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

:class:`TrainingModule` is what the engine wraps: the model and this reduction.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from monkeytune.data.collate import model_inputs
from monkeytune.model.loss import IGNORE_INDEX, loss_chunk_count
from monkeytune.train.checkpoint import CheckpointManager
from monkeytune.train.config import TrainConfig
from monkeytune.train.engine import Engine
from monkeytune.train.final import assert_finite
from monkeytune.train.metrics import MetricsLog, Progress
from monkeytune.train.sampler import Position
from monkeytune.train.state import ever_trained_names, write_checkpoint

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


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


@dataclass
class StepCounts:
    """What one micro-batch adds to its step's counts (summed over the step's micro-batches and ranks).

    Attributes:
        targets: Supervised targets (the ``per_token`` divisor).
        samples: Samples with targets (the ``per_sample`` divisor).
        tokens: Tokens read (for ``tokens_per_s``).
        head_calls: LM-head calls of the loss (every rank makes the step's most).
        weights: ``[B, T]`` per-target weights of the ``per_sample`` loss, or None.
    """

    targets: int
    samples: int
    tokens: float
    head_calls: int
    weights: torch.Tensor | None


class TrainingModule(nn.Module):
    """What the engine wraps (DDP/FSDP/DeepSpeed): the model plus the step's loss reduction.

    Wrapping this module rather than the model lets the per-sample loss run inside the wrapped
    forward, so data-parallel gradient hooks see every parameter use. This is the language-model
    objective (``train.objective lm``); :mod:`monkeytune.train.objectives` has the others.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective trains beside the model's (none here); not saved with the model."""
        return []

    def counts(self, batch: dict[str, Any], per_sample: bool) -> StepCounts:
        """The micro-batch's counts, read from its labels before the forward pass."""
        labels = batch["labels"]
        weights, samples = sample_weights(labels, batch.get("position_ids"))
        tokens = float(batch["seq_lens"].sum()) if "seq_lens" in batch else batch["input_ids"].numel()
        return StepCounts(supervised_count(labels), samples, tokens, loss_chunk_count(labels),
                          weights if per_sample else None)

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


@dataclass
class StepContext:
    """What a step reads and updates; built once by :func:`monkeytune.train.loop.train`."""

    cfg: TrainConfig
    engine: Engine
    model: Any  # the bare model (weights, names, finiteness checks)
    objective: TrainingModule  # the bare module the engine wraps (the step's counts)
    scheduler: Any
    schedule: Any  # the unfreezing schedule
    stage_index: int
    sharded: bool
    metrics: MetricsLog
    progress: Progress
    checkpoints: CheckpointManager
    batches_per_epoch: int
    total_steps: int
    send_to_device: Callable
    fingerprint: dict[str, Any]  # stored in each checkpoint; a resume must match it
    bad_steps: int = 0
    last_checkpoint: Path | None = None
    t_last: float = field(default_factory=time.perf_counter)

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)


def run_step(ctx: StepContext, step: int, micro: list[tuple[Position, dict[str, Any]]]) -> dict[str, Any]:
    """Run optimizer step ``step`` (1-based) on ``micro`` (its ``grad_accum`` micro-batches, each with the data position after it).

    Returns:
        The step's metrics row (``loss`` is ``nan`` for a skipped step).

    Raises:
        TrainingError: after ``train.max_bad_steps`` consecutive non-finite steps.
    """
    cfg, engine, acc = ctx.cfg, ctx.engine, ctx.engine.accelerator
    batches = [b for _, b in micro]
    position = micro[-1][0]
    per_sample = cfg.train.loss_norm == "per_sample"

    # Step counts: supervised targets (or samples) of the whole step, over every rank, and the
    # LM-head calls of each micro-batch, the most any rank needs (one gather for both): a
    # sharded head is gathered at every call, so every rank must make the same number.
    weights, counts = [], torch.zeros(3 + len(batches), dtype=torch.float64)
    for i, b in enumerate(batches):
        c = ctx.objective.counts(b, per_sample)
        counts[0] += c.targets
        counts[1] += c.samples
        counts[2] += c.tokens
        counts[3 + i] = c.head_calls
        weights.append(c.weights)
    counts = acc.gather(counts.to(acc.device)).view(acc.num_processes, -1).cpu()
    totals, head_calls = counts[:, :3].sum(0), counts[:, 3:].amax(0).long().tolist()
    denom = float(totals[1] if per_sample else totals[0])
    # The engine divides by grad_accum and averages over processes; undo both so each
    # micro-batch contributes exactly objective_sum / (count over the whole step).
    scale = cfg.train.grad_accum * acc.num_processes / max(denom, 1.0)

    # Forward and backward, one micro-batch at a time.
    engine.module.train()
    objective = torch.zeros((), dtype=torch.float64, device=acc.device)
    for batch, w, calls in zip(batches, weights, head_calls):
        batch = ctx.send_to_device(batch, acc.device, non_blocking=True)  # pinned batches copy asynchronously
        with engine.accumulate():
            out = engine.module(batch, None if w is None else w.to(acc.device), loss_chunks=calls)
            objective += out.detach().double()
            engine.backward(out * scale)
    loss = float(acc.reduce(objective, reduction="sum")) / max(denom, 1.0)

    # Clip.
    norm = engine.clip_grad_norm(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
    reason = None
    if not math.isfinite(loss):
        reason = f"loss is {loss}"
    elif not math.isfinite(norm) and not engine.updates_in_backward:
        reason = f"gradient norm is {norm}"
    bad = reason is not None
    if denom == 0 and not bad:
        reason = "no supervised tokens in the step"

    # Step (unless the step is bad or empty; the engine may skip it too) and schedule.
    lr = max(g["lr"] for g in ctx.inner_optimizer.param_groups)  # the rate this step uses
    lrs = component_lrs(ctx.inner_optimizer)
    if bad and engine.updates_in_backward:
        # DeepSpeed has already applied this update inside backward: it cannot be skipped, and
        # the weights may now hold NaN. Stop with the last checkpoint intact.
        raise TrainingError(f"step {step}: {reason} under {engine.name}, which applies the update inside "
                            "backward, so the step cannot be skipped; stopping. Resume from the last checkpoint "
                            "with a lower optim.lr, or check the data.")
    skipped_by_engine = engine.optimizer_step(apply=reason is None)
    if skipped_by_engine:
        reason, bad = reason or skipped_by_engine, True
    # Under DeepSpeed a step without supervised tokens still updated (momentum, weight decay).
    applied = reason is None or (engine.updates_in_backward and not skipped_by_engine)
    if applied:
        ctx.scheduler.step()
    engine.zero_grad()

    # Log.
    now = time.perf_counter()
    row = {
        "step": step,
        "epoch": round(position.epoch + position.batch / ctx.batches_per_epoch, 4),
        "loss": loss, "lr": lr, **lrs,
        "grad_norm": norm if math.isfinite(norm) else None,
        "tokens": int(totals[0]), "samples": int(totals[1]),
        "tokens_per_s": round(float(totals[2]) / max(now - ctx.t_last, 1e-9), 1),
        "skipped": not applied,
    }
    ctx.t_last = now
    ctx.bad_steps = ctx.bad_steps + 1 if bad else 0
    if not applied:
        in_a_row = f" ({ctx.bad_steps} in a row)" if ctx.bad_steps else ""
        ctx.progress.write(f"step {step}: {reason}; step skipped" + in_a_row)
        logger.warning("step %d skipped: %s", step, reason)
        if ctx.bad_steps >= cfg.train.max_bad_steps:
            raise TrainingError(
                f"{ctx.bad_steps} consecutive steps had a non-finite loss or gradient (last: {reason}); "
                "stopping. Lower optim.lr, check the data, or use train.precision bf16/fp32."
            )
    if step % cfg.log.every == 0 or step == ctx.total_steps:
        ctx.metrics.log(row)
    ctx.progress.update(loss, lr, row["tokens_per_s"])

    # Checkpoint.
    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        state = {"step": step, "epoch": position.epoch, "batch": position.batch,
                 "stage": ctx.stage_index, "bad_steps": ctx.bad_steps,
                 "world_size": acc.num_processes, "micro_batch_size": cfg.train.micro_batch_size,
                 "grad_accum": cfg.train.grad_accum, "total_steps": ctx.total_steps}
        if position.stream is not None:
            from accelerate.utils import gather_object

            # Every rank's streams (rank 0 writes the file; each rank resumes from its entry).
            state["stream"] = gather_object([position.stream])
        ctx.last_checkpoint = save_checkpoint(ctx, state)
    return row


def component_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr/<component>": rate}`` of each component that trains (its decay and no-decay groups
    share one rate). The step's ``lr`` alone hides e.g. a resampler at 10x the LLM's rate."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        comp = group.get("component")
        # Frozen components sit in the optimizer too when unfreezing stages exist; they do not train.
        if comp and any(p.requires_grad for p in group["params"]):
            out[f"lr/{comp}"] = max(out.get(f"lr/{comp}", 0.0), float(group["lr"]))
    return out


def save_checkpoint(ctx: StepContext, state: dict[str, Any]) -> Path:
    """Write checkpoint ``state["step"]`` (refusing non-finite weights)."""
    step = state["step"]
    assert_finite(ctx.model, f"checkpoint at step {step}", ctx.engine.accelerator)
    names = ever_trained_names(ctx.model, ctx.schedule, step) if not ctx.sharded else []
    return ctx.checkpoints.save(step, lambda folder: write_checkpoint(
        folder, engine=ctx.engine, cfg=ctx.cfg, model=ctx.model, optimizer=ctx.inner_optimizer,
        scheduler=ctx.scheduler, names=names, state=state, sharded=ctx.sharded, fingerprint=ctx.fingerprint))
