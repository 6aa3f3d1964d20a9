"""AdamW over the policy's parameter groups and the warmup + decay schedule.

``optim.name`` picks the AdamW implementation (transformers' ``optim`` names):

* ``adamw_torch``: ``torch.optim.AdamW``, fp32 first and second moments (8 bytes per trained
  parameter); its fused kernel when every parameter is on a CUDA GPU (:func:`use_fused_adamw`).
* ``adamw_bnb_8bit``: ``bitsandbytes.optim.AdamW8bit``. Both moments are stored in 8 bits with
  one fp32 scale per block of 256 values (2.03 bytes per parameter); tensors under 4096 elements
  keep fp32 moments, as bitsandbytes does. Runs on CUDA and on CPUs (bitsandbytes' CPU backend).
* ``paged_adamw_8bit``: ``bitsandbytes.optim.PagedAdamW8bit``, the same states in CUDA unified
  memory, which the driver pages to host memory when the GPU runs short. CUDA only: on a CPU
  bitsandbytes only warns and runs unpaged, so monkeytune refuses it instead.

The 8-bit optimizers step plain tensors, one parameter at a time: they are refused under
FSDP2 (its parameters are sharded ``DTensor`` s) and DeepSpeed (which steps its own flat fp32
partitions, where bitsandbytes' blockwise kernels are reported failing), so they run single-process or under
DDP. Their state saves and loads through ``state_dict`` like AdamW's, so checkpoints resume.
"""

from __future__ import annotations

import importlib.util
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
    extra: list[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (``optim.name`` says which implementation) with one group per (component, decay) pair.

    Args:
        model: The bare model with ``requires_grad`` set by the policy.
        optim: The ``optim`` section (``lr`` is the default for unlisted components).
        lr_by_component: ``policy.lr`` overrides per component or alias.
        no_decay: Extra no-decay patterns on top of the policy's defaults.
        include_frozen: Hold frozen parameters too (needed when unfreezing stages exist, so the
            groups never change and saved optimizer states always load).
        extra: Parameters of the training objective outside the model (a head), in a group of
            their own (component ``objective``) at ``optim.lr``, without weight decay.
    """
    lrs = {"default": float(optim.lr), **{k: float(v) for k, v in lr_by_component.items()}}
    groups = build_param_groups(
        model, lrs, weight_decay=optim.weight_decay,
        no_decay_patterns=tuple(DEFAULT_NO_DECAY) + tuple(no_decay), include_frozen=include_frozen,
    )
    if extra:
        groups.append({"params": list(extra), "lr": float(optim.lr), "base_lr": float(optim.lr), "weight_decay": 0.0,
                       "name": "objective", "component": "objective"})
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    if optim.name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=use_fused_adamw(groups) or None)
    reason = optimizer_unavailable_reason(optim.name)
    if reason:
        raise OptimizerUnavailable(reason)
    import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency

    cls = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim.name]
    # weight_decay is set per group by build_param_groups; bitsandbytes reads it from the groups.
    return cls(groups, lr=optim.lr, betas=betas, eps=optim.eps)


def use_fused_adamw(groups: list[dict]) -> bool:
    """Whether AdamW can step every parameter of ``groups`` with its fused kernel: all on CUDA.

    The fused kernel updates each tensor in one launch and needs no temporary; the default
    (foreach) path holds a temporary the size of the trained parameters during the step.
    On a CPU the default stays, as the CPU results were measured with it.
    """
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


class OptimizerUnavailable(ValueError):
    """``optim.name`` asks for an optimizer this machine or engine cannot run."""


def optimizer_unavailable_reason(name: str, engine: str = "single", device_type: str | None = None) -> str | None:
    """Why optimizer ``name`` cannot run here, or ``None`` when it can.

    Args:
        name: ``optim.name``.
        engine: The training engine (``single``, ``ddp``, ``fsdp2``, ``deepspeed-zero2/3``).
        device_type: ``cuda`` or ``cpu``: where the parameters are (default: ``cuda`` when a
            CUDA GPU is visible).

    Returns:
        A one-line reason naming the setting to change.
    """
    if name == "adamw_torch":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"optim.name {name} needs the bitsandbytes package, which is not installed: pip install "
                "bitsandbytes (or the quant extra), or set optim.name adamw_torch")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("paged_") and device_type != "cuda":
        return (f"optim.name {name} pages its states through CUDA unified memory and needs a CUDA GPU "
                f"(this run is on {device_type}); use adamw_bnb_8bit")
    if engine == "fsdp2" or engine.startswith("deepspeed"):
        return (f"optim.name {name} is not supported under {engine} (bitsandbytes steps plain per-parameter "
                "tensors, not sharded DTensors or DeepSpeed's flat partitions): run single-process or DDP, "
                "or set optim.name adamw_torch")
    return None


def lr_warmup_steps(optim: OptimSection, total_steps: int) -> int:
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

    warm = lr_warmup_steps(optim, total_steps)
    if optim.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warm, total_steps)
    if optim.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warm, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warm)
