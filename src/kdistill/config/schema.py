"""One typed schema for every config section, used by the CLI, YAML configs and the Python API alike.

Each section's schema comes from the code that consumes it, so it cannot drift:

* ``train``: :class:`~kdistill.engine.TrainConfig`'s fields and type hints;
* ``method``: the method class's ``__init__`` options (:func:`kdistill.methods.method_options`);
* ``data``: :func:`kdistill.data.load`'s ``val_size``/``seed`` plus the loader's own keyword options;
* ``model``: the spec string; its ``key=value`` options are typed by the model builder's defaults;
* the top level: :data:`CONFIG_KEYS`.

Values are typed by :mod:`kdistill.config.types` (coerced to the declared type or refused naming the field).
"""

from __future__ import annotations

import typing
import os
from collections.abc import Mapping
from typing import Any

import kdistill.data as data
from kdistill.config.types import Field, _field_of, _hints, check_keys, closest, coerce, short_repr, signature_fields
from kdistill.data import coerce_loader_options
from kdistill.data.preprocess import parse_normalize
from kdistill.engine.config import TrainConfig
from kdistill.methods import build_method as build_registered
from kdistill.methods import get_method, method_options

# --------------------------------------------------------------------------------------------- sections


def train_section(values: Mapping[str, Any] | None):
    """The ``train`` section as a :class:`~kdistill.engine.TrainConfig` (typed and validated)."""
    return TrainConfig.from_dict(dict(values or {}))




def method_fields(name: str) -> dict[str, Field]:
    """The options of method ``name`` (``__init__`` keywords, typed by their hints or defaults)."""
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
    checked = method_section(section)
    name = checked.pop("name")
    return build_registered(name, checked)


def data_section(section: Any) -> dict[str, Any]:
    """The ``data`` section (``name``, ``path``, ``val_size``, ``seed`` and the loader's options), typed."""
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
