"""Progressive unfreezing: stages that add rules (and lr multipliers) from a given step on.

Design, chosen for robustness under resume and DDP:

* **The stage is a pure function of the step.** Stage ``k`` is active for
  ``stages[k].start_step <= step < stages[k+1].start_step``; its plan is the base plan plus the
  rules of stages ``0..k`` (rules accumulate, later stages win). Resuming at any step therefore
  only needs ``apply_stage(model, optimizer, schedule.stage_at(step))``.
* **The optimizer holds every parameter from the start** (``build_param_groups(...,
  include_frozen=True)``). Frozen parameters have ``requires_grad=False`` and ``.grad is None``;
  ``torch.optim.AdamW`` skips such parameters completely (no moments, no weight decay), so they
  do not move. Unfreezing only flips ``requires_grad``; the param groups never change, so an
  optimizer state saved in any stage loads into a fresh optimizer. Freezing clears ``.grad`` so
  a later step cannot decay a frozen parameter.
* **DDP registers gradient hooks only for parameters that require grad when it wraps the
  model.** After a stage changes the trainable set, re-wrap with :func:`rewrap_ddp` (every rank
  changes stage at the same step, so the collective in the DDP constructor lines up). Checking
  consistency first with :func:`~monkeytune.policy.distributed.check_trainable_consistent` turns
  a rank mismatch into a clear error instead of a hang.
* lr multipliers scale each group's ``base_lr`` (set by ``build_param_groups``); when an LR
  scheduler is passed, its ``base_lrs`` are scaled too so its next ``step()`` keeps the stage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monkeytune.policy.components import expand_components, named_parameters
from monkeytune.policy.plan import TrainPlan, apply_plan, trainable_names
from monkeytune.policy.rules import PlanError, Rule, parse_rules


@dataclass(frozen=True)
class Stage:
    """One stage: from ``start_step`` on, add ``rules`` and use ``lr_multipliers``.

    Attributes:
        start_step: First optimizer step of the stage.
        rules: Rules appended to the plan (cumulatively with earlier stages).
        lr_multipliers: Multiplier per component key or alias; unnamed components use 1.0.
            Multipliers are not cumulative: each stage states its own.
    """

    start_step: int
    rules: tuple[Rule, ...] = ()
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StageState:
    """The resolved state at some step (see :meth:`UnfreezeSchedule.stage_at`).

    Attributes:
        index: Stage index, ``-1`` before the first stage (base plan only).
        start_step: Step the state began (0 for ``index == -1``).
        plan: Base plan plus the rules of all stages so far.
        lr_multipliers: Multiplier per component key (aliases expanded).
    """

    index: int
    start_step: int
    plan: TrainPlan
    lr_multipliers: dict[str, float]


@dataclass(frozen=True)
class StageChange:
    """What :func:`apply_stage` changed."""

    index: int
    newly_trainable: tuple[str, ...]
    newly_frozen: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Whether the trainable set changed (then a DDP wrapper must be rebuilt)."""
        return bool(self.newly_trainable or self.newly_frozen)


class UnfreezeSchedule:
    """Stages sorted by start step on top of a base plan.

    Example (YAML)::

        unfreeze:
          - {start_step: 500, rules: ["train: llm.model.layers.{24-31}.*"], lr_multipliers: {llm: 0.1}}
          - {at: 2000, train: ["llm.*"]}
    """

    def __init__(self, plan: TrainPlan, stages: list[Stage] | tuple[Stage, ...]):
        self.plan = plan
        self.stages = tuple(sorted(stages, key=lambda s: s.start_step))
        starts = [s.start_step for s in self.stages]
        if len(set(starts)) != len(starts):
            raise PlanError(f"unfreeze: two stages start at the same step ({starts})")
        if any(s < 0 for s in starts):
            raise PlanError(f"unfreeze: start_step must be >= 0, got {starts}")
        for i, s in enumerate(self.stages):
            for key in s.lr_multipliers:
                try:
                    expand_components(key, where=f"unfreeze[{i}].lr_multipliers")
                except ValueError as exc:
                    raise PlanError(str(exc)) from None

    @classmethod
    def from_config(cls, plan: TrainPlan, data: Any, source: str = "unfreeze") -> "UnfreezeSchedule":
        """Build from a list of stage mappings.

        Each stage has ``start_step`` (or its shorthand ``at``), optional ``rules`` (any rule
        form), optional ``train`` / ``freeze`` (a pattern or list of patterns, one rule each,
        applied after ``rules``: first the ``train`` ones, then the ``freeze`` ones) and optional
        ``lr_multipliers``. ``{at: 100, train: ["llm.*"]}`` equals
        ``{start_step: 100, rules: ["train: llm.*"]}``.
        """
        if data is None:
            return cls(plan, ())
        if not isinstance(data, (list, tuple)):
            raise PlanError(f"{source}: expected a list of stages, got {type(data).__name__}")
        stages = []
        for i, d in enumerate(data):
            where = f"{source}[{i}]"
            if not isinstance(d, dict):
                raise PlanError(f"{where}: a stage must be a mapping, got {d!r}")
            allowed = {"start_step", "at", "rules", "train", "freeze", "lr_multipliers"}
            bad = set(d) - allowed
            if bad:
                raise PlanError(f"{where}: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
            if "start_step" in d and "at" in d:
                raise PlanError(f"{where}: give 'start_step' or 'at', not both")
            start = d.get("start_step", d.get("at"))
            if not isinstance(start, int) or isinstance(start, bool):
                raise PlanError(f"{where}.start_step must be an integer, got {start!r}")
            mult = d.get("lr_multipliers") or {}
            if not isinstance(mult, dict) or not all(isinstance(v, (int, float)) for v in mult.values()):
                raise PlanError(f"{where}.lr_multipliers must map component names to numbers, got {mult!r}")
            rules = parse_rules(d.get("rules"), f"{where}.rules")
            for action in ("train", "freeze"):
                pats = d.get(action)
                if pats is None:
                    continue
                pats = [pats] if isinstance(pats, str) else pats
                if not isinstance(pats, list) or not all(isinstance(x, str) for x in pats):
                    raise PlanError(f"{where}.{action} must be a pattern or a list of patterns, got {pats!r}")
                rules += tuple(Rule(action, (x.strip(),), where=f"{where}.{action}[{k}]") for k, x in enumerate(pats))
            stages.append(Stage(start, rules, {k: float(v) for k, v in mult.items()}))
        return cls(plan, stages)

    def stage_at(self, step: int) -> StageState:
        """The state active at optimizer step ``step`` (a pure function of ``step``)."""
        index = -1
        for i, s in enumerate(self.stages):
            if s.start_step <= step:
                index = i
        rules = tuple(r for s in self.stages[: index + 1] for r in s.rules)
        plan = TrainPlan(self.plan.preset, self.plan.rules + rules, dict(self.plan.lora), self.plan.source)
        mult: dict[str, float] = {}
        if index >= 0:
            # Expand aliases first so an explicit component key overrides its alias.
            items = sorted(self.stages[index].lr_multipliers.items(),
                           key=lambda kv: len(expand_components(kv[0])), reverse=True)
            for key, value in items:
                for comp in expand_components(key):
                    mult[comp] = value
        start = self.stages[index].start_step if index >= 0 else 0
        return StageState(index, start, plan, mult)

    def validate(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        """Resolve every stage's plan on ``model`` so rule errors surface before training starts.

        This prepares the model too (:func:`~monkeytune.policy.plan.prepare_model`); under
        ``llm-qlora`` its 4-bit layers compute in ``compute_dtype`` (``None``: derived from the weights).
        """
        from monkeytune.policy.plan import prepare_model, resolve_plan  # noqa: PLC0415

        steps = list(dict.fromkeys([0] + [s.start_step for s in self.stages]))
        # Every stage's plan: a layer some stage trains is not quantised (llm-qlora).
        prepare_model(model, self.plan, later=[self.stage_at(step).plan for step in steps], compute_dtype=compute_dtype)
        for step in steps:
            resolve_plan(model, self.stage_at(step).plan)


def apply_stage(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: StageState,
    scheduler: Any = None,
) -> StageChange:
    """Make ``model`` and ``optimizer`` match ``stage``. Idempotent.

    Args:
        model: The model (DDP-wrapped or not); when the change is non-empty and the model is
            wrapped in DDP, rebuild the wrapper with :func:`rewrap_ddp`.
        optimizer: Optimizer built from ``build_param_groups(..., include_frozen=True)``.
        stage: From :meth:`UnfreezeSchedule.stage_at`.
        scheduler: Optional ``torch.optim.lr_scheduler`` whose ``base_lrs`` follow the multipliers.

    Returns:
        The parameters that became trainable or frozen.

    Raises:
        PlanError: A parameter that becomes trainable is not in the optimizer.
    """
    before = set(trainable_names(model))
    apply_plan(model, stage.plan)
    after = set(trainable_names(model))
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    absent = [n for n, p in named_parameters(model) if p.requires_grad and id(p) not in held]
    if absent:
        raise PlanError(
            f"stage {stage.index} makes {len(absent)} parameter(s) trainable that the optimizer does "
            f"not hold (first: {absent[:3]}); build the optimizer with "
            "build_param_groups(..., include_frozen=True) and give every component a stage unfreezes "
            "a learning rate"
        )
    for i, group in enumerate(optimizer.param_groups):
        comp, base = group.get("component"), group.get("base_lr")
        if comp is None or base is None:
            if stage.lr_multipliers:
                raise PlanError("lr multipliers need param groups from build_param_groups (keys 'component', 'base_lr')")
            continue
        mult = stage.lr_multipliers.get(comp, 1.0)
        target = base * mult
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            old = scheduler.base_lrs[i]
            # Keep the scheduler's current factor (warmup/decay) and change only the base.
            group["lr"] = group["lr"] * (target / old) if old else target
            scheduler.base_lrs[i] = target
            group["initial_lr"] = target
        else:
            group["lr"] = target
        group["lr_multiplier"] = mult
    return StageChange(stage.index, tuple(sorted(after - before)), tuple(sorted(before - after)))


def rewrap_ddp(wrapped: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
    """A new DDP wrapper around ``wrapped.module`` with the same settings.

    DDP decides at construction which parameters get gradient hooks, so call this on every
    rank after a stage changed the trainable set. The constructor broadcasts rank 0's
    parameters, which are identical on every rank when training was in sync.
    """
    if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        raise TypeError(f"rewrap_ddp expects a DistributedDataParallel module, got {type(wrapped).__name__}")
    accepted = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    kwargs: dict[str, Any] = {
        "device_ids": wrapped.device_ids,
        "output_device": wrapped.output_device,
        "dim": wrapped.dim,
        "process_group": wrapped.process_group,
        "bucket_cap_mb": wrapped.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": wrapped.find_unused_parameters,
        "gradient_as_bucket_view": wrapped.gradient_as_bucket_view,
        "static_graph": wrapped.static_graph,
    }
    if "forward_sync_buffers" in accepted and hasattr(wrapped, "forward_sync_buffers"):
        kwargs["forward_sync_buffers"] = wrapped.forward_sync_buffers
    else:
        kwargs["broadcast_buffers"] = getattr(wrapped, "broadcast_buffers", True)
    return nn.parallel.DistributedDataParallel(wrapped.module, **{k: v for k, v in kwargs.items() if k in accepted})
