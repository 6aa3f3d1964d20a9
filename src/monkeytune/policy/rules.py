"""Trainable-parameter rules: parsing, matching and the plan they form.

A *plan* is a preset (the default trainable set) plus an ordered list of rules. Each rule says
``train`` or ``freeze`` for the parameters it matches; the last matching rule wins and parameters
no rule matches keep the preset's default. Rules are plain data so they live in YAML:

.. code-block:: yaml

    policy:
      preset: monkey-fix-llm
      rules:
        - "train: llm.model.layers.{24-31}.*"          # string form: ACTION: PATTERN [& PATTERN ...]
        - freeze: ["vision.*", "*lora_mlp*"]           # dict form: a list means all must match
        - {train: "*.bias", component: resampler}      # optional component condition
        - {action: freeze, pattern: 're:llm\\.model\\.layers\\.(0|1)\\..*'}

Patterns are matched against the whole parameter name, both as reported by ``named_parameters``
and in its canonical spelling (see :func:`~monkeytune.policy.components.canonical_name`), so
rules written for the bare model keep working once peft wraps the LLM.

* Globs follow ``fnmatch``: ``*`` matches any run of characters (dots included), ``?`` one
  character, ``[seq]`` / ``[!seq]`` a character class. Two brace forms are added: ``{24-31}``
  matches the integers 24 to 31 and ``{q,k,v}`` any of the comma-separated alternatives.
* ``re:`` introduces a Python regular expression that must match the *whole* name
  (``re.fullmatch``), e.g. ``re:llm\\.model\\.layers\\.(2[4-9]|3[01])\\..*`` for layers 24-31.
* A leading ``!`` negates one condition: ``["llm.*", "!*lora*"]`` is the LLM without its LoRA.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from monkeytune.policy.components import expand_components

ACTIONS = ("train", "freeze")
_MAX_RANGE = 100_000


class PlanError(ValueError):
    """A plan that cannot be applied: a rule matching nothing, nothing trainable, bad syntax."""


def glob_to_regex(pattern: str) -> str:
    """Translate a glob with ``{a-b}`` integer ranges and ``{x,y}`` alternatives to a regex.

    Args:
        pattern: The glob, e.g. ``llm.model.layers.{24-31}.self_attn.{q,k}_proj.*``.

    Returns:
        An unanchored regular expression string (use with ``re.fullmatch``).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                neg = body.startswith("!")
                body = body[1:] if neg else body
                out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "{":
            j = pattern.find("}", i)
            if j < 0:
                raise PlanError(f"unclosed '{{' in pattern {pattern!r}")
            body = pattern[i + 1 : j]
            rng = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", body)
            if rng:
                lo, hi = int(rng.group(1)), int(rng.group(2))
                if lo > hi or hi - lo >= _MAX_RANGE:
                    raise PlanError(f"bad range {{{body}}} in pattern {pattern!r}: need low <= high")
                out.append("(?:" + "|".join(str(k) for k in range(lo, hi + 1)) + ")")
            elif "," in body:
                out.append("(?:" + "|".join(glob_to_regex(alt) for alt in body.split(",")) + ")")
            else:
                raise PlanError(
                    f"pattern {pattern!r}: braces must hold an integer range like {{24-31}} or "
                    f"alternatives like {{q,k,v}}, got {{{body}}}"
                )
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile one condition (glob or ``re:`` regex, without its ``!``) for ``fullmatch``."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise PlanError(f"invalid regular expression {pattern!r}: {exc}") from None
    return re.compile(glob_to_regex(pattern))


@dataclass(frozen=True)
class Rule:
    """One ``train``/``freeze`` rule.

    Attributes:
        action: ``"train"`` or ``"freeze"``.
        patterns: Conditions that must all hold; each a glob or ``re:`` regex, ``!`` negates.
        components: If given, the parameter's component must be one of these (aliases allowed).
        where: Where the rule was written (``"policy.rules[2]"``), for error messages.
    """

    action: str
    patterns: tuple[str, ...]
    components: tuple[str, ...] = ()
    where: str = "rule"
    _compiled: tuple[tuple[bool, re.Pattern[str]], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    _component_keys: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PlanError(f"{self.where}: action must be 'train' or 'freeze', got {self.action!r}")
        if not self.patterns and not self.components:
            raise PlanError(f"{self.where}: a rule needs at least one pattern or component")
        compiled = []
        for p in self.patterns:
            if not isinstance(p, str) or not p.strip("!"):
                raise PlanError(f"{self.where}: pattern must be a non-empty string, got {p!r}")
            neg = p.startswith("!")
            try:
                compiled.append((neg, compile_pattern(p[1:] if neg else p)))
            except PlanError as exc:
                raise PlanError(f"{self.where}: {exc}") from None
        object.__setattr__(self, "_compiled", tuple(compiled))
        try:
            keys = expand_components(list(self.components), where=self.where) if self.components else ()
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        object.__setattr__(self, "_component_keys", keys)

    @property
    def text(self) -> str:
        """The rule in its string form, e.g. ``train: vision.* & *lora*``."""
        s = f"{self.action}: " + " & ".join(self.patterns)
        if self.components:
            s += f" [component={','.join(self.components)}]"
        return s

    def matches(self, name: str, canonical: str, component: str) -> bool:
        """Whether this rule applies to a parameter (all conditions hold)."""
        if self._component_keys and component not in self._component_keys:
            return False
        for neg, rx in self._compiled:
            hit = rx.fullmatch(name) is not None or rx.fullmatch(canonical) is not None
            if hit == neg:
                return False
        return True

    def to_data(self) -> dict[str, Any]:
        """Plain-data form that :func:`parse_rule` reads back."""
        d: dict[str, Any] = {self.action: self.patterns[0] if len(self.patterns) == 1 else list(self.patterns)}
        if self.components:
            d["component"] = list(self.components)
        return d


def _as_patterns(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value.strip(),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value)
    raise PlanError(f"{where}: pattern must be a string or a non-empty list of strings, got {value!r}")


def parse_rule(spec: Any, where: str = "rule") -> Rule:
    """Build a :class:`Rule` from its plain-data form.

    Args:
        spec: ``"train: PATTERN [& PATTERN ...]"``, ``{"train"|"freeze": PATTERN_OR_LIST,
            "component": NAME_OR_LIST}``, ``{"action": ..., "pattern": ..., "component": ...}``
            or a :class:`Rule`.
        where: Location used in error messages.
    """
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        action, sep, rest = spec.partition(":")
        action = action.strip().lower()
        if not sep or action not in ACTIONS:
            raise PlanError(
                f"{where}: rule {spec!r} must read 'train: PATTERN' or 'freeze: PATTERN' "
                "(several patterns joined with ' & ' must all match)"
            )
        patterns = tuple(p.strip() for p in rest.split(" & "))
        return Rule(action, patterns, where=where)
    if isinstance(spec, dict):
        keys = set(spec)
        allowed = {"train", "freeze", "action", "pattern", "match", "component", "components"}
        bad = keys - allowed
        if bad:
            raise PlanError(f"{where}: unknown rule keys {sorted(bad)}; allowed: {sorted(allowed)}")
        comps = spec.get("component", spec.get("components", ()))
        if isinstance(comps, str):
            comps = (comps,)
        if not isinstance(comps, (list, tuple)):
            raise PlanError(f"{where}: component must be a name or a list of names, got {comps!r}")
        acts = [a for a in ACTIONS if a in spec]
        if "action" in spec:
            if acts:
                raise PlanError(f"{where}: give either 'action' or a '{acts[0]}' key, not both")
            pat_key = "pattern" if "pattern" in spec else "match"
            patterns = _as_patterns(spec[pat_key], where) if pat_key in spec else ()
            return Rule(str(spec["action"]).lower(), patterns, tuple(comps), where)
        if len(acts) != 1:
            raise PlanError(f"{where}: a rule needs exactly one of 'train' or 'freeze', got {sorted(keys)}")
        value = spec[acts[0]]
        patterns = () if value in (None, "", []) and comps else _as_patterns(value, where)
        return Rule(acts[0], patterns, tuple(comps), where)
    raise PlanError(f"{where}: a rule must be a string or a mapping, got {type(spec).__name__}")


def parse_rules(specs: Iterable[Any] | None, where: str = "rules") -> tuple[Rule, ...]:
    """Parse a list of rule specs; each error names ``where[i]``."""
    if specs is None:
        return ()
    if isinstance(specs, (str, dict)):
        raise PlanError(f"{where}: expected a list of rules, got a single {type(specs).__name__}")
    return tuple(parse_rule(s, f"{where}[{i}]") for i, s in enumerate(specs))


def _probe(pattern: str) -> str:
    """A literal string resembling what a pattern was meant to match, for difflib."""
    p = pattern.lstrip("!")
    if p.startswith("re:"):
        p = re.sub(r"\\(.)", r"\1", p[3:])
        p = re.sub(r"[\^\$\(\)\[\]\|\+\*\?]", "", p)
    p = re.sub(r"\{(\d+)\s*-\s*\d+\}", r"\1", p)
    p = re.sub(r"\{([^,}]*)[^}]*\}", r"\1", p)
    return p.replace("*", "").replace("?", "")


def _ranges(values: set[int]) -> str:
    vals = sorted(values)
    if len(vals) == 1:
        return str(vals[0])
    if vals == list(range(vals[0], vals[-1] + 1)):
        return f"{{{vals[0]}-{vals[-1]}}}"
    return "{" + ",".join(map(str, vals)) + "}"


def summarize_names(names: Iterable[str]) -> list[str]:
    """Collapse names that differ only in numeric segments: ``llm.model.layers.{0-31}.mlp.up_proj.weight``."""
    groups: dict[str, list[set[int]]] = {}
    for name in dict.fromkeys(names):
        parts = name.split(".")
        key = ".".join("#" if p.isdigit() else p for p in parts)
        idx = [int(p) for p in parts if p.isdigit()]
        slots = groups.setdefault(key, [set() for _ in idx])
        for slot, i in zip(slots, idx):
            slot.add(i)
    out = []
    for key, slots in groups.items():
        it = iter(slots)
        out.append(".".join(_ranges(next(it)) if p == "#" else p for p in key.split(".")))
    return out


def close_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Names (numeric segments collapsed to ranges) resembling what ``pattern`` was meant to match."""
    # Compare with layer numbers removed: a wrong index is visible from the printed ranges,
    # while the structure of the name decides which names are "close".
    def strip(x: str) -> str:
        return re.sub(r"\{[^}]*\}|\d+", "", x)

    probe = strip(_probe(pattern))
    if not probe.strip("."):
        return []
    scored = []
    for name in summarize_names(names):
        bare = strip(name)
        sm = difflib.SequenceMatcher(None, probe, bare[: len(probe)])
        score = max(sm.ratio(), difflib.SequenceMatcher(None, probe, bare).ratio())
        if score >= 0.6:
            scored.append((score, name))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [name for _, name in scored[:n]]
