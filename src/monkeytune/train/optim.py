"""AdamW over the policy's parameter groups and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from monkeytune.policy import DEFAULT_NO_DECAY, build_param_groups
from monkeytune.train.config import OptimSection


def build_optimizer(
    model: nn.Module,
    optim: OptimSection,
    lr_by_component: dict[str, float],
    no_decay: list[str],
    include_frozen: bool,
) -> torch.optim.AdamW:
    """AdamW with one group per (component, decay) pair.

    Args:
        model: The bare model with ``requires_grad`` set by the policy.
        optim: The ``optim`` section (``lr`` is the default for unlisted components).
        lr_by_component: ``policy.lr`` overrides per component or alias.
        no_decay: Extra no-decay patterns on top of the policy's defaults.
        include_frozen: Hold frozen parameters too (needed when unfreezing stages exist, so the
            groups never change and saved optimizer states always load).
    """
    lrs = {"default": float(optim.lr), **{k: float(v) for k, v in lr_by_component.items()}}
    groups = build_param_groups(
        model, lrs, weight_decay=optim.weight_decay,
        no_decay_patterns=tuple(DEFAULT_NO_DECAY) + tuple(no_decay), include_frozen=include_frozen,
    )
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def warmup_steps(optim: OptimSection, total_steps: int) -> int:
    """``optim.warmup_steps`` if set, else ``ceil(warmup_ratio * total_steps)``."""
    if optim.warmup_steps > 0:
        return min(optim.warmup_steps, total_steps)
    return math.ceil(optim.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int):
    """Linear warmup, then cosine or linear decay to zero, or a constant rate."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warm = warmup_steps(optim, total_steps)
    if optim.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warm, total_steps)
    if optim.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warm, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warm)
