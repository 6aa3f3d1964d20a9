"""Optimizer parameter groups with a learning rate per component and selective weight decay."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from monkeytune.policy.components import ALIASES, COMPONENTS, canonical_name, component_of, named_parameters
from monkeytune.policy.rules import PlanError, compile_pattern

# Norm weights, biases and adapter gains are not decayed (decaying them pulls norms and gains
# towards zero rather than regularising a projection). One-dimensional tensors are skipped anyway.
DEFAULT_NO_DECAY = ("*.bias", "*norm*", "*.ln_*", "*lora_scale*")


def _lr_for(component: str, lr_by_component: dict[str, float]) -> float | None:
    """Exact component key first, then the most specific alias containing it, then ``default``."""
    if component in lr_by_component:
        return float(lr_by_component[component])
    aliases = sorted((len(m), a) for a, m in ALIASES.items() if component in m and a in lr_by_component)
    if aliases:
        return float(lr_by_component[aliases[0][1]])
    if "default" in lr_by_component:
        return float(lr_by_component["default"])
    return None


def build_param_groups(
    model: nn.Module,
    lr_by_component: dict[str, float],
    weight_decay: float = 0.0,
    no_decay_patterns: Iterable[str] = DEFAULT_NO_DECAY,
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer param groups: one per (component, decay/no-decay) pair that has parameters.

    Args:
        model: The (possibly wrapped) model with ``requires_grad`` already set by the plan.
        lr_by_component: Learning rate per component key (``vision_tower``, ``vision_adapters``,
            ``resampler``, ``llm_layers``, ``embeddings``, ``lm_head``, ``final_norm``,
            ``llm_lora``, ``other``), per alias (``adapters``, ``vision``, ``llm``, ``llm_base``,
            ``lora``) or ``default``. A component key beats an alias, a smaller alias beats a
            larger one, and ``default`` comes last.
        weight_decay: Decay of the decayed groups.
        no_decay_patterns: Globs / ``re:`` regexes of parameters that get no weight decay, on
            top of every parameter with at most one dimension.
        include_frozen: Also put parameters that do not require grad into the groups. Use this
            with an :class:`~monkeytune.policy.unfreeze.UnfreezeSchedule`: the optimizer then
            holds every parameter from step 0, so its groups never change between stages and a
            checkpoint's optimizer state always loads. ``torch.optim.AdamW`` skips parameters whose
            ``.grad`` is ``None`` entirely (no moment update and no weight decay), and frozen
            parameters never get a ``.grad``. Frozen parameters of a component with no learning
            rate are left out (a stage that unfreezes them then raises).

    Returns:
        A list of dicts for ``torch.optim.AdamW(groups)`` with keys ``params``, ``lr``,
        ``weight_decay``, ``name`` (``"<component>"`` or ``"<component>.no_decay"``),
        ``component`` and ``base_lr`` (the component's lr before any stage multiplier).

    Raises:
        PlanError: Unknown keys in ``lr_by_component``, or a trainable component with no learning rate.
    """
    known = set(COMPONENTS) | set(ALIASES) | {"default"}
    bad = set(lr_by_component) - known
    if bad:
        raise PlanError(f"lr_by_component: unknown keys {sorted(bad)}; allowed: {sorted(known)}")
    no_decay = [compile_pattern(p) for p in no_decay_patterns]
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    missing: set[str] = set()
    for name, p in named_parameters(model):
        if not (p.requires_grad or include_frozen):
            continue
        comp, canon = component_of(name), canonical_name(name)
        if _lr_for(comp, lr_by_component) is None:
            # A frozen component without an lr stays out; a stage unfreezing it fails clearly.
            if p.requires_grad:
                missing.add(comp)
            continue
        decay = p.ndim > 1 and not any(rx.fullmatch(name) or rx.fullmatch(canon) for rx in no_decay)
        buckets.setdefault((comp, decay), []).append(p)
    if missing:
        raise PlanError(
            f"lr_by_component has no learning rate for {sorted(missing)}; add those keys, an alias "
            f"({', '.join(sorted(ALIASES))}) or 'default'"
        )
    groups = []
    for comp in COMPONENTS:
        for decay in (True, False):
            params = buckets.get((comp, decay))
            if not params:
                continue
            lr = _lr_for(comp, lr_by_component)
            groups.append({
                "params": params,
                "lr": lr,
                "base_lr": lr,
                "weight_decay": float(weight_decay) if decay else 0.0,
                "name": comp if decay else f"{comp}.no_decay",
                "component": comp,
            })
    return groups
