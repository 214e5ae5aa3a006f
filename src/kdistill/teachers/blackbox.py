"""Black-box teachers: saved logits files and ONNX models.

A teacher need not be a PyTorch module we hold the weights of. Two stand-ins are supported:

* a **logits file** written once (by ``kdistill predict --save-logits`` or by anyone else) and read back as a
  :class:`~kdistill.teachers.base.CachedTeacher`. ``.safetensors`` files store ``logits`` (N x C) *and* ``ids``
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

from kdistill.data.dataset import TensorData
from kdistill.io import atomic_path
from kdistill.models.outputs import LogitsOnly
from kdistill.teachers.base import CachedTeacher, Teacher

LOGITS_FORMATS = (".safetensors", ".npy")
_META_KEY = "kdistill_logits"


@dataclass
class SavedLogits:
    """The contents of a logits file: ``logits`` (N x C float32), ``ids`` (N, or None for ``.npy``), metadata,
    and, for files written with the data at hand, each row's ``labels`` and input ``checksums``: the
    fingerprint of the samples the file was made for, checked against the data it is used with."""

    logits: torch.Tensor
    ids: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    checksums: torch.Tensor | None = None

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


def row_checksums(data) -> torch.Tensor | None:
    """One float64 checksum per sample of an in-memory split (a position-weighted sum of its inputs), or None
    for a streamed one: what tells a logits file's samples from other samples with the same ids and labels."""
    x = getattr(data, "x", None)
    if x is None:
        return None
    flat = x.reshape(len(x), -1)
    weights = 1.0 + (torch.arange(flat.shape[1], dtype=torch.float64) % 13) / 13.0
    parts = [flat[i : i + 4096].detach().cpu().double() @ weights for i in range(0, len(flat), 4096)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def save_logits(
    path: str | os.PathLike, logits: torch.Tensor, ids: torch.Tensor | None = None, *, split=None, **meta: Any
) -> Path:
    """Write ``logits`` (one row per sample) atomically; ``ids`` are stored in ``.safetensors`` files.

    ``meta`` (e.g. ``data="mnist-train"``) goes into the safetensors metadata and is checked on reading.
    ``split``: the data the logits were computed on (rows in its order); its labels, per-row input checksums
    and :func:`~kdistill.io.data_fingerprint` are stored too, so a file used with other data of the same
    name is refused. A ``.npy`` file stores only the array, so its rows must follow the data set's order.
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
            tensors = {"logits": logits, "ids": ids}
            if split is not None:
                from kdistill.data.stream import labels_of
                from kdistill.io import data_fingerprint

                if len(split) != len(logits):
                    raise ValueError(f"split: {len(split)} samples for {len(logits)} rows of logits")
                labels = labels_of(split)
                if labels is not None:
                    tensors["labels"] = torch.as_tensor(labels).long().cpu().contiguous()
                sums = row_checksums(split)
                if sums is not None:
                    tensors["checksums"] = sums.contiguous()
                info["fingerprint"] = data_fingerprint(split)
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(info, default=str)})
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

        from kdistill.io import safetensors_header

        declared, raw = safetensors_header(path, "teacher logits")  # refuses empty/truncated/crafted files
        if "logits" not in declared:
            raise ValueError(f"teacher logits: {path} has no 'logits' tensor (found {sorted(declared)})")
        try:
            meta = json.loads(raw.get(_META_KEY, "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"teacher logits: {path}: its metadata is not valid JSON (corrupt file)") from None
        if not isinstance(meta, dict):
            raise ValueError(f"teacher logits: {path}: its metadata is not a mapping (corrupt file)")
        rows = declared["logits"]["shape"][0] if declared["logits"]["shape"] else None
        for name in ("ids", "labels", "checksums"):
            shape = declared.get(name, {}).get("shape")
            if shape is not None and (len(shape) != 1 or shape[0] != rows):
                raise ValueError(f"teacher logits: '{name}' in {path} has shape {list(shape)}; expected one entry per "
                                 f"row ({rows})")
        try:
            with safe_open(str(path), framework="pt") as f:
                logits = f.get_tensor("logits")
                ids = f.get_tensor("ids") if "ids" in declared else None
                labels = f.get_tensor("labels") if "labels" in declared else None
                checksums = f.get_tensor("checksums") if "checksums" in declared else None
        except Exception as exc:  # noqa: BLE001 - SafetensorError: named for the user
            raise ValueError(f"teacher logits: {path} is not a readable safetensors file "
                             f"({type(exc).__name__})") from None
        if labels is not None and (labels.is_floating_point() or labels.dim() != 1):
            raise ValueError(f"teacher logits: 'labels' in {path} must be a 1-D integer tensor, got {labels.dtype}")
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
    if suffix == ".npy":
        labels = checksums = None
    return SavedLogits(logits=logits.float(), ids=ids, meta=meta, labels=None if labels is None else labels.long(),
                       checksums=None if checksums is None else checksums.double())


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
    _check_fingerprint(saved, teacher, data, where)
    return teacher


def _check_fingerprint(saved: SavedLogits, teacher: CachedTeacher, data, where: str) -> None:
    """Refuse a file whose recorded labels or input checksums differ from ``data``'s for the same ids."""
    from kdistill.io import data_fingerprint

    if saved.meta.get("fingerprint") is not None and saved.meta["fingerprint"] == data_fingerprint(data):
        if saved.checksums is None or getattr(data, "x", None) is None:
            return
    rows = teacher.rows(data.index.cpu())
    fix = "it was made for other data of the same name; write the logits for this data (kdistill predict)"
    labels = data.y if hasattr(data, "y") else getattr(data, "labels", None)
    if saved.labels is not None and labels is not None:
        file_labels = saved.labels[rows]
        differ = file_labels != torch.as_tensor(labels).long().cpu()
        if bool(differ.any()):
            i = int(differ.nonzero()[0])
            raise ValueError(
                f"teacher logits: file{where} records other labels than {data.name} for {int(differ.sum())} of "
                f"{len(data)} samples (e.g. id {int(data.index[i])}: file {int(file_labels[i])}, data "
                f"{int(labels[i])}); {fix}"
            )
    if saved.checksums is not None:
        sums = row_checksums(data)
        if sums is not None:
            recorded = saved.checksums[rows]
            differ = ~torch.isclose(recorded, sums, rtol=1e-6, atol=1e-6)
            if bool(differ.any()):
                first = int(data.index[int(differ.nonzero()[0])])
                raise ValueError(
                    f"teacher logits: file{where} was computed on other inputs than {data.name} for "
                    f"{int(differ.sum())} of {len(data)} samples (e.g. id {first}); {fix}"
                )


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


def export_onnx(model: nn.Module, path: str | os.PathLike, in_shape: Sequence[int], opset: int = 17,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a CPU copy, eval mode) as ONNX with a dynamic batch dimension, atomically.

    ``metadata`` (e.g. ``class_names``, ``preprocessing``, ``input_shape`` from ``model.safetensors``) goes
    into the model's ``metadata_props``, each value as JSON, so the file alone says how to feed it and what its
    outputs mean (:func:`read_onnx_metadata`; ``kdistill predict --model M.onnx`` uses it).
    """
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"onnx: output file {path} must end in .onnx")
    net = LogitsOnly(copy.deepcopy(model).cpu()).eval()  # a dict/tuple/ModelOutput forward exports its logits
    example = torch.zeros(2, *in_shape)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(tmp), input_names=["x"], output_names=["logits"], opset_version=opset,
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), json.dumps(value)
            onnx.save(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON ``metadata_props`` of an ONNX model written by :func:`export_onnx` (``{}`` when it has none;
    a value that is not JSON is kept as its string)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("onnx: onnxruntime is not installed; `pip install kdistill[onnx]`") from exc
    try:
        props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"onnx: {path} is not a loadable ONNX model ({str(exc)[:200]})") from None
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _check_class_names(path: str, recorded: Any, train) -> None:
    """Refuse a teacher trained on classes of other names, or of the same names in another order, than ``train``
    (its logit i would be taught as class i of the data). Names ``0..C-1`` (data without names) say nothing."""
    ours = [str(c) for c in getattr(train, "classes", None) or ()]
    if not isinstance(recorded, (list, tuple)) or not ours or len(recorded) != len(ours):
        return
    theirs = [str(c) for c in recorded]
    default = [str(i) for i in range(len(ours))]
    if theirs != ours and default not in (theirs, ours):
        how = "in another order" if sorted(theirs) == sorted(ours) else "other names"
        raise ValueError(f"teacher: {path} was trained on classes {theirs}, but {train.name} has {ours} ({how}: its "
                         "outputs would teach the wrong classes); give a teacher trained on this data's classes")


def _weights_teacher(path: str, train, trust_code: bool = False) -> nn.Module:
    """A teacher network from a kdistill weights file, refused when it was made for other inputs or classes;
    a ``py:`` spec recorded in the file runs only with ``trust_code``."""
    from kdistill.io import load_model, read_model_meta

    shape = classes = None
    if Path(path).suffix.lower() == ".safetensors" and Path(path).is_file():
        meta = read_model_meta(path)
        shape, classes = meta.get("in_shape"), meta.get("num_classes")
        _check_class_names(path, meta.get("class_names"), train)
        if isinstance(shape, (list, tuple)) and tuple(shape) != tuple(train.input_shape):
            raise ValueError(f"teacher: {path} was trained on inputs shaped {list(shape)}, but {train.name} has "
                             f"{list(train.input_shape)}; give a teacher trained on this data")
        if isinstance(classes, int) and classes != train.num_classes:
            raise ValueError(f"teacher: {path} predicts {classes} classes, but {train.name} has {train.num_classes}; "
                             "give a teacher trained on this data")
    # A checkpoint records its spec but not the data's shape: the transfer set's is the only one it can fit.
    return load_model(path, in_shape=None if shape else list(train.input_shape),
                      num_classes=None if classes else train.num_classes, trust_code=trust_code)


def resolve_teacher(cfg: dict[str, Any], train: TensorData, jitter: int = 0, temperature: float = 1.0, *,
                    trust_code: bool = False) -> Any:
    """The teacher named by a distill config, its files read and checked against ``train`` before training.

    ``teacher`` (weights), ``teacher_logits`` and ``teacher_onnx`` may each be one path or a list; one
    teacher in all is used as is, several become an :class:`~kdistill.teachers.ensemble.EnsembleTeacher` with
    ``ensemble_mean`` (default arithmetic) combined at ``temperature`` (the training temperature), cached
    when the inputs are not augmented. ``trust_code``: build ``py:`` specs recorded in weights files
    (``--trust-code``).
    """
    from kdistill.io import load_model

    weights, logits, onnx = (_as_list(cfg.get(k)) for k in ("teacher", "teacher_logits", "teacher_onnx"))
    if not (weights or logits or onnx):
        raise ValueError("teacher: give --teacher WEIGHTS.safetensors, --teacher-logits FILE or --teacher-onnx FILE")
    if logits and jitter:
        raise ValueError("train.augment: saved teacher logits were computed on un-augmented inputs and cannot "
                         "follow augmented ones; drop train.augment / train.jitter / train.teacher_views, or give a "
                         "teacher network")
    members: list[Any] = [_weights_teacher(w, train, trust_code) for w in weights]
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
    from kdistill.teachers.ensemble import EnsembleTeacher

    ensemble = EnsembleTeacher(members, mean=mean, temperature=temperature)
    return ensemble if jitter else ensemble.cache(train)
