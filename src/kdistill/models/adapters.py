"""Models from outside the registry: torchvision, timm, Hugging Face transformers and the user's own code.

Specs (options are ``key=value`` with the registry's value parsing; ``logits_key=NAME`` is kept for
:func:`~kdistill.models.outputs.ensure_logits` and not passed on):

* ``tv:NAME[,key=value...]``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **options)``
* ``timm:NAME[,key=value...]``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=C, **options)``
* ``hf:TYPE|CONFIG.json|./DIR[,task=TASK][,key=value...]``: a transformers classifier, built offline
  (see :mod:`kdistill.models.hf`)
* ``py:FILE.py:FACTORY[,key=value...]``: ``FACTORY(in_shape, num_classes, **options)`` from a Python file
* ``py:package.module:FACTORY[,key=value...]``: the same from an importable module

``FACTORY`` may be a class (an ``nn.Module`` whose constructor takes ``(in_shape, num_classes)``) or a
function. torchvision, timm and transformers are imported only when such a spec is built, so they stay
optional (``pip install 'kdistill[tv]'`` / ``'kdistill[timm]'`` / ``'kdistill[hf]'``). Commas and colons
cannot appear inside a path.

Library models are always built with fresh weights: options that would load or fetch weights or code
(``weights``, ``pretrained``, ``checkpoint_path``, ``trust_remote_code`` ...) are refused. A ``py:`` spec
imports and runs the user's code; :func:`kdistill.io.load_model` runs one read from a weights file only
with ``trust_code=True`` (``--trust-code``). Code that calls ``sys.exit`` while imported or building is
reported as a ValueError naming the spec, not an exit.

:func:`describe_model` names a model built outside kdistill (``timm.create_model``, a torchvision builder,
``AutoModelFor...from_config``, the user's class) by the spec that rebuilds it, for the weights' metadata.
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

import torch
from torch import nn

from kdistill.models import hf

__all__ = ["ADAPTERS", "is_adapter_spec", "split_adapter_spec", "canonical_spec", "build_adapter", "describe_model",
           "runs_code"]

ADAPTERS = ("tv", "timm", "hf", "py")
_EXTRAS = {"tv": ("torchvision", "pip install 'kdistill[tv]'"), "timm": ("timm", "pip install 'kdistill[timm]'")}
_FETCHING = ("weights", "weights_backbone", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
             "checkpoint_path", "pretrained_strict", "trust_remote_code")  # tv/timm options that load or fetch
_FILE_MODULES: dict[tuple[str, int], ModuleType] = {}  # (absolute path, mtime_ns) -> module loaded from it


def is_adapter_spec(spec: str) -> bool:
    """Whether ``spec`` names a model through an adapter (``tv:``, ``timm:``, ``hf:`` or ``py:``)."""
    return spec.strip().partition(":")[0] in ADAPTERS


def split_adapter_spec(spec: str) -> tuple[str, str, list[str]]:
    """``(kind, target, option texts)`` of an adapter spec, e.g. ``("py", "net.py:make", ["width=8"])``."""
    kind, _, rest = spec.strip().partition(":")
    target, *parts = [p.strip() for p in rest.split(",")]
    if not target:
        example = {"tv": "tv:resnet18", "timm": "timm:resnet18", "hf": "hf:bert,task=sequence-classification",
                   "py": "py:models.py:make_net"}[kind]
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


def runs_code(spec: str) -> bool:
    """Whether building ``spec`` imports and runs Python code named by the spec (a ``py:`` spec)."""
    return spec.strip().partition(":")[0] == "py"


def canonical_spec(spec: str) -> str:
    """``spec`` with a ``py:FILE.py`` path (or an ``hf:`` directory / config file) made absolute, so the stored
    spec rebuilds from any directory."""
    kind, target, parts = split_adapter_spec(spec)
    if kind == "py":
        where, _, factory = target.rpartition(":")
        if _is_file_target(where):
            target = f"{Path(where).expanduser().resolve()}:{factory}"
    elif kind == "hf" and (target.endswith(".json") or "/" in target or "\\" in target):
        target = str(Path(target).expanduser().resolve())
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
    except BaseException:  # SystemExit too: a half-run module is not kept
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


def _user_model(spec: str, target: str, in_shape: tuple[int, ...], num_classes: int,
                options: dict[str, Any]) -> Any:
    """``FACTORY(in_shape, num_classes, **options)`` of a ``py:`` spec; ``sys.exit`` in that code is a ValueError."""
    try:
        return _call_factory(_resolve_factory(target, spec), spec, in_shape, num_classes, options)
    except SystemExit as exc:  # would end kdistill with the code's status and no word of why
        raise ValueError(f"model: {spec!r}: its code called sys.exit({exc.code!r}) while being imported or building "
                         "the model; a model factory must return an nn.Module") from None


def _refuse_fetching(spec: str, kind: str, options: dict[str, Any]) -> None:
    bad = sorted(k for k in options if k in _FETCHING)
    if bad:
        raise ValueError(f"model: {spec!r}: option {bad[0]!r} is refused: {kind}: models are built with fresh weights "
                         "and never load or fetch weights or code; fill them from a file with --teacher-model SPEC "
                         "--teacher-weights FILE (or kdistill.io.load_model)")


def build_adapter(spec: str, in_shape: Sequence[int], num_classes: int, options: dict[str, Any],
                  hf_config: dict[str, Any] | None = None) -> nn.Module:
    """Build the model of adapter spec ``spec`` (``options`` already parsed, ``logits_key`` removed).

    ``hf_config``: for ``hf:`` specs, the transformers config recorded with a saved model (rebuilds it offline).
    """
    kind, target, _ = split_adapter_spec(spec)
    in_shape = tuple(int(v) for v in in_shape)
    if kind in ("tv", "timm"):
        _refuse_fetching(spec, kind, options)
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
    elif kind == "hf":
        model = hf.build_hf(spec, target, in_shape, num_classes, options, hf_config)
    else:
        model = _user_model(spec, target, in_shape, num_classes, options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(built: Callable[[], nn.Module], want: dict[str, tuple[int, ...]], exact: bool) -> bool:
    """Whether ``built()`` (run on the meta device: nothing allocated) has ``want``'s tensor names and, when
    ``exact``, their shapes."""
    try:
        with torch.device("meta"):
            other = _shapes(built())
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta (or with these arguments) is no match
        return False
    return other == want if exact else other.keys() == want.keys()


def _describe_timm(model: nn.Module, in_shape: Sequence[int] | None, num_classes: int | None) -> str | None:
    """``timm:ARCH`` when ``timm.create_model(ARCH, num_classes=N, in_chans=C)`` rebuilds ``model``'s tensors."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch:
        return None
    timm = _import_extra("timm")
    if not timm.is_model(arch):
        return None
    kwargs: dict[str, Any] = {}
    if num_classes:
        kwargs["num_classes"] = num_classes
    if in_shape:
        kwargs["in_chans"] = int(in_shape[0])
    exact = bool(num_classes and in_shape)
    if _fits(lambda: timm.create_model(arch, pretrained=False, **kwargs), _shapes(model), exact):
        return f"timm:{arch}"
    return None


def _describe_tv(model: nn.Module, num_classes: int | None) -> str | None:
    """``tv:NAME`` for the torchvision builder whose class is ``model``'s and whose tensors match its own."""
    tv = _import_extra("tv")
    want = _shapes(model)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    for name in tv.models.list_models():
        builder = tv.models.get_model_builder(name)
        try:
            returns = inspect.signature(builder, eval_str=True).return_annotation
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: no match
            continue
        if returns is type(model) and _fits(lambda: tv.models.get_model(name, weights=None, **kwargs), want,
                                            bool(num_classes)):
            return f"tv:{name}"
    return None


def _describe_py(model: nn.Module) -> str | None:
    """A ``py:`` spec naming ``model``'s class (see :func:`describe_model`)."""
    cls = type(model)
    qualname = cls.__qualname__
    module = sys.modules.get(cls.__module__)
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


def describe_model(model: nn.Module, in_shape: Sequence[int] | None = None, num_classes: int | None = None) -> str | None:
    """The spec that rebuilds ``model`` (built outside kdistill), or None when there is none.

    * a **timm** model (its ``pretrained_cfg`` names the architecture): ``timm:ARCH``, checked by building
      ``ARCH`` with the data's ``num_classes`` and channel count on the meta device;
    * a **torchvision** model: ``tv:NAME`` of the builder that returns its class and whose tensor names and
      shapes match (a model built with other constructor arguments is not described);
    * a **transformers** classifier: ``hf:MODEL_TYPE,task=TASK``; :func:`kdistill.io.save_model` records its
      config beside it, so it rebuilds offline;
    * the user's own class, defined at module level of a real ``.py`` file with a constructor accepting
      ``(in_shape, num_classes)`` positionally: ``py:/abs/FILE.py:NAME`` (a script or top-level module) or
      ``py:package.module:NAME`` (inside a package; loading it by path would break its relative imports).
      Constructor options other than the two are not recorded: a model built with non-default options
      reloads with the defaults, and a resulting shape mismatch is reported by :func:`kdistill.io.load_model`.

    torch's own layers and library classes not recognised above are never described (their constructors
    take other arguments than ``(in_shape, num_classes)``).
    """
    root = type(model).__module__.split(".")[0]
    if root == "timm":
        return _describe_timm(model, in_shape, num_classes)
    if root == "torchvision":
        return _describe_tv(model, num_classes)
    if root == "transformers":
        return hf.describe_hf(model)
    if root == "torch":
        return None
    return _describe_py(model)
