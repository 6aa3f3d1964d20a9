"""A training plan (preset + rules), its resolution per parameter and its application.

:func:`apply_plan` is the one place in monkeytune that sets ``requires_grad``; everything else
(optimizer groups, unfreezing stages, reports) goes through it or only reads the flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from monkeytune.policy.components import canonical_name, component_of, named_parameters, unwrap_model
from monkeytune.policy.presets import get_preset, inject_llm_lora
from monkeytune.policy.quantize import quantize_vision_4bit
from monkeytune.policy.rules import PlanError, Rule, close_names, parse_rules

PRESET_DEFAULT = "preset default"


@dataclass(frozen=True)
class TrainPlan:
    """Which parameters train: a preset's default set, then rules applied in order.

    Attributes:
        preset: Name of a preset in :data:`~monkeytune.policy.presets.POLICY_PRESETS`.
        rules: Ordered rules; the last rule matching a parameter decides it.
        lora: Options of the peft LoRA added by the ``llm-lora``/``llm-qlora`` presets.
        source: Where the plan came from, prefixed to error locations.
    """

    preset: str = "monkey"
    rules: tuple[Rule, ...] = ()
    lora: dict[str, Any] = field(default_factory=dict)
    source: str = "policy"

    def __post_init__(self) -> None:
        get_preset(self.preset)  # fail early on a misspelt preset

    @classmethod
    def from_config(cls, data: Any, source: str = "policy") -> "TrainPlan":
        """Build a plan from plain data.

        Args:
            data: ``None`` (preset ``monkey``), a preset name, a list of rules (on ``monkey``)
                or a mapping ``{"preset": ..., "rules": [...], "lora": {...}}``.
            source: Location for error messages, e.g. ``"train.yaml: policy"``.
        """
        if data is None:
            return cls(source=source)
        if isinstance(data, TrainPlan):
            return data
        if isinstance(data, str):
            return cls(preset=data, source=source)
        if isinstance(data, (list, tuple)):
            return cls(rules=parse_rules(data, f"{source}.rules"), source=source)
        if isinstance(data, dict):
            bad = set(data) - {"preset", "rules", "lora"}
            if bad:
                raise PlanError(f"{source}: unknown keys {sorted(bad)}; allowed: preset, rules, lora")
            lora = data.get("lora") or {}
            if not isinstance(lora, dict):
                raise PlanError(f"{source}.lora must be a mapping, got {lora!r}")
            return cls(
                preset=data.get("preset", "monkey"),
                rules=parse_rules(data.get("rules"), f"{source}.rules"),
                lora=dict(lora),
                source=source,
            )
        raise PlanError(f"{source}: expected a preset name, a list of rules or a mapping, got {type(data).__name__}")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainPlan":
        """Read a plan from a YAML or JSON file (the whole file, or its ``policy`` key)."""
        import yaml  # noqa: PLC0415

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"cannot read policy file {path}: {exc}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise PlanError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        if isinstance(data, dict) and "policy" in data:
            return cls.from_config(data["policy"], source=f"{path}: policy")
        return cls.from_config(data, source=str(path))

    def with_rules(self, specs: Any, where: str = "extra rules") -> "TrainPlan":
        """A copy with more rules appended (they take precedence over the existing ones)."""
        more = parse_rules(specs, where)
        return TrainPlan(self.preset, self.rules + more, dict(self.lora), self.source)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form accepted by :meth:`from_config`."""
        d: dict[str, Any] = {"preset": self.preset, "rules": [r.to_data() for r in self.rules]}
        if self.lora:
            d["lora"] = dict(self.lora)
        return d


@dataclass(frozen=True)
class Decision:
    """What a plan decides for one parameter.

    Attributes:
        name: Parameter name on the unwrapped model.
        component: Component key.
        numel: Number of elements.
        shape: Tensor shape.
        trainable: Whether it trains.
        decided_by: ``"<where>: <rule text>"`` of the last matching rule, or ``"preset default"``.
    """

    name: str
    component: str
    numel: int
    shape: tuple[int, ...]
    trainable: bool
    decided_by: str


def prepare_model(model: nn.Module, plan: TrainPlan, later: Sequence[TrainPlan] = (),
                  compute_dtype: torch.dtype | None = None) -> bool:
    """Structural changes a preset needs before its parameters exist (peft LoRA on the LLM, 4-bit layers).

    Under ``llm-qlora`` the LLM's LoRA targets and the ViT block projections whose weight no plan
    trains become 4-bit (:mod:`monkeytune.policy.quantize`). That happens once, together with the
    LoRA injection, so the first call decides: pass every unfreezing stage's plan in ``later``
    then (:meth:`~monkeytune.policy.unfreeze.UnfreezeSchedule.validate` does) so that a ViT layer
    a later stage trains stays full precision. ``compute_dtype`` is the dtype those 4-bit layers
    compute in (a training run passes its precision's); ``None`` derives it from the weights
    (:func:`~monkeytune.policy.quantize.compute_dtype_for`).

    Idempotent. Returns ``True`` when the model was changed.
    """
    preset = get_preset(plan.preset)
    if preset.llm_lora is None:
        return False
    qlora = preset.llm_lora == "qlora"
    bare = unwrap_model(model)
    changed = inject_llm_lora(bare, plan.lora, quantize=qlora, compute_dtype=compute_dtype)
    if changed and qlora:
        keep = {d.name for p in (plan, *later) for d in resolve_plan(bare, p, check=False) if d.trainable}
        quantize_vision_4bit(bare, keep, compute_dtype)
    return changed


def resolve_plan(model: nn.Module, plan: TrainPlan, check: bool = True) -> list[Decision]:
    """Decide every parameter without touching the model.

    Args:
        model: The (possibly DDP-wrapped) model, already prepared (:func:`prepare_model`).
        plan: The plan.
        check: Raise :class:`PlanError` for rules matching no parameter and for plans leaving
            nothing trainable.

    Returns:
        One :class:`Decision` per parameter, in ``named_parameters`` order.
    """
    preset = get_preset(plan.preset)
    params = named_parameters(model)
    hits = [0] * len(plan.rules)
    decisions = []
    for name, p in params:
        canon, comp = canonical_name(name), component_of(name)
        trainable, by = preset.default(name, canon, comp), PRESET_DEFAULT
        for i, rule in enumerate(plan.rules):
            if rule.matches(name, canon, comp):
                hits[i] += 1
                trainable, by = rule.action == "train", f"{rule.where}: {rule.text}"
        decisions.append(Decision(name, comp, p.numel(), tuple(p.shape), trainable, by))
    if check:
        unmatched = [r for r, h in zip(plan.rules, hits) if h == 0]
        if unmatched:
            names = [n for n, _ in params] + [canonical_name(n) for n, _ in params]
            lines = []
            for r in unmatched:
                positive = [pat for pat in r.patterns if not pat.startswith("!")]
                near = list(dict.fromkeys(c for pat in positive for c in close_names(pat, names)))[:6]
                hint = ("; close names: " + ", ".join(near)) if near else ""
                lines.append(f"  {r.where}: '{r.text}' matches no parameter{hint}")
            raise PlanError("rules that match no parameter:\n" + "\n".join(lines))
        if not any(d.trainable for d in decisions):
            raise PlanError(
                f"plan (preset {plan.preset!r} with {len(plan.rules)} rule(s)) leaves no parameter "
                "trainable; check the preset and the freeze rules"
            )
    return decisions


def apply_plan(model: nn.Module, plan: TrainPlan) -> list[Decision]:
    """Prepare the model for the preset, then set ``requires_grad`` on every parameter.

    Parameters that become frozen also lose any stale ``.grad`` so no optimizer can move them
    (weight decay included).

    Returns:
        The decisions applied (see :func:`resolve_plan`).
    """
    prepare_model(model, plan)
    decisions = resolve_plan(model, plan)
    params = dict(named_parameters(model))
    for d in decisions:
        p = params[d.name]
        if d.trainable and not (p.is_floating_point() or p.is_complex()):
            raise PlanError(f"{d.decided_by} makes {d.name} trainable, but it is a {p.dtype} (quantised) tensor")
    for d in decisions:
        p = params[d.name]
        p.requires_grad_(d.trainable)
        if not d.trainable:
            p.grad = None
    return decisions


def trainable_names(model: nn.Module) -> list[str]:
    """Sorted names of the parameters that currently require grad (unwrapped model)."""
    return sorted(n for n, p in named_parameters(model) if p.requires_grad)
