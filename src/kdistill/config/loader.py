"""YAML configs with ``section.key=value`` command-line overrides (values parsed as YAML scalars).

Configs and ``--set`` values are read by one loader, :class:`ConfigLoader`: PyYAML's safe loader, minus what
has no place in a typed config. It refuses, with the file and line, anchors and aliases (``&a``/``*a``: a
540-byte "billion laughs" file would otherwise expand to gigabytes), a key given twice in one mapping (the
last would silently win), nesting deeper than :data:`MAX_DEPTH` (Python's recursion limit), and plain
numbers that YAML 1.1 and YAML 1.2 read differently (``010`` is 8 to PyYAML, 10 to YAML 1.2; ``1:30`` is 90).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from kdistill.config.types import short_repr

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists a config may have (kdistill's own are three levels deep)."""
MAX_DIGITS = 400
"""Longest plain integer a config may hold (Python refuses to read one over 4,300 digits, naming no setting)."""
_DIGITS = re.compile(r"[-+]?[0-9_]+")

_AMBIGUOUS = re.compile(r"[-+]?(?:0[0-7_]+|0b[01_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?)")
"""Plain scalars YAML 1.1 (PyYAML) reads as octal, binary or base-60 numbers, which YAML 1.2 does not."""


class ConfigRefusal(yaml.MarkedYAMLError):
    """Valid YAML that a typed config refuses; ``problem`` says why and ``problem_mark`` where."""


def ambiguous(text: str) -> str | None:
    """Why the plain scalar ``text`` is ambiguous between YAML 1.1 and 1.2, or None when it is not."""
    if not _AMBIGUOUS.fullmatch(text):
        return None
    quote = "or quote it for a string"
    old = yaml.safe_load(text) if len(text) <= 40 else None  # PyYAML's (YAML 1.1) reading; short: no huge ints
    if ":" in text:
        return (f"{text} is ambiguous: YAML 1.1 reads it as the base-60 number {old} (like a clock time); "
                f"write the number you mean, {quote}")
    if "b" in text.lower():
        return f"{text} is ambiguous: YAML 1.1 reads it as the binary number {old}; write {old}, {quote}"
    digits = text.replace("_", "")
    new = int(digits, 10) if len(digits) <= 40 else None
    return (f"{text} is ambiguous: YAML 1.1 reads it as the octal number {old}, YAML 1.2 as {new}; "
            f"write it without the leading zero, {quote}")


class ConfigLoader(yaml.SafeLoader):
    """The safe loader for typed configs: no anchors or aliases, no repeated keys, no deep nesting, no
    YAML 1.1-only numbers (see the module docstring); each refusal is a :class:`ConfigRefusal`."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._path: list[str] = []  # keys and list positions down to the node being read, for messages
        self._depth = 0  # nodes open around it (keys that are themselves collections count too)

    def _where(self) -> str:
        path = self._path if len(self._path) <= 8 else self._path[:8] + ["[...]"]
        return "".join(p if p.startswith("[") else f".{p}" for p in path).lstrip(".")

    def _refuse(self, why: str, event: Any) -> ConfigRefusal:
        where = self._where()
        return ConfigRefusal(problem=f"{where}: {why}" if where else why, problem_mark=event.start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        step = None
        if isinstance(index, yaml.ScalarNode):  # the value of a mapping's key: name it
            step = index.value if len(index.value) <= 60 else short_repr(index.value, 60)
        elif isinstance(index, int):  # the index-th item of a list
            step = f"[{index}]"
        if step is not None:
            self._path.append(step)
        self._depth += 1
        try:
            self._check_event(self.peek_event())
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.MappingNode):
                self._check_unique(node)
            return node
        finally:
            self._depth -= 1
            if step is not None:
                self._path.pop()

    def _check_event(self, event: Any) -> None:
        """Refuse an alias or anchor, nesting past :data:`MAX_DEPTH`, and an ambiguous plain number."""
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise self._refuse("anchors and aliases (&name, *name) are not accepted in a config; "
                               "write each value out in full", event)
        if self._depth > MAX_DEPTH + 1:  # + 1: the document's top node
            raise self._refuse(f"nested more than {MAX_DEPTH} levels deep; a config holds a few levels of "
                               "sections, settings and lists", event)
        if isinstance(event, yaml.ScalarEvent) and event.style is None and event.tag is None:
            if len(event.value) > MAX_DIGITS and _DIGITS.fullmatch(event.value):  # else int()'s own ValueError
                raise self._refuse(f"a number of {len(event.value):,} digits; no setting takes one that long "
                                   "(write the value you mean)", event)
            why = ambiguous(event.value)
            if why:
                raise self._refuse(why, event)

    def _check_unique(self, node: yaml.MappingNode) -> None:
        """Refuse a key that appears twice in one mapping, naming both lines."""
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1
            first = seen.get((key.tag, key.value))
            seen[(key.tag, key.value)] = line
            if first is not None:
                raise self._refuse(f"key {short_repr(key.value, 60)} appears twice in one mapping (lines {first} "
                                   f"and {line}); keep one (the last would silently replace the first)", key)


def parse(text: str) -> Any:
    """``text`` read by :class:`ConfigLoader` (a :class:`ConfigRefusal` or other ``yaml.YAMLError`` if not)."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _config_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is fine); UTF-16, Latin-1 and the like are refused naming the fix,
    whatever the locale's default encoding."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:
        raise ValueError(f"config: {path} is UTF-16 text (or binary), not UTF-8; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config: {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}, "
                         "Latin-1 or another encoding?); save it as UTF-8") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no file {path}")
    try:
        loaded = parse(_config_text(path)) or {}
    except ConfigRefusal as exc:
        raise ValueError(f"config: {path}, line {exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
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
    """Apply ``a.b=value`` strings; ``value`` is read as YAML (``5``, ``0.1``, ``true``, ``[1, 2]``) by the
    config loader, so ``--set`` refuses what a config file refuses."""
    out = copy.deepcopy(config)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        shown = short_repr(item)
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value (e.g. train.epochs=5), got {shown}")
        node = out
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ValueError(f"--set {shown}: empty name in {short_repr(key.strip())}; write section.key=value")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"--set {shown}: {short_repr(p)} is not a section")
        try:
            node[parts[-1]] = parse(raw)
        except ConfigRefusal as exc:
            raise ValueError(f"--set {shown}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"--set {shown}: the value is not valid YAML ({reason})") from None
    return out


class _Dumper(yaml.SafeDumper):
    """Writes every value out in full: no ``&id001`` anchors, which :class:`ConfigLoader` would refuse."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)
