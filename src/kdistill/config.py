"""YAML configs with ``section.key=value`` command-line overrides (values parsed as YAML scalars)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no file {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"config: {path} is not valid YAML{at}: {reason}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping at the top level, not {type(loaded).__name__}")
    return loaded


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``update`` (neither is modified)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; ``value`` is read as YAML (``5``, ``0.1``, ``true``, ``[1, 2]``)."""
    out = copy.deepcopy(config)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value (e.g. train.epochs=5), got {item!r}")
        node = out
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ValueError(f"--set {item!r}: empty name in {key.strip()!r}; write section.key=value")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({reason})") from None
    return out


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
