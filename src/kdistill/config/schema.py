"""One typed schema for every config section, used by the CLI, YAML configs and the Python API alike.

Each section's schema comes from the code that consumes it, so it cannot drift:

* ``train``: :class:`~kdistill.engine.TrainConfig`'s fields and type hints;
* ``method``: the method class's ``__init__`` options (:func:`kdistill.methods.method_options`);
* ``data``: :func:`kdistill.data.load`'s ``val_size``/``seed`` plus the loader's own keyword options;
* ``model``: the spec string; its ``key=value`` options are typed by the model builder's defaults;
* the top level: :data:`CONFIG_KEYS`.

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


def _finite_anything(value: Any, where: str) -> Any:
    """Undeclared types pass as they are, but no NaN or infinity hides in them."""
    if isinstance(value, float):
        check_number(value, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_anything(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_anything(v, f"{where}.{k}")
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
        return _finite_anything(value, where)
    args = _union_args(hint)
    if args is not None:
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
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: must be null, got {short_repr(value)}")
    if value is None:
        raise ValueError(f"{where}: must be {describe(hint)}, got null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{where}: must be true or false, got {short_repr(value)}")
    if hint is int:
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
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: must be a number, got {short_repr(value)} (a bool is not a number)")
        number = float(value) if isinstance(value, int) else _as_float(value)
        if number is None:
            raise ValueError(f"{where}: must be a number, got {short_repr(value)}")
        return check_number(number, where)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if type(value).__module__ == "torch" and type(value).__name__ == "device":  # device=torch.device("cuda")
            return str(value)
        raise ValueError(f"{where}: must be a string, got {short_repr(value)}")
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ValueError(f"{where}: must be one of {list(choices)}{closest(value, choices)}, got {short_repr(value)}")
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
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
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: must be a mapping, got {short_repr(value)}")
        return _finite_anything(dict(value), where)
    if hint is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    return _finite_anything(value, where)


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


# --------------------------------------------------------------------------------------------- sections


def train_section(values: Mapping[str, Any] | None):
    """The ``train`` section as a :class:`~kdistill.engine.TrainConfig` (typed and validated)."""
    from kdistill.engine.config import TrainConfig

    return TrainConfig.from_dict(dict(values or {}))


def method_fields(name: str) -> dict[str, Field]:
    """The options of method ``name`` (``__init__`` keywords, typed by their hints or defaults)."""
    from kdistill.methods import get_method, method_options

    cls = get_method(name)
    hints = _hints(cls.__init__)
    return {k: _field_of(k, hints.get(k, p.annotation), p.default) for k, p in method_options(cls).items()}


def method_section(section: Any) -> dict[str, Any]:
    """``{"name": ..., **options}`` with the options coerced (unknown ones refused with the closest name)."""
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, Mapping):
        raise ValueError(f"method: a name or a mapping with name and options, not {type(section).__name__}")
    opts = dict(section)
    name = opts.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"method.name: say which method, e.g. kd or {{name: kd, temperature: 4}}, got {short_repr(name)}")
    fields = method_fields(name)
    for key in opts:
        if key not in fields:
            raise ValueError(f"method.{key}: {name} has no option {short_repr(key)}{closest(key, fields)}; "
                             f"it takes {sorted(fields) or 'no options'}")
    return {"name": name, **{k: coerce(v, fields[k].hint, f"method.{k}") for k, v in opts.items()}}


def build_method(section: Any):
    """The :class:`~kdistill.methods.Method` a ``method`` section describes, after :func:`method_section`."""
    from kdistill.methods import build_method as _build

    checked = method_section(section)
    name = checked.pop("name")
    return _build(name, checked)


def data_loader(name: str):
    """``(loader, skip, label)`` for data set ``name`` (a registered name or a ``PREFIX:PATH`` file spec)."""
    from kdistill import data

    prefix, sep, _ = name.partition(":")
    if sep and prefix in data.SOURCES:
        return data.SOURCES[prefix], 1, f"{prefix}:"
    if not sep and name in data.SOURCES:
        return data.SOURCES[name], 1, f"{name}:"
    if name in data.LOADERS:
        return data.LOADERS[name], 0, repr(name)
    raise ValueError(
        f"data.name: unknown data set {short_repr(name)}{closest(name, data.LOADERS)}; choose one of {sorted(data.LOADERS)} "
        f"or a file spec {', '.join(f'{p}:PATH' for p in sorted(data.SOURCES))}"
    )


def loader_fields(loader: Callable[..., Any], skip: int) -> dict[str, Field] | None:
    """A data loader's keyword options (``seed`` excluded: :func:`kdistill.data.load` owns it)."""
    return signature_fields(loader, skip, exclude=("seed",))


def coerce_loader_options(name: str, options: Mapping[str, Any], where: str = "data") -> dict[str, Any]:
    """Options for data set ``name``'s loader, typed by its signature; unknown ones refused."""
    loader, skip, label = data_loader(name)
    fields = loader_fields(loader, skip)
    if fields is None:
        return {k: _finite_anything(v, f"{where}.{k}") for k, v in options.items()}
    if skip == 1:  # a file spec's loader takes the path first: `npz` with path=FILE
        fields = {"path": Field("path", str | None, None), **fields}
    for key in options:
        if key not in fields:
            raise ValueError(f"{where}.{key}: data set {label} has no option {short_repr(key)}{closest(key, fields)}; "
                             f"it accepts {sorted(fields) or 'no options'}")
    out = {}
    for k, v in options.items():
        hint = fields[k].hint
        if k == "path" and isinstance(v, (str, os.PathLike)):
            v = os.fspath(v)
        out[k] = coerce(v, hint, f"{where}.{k}")
    return out


def data_section(section: Any) -> dict[str, Any]:
    """The ``data`` section (``name``, ``path``, ``val_size``, ``seed`` and the loader's options), typed."""
    from kdistill import data

    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, Mapping):
        raise ValueError(f"data: a data set name or a mapping (name, path, val_size, seed, options), "
                         f"not {type(section).__name__} {short_repr(section)}")
    d = dict(section)
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"data.name: give a data set, e.g. digits, mnist or npz:FILE.npz, got {short_repr(name)}")
    load_fields = signature_fields(data.load, 1, named_only=True)
    out: dict[str, Any] = {"name": name.strip()}
    for key in ("val_size", "seed"):
        if key in d:
            out[key] = coerce(d.pop(key), load_fields[key].hint, f"data.{key}")
    d.pop("name")
    if "normalize" in d:  # load()'s own option: none, a preset, or per-channel mean/std (data/preprocess.py)
        from kdistill.data.preprocess import parse_normalize

        out["normalize"] = parse_normalize(d.pop("normalize")).setting()
    if out.get("val_size") is not None and out["val_size"] < 0:
        raise ValueError(f"data.val_size: a count or a fraction >= 0, got {short_repr(out['val_size'])}")
    if out.get("seed") is not None and not 0 <= out["seed"] < 2**31:
        raise ValueError(f"data.seed: must be in [0, 2**31), got {short_repr(out['seed'])}")
    has_path = "path" in d
    path = d.pop("path", None)
    if path is not None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"data.path: must be a path, got {short_repr(path)}")
        d["path"] = os.fspath(path)
    options = coerce_loader_options(out["name"], d)
    if has_path:
        out["path"] = options.pop("path", None)
    out.update(options)
    return {k: out[k] for k in section if k in out}  # in the order given (config.yaml reads as written)


CONFIG_KEYS: dict[str, Any] = {
    "data": Any,  # a section (see data_section)
    "model": str | None,
    "student": str | None,  # alias of model
    "teacher": str | list[str] | None,
    "teacher_logits": str | list[str] | None,
    "teacher_onnx": str | list[str] | None,
    "teacher_model": str | None,
    "teacher_weights": str | None,
    "ensemble_mean": typing.Literal["arithmetic", "geometric"] | None,
    "unlabelled": bool | None,
    "fraction": float | None,
    "method": Any,  # a section (see method_section)
    "train": Any,  # a section (see train_section)
}
"""The keys a ``kdistill train``/``distill`` config may hold at its top level, with their types."""
TEACHER_KEYS = ("teacher", "teacher_logits", "teacher_onnx", "teacher_model", "teacher_weights", "ensemble_mean",
                "unlabelled", "fraction")


def normalize_sections(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Shorthands spelled out, so configs merge section by section: ``data: digits`` is ``data: {name: digits}``,
    ``method: kd`` is ``method: {name: kd}``, ``student:`` is ``model:``."""
    out = dict(cfg)
    for key in ("data", "method"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    if "student" in out:
        student = out.pop("student")
        if out.get("model") not in (None, student) and student is not None:
            raise ValueError(f"student: the config names two students, model {short_repr(out['model'])} and student {short_repr(student)}")
        if out.get("model") is None:
            out["model"] = student
    return out


def check_config(cfg: Mapping[str, Any], distill: bool) -> dict[str, Any]:
    """A whole run config (YAML, flags and ``--set`` merged) checked top to bottom; returns a typed copy.

    Unknown sections and keys are refused naming the closest valid one; ``data`` is typed by
    :func:`data_section`, the other top-level keys by :data:`CONFIG_KEYS`. ``train`` and ``method`` must be
    mappings here: :func:`train_section` and :func:`method_section` type them once the command has filled
    in its defaults.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config: must be a mapping of sections, got {type(cfg).__name__}")
    check_keys(cfg, CONFIG_KEYS, "", "config section")
    cfg = normalize_sections(cfg)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key == "data":
            out[key] = data_section(value if value is not None else {})
        elif key in ("train", "method"):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{key}: must be a mapping of settings, got {type(value).__name__} {short_repr(value)}")
            out[key] = dict(value or {})
        else:
            out[key] = coerce(value, CONFIG_KEYS[key], key)
    if "data" not in out:
        raise ValueError("data: give a data set (--data NAME or `data: {name: ...}` in the config)")
    if not distill:
        extra = [k for k in TEACHER_KEYS if out.get(k) not in (None, False, [], "")]
        if extra:
            raise ValueError(f"{extra[0]}: `kdistill train` trains on hard labels without a teacher; "
                             "use `kdistill distill` for teacher settings")
    if out.get("fraction") is not None and not 0 < out["fraction"] <= 1:
        raise ValueError(f"fraction: the share of the transfer set to keep must be in (0, 1], got {out['fraction']}")
    return out
