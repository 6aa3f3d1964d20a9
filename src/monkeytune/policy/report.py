"""Human and JSON summaries of what a plan trains, grouped by model component."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from monkeytune.policy.components import COMPONENTS
from monkeytune.policy.plan import Decision, TrainPlan, prepare_model, resolve_plan


@dataclass(frozen=True)
class ComponentRow:
    """Parameter counts of one component."""

    component: str
    params: int
    trainable: int

    @property
    def label(self) -> str:
        return COMPONENTS[self.component]

    @property
    def percent(self) -> float:
        """Trainable share of this component, in percent."""
        return 100.0 * self.trainable / self.params if self.params else 0.0


@dataclass(frozen=True)
class PlanReport:
    """What a plan trains.

    Attributes:
        preset: The plan's preset.
        rules: The plan's rules in string form, in order.
        rows: One row per component present in the model, in :data:`COMPONENTS` order.
        decisions: Per-parameter decisions (for verbose output).
    """

    preset: str
    rules: tuple[str, ...]
    rows: tuple[ComponentRow, ...]
    decisions: tuple[Decision, ...]

    @property
    def total(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    def row(self, component: str) -> ComponentRow | None:
        return next((r for r in self.rows if r.component == component), None)

    def to_dict(self, verbose: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``verbose`` adds every parameter with the rule that decided it."""
        out: dict[str, Any] = {
            "preset": self.preset,
            "rules": list(self.rules),
            "components": [
                {"component": r.component, "label": r.label, "params": r.params,
                 "trainable": r.trainable, "percent": round(r.percent, 4)}
                for r in self.rows
            ],
            "total": {"params": self.total, "trainable": self.trainable,
                      "percent": round(100.0 * self.trainable / self.total, 4) if self.total else 0.0},
        }
        if verbose:
            out["parameters"] = [
                {"name": d.name, "component": d.component, "shape": list(d.shape), "numel": d.numel,
                 "trainable": d.trainable, "decided_by": d.decided_by}
                for d in self.decisions
            ]
        return out

    def to_text(self, verbose: bool = False) -> str:
        """Fixed-width table; ``verbose`` appends one line per parameter."""
        head = f"policy: preset {self.preset}" + (f", {len(self.rules)} rule(s)" if self.rules else "")
        lines = [head] + [f"  {r}" for r in self.rules]
        header = ("component", "params", "trainable", "% trainable", "% of model")
        rows = [
            (r.label, f"{r.params:,}", f"{r.trainable:,}", f"{r.percent:.2f}",
             f"{100.0 * r.params / self.total:.2f}" if self.total else "0.00")
            for r in self.rows
        ]
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        rows.append(("total", f"{self.total:,}", f"{self.trainable:,}", f"{pct:.2f}", "100.00"))
        widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]

        def fmt(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        lines += ["", fmt(header), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows[:-1]] + [fmt(tuple("-" * w for w in widths)), fmt(rows[-1])]
        if verbose:
            lines += ["", "parameters (T = trainable):"]
            width = max((len(d.name) for d in self.decisions), default=0)
            for d in self.decisions:
                mark = "T" if d.trainable else "-"
                lines.append(f"  {mark} {d.name.ljust(width)}  {d.numel:>12,}  {d.decided_by}")
        return "\n".join(lines)


def plan_report(model: nn.Module, plan: TrainPlan) -> PlanReport:
    """Summarise what ``plan`` trains on ``model`` without changing ``requires_grad``.

    Presets that add parameters (peft LoRA on the LLM) are prepared first, because those
    parameters must exist to be counted. Works on meta-device models.

    Raises:
        PlanError: As :func:`~monkeytune.policy.plan.resolve_plan`.
    """
    prepare_model(model, plan)
    decisions = resolve_plan(model, plan)
    totals: dict[str, list[int]] = {}
    for d in decisions:
        t = totals.setdefault(d.component, [0, 0])
        t[0] += d.numel
        t[1] += d.numel if d.trainable else 0
    rows = tuple(ComponentRow(c, *totals[c]) for c in COMPONENTS if c in totals)
    return PlanReport(plan.preset, tuple(f"{r.where}: {r.text}" for r in plan.rules), rows, tuple(decisions))
