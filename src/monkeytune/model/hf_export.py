"""The LLM of a Monkey model as a plain transformers folder, and its peft adapter pointed at it.

``export_hf_llm`` writes the language model alone as a ``Qwen2ForCausalLM`` folder
(``config.json``, ``model.safetensors``, ``generation_config.json``) plus, when a tokenizer is
given, a ``PreTrainedTokenizerFast`` with the ChatML chat template
(:mod:`monkeytune.tokenizer.hf`). ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it without monkeytune. Text-only prompts give the same
logits as the Monkey model; images need the Monkey model.

An LLM carrying peft LoRA (``llm-lora`` runs) is written merged (``merge_lora=True``, the default:
one self-contained model) or as its base weights with the adapter beside them in
``OUT/llm_lora/``, whose ``base_model_name_or_path`` is ``OUT`` (absolute), so
``AutoPeftModelForCausalLM.from_pretrained(OUT/llm_lora)`` finds its base on its own.

Checkpoints read from official Qwen folders run dynamic NTK and log-n scaling past
``seq_length`` tokens (:mod:`monkeytune.model.qwen_compat`); a plain Qwen2 folder has neither,
so its logits match only up to ``seq_length`` (2048) tokens.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

# peft's names for its own tensors and for the wrapped original layer.
_LORA_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
ADAPTER_FOLDER = "llm_lora"


@contextlib.contextmanager
def quiet_peft_wrapping():
    """Wrap a model with peft without its warning about transformers' deprecated
    ``is_gradient_checkpointing`` (peft 0.21.2, the newest, reads it; transformers 5.25 deprecates
    it): the warning is peft's to fix and says nothing about the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

def has_peft(llm: nn.Module) -> bool:
    """Whether ``llm`` is a peft model (LoRA injected)."""
    return hasattr(llm, "peft_config") and hasattr(llm, "get_base_model")


def base_llm_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a peft-wrapped LLM without its adapters, under the bare model's names.

    No tensor is copied: the base layers' own tensors are returned under names with peft's
    ``base_layer`` segment removed.
    """
    base = llm.get_base_model()
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if not _LORA_TENSOR.search(k)}


def save_peft_adapter(llm: nn.Module, directory: str | Path, base_model: str | Path | None) -> Path:
    """Write the peft adapter folder of ``llm``, recording ``base_model`` as its base.

    Args:
        llm: A peft-wrapped LLM.
        directory: The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base_model: A plain transformers folder holding the base LLM (stored absolute, so the
            adapter works from any working directory), or None.
    """
    directory = Path(directory)
    configs = llm.peft_config
    before = {name: c.base_model_name_or_path for name, c in configs.items()}
    try:
        for c in configs.values():
            c.base_model_name_or_path = str(Path(base_model).resolve()) if base_model is not None else None
        llm.save_pretrained(str(directory))
    finally:
        for name, value in before.items():
            configs[name].base_model_name_or_path = value
    return directory


def save_base_llm(llm: nn.Module, directory: str | Path) -> Path:
    """Write the LLM (without any peft adapters, never merged) as a plain transformers folder."""
    directory = Path(directory)
    if has_peft(llm):
        llm.get_base_model().save_pretrained(str(directory), state_dict=base_llm_state(llm))
    else:
        llm.save_pretrained(str(directory))
    return directory


def unmerged_adapter(directory: str | Path, model: nn.Module) -> Path | None:
    """The ``llm_lora/`` adapter folder a saved model folder holds but has not merged (else None)."""
    info = (getattr(model, "metadata", {}) or {}).get("llm_lora") or {}
    if not info or info.get("merged"):
        return None
    return Path(directory) / info.get("folder", ADAPTER_FOLDER)


def _write_image_tokens(model: nn.Module, llm: nn.Module) -> None:
    """Put a composed model's trained ``<img>`` / ``</img>`` embeddings into the LLM's own table,
    where a plain transformers model looks them up (the model keeps them apart while training)."""
    table = llm.get_input_embeddings().weight
    with torch.no_grad():
        for row, token in enumerate((model.config.image_start_id, model.config.image_end_id)):
            table[token] = model.image_tokens.weight[row].to(table.dtype)


def export_hf_llm(
    model: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    merge_lora: bool = True,
    adapter: str | Path | None = None,
) -> Path:
    """Write ``model.llm`` as a plain transformers causal-LM folder (see the module docstring).

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
        directory: Output folder.
        tokenizer: A monkeytune tokenizer, saved as a ``PreTrainedTokenizerFast`` with ChatML.
        merge_lora: With LLM LoRA: merge it into the weights (True) or write the base weights
            and the adapter in ``llm_lora/`` (False).
        adapter: A peft adapter folder to apply first (a model folder's unmerged ``llm_lora/``).

    Returns:
        The folder.
    """
    from monkeytune.tokenizer.hf import to_transformers_tokenizer

    directory = Path(directory)
    llm = model.llm
    if adapter is not None and not has_peft(llm):
        from peft import PeftModel  # noqa: PLC0415 - heavy, only for this case

        with quiet_peft_wrapping():
            llm = PeftModel.from_pretrained(llm, str(adapter))
    if has_peft(llm) and merge_lora:
        # merge_and_unload changes the wrapped modules in place; the caller's model is the
        # loaded one and is not used afterwards, so no copy is made.
        llm = llm.merge_and_unload()
    if model.config.composed:
        _write_image_tokens(model, llm)
    save_base_llm(llm, directory)
    if has_peft(llm):
        save_peft_adapter(llm, directory / ADAPTER_FOLDER, base_model=directory)
    if tokenizer is not None:
        to_transformers_tokenizer(tokenizer).save_pretrained(str(directory))
    info = json.loads((directory / "config.json").read_text())
    if tokenizer is not None:
        # transformers takes the end and padding ids from the model folder for generate().
        info.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        (directory / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        gen_path = directory / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        gen.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    return directory
