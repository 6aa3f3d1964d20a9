"""The training run: set-up, the loop over optimizer steps, unfreezing stages, the final save.

The step itself (step counts, forward, backward, clip, step, schedule, log, checkpoint) is
:func:`monkeytune.train.step.run_step`; the engine (``accelerate``: DDP, DeepSpeed ZeRO-2/3,
FSDP2 on GPUs) is chosen by the launcher and checked in :mod:`monkeytune.train.engine`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from monkeytune.data.skipping import run_summary
from monkeytune.train.checkpoint import CheckpointManager, read_state, remove_leftovers
from monkeytune.train.config import TrainConfig
from monkeytune.train.engine import (
    Engine,
    compute_precision,
    configure_engine,
    engine_of,
    is_sharded,
    make_accelerator,
    shard_fsdp2,
    write_run_record,
)
from monkeytune.train.final import rebuild_from_state, save_final, training_record
from monkeytune.train.fingerprint import run_fingerprint
from monkeytune.train.lock import claim_run_dir
from monkeytune.train.metrics import PLOT_FILE, MetricsLog, Progress, plot_losses
from monkeytune.train.objectives import build_training_module
from monkeytune.train.optim import build_optimizer, build_scheduler
from monkeytune.train.sampler import Position, micro_batches, stream_batches
from monkeytune.train.setup import (
    COMPUTE_DTYPES,
    SetupError,
    build_data,
    build_schedule,
    build_stream,
    check_engine,
    check_environment,
    check_run_support,
    configure_device,
    effective_config,
    ensure_synthetic_data,
    hold_frozen_in_compute_dtype,
    load_model_and_tokenizer,
    resolve_run_model,
    compose_for_run,
    stream_position,
    total_steps,
)
from monkeytune.train.state import RUN_CONFIG_FILE, check_same_run, ever_trained_names, load_engine_state, load_model_state
from monkeytune.train.step import StepContext, TrainingError, TrainingModule, run_step
from monkeytune.train.trackers import start_trackers

__all__ = ["TrainResult", "TrainingError", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced.

    Attributes:
        run_dir: The run folder.
        steps: Optimizer steps completed (including those of a resumed-from run).
        losses: Loss of every step run by this call (``nan`` for skipped steps).
        final_dir: The final model folder, if one was written.
        last_checkpoint: The newest checkpoint folder, if any.
        model: The trained bare model (modified by the final save when it had LLM LoRA).
    """

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    final_dir: Path | None = None
    last_checkpoint: Path | None = None
    model: Any = None


def _add_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("monkeytune").addHandler(handler)
    return handler


def train(cfg: TrainConfig, resume: str | None = None, on_step: Callable[[dict], None] | None = None,
          accept_changes: bool = False) -> TrainResult:
    """Run (or continue) training as ``cfg`` says.

    Args:
        cfg: The validated run configuration.
        resume: ``latest``, a checkpoint folder or None; overrides ``checkpoint.resume``.
            ``latest`` with no checkpoint yet starts a fresh run.
        on_step: Called on every process after each optimizer step with the step's metrics
            (exceptions propagate: raising there interrupts the run like a crash would).
        accept_changes: Resume even when the data, tokenizer, model or a setting that changes
            the model or the sample order differs from the checkpoint's (each is logged).

    Returns:
        :class:`TrainResult`.

    Raises:
        SetupError, ConfigError, CheckpointError, TrainingError: with a message naming the cause.
    """
    check_environment(cfg)
    acc = make_accelerator(cfg)
    check_run_support(cfg, engine_of(acc), acc.device.type)
    run_dir = Path(cfg.checkpoint.output_dir)
    lock = claim_run_dir(run_dir, acc)
    handler = _add_file_log(run_dir) if acc.is_main_process else None
    ctx = None
    try:
        run = _open_run(cfg, acc, run_dir, resume, accept_changes)
        model, tokenizer, schedule, stage = _load_model(run)
        dataset, collator, sampler = _build_data(run, model, tokenizer)
        trained_with = _trained_with(run, dataset, tokenizer)
        ctx, position = _prepare_step(run, build_training_module(run.cfg, model, dataset), schedule, stage,
                                      total_steps(run.cfg, sampler.batches_per_epoch), sampler.batches_per_epoch)
        stream = _batches(run, dataset, collator, sampler, position)
        result = TrainResult(run.dir, run.start_step, last_checkpoint=run.resume_dir)
        for step in range(run.start_step + 1, ctx.total_steps + 1):
            _enter_stage(ctx, schedule.stage_at(step - 1), step - 1)
            row = run_step(ctx, step, [next(stream) for _ in range(run.cfg.train.grad_accum)])
            result.losses.append(row["loss"])
            result.steps = step
            if on_step is not None:
                on_step(row)
        result.last_checkpoint = ctx.last_checkpoint
        ctx.progress.close()
        ctx.metrics.close()
        skipped = _skip_summary(run, dataset) if run.main else None
        if skipped:
            logger.warning("bad samples: %s", skipped)
        acc.wait_for_everyone()
        result.final_dir = _finish(run.cfg, ctx, model, tokenizer, run.dir, trained_with)
        result.model = model
        return result
    finally:
        if ctx is not None:
            ctx.metrics.close()  # a crashed run's tracker files are flushed and its W&B/MLflow run ended too
        if handler is not None:
            logging.getLogger("monkeytune").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """What a run settles once, at its start: its configuration, folder, and whether it resumes.

    Attributes:
        cfg: The effective configuration (the model spec resolved; what the run saves).
        acc: The ``accelerate.Accelerator``.
        loading: How batches reach the device (DataLoader workers, pinned memory).
        dir: The run folder.
        checkpoints: Its checkpoints.
        resolved: The resolved model spec.
        resume_dir: The checkpoint resumed from (None: a fresh run).
        saved: That checkpoint's trainer state (None: a fresh run).
        fingerprint: What the run reads, stored in every checkpoint.
    """

    cfg: TrainConfig
    acc: Any
    loading: Any
    dir: Path
    checkpoints: CheckpointManager
    resolved: Any
    resume_dir: Path | None
    saved: dict[str, Any] | None
    fingerprint: dict[str, Any]

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def start_step(self) -> int:
        return int(self.saved["step"]) if self.saved else 0


def _open_run(cfg: TrainConfig, acc, run_dir: Path, resume: str | None, accept_changes: bool) -> _Run:
    """Prepare the run folder, resolve the model spec and take the resume decision (once)."""
    loading = configure_device(cfg, acc.device, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    main = acc.is_main_process
    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, main, acc.wait_for_everyone)
    if main:
        # Nothing else writes here while the lock is held, so these are crash leftovers.
        remove_leftovers(run_dir)
        remove_leftovers(ckpts.root)
    ensure_synthetic_data(cfg, acc)
    cfg = compose_for_run(cfg, acc, run_dir)
    # The model spec is resolved once; from here on the run uses (and saves) what it resolved to.
    resolved = resolve_run_model(cfg)
    cfg = effective_config(cfg, resolved)
    resume_dir = _resume_dir(ckpts, resume if resume is not None else cfg.checkpoint.resume)
    fingerprint = run_fingerprint(cfg, resolved.tokenizer_dir)
    if resume_dir is not None:
        check_same_run(resume_dir, cfg, fingerprint, accept_changes)
    if main:
        print("resolved configuration:\n" + cfg.to_yaml(), flush=True)
        cfg.save(run_dir / RUN_CONFIG_FILE)
    record = write_run_record(run_dir, acc, cfg)
    logger.info("engine %s, %d process(es), precision %s, device %s", record["engine"], record["world_size"],
                record["precision"], record["device"])
    logger.info("data loading: %d worker(s) per process%s", loading.num_workers,
                ", pinned memory" if loading.pin_memory else "")
    return _Run(cfg, acc, loading, run_dir, ckpts, resolved, resume_dir,
                read_state(resume_dir) if resume_dir else None, fingerprint)


def _resume_dir(ckpts: CheckpointManager, resume: str | None) -> Path | None:
    """The checkpoint ``resume`` names (None: a fresh run, refused over an earlier run's checkpoints)."""
    resume_dir = ckpts.resolve(resume) if resume else None
    if resume == "latest" and resume_dir is None:
        logger.info("no checkpoint under %s yet: starting a fresh run", ckpts.root)
    if resume_dir is None and ckpts.checkpoints():
        # A fresh run would interleave its checkpoints with the old ones (and prune by step).
        raise SetupError(f"{ckpts.root} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another checkpoint.output_dir")
    return resume_dir


def _load_model(run: _Run):
    """``(model, tokenizer, schedule, stage)``: the model with the plan of the stage in force."""
    from monkeytune.policy import apply_plan

    cfg, acc = run.cfg, run.acc
    model, tokenizer = load_model_and_tokenizer(cfg, device=acc.device, resolved=run.resolved)
    precision = compute_precision(acc, cfg)
    _, schedule = build_schedule(cfg, model, precision)  # llm-qlora: the 4-bit compute dtype
    # The stage in force when the checkpoint was written (the loop switches to the next
    # stage before its first step, exactly as the uninterrupted run did).
    stage = _stage_by_index(schedule, int(run.saved["stage"])) if run.saved else schedule.stage_at(0)
    apply_plan(model, stage.plan)
    # Every stage's start is counted: a parameter a later stage trains keeps its fp32 master.
    ever_trained = set(ever_trained_names(model, schedule, step=2**62))
    saved_bytes = hold_frozen_in_compute_dtype(model, ever_trained, precision)
    if saved_bytes:
        logger.info("frozen weights held in %s: %.2f GiB less", precision, saved_bytes / 2**30)
    return model, tokenizer, schedule, stage


def _build_data(run: _Run, model, tokenizer):
    """``(dataset, collator, sampler)`` of this rank: map-style, or streamed (``data.streaming``)."""
    acc = run.acc
    if run.cfg.data.streaming:
        return build_stream(run.cfg, tokenizer, model.config, run.dir, acc.process_index, acc.num_processes,
                            run.loading.num_workers)
    return build_data(run.cfg, tokenizer, model.config, run.dir, acc.process_index, acc.num_processes)


def _trained_with(run: _Run, dataset, tokenizer) -> dict[str, Any]:
    """What the final folder records of the training (prompt template, chat format)."""
    trained_with = training_record(run.cfg.data.template, dataset, tokenizer,
                                   run.resolved.tokenizer_dir or run.cfg.model.from_dir)
    if run.main:
        logger.info("the final model will record prompt template %s (chat format %s)",
                    trained_with["prompt_template"], trained_with["chat_format"])
    return trained_with


def _prepare_step(run: _Run, module: TrainingModule, schedule, stage, steps_total: int,
                  batches_per_epoch: int) -> tuple[StepContext, Position]:
    """The engine-wrapped training module (the model and its objective) and optimizer, restored
    when resuming, in the step's context; and the data position to start from."""
    from accelerate.utils import send_to_device, set_seed

    from monkeytune.policy import apply_stage, plan_report

    cfg, acc, sharded = run.cfg, run.acc, is_sharded(run.acc)
    model, objective = module.model, module
    if engine_of(acc) == "fsdp2":
        # before the optimizer: it replaces the parameters
        module = shard_fsdp2(module, cfg.train.precision, cfg.train.grad_reduce_dtype)
    optimizer = build_optimizer(model, cfg.optim, cfg.policy.lr, cfg.policy.no_decay, bool(schedule.stages),
                                extra=module.extra_parameters())
    scheduler = build_scheduler(optimizer, cfg.optim, steps_total)
    apply_stage(model, optimizer, stage, scheduler)
    if run.main:
        print(plan_report(model, stage.plan).to_text(), flush=True)
    if run.saved:
        load_model_state(run.resume_dir, model, optimizer, scheduler, sharded)
    set_seed(cfg.train.seed)
    configure_engine(acc, cfg)
    if engine_of(acc) == "fsdp2":
        optimizer = acc.prepare(optimizer)  # the module is sharded already
    else:
        module, optimizer = acc.prepare(module, optimizer)
    check_engine(acc, cfg)
    engine = Engine(acc, module, optimizer, [p for p in objective.parameters() if p.requires_grad])
    logger.info("gradients accumulate and reduce in %s", engine.grad_reduce_dtype(cfg.train.grad_reduce_dtype))
    position = _start_position(run)
    if run.saved:
        load_engine_state(run.resume_dir, engine, sharded)
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", run.resume_dir, run.start_step,
                    position.epoch, position.batch)
    resume_step = run.start_step if run.saved else None
    start_trackers(acc, cfg, resume_step)
    ctx = StepContext(
        cfg=cfg, engine=engine, model=model, objective=objective, scheduler=scheduler, schedule=schedule,
        stage_index=stage.index,
        sharded=sharded, metrics=MetricsLog(run.dir, run.main, acc, resume_step=resume_step),
        progress=Progress(steps_total, run.start_step, run.main and cfg.log.progress), checkpoints=run.checkpoints,
        batches_per_epoch=batches_per_epoch, total_steps=steps_total, send_to_device=send_to_device,
        bad_steps=int(run.saved.get("bad_steps", 0)) if run.saved else 0, last_checkpoint=run.resume_dir,
        fingerprint=run.fingerprint,
    )
    return ctx, position


def _start_position(run: _Run) -> Position:
    """Where the data starts: the beginning, or the resumed checkpoint's position."""
    if not run.saved:
        return Position()
    acc = run.acc
    if run.cfg.data.streaming:
        return stream_position(run.saved, acc.process_index, acc.num_processes, run.loading.num_workers)
    return _map_position(run.saved, acc.num_processes)


def _batches(run: _Run, dataset, collator, sampler, position: Position):
    """The endless stream of ``(position, micro-batch)`` from ``position``."""
    cfg, loading = run.cfg, run.loading
    if cfg.data.streaming:
        return stream_batches(dataset, position, cfg.train.seed, loading.pin_memory)
    return micro_batches(dataset, sampler, collator, position, loading.num_workers, cfg.train.seed,
                         pin_memory=loading.pin_memory)


def _skip_summary(run: _Run, dataset) -> str | None:
    return dataset.summary() if run.cfg.data.streaming else run_summary(dataset)


def _stage_by_index(schedule, index: int):
    """The :class:`StageState` of stage ``index`` (-1: the base plan)."""
    if not -1 <= index < len(schedule.stages):
        raise SetupError(f"the checkpoint is in unfreezing stage {index} but policy.unfreeze has {len(schedule.stages)}")
    return schedule.stage_at(schedule.stages[index].start_step if index >= 0 else -1)


def _map_position(saved: dict[str, Any], world_size: int) -> Position:
    """The saved data position, translated when the number of processes changed."""
    epoch, batch, old = int(saved["epoch"]), int(saved["batch"]), int(saved.get("world_size", world_size))
    if old != world_size:
        logger.warning("checkpoint was written by %d processes, resuming on %d: the data position is "
                       "mapped to the nearest micro-batch and the run is no longer bit-exact", old, world_size)
        batch = batch * old // world_size
    return Position(epoch, batch)


def _enter_stage(ctx: StepContext, stage, step: int) -> None:
    """Switch to the unfreezing stage in force at ``step`` when it changed."""
    from monkeytune.policy import apply_stage, check_trainable_consistent, rewrap_ddp

    if stage.index == ctx.stage_index:
        return
    change = apply_stage(ctx.model, ctx.inner_optimizer, stage, ctx.scheduler)
    # Compare ranks first: a mismatch then names the parameters instead of failing inside the
    # DDP constructor.
    check_trainable_consistent(ctx.model)
    engine = ctx.engine
    if change.changed and isinstance(engine.module, torch.nn.parallel.DistributedDataParallel):
        engine.module = rewrap_ddp(engine.module)
    engine.params = [p for p in ctx.objective.parameters() if p.requires_grad]
    ctx.stage_index = stage.index
    ctx.progress.write(f"step {step}: unfreezing stage {stage.index} "
                       f"(+{len(change.newly_trainable)} / -{len(change.newly_frozen)} trainable tensors)")


def _finish(cfg: TrainConfig, ctx: StepContext, model, tokenizer, run_dir: Path,
            trained_with: dict[str, Any]) -> Path | None:
    """Final save (recording ``trained_with``, see :func:`training_record`) and loss plot."""
    acc = ctx.engine.accelerator
    final_dir = None
    if cfg.checkpoint.final_save != "none":
        if ctx.sharded:
            # Under FSDP / ZeRO-3 the bare model holds only this process's shards: gather the
            # full state (every process takes part) and rebuild an unsharded model from it.
            state = ctx.engine.full_state_dict()
            if acc.is_main_process:
                # The model's weights only: an objective's own head is not part of the model.
                bare = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
                # Sharded runs have no unfreezing stages, so the base plan is the one in force.
                model = rebuild_from_state(model.config, bare, ctx.schedule.plan)
        if acc.is_main_process:
            final_dir = save_final(
                model, tokenizer, run_dir / "final", cfg.checkpoint.final_save,
                merge_llm_lora=cfg.checkpoint.merge_llm_lora, base_model=cfg.model.from_dir,
                metadata=trained_with,
                dtype=COMPUTE_DTYPES.get(compute_precision(acc, cfg)),
            )
            logger.info("final model written to %s", final_dir)
    if acc.is_main_process and cfg.log.plot:
        plot_losses(run_dir / "metrics.jsonl", run_dir / PLOT_FILE)
    acc.wait_for_everyone()
    return final_dir
