"""Which model: one typed spec and the one resolver every command calls.

A :class:`ModelSpec` names a model in one of three ways, exactly as the ``model`` section of a
training config writes it::

    model: {preset: tiny, tokenizer: data/tokenizer}          # a built-in config, random weights
    model: {config: {vision: {...}, llm: {...}}, tokenizer: ...}  # an inline config, random weights
    model: {from: runs/a/final}                                # a model folder (monkeytune or official)
    model: {compose: {vision: clip-dir, llm: qwen-dir, grid: [2, 2]}}  # pretrained parts joined

:func:`resolve_model` turns a spec into the :class:`~monkeytune.config.ModelConfig` that will be
built or loaded. ``train``, ``inspect``, ``data check`` and the demo all go through it, so a
spec means the same model everywhere. For ``preset`` / ``config`` with a tokenizer, the image
token ids and the vocabulary come from the tokenizer (``ModelConfig.matched_to_tokenizer``);
every field that changes is logged and listed in :attr:`ResolvedModel.adjusted`, and a run saves
the resolved config, so its ``config.yaml`` states what was built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monkeytune.config import MODEL_PRESETS, ModelConfig, get_config
from monkeytune.model.io import folder_config, has_tokenizer
from monkeytune.tokenizer.loading import load_tokenizer

logger = logging.getLogger(__name__)

# Keys of the ``model`` section of a training config, as YAML writes them.
SPEC_KEYS = ("preset", "config", "from", "compose", "tokenizer", "init_seed")
SOURCES = ("preset", "config", "from", "compose")


class ModelSpecError(ValueError):
    """A model spec that names no usable model; the message says where and which key."""


@dataclass
class ModelSpec:
    """Which model to use. Exactly one of ``preset``, ``config`` and ``from_dir`` is set.

    Attributes:
        preset: Name of a built-in configuration (``tiny``, ``mid``, ``monkey-7b``, ...), randomly
            initialised.
        config: An inline :class:`~monkeytune.config.ModelConfig`, randomly initialised.
        from_dir: A model folder, monkeytune or official (YAML key ``from``).
        compose: A composition of pretrained parts: ``vision`` and ``llm`` folders plus any of
            :class:`~monkeytune.model.compose.ComposeOptions` (``monkeytune compose``'s options).
        tokenizer: Tokenizer folder; by default the model folder's own.
        init_seed: Seed for the random initialisation of ``preset``/``config`` models.
    """

    preset: str | None = None
    config: ModelConfig | None = None
    from_dir: str | None = field(default=None, metadata={"key": "from"})
    compose: dict[str, Any] | None = None
    tokenizer: str | None = None
    init_seed: int = 0

    @property
    def sources(self) -> list[str]:
        """The source keys that are set (a valid spec has exactly one)."""
        return [k for k, v in (("preset", self.preset), ("config", self.config), ("from", self.from_dir),
                               ("compose", self.compose)) if v]

    def check(self, where: str = "model") -> None:
        """Check the spec without reading any file.

        An inline config is validated with its image token ids left out: those come from the
        tokenizer when the model is resolved.

        Raises:
            ModelSpecError: not exactly one source, an unknown preset (with the closest
                spelling), or an inline config whose sizes do not fit together.
        """
        if len(self.sources) != 1:
            raise ModelSpecError(f"{where} needs exactly one of preset, config, from or compose; "
                                 f"got {self.sources or 'none'}")
        if self.preset and self.preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(self.preset, list(MODEL_PRESETS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ModelSpecError(f"{where}.preset: unknown preset {self.preset!r}{hint}; "
                                 f"known: {', '.join(sorted(MODEL_PRESETS))}")
        if self.config:
            try:
                dataclasses.replace(self.config, image_start_id=0, image_end_id=0, image_pad_id=0).validate()
            except ValueError as e:
                raise ModelSpecError(f"{where}.config: {e}") from None
        if self.compose:
            from monkeytune.model.compose import ComposeError, options_from_mapping  # noqa: PLC0415

            try:
                options_from_mapping(self.compose)
            except ComposeError as e:
                raise ModelSpecError(f"{where}.compose: {e}") from None

    @classmethod
    def parse(cls, value: Any, where: str = "model") -> "ModelSpec":
        """The spec a YAML value or command-line string writes.

        Accepted: a preset name; a model folder path; a training config's ``model`` mapping
        (keys from :data:`SPEC_KEYS`); or a model config mapping itself (an inline config).

        Raises:
            ModelSpecError: naming ``where`` for a bad form, unknown preset or invalid config.
        """
        if isinstance(value, ModelSpec):
            spec = value
        elif isinstance(value, str):
            if value in MODEL_PRESETS:
                spec = cls(preset=value)
            elif Path(value).is_dir():
                spec = cls(from_dir=value)
            else:
                raise ModelSpecError(f"{where}: {value!r} is neither a model preset "
                                     f"({', '.join(sorted(MODEL_PRESETS))}) nor a model folder")
        elif isinstance(value, dict):
            if any(k in value for k in SOURCES) and set(value) <= set(SPEC_KEYS):
                config = value.get("config")
                spec = cls(preset=value.get("preset"), config=config_from_mapping(config, f"{where}.config"),
                           from_dir=value.get("from"), compose=value.get("compose"), tokenizer=value.get("tokenizer"),
                           init_seed=int(value.get("init_seed") or 0))
            else:
                spec = cls(config=config_from_mapping(value, where))
        else:
            raise ModelSpecError(f"{where}: expected a preset name, a model folder or a mapping, "
                                 f"got {type(value).__name__}")
        spec.check(where)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data using the YAML key names (``from``, not ``from_dir``)."""
        return {"preset": self.preset, "config": self.config.to_dict() if self.config else None,
                "from": self.from_dir, "compose": self.compose, "tokenizer": self.tokenizer, "init_seed": self.init_seed}


def config_from_mapping(value: Any, where: str) -> ModelConfig | None:
    """A :class:`ModelConfig` from its mapping (None stays None); :class:`ModelSpecError` naming ``where``."""
    if value is None or isinstance(value, ModelConfig):
        return value
    if not isinstance(value, dict):
        raise ModelSpecError(f"{where}: expected a mapping, got {type(value).__name__}")
    try:
        return ModelConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"{where}: {e}") from None


@dataclass
class ResolvedModel:
    """The model a spec names, as it will be built or loaded.

    Attributes:
        spec: The spec that was resolved.
        config: The effective model configuration (for ``from``: the folder's own).
        tokenizer: The tokenizer, or None when the spec names none and the folder has none.
        tokenizer_dir: The folder the tokenizer was read from.
        adjusted: ``"field: old -> new"`` for every field taken from the tokenizer.
    """

    spec: ModelSpec
    config: ModelConfig
    tokenizer: Any = None
    tokenizer_dir: str | None = None
    adjusted: list[str] = field(default_factory=list)

    @property
    def built_fresh(self) -> bool:
        """Whether the model is randomly initialised (``preset`` / ``config``), not loaded."""
        return not self.spec.from_dir and not self.spec.compose


def resolve_model(spec: ModelSpec, where: str = "model", tokenizer: Any = None) -> ResolvedModel:
    """Resolve ``spec`` into the model configuration that will be built or loaded.

    * ``preset`` / ``config``: the configuration as written; with a tokenizer (``spec.tokenizer``
      or ``tokenizer``), its image token ids and vocabulary (rounded up to a multiple of 64) are
      taken from the tokenizer, and each changed field is logged.
    * ``from``: the folder's configuration, read from its ``config.json`` alone (no weights);
      the tokenizer is ``spec.tokenizer``, else the folder's own. A loaded model's ids are part
      of its weights, so nothing is adjusted: a disagreeing tokenizer is the caller's to refuse.

    Args:
        spec: The spec (checked here).
        where: Names the spec in error messages.
        tokenizer: An already loaded tokenizer to use instead of reading ``spec.tokenizer``.

    Raises:
        ModelSpecError: a bad spec, a missing tokenizer folder, or a config that does not validate.
        ModelFolderError: an unreadable model folder.
    """
    spec.check(where)
    tok_dir = spec.tokenizer
    if tokenizer is None and tok_dir is None and spec.from_dir and has_tokenizer(spec.from_dir):
        tok_dir = spec.from_dir
    if tokenizer is None and tok_dir is not None:
        try:
            tokenizer = load_tokenizer(tok_dir)
        except FileNotFoundError as e:
            raise ModelSpecError(f"{where}.tokenizer: {e}") from None
    if spec.from_dir:
        return ResolvedModel(spec, folder_config(spec.from_dir), tokenizer, tok_dir)
    if spec.compose:
        return _resolve_composition(spec, where)
    written = get_config(spec.preset) if spec.preset else copy.deepcopy(spec.config)
    config, adjusted = written, []
    if tokenizer is not None:
        config = written.matched_to_tokenizer(tokenizer)
        adjusted = _changes(written, config)
        for line in adjusted:
            logger.info("%s: %s (from the tokenizer: %d tokens, ids of <img> </img> <imgpad>)",
                        where, line, int(tokenizer.vocab_size))
    try:
        config.validate()
    except ValueError as e:
        raise ModelSpecError(f"{where}: {e}") from None
    return ResolvedModel(spec, config, tokenizer, tok_dir, adjusted)


def _resolve_composition(spec: ModelSpec, where: str) -> ResolvedModel:
    """A composition's config and tokenizer, from the parts' configs and the LLM's tokenizer
    (no weights are read: ``inspect`` plans it as it is, ``train`` composes it in the run folder)."""
    from monkeytune.model.compose import ComposeError, composed_config, llm_tokenizer, options_from_mapping  # noqa: PLC0415

    try:
        vision, llm, options = options_from_mapping(spec.compose)
        tokenizer = llm_tokenizer(llm)
        return ResolvedModel(spec, composed_config(vision, llm, tokenizer, options), tokenizer, None)
    except ComposeError as e:
        raise ModelSpecError(f"{where}.compose: {e}") from None


def _changes(old: ModelConfig, new: ModelConfig) -> list[str]:
    names = ["image_start_id", "image_end_id", "image_pad_id"]
    out = [f"{n}: {getattr(old, n)} -> {getattr(new, n)}" for n in names if getattr(old, n) != getattr(new, n)]
    if old.llm.vocab_size != new.llm.vocab_size:
        out.insert(0, f"llm.vocab_size: {old.llm.vocab_size} -> {new.llm.vocab_size}")
    return out
