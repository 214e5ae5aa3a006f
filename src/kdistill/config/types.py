"""Typed values for configs: coerce a value to a type hint or refuse it naming the field; fields read from
dataclasses and signatures; short, safe reprs for error messages. Pure functions that import nothing of
kdistill, so every layer (data loaders, model builders, the engine's config, the schema) can use them.

Values are coerced to the declared type (YAML 1.1 reads ``5e-4`` and ``1e-3`` as strings; ``"3"`` from a
command line is an integer where an integer is wanted) or refused with the field's name: a bool is not an
integer, a number must be finite and at most :data:`FLOAT_LIMIT` in magnitude, and an unknown key is
refused naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

FLOAT_LIMIT = 1e6
"""Largest magnitude a float setting may have: larger ones are typos, and overflow float32 arithmetic
(``T ** 2``, ``lr * grad``) long before training could use them."""

_EMPTY = inspect.Parameter.empty
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of a section: its type hint (``Any`` when undeclared) and default (``_EMPTY`` if none)."""

    name: str
    hint: Any = Any
    default: Any = _EMPTY


# --------------------------------------------------------------------------------------------- helpers


def closest(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices``, else ``""``."""
    text = word if isinstance(word, str) else short_repr(word, 100)  # a huge value is neither printed nor compared
    match = difflib.get_close_matches(text[:100], [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 120, 120, 40


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: a few levels and items of a
    container, the ends of a long string. Never expands the whole value (a YAML "billion laughs" value built
    from shared lists would take minutes and gigabytes to ``repr``)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(hint)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        return typing.get_args(hint)
    return None


def describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, in words."""
    args = _union_args(hint)
    if args is not None:
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return f"{text} or null" if type(None) in args else text
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        return "a list"
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_number(value: float, where: str) -> float:
    """``value`` unless it is NaN, infinite or beyond :data:`FLOAT_LIMIT` (a ValueError naming ``where``)."""
    if not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {short_repr(value)}")
    if abs(value) > FLOAT_LIMIT:
        raise ValueError(f"{where}: {short_repr(value)} is out of range (at most {FLOAT_LIMIT:g} in magnitude)")
    return value


def finite_anything(value: Any, where: str) -> Any:
    """Undeclared types pass as they are, but no NaN or infinity hides in them."""
    if isinstance(value, float):
        check_number(value, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            finite_anything(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            finite_anything(v, f"{where}.{k}")
    return value


def _exactly(value: Any, hint: Any) -> bool:
    """Whether ``value`` already is of the (simple) type ``hint``."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, float)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    return False


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (see the module docstring), or a ValueError naming ``where``."""
    if hint is Any or hint is _EMPTY or hint is None:
        return finite_anything(value, where)
    if _union_args(hint) is not None:
        return _coerce_union(value, hint, where)
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: must be null, got {short_repr(value)}")
    if value is None:
        raise ValueError(f"{where}: must be {describe(hint)}, got null")
    if hint in _SCALARS:
        return _SCALARS[hint](value, where)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ValueError(f"{where}: must be one of {list(choices)}{closest(value, choices)}, got {short_repr(value)}")
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        return _coerce_sequence(value, hint, origin, where)
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: must be a mapping, got {short_repr(value)}")
        return finite_anything(dict(value), where)
    if hint is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    return finite_anything(value, where)


def _coerce_union(value: Any, hint: Any, where: str) -> Any:
    """``X | Y | None``: a value already of a member type is kept; else the first member that takes it."""
    args = _union_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where}: must be {describe(hint)}, got null")
    members = [a for a in args if a is not type(None)]
    for a in members:  # already of one of the types: keep it (a str stays a str in `bool | str`)
        if _exactly(value, a):
            return coerce(value, a, where)
    errors = []
    for a in members:
        try:
            return coerce(value, a, where)
        except ValueError as exc:
            errors.append(exc)
    finite = [e for e in errors if "finite" in str(e) or "out of range" in str(e)]
    if finite:  # a number, but not a usable one: say so rather than "must be an integer or a number"
        raise finite[-1]
    raise ValueError(f"{where}: must be {describe(hint)}, got {short_repr(value)}")


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: must be true or false, got {short_repr(value)}")


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: must be an integer, got {short_repr(value)} (a bool is not a number)")
    if isinstance(value, int):
        return value
    number = _as_float(value)
    if number is None:
        raise ValueError(f"{where}: must be an integer, got {short_repr(value)}")
    if not math.isfinite(number):
        raise ValueError(f"{where}: must be a finite integer, got {short_repr(value)}")
    if not number.is_integer():
        raise ValueError(f"{where}: must be an integer, got {short_repr(value)}")
    return int(number)


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: must be a number, got {short_repr(value)} (a bool is not a number)")
    number = float(value) if isinstance(value, int) else _as_float(value)
    if number is None:
        raise ValueError(f"{where}: must be a number, got {short_repr(value)}")
    return check_number(number, where)


def _coerce_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "device":  # device=torch.device("cuda")
        return str(value)
    raise ValueError(f"{where}: must be a string, got {short_repr(value)}")


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_sequence(value: Any, hint: Any, origin: Any, where: str) -> list | tuple:
    """A list or tuple (a comma-separated string splits), each item coerced; fixed-length tuples by position."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: must be a list, got {short_repr(value)}")
    inner = typing.get_args(hint)
    if inner and not (origin is tuple and len(inner) == 2 and inner[1] is Ellipsis) and origin is tuple:
        if len(inner) != len(value):
            raise ValueError(f"{where}: must be a list of {len(inner)} values, got {short_repr(value)}")
        items = [coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, inner))]
    else:
        elem = inner[0] if inner else Any
        items = [coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (hint is tuple or origin is tuple) else list(items)


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        text = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}.get(text, text)  # YAML spellings
        try:
            return float(text)
        except ValueError:
            return None
    try:  # numpy / torch scalars
        import numbers

        if isinstance(value, numbers.Real):
            return float(value)
    except (TypeError, ValueError):  # pragma: no cover
        pass
    return None


def check_keys(values: Mapping[str, Any], known, where: str, what: str = "option") -> None:
    """Refuse keys of ``values`` not in ``known``, naming the closest valid one."""
    known = list(known)
    for key in values:
        if key not in known:
            prefix = f"{where}.{key}" if where else str(key)
            raise ValueError(f"{prefix}: unknown {what} {short_repr(key)}{closest(key, known)}; "
                             f"{where or 'the config'} takes {sorted(map(str, known)) or 'nothing'}")


def coerce_fields(values: Mapping[str, Any], fields: Mapping[str, Field], where: str,
                  what: str = "option") -> dict[str, Any]:
    """Every value of ``values`` coerced to its field's type; unknown keys refused (closest name given)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: must be a mapping of settings, got {type(values).__name__} {short_repr(values)}")
    check_keys(values, fields, where, what)
    return {k: coerce(v, fields[k].hint, f"{where}.{k}" if where else k) for k, v in values.items()}


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - forward references that cannot resolve: fall back to the defaults
        return {}


def _field_of(name: str, hint: Any, default: Any) -> Field:
    if hint in (_EMPTY, None, Any) or isinstance(hint, str):
        hint = Any
        if default is not _EMPTY and default is not None:
            kind = type(default)
            hint = kind if kind in (bool, int, float, str, tuple, list) else Any
            if kind is float:
                hint = float  # an int given for a float option becomes a float
    return Field(name, hint, default)


@functools.lru_cache(maxsize=None)
def dataclass_fields(cls: type) -> dict[str, Field]:
    """A dataclass's fields with their resolved type hints (``dataclasses.fields`` + ``get_type_hints``)."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else _EMPTY
        out[f.name] = _field_of(f.name, hints.get(f.name, f.type), default)
    return out


def signature_fields(fn: Callable[..., Any], skip: int = 0, exclude: Sequence[str] = (),
                     named_only: bool = False) -> dict[str, Field] | None:
    """The keyword options of ``fn`` (after its first ``skip`` parameters), typed by annotation or default;
    None when ``fn`` takes ``**kwargs`` (anything goes) unless ``named_only`` (then its named ones)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params) and not named_only:
        return None
    hints = _hints(fn)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: _field_of(p.name, hints.get(p.name, p.annotation), p.default)
            for p in params[skip:] if p.kind in kinds and p.name not in exclude and p.name != "self"}


def coerce_object(obj: Any, where: str) -> None:
    """Coerce a dataclass instance's fields in place (``TrainConfig(lr="1e-3")`` gets a float)."""
    for name, f in dataclass_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None and f.hint is str and isinstance(f.default, str):
            value = f.default  # `augment: null` is no augmentation, as `augment: ""`
        object.__setattr__(obj, name, coerce(value, f.hint, f"{where}.{name}"))
