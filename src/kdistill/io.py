"""Files: atomic writes, model weights and training checkpoints in safetensors, run metadata.

Nothing is ever loaded with pickle: weights and optimiser tensors go through safetensors, the rest of
the state through JSON in the safetensors metadata. Weights from elsewhere (``.pt``/``.pth``/``.bin``
state dicts) are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should read like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_model(path: str | os.PathLike, model: nn.Module, **meta: Any) -> None:
    """Weights plus the metadata needed to rebuild the model (``spec``, ``in_shape``, ``num_classes``).

    A model without a ``.spec`` (built from the user's own class) is described as ``py:FILE.py:CLASS``
    when possible (:func:`~kdistill.models.adapters.describe_model`); otherwise its class path is kept
    under ``class`` and :func:`load_model` asks for a spec.
    """
    from .models.adapters import describe_model

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec = getattr(model, "spec", None) or describe_model(model)
    info: dict[str, Any] = {"spec": spec}
    if spec is None:
        info["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    metadata = {"kdistill": json.dumps({**info, **meta}, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("kdistill", "{}"))


WEIGHT_FORMATS = (
    "kdistill model .safetensors (save_model), plain .safetensors state dict, kdistill checkpoint.safetensors, "
    ".pt/.pth/.bin state dict (torch.save; plain, or under 'state_dict'/'model')"
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel saves, torch.compile saves


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every key."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _safetensors_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    tensors = load_file(str(path))
    if "kdistill_checkpoint" in raw:
        ckpt = json.loads(raw["kdistill_checkpoint"])
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return state, ({"spec": ckpt["spec"]} if ckpt.get("spec") else {})
    meta = json.loads(raw["kdistill"]) if "kdistill" in raw else {}
    return tensors, meta


def _torch_weights(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch.save zip archive, or a (legacy) pickle
        raise ValueError(f"weights: {path} is not a torch.save file (neither a zip archive nor a pickle stream). "
                         f"Accepted: {WEIGHT_FORMATS}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols while refusing a file
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"weights: {path} holds pickled Python objects besides tensors (a whole model, custom classes), "
            f"which are never loaded; save model.state_dict() instead. Accepted: {WEIGHT_FORMATS}"
        ) from err
    except Exception as err:  # RuntimeError/EOFError/... for files that are not torch.save archives
        reason = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(
            f"weights: {path} is not a readable torch.save file ({type(err).__name__}: {reason}). "
            f"Accepted: {WEIGHT_FORMATS}"
        ) from err
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"weights: {path} holds {what}, not a state dict of tensors. Accepted: {WEIGHT_FORMATS}")
    return dict(obj)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, kdistill metadata or {})`` of a weights file, without building a model.

    Reads a kdistill model file, a plain safetensors state dict, a kdistill ``checkpoint.safetensors``
    (the ``model.`` tensors; optimiser and RNG state dropped; metadata holds its ``spec``) and
    ``.pt``/``.pth``/``.bin`` state dicts via ``torch.load(weights_only=True)`` (also nested under
    ``state_dict``/``model``). A ``module.`` prefix on every key (DDP) is removed. Nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            state, meta = _safetensors_weights(path)
        except Exception as err:  # safetensors raises its own SafetensorError on a bad header
            raise ValueError(f"weights: {path} is not a readable safetensors file ({err}). Accepted: {WEIGHT_FORMATS}") from err
    elif suffix in _TORCH_SUFFIXES:
        state, meta = _torch_weights(path), {}
    else:
        raise ValueError(f"weights: {path}: unknown weights format {suffix or '(no suffix)'!r}. Accepted: {WEIGHT_FORMATS}")
    return _strip_wrapper_prefix(state), meta


def _check_state(path: Path, model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> None:
    """ValueError naming the first offending keys when ``state`` does not fit ``model``."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and state[k].shape != want[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ValueError(f"weights: {path} does not fit model {spec!r}: " + "; ".join(problems)
                         + "; check --model / in_shape / num_classes")


def load_model(path: str | os.PathLike, spec: str | None = None, in_shape=None, num_classes=None) -> nn.Module:
    """Rebuild and load a model from any file :func:`load_weights` reads (arguments override the stored
    metadata; a plain state dict needs all three)."""
    from .models import build_model

    path = Path(path)
    state, meta = load_weights(path)
    spec = spec or meta.get("spec")
    in_shape = in_shape or meta.get("in_shape")
    num_classes = num_classes or meta.get("num_classes")
    if not spec and meta.get("class"):
        raise ValueError(
            f"{path}: saved from class {meta['class']}, which kdistill cannot rebuild by itself; pass a spec "
            f"(--model py:FILE.py:FACTORY, with FACTORY(in_shape, num_classes) building that model)"
        )
    if not (spec and in_shape and num_classes):
        missing = [n for n, v in (("spec", spec), ("in_shape", in_shape), ("num_classes", num_classes)) if not v]
        raise ValueError(f"{path}: no model {'/'.join(missing)} stored; pass them explicitly")
    model = build_model(spec, in_shape, num_classes)
    _check_state(path, model, state, spec)
    model.load_state_dict(state)
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model, optimiser tensors and (as JSON) the loop state, RNG states included, in one safetensors file.

    ``extra``: further named tensors (a method's trainable extras, the keep-best weights) restored by
    :func:`load_checkpoint` into ``state["extra"]``.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    for name, rng in state.pop("rng", {}).items():
        tensors[f"rng.{name}"] = rng
    meta = {"state": state, "param_groups": opt["param_groups"], "opt_scalars": opt_scalars, "spec": getattr(model, "spec", None)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kdistill_checkpoint": json.dumps(meta, default=_jsonable)})


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``model`` and ``optimizer`` in place; return the loop state (with ``rng`` tensors)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["kdistill_checkpoint"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta["opt_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    state = meta["state"]
    state["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    state["extra"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every run's outputs."""
    import numpy

    from . import __version__

    info = {
        "kdistill": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
