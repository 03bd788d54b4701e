"""Reading config.json values by the family table's rules (`Read`: the first key present, dotted keys into
nested dicts, the class default, a divisor or factor) and writing them back. Torch-free, no family logic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.hf.table import REQUIRED, Read


def _lookup(cfg: Mapping[str, Any], path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _read(cfg: Mapping[str, Any], rule: Read | Any) -> Any:
    """A Read's value (first key present and not null, else its default); a constant as it is."""
    if not isinstance(rule, Read):
        return rule
    for key in rule.keys:
        value = _lookup(cfg, key)
        if value is not None:
            return _divided(rule, key, value)
    if rule.default is REQUIRED:
        raise QkvconvError(f"config.json has no {rule.keys[0]!r}")
    return _divided(rule, rule.keys[0], rule.default)


def _divided(rule: Read, key: str, value: Any) -> Any:
    """A value in the model's units: the config's divided by the Read's divisor, which must divide it (or
    times its `times`)."""
    if value is None:
        return value
    if rule.times != 1:
        return value * rule.times
    if rule.divisor == 1:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value % rule.divisor:
        raise QkvconvError(f"config.json: {key} must be an integer multiple of {rule.divisor}, got {value!r}")
    return value // rule.divisor


def _write(cfg: dict[str, Any], rule: Read | Any, value: Any) -> None:
    """Store `value` where a Read looks first (nested dicts created as needed); constants write nothing."""
    if not isinstance(rule, Read):
        return
    *parents, last = rule.keys[0].split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    if value is not None and (rule.divisor != 1 or rule.times != 1):
        value = value * rule.divisor / rule.times if rule.times != 1 else value * rule.divisor
    node[last] = value


def _int(cfg: Mapping[str, Any], rule: Read, what: str) -> int:
    value = _read(cfg, rule)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise QkvconvError(f"config.json: {what} must be an integer, got {value!r}")
    return int(value)
