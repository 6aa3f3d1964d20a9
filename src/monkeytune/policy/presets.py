"""Named training presets: the default trainable set and, for LoRA-on-LLM presets, the peft wrap.

| preset           | trainable by default                                                          |
| ---------------- | ----------------------------------------------------------------------------- |
| ``monkey``       | per-window adapters, whole resampler, whole LLM (ViT base frozen)              |
| ``monkey-fix-llm`` | per-window adapters, whole resampler (LLM layers/embeddings/norm/head frozen) |
| ``align``        | the connector only (resampler or MLP projector, and a composed model's ``<img>`` embeddings) |
| ``lora-only``    | parameters whose name contains ``lora``                                       |
| ``llm-lora``     | peft LoRA on the LLM's q/k/v/o and gate/up/down, per-window adapters, resampler |
| ``llm-qlora``    | as ``llm-lora`` with the frozen linear layers of the LLM and ViT in 4-bit NF4      |
| ``full``         | everything                                                                    |

``llm-qlora`` holds the LLM's LoRA target layers and the ViT blocks' frozen projections in
bitsandbytes NF4 (see :mod:`monkeytune.policy.quantize`: what is quantised, where, and why the
per-window adapters need nothing else). On the meta device (``monkeytune inspect``) nothing can
be quantised: the layers stay ``nn.Linear``, and :mod:`monkeytune.memory` counts their weights
as NF4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monkeytune.model.hf_export import quiet_peft_wrapping
from monkeytune.policy.quantize import compute_dtype_for, qlora_unavailable_reason, quantize_llm_4bit
from monkeytune.policy.rules import PlanError

__all__ = [  # the quantisation helpers live in monkeytune.policy.quantize; re-exported for callers of this module
    "DEFAULT_LLM_LORA", "LLM_LORA_TARGETS", "POLICY_PRESETS", "Preset", "get_preset", "has_llm_lora",
    "inject_llm_lora", "qlora_unavailable_reason", "quantize_llm_4bit",
]

# Qwen2 projection names; LoRA on all of them is the usual QLoRA-paper recipe.
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Rank/alpha/dropout of Monkey's fine-tuning script (finetune_multitask.py: r 16, alpha 32, dropout
# 0.05); Qwen-VL's script uses r 64, alpha 16. Override with `policy.lora: {r: ..., alpha: ...}`.
DEFAULT_LLM_LORA: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(LLM_LORA_TARGETS)}


@dataclass(frozen=True)
class Preset:
    """A default trainable set.

    Attributes:
        name: Preset name as written in configs.
        description: One line for ``--help`` and reports.
        components: Components trainable by default, or ``None`` to use ``name_contains``.
        name_contains: Substring a parameter name must contain to be trainable by default.
        llm_lora: ``None``, ``"lora"`` (peft LoRA on the LLM) or ``"qlora"`` (4-bit base + LoRA).
    """

    name: str
    description: str
    components: tuple[str, ...] | None
    name_contains: str = ""
    llm_lora: str | None = None

    def default(self, name: str, canonical: str, component: str) -> bool:
        """Whether a parameter is trainable when no rule matches it."""
        if self.components is None:
            return self.name_contains in name or self.name_contains in canonical
        return component in self.components


_LLM_ALL = ("llm_layers", "embeddings", "lm_head", "final_norm", "llm_lora")
# What turns views into LLM tokens: the resampler or a composed model's MLP projector, and the
# embeddings of a composed model's new <img> </img> tokens (see MonkeyForCausalLM.embed_inputs).
_CONNECTOR = ("resampler", "projector", "image_tokens")
POLICY_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("monkey", "ViT base frozen; per-window LoRA, resampler and LLM trainable",
               ("vision_adapters",) + _CONNECTOR + _LLM_ALL),
        Preset("monkey-fix-llm", "as monkey with the whole LLM frozen",
               ("vision_adapters",) + _CONNECTOR),
        Preset("vision", "the vision tower, its per-window LoRA and the connector (LLM frozen): for a vision "
               "objective such as window_answer", ("vision_tower", "vision_adapters") + _CONNECTOR),
        Preset("align", "LLaVA-style alignment: only the connector (and a composed model's image-token embeddings)",
               _CONNECTOR),
        Preset("lora-only", "only parameters whose name contains 'lora'", None, name_contains="lora"),
        Preset("llm-lora", "peft LoRA on the LLM (base frozen), per-window LoRA and resampler trainable",
               ("vision_adapters",) + _CONNECTOR + ("llm_lora",), llm_lora="lora"),
        Preset("llm-qlora", "llm-lora with the frozen LLM and ViT linear layers in 4-bit NF4 (needs bitsandbytes)",
               ("vision_adapters",) + _CONNECTOR + ("llm_lora",), llm_lora="qlora"),
        Preset("full", "every parameter trainable",
               ("vision_tower", "vision_adapters") + _CONNECTOR + ("other",) + _LLM_ALL),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return POLICY_PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown policy preset {name!r}; choose one of {sorted(POLICY_PRESETS)}") from None


def has_llm_lora(model: nn.Module) -> bool:
    """Whether peft LoRA layers are already present in ``model.llm``."""
    llm = getattr(model, "llm", None)
    return llm is not None and any("lora_" in n for n, _ in llm.named_parameters())


def inject_llm_lora(model: nn.Module, options: dict[str, Any] | None = None, quantize: bool = False,
                    compute_dtype: torch.dtype | None = None) -> bool:
    """Wrap ``model.llm`` with peft LoRA (idempotent).

    After this, LLM parameter names gain peft's prefixes, e.g.
    ``llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``; component
    classification and rule matching see through them.

    Args:
        model: A model with an ``llm`` attribute (a transformers causal LM).
        options: Overrides of :data:`DEFAULT_LLM_LORA` (``r``, ``alpha``, ``dropout``,
            ``target_modules``).
        quantize: Quantise the target linear layers to 4-bit first (QLoRA). On the meta device
            they stay unquantised (there are no values to quantise; see the module docstring).
            The ViT's projections are quantised by
            :func:`~monkeytune.policy.plan.prepare_model`, which knows what the plan trains.
        compute_dtype: The dtype the 4-bit layers compute in (a run's ``train.precision``);
            ``None`` derives it from the LLM's weights (:func:`compute_dtype_for`).

    Returns:
        ``True`` if LoRA was added, ``False`` if the model already had it.
    """
    if not hasattr(model, "llm"):
        raise PlanError(f"LLM LoRA presets need a model with an 'llm' attribute; {type(model).__name__} has none")
    if has_llm_lora(model):
        return False
    opts = dict(DEFAULT_LLM_LORA)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise PlanError(f"policy.lora: unknown keys {sorted(unknown)}; allowed: {sorted(opts)}")
    opts.update(options or {})
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - heavy import, only when needed

    weight = next(model.llm.parameters())
    if quantize and not weight.is_meta:
        quantize_llm_4bit(model.llm, tuple(opts["target_modules"]), compute_dtype or compute_dtype_for(weight))
    cfg = LoraConfig(
        r=int(opts["r"]), lora_alpha=int(opts["alpha"]), lora_dropout=float(opts["dropout"]),
        target_modules=list(opts["target_modules"]), bias="none",
    )
    with quiet_peft_wrapping():
        model.llm = get_peft_model(model.llm, cfg)
    return True
