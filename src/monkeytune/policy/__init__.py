"""Selective training: which parameters train, with which learning rate, and when.

* :class:`TrainPlan` - a preset (``monkey``, ``monkey-fix-llm``, ``lora-only``, ``llm-lora``,
  ``llm-qlora``, ``full``) plus ordered ``train``/``freeze`` rules (last match wins).
* :func:`apply_plan` - the only code in monkeytune that sets ``requires_grad``.
* :func:`plan_report` - counts per component, text or JSON, optionally per parameter.
* :func:`build_param_groups` - optimizer groups with an lr per component and no decay on
  norms, biases, adapter gains and 1-D tensors.
* :class:`UnfreezeSchedule` / :func:`apply_stage` / :func:`rewrap_ddp` - progressive unfreezing.
* :func:`check_trainable_consistent` - all ranks must train the same parameters.
"""

from monkeytune.policy.components import ALIASES, COMPONENTS, canonical_name, component_of, unwrap_model
from monkeytune.policy.distributed import check_trainable_consistent
from monkeytune.policy.groups import DEFAULT_NO_DECAY, build_param_groups
from monkeytune.policy.plan import (
    PRESET_DEFAULT,
    Decision,
    TrainPlan,
    apply_plan,
    prepare_model,
    resolve_plan,
    trainable_names,
)
from monkeytune.policy.presets import DEFAULT_LLM_LORA, POLICY_PRESETS, Preset, get_preset, qlora_unavailable_reason
from monkeytune.policy.report import ComponentRow, PlanReport, plan_report
from monkeytune.policy.rules import PlanError, Rule, glob_to_regex, parse_rule, parse_rules
from monkeytune.policy.unfreeze import Stage, StageChange, StageState, UnfreezeSchedule, apply_stage, rewrap_ddp

__all__ = [
    "ALIASES", "COMPONENTS", "DEFAULT_LLM_LORA", "DEFAULT_NO_DECAY", "POLICY_PRESETS", "PRESET_DEFAULT",
    "ComponentRow", "Decision", "PlanError", "PlanReport", "Preset", "Rule", "Stage", "StageChange",
    "StageState", "TrainPlan", "UnfreezeSchedule", "apply_plan", "apply_stage", "build_param_groups",
    "canonical_name", "check_trainable_consistent", "component_of", "get_preset", "glob_to_regex",
    "parse_rule", "parse_rules", "plan_report", "prepare_model", "qlora_unavailable_reason",
    "rewrap_ddp", "resolve_plan", "trainable_names", "unwrap_model",
]
