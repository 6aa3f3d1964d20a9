"""Validate a data set before training: every problem found at once, with file, line and field.

:func:`check_dataset` runs the training chain dry: the same dataset class parses every record
(any supported format), renders it with the training template and fits it to ``max_length``,
and every image goes through the training loader's checks; it returns a :class:`Report` and
never stops at the first problem.

Token counts need the tokenizer the model will train with. Without one, text length is
estimated at one token per 3 UTF-8 bytes (byte-level BPE vocabularies such as Qwen's average
3-4 bytes per token on English, fewer on CJK), while image placeholders and template tokens are
counted exactly; over-length samples are then reported as warnings, not errors, since the
count is only an estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from monkeytune.config import MODEL_PRESETS, ModelConfig
from monkeytune.data.columns import columns_problem
from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.errors import TOO_LONG, DataError
from monkeytune.data.templates import CONVERSATION_TEMPLATES, IGNORE_INDEX, IM_END, IM_START
from monkeytune.model.spec import ModelSpec, ModelSpecError, resolve_model
from monkeytune.tokenizer.base import Tokenizer

BYTES_PER_TOKEN_ESTIMATE = 3


class LengthEstimator:
    """Tokenizer stand-in that only counts: ``ceil(utf8_bytes / 3)`` tokens per text piece.

    Its ids are meaningless; it exists so that templates and image placeholders are counted
    by the very code that builds training samples.
    """

    eos_id = pad_id = 0
    image_start_id, image_end_id, image_pad_id = 1, 2, 3
    _specials = {IM_START: 4, IM_END: 5}

    @property
    def vocab_size(self) -> int:
        return 6

    def encode(self, text: str) -> list[int]:
        return [6] * math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise TypeError("a length estimator cannot decode")

    def special_id(self, token: str) -> int:
        return self._specials[token]


@dataclass
class Report:
    """What :func:`check_dataset` found.

    Attributes:
        files: Data files checked.
        num_records: Records read, valid or not (a JSON list that fails to decode counts the
            records before the fault).
        num_valid: Records without any error.
        image_refs: Image references in parseable records.
        image_files: Distinct image files referenced.
        lengths: Token count of every sample that could be rendered.
        supervised: Supervised token count of every such sample.
        errors: Every problem, in file order.
        warnings: Problems that do not fail the check (estimated over-length, config notes).
        estimated: Whether lengths are estimates (no tokenizer given).
        formats: The format each file was read as.
    """

    files: list[str]
    template: str
    max_length: int
    tokens_per_image: int
    estimated: bool
    num_records: int = 0
    num_valid: int = 0
    image_refs: int = 0
    image_files: int = 0
    lengths: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors_by_kind(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.errors).most_common())

    def format(self, max_listed: int = 20) -> str:
        """A human-readable summary; lists at most ``max_listed`` errors and warnings each."""
        out = [f"data check: {', '.join(self.files)}"]
        if self.formats:
            out.append("  format:   " + ", ".join(f"{fmt} ({Path(f).name})" for f, fmt in self.formats.items()))
        bad = self.num_records - self.num_valid
        out.append(f"  records:  {self.num_records} ({self.num_valid} valid, {bad} with errors)")
        out.append(f"  images:   {self.image_refs} references to {self.image_files} files")
        how = "estimated, no tokenizer given" if self.estimated else "exact"
        out.append(
            f"  template: {self.template}, {self.tokens_per_image} tokens per image, "
            f"max_length {self.max_length}"
        )
        if self.lengths:
            s = sorted(self.lengths)
            p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
            mean = sum(s) / len(s)
            out.append(
                f"  tokens per sample ({how}): min {s[0]}, mean {mean:.1f}, p95 {p95}, max {s[-1]}"
            )
            total_sup = sum(self.supervised)
            out.append(
                f"  supervised tokens: {total_sup} total, {total_sup / len(self.supervised):.1f} per sample"
            )
        if self.warnings:
            out.append(f"warnings ({len(self.warnings)}):")
            out.extend(f"  {w}" for w in self.warnings[:max_listed])
            if len(self.warnings) > max_listed:
                out.append(f"  ... {len(self.warnings) - max_listed} more")
        if self.errors:
            out.append(f"errors ({len(self.errors)}):")
            out.extend(f"  {kind}: {n}" for kind, n in self.errors_by_kind.items())
            out.extend(f"  {e.describe()}" for e in self.errors[:max_listed])
            if len(self.errors) > max_listed:
                out.append(f"  ... {len(self.errors) - max_listed} more")
        n = len(self.errors)
        out.append("result: OK" if self.ok else f"result: FAILED ({n} error{'s' if n > 1 else ''})")
        return "\n".join(out)


def check_dataset(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    model_cfg: ModelConfig,
    tokenizer: Tokenizer | None = None,
    max_length: int = 2048,
    template: str = "monkey",
    truncate_turns: bool = False,
    decode_images: bool = True,
    format: str = "auto",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
    columns: dict[str, str] | None = None,
    load_options: dict | None = None,
) -> Report:
    """Check a data set as training would see it: the training chain, run dry.

    The records go through the very :class:`~monkeytune.data.dataset.ConversationDataset`
    training builds (parse, size check, render, fit), and every image through the training
    loader's checks and decompression-bomb guard, without building a batch.

    Args:
        path: One data file or several.
        model_cfg: Gives tokens per image and the image size limit.
        tokenizer: The training tokenizer; ``None`` estimates text lengths (see module doc).
        max_length: Longest accepted sample in tokens.
        template: ``monkey`` or ``chatml``.
        truncate_turns: Count a sample as fitting if dropping trailing text-only exchanges
            makes it fit, as training with ``truncate_turns=True`` would.
        decode_images: Fully decode every image (slow on big sets, but finds truncated
            files); otherwise only check that the files exist and are readable.
        format: ``auto`` or a format name (see :mod:`monkeytune.data.messages`).
        image_root: Folder relative image paths resolve against (default: each file's folder).
        allow_empty_answers: Accept assistant turns without text.
        columns: The data's own names of record fields (:mod:`monkeytune.data.columns`).
        load_options: ``datasets.load_dataset`` keyword arguments for ``hf:`` names.

    Returns:
        A :class:`Report`; ``report.ok`` is false when any error was found.
    """
    if template not in CONVERSATION_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {CONVERSATION_TEMPLATES}")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    estimated = tokenizer is None
    tok: Tokenizer = LengthEstimator() if tokenizer is None else tokenizer
    tpi = model_cfg.tokens_per_image
    report = Report([str(p) for p in paths], template, max_length, tpi, estimated)
    if tokenizer is not None:
        for name in ("image_start_id", "image_end_id", "image_pad_id"):
            if getattr(tokenizer, name) != getattr(model_cfg, name):
                report.warnings.append(
                    f"tokenizer.{name} ({getattr(tokenizer, name)}) differs from the model "
                    f"config's {name} ({getattr(model_cfg, name)}); training refuses this pair"
                )
    # The chain needs the tokenizer's image ids in the config; only tokens_per_image matters here.
    ids = {n: getattr(tok, n) for n in ("image_start_id", "image_end_id", "image_pad_id")}
    ds = ConversationDataset(
        paths, tok, dataclasses.replace(model_cfg, **ids), max_length=max_length, template=template,
        truncate_turns=truncate_turns, format=format, image_root=image_root,
        allow_empty_answers=allow_empty_answers, strict=False, columns=columns, load_options=load_options,
    )
    report.formats = dict(ds.formats)
    report.errors.extend(ds.parse_errors)
    report.num_records = ds.num_records

    memo: dict[str, tuple[str, str] | None] = {}
    for i, s in enumerate(ds.samples):
        before = len(report.errors)
        report.image_refs += len(s.images)
        report.errors.extend(ds.image_errors(i, decode_images, memo))
        try:
            ids_, labels, _, _ = ds.prepare(i)
            report.lengths.append(len(ids_))
            report.supervised.append(int((labels != IGNORE_INDEX).sum()))
        except DataError as e:
            if e.kind == TOO_LONG and estimated:
                report.warnings.append(s.error(TOO_LONG, "estimated " + e.reason, e.field).describe())
            else:
                report.errors.append(e)
            enc = ds.unfitted(i) if e.kind == TOO_LONG else None
            if enc is not None:
                report.lengths.append(len(enc))
                report.supervised.append(enc.num_supervised)
        if len(report.errors) == before:
            report.num_valid += 1
    report.image_files = len({ref.source for s in ds.samples for ref in s.images})
    order = {f: k for k, f in enumerate(report.files)}
    report.errors.sort(key=lambda e: (order.get(e.file, 0), e.index if e.index is not None else -1))
    return report


# Defaults of the data settings when neither the command line nor a training config gives them.
CHECK_DEFAULTS = {"template": "monkey", "max_length": 2048, "truncate_turns": False, "format": "auto",
                  "image_root": None, "allow_empty_answers": False, "columns": None, "load_options": None}
DEFAULT_MODEL = "monkey-7b"


@dataclass
class CheckSettings:
    """What to check against: the model (a spec, resolved like training resolves it) and the
    data settings of :func:`check_dataset`."""

    model: ModelSpec
    template: str = "monkey"
    max_length: int = 2048
    truncate_turns: bool = False
    format: str = "auto"
    image_root: str | None = None
    allow_empty_answers: bool = False
    columns: dict | None = None
    load_options: dict | None = None


def read_check_settings(config: str | None, tokenizer: str | None = None, **given) -> CheckSettings:
    """The settings a ``--config`` value and command-line values describe (given values win).

    ``config`` is one of:

    * ``None``: the ``monkey-7b`` preset;
    * a preset name or a model folder (monkeytune or official; its tokenizer if it holds one);
    * a YAML file holding a model config mapping;
    * a training config YAML: its ``model`` section, and ``data:`` ``template``, ``max_length``,
      ``truncate_turns``, ``format``, ``image_root``, ``allow_empty_answers``, ``columns`` and
      ``load_options``.

    Args:
        config: The ``--config`` value.
        tokenizer: Tokenizer folder; overrides the config's.
        **given: Values of :data:`CHECK_DEFAULTS`'s keys; None means not given.

    Raises:
        ValueError: unknown preset, unreadable file or invalid config, naming the file.
    """
    data: dict = {}
    if config is None or config in MODEL_PRESETS or Path(config).is_dir():
        spec = ModelSpec.parse(config or DEFAULT_MODEL, "--config")
    else:
        p = Path(config)
        if not p.is_file():
            raise ValueError(f"--config {config!r} is neither a preset ({', '.join(sorted(MODEL_PRESETS))}), "
                             "a model folder nor a file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {p}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config {p}: expected a mapping")
        try:
            spec = ModelSpec.parse(data.get("model", data), f"config {p}: model")
        except ModelSpecError as e:
            raise ValueError(str(e)) from None
        data = data.get("data") if "model" in data and isinstance(data.get("data"), dict) else {}
    if tokenizer is not None:
        spec = dataclasses.replace(spec, tokenizer=tokenizer)
    values = {k: given.get(k) if given.get(k) is not None else data.get(k, default)
              for k, default in CHECK_DEFAULTS.items()}
    values = {k: CHECK_DEFAULTS[k] if v is None else v for k, v in values.items()}
    if values["columns"] and columns_problem(values["columns"]):
        raise ValueError(f"data.columns: {columns_problem(values['columns'])}")
    if values["load_options"] is not None and not isinstance(values["load_options"], dict):
        raise ValueError(f"data.load_options: must be a mapping, got {type(values['load_options']).__name__}")
    return CheckSettings(spec, **values)


def check_with_settings(files: Sequence[str | os.PathLike], settings: CheckSettings, decode_images: bool = True) -> Report:
    """Resolve the settings' model (and tokenizer) and check ``files`` with them.

    Without a tokenizer, text lengths are estimated (see the module doc).

    Raises:
        ValueError: the model spec does not resolve (a missing tokenizer folder included).
    """
    resolved = resolve_model(settings.model, "--config model")
    return check_dataset(
        files, resolved.config, tokenizer=resolved.tokenizer, max_length=int(settings.max_length),
        template=settings.template, truncate_turns=bool(settings.truncate_turns), decode_images=decode_images,
        format=settings.format, image_root=settings.image_root, allow_empty_answers=bool(settings.allow_empty_answers),
        columns=settings.columns, load_options=settings.load_options,
    )
