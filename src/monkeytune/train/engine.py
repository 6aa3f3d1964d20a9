"""The engine a run uses: asked for by the launcher, checked, recorded, and what differs behind one adapter.

Engines: ``single`` (one process), ``ddp``, ``fsdp2``, ``deepspeed-zero2`` and
``deepspeed-zero3``. ``accelerate launch`` says which one it wants in the environment it gives
each process; :func:`requested_engine` reads that, :func:`make_accelerator` builds the matching
``accelerate.Accelerator``, and the run stops before anything else is built when the engine
that came up is not the one asked for (accelerate would otherwise quietly fall back to DDP).

* ``single``, ``ddp``, ``deepspeed-*``: ``accelerate`` wraps the model and keeps the engine
  state (``prepare``, ``save_state``).
* ``fsdp2``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each LLM decoder
  layer, each ViT block and the rest, on GPUs and CPUs (gloo) alike; accelerate only forms the
  process group and accumulates. (accelerate sets FSDP up for GPUs only, so it would have run
  DDP on a CPU.) Sharded checkpoints go through ``torch.distributed.checkpoint``.

:class:`Engine` is the step's only view of the engine: ``backward``, ``clip_grad_norm``,
``optimizer_step`` and ``zero_grad``; checkpoints use its ``save_sharded`` / ``load_sharded``.
DDP's gradient sync, DeepSpeed's update-in-backward, FSDP2's sharded gradients and the fp16
loss scaler all live behind them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from monkeytune.train.config import TrainConfig
from monkeytune.train.trackers import accelerator_kwargs

logger = logging.getLogger(__name__)

ENGINES = ("single", "ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3")
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
RUN_FILE = "run.json"
# Set in the environment when monkeytune takes accelerate's FSDP request over (see make_accelerator).
FSDP2_MARK = "MONKEYTUNE_ENGINE"


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
    if env.get(FSDP2_MARK) == "fsdp2":  # an earlier run in this process took the FSDP request over
        return "fsdp2"
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


def _check_fsdp_settings() -> None:
    """The fsdp_config settings monkeytune's FSDP2 wrapping does not honour are refused by name."""
    unsupported = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params", "FSDP_ACTIVATION_CHECKPOINTING":
                   "fsdp_activation_checkpointing (use train.gradient_checkpointing)"}
    for var, name in unsupported.items():
        if _flag(dict(os.environ), var):
            raise EngineError(f"{name} is not supported by monkeytune's FSDP2 engine: set it to false")


def engine_of(accelerator) -> str:
    """The engine an ``Accelerator`` actually set up (``fsdp2`` when monkeytune shards itself)."""
    kind = accelerator.distributed_type.value
    if os.environ.get(FSDP2_MARK) == "fsdp2" and kind.startswith("MULTI_"):
        return "fsdp2"
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
    from datetime import timedelta

    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils.dataclasses import DDPCommunicationHookType

    wanted = requested_engine()
    if wanted == "fsdp2":
        if cfg.train.precision == "fp16":
            raise EngineError("fsdp2 runs in bf16 or fp32 (its sharded gradients have no fp16 loss scaler here): "
                              "set train.precision bf16")
        _check_fsdp_settings()
        # monkeytune shards with FSDP2 itself (see the module docstring): accelerate is asked for
        # plain data parallelism, and the request is kept (for engine_of, and for later runs in
        # this process, which must not then take the changed variable for a DDP request).
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        os.environ[FSDP2_MARK] = "fsdp2"
    # accelerate keeps precision and accumulation settings process-wide and refuses different
    # ones later; a process may run several trainings (tests, notebooks), so start afresh. The
    # process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    cpu = not torch.cuda.is_available()
    # Rank 0 alone writes checkpoints while the others wait in a barrier: the default 10-minute
    # NCCL timeout can end a run during its last save.
    timeout = timedelta(seconds=cfg.train.ddp_timeout)
    if wanted.startswith("deepspeed") and cpu:
        # DeepSpeed runs on CPUs with its CPU accelerator over gloo; accelerate's CPU mode would
        # drop the DeepSpeed plugin, so the process group is formed here instead.
        PartialState(backend="gloo", timeout=timeout)
    # bf16 gradient reduction under DDP is a communication hook; fp32 gradients reduce as they are.
    hook = DDPCommunicationHookType.BF16 if cfg.train.grad_reduce_dtype == "bf16" else DDPCommunicationHookType.NO
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters, comm_hook=hook)
    acc = Accelerator(
        # A multi-process CPU group (gloo) forms only when accelerate is told to use the CPU.
        cpu=cpu and wanted in ("ddp", "fsdp2"),
        mixed_precision=MIXED_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp, InitProcessGroupKwargs(timeout=timeout)],
        **accelerator_kwargs(cfg),  # log.trackers
    )
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != MIXED_PRECISION[cfg.train.precision]:
        logger.warning("the launcher's mixed_precision %s is not used: train.precision %s decides",
                       launcher, cfg.train.precision)
    got = engine_of(acc)
    if got != wanted:
        raise EngineError(f"the launcher asked for {wanted} but accelerate set up {got}; "
                          "check the accelerate config and the installed packages")
    if cfg.train.precision == "fp16" and acc.scaler is None and not got.startswith("deepspeed"):
        logger.warning("fp16 mixed precision needs a GPU; on %s the run computes in fp32", acc.device)
    return acc


def compute_precision(accelerator, cfg: TrainConfig) -> str:
    """The precision the run really computes in: fp16 without a loss scaler (no GPU) is fp32."""
    if cfg.train.precision == "fp16" and accelerator.scaler is None and not engine_of(accelerator).startswith("deepspeed"):
        return "fp32"
    return cfg.train.precision


def configure_engine(accelerator, cfg: TrainConfig) -> None:
    """Give DeepSpeed what it would otherwise read from a prepared DataLoader or a JSON file.

    monkeytune feeds batches itself (its sampler must resume exactly), so the engine learns the
    batch arithmetic here; gradient clipping left at ``auto`` follows ``optim.grad_clip``.
    Gradients accumulate and reduce in ``train.grad_reduce_dtype``: DeepSpeed's own default
    under bf16 is bf16 for both, where DDP and FSDP2 use fp32, so one configuration would train
    differently per engine.

    Raises:
        EngineError: the DeepSpeed config sets a gradient dtype other than ``train.grad_reduce_dtype``.
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
    wanted = cfg.train.grad_reduce_dtype
    for key, table in (("communication_data_type", ds), ("grad_accum_dtype", ds.setdefault("data_types", {}))):
        given = table.get(key, "auto")
        if given not in ("auto", None, wanted):
            raise EngineError(f"the DeepSpeed config sets {key} {given} but train.grad_reduce_dtype is {wanted}: "
                              f"remove {key} from the DeepSpeed config (monkeytune sets it from train.grad_reduce_dtype)")
        table[key] = wanted


SHARDING_ENGINES = ("fsdp2", "fsdp1", "deepspeed-zero2", "deepspeed-zero3")


def is_sharded(accelerator) -> bool:
    """Whether model/optimizer state is sharded by the engine (FSDP2, DeepSpeed)."""
    return engine_of(accelerator) in SHARDING_ENGINES


def shard_fsdp2(module: torch.nn.Module, precision: str, reduce: str = "fp32") -> torch.nn.Module:
    """Shard the training module with FSDP2: each LLM decoder layer, each ViT block, then the rest.

    Call before the optimizer is built: FSDP2 replaces the parameters with sharded ones (the
    names and ``requires_grad`` stay). bf16 runs compute in bf16; gradients accumulate and
    reduce in ``reduce`` (``train.grad_reduce_dtype``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = module.model
    reduce_dtype = torch.bfloat16 if reduce == "bf16" else torch.float32
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) \
        if precision == "bf16" else MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "yes")
    for block in model.vision.blocks:
        fully_shard(block, mp_policy=mixed, reshard_after_forward=reshard)
    # A decoder layer's inputs arrive in the compute dtype already (the previous layer's output),
    # and its keyword arguments carry the rotary cos/sin, which the Qwen compat layer keeps in
    # fp32 so that q and k rotate in fp32 as the official code does: casting them would round
    # the rotation to bf16 under FSDP2 only.
    layer_policy = MixedPrecisionPolicy(param_dtype=mixed.param_dtype, reduce_dtype=mixed.reduce_dtype,
                                        cast_forward_inputs=False)
    for layer in model.llm.get_decoder().layers:
        fully_shard(layer, mp_policy=layer_policy, reshard_after_forward=reshard)
    # The root's inputs keep their dtype: the per-sample loss weights must stay fp32 (the model
    # casts pixel values to its own dtype itself).
    root = MixedPrecisionPolicy(param_dtype=mixed.param_dtype, reduce_dtype=mixed.reduce_dtype,
                                cast_forward_inputs=False)
    fully_shard(module, mp_policy=root, reshard_after_forward=reshard)
    return module


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
        "precision": compute_precision(accelerator, cfg),
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
        """DeepSpeed applies the update inside its backward at the step's last micro-batch; it cannot be skipped."""
        return self.name.startswith("deepspeed")

    def grad_reduce_dtype(self, configured: str) -> str:
        """The dtype gradients accumulate and reduce in: DeepSpeed's own report, else ``configured``.

        Args:
            configured: ``train.grad_reduce_dtype`` (what DDP's hook and FSDP2's policy were given).
        """
        if not self.updates_in_backward:
            return {"fp32": "float32", "bf16": "bfloat16"}[configured]
        reduce, accumulate = self.module.communication_data_type, self.module.get_data_types()[1]
        names = [str(d).removeprefix("torch.") for d in (reduce, accumulate)]
        return names[0] if reduce == accumulate else f"{names[0]} (accumulated in {names[1]})"

    @contextmanager
    def accumulate(self) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients sync at the step's last one.

        accelerate skips DDP's gradient all-reduce before a step's last micro-batch, and DeepSpeed knows
        the step's length itself; FSDP2 is told here, since accelerate does not know the model is FSDP2-sharded
        and would otherwise let it reduce-scatter after every micro-batch.
        """
        with self.accelerator.accumulate(self.module):
            if self.name == "fsdp2":
                self.module.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (``inf``: measure only); returns the total norm."""
        norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        if norm is None:
            return float("nan")
        # Under FSDP2 the norm of sharded gradients is a DTensor; its full value is the same on every rank.
        return float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)

    def optimizer_step(self, apply: bool) -> str | None:
        """Update the weights when ``apply``; returns why the engine skipped an update, else None.

        The fp16 loss scaler sees every step (it lowers the scale after non-finite gradients);
        DeepSpeed has already updated inside backward (its wrapper's step is a no-op) and reports
        whether it skipped the update (its own fp16 overflow check).
        """
        acc = self.accelerator
        if acc.scaler is not None:
            if not apply:
                acc.scaler.update()  # lowers the scale after inf/NaN gradients; no update is made
                return None
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                return f"fp16 overflow (loss scale now {acc.scaler.get_scale():g})"
            return None
        if self.updates_in_backward:
            self.optimizer.step()
            was_applied = getattr(self.module, "was_step_applied", None)
            if was_applied is not None and not was_applied():
                return "DeepSpeed skipped the update (gradient overflow)"
            return None
        if apply:
            self.optimizer.step()
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save_sharded(self, folder: Path) -> None:
        """Write the sharded model and optimizer state (every rank takes part)."""
        if self.name != "fsdp2":
            self.accelerator.save_state(str(folder))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, _inner(self.optimizer))
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
        except dcp.api.CheckpointException as e:
            raise _os_error(e, folder) from None

    def load_sharded(self, folder: Path) -> None:
        """Read what :meth:`save_sharded` wrote into the wrapped model and optimizer."""
        if self.name != "fsdp2":
            self.accelerator.load_state(str(folder))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, _inner(self.optimizer))
        state = {"model": model_state, "optimizer": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except dcp.api.CheckpointException as e:
            raise _os_error(e, folder) from None
        set_state_dict(self.module, _inner(self.optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded state of the training module, on the main process (every rank takes part)."""
        if self.name == "deepspeed-zero2" and not self.accelerator.is_main_process:
            # ZeRO-2 holds the whole model on every rank and gathers nothing here: the other ranks
            # would each copy it to host memory for nothing (8 x 19 GB for monkey-7b on 8 GPUs).
            return {}
        if self.name != "fsdp2":
            return self.accelerator.get_state_dict(self.module)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _os_error(error: BaseException, folder: Path) -> OSError:
    """The first ``OSError`` behind a failed ``torch.distributed.checkpoint`` call (e.g. a full disk).

    The checkpoint code reports an ``OSError`` in one line with the path; the distributed
    checkpoint's own exception would otherwise reach the user as a traceback.
    """
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return OSError(f"{folder}: the distributed checkpoint failed: {str(error).splitlines()[0]}")
