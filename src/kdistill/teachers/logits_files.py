"""Teachers from saved logits files: run a teacher once and keep its outputs (:func:`save_logits`), read them
back as a :class:`~kdistill.teachers.base.CachedTeacher` matched to the data by sample id (:func:`logits_teacher`).

``.safetensors`` files store ``logits`` (N x C) *and* ``ids`` (the samples' stable ids, :attr:`TensorData.index`),
plus JSON metadata (data set name, count, classes), so a file can cover a superset of the transfer set and rows
are matched by id. ``.npy`` files hold the bare N x C array whose rows follow the data set's order (as an external
tool would write it), so their row count must equal the data's. Every mismatch between a file and the data (row
count, missing ids, class count, dtype, non-finite values, the data set it was written for) raises a
``ValueError`` naming the field and the fix, before training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.data.dataset import TensorData
from kdistill.data.stream import labels_of
from kdistill.io import atomic_path, data_fingerprint, safetensors_header
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

