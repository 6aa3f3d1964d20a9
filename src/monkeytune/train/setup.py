"""Building a run's pieces from its configuration: engine, model, tokenizer, data, policy."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune.config import ModelConfig, get_config
from monkeytune.model.monkey import enable_llm_checkpointing
from monkeytune.train.config import TrainConfig
from monkeytune.train.sampler import EpochBatchSampler

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class SetupError(ValueError):
    """A run that cannot start; the message says which setting to change."""


def make_accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for this run.

    Gradient accumulation is the engine's (so DeepSpeed's own accumulation lines up); the loss
    passed to ``backward`` is multiplied back by the accumulation steps because the engine
    divides by them, and the loop normalises by the step's token count itself. The scheduler
    is stepped by the loop once per optimizer step, not by the engine.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps precision and accumulation settings process-wide and refuses different
    # ones later; a process may run several trainings (tests, notebooks), so start afresh. The
    # process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()

    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)
    # accelerate only forms a multi-process CPU group (gloo) when told to use the CPU; do so for
    # runs launched with several processes (torchrun) on a machine without CUDA.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    acc = Accelerator(
        cpu=launched and not torch.cuda.is_available(),
        mixed_precision=MIXED_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp],
    )
    if cfg.train.precision == "fp16" and acc.scaler is None and acc.distributed_type.value != "DEEPSPEED":
        logger.warning("fp16 mixed precision needs a GPU; on %s the run computes in fp32", acc.device)
    return acc


def configure_engine(accelerator, cfg: TrainConfig) -> None:
    """Give DeepSpeed what it would otherwise read from a prepared DataLoader or a JSON file.

    monkeytune feeds batches itself (its sampler must resume exactly), so the engine learns
    the micro-batch size here; gradient clipping left at ``auto`` follows ``optim.grad_clip``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip


def check_engine(accelerator, cfg: TrainConfig) -> None:
    """After ``prepare``: the engine must accumulate exactly ``train.grad_accum`` micro-batches."""
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:
        raise SetupError(
            f"the launcher's engine config accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"train.grad_accum is {cfg.train.grad_accum}; remove gradient_accumulation_steps from the "
            "accelerate/DeepSpeed config (monkeytune passes train.grad_accum to the engine)"
        )


def is_sharded(accelerator) -> bool:
    """Whether model/optimizer state is sharded by the engine (FSDP, DeepSpeed)."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def ensure_synthetic_data(cfg: TrainConfig, accelerator) -> None:
    """Write the synthetic dataset ``data.synthetic`` asks for (main process; others wait)."""
    if cfg.data.synthetic <= 0:
        return
    train = Path(cfg.data.train[0])
    if accelerator.is_main_process and not train.is_file():
        from monkeytune.train.synthetic import write_synthetic_dataset

        logger.info("writing %d synthetic samples to %s", cfg.data.synthetic, train)
        write_synthetic_dataset(train, cfg.data.synthetic)
    accelerator.wait_for_everyone()


def _tokenizer_dir(cfg: TrainConfig) -> str | None:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.data.synthetic > 0:
        return str(Path(cfg.data.train[0]).parent / "tokenizer")
    return None


def load_model_and_tokenizer(cfg: TrainConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The model to train (fp32 master weights, train mode) and its tokenizer.

    A ``from`` folder is read straight onto ``device`` (each process would otherwise hold a
    full fp32 copy in host memory); built models start on the CPU and are moved by the engine.

    ``preset`` / ``config`` models are built from ``model.init_seed``; their image token ids
    and vocabulary size are taken from the tokenizer (``ModelConfig.matched_to_tokenizer``).
    """
    from monkeytune.model import build_model
    from monkeytune.tokenizer.loading import load_tokenizer

    tok_dir = _tokenizer_dir(cfg)
    if cfg.model.from_dir:
        from monkeytune.model.io import load_model

        model, tokenizer = load_model(cfg.model.from_dir, dtype=torch.float32, device=device)
        if tok_dir:
            tokenizer = load_tokenizer(tok_dir)
        if tokenizer is None:
            raise SetupError(f"model folder {cfg.model.from_dir} holds no tokenizer; set model.tokenizer")
    else:
        if not tok_dir:
            raise SetupError("a preset/config model needs model.tokenizer (a tokenizer folder)")
        tokenizer = load_tokenizer(tok_dir)
        mcfg = get_config(cfg.model.preset) if cfg.model.preset else ModelConfig.from_dict(cfg.model.config)
        torch.manual_seed(cfg.model.init_seed)
        model = build_model(mcfg.matched_to_tokenizer(tokenizer))
    try:
        model.config.check_tokenizer(tokenizer)
    except ValueError as e:
        raise SetupError(f"model and tokenizer disagree: {e}") from None
    if "llm" in cfg.train.gradient_checkpointing:
        enable_llm_checkpointing(model.llm)
    if "vit" in cfg.train.gradient_checkpointing:
        model.vision.gradient_checkpointing = True
    return model.float().train(), tokenizer


def build_data(cfg: TrainConfig, tokenizer: Any, model_cfg: ModelConfig, run_dir: Path, rank: int, world_size: int):
    """``(dataset, collator, sampler)`` for this rank.

    With packing, rows are planned once from a seeded shuffle (the same rows every epoch,
    visited in a new order each epoch); the row count, hence the number of steps, is fixed.
    """
    from monkeytune.data import Collator, ConversationDataset, PackedDataset, SkipBadSamples

    d = cfg.data
    skip = d.on_bad_sample == "skip"
    dataset = ConversationDataset(
        d.train, tokenizer, model_cfg, max_length=d.max_length, template=d.template,
        truncate_turns=d.truncate_turns, format=d.format, image_root=d.image_root,
        allow_empty_answers=d.allow_empty_answers, strict=not skip,
    )
    if skip:
        report = d.report_file or str(run_dir / "bad_samples.jsonl")
        dataset = SkipBadSamples(dataset, report, d.max_skip_fraction, report_scan=rank == 0)
    else:
        # Fail before the first step, not hours in; the renderings are cached and DataLoader
        # workers inherit them.
        for i in range(len(dataset)):
            dataset.scan(i)
    if d.packing:
        dataset = PackedDataset(dataset, max_length=d.max_length, shuffle=d.shuffle, seed=cfg.train.seed)
    pad_to = d.max_length if d.padding == "max_length" and not d.packing else None
    collator = Collator(pad_id=tokenizer.pad_id, pad_to_length=pad_to)
    try:
        sampler = EpochBatchSampler(len(dataset), cfg.train.micro_batch_size, cfg.train.seed,
                                    shuffle=d.shuffle, rank=rank, world_size=world_size)
    except ValueError as e:
        raise SetupError(f"data.train: {e}") from None
    return dataset, collator, sampler


def build_schedule(cfg: TrainConfig, model: nn.Module):
    """``(plan, unfreeze schedule)`` from the ``policy`` section, validated on ``model``."""
    from monkeytune.policy import TrainPlan, UnfreezeSchedule

    p = cfg.policy
    plan = TrainPlan.from_config({"preset": p.preset, "rules": p.rules, "lora": p.lora}, source="policy")
    schedule = UnfreezeSchedule.from_config(plan, p.unfreeze, source="policy.unfreeze")
    schedule.validate(model)
    return plan, schedule


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else whole accumulation windows in ``epochs``.

    Accumulation windows run on across epoch boundaries; micro-batches left over at the very
    end that cannot fill a window are not used.
    """
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    steps = cfg.train.epochs * batches_per_epoch // cfg.train.grad_accum
    if steps == 0:
        raise SetupError(
            f"{cfg.train.epochs} epoch(s) of {batches_per_epoch} micro-batches per process do not fill one "
            f"window of train.grad_accum={cfg.train.grad_accum}; lower grad_accum or set train.max_steps"
        )
    return steps
