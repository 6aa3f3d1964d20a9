"""The engine a run uses: asked for by the launcher, checked, recorded, and what differs behind one adapter.

Engines: ``single`` (one process), ``ddp``, ``fsdp2``, ``deepspeed-zero2`` and
``deepspeed-zero3``. ``accelerate launch`` says which one it wants in the environment it gives
each process; :func:`requested_engine` reads that, :func:`make_accelerator` builds the matching
``accelerate.Accelerator``, and the run stops before anything else is built when the engine
that came up is not the one asked for (accelerate would otherwise quietly fall back to DDP).

:class:`Engine` is the step's only view of the engine: ``backward``, ``clip_grad_norm``,
``optimizer_step`` and ``zero_grad``. DDP's gradient sync, DeepSpeed's update-in-backward and
the fp16 loss scaler all live behind them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monkeytune.train.config import TrainConfig

logger = logging.getLogger(__name__)

ENGINES = ("single", "ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3")
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
RUN_FILE = "run.json"


class EngineError(ValueError):
    """The launcher asked for an engine this run cannot have; the message says why."""


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine(env: dict[str, str] | None = None) -> str:
    """The engine the launcher asked for, from the environment ``accelerate launch`` sets.

    Raises:
        EngineError: for engines monkeytune does not run (ZeRO-0/1, FSDP1).
    """
    env = dict(os.environ) if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        if stage not in ("2", "3"):
            raise EngineError(f"DeepSpeed ZeRO stage {stage or '(unset)'} is not supported: set zero_stage to 2 or 3 "
                              "in the accelerate config")
        return f"deepspeed-zero{stage}"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1") != "2":
            raise EngineError("FSDP1 is not supported (it cannot mix frozen and trained parameters in one wrapped "
                              "layer): set fsdp_version: 2 in the accelerate config")
        return "fsdp2"
    launched = int(env.get("WORLD_SIZE", "1")) > 1
    return "ddp" if launched else "single"


def engine_of(accelerator) -> str:
    """The engine an ``Accelerator`` actually set up."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == "FSDP":
        return "fsdp2" if accelerator.state.fsdp_plugin.fsdp_version == 2 else "fsdp1"
    if kind.startswith("MULTI_"):
        return "ddp"
    return "single"


def make_accelerator(cfg: TrainConfig):
    """The ``accelerate.Accelerator`` for the engine the launcher asked for, or :class:`EngineError`.

    Gradient accumulation is the engine's (so DeepSpeed's own accumulation lines up); the loss
    passed to ``backward`` is multiplied back by the accumulation steps because the engine
    divides by them, and the loop normalises by the step's token count itself. The scheduler
    is stepped by the loop once per optimizer step, not by the engine.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    wanted = requested_engine()
    if wanted == "fsdp2" and not torch.cuda.is_available():
        # accelerate builds FSDP only for accelerator devices; on a CPU it sets up MULTI_CPU
        # (DDP) instead. Refuse rather than train another engine than the one asked for.
        raise EngineError("the launcher asked for FSDP2, which accelerate sets up only on GPUs; on this machine it "
                          "would train plain DDP. Use a DeepSpeed config (ZeRO-2/3 run on CPUs) or ddp.yaml")
    # accelerate keeps precision and accumulation settings process-wide and refuses different
    # ones later; a process may run several trainings (tests, notebooks), so start afresh. The
    # process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    cpu = not torch.cuda.is_available()
    if wanted.startswith("deepspeed") and cpu:
        # DeepSpeed runs on CPUs with its CPU accelerator over gloo; accelerate's CPU mode would
        # drop the DeepSpeed plugin, so the process group is formed here instead.
        PartialState(backend="gloo")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)
    acc = Accelerator(
        # A multi-process CPU group (gloo) forms only when accelerate is told to use the CPU.
        cpu=cpu and wanted == "ddp",
        mixed_precision=MIXED_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp],
    )
    got = engine_of(acc)
    if got != wanted:
        raise EngineError(f"the launcher asked for {wanted} but accelerate set up {got}; "
                          "check the accelerate config and the installed packages")
    if cfg.train.precision == "fp16" and acc.scaler is None and not got.startswith("deepspeed"):
        logger.warning("fp16 mixed precision needs a GPU; on %s the run computes in fp32", acc.device)
    return acc


def configure_engine(accelerator, cfg: TrainConfig) -> None:
    """Give DeepSpeed what it would otherwise read from a prepared DataLoader or a JSON file.

    monkeytune feeds batches itself (its sampler must resume exactly), so the engine learns the
    batch arithmetic here; gradient clipping left at ``auto`` follows ``optim.grad_clip``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip


def is_sharded(accelerator) -> bool:
    """Whether model/optimizer state is sharded by the engine (FSDP, DeepSpeed)."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def write_run_record(run_dir: Path, accelerator, cfg: TrainConfig) -> dict[str, Any]:
    """``run.json``: the engine, world size, precision and versions (main process writes it)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("monkeytune", "torch", "transformers", "accelerate", "peft", "deepspeed"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    record = {
        "engine": engine_of(accelerator),
        "world_size": accelerator.num_processes,
        "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),  # torchrun's node count
        "precision": cfg.train.precision,
        "device": str(accelerator.device),
        "python": platform.python_version(),
        "versions": versions,
    }
    if accelerator.is_main_process:
        (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


@dataclass
class Engine:
    """What differs between engines, as the training step sees it.

    Attributes:
        accelerator: The run's ``Accelerator``.
        module: The prepared (wrapped) training module.
        optimizer: The prepared optimizer.
        params: The parameters whose gradients are clipped (the trainable ones).
    """

    accelerator: Any
    module: Any
    optimizer: Any
    params: list[torch.nn.Parameter]

    @property
    def name(self) -> str:
        return engine_of(self.accelerator)

    @property
    def updates_in_backward(self) -> bool:
        """DeepSpeed applies the update inside its backward at the window's end; it cannot be skipped."""
        return self.name.startswith("deepspeed")

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (``inf``: measure only); returns the total norm."""
        params = list(self.module.parameters()) if self.name == "fsdp2" else self.params
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else float("nan")

    def optimizer_step(self, apply: bool) -> str | None:
        """Update the weights when ``apply``; returns why the engine skipped an update, else None.

        The fp16 loss scaler must see every step (it skips non-finite updates itself and lowers
        the scale); DeepSpeed has already updated inside backward, its wrapper's step is a no-op.
        """
        acc = self.accelerator
        if acc.scaler is not None:
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                return f"fp16 overflow (loss scale now {acc.scaler.get_scale():g})"
            return None
        if apply or self.updates_in_backward:
            self.optimizer.step()
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
