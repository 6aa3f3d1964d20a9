"""What a training plan trains, and the memory it needs per GPU (``monkeytune inspect`` as a library).

The model is built on the meta device, so even ``monkey-7b`` is inspected in a second without
allocating its weights. The model comes from a :class:`~monkeytune.model.spec.ModelSpec`,
resolved as training resolves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from monkeytune.config import MODEL_PRESETS, ModelConfig
from monkeytune.memory import OPTIMIZERS, PRECISIONS, MemoryEstimate, estimate_all, format_memory, summarize
from monkeytune.model import build_model
from monkeytune.model.spec import ModelSpec, ModelSpecError, resolve_model
from monkeytune.policy import (
    DEFAULT_LLM_LORA, POLICY_PRESETS, PlanError, PlanReport, TrainPlan, get_preset, plan_report,
)

# Of a training config's policy section, what decides what trains at the start (learning rates
# and unfreezing stages do not).
PLAN_KEYS = ("preset", "rules", "lora")


def read_inspect_config(value: str) -> tuple[ModelSpec, dict | None, str | None]:
    """``(model spec, policy data or None, optim.name or None)`` for a preset name or a config file.

    The file is a model config (the whole file or its ``model`` key) or a training config, whose
    ``model`` section is a :class:`ModelSpec` and whose ``policy`` plan keys and ``optim.name``
    are returned.

    Raises:
        ValueError: neither a preset nor a file, a malformed file, or an invalid model spec.
    """
    path = Path(value)
    if value in MODEL_PRESETS and not path.is_file():
        return ModelSpec(preset=value), None, None
    if not path.is_file():
        raise ValueError(f"--config {value!r} is neither a model preset ({', '.join(sorted(MODEL_PRESETS))}) nor a file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    policy = data.get("policy")
    if isinstance(policy, dict):
        policy = {k: v for k, v in policy.items() if k in PLAN_KEYS}
    optim = data.get("optim")
    optim_name = optim.get("name") if isinstance(optim, dict) else None
    if optim_name is not None and optim_name not in OPTIMIZERS:
        raise ValueError(f"{path}: optim.name must be one of {list(OPTIMIZERS)}, got {optim_name!r}")
    model = data["model"] if "model" in data else {k: v for k, v in data.items() if k not in ("policy", "optim")}
    return ModelSpec.parse(model, f"{path}: model config"), policy, optim_name


def quantized_targets(plan: TrainPlan) -> tuple[str, ...]:
    """The LLM linear layers a plan stores in 4 bits (the LoRA targets of ``llm-qlora``), else ``()``.

    Given to :func:`~monkeytune.memory.summarize`, non-empty targets also count the frozen ViT
    block projections as 4-bit (``llm-qlora`` quantises both).
    """
    if get_preset(plan.preset).llm_lora != "qlora":
        return ()
    return tuple((plan.lora or {}).get("target_modules", DEFAULT_LLM_LORA["target_modules"]))


def choose_plan(policy: str | None, file_policy: dict | None, rules: list[str], where: str) -> TrainPlan:
    """The plan ``--policy`` names (a preset or a plan file), else the config's, plus ``rules``.

    Raises:
        PlanError: an unknown preset, a bad plan file or a bad rule.
    """
    if policy is None:
        plan = TrainPlan.from_config(file_policy, source=f"{where}: policy")
    elif policy in POLICY_PRESETS:
        plan = TrainPlan(policy)
    elif Path(policy).is_file():
        plan = TrainPlan.from_file(policy)
    else:
        raise PlanError(f"--policy {policy!r} is neither a preset ({', '.join(POLICY_PRESETS)}) nor a file")
    return plan.with_rules(rules, where="--rule") if rules else plan


@dataclass
class Inspection:
    """A plan resolved on a model, with memory estimates.

    Attributes:
        config: The resolved model configuration.
        report: What the plan trains.
        estimates: One memory estimate per precision and strategy.
        settings: What the estimates assume (``gpus``, ``batch_size``, ``seq_len``,
            ``images_per_sample``, ``optim``).
        quantized: Parameters held in 4 bits (``llm-qlora``: the LLM's LoRA targets and the
            frozen ViT block projections).
    """

    config: ModelConfig
    report: PlanReport
    estimates: list[MemoryEstimate]
    settings: dict[str, Any]
    quantized: int = 0

    def to_dict(self, verbose: bool = False) -> dict[str, Any]:
        return {
            "config": self.config.name,
            "policy": self.report.to_dict(verbose=verbose),
            "memory": {**self.settings, "unit": "bytes", "quantized_4bit_params": self.quantized,
                       "estimates": [e.to_dict() for e in self.estimates]},
        }

    def to_text(self, verbose: bool = False) -> str:
        return "\n".join([f"model: {self.config.name}", self.report.to_text(verbose=verbose), "",
                          format_memory(self.estimates, self.settings["batch_size"], self.settings["seq_len"])])


def inspect_plan(spec: ModelSpec, plan: TrainPlan, gpus: int = 1, batch_size: int = 1, seq_len: int = 2048,
                 images_per_sample: int = 1, precisions: tuple[str, ...] = tuple(PRECISIONS),
                 optim: str = "adamw_torch") -> Inspection:
    """Resolve ``spec``, build the model on the meta device, apply ``plan`` and estimate memory.

    Raises:
        ValueError: sizes below 1 (``images_per_sample`` below 0), or a spec that does not resolve.
        PlanError: a plan that does not fit the model.
    """
    if min(gpus, batch_size, seq_len) < 1 or images_per_sample < 0:
        raise ValueError("--gpus, --batch-size and --seq-len must be >= 1, --images-per-sample >= 0")
    try:
        config = resolve_model(spec, "model config").config
    except ModelSpecError as e:
        raise ValueError(str(e)) from None
    with torch.device("meta"):
        report = plan_report(build_model(config), plan)
    summary = summarize(report.decisions, config, quantized_targets(plan))
    estimates = estimate_all(summary, config, gpus, batch_size, seq_len, images_per_sample, precisions, optim)
    settings = {"gpus": gpus, "batch_size": batch_size, "seq_len": seq_len, "images_per_sample": images_per_sample,
                "optim": optim}
    return Inspection(config, report, estimates, settings, summary.quantized)
