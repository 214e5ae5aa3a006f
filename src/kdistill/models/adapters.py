"""Models from outside the registry: torchvision, timm and the user's own Python code.

Specs (options are ``key=value`` with the registry's value parsing; ``logits_key=NAME`` is kept for
:func:`~kdistill.models.outputs.ensure_logits` and not passed on):

* ``tv:NAME[,key=value...]``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **options)``
* ``timm:NAME[,key=value...]``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=C, **options)``
* ``py:FILE.py:FACTORY[,key=value...]``: ``FACTORY(in_shape, num_classes, **options)`` from a Python file
* ``py:package.module:FACTORY[,key=value...]``: the same from an importable module

``FACTORY`` may be a class (an ``nn.Module`` whose constructor takes ``(in_shape, num_classes)``) or a
function. torchvision and timm are imported only when such a spec is built, so they stay optional
(``pip install 'kdistill[tv]'`` / ``'kdistill[timm]'``). Commas and colons cannot appear inside a path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

__all__ = ["ADAPTERS", "is_adapter_spec", "split_adapter_spec", "canonical_spec", "build_adapter", "describe_model"]

ADAPTERS = ("tv", "timm", "py")
_EXTRAS = {"tv": ("torchvision", "pip install 'kdistill[tv]'"), "timm": ("timm", "pip install 'kdistill[timm]'")}
_FILE_MODULES: dict[tuple[str, int], ModuleType] = {}  # (absolute path, mtime_ns) -> module loaded from it


def is_adapter_spec(spec: str) -> bool:
    """Whether ``spec`` names a model through an adapter (``tv:``, ``timm:`` or ``py:``)."""
    return spec.strip().partition(":")[0] in ADAPTERS


def split_adapter_spec(spec: str) -> tuple[str, str, list[str]]:
    """``(kind, target, option texts)`` of an adapter spec, e.g. ``("py", "net.py:make", ["width=8"])``."""
    kind, _, rest = spec.strip().partition(":")
    target, *parts = [p.strip() for p in rest.split(",")]
    if not target:
        example = {"tv": "tv:resnet18", "timm": "timm:resnet18", "py": "py:models.py:make_net"}[kind]
        raise ValueError(f"model: {spec!r} names no model after {kind + ':'!r}; e.g. {example}")
    if kind == "py":
        where, _, factory = target.rpartition(":")
        if not where or not factory:
            raise ValueError(f"model: {spec!r} needs py:FILE.py:FACTORY or py:package.module:FACTORY")
    bad = [p for p in parts if "=" not in p]
    if bad:
        raise ValueError(f"model: cannot read {bad[0]!r} in {spec!r}; after the model name use key=value options")
    return kind, target, [p for p in parts if p]


def _is_file_target(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def canonical_spec(spec: str) -> str:
    """``spec`` with a ``py:FILE.py`` path made absolute, so the stored spec rebuilds from any directory."""
    kind, target, parts = split_adapter_spec(spec)
    if kind == "py":
        where, _, factory = target.rpartition(":")
        if _is_file_target(where):
            target = f"{Path(where).expanduser().resolve()}:{factory}"
    return ":".join((kind, ",".join([target, *parts])))


def _import_extra(kind: str) -> ModuleType:
    module, fix = _EXTRAS[kind]
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install (e.g. torchvision built for another torch) fails variously
        raise ImportError(f"model: {kind}: specs need {module}, which cannot be imported ({err}); {fix}") from err


def _load_file(path: Path, spec: str) -> ModuleType:
    """Import the Python file ``path`` (cached per path and modification time)."""
    if not path.is_file():
        raise ValueError(f"model: {spec!r}: no Python file {path}")
    key = (str(path), path.stat().st_mtime_ns)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = f"kdistill_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"model: {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined there then pickle, deepcopy and resolve their module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    _FILE_MODULES[key] = module
    return module


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise ValueError(
                f"model: {spec!r}: no module {name!r} (not on sys.path); give a file as py:FILE.py:FACTORY"
            ) from err
        raise


def _resolve_factory(target: str, spec: str) -> Callable[..., Any]:
    where, _, factory = target.rpartition(":")
    if _is_file_target(where):
        module = _load_file(Path(where).expanduser().resolve(), spec)
    else:
        module = _import_module(where, spec)
    obj: Any = module
    for attr in factory.split("."):
        if not hasattr(obj, attr):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(f"model: {spec!r}: {where} has no {factory!r}; callables there: {public}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"model: {spec!r}: {factory!r} in {where} is not callable")
    return obj


def _call_factory(factory: Callable[..., Any], spec: str, in_shape: tuple[int, ...], num_classes: int,
                  options: dict[str, Any]) -> Any:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none; just call
        signature = None
    if signature is not None:
        try:
            signature.bind(in_shape, num_classes, **options)
        except TypeError as err:
            params = [p for p in signature.parameters if p not in ("self",)]
            raise ValueError(
                f"model: {spec!r}: the factory must take (in_shape, num_classes, **options); "
                f"it takes {params} ({err})"
            ) from err
    return factory(in_shape, num_classes, **options)


def build_adapter(spec: str, in_shape: Sequence[int], num_classes: int, options: dict[str, Any]) -> nn.Module:
    """Build the model of adapter spec ``spec`` (``options`` already parsed, ``logits_key`` removed)."""
    kind, target, _ = split_adapter_spec(spec)
    in_shape = tuple(int(v) for v in in_shape)
    if kind == "tv":
        tv = _import_extra("tv")
        if len(in_shape) != 3 or in_shape[0] != 3:
            raise ValueError(f"model: {spec!r}: torchvision models take 3-channel images (3, H, W), got "
                             f"{in_shape}; use a timm: spec (in_chans) or a py: factory instead")
        if target not in tv.models.list_models():
            raise ValueError(f"model: {spec!r}: torchvision has no model {target!r}; see torchvision.models.list_models()")
        model = tv.models.get_model(target, weights=None, num_classes=num_classes, **options)
    elif kind == "timm":
        timm = _import_extra("timm")
        if not timm.is_model(target):
            raise ValueError(f"model: {spec!r}: timm has no model {target!r}; see timm.list_models()")
        model = timm.create_model(target, pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **options)
    else:
        model = _call_factory(_resolve_factory(target, spec), spec, in_shape, num_classes, options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def describe_model(model: nn.Module) -> str | None:
    """A ``py:`` spec that rebuilds ``model``'s class, or None when there is none.

    The class must be defined at module level of a real ``.py`` file and its constructor must accept
    ``(in_shape, num_classes)`` positionally. A class in a top-level module or a script gives
    ``py:/abs/FILE.py:NAME``; one inside a package gives ``py:package.module:NAME`` (loading such a
    file by path would break its relative imports). torch's own layers are never described. Constructor options other than the two are not
    recorded: a model built with non-default options reloads with the defaults, and a resulting shape
    mismatch is reported by :func:`kdistill.io.load_model`.
    """
    cls = type(model)
    qualname = cls.__qualname__
    module = sys.modules.get(cls.__module__)
    if cls.__module__.split(".")[0] == "torch":  # torch's layers take other arguments (nn.Linear(in, out))
        return None
    if module is None or "." in qualname or "<" in qualname or getattr(module, qualname, None) is not cls:
        return None
    file = getattr(module, "__file__", None)
    if not file or not str(file).endswith(".py") or not Path(file).is_file():
        return None
    try:
        inspect.signature(cls).bind(object(), object())
    except (TypeError, ValueError):
        return None
    if getattr(module, "__package__", None) and cls.__module__ != "__main__":
        return f"py:{cls.__module__}:{qualname}"
    return f"py:{Path(file).resolve()}:{qualname}"
