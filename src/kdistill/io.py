"""Files: atomic writes, model weights and training checkpoints in safetensors, run metadata.

Nothing is ever loaded with pickle: weights and optimiser tensors go through safetensors, the rest of
the state through JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
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
    """Weights plus the metadata needed to rebuild the model (``spec``, ``in_shape``, ``num_classes``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"kdistill": json.dumps({"spec": getattr(model, "spec", None), **meta}, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("kdistill", "{}"))


def load_model(path: str | os.PathLike, spec: str | None = None, in_shape=None, num_classes=None) -> nn.Module:
    """Rebuild and load a model saved by :func:`save_model` (arguments override the stored metadata)."""
    from .models import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file {path}")
    meta = read_model_meta(path)
    spec = spec or meta.get("spec")
    in_shape = in_shape or meta.get("in_shape")
    num_classes = num_classes or meta.get("num_classes")
    if not (spec and in_shape and num_classes):
        raise ValueError(f"{path}: no model spec/in_shape/num_classes stored; pass them explicitly")
    model = build_model(spec, in_shape, num_classes)
    state = load_file(str(path))
    model.load_state_dict({k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items() if not k.startswith("optim.")})
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Model, optimiser tensors and (as JSON) the loop state, RNG states included, in one safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
