"""Which part of a Monkey model a parameter belongs to, robust to wrappers.

Parameter names are classified on a *canonical* spelling: wrappers that only add prefixes or
intermediate modules are stripped first, so ``llm.base_model.model.model.layers.3.self_attn.
q_proj.base_layer.weight`` (peft LoRA on the LLM) is treated exactly like
``llm.model.layers.3.self_attn.q_proj.weight``. Rules are matched against both spellings, so a
user may write either.
"""

from __future__ import annotations

import re

from torch import nn

# Component keys in report order, with their display names.
COMPONENTS: dict[str, str] = {
    "vision_tower": "vision tower",
    "vision_adapters": "per-window adapters",
    "resampler": "resampler",
    "projector": "MLP projector",
    "image_tokens": "image-token embeddings",
    "llm_layers": "LLM layers",
    "embeddings": "embeddings",
    "lm_head": "LM head",
    "final_norm": "final norm",
    "llm_lora": "LLM LoRA",
    "other": "other",
}

# Coarse names accepted wherever a component is expected (lr tables, rule conditions).
ALIASES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower", "vision_adapters"),
    "adapters": ("vision_adapters",),
    "connector": ("resampler", "projector"),
    "llm": ("llm_layers", "embeddings", "lm_head", "final_norm", "llm_lora"),
    "llm_base": ("llm_layers", "embeddings", "lm_head", "final_norm"),
    "lora": ("vision_adapters", "llm_lora"),
}

_PEFT_ROOT = re.compile(r"^llm\.base_model\.model\.")
# Module wrappers that insert one path segment without changing what the parameter is.
_WRAPPER_SEGMENTS = re.compile(r"\.(base_layer|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def canonical_name(name: str) -> str:
    """Strip wrapper segments from a parameter name.

    Args:
        name: A name from ``model.named_parameters()``.

    Returns:
        The name as it would read on the bare model, e.g. ``llm.model.layers.0.mlp.up_proj.weight``
        for peft's ``llm.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight``.
    """
    out = _PEFT_ROOT.sub("llm.", name)
    out = _WRAPPER_SEGMENTS.sub("", out)
    return out


def component_of(name: str) -> str:
    """Component key (one of :data:`COMPONENTS`) of a parameter name."""
    c = canonical_name(name)
    if c.startswith("vision."):
        return "vision_adapters" if "lora" in c else "vision_tower"
    if c.startswith("resampler."):
        return "resampler"
    if c.startswith("projector."):
        return "projector"
    if c.startswith("image_tokens."):
        return "image_tokens"
    if c.startswith("llm."):
        # peft names its tensors lora_A / lora_B / lora_embedding_A / lora_magnitude_vector.
        if "lora_" in c:
            return "llm_lora"
        if c.startswith("llm.model.embed_tokens."):
            return "embeddings"
        if c.startswith("llm.lm_head."):
            return "lm_head"
        if c.startswith("llm.model.norm."):
            return "final_norm"
        if c.startswith("llm.model.layers."):
            return "llm_layers"
    return "other"


def expand_components(names: str | list[str] | tuple[str, ...], where: str = "component") -> tuple[str, ...]:
    """Resolve component keys and aliases to component keys, with a clear error for unknown ones."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        if n in COMPONENTS:
            out.append(n)
        elif n in ALIASES:
            out.extend(ALIASES[n])
        else:
            raise ValueError(
                f"{where}: unknown component {n!r}; choose from {sorted(COMPONENTS)} or the "
                f"aliases {sorted(ALIASES)}"
            )
    return tuple(dict.fromkeys(out))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of the unwrapped model (shared tensors listed once)."""
    return list(unwrap_model(model).named_parameters())
