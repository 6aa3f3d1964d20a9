"""Building a run's pieces from its configuration: model, tokenizer, data, policy (the engine: ``engine.py``)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune import model as model_pkg
from monkeytune.config import ModelConfig
from monkeytune.memory import check_fits_in_memory
from monkeytune.model.io import load_model
from monkeytune.model.monkey import enable_llm_checkpointing
from monkeytune.model.spec import ModelSpecError, ResolvedModel, resolve_model
from monkeytune.train.config import TrainConfig
from monkeytune.train.engine import SHARDING_ENGINES
from monkeytune.train.sampler import EpochBatchSampler

logger = logging.getLogger(__name__)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SetupError(ValueError):
    """A run that cannot start; the message says which setting to change."""


def hold_frozen_in_compute_dtype(model: nn.Module, trained: set[str], precision: str) -> int:
    """Under bf16/fp16, store the parameters outside ``trained`` in that dtype.

    They only feed the forward, where autocast (or the engine's mixed precision) computes in
    that dtype anyway, so an fp32 copy is memory for nothing: a 7B frozen LLM is 14 GiB in bf16
    instead of 28 GiB. ``trained`` names every parameter that trains now or in a later
    unfreezing stage; those stay fp32, the optimizer's masters. Call after the plan is applied
    and before the engine wraps the model.

    Returns:
        Bytes saved.
    """
    dtype = COMPUTE_DTYPES.get(precision)
    if dtype is None:
        return 0
    saved = 0
    for name, param in model.named_parameters():
        if name not in trained and param.is_floating_point() and param.dtype != dtype:
            saved += param.numel() * (param.element_size() - dtype.itemsize)
            param.data = param.data.to(dtype)
    return saved


def check_environment(cfg: TrainConfig) -> None:
    """Refuse, before anything is built, settings this installation cannot honour.

    Raises:
        ConfigError: a tracker in ``log.trackers`` is unknown or not installed.
    """
    from monkeytune.train.trackers import check_installed

    check_installed(cfg.log)


def check_run_support(cfg: TrainConfig, engine: str, device_type: str) -> None:
    """Refuse an optimizer, preset, unfreezing stages or attention this engine/device cannot run (one line, no fallback).

    Called before the model is built, so nothing is loaded, quantised or sharded first.

    Args:
        cfg: The run configuration.
        engine: :func:`~monkeytune.train.engine.engine_of` the accelerator.
        device_type: ``cuda`` or ``cpu``, where the run computes.
    """
    import importlib.util

    from monkeytune.policy.quantize import qlora_engine_reason
    from monkeytune.train.optim import optimizer_unavailable_reason

    reason = optimizer_unavailable_reason(cfg.optim.name, engine, device_type)
    if reason:
        raise SetupError(reason)
    reason = qlora_engine_reason(cfg.policy.preset, engine)
    if reason:
        raise SetupError(reason)
    if cfg.policy.unfreeze and engine in SHARDING_ENGINES:
        raise SetupError(f"policy.unfreeze stages need a single-process or DDP run: {engine} fixes the trainable set "
                         "when it wraps the model")
    if cfg.train.attention == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise SetupError("train.attention flash_attention_2 needs the flash_attn package, which is not installed: "
                             "pip install flash-attn, or set train.attention sdpa")
        if device_type != "cuda":
            raise SetupError(f"train.attention flash_attention_2 needs a CUDA GPU (this run is on {device_type}); "
                             "set train.attention sdpa")


def select_attention(model: nn.Module, attention: str) -> None:
    """Make the LLM use ``attention`` (``sdpa`` or ``flash_attention_2``), keeping the Qwen compat layer.

    A model read from an official checkpoint runs its attention through the compat layer
    (:mod:`monkeytune.model.qwen_compat`); installing the layer again re-registers it over the
    new implementation.
    """
    from monkeytune.model.qwen_compat import apply_compat, get_compat

    current = model.llm.config._attn_implementation or "sdpa"
    if current.endswith(attention):
        return
    compat = get_compat(model)
    model.llm.set_attn_implementation(attention)
    if compat is not None:
        apply_compat(model.llm, compat)


@dataclasses.dataclass(frozen=True)
class Loading:
    """How batches reach the device: DataLoader workers and pinned host memory."""

    num_workers: int
    pin_memory: bool


def configure_device(cfg: TrainConfig, device: torch.device, local_processes: int) -> Loading:
    """The defaults that differ on a GPU: TF32 matmuls, loader workers, pinned memory.

    Args:
        cfg: The run configuration (``train.tf32``, ``data.num_workers``).
        device: Where this process computes.
        local_processes: Processes on this machine (they share its CPUs).

    Returns:
        The loader settings; on a CUDA GPU, TF32 is switched on as ``train.tf32`` says.
    """
    import os

    gpu = device.type == "cuda"
    if gpu and cfg.train.tf32:
        torch.set_float32_matmul_precision("high")
    workers = cfg.data.num_workers
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // max(1, local_processes))) if gpu else 0
    return Loading(num_workers=workers, pin_memory=gpu)


def check_engine(accelerator, cfg: TrainConfig) -> None:
    """After ``prepare``: the engine must accumulate exactly ``train.grad_accum`` micro-batches."""
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:
        raise SetupError(
            f"the launcher's engine config accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"train.grad_accum is {cfg.train.grad_accum}; remove gradient_accumulation_steps from the "
            "accelerate/DeepSpeed config (monkeytune passes train.grad_accum to the engine)"
        )


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


def compose_for_run(cfg: TrainConfig, accelerator, run_dir: Path) -> TrainConfig:
    """A ``model.compose`` run trains the folder the composition writes in the run folder.

    The main process composes ``RUN/composed`` once (a resumed run finds it); the others wait.
    Every rank checks the parts' configs first, so a bad folder stops them all alike.

    Returns:
        ``cfg`` with ``model.from`` naming that folder (what the run saves and resumes).
    """
    if not cfg.model.compose:
        return cfg
    from monkeytune.model.compose import ComposeError, compose  # noqa: PLC0415

    folder = run_dir / "composed"
    try:
        resolve_model(cfg.model)  # configs and tokenizer only, on every rank
        if accelerator.is_main_process and not (folder / "config.json").is_file():
            from monkeytune.model.compose import options_from_mapping  # noqa: PLC0415

            vision, llm, options = options_from_mapping(cfg.model.compose)
            logger.info("composing %s and %s into %s", vision, llm, folder)
            shutil.rmtree(folder.with_name(".tmp-composed"), ignore_errors=True)
            compose(vision, llm, folder.with_name(".tmp-composed"), options)
            folder.with_name(".tmp-composed").rename(folder)
    except (ComposeError, ModelSpecError) as e:
        raise SetupError(f"model.compose: {e}") from None
    accelerator.wait_for_everyone()
    out = copy.deepcopy(cfg)
    out.model = dataclasses.replace(out.model, compose=None, from_dir=str(folder))
    return out


def tokenizer_dir(cfg: TrainConfig) -> str | None:
    """The tokenizer folder the run uses; None means the ``model.from`` folder's own."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.data.synthetic > 0:
        return str(Path(cfg.data.train[0]).parent / "tokenizer")
    return None


def resolve_run_model(cfg: TrainConfig) -> ResolvedModel:
    """The run's model spec resolved (:func:`monkeytune.model.spec.resolve_model`), tokenizer loaded.

    Raises:
        SetupError: no tokenizer for a built model, or a spec that does not resolve.
    """
    spec = dataclasses.replace(cfg.model, tokenizer=tokenizer_dir(cfg))
    if not spec.from_dir and not spec.tokenizer:
        raise SetupError("a preset/config model needs model.tokenizer (a tokenizer folder)")
    try:
        resolved = resolve_model(spec)
    except ModelSpecError as e:
        raise SetupError(str(e)) from None
    if resolved.tokenizer is None:
        raise SetupError(f"model folder {spec.from_dir} holds no tokenizer; set model.tokenizer")
    return resolved


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def effective_config(cfg: TrainConfig, resolved: ResolvedModel) -> TrainConfig:
    """The configuration that runs, as saved in the run folder and in each checkpoint.

    * ``model``: a built model is stated as ``config:`` with the vocabulary and image token ids
      it was built with (a preset becomes its resolved config), and the tokenizer folder it used;
    * every path is absolute, so the saved ``config.yaml`` runs again from any directory and
      builds the same model.
    """
    out = copy.deepcopy(cfg)
    m = out.model
    m.tokenizer = _absolute(resolved.tokenizer_dir)
    if resolved.built_fresh:
        m.preset, m.config = None, copy.deepcopy(resolved.config)
    else:
        m.from_dir = _absolute(m.from_dir)
    out.data.train = [p if p.startswith("hf:") else _absolute(p) for p in out.data.train]  # hf: a dataset name
    out.data.image_root = _absolute(out.data.image_root)
    out.data.report_file = _absolute(out.data.report_file)
    out.checkpoint.output_dir = _absolute(out.checkpoint.output_dir)
    if out.checkpoint.resume not in (None, "latest"):
        out.checkpoint.resume = _absolute(out.checkpoint.resume)
    return out


def load_model_and_tokenizer(cfg: TrainConfig, device: str | torch.device = "cpu",
                             resolved: ResolvedModel | None = None) -> tuple[nn.Module, Any]:
    """The model to train (fp32 master weights, train mode) and its tokenizer.

    A ``from`` folder is read straight onto ``device`` (each process would otherwise hold a
    full fp32 copy in host memory); built models start on the CPU and are moved by the engine.

    ``preset`` / ``config`` models are built from ``model.init_seed`` with the resolved config
    (image token ids and vocabulary from the tokenizer; see :func:`resolve_run_model`).

    Args:
        cfg: The run configuration.
        device: Where a loaded model goes.
        resolved: The run's resolved model (default: resolved here).
    """
    resolved = resolved or resolve_run_model(cfg)
    tokenizer = resolved.tokenizer
    if resolved.built_fresh:
        try:
            # fp32 master weights; refused before minutes are spent building what cannot fit.
            check_fits_in_memory(resolved.config, bytes_per_param=4)
        except ValueError as e:
            raise SetupError(f"model: {e}") from None
        torch.manual_seed(cfg.model.init_seed)
        model = model_pkg.build_model(resolved.config)
    else:
        model, _ = load_model(cfg.model.from_dir, dtype=torch.float32, device=device)
    try:
        model.config.check_tokenizer(tokenizer)
    except ValueError as e:
        raise SetupError(f"model and tokenizer disagree: {e}") from None
    select_attention(model, cfg.train.attention)
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
        view_cache_bytes=int(d.view_cache_gib * 2**30), cache=d.cache, scan=True, columns=d.columns,
        load_options=d.load_options,
    )
    if skip:
        report = d.report_file or str(run_dir / "bad_samples.jsonl")
        SkipBadSamples(dataset, report, d.max_skip_fraction, report_scan=rank == 0)  # held as dataset.skip
    # The dataset ran the scan as it read the records (scan=True): a bad record has stopped the
    # run before its first step, not hours in; the lengths are kept (DataLoader workers inherit
    # them) and saved beside the data for the next run (data.cache).
    if d.packing:
        dataset = PackedDataset(dataset, max_length=d.max_length, shuffle=d.shuffle, seed=cfg.train.seed)
    pad_to = d.max_length if d.padding == "max_length" and not d.packing else None
    # flash_attention_2 separates packed samples by cu_seqlens, so their rows need no padding.
    padding_free = d.packing and cfg.train.attention == "flash_attention_2"
    collator = Collator(pad_id=tokenizer.pad_id, pad_to_length=pad_to, padding_free=padding_free)
    try:
        sampler = EpochBatchSampler(len(dataset), cfg.train.micro_batch_size, cfg.train.seed,
                                    shuffle=d.shuffle, rank=rank, world_size=world_size)
    except ValueError as e:
        raise SetupError(f"data.train: {e}") from None
    return dataset, collator, sampler


def build_stream(cfg: TrainConfig, tokenizer: Any, model_cfg: ModelConfig, run_dir: Path, rank: int,
                 world_size: int, num_workers: int):
    """``(dataset, collator, dataset)`` for ``data.streaming``: a
    :class:`~monkeytune.data.stream.StreamingDataset` of this rank, which also stands in for the
    sampler (``batches_per_epoch``: blocks per stream, the epoch's progress in the metrics).

    Nothing is read but each file's size and first records (see :mod:`monkeytune.data.stream`).
    """
    from monkeytune.data import Collator, ConversationDataset
    from monkeytune.data.stream import StreamingDataset

    d = cfg.data
    # No files: it renders and loads the samples the stream parses (strict=False: empty is fine).
    renderer = ConversationDataset([], tokenizer, model_cfg, max_length=d.max_length, template=d.template,
                                   truncate_turns=d.truncate_turns, strict=False,
                                   view_cache_bytes=int(d.view_cache_gib * 2**30))
    pad_to = d.max_length if d.padding == "max_length" and not d.packing else None
    padding_free = d.packing and cfg.train.attention == "flash_attention_2"
    collator = Collator(pad_id=tokenizer.pad_id, pad_to_length=pad_to, padding_free=padding_free)
    skip = d.on_bad_sample == "skip"
    dataset = StreamingDataset(
        d.train, renderer, collator, micro_batch_size=cfg.train.micro_batch_size, rank=rank,
        world_size=world_size, num_workers=num_workers, format=d.format, image_root=d.image_root,
        allow_empty_answers=d.allow_empty_answers, packing=d.packing, shuffle=d.shuffle, seed=cfg.train.seed,
        skip=skip, report_file=(d.report_file or str(run_dir / "bad_samples.jsonl")) if skip else None,
        max_skip_fraction=d.max_skip_fraction,
    )
    logger.info("streaming %d file(s) in %d blocks over %d stream(s)", len(dataset.sources), len(dataset.blocks),
                dataset.streams)
    return dataset, collator, dataset


def stream_position(saved: dict[str, Any], rank: int, world_size: int, num_workers: int):
    """The :class:`~monkeytune.train.sampler.Position` a streamed run resumes from.

    Raises:
        SetupError: the checkpoint's streams were read by another number of processes or
            workers (the blocks are dealt to them, so the position has no exact equivalent).
    """
    from monkeytune.train.sampler import Position

    streams = saved.get("stream")
    if streams is None:
        logger.warning("the checkpoint holds no stream position (it was written without data.streaming): "
                       "the streams start from the beginning")
        return Position()
    had, has = (len(streams), len(streams[0]["cursors"])), (world_size, max(1, num_workers))
    if had != has:
        raise SetupError(f"the checkpoint's data streams were read by {had[0]} process(es) x {had[1]} worker(s), "
                         f"this run has {has[0]} x {has[1]}: a streamed run resumes with the same ones (set "
                         f"data.num_workers {had[1] if had[1] > 1 else 0} and launch {had[0]} process(es))")
    return Position(int(saved["epoch"]), int(saved["batch"]), streams[rank])


def build_schedule(cfg: TrainConfig, model: nn.Module, precision: str | None = None):
    """``(plan, unfreeze schedule)`` from the ``policy`` section, validated on ``model``.

    Validation prepares the model (peft LoRA; under ``llm-qlora`` the 4-bit layers, which compute
    in ``precision``'s dtype: default ``train.precision``; a run passes the precision it really
    computes in, :func:`~monkeytune.train.engine.compute_precision`).
    """
    from monkeytune.policy import TrainPlan, UnfreezeSchedule
    from monkeytune.policy.quantize import compute_dtype_of_precision

    p = cfg.policy
    plan = TrainPlan.from_config({"preset": p.preset, "rules": p.rules, "lora": p.lora}, source="policy")
    schedule = UnfreezeSchedule.from_config(plan, p.unfreeze, source="policy.unfreeze")
    schedule.validate(model, compute_dtype_of_precision(precision or cfg.train.precision))
    return plan, schedule


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else whole steps of ``grad_accum`` micro-batches in ``epochs``.

    A step's micro-batches run on across epoch boundaries; micro-batches left over at the very
    end that cannot fill a step are not used.
    """
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    steps = cfg.train.epochs * batches_per_epoch // cfg.train.grad_accum
    if steps == 0:
        raise SetupError(
            f"{cfg.train.epochs} epoch(s) of {batches_per_epoch} micro-batches per process do not fill one "
            f"step of train.grad_accum={cfg.train.grad_accum} micro-batches; lower grad_accum or set train.max_steps"
        )
    return steps
