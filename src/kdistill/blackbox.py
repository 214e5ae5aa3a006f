"""Black-box teachers: saved logits files and ONNX models.

A teacher need not be a PyTorch module we hold the weights of. Two stand-ins are supported:

* a **logits file** written once (by ``kdistill predict --save-logits`` or by anyone else) and read back as a
  :class:`~kdistill.teachers.CachedTeacher`. ``.safetensors`` files store ``logits`` (N x C) *and* ``ids``
  (the samples' stable ids, :attr:`TensorData.index`), plus JSON metadata (data set name, count, classes),
  so a file can cover a superset of the transfer set and rows are matched by id. ``.npy`` files hold the
  bare N x C array whose rows follow the data set's order (as an external tool would write it), so their
  row count must equal the data's;
* an **ONNX model** run through onnxruntime (:class:`OnnxTeacher`); :func:`export_onnx` writes one from a
  module (used by the tests and ``kdistill export-onnx``).

Every mismatch between a file and the data (row count, missing ids, class count, dtype, non-finite values,
the data set it was written for) raises a ``ValueError`` naming the field and the fix, before training.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.dataset import TensorData
from .io import atomic_path
from .teachers import CachedTeacher, Teacher

LOGITS_FORMATS = (".safetensors", ".npy")
_META_KEY = "kdistill_logits"


@dataclass
class SavedLogits:
    """The contents of a logits file: ``logits`` (N x C float32), ``ids`` (N, or None for ``.npy``), metadata."""

    logits: torch.Tensor
    ids: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in LOGITS_FORMATS:
        raise ValueError(f"teacher logits: file {path} must end in one of {LOGITS_FORMATS}, not {suffix or '(none)'!r}")
    return suffix


def run_teacher(teacher: Teacher, data: TensorData, batch_size: int = 2048) -> torch.Tensor:
    """Logits of any teacher for every sample of ``data``, in order, on the CPU (float32)."""
    if hasattr(teacher, "predict"):
        return teacher.predict(data).float().cpu()
    out = [
        teacher.logits(data.x[i : i + batch_size], data.index[i : i + batch_size]).float().cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, data.num_classes)


def save_logits(
    path: str | os.PathLike, logits: torch.Tensor, ids: torch.Tensor | None = None, **meta: Any
) -> Path:
    """Write ``logits`` (one row per sample) atomically; ``ids`` are stored in ``.safetensors`` files.

    ``meta`` (e.g. ``data="mnist-train"``) goes into the safetensors metadata and is checked on reading.
    A ``.npy`` file stores only the array, so its rows must follow the data set's order.
    """
    path = Path(path)
    suffix = _suffix(path)
    logits = torch.as_tensor(logits)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: need a floating N x C tensor, got {logits.dtype} of shape {tuple(logits.shape)}")
    logits = logits.detach().float().cpu().contiguous()
    if ids is None:
        ids = torch.arange(len(logits))
    ids = torch.as_tensor(ids, dtype=torch.long).cpu().contiguous()
    if len(ids) != len(logits):
        raise ValueError(f"ids: {len(ids)} ids for {len(logits)} rows of logits; give one id per row")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError("ids: sample ids must be unique")
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, logits.numpy(), allow_pickle=False)
        else:
            from safetensors.torch import save_file

            info = {"count": len(logits), "num_classes": int(logits.shape[1]), **meta}
            save_file({"logits": logits, "ids": ids}, str(tmp), metadata={_META_KEY: json.dumps(info, default=str)})
    return path


def load_logits(path: str | os.PathLike) -> SavedLogits:
    """Read and validate a logits file (2-D, floating point, finite; ids unique and aligned)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher logits: no file {path}; write one with `kdistill predict --save-logits`")
    ids = None
    meta: dict[str, Any] = {}
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"teacher logits: {path} is not a plain numeric .npy array ({exc})") from exc
        if array.dtype.kind != "f":
            raise ValueError(
                f"teacher logits: dtype {array.dtype} in {path}; expected floating point logits (float16/32/64)"
            )
        logits = torch.from_numpy(np.ascontiguousarray(array))
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if "logits" not in keys:
                raise ValueError(f"teacher logits: {path} has no 'logits' tensor (found {sorted(keys)})")
            logits = f.get_tensor("logits")
            ids = f.get_tensor("ids") if "ids" in keys else None
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        if not logits.is_floating_point():
            raise ValueError(f"teacher logits: dtype {logits.dtype} in {path}; expected floating point logits")
        if ids is not None and (ids.is_floating_point() or ids.dim() != 1):
            raise ValueError(f"teacher logits: 'ids' in {path} must be a 1-D integer tensor, got {ids.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"teacher logits: {path} holds shape {tuple(logits.shape)}; expected N x classes")
    if not torch.isfinite(logits).all():
        raise ValueError(f"teacher logits: {path} contains NaN or infinite values")
    if ids is not None:
        ids = ids.long()
        if len(ids) != len(logits):
            raise ValueError(f"teacher logits: {path} has {len(ids)} ids for {len(logits)} rows")
    return SavedLogits(logits=logits.float(), ids=ids, meta=meta)


def logits_teacher(source: str | os.PathLike | SavedLogits, data: TensorData) -> CachedTeacher:
    """A :class:`CachedTeacher` for ``data`` from a logits file, after checking that the two match.

    Checked: the class count, the data set the file was written for (when recorded), and that every
    sample of ``data`` has a row (by id for safetensors files, by position and count for ``.npy``).
    """
    saved = source if isinstance(source, SavedLogits) else load_logits(source)
    where = "" if isinstance(source, SavedLogits) else f" in {source}"
    if saved.num_classes != data.num_classes:
        raise ValueError(
            f"teacher logits: {saved.num_classes} classes{where} but {data.name} has {data.num_classes}; "
            "the file was written for another data set or model"
        )
    written_for = saved.meta.get("data")
    if written_for is not None and written_for != data.name:
        raise ValueError(
            f"teacher logits: file{where} was written for {written_for!r}, not {data.name!r}; "
            "use the same --data and --split in `kdistill predict`"
        )
    if saved.ids is None:
        if len(saved.logits) != len(data):
            raise ValueError(
                f"teacher logits: {len(saved.logits)} rows{where} but {data.name} has {len(data)} samples; "
                "a .npy file must hold one row per sample, in the data set's order"
            )
        return CachedTeacher(data.index, saved.logits)
    teacher = CachedTeacher(saved.ids, saved.logits)
    ids = data.index
    missing = ~torch.isin(ids, saved.ids)
    if missing.any():
        raise ValueError(
            f"teacher logits: {int(missing.sum())} of the {len(data)} samples of {data.name} have no row{where} "
            f"(file count {len(saved.logits)}); e.g. ids {ids[missing][:5].tolist()}. Write the file for this data."
        )
    return teacher


class OnnxTeacher:
    """An ONNX model, run by onnxruntime on the CPU, used as a teacher (inputs in, logits out).

    It sees the (possibly augmented) batch, like a module teacher; :meth:`cache` turns it into a
    :class:`CachedTeacher` when the transfer set is not augmented.
    """

    needs_inputs = True

    def __init__(self, path: str | os.PathLike, batch_size: int = 1024, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("teacher_onnx: onnxruntime is not installed; `pip install kdistill[onnx]`") from exc
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher_onnx: no file {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"teacher_onnx: {path} is not a loadable ONNX model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"teacher_onnx: {path} must take exactly one input, it takes {len(inputs)}")
        self.path = path
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.batch_size = batch_size

    def check(self, data: TensorData) -> None:
        """Raise unless the model accepts ``data``'s inputs and returns one logit per class."""
        fixed = self.input_shape[1:]
        if len(fixed) != len(data.input_shape) or any(
            isinstance(a, int) and a != b for a, b in zip(fixed, data.input_shape)
        ):
            raise ValueError(
                f"teacher_onnx: {self.path} expects inputs of shape {fixed}, {data.name} has {list(data.input_shape)}"
            )
        out = self.logits(data.x[:2])
        if out.dim() != 2 or out.shape[1] != data.num_classes:
            raise ValueError(
                f"teacher_onnx: {self.path} returns shape {tuple(out.shape)}; {data.name} needs {data.num_classes} classes"
            )

    @torch.no_grad()
    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size].detach().float().cpu().numpy()
            parts.append(torch.from_numpy(self.session.run(None, {self.input_name: batch})[0]))
        return torch.cat(parts).float().to(x.device)

    def predict(self, data: TensorData) -> torch.Tensor:
        return self.logits(data.x)

    def cache(self, data: TensorData) -> CachedTeacher:
        return CachedTeacher(data.index, self.predict(data))


def export_onnx(model: nn.Module, path: str | os.PathLike, in_shape: Sequence[int], opset: int = 17) -> Path:
    """Write ``model`` (a CPU copy, eval mode) as ONNX with a dynamic batch dimension, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"onnx: output file {path} must end in .onnx")
    net = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *in_shape)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(tmp), input_names=["x"], output_names=["logits"], opset_version=opset,
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    return path


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def resolve_teacher(cfg: dict[str, Any], train: TensorData, jitter: int = 0, temperature: float = 1.0) -> Any:
    """The teacher named by a distill config, its files read and checked against ``train`` before training.

    ``teacher`` (weights), ``teacher_logits`` and ``teacher_onnx`` may each be one path or a list; one
    teacher in all is used as is, several become an :class:`~kdistill.ensemble.EnsembleTeacher` with
    ``ensemble_mean`` (default arithmetic) combined at ``temperature`` (the training temperature), cached
    when the inputs are not augmented.
    """
    from .io import load_model

    weights, logits, onnx = (_as_list(cfg.get(k)) for k in ("teacher", "teacher_logits", "teacher_onnx"))
    if not (weights or logits or onnx):
        raise ValueError("teacher: give --teacher WEIGHTS.safetensors, --teacher-logits FILE or --teacher-onnx FILE")
    if logits and jitter:
        raise ValueError("train.jitter: saved teacher logits cannot follow augmented inputs; set jitter to 0")
    members: list[Any] = [load_model(w) for w in weights]
    members += [logits_teacher(f, train) for f in logits]
    for f in onnx:
        teacher = OnnxTeacher(f)
        teacher.check(train)
        members.append(teacher if jitter else teacher.cache(train))
    mean = cfg.get("ensemble_mean") or "arithmetic"
    if len(members) == 1:
        if cfg.get("ensemble_mean"):
            raise ValueError("ensemble_mean: needs two or more teachers")
        return members[0]
    from .ensemble import EnsembleTeacher

    ensemble = EnsembleTeacher(members, mean=mean, temperature=temperature)
    return ensemble if jitter else ensemble.cache(train)
