"""The end-of-run save: a model folder chat/eval can load, or the trained weights only.

``<output_dir>/final/`` is a monkeytune model folder (:func:`monkeytune.model.io.save_model`):

* ``final_save: full`` - every weight plus the tokenizer; loads on its own.
* ``final_save: adapters`` - only parameters trained in the run (``complete: false``); with a
  ``model.from`` base it records that folder, so ``load_model`` finds the base by itself.

With an LLM LoRA policy (``llm-lora``) the LLM adapters are also written as a standard peft
adapter folder, ``final/llm_lora/`` (``adapter_config.json`` + ``adapter_model.safetensors``),
whose ``base_model_name_or_path`` is ``final/llm_base/`` (absolute): the base LLM as a plain
transformers ``Qwen2ForCausalLM`` folder, so ``peft.AutoPeftModelForCausalLM.from_pretrained``
loads the adapter with its base and no monkeytune code (this costs the LLM's size on disk once more). The model folder itself then holds
the LLM either with the adapters merged in (``merge_llm_lora: true``) or without them (the base
LLM; apply ``llm_lora/`` on top). The per-window ViT adapters are part of the ViT's own
parameters and stay separate from the LLM LoRA in either case.

Under ``llm-qlora`` the 4-bit layers of the LLM and the ViT are first dequantized on the CPU
(:func:`~monkeytune.policy.quantize.dequantize_4bit`): the folder, ``llm_base/`` included, holds
the dense weights the run computed with (NF4 rounding included) in the run's compute dtype, never
packed NF4 bytes, and merging adds the LoRA deltas to those dense weights (for monkey-7b this
takes about 17 GB of host memory in bf16). Adapter-only folders and checkpoints hold trained
tensors only, which are never 4-bit.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from monkeytune.model.hf_export import ADAPTER_FOLDER, save_base_llm, save_peft_adapter
from monkeytune.model.weights import os_error_of
from monkeytune.train.checkpoint import CheckpointError, publish_folder, write_error

logger = logging.getLogger(__name__)
BASE_FOLDER = "llm_base"  # the LLM LoRA's base as a plain transformers folder


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: an FSDP2 (DTensor) shard, a ZeRO-3 partition, or the tensor."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return getattr(t, "ds_tensor", t)  # ZeRO-3 leaves an empty placeholder in the module


def assert_finite(model: nn.Module, where: str, accelerator=None) -> None:
    """Refuse to write weights holding NaN or inf (names the first offenders).

    With ``accelerator``, the verdict is agreed over all processes first: with sharded
    parameters one rank may hold the bad values while the others would go on into a collective
    save and wait forever.
    """
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(_local(p.detach())).all()]
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(len(bad))], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum")) and not bad:
            bad = ["(parameters of another process)"]
    if bad:
        raise FloatingPointError(f"not saving {where}: non-finite values in {', '.join(bad[:5])}")


def rebuild_from_state(config, state: dict[str, torch.Tensor], plan) -> nn.Module:
    """An unsharded model holding a gathered full state dict (FSDP / ZeRO-3 final saves).

    Built on the meta device and filled by assignment, so the host never holds a second
    randomly initialised copy; the policy's structure (LLM LoRA) and trainable flags are redone.

    Args:
        config: The model's ``ModelConfig``.
        state: Full state dict with bare-model names (engine prefixes removed).
        plan: The ``TrainPlan`` in force (gives LoRA structure and trainable flags).
    """
    from monkeytune.model.assembly import build_on_meta
    from monkeytune.model.weights import assign_state_dict, materialize_buffers
    from monkeytune.policy import apply_plan, canonical_name, component_of, prepare_model

    # The base weights first, under their bare names (peft adds prefixes and `base_layer`) ...
    peft = {k for k in state if component_of(k) == "llm_lora"}
    base = {canonical_name(k): v.to("cpu") for k, v in state.items() if k not in peft}
    model = build_on_meta(config)
    expected = model.state_dict()
    tied = [k for k in expected if k not in base]
    assign_state_dict(model, {k: v for k, v in base.items() if k in expected}, "gathered state", tied)
    materialize_buffers(model, "cpu")
    if config.llm.tie_word_embeddings:
        model.llm.tie_weights()
    # ... then the policy's structure (LLM LoRA layers) and their tensors.
    if prepare_model(model, plan):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k in peft:
                params[k].copy_(state[k])
    apply_plan(model, plan)
    return model


def training_record(chat_format: str, dataset: Any, tokenizer: Any, tokenizer_source: str | None) -> dict[str, Any]:
    """What the final folder records about how its model was trained, for every consumer.

    ``eval``, ``chat``, ``serve``, ``score`` and :func:`monkeytune.generate.answer` prompt a
    model the way its training data did (:func:`monkeytune.generate.default_template`) without
    being told, so the run writes it down rather than leaving it to a later step.

    Args:
        chat_format: ``data.template`` (``monkey`` or ``chatml`` conversations).
        dataset: The training dataset (possibly wrapped for skipping or packing); the layout of
            its samples' first user turns gives ``prompt_template``
            (:func:`monkeytune.prompts.infer_template`).
        tokenizer: The tokenizer the run used (saved in the folder too).
        tokenizer_source: The folder it was read from (None: the ``model.from`` folder's own).

    Returns:
        ``{"chat_format", "prompt_template", "tokenizer": {"source", "class", "vocab_size"}}``.
    """
    from monkeytune.prompts import infer_template

    inner = dataset
    while not hasattr(inner, "samples") and (getattr(inner, "base", None) or getattr(inner, "dataset", None)):
        inner = getattr(inner, "base", None) or inner.dataset  # packing wraps skipping wraps the samples
    texts = [s.turns[0].text for s in getattr(inner, "samples", []) if s.turns]
    return {
        "chat_format": chat_format,
        "prompt_template": infer_template(texts, chat_format),
        "tokenizer": {"source": str(Path(tokenizer_source).resolve()) if tokenizer_source else None,
                      "class": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size)},
    }


def save_final(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    mode: str = "full",
    merge_llm_lora: bool = False,
    base_model: str | None = None,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Write the run's final model.

    The model is modified when it carries peft LoRA on the LLM (the wrapper is unloaded, with or
    without merging), so call this last.

    Args:
        model: The bare trained model (not wrapped by the engine).
        tokenizer: Saved beside full models.
        out_dir: Target folder.
        mode: ``full``, ``adapters`` or ``none``.
        merge_llm_lora: Merge LLM LoRA into the LLM weights of the model folder.
        base_model: The ``model.from`` folder, recorded in adapter-only saves.
        metadata: Extra facts for ``config.json``.
        dtype: The dtype the folder's weights are written in (the run's compute dtype under
            bf16/fp16, where frozen weights are held in it already); None keeps them as they are.

    Returns:
        The folder, or None for ``mode == "none"``.

    Raises:
        CheckpointError: the write failed (a full disk says "no space left"); an earlier
            ``out_dir`` is left as it was.
    """
    if mode == "none":
        return None
    assert_finite(model, str(out_dir))
    out_dir = Path(out_dir)
    # Written aside and renamed into place, like checkpoints: a kill mid-save leaves the
    # previous final/ (or none), never one without its config.json.
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_final(model, tokenizer, tmp, mode, merge_llm_lora, base_model, metadata, dtype, final_dir=out_dir)
        publish_folder(tmp, out_dir)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SafetensorError):  # written by peft, straight through safetensors
            e = os_error_of(e, tmp)
            if e is None:
                raise
        raise CheckpointError(f"{write_error(e, f'the final model {out_dir}')}; the checkpoints are unchanged") from None
    return out_dir


def _write_final(model, tokenizer, out_dir: Path, mode: str, merge_llm_lora: bool, base_model, metadata,
                 dtype: torch.dtype | None, final_dir: Path | None = None) -> None:
    """Fill ``out_dir`` (see :func:`save_final`)."""
    from monkeytune.model.io import save_model
    from monkeytune.policy.presets import has_llm_lora
    from monkeytune.policy.quantize import dequantize_4bit

    meta = dict(metadata or {})
    lora = has_llm_lora(model)
    if lora:
        lora_dir = out_dir / ADAPTER_FOLDER
        # Recorded where the folder will be once renamed into place, not in the temporary one.
        final_base = Path(final_dir or out_dir).resolve() / BASE_FOLDER
        save_peft_adapter(model.llm, lora_dir, base_model=final_base)
    # A 4-bit base (llm-qlora) is written as the dense weights the run computed with, never as
    # packed NF4 bytes (which no loader reads back); the dense copy is made on the CPU, of what
    # is written: the whole model, or for adapter-only folders the base LLM of llm_base/.
    written = model if mode == "full" else (model.llm if lora else None)
    dense = written is not None and dequantize_4bit(written, dtype=dtype) > 0
    if dense:
        logger.info("4-bit layers dequantized for writing (%s)", dtype or "as quantised")
    if lora:
        save_base_llm(model.llm, out_dir / BASE_FOLDER)
        meta["llm_lora"] = {"folder": ADAPTER_FOLDER, "merged": bool(merge_llm_lora), "base": BASE_FOLDER}
        if merge_llm_lora and dense:
            _merge_into_dense(model.llm)
        # Trainable flags of the rest survive unloading; the LoRA tensors leave with the wrapper.
        model.llm = model.llm.merge_and_unload() if merge_llm_lora and not dense else model.llm.unload()
        logger.info("LLM LoRA adapters written to %s (%s)", lora_dir, "merged into the model" if merge_llm_lora else "not merged")
    if mode == "adapters":
        if not any(p.requires_grad for p in model.parameters()):
            logger.info("no trainable parameters outside the LLM LoRA; the adapters are in llm_lora/")
            return
        save_model(model, out_dir, tokenizer=tokenizer, trainable_only=True, metadata=meta, base_model=base_model,
                   dtype=dtype)
        return
    save_model(model, out_dir, tokenizer=tokenizer, metadata=meta, dtype=dtype)


def _merge_into_dense(llm: nn.Module) -> int:
    """Add every active LoRA delta of a peft-wrapped LLM into its base layer's weight, in place.

    For bases :func:`~monkeytune.policy.quantize.dequantize_4bit` made dense: peft's own merge
    for 4-bit layers would re-quantise the sum (losing most of a small delta to NF4 rounding)
    and cannot run on the dense layer anyway. Unload the wrapper afterwards.

    Returns:
        Number of layers merged into.
    """
    merged = 0
    with torch.no_grad():
        for module in llm.modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")):
                continue
            weight = module.get_base_layer().weight
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight += module.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
                    merged += 1
    return merged
