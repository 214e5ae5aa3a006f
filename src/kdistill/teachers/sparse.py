"""Sparse cached teachers: the teacher runs once over the data and keeps, per (sample id, position), its top-k
log-probabilities, their classes and the mass left out (:mod:`kdistill.losses.sparse` says exactly what is stored
and how the loss uses it, temperature included).

Pass the result to ``fit`` as the teacher::

    teacher = sparse_cache(lm_teacher, bundle.train, k=32, path="teacher_top32.safetensors")
    fit(student, bundle.train, cfg, teacher=teacher, method={"name": "kd", "temperature": 2})

or let ``fit`` build it: ``train.teacher_topk: 32`` with a teacher network and data that can be cached.
Outputs are looked up by sample id, never by batch position, so any shuffling or subset finds its own rows.
The kept classes are stored in as few bits as the vocabulary allows (:mod:`kdistill.teachers.index_codec`:
``ceil(log2 V)`` bits per id, or a V-bit map when k is a large part of V), in memory as on disk, and decoded per
batch. The file (safetensors: ``ids``, ``values``, ``codes``, ``tail``) carries a manifest -- teacher weights hash,
data fingerprint, tokenizer hash, k, classes, dtypes, index layout -- and is reused only when every field matches
this run;
otherwise it is refused naming what changed. A batch of the teacher's dense logits is sparsified as soon as it
is computed, so memory holds one batch of (B, L, V) floats, never the data's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill.data.stream import inputs_to, iterate
from kdistill.io import atomic_path
from kdistill.losses.sparse import DEFAULT_VALUE_DTYPE, VALUE_DTYPES, SparseTargets, sparsify
from kdistill.teachers.base import ModuleTeacher, vocabulary_mismatch
from kdistill.teachers.index_codec import code_bytes, decode, encode, index_bits, layout_for
from kdistill.teachers.views import data_fingerprint, teacher_fingerprint

MANIFEST_KEY = "kdistill_sparse_teacher"
FORMAT = "kdistill-sparse-teacher/2"  # /2: class ids bit-packed (index_codec)


class SparseCachedTeacher:
    """Sparse teacher outputs keyed by sample id: ``logits(x, ids)`` returns the rows' :class:`SparseTargets`.

    Holds per row ``values`` (N, ..., k), ``codes`` (N, ..., code bytes: the kept classes as
    :func:`~kdistill.teachers.index_codec.encode` stored them under ``layout``) and ``tail`` (N, ...)."""

    needs_inputs = False
    sparse_targets = True

    def __init__(self, ids: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, tail: torch.Tensor,
                 num_classes: int, layout: str, manifest: dict[str, Any] | None = None,
                 path: str | Path | None = None) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if len(ids) != len(values) or (len(ids) and int(ids.min()) < 0) or len(torch.unique(ids)) != len(ids):
            raise ValueError(f"sparse teacher: need one row per unique id >= 0, got {len(ids)} ids and "
                             f"{len(values)} rows")
        k = int(values.shape[-1])
        if codes.dtype != torch.uint8 or codes.shape[:-1] != values.shape[:-1] \
                or codes.shape[-1] != code_bytes(num_classes, k, layout):
            raise ValueError(f"sparse teacher: codes of shape {tuple(codes.shape)} ({codes.dtype}) do not hold "
                             f"{k} classes of {num_classes} per position as {layout!r}")
        self.values, self.codes, self.tail = values, codes, tail
        self._num_classes, self.layout = int(num_classes), layout
        self.manifest, self.path = manifest or {}, Path(path) if path is not None else None
        size = int(ids.max()) + 1 if len(ids) else 0
        self.row_of = torch.full((size,), -1, dtype=torch.long)  # dense ids (window numbers, row numbers)
        self.row_of[ids] = torch.arange(len(ids))
        self.ids = ids

    @classmethod
    def from_targets(cls, ids: torch.Tensor, targets: SparseTargets, layout: str | None = None,
                     manifest: dict[str, Any] | None = None, path: str | Path | None = None) -> "SparseCachedTeacher":
        """Store decoded ``targets`` (values, integer indices, tail) under ``layout`` (the smaller by default)."""
        values, codes, layout = encode(targets.values, targets.indices, targets.num_classes, layout)
        return cls(ids, values, codes, targets.tail, targets.num_classes, layout, manifest, path)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def targets(self) -> SparseTargets:
        """Every row's targets, decoded (the class ids as int64)."""
        return SparseTargets(self.values, decode(self.codes, self.num_classes, self.k, self.layout), self.tail,
                             self.num_classes)

    def bytes_per_position(self) -> int:
        """Bytes stored per position: k values, the code of the kept classes, the tail."""
        return self.k * self.values.element_size() + self.codes.shape[-1] + self.tail.element_size()

    def to(self, device) -> "SparseCachedTeacher":
        self.values, self.codes = self.values.to(device), self.codes.to(device)
        self.tail, self.row_of = self.tail.to(device), self.row_of.to(device)
        return self

    def logits(self, x, ids: torch.Tensor) -> SparseTargets:
        """The stored targets of the samples ``ids`` (``x`` is not read: the outputs were computed on it)."""
        rows = self.row_of[ids.to(self.row_of.device)]
        indices = decode(self.codes[rows], self.num_classes, self.k, self.layout)
        return SparseTargets(self.values[rows], indices, self.tail[rows], self.num_classes)

    def check_covers(self, data) -> None:
        """Raise unless every sample of ``data`` has rows here, of its positions and classes."""
        ids = data.index.cpu()
        row_of = self.row_of.cpu()
        if len(ids) and (int(ids.max()) >= len(row_of) or bool((row_of[ids] < 0).any())):
            raise ValueError(f"teacher: the sparse cache does not cover every sample of {data.name} (ids missing); "
                             "build it on this data (sparse_cache(teacher, data, k))")
        if data.num_classes != self.num_classes:
            raise ValueError(vocabulary_mismatch(self.num_classes, data))
        positions = tuple(self.values.shape[1:-1])
        wanted = tuple(getattr(data, "positions", positions))
        if positions != wanted:
            raise ValueError(f"teacher: the sparse cache holds {positions} positions per sample, {data.name} has "
                             f"{wanted}; build it on this data")


def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of a Hugging Face ``tokenizers.Tokenizer``'s JSON (or of ``str(tokenizer)``); None without one."""
    if tokenizer is None:
        return None
    text = tokenizer.to_str() if hasattr(tokenizer, "to_str") else str(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()


def data_tokenizer_hash(data) -> str | None:
    """What ``data`` records of its tokenizer, as a manifest value: the BPE's sha256, ``"bytes"``, or None
    (data that is not text)."""
    record = (getattr(data, "preprocessing", None) or {}).get("tokenizer")
    if not isinstance(record, dict):
        return None
    return record.get("sha256") if record.get("kind") == "bpe" else "bytes"


def _manifest(teacher: ModuleTeacher, data, k: int, value_dtype: torch.dtype, tokenizer: Any) -> dict[str, Any]:
    token = tokenizer_hash(tokenizer) if tokenizer is not None else data_tokenizer_hash(data)
    return {"format": FORMAT, "teacher_sha256": teacher_fingerprint(teacher), "data_sha256": data_fingerprint(data),
            "tokenizer_sha256": token, "k": k, "num_classes": data.num_classes,
            "value_dtype": str(value_dtype).removeprefix("torch."),
            "index_layout": layout_for(data.num_classes, k), "index_bits": index_bits(data.num_classes),
            "samples": len(data)}


@torch.no_grad()
def compute_sparse(teacher: ModuleTeacher, data, k: int, value_dtype: torch.dtype,
                   batch_size: int = 64) -> "SparseCachedTeacher":
    """The teacher's sparse outputs for every sample of ``data``, one batch at a time, stored as the smaller
    index layout for its vocabulary and k."""
    device = next(teacher.module.parameters()).device
    layout = layout_for(data.num_classes, k)
    ids_all, parts = [], []
    for x, _, ids in iterate(data, batch_size):
        logits = teacher.logits(inputs_to(x, device))
        if logits.shape[-1] != data.num_classes:
            raise ValueError(vocabulary_mismatch(int(logits.shape[-1]), data))
        t = sparsify(logits, k, value_dtype)
        values, codes, _ = encode(t.values, t.indices, data.num_classes, layout)  # batch by batch: never all ids
        parts.append((values.cpu(), codes.cpu(), t.tail.cpu()))
        ids_all.append(ids.cpu())
    values, codes, tail = (torch.cat(column) for column in zip(*parts))
    return SparseCachedTeacher(torch.cat(ids_all), values, codes, tail, data.num_classes, layout)


def _refusal(path: Path, found: dict[str, Any], wanted: dict[str, Any],
             fix: str = "delete it or give another path") -> ValueError:
    diff = [key for key in wanted if found.get(key) != wanted[key]]
    what = ", ".join(f"{key} differs" if key.endswith("sha256") else
                     f"{key} (file: {found.get(key)!r}, this run: {wanted[key]!r})" for key in diff)
    return ValueError(f"teacher cache: {path} was made for another setup: {what}; {fix}")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The sparse-cache manifest of a safetensors file, or None when the file is not a sparse cache."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - not a safetensors file at all: not a sparse cache
        return None
    return json.loads(raw) if raw else None


def load_sparse_cache(path: str | Path, data) -> SparseCachedTeacher:
    """A sparse cache written by :func:`sparse_cache` (or ``kdistill predict --topk``), used without its teacher:
    refused unless it was made on exactly this data (fingerprint, tokenizer, classes, samples) by this format."""
    path = Path(path)
    found = read_manifest(path)
    if found is None:
        raise ValueError(f"teacher logits: {path} is not a sparse teacher cache (no {MANIFEST_KEY} manifest)")
    if found.get("format") != FORMAT:
        raise ValueError(f"teacher logits: {path} is a sparse cache of format {found.get('format')!r}, this kdistill "
                         f"reads {FORMAT!r}; write it again (kdistill predict --topk K --save-logits FILE)")
    wanted = {"data_sha256": data_fingerprint(data), "tokenizer_sha256": data_tokenizer_hash(data),
              "num_classes": data.num_classes, "samples": len(data)}
    if any(found.get(key) != value for key, value in wanted.items()):
        raise _refusal(path, found, wanted, "write it for this run's data (kdistill predict --model TEACHER --topk K "
                                            "--save-logits FILE with the same --data and its options)")
    cache = _read(path, data.num_classes, found)
    cache.check_covers(data)
    return cache


def _read(path: Path, num_classes: int, manifest: dict[str, Any]) -> SparseCachedTeacher:
    """The cache stored in ``path`` under its (already checked) ``manifest``."""
    t = load_file(str(path))
    return SparseCachedTeacher(t["ids"], t["values"], t["codes"], t["tail"], num_classes, manifest["index_layout"],
                               manifest, path)


def sparse_cache(teacher: nn.Module | ModuleTeacher, data, k: int, *, path: str | Path | None = None,
                 tokenizer: Any = None, value_dtype: str | torch.dtype = DEFAULT_VALUE_DTYPE,
                 batch_size: int = 64) -> SparseCachedTeacher:
    """The teacher's top-``k`` outputs on ``data`` (a TensorData or streamed split), read from ``path`` when its
    manifest matches this teacher, data, tokenizer, k and dtypes (else refused, naming what changed), or
    computed once and written there (a temp file, then renamed). ``value_dtype``: float16 (default),
    bfloat16 or float32."""
    if isinstance(value_dtype, str):
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype: one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
        value_dtype = VALUE_DTYPES[value_dtype]
    if not (isinstance(k, int) and 1 <= k <= data.num_classes):
        raise ValueError(f"train.teacher_topk: the classes kept per position must be in [1, {data.num_classes}] "
                         f"({data.name}'s classes), got {k!r}")
    owned = teacher if not isinstance(teacher, ModuleTeacher) else None
    net = ModuleTeacher(teacher) if owned is not None else teacher
    try:
        manifest = _manifest(net, data, k, value_dtype, tokenizer)
        path = Path(path) if path is not None else None
        if path is not None and path.is_file():
            found = read_manifest(path) or {}
            if found != manifest:
                raise _refusal(path, found, manifest)
            return _read(path, data.num_classes, manifest)
        cache = compute_sparse(net, data, k, value_dtype, batch_size)
        cache.manifest, cache.path = manifest, path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"ids": cache.ids, "values": cache.values.contiguous(), "codes": cache.codes.contiguous(),
                           "tail": cache.tail.contiguous()}, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest)})
        return cache
    finally:
        if owned is not None:
            net.release()
