"""Training configuration: typed sections, YAML loading, dotted command-line overrides.

A run is described by one YAML file with up to seven sections, each a flat dataclass::

    model:      {preset: tiny}            # or {config: {...}} or {from: path/to/model}: a ModelSpec
    data:       {train: data/train.jsonl, template: monkey, max_length: 2048}
    policy:     {preset: monkey, lr: {vision_adapters: 1.0e-4}}
    optim:      {lr: 1.0e-5, weight_decay: 0.1, betas: [0.9, 0.95]}
    train:      {epochs: 1, micro_batch_size: 1, grad_accum: 8, precision: bf16}
    checkpoint: {output_dir: runs/my-run, every: 500, keep_last: 3}
    log:        {progress: true, plot: true}

Overrides such as ``--train.max_steps 100`` or ``--optim.betas [0.9,0.99]`` are applied on top,
converted to the field's type by :mod:`monkeytune.train.config_load`. Values read from YAML go
through the same conversion, so ``lr: 1e-5`` (a string to PyYAML) is a float here. Every error
names the file, the line where known, and the ``section.key`` at fault, and suggests close
spellings of unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monkeytune.memory import PRECISIONS
from monkeytune.model.spec import ModelSpec, ModelSpecError

LOSS_NORMS = ("per_token", "per_sample")
OBJECTIVES = ("lm", "window_answer")  # see monkeytune.train.objectives
SCHEDULERS = ("cosine", "linear", "constant")
PADDINGS = ("dynamic", "max_length")
FINAL_SAVES = ("full", "adapters", "none")
# transformers' ``TrainingArguments.optim`` names (as LLaMA-Factory passes them through), so a
# recipe's value carries over unchanged. The 8-bit ones are bitsandbytes' blockwise AdamW.
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "flash_attention_2")
CHECKPOINTABLE = ("llm", "vit")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names where and which field."""


@dataclass
class DataSection:
    """Training data and batching.

    Attributes:
        train: One data file (JSON list or JSON Lines) or a list of them; tables (parquet, arrow,
            ``save_to_disk`` folders) and ``hf:NAME`` dataset names too (docs/data.md#tables).
        load_options: Keyword arguments of ``datasets.load_dataset`` for the ``hf:`` entries of
            ``train`` (``name``, ``split`` (default ``train``), ``data_files``, ``revision``,
            ``cache_dir``, ...).
        columns: The data's own names of record fields, e.g. ``{messages: dialog, images: pics}``
            (fields: ``id``, ``messages``, ``conversations``, ``image``, ``images``, ``texts``).
        format: ``auto`` (detected per file) or ``monkey``, ``llava``, ``sharegpt``, ``openai``
            (see docs/data.md).
        image_root: Folder relative image paths resolve against (default: each data file's folder).
        allow_empty_answers: Train on assistant turns without text (an error by default).
        template: ``monkey`` (official), ``chatml``, or ``tokenizer``: a composed model's LLM's own
            chat template (see :mod:`monkeytune.data.chat_template`).
        max_length: Longest sample in tokens, images included (also the packed row length).
        padding: ``dynamic`` (pad to the longest sample of the batch) or ``max_length``
            (always pad to ``max_length``, the official behaviour). Ignored when packing.
        packing: Concatenate the samples of a micro-batch into rows of ``max_length``.
        on_bad_sample: ``error`` or ``skip`` (skipped samples listed in ``report_file``).
        max_skip_fraction: With ``skip``, stop when more than this share of records is bad.
        report_file: Where skipped samples are reported; default ``<output_dir>/bad_samples.jsonl``.
        truncate_turns: Drop trailing text-only exchanges of over-long samples.
        num_workers: DataLoader worker processes. Default (null): 4 when the run trains on a CUDA
            GPU (at most the CPUs each process has), so images decode while the GPU computes;
            0 on a CPU, where workers would take cores from the step.
        view_cache_gib: Keep each image's processed views in memory, up to this many GiB per
            process, so an image that several samples share is decoded once. With
            ``num_workers`` each worker holds its own, for one epoch (workers restart each
            epoch). 0 (default) decodes every time; the views are the same either way.
        shuffle: Shuffle the sample order each epoch (a pure function of seed and epoch).
        cache: Save what the start-up pass over the data finds (each sample's place, length and
            problems) beside the data, keyed by its content and these settings, and load it in
            the next run instead of reading every record again (docs/data.md#memory).
        synthetic: When > 0 and ``train`` does not exist yet, write a synthetic dataset of this
            many samples (small images, captions and a trained tokenizer) there first.
        streaming: Read the data as a stream of blocks dealt to processes and workers, with no
            pass over it before training (JSON Lines and tables; needs ``train.max_steps``;
            docs/data.md#streaming).
    """

    train: list[str] = field(default_factory=list)
    load_options: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    format: str = "auto"
    image_root: str | None = None
    allow_empty_answers: bool = False
    template: str = "monkey"
    max_length: int = 2048
    padding: str = "dynamic"
    packing: bool = False
    on_bad_sample: str = "error"
    max_skip_fraction: float = 0.05
    report_file: str | None = None
    truncate_turns: bool = False
    num_workers: int | None = None
    view_cache_gib: float = 0.0
    shuffle: bool = True
    cache: bool = True
    synthetic: int = 0
    streaming: bool = False


@dataclass
class PolicySection:
    """What trains and how fast (see ``monkeytune.policy``).

    Attributes:
        preset: ``monkey``, ``monkey-fix-llm``, ``lora-only``, ``llm-lora`` or ``full``.
        rules: Ordered ``train``/``freeze`` rules applied on top of the preset.
        lr: Learning rate per component or alias (e.g. ``{vision_adapters: 1.0e-4}``);
            components not listed use ``optim.lr``.
        no_decay: Extra parameter-name patterns excluded from weight decay (biases and norms
            always are).
        unfreeze: Progressive unfreezing stages, e.g. ``[{at: 100, train: ["llm.*"]}]``.
        lora: Options of the LLM LoRA (``r``, ``alpha``, ``dropout``, ``target_modules``).
    """

    preset: str = "monkey"
    rules: list = field(default_factory=list)
    lr: dict = field(default_factory=dict)
    no_decay: list[str] = field(default_factory=list)
    unfreeze: list = field(default_factory=list)
    lora: dict = field(default_factory=dict)


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (defaults: the official Monkey recipe).

    Attributes:
        name: ``adamw_torch`` (PyTorch AdamW, fp32 moments: 8 bytes per trained parameter),
            ``adamw_bnb_8bit`` (bitsandbytes' 8-bit blockwise AdamW: about 2 bytes) or
            ``paged_adamw_8bit`` (the same with its states in CUDA unified memory, paged out to
            host memory under pressure; a CUDA GPU only). Names as transformers' ``optim``.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (not applied to biases and norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: Warmup length as a fraction of the optimizer steps.
        warmup_steps: Warmup length in steps; overrides ``warmup_ratio`` when > 0.
        scheduler: ``cosine`` (to zero), ``linear`` (to zero) or ``constant`` after warmup.
        grad_clip: Maximum global gradient norm; 0 disables clipping.
    """

    name: str = "adamw_torch"
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_ratio: float = 0.02
    warmup_steps: int = 0
    scheduler: str = "cosine"
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    """Loop length, batching, numerics.

    Attributes:
        epochs: Passes over the data (used when ``max_steps`` is 0).
        max_steps: Optimizer steps; 0 means ``epochs`` worth.
        micro_batch_size: Samples per forward pass per process.
        grad_accum: Micro-batches per optimizer step per process.
        precision: ``bf16``, ``fp16`` (with loss scaling) or ``fp32``.
        gradient_checkpointing: Parts recomputed in backward: any of ``llm`` and ``vit``.
        attention: The LLM's attention: ``sdpa`` (PyTorch) or ``flash_attention_2`` (the
            ``flash_attn`` package on a CUDA GPU; packed batches then go padding-free, see
            :mod:`monkeytune.data.collate`).
        seed: Seed of the data order, dropout and every RNG.
        loss_norm: ``per_token`` (every supervised token of the optimizer step weighs the
            same) or ``per_sample`` (every sample weighs the same).
        objective: ``lm`` (the language-model loss on the answers) or ``window_answer`` (a
            grounded vision stage on records that name their answer's window, see
            :mod:`monkeytune.train.objectives`).
        max_bad_steps: Stop after this many consecutive steps with a non-finite loss or gradient.
        find_unused_parameters: Let DDP tolerate parameters a batch does not use. Not needed
            for text-only batches (they run the vision path too, multiplied by zero); DDP then
            skips a walk of the autograd graph every step.
        grad_reduce_dtype: ``fp32`` or ``bf16``: the dtype gradients are accumulated over
            micro-batches and reduced across processes in, on every engine (DeepSpeed's
            ``data_types.grad_accum_dtype`` and ``communication_data_type``, FSDP2's
            ``reduce_dtype``, a DDP communication hook). ``bf16`` halves the traffic.
        tf32: On a CUDA GPU, let fp32 matmuls use TF32 tensor cores (``torch.set_float32_matmul_precision
            ("high")``): fp32 runs and the fp32 parts of mixed precision go several times faster
            for a 10-bit mantissa in the products. No effect on a CPU.
        ddp_timeout: Seconds a process waits in a collective before the run fails (the process
            group timeout). Generous, because rank 0 alone writes checkpoints and the final save
            while the others wait at a barrier; a monkey-7b ZeRO-2 checkpoint is ~114 GB.
    """

    epochs: int = 1
    max_steps: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 1
    precision: str = "bf16"
    gradient_checkpointing: list[str] = field(default_factory=list)
    attention: str = "sdpa"
    seed: int = 42
    loss_norm: str = "per_token"
    objective: str = "lm"
    max_bad_steps: int = 10
    find_unused_parameters: bool = False
    grad_reduce_dtype: str = "fp32"
    tf32: bool = True
    ddp_timeout: int = 7200


@dataclass
class CheckpointSection:
    """Run folder, periodic checkpoints and the final save.

    Attributes:
        output_dir: Run folder (config, metrics, checkpoints, final model).
        every: Save a resumable checkpoint every this many optimizer steps; 0 never (the
            final model is still written, see ``final_save``).
        keep_last: Keep this many most recent checkpoints (0 keeps all).
        final_save: ``full`` (a model folder chat/eval can load), ``adapters`` (trainable
            weights only) or ``none``.
        merge_llm_lora: With an LLM LoRA policy, merge the adapters into the LLM in the final
            full save (a peft adapter folder is written either way).
        resume: ``latest``, a checkpoint folder, or null to start fresh.
    """

    output_dir: str = "runs/monkeytune"
    every: int = 0
    keep_last: int = 3
    final_save: str = "full"
    merge_llm_lora: bool = False
    resume: str | None = None


@dataclass
class LogSection:
    """Progress and metrics.

    Attributes:
        every: Write a metrics line every this many optimizer steps.
        progress: Show a tqdm progress bar (main process only).
        plot: Draw ``loss.png`` at the end.
        trackers: Experiment trackers fed through accelerate: any of ``tensorboard``, ``wandb``,
            ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``
            (see :mod:`monkeytune.train.trackers`). A missing package stops the run at start.
        project: Project name the trackers file the run under (W&B project, MLflow experiment,
            TensorBoard sub-folder of ``<output_dir>/trackers``).
        tracker_options: Extra start-up arguments per tracker, e.g. ``{wandb: {entity: team}}``.
        tensorboard: Replaced by ``trackers``. Configs that still set it are translated when
            loaded (``true``: add ``tensorboard``; ``auto``: add it when installed; ``false``:
            nothing) with a warning saying what to write instead.
    """

    every: int = 1
    progress: bool = True
    plot: bool = True
    trackers: list[str] = field(default_factory=list)
    project: str = "monkeytune"
    tracker_options: dict = field(default_factory=dict)
    tensorboard: str | None = field(default=None, metadata={"deprecated": True})


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSection,
    "policy": PolicySection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}


@dataclass
class TrainConfig:
    """The whole run: one attribute per section."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSection = field(default_factory=DataSection)
    policy: PolicySection = field(default_factory=PolicySection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data using the YAML key names (``from``, not ``from_dir``)."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {_key(f): _plain(getattr(section, f.name)) for f in dataclasses.fields(section)
                         # A deprecated key that was not given stays out of saved configs.
                         if not (f.metadata.get("deprecated") and getattr(section, f.name) is None)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):  # an inline ModelConfig
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _choice(value: str, choices: tuple[str, ...], name: str, origin: str) -> None:
    if value not in choices:
        raise ConfigError(f"{origin}: {name} must be one of {list(choices)}, got {value!r}")


def _check_tables(data: DataSection, origin: str) -> None:
    """``data.columns`` and ``data.load_options``."""
    if data.columns:
        from monkeytune.data.columns import columns_problem  # noqa: PLC0415 - only when columns are set

        problem = columns_problem(data.columns)
        if problem:
            raise ConfigError(f"{origin}: data.columns: {problem}")
    if data.load_options and not any(str(p).startswith("hf:") for p in data.train):
        raise ConfigError(f"{origin}: data.load_options is set but no data.train entry is a dataset name (hf:NAME)")
    if data.load_options.get("streaming"):
        raise ConfigError(f"{origin}: data.load_options.streaming is not supported: an hf: dataset is "
                          "read from the datasets cache")


def validate(cfg: TrainConfig, origin: str = "config") -> None:
    """Check values and their combinations; raise :class:`ConfigError` naming the field."""
    try:
        # Caught here, before the engine is built or the configuration printed.
        cfg.model.check(f"{origin}: model")
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None
    if not cfg.data.train:
        raise ConfigError(f"{origin}: data.train is required (a data file or a list of them)")
    _choice(cfg.data.padding, PADDINGS, "data.padding", origin)
    _choice(cfg.data.on_bad_sample, ("error", "skip"), "data.on_bad_sample", origin)
    _choice(cfg.data.template, ("monkey", "chatml", "tokenizer"), "data.template", origin)
    _choice(cfg.data.format, ("auto", "monkey", "llava", "sharegpt", "openai"), "data.format", origin)
    if not 0 <= cfg.data.max_skip_fraction <= 1:
        raise ConfigError(f"{origin}: data.max_skip_fraction must be in [0, 1], got {cfg.data.max_skip_fraction}")
    _check_tables(cfg.data, origin)
    _choice(cfg.optim.scheduler, SCHEDULERS, "optim.scheduler", origin)
    _choice(cfg.optim.name, OPTIMIZERS, "optim.name", origin)
    _choice(cfg.train.attention, ATTENTIONS, "train.attention", origin)
    _choice(cfg.train.precision, tuple(PRECISIONS), "train.precision", origin)
    _choice(cfg.train.loss_norm, LOSS_NORMS, "train.loss_norm", origin)
    _choice(cfg.train.objective, OBJECTIVES, "train.objective", origin)
    _choice(cfg.train.grad_reduce_dtype, ("fp32", "bf16"), "train.grad_reduce_dtype", origin)
    _choice(cfg.checkpoint.final_save, FINAL_SAVES, "checkpoint.final_save", origin)
    for part in cfg.train.gradient_checkpointing:
        _choice(part, CHECKPOINTABLE, "train.gradient_checkpointing entries", origin)
    positive = {
        "data.max_length": cfg.data.max_length,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "train.ddp_timeout": cfg.train.ddp_timeout,
        "log.every": cfg.log.every,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{origin}: {name} must be >= 1, got {value}")
    non_negative = {
        "train.epochs": cfg.train.epochs,
        "train.max_steps": cfg.train.max_steps,
        "data.num_workers": cfg.data.num_workers or 0,
        "data.view_cache_gib": cfg.data.view_cache_gib,
        "data.synthetic": cfg.data.synthetic,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{origin}: {name} must be >= 0, got {value}")
    # NaN and inf pass every comparison below unnoticed (an inf rate applies a NaN update).
    for section in ("data", "optim"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{origin}: {section}.{f.name} must be a finite number, got {v}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError(f"{origin}: set train.epochs or train.max_steps")
    if cfg.data.streaming and cfg.train.max_steps == 0:
        raise ConfigError(f"{origin}: data.streaming needs train.max_steps (a stream has no length to count "
                          "train.epochs by)")
    if cfg.data.streaming and (cfg.data.columns or any(str(p).startswith("hf:") for p in cfg.data.train)):
        raise ConfigError(f"{origin}: data.streaming reads local JSON Lines files and tables with the project's "
                          "field names: data.columns and hf: dataset names are not streamed yet")
    if cfg.train.objective == "window_answer":
        _check_window_answer(cfg, origin)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"{origin}: optim.lr must be > 0, got {cfg.optim.lr}")
    if not cfg.optim.eps > 0:
        raise ConfigError(f"{origin}: optim.eps must be > 0, got {cfg.optim.eps}")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"{origin}: optim.warmup_ratio must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{origin}: optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    for comp, lr in cfg.policy.lr.items():
        try:
            ok = math.isfinite(float(lr)) and float(lr) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{origin}: policy.lr.{comp} must be a non-negative number, got {lr!r}")


def _check_window_answer(cfg: TrainConfig, origin: str) -> None:
    """What ``train.objective window_answer`` needs (see :mod:`monkeytune.train.objectives`)."""
    need = "train.objective window_answer"
    if cfg.data.streaming or cfg.data.packing:
        raise ConfigError(f"{origin}: {need} reads whole records by index (its answer table is built at set-up): "
                          "set data.streaming false and data.packing false")
    if cfg.checkpoint.every or cfg.checkpoint.resume:
        raise ConfigError(f"{origin}: {need} keeps its head outside the model, and checkpoints hold the model: "
                          "set checkpoint.every 0 and no checkpoint.resume (the stage is short; rerun it)")
