"""4-bit NF4 storage of frozen linear layers for the ``llm-qlora`` preset (bitsandbytes ``Linear4bit``).

Under ``llm-qlora`` two groups of frozen linear layers are held in 4 bits, with the same settings
(NF4, blocksize 64, double quantization of the scales):

* the LLM's LoRA target projections (``q_proj`` ... ``down_proj``), beneath peft's LoRA;
* the vision tower's block projections (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``;
  :data:`VISION_4BIT_LAYERS`), beneath the per-window adapters. A block adds each adapter's
  output to its base projection's output, so the base needs nothing but a forward and swapping
  ``nn.Linear`` for ``Linear4bit`` changes nothing else.

The vision layers are quantised only when the plan leaves their weight frozen; one a rule (or a
later unfreezing stage) trains stays ``nn.Linear``. The patch embedding (a convolution), the
LayerNorms, the position table, the resampler, the LLM's embeddings, norms and head, and every
trained adapter stay at the precision's dtype.

Quantisation runs on the CUDA GPU when there is one, else on the CPU through bitsandbytes' CPU
backend (bitsandbytes >= 0.45: correct but slow, for small models and tests). On the meta device
nothing is quantised (there are no values); :mod:`monkeytune.memory` counts those weights as NF4.

In a training run the 4-bit layers compute in ``train.precision``'s dtype (bf16, fp16 or fp32;
the weights themselves are loaded in fp32 either way). The preset is refused under FSDP2 and
DeepSpeed ZeRO-3 (:func:`qlora_engine_reason`), whose parameter sharding flattens the packed
weights and their quant state.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Callable, Iterable

import torch
from torch import nn

from monkeytune.policy.rules import PlanError

NF4_BLOCKSIZE = 64
# The ViT block projections stored in 4 bits (paths inside ``vision.blocks.<i>``); in a composed
# model's transformers encoder, the linear layers that carry per-window adapters.
VISION_4BIT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
_VISION_WEIGHT = re.compile(r"^vision\.blocks\.\d+\.(" + "|".join(re.escape(p) for p in VISION_4BIT_LAYERS) + r")\.weight$"
                            r"|^vision\.encoder\..+\.linear\.weight$")


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit QLoRA cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return ("preset llm-qlora needs 4-bit bitsandbytes kernels: the bitsandbytes package is not installed "
            "(pip install bitsandbytes). Use preset llm-lora (LoRA on an unquantised LLM) instead.")


# Engines whose sharding flattens parameters into shards/partitions: bitsandbytes' packed 4-bit
# weights and the quant state attached to them do not survive that.
QLORA_REFUSED_ENGINES = ("fsdp2", "deepspeed-zero3")


def qlora_engine_reason(preset: str, engine: str) -> str | None:
    """Why policy preset ``preset`` cannot train under ``engine``, or ``None`` when it can.

    Only ``llm-qlora`` is refused, and only under :data:`QLORA_REFUSED_ENGINES`; it runs
    single-process, under DDP and under DeepSpeed ZeRO-2 (which shards optimizer state and
    gradients, not the parameters).
    """
    if preset != "llm-qlora" or engine not in QLORA_REFUSED_ENGINES:
        return None
    return (f"policy.preset llm-qlora is not supported under {engine} (its parameter sharding flattens "
            "bitsandbytes' 4-bit weights and their quant state): run it single-process, under ddp or "
            "deepspeed-zero2, or choose another preset (e.g. llm-lora)")


def is_vision_4bit_weight(canonical: str) -> bool:
    """Whether a (canonical) parameter name is the weight of a ViT block projection ``llm-qlora`` stores in 4 bits."""
    return _VISION_WEIGHT.match(canonical) is not None


def compute_dtype_for(weight: torch.Tensor) -> torch.dtype:
    """The dtype 4-bit layers compute in when no precision is given: the weights' own half dtype, else bfloat16.

    A training run passes its precision instead (:func:`compute_dtype_of_precision`): its
    weights are loaded in fp32 whatever ``train.precision`` is.
    """
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


PRECISION_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype_of_precision(precision: str) -> torch.dtype:
    """The dtype 4-bit layers compute in under a run's precision (``bf16``, ``fp16`` or ``fp32``)."""
    try:
        return PRECISION_COMPUTE_DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISION_COMPUTE_DTYPES)}") from None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _replace_linears(root: nn.Module, select: Callable[[str], bool], compute_dtype: torch.dtype,
                     device: torch.device) -> int:
    """Swap every plain ``nn.Linear`` under ``root`` whose qualified name ``select`` accepts for an NF4 ``Linear4bit``.

    The bias (if any) stays a floating-point parameter with its ``requires_grad``; the weight is
    frozen. Returns the number of layers replaced.
    """
    reason = qlora_unavailable_reason()
    if reason:
        raise PlanError(reason)
    import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency, only here

    replaced = 0
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or not select(name):
                continue
            if child.weight.is_meta:
                raise PlanError(f"cannot quantise {name}: its weight is on the meta device")
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=child.bias.requires_grad)
            q.train(child.training)
            setattr(parent, child_name, q.to(device))  # .to(device) performs the quantisation
            replaced += 1
    return replaced


def quantize_llm_4bit(llm: nn.Module, targets: tuple[str, ...] | list[str], compute_dtype: torch.dtype) -> int:
    """Replace the LLM's target ``nn.Linear`` layers by bitsandbytes NF4 ``Linear4bit``.

    The weights are moved to the current CUDA device when there is one (else they stay on the
    CPU), where bitsandbytes quantises them (blocksize 64, double quantization); the rest of the
    LLM is moved there too so the forward runs on one device.

    Args:
        llm: The (not yet peft-wrapped) causal LM.
        targets: Module names (last name segment) to quantise, e.g. ``q_proj``.
        compute_dtype: The dtype the 4-bit layers dequantize to and compute in.

    Returns:
        Number of linear layers replaced.
    """
    names = set(targets)
    device = _device()
    replaced = _replace_linears(llm, lambda name: name.rsplit(".", 1)[-1] in names, compute_dtype, device)
    llm.to(device)
    return replaced


def quantize_vision_4bit(model: nn.Module, keep: Iterable[str] = (), compute_dtype: torch.dtype | None = None) -> int:
    """Replace the vision tower's block projections (:data:`VISION_4BIT_LAYERS`) by NF4 ``Linear4bit``.

    Nothing happens on the meta device. The tower is moved to the device the LLM quantisation
    uses (see :func:`quantize_llm_4bit`).

    Args:
        model: A model whose vision tower is ``model.vision`` (with ``blocks``).
        keep: Parameter names (e.g. ``vision.blocks.3.mlp.fc.weight``) that train, now or in a
            later stage: their layers stay ``nn.Linear``.
        compute_dtype: Dtype of the 4-bit compute; ``None`` derives it from the tower's weights
            (:func:`compute_dtype_for`).

    Returns:
        Number of linear layers replaced.
    """
    vision = getattr(model, "vision", None)
    if vision is None or not hasattr(vision, "blocks"):
        return 0
    first = next(vision.parameters(), None)
    if first is None or first.is_meta:
        return 0
    keep = set(keep)
    dtype = compute_dtype or compute_dtype_for(first)

    def select(name: str) -> bool:
        full = f"vision.{name}.weight"
        return is_vision_4bit_weight(full) and full not in keep

    device = _device()
    replaced = _replace_linears(vision, select, dtype, device)
    if replaced:
        vision.to(device)
    return replaced


def dequantize_4bit(model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = "cpu") -> int:
    """Replace every bitsandbytes ``Linear4bit`` in ``model`` by a frozen ``nn.Linear`` holding its dequantized weight.

    For writing a model trained on a 4-bit base as ordinary weights: the values are the ones
    the run computed with (NF4 rounding included). A layer inside a peft LoRA wrapper is replaced
    there (``unload()`` then returns the dense layer; peft's 4-bit merge no longer applies to it).

    Args:
        model: Any module.
        dtype: Dtype of the dense weights and biases; ``None``: the dtype the weight had when it
            was quantised.
        device: Where the dense weights go; the default, the CPU, keeps a finished run from
            needing GPU memory for a dense copy of its base. ``None``: the 4-bit weight's device.

    Returns:
        Number of layers replaced (0 when bitsandbytes is not installed: there can be none).
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return 0
    import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency, only here

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            if getattr(child.weight.quant_state, "packing_format_for_cpu", False):
                # An eval-mode CPU forward repacked the weight for bitsandbytes' inference kernel;
                # writing the layer's state (its own code) restores the standard layout in place.
                child.state_dict()
            w = child.weight
            dense = bnb.functional.dequantize_4bit(w.data, w.quant_state)
            dense = dense.to(device=device or w.device, dtype=dtype or w.quant_state.dtype)
            layer = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
            layer.weight = nn.Parameter(dense.reshape(child.out_features, child.in_features), requires_grad=False)
            if child.bias is not None:
                # The weight's dtype: bitsandbytes' forward casts a 4-bit layer's bias to its compute dtype in place.
                bias = child.bias.detach().to(device=dense.device, dtype=dense.dtype)
                layer.bias = nn.Parameter(bias, requires_grad=child.bias.requires_grad)
            layer.train(child.training)
            setattr(parent, child_name, layer)
            replaced += 1
    return replaced
