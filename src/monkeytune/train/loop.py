"""The training loop: accumulation windows normalised as a whole, bad-step skipping, checkpoints.

One optimizer step ("window") is ``grad_accum`` micro-batches on every process. The window's
micro-batches are drawn first, their supervised-token (or sample) counts summed over all ranks,
and each micro-batch then backpropagates ``loss_sum / window_count``; see
:mod:`monkeytune.train.losses`. The engine (``accelerate``) provides mixed precision, gradient
synchronisation (DDP / FSDP / DeepSpeed) and the accumulation context.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from monkeytune.data.skipping import run_summary
from monkeytune.train.checkpoint import CheckpointManager, read_state
from monkeytune.train.config import TrainConfig
from monkeytune.train.final import assert_finite, rebuild_from_state, save_final
from monkeytune.train.losses import TrainingModule, sample_weights, supervised_count
from monkeytune.train.metrics import PLOT_FILE, MetricsLog, Progress, plot_losses
from monkeytune.train.optim import build_optimizer, build_scheduler
from monkeytune.train.sampler import Position, micro_batches
from monkeytune.train.setup import (
    SetupError,
    build_data,
    build_schedule,
    check_engine,
    configure_engine,
    ensure_synthetic_data,
    is_sharded,
    load_model_and_tokenizer,
    make_accelerator,
    total_steps,
)
from monkeytune.train.state import (
    compare_configs,
    ever_trained_names,
    load_engine_state,
    load_model_state,
    write_checkpoint,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


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


def train(cfg: TrainConfig, resume: str | None = None, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or continue) training as ``cfg`` says.

    Args:
        cfg: The validated run configuration.
        resume: ``latest``, a checkpoint folder or None; overrides ``checkpoint.resume``.
            ``latest`` with no checkpoint yet starts a fresh run.
        on_step: Called on every process after each optimizer step with the step's metrics
            (exceptions propagate: raising there interrupts the run like a crash would).

    Returns:
        :class:`TrainResult`.

    Raises:
        SetupError, ConfigError, CheckpointError, TrainingError: with a message naming the cause.
    """
    from accelerate.utils import send_to_device, set_seed

    from monkeytune.policy import apply_plan, apply_stage, check_trainable_consistent, plan_report, rewrap_ddp

    acc = make_accelerator(cfg)
    main = acc.is_main_process
    run_dir = Path(cfg.checkpoint.output_dir)
    handler = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = _add_file_log(run_dir)
    try:
        ensure_synthetic_data(cfg, acc)
        ckpts = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, main, acc.wait_for_everyone)
        spec = resume if resume is not None else cfg.checkpoint.resume
        resume_dir = ckpts.resolve(spec) if spec else None
        if spec == "latest" and resume_dir is None:
            logger.info("no checkpoint under %s yet: starting a fresh run", ckpts.root)
        if resume_dir is None and ckpts.checkpoints():
            # A fresh run would interleave its checkpoints with the old ones (and prune by step).
            raise SetupError(f"{ckpts.root} holds checkpoints of an earlier run: pass --resume to continue it, "
                             "or choose another checkpoint.output_dir")
        saved = read_state(resume_dir) if resume_dir else None
        if resume_dir is not None:
            for diff in compare_configs(resume_dir, cfg):
                logger.warning("resuming with a changed setting (%s)", diff)
        if main:
            print("resolved configuration:\n" + cfg.to_yaml(), flush=True)
            cfg.save(run_dir / "config.yaml")

        model, tokenizer = load_model_and_tokenizer(cfg, device=acc.device)
        plan, schedule = build_schedule(cfg, model)
        sharded = is_sharded(acc)
        if sharded and schedule.stages:
            raise SetupError("policy.unfreeze stages need a plain or DDP run: FSDP and DeepSpeed fix the "
                             "trainable set when they wrap the model")
        start_step = int(saved["step"]) if saved else 0
        # The stage in force when the checkpoint was written (the loop switches to the next
        # stage before its first step, exactly as the uninterrupted run did).
        stage = _stage_by_index(schedule, int(saved["stage"])) if saved else schedule.stage_at(0)
        apply_plan(model, stage.plan)
        optimizer = build_optimizer(model, cfg.optim, cfg.policy.lr, cfg.policy.no_decay, bool(schedule.stages))
        dataset, collator, sampler = build_data(cfg, tokenizer, model.config, run_dir, acc.process_index, acc.num_processes)
        steps_total = total_steps(cfg, sampler.batches_per_epoch)
        scheduler = build_scheduler(optimizer, cfg.optim, steps_total)
        apply_stage(model, optimizer, stage, scheduler)
        if main:
            print(plan_report(model, stage.plan).to_text(), flush=True)
        position = Position()
        bad_steps = 0
        if saved:
            load_model_state(resume_dir, model, optimizer, scheduler, sharded)
            position = _map_position(saved, acc.num_processes)
            bad_steps = int(saved.get("bad_steps", 0))
        set_seed(cfg.train.seed)
        configure_engine(acc, cfg)
        module, optimizer = acc.prepare(TrainingModule(model), optimizer)
        check_engine(acc, cfg)
        if saved:
            load_engine_state(resume_dir, acc, sharded)
            logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", resume_dir, start_step,
                        position.epoch, position.batch)

        loop = _Loop(cfg, acc, module, model, optimizer, scheduler, schedule, stage.index, sharded)
        metrics = MetricsLog(run_dir, main, cfg.log.tensorboard, resume_step=start_step if saved else None)
        progress = Progress(steps_total, start_step, main and cfg.log.progress)
        stream = micro_batches(dataset, sampler, collator, position, cfg.data.num_workers, cfg.train.seed)
        result = TrainResult(run_dir, start_step, last_checkpoint=resume_dir)
        step = start_step
        t_last = time.perf_counter()
        while step < steps_total:
            new_stage = schedule.stage_at(step)
            if new_stage.index != loop.stage_index:
                change = apply_stage(model, loop.inner_optimizer, new_stage, scheduler)
                # Compare ranks first: a mismatch then names the parameters instead of failing
                # inside the DDP constructor.
                check_trainable_consistent(model)
                if change.changed and isinstance(loop.module, torch.nn.parallel.DistributedDataParallel):
                    loop.module = rewrap_ddp(loop.module)
                loop.stage_index = new_stage.index
                progress.write(f"step {step}: unfreezing stage {new_stage.index} "
                               f"(+{len(change.newly_trainable)} / -{len(change.newly_frozen)} trainable tensors)")
            window = [next(stream) for _ in range(cfg.train.grad_accum)]
            position = window[-1][0]
            info = loop.step([b for _, b in window], send_to_device)
            step += 1
            bad_steps = bad_steps + 1 if info["bad"] else 0
            now = time.perf_counter()
            row = {
                "step": step,
                "epoch": round(position.epoch + position.batch / sampler.batches_per_epoch, 4),
                "loss": info["loss"], "lr": info["lr"], "grad_norm": info["grad_norm"],
                "tokens": info["tokens"], "samples": info["samples"],
                "tokens_per_s": round(info["input_tokens"] / max(now - t_last, 1e-9), 1),
                "skipped": not info["applied"],
            }
            t_last = now
            result.losses.append(info["loss"])
            result.steps = step
            if not info["applied"]:
                progress.write(f"step {step}: {info['reason']}; step skipped" + (f" ({bad_steps} in a row)" if bad_steps else ""))
                logger.warning("step %d skipped: %s", step, info["reason"])
                if bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last: {info['reason']}); "
                        "stopping. Lower optim.lr, check the data, or use train.precision bf16/fp32."
                    )
            if step % cfg.log.every == 0 or step == steps_total:
                metrics.log(row)
            progress.update(info["loss"], info["lr"], row["tokens_per_s"])
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                state = {"step": step, "epoch": position.epoch, "batch": position.batch,
                         "stage": loop.stage_index, "bad_steps": bad_steps,
                         "world_size": acc.num_processes, "micro_batch_size": cfg.train.micro_batch_size,
                         "grad_accum": cfg.train.grad_accum, "total_steps": steps_total}
                result.last_checkpoint = loop.save_checkpoint(ckpts, state)
            if on_step is not None:
                on_step(row)
        progress.close()
        metrics.close()
        skipped = run_summary(dataset) if main else None
        if skipped:
            logger.warning("bad samples: %s", skipped)
        acc.wait_for_everyone()
        result.final_dir = _finish(cfg, acc, loop, model, tokenizer, run_dir)
        result.model = model
        return result
    finally:
        if handler is not None:
            logging.getLogger("monkeytune").removeHandler(handler)
            handler.close()


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


def _finish(cfg: TrainConfig, acc, loop: "_Loop", model, tokenizer, run_dir: Path) -> Path | None:
    """Final save and loss plot."""
    final_dir = None
    if cfg.checkpoint.final_save != "none":
        if loop.sharded:
            # Under FSDP / ZeRO-3 the bare model holds only this process's shards: gather the
            # full state (every process takes part) and rebuild an unsharded model from it.
            state = acc.get_state_dict(loop.module)
            if acc.is_main_process:
                bare = {k.removeprefix("model."): v for k, v in state.items()}
                # Sharded runs have no unfreezing stages, so the base plan is the one in force.
                model = rebuild_from_state(model.config, bare, loop.schedule.plan)
        if acc.is_main_process:
            final_dir = save_final(
                model, tokenizer, run_dir / "final", cfg.checkpoint.final_save,
                merge_llm_lora=cfg.checkpoint.merge_llm_lora, base_model=cfg.model.from_dir,
                metadata={"chat_format": cfg.data.template},
            )
            logger.info("final model written to %s", final_dir)
    if acc.is_main_process and cfg.log.plot:
        plot_losses(run_dir / "metrics.jsonl", run_dir / PLOT_FILE)
    acc.wait_for_everyone()
    return final_dir


class _Loop:
    """State and arithmetic of one optimizer step."""

    def __init__(self, cfg: TrainConfig, acc, module, model, optimizer, scheduler, schedule, stage_index: int,
                 sharded: bool):
        self.cfg, self.acc, self.module, self.model = cfg, acc, module, model
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.stage_index = stage_index
        self.sharded = sharded
        self.per_sample = cfg.train.loss_norm == "per_sample"
        # DeepSpeed applies the update inside backward; its optimizer wrapper's step is a no-op.
        self.deepspeed = acc.distributed_type.value == "DEEPSPEED"

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def save_checkpoint(self, ckpts: CheckpointManager, state: dict[str, Any]) -> Path:
        """Write checkpoint ``state["step"]`` (refusing non-finite weights)."""
        step = state["step"]
        assert_finite(self.model, f"checkpoint at step {step}")
        names = ever_trained_names(self.model, self.schedule, step) if not self.sharded else []
        return ckpts.save(step, lambda folder: write_checkpoint(
            folder, accelerator=self.acc, cfg=self.cfg, model=self.model, optimizer=self.inner_optimizer,
            scheduler=self.scheduler, names=names, state=state, sharded=self.sharded))

    def _counts(self, batches: list[dict[str, Any]]) -> tuple[list[Any], torch.Tensor]:
        """Per-batch weights (per-sample mode) and the global ``[tokens, samples, input tokens]``."""
        weights, totals = [], torch.zeros(3, dtype=torch.float64)
        for b in batches:
            totals[0] += supervised_count(b["labels"])
            w, n = sample_weights(b["labels"], b.get("position_ids"))
            totals[1] += n
            totals[2] += float(b["seq_lens"].sum()) if "seq_lens" in b else b["input_ids"].numel()
            weights.append(w if self.per_sample else None)
        totals = self.acc.reduce(totals.to(self.acc.device), reduction="sum").cpu()
        return weights, totals

    def step(self, batches: list[dict[str, Any]], send_to_device) -> dict[str, Any]:
        acc, cfg = self.acc, self.cfg
        weights, totals = self._counts(batches)
        denom = float(totals[1] if self.per_sample else totals[0])
        # The engine divides by grad_accum and averages over processes; undo both so each
        # micro-batch contributes exactly objective_sum / (count over the whole step).
        scale = cfg.train.grad_accum * acc.num_processes / max(denom, 1.0)
        self.module.train()
        objective = torch.zeros((), dtype=torch.float64, device=acc.device)
        for batch, w in zip(batches, weights):
            batch = send_to_device(batch, acc.device)
            with acc.accumulate(self.module):
                out = self.module(batch, None if w is None else w.to(acc.device))
                objective += out.detach().double()
                acc.backward(out * scale)
        loss = float(acc.reduce(objective, reduction="sum")) / max(denom, 1.0)
        params = list(self.module.parameters()) if acc.distributed_type.value == "FSDP" else \
            [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = acc.clip_grad_norm_(params, clip)
        norm = float(norm) if norm is not None else float("nan")
        reason = None
        if not math.isfinite(loss):
            reason = f"loss is {loss}"
        elif not math.isfinite(norm) and not self.deepspeed:
            reason = f"gradient norm is {norm}"
        bad = reason is not None
        if denom == 0 and not bad:
            reason = "no supervised tokens in the step"
        applied = reason is None
        lr = max(g["lr"] for g in self.inner_optimizer.param_groups)  # the rate this step uses
        if acc.scaler is not None:
            # The loss scaler must see every step: it skips the update itself on inf/NaN
            # gradients and lowers the scale.
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                applied, bad = False, True
                reason = reason or f"fp16 overflow (loss scale now {acc.scaler.get_scale():g})"
        elif applied or self.deepspeed:
            self.optimizer.step()
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss, "lr": lr, "grad_norm": norm if math.isfinite(norm) else None,
            "tokens": int(totals[0]), "samples": int(totals[1]), "input_tokens": float(totals[2]),
            "applied": applied, "bad": bad, "reason": reason,
        }
