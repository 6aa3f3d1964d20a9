"""What goes into a checkpoint folder and how a run picks it up again.

See :mod:`monkeytune.train.checkpoint` for the folder layout and the atomic write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from monkeytune.model.weights import open_safetensors, save_safetensors
from monkeytune.train.checkpoint import CheckpointError, load_rng, load_torch, save_rng, save_torch, write_state
from monkeytune.train.config import TrainConfig
from monkeytune.train.fingerprint import save_fingerprint

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
# The run configuration a run folder and each checkpoint hold (a model folder has MODEL_CONFIG_FILE).
RUN_CONFIG_FILE = "config.yaml"

# Changing these changes the model or the sample order, so the saved position, weights or
# trajectory would no longer belong to the run: refused unless the change is declared as meant.
MUST_MATCH = (
    "data.train", "data.packing", "data.max_length", "data.shuffle", "data.template", "data.padding", "data.streaming",
    "data.truncate_turns", "train.micro_batch_size", "train.seed", "model.preset", "model.config",
    "model.from", "model.init_seed", "policy.preset", "policy.rules", "policy.lora", "policy.unfreeze",
    "optim.name",  # another optimizer cannot load the saved state
)
# Changing these is harmless for resuming. The tokenizer is compared by content (fingerprint),
# not by path.
FREE = {"data.num_workers", "data.view_cache_gib", "data.report_file", "data.synthetic", "model.tokenizer",
        "train.ddp_timeout"} | {"checkpoint", "log"}


def ever_trained_names(model: nn.Module, schedule: Any, step: int) -> list[str]:
    """Parameters trainable in any unfreezing stage that began at or before ``step``.

    Frozen parameters never change, so they are rebuilt from the model source on resume
    instead of being stored in every checkpoint.
    """
    from monkeytune.policy import resolve_plan

    starts = [0] + [s.start_step for s in schedule.stages if s.start_step <= step]
    names: set[str] = set()
    for start in dict.fromkeys(starts):
        names |= {d.name for d in resolve_plan(model, schedule.stage_at(start).plan) if d.trainable}
    return sorted(names)


def save_weights(model: nn.Module, names: list[str], path: Path) -> None:
    """Write the named parameters (tied duplicates stored once) to a safetensors file."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for n in names:
        p = params[n]
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out[n] = p.detach().to("cpu").contiguous()
    save_safetensors(out, path, metadata={"format": "pt"})


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Copy the checkpoint's tensors into the model's parameters of the same names (in place).

    Raises:
        CheckpointError: a stored name the model lacks, or a shape mismatch.
    """
    params = dict(model.named_parameters())
    loaded = []
    with open_safetensors(path) as f, torch.no_grad():
        for n in f.keys():
            if n not in params:
                raise CheckpointError(f"{path}: parameter {n} is not in the model (was the policy or model changed?)")
            t = f.get_tensor(n)
            if t.shape != params[n].shape:
                raise CheckpointError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
            loaded.append(n)
    return loaded


def write_checkpoint(
    folder: Path, *, engine, cfg: TrainConfig, model: nn.Module, optimizer, scheduler,
    names: list[str], state: dict[str, Any], sharded: bool, fingerprint: dict[str, Any],
) -> None:
    """Fill ``folder`` (every rank calls this; rank 0 writes the shared files)."""
    accelerator = engine.accelerator
    if sharded:
        engine.save_sharded(folder / "engine")
    if accelerator.is_main_process:
        if not sharded:
            save_weights(model, names, folder / WEIGHTS_FILE)
            save_torch(optimizer.state_dict(), folder / "optimizer.pt")
        save_torch(scheduler.state_dict(), folder / "scheduler.pt")
        if accelerator.scaler is not None:
            save_torch(accelerator.scaler.state_dict(), folder / "scaler.pt")
        cfg.save(folder / RUN_CONFIG_FILE)
        save_fingerprint(folder, fingerprint)
        write_state(folder, state)
    save_rng(folder, accelerator.process_index)


def load_model_state(folder: Path, model: nn.Module, optimizer, scheduler, sharded: bool) -> None:
    """Before ``accelerator.prepare``: trained weights, optimizer and scheduler states."""
    if not sharded:
        load_weights(model, folder / WEIGHTS_FILE)
        optimizer.load_state_dict(load_torch(folder / "optimizer.pt"))
    scheduler.load_state_dict(load_torch(folder / "scheduler.pt"))


def load_engine_state(folder: Path, engine, sharded: bool) -> None:
    """After ``accelerator.prepare``: sharded engine state, loss scaler, then this rank's RNGs."""
    accelerator = engine.accelerator
    if sharded:
        engine.load_sharded(folder / "engine")
    scaler_file = folder / "scaler.pt"
    if accelerator.scaler is not None and scaler_file.is_file():
        accelerator.scaler.load_state_dict(load_torch(scaler_file))
    if not load_rng(folder, accelerator.process_index):
        logger.warning("%s has no RNG state for rank %d; dropout will differ from an uninterrupted run",
                       folder, accelerator.process_index)


def _flatten(d: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, body in d.items() for k, v in body.items()}


def resume_differences(folder: Path, cfg: TrainConfig, fingerprint: dict[str, Any]) -> tuple[list[str], list[str]]:
    """How the current run differs from the one that wrote checkpoint ``folder``.

    Args:
        folder: The checkpoint.
        cfg: The current configuration.
        fingerprint: :func:`~monkeytune.train.fingerprint.run_fingerprint` of the current run.

    Returns:
        ``(refused, allowed)``: readable lines for changes to settings in :data:`MUST_MATCH` and
        to the data, tokenizer or model contents; and for other changed settings.

    Raises:
        CheckpointError: the checkpoint's ``config.yaml`` cannot be read.
    """
    from monkeytune.train.fingerprint import fingerprint_differences, load_fingerprint

    path = folder / RUN_CONFIG_FILE
    try:
        saved = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    now = _flatten(cfg.to_dict())
    # A setting added after the checkpoint was written is absent there; at its default it
    # changes nothing (e.g. optim.name adamw_torch).
    defaults = _flatten(TrainConfig().to_dict())
    old = load_fingerprint(folder)
    refused, allowed = [], []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) == now.get(key) or key in FREE or key.split(".")[0] in FREE:
            continue
        if key not in saved and key in defaults and now.get(key) == defaults[key]:
            continue
        # An inline model config is listed field by field from the fingerprint below.
        if key == "model.config" and saved.get(key) and now.get(key) and old is not None:
            continue
        line = f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"
        (refused if key in MUST_MATCH else allowed).append(line)
    if old is None:
        logger.warning("%s has no %s (written by an older monkeytune): the data and tokenizer contents "
                       "cannot be compared", folder, "fingerprint.json")
    else:
        if saved.get("model.preset") != now.get("model.preset"):
            # The preset's name is already listed; its field values follow from it.
            old, fingerprint = {**old, "model_config": None}, {**fingerprint, "model_config": None}
        refused += fingerprint_differences(old, fingerprint)
    return refused, allowed


def check_same_run(resume_dir: Path, cfg: TrainConfig, fingerprint: dict[str, Any], accept_changes: bool) -> None:
    """Refuse to resume a different run (every difference listed) unless the change is meant."""
    refused, allowed = resume_differences(resume_dir, cfg, fingerprint)
    if refused and not accept_changes:
        raise CheckpointError(
            f"cannot resume from {resume_dir}: the run differs from the one that wrote it: " + "; ".join(refused)
            + ". Pass --resume-changed if the change is meant (the resumed run then mixes both)"
        )
    for diff in refused:
        logger.warning("resuming with a changed input, as --resume-changed allows (%s)", diff)
    for diff in allowed:
        logger.warning("resuming with a changed setting (%s)", diff)
