"""Reading a :class:`~monkeytune.train.config.TrainConfig` from YAML and ``--section.key`` overrides.

Values from the file and from the command line go through one converter (:func:`coerce`) driven
by the dataclass annotations, so ``lr: 1e-5`` (a string to PyYAML) and ``--optim.lr 1e-5`` both
become floats. Errors name the file and line (from the YAML node marks) and the ``section.key``.

An override reaches nested keys at any depth: ``--model.config.image.grid "[0, 0]"`` edits one
field of the inline model config (on a ``preset`` model, the preset's config becomes the inline
one first) and ``--policy.lr.llm 5e-6`` one entry of a mapping. Every level refuses an unknown
key with the closest spelling and the keys it knows.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from monkeytune.config import ModelConfig, get_config
from monkeytune.model.spec import ModelSpec, ModelSpecError, config_from_mapping
from monkeytune.train.config import SECTIONS, ConfigError, TrainConfig, _key, validate
from monkeytune.train.trackers import TRACKERS, check_tracker_settings, migrate_deprecated

# ---------------------------------------------------------------------------------- conversion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}
_YAML_SPECIAL = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``.

    Raises:
        ConfigError: naming ``where`` and the expected type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: cannot read {value!r} as {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str) and value.strip().lower() in _YAML_SPECIAL:
            # YAML's spellings, so --optim.lr .inf reads as the file's `lr: .inf` does.
            value = _YAML_SPECIAL[value.strip().lower()]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = _parse_inline(value, where)
            if isinstance(value, str):  # a bare word is a one-element list
                value = [value] if value.strip() else []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args:
            return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return value
    if tp is ModelConfig:  # model.config: an inline model config, typed from here on
        if isinstance(value, str):
            value = _parse_inline(value, where)
        try:
            return config_from_mapping(value, where)
        except ModelSpecError as e:
            raise ConfigError(str(e)) from None
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = _parse_inline(value, where)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # a programming error


def _parse_inline(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {text!r} ({e})") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ---------------------------------------------------------------------------------- loading


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every ``section`` and ``section.key`` in a YAML document."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for knode, vnode in root.value:
        sec = str(knode.value)
        lines[(sec,)] = knode.start_mark.line + 1
        if isinstance(vnode, yaml.MappingNode):
            for k2, _ in vnode.value:
                lines[(sec, str(k2.value))] = k2.start_mark.line + 1
    return lines


def _unknown(name: str, choices: list[str], what: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"{prefix}{name}: unknown {what}{hint}; known: {', '.join(choices)}"


def _unknown_section(sec: str, where: str) -> ConfigError:
    if sec == "vision_warmup":  # configs written before the warm-up became a stage of its own
        return ConfigError(f"{where}: the vision_warmup section is now a stage of its own: a run with train.objective "
                           "window_answer and policy.preset vision, whose final folder the next run starts from "
                           "(see examples/from-scratch-two-stage/warmup.yaml)")
    return ConfigError(f"{where}: " + _unknown(sec, list(SECTIONS), "section"))


def _fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(section_cls)}


def _hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def set_value(cfg: TrainConfig, dotted: str, value: Any, where: str = "override") -> None:
    """Set ``section.key`` (or a nested ``section.key.sub...``) on ``cfg`` from a YAML value or a
    command-line string.

    Raises:
        ConfigError: for an unknown section or key at any level, or a value of the wrong type.
    """
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where}: {dotted!r} must read SECTION.KEY or SECTION.KEY.SUBKEY... "
                          "(e.g. train.max_steps, model.config.image.grid)")
    sec = parts[0]
    if sec not in SECTIONS:
        raise _unknown_section(sec, where)
    _set_in(getattr(cfg, sec), parts[1:], value, where, sec)


def _set_in(obj: Any, keys: list[str], value: Any, where: str, path: str) -> None:
    """Set ``keys`` (a path below ``path``) inside the dataclass or mapping ``obj``."""
    if isinstance(obj, dict):
        _set_in_mapping(obj, keys, value, where, path)
        return
    fields = _fields(type(obj))
    key = keys[0]
    if key not in fields:
        raise ConfigError(f"{where}: " + _unknown(key, list(fields), "key", prefix=f"{path}."))
    f, here = fields[key], f"{path}.{key}"
    if len(keys) == 1:
        setattr(obj, f.name, coerce(value, _hints(type(obj))[f.name], f"{where}: {here}"))
        return
    # A copy is edited, so a mapping or config the caller passed in (load_config(data=...)) stays as it was.
    child = copy.deepcopy(getattr(obj, f.name))
    if child is None and isinstance(obj, ModelSpec) and f.name == "config":
        child = _config_to_edit(obj, where, here)
    if child is None and typing.get_origin(_hints(type(obj))[f.name]) is dict:
        child = {}
    if not (isinstance(child, dict) or dataclasses.is_dataclass(child)):
        raise ConfigError(f"{where}: {here} is a single value, it has no key {keys[1]!r}")
    _set_in(child, keys[1:], value, where, here)
    setattr(obj, f.name, child)


def _set_in_mapping(mapping: dict, keys: list[str], value: Any, where: str, path: str) -> None:
    """Set ``keys`` inside a mapping field; the value is read as YAML, as a whole mapping's would be."""
    key = keys[0]
    known = _mapping_keys(path)
    if known is not None and key not in known:
        raise ConfigError(f"{where}: " + _unknown(key, known, "key", prefix=f"{path}."))
    if len(keys) == 1:
        mapping[key] = _parse_inline(value, f"{where}: {path}.{key}") if isinstance(value, str) else value
        return
    child = mapping.setdefault(key, {})
    if child is None:
        child = mapping[key] = {}
    if not isinstance(child, dict):
        raise ConfigError(f"{where}: {path}.{key} is a single value ({child!r}), it has no key {keys[1]!r}")
    _set_in_mapping(child, keys[1:], value, where, f"{path}.{key}")


def _config_to_edit(spec: ModelSpec, where: str, here: str) -> ModelConfig:
    """The model config a ``model.config.*`` override edits when the spec has no inline one.

    A preset's config becomes the inline one (a preset and a config together are refused), so
    ``--model.config.image.grid "[0, 0]"`` on a preset example needs no copied YAML. A model
    folder keeps its own config: its weights were trained with it.
    """
    if spec.from_dir:
        raise ConfigError(f"{where}: {here}: the model is loaded from {spec.from_dir}, whose config is "
                          "its own; model.config.* edits a preset or inline model")
    if not spec.preset:
        return ModelConfig()  # as a YAML `config:` mapping does, unnamed fields take their defaults
    try:
        spec.check("model")
    except ModelSpecError as e:
        raise ConfigError(f"{where}: {e}") from None
    config, spec.preset = get_config(spec.preset), None
    return config


def _mapping_keys(path: str) -> list[str] | None:
    """The keys a mapping field accepts where the set is closed; None where any key is fine."""
    if path == "policy.lr":
        from monkeytune.policy.components import ALIASES, COMPONENTS  # noqa: PLC0415 - imports torch

        return [*COMPONENTS, *ALIASES, "default"]
    if path == "policy.lora":
        from monkeytune.policy.presets import DEFAULT_LLM_LORA  # noqa: PLC0415 - imports torch

        return list(DEFAULT_LLM_LORA)
    if path == "log.tracker_options":
        return list(TRACKERS)
    return None


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``["--train.max_steps", "10", "--optim.lr=2e-5"]`` -> ``[("train.max_steps", "10"), ...]``."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides read --SECTION.KEY VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key, value))
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[tuple[str, str]] | None = None,
    data: dict | None = None,
) -> TrainConfig:
    """Read a YAML file (or a dict), apply overrides, validate.

    A section of ``data`` may also be given as its dataclass (e.g. ``{"model": ModelSpec(...)}``).

    Args:
        path: YAML file; its relative ``data.train``, ``model.from`` ... stay as written
            (resolved against the working directory, like every command-line path); a run
            saves them absolute (:func:`monkeytune.train.setup.effective_config`).
        overrides: ``(section.key, value)`` pairs applied after the file.
        data: A parsed configuration to use instead of ``path``.

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ConfigError: naming the file, line and field of the first problem.
    """
    cfg = TrainConfig()
    origin = "config"
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        lines = _line_map(text)
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    for sec, body in data.items():
        where = f"{origin}:{lines[(sec,)]}" if (sec,) in lines else origin
        if sec not in SECTIONS:
            raise _unknown_section(str(sec), where)
        if body is None:
            continue
        if isinstance(body, SECTIONS[sec]):  # given typed from Python (e.g. a ModelSpec)
            setattr(cfg, sec, copy.deepcopy(body))
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping, got {type(body).__name__}")
        for key, value in body.items():
            kwhere = f"{origin}:{lines[(sec, key)]}" if (sec, key) in lines else origin
            # One key as written: a dotted YAML key is not a path (nesting is YAML's own job there).
            _set_in(getattr(cfg, sec), [str(key)], value, kwhere, sec)
    for key, value in overrides or []:
        set_value(cfg, key, value, f"--{key}")
    migrate_deprecated(cfg, origin)
    validate(cfg, origin)
    check_tracker_settings(cfg.log, origin)
    return cfg


