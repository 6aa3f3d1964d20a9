"""Reading a :class:`~monkeytune.train.config.TrainConfig` from YAML and ``--section.key`` overrides.

Values from the file and from the command line go through one converter (:func:`coerce`) driven
by the dataclass annotations, so ``lr: 1e-5`` (a string to PyYAML) and ``--optim.lr 1e-5`` both
become floats. Errors name the file and line (from the YAML node marks) and the ``section.key``.
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

from monkeytune.config import ModelConfig
from monkeytune.model.spec import ModelSpecError, config_from_mapping
from monkeytune.train.config import SECTIONS, ConfigError, TrainConfig, _key, validate
from monkeytune.train.trackers import check_tracker_settings, migrate_deprecated

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


def _fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(section_cls)}


def _hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def set_value(cfg: TrainConfig, dotted: str, value: Any, where: str = "override") -> None:
    """Set ``section.key`` on ``cfg`` from a YAML value or a command-line string.

    Raises:
        ConfigError: for an unknown section or key or a value of the wrong type.
    """
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: {dotted!r} must read SECTION.KEY (e.g. train.max_steps)")
    sec, key = parts
    if sec not in SECTIONS:
        raise ConfigError(f"{where}: " + _unknown(sec, list(SECTIONS), "section"))
    fields = _fields(SECTIONS[sec])
    if key not in fields:
        raise ConfigError(f"{where}: " + _unknown(key, list(fields), "key", prefix=f"{sec}."))
    f = fields[key]
    converted = coerce(value, _hints(SECTIONS[sec])[f.name], f"{where}: {sec}.{key}")
    setattr(getattr(cfg, sec), f.name, converted)


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
            raise ConfigError(f"{where}: " + _unknown(str(sec), list(SECTIONS), "section"))
        if body is None:
            continue
        if isinstance(body, SECTIONS[sec]):  # given typed from Python (e.g. a ModelSpec)
            setattr(cfg, sec, copy.deepcopy(body))
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping, got {type(body).__name__}")
        for key, value in body.items():
            kwhere = f"{origin}:{lines[(sec, key)]}" if (sec, key) in lines else origin
            set_value(cfg, f"{sec}.{key}", value, kwhere)
    for key, value in overrides or []:
        set_value(cfg, key, value, f"--{key}")
    migrate_deprecated(cfg, origin)
    validate(cfg, origin)
    check_tracker_settings(cfg.log, origin)
    return cfg


