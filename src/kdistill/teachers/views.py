"""Cached teaching under augmentation: the teacher runs once on K fixed augmented views of every sample.

View k of sample i is the augmentation whose parameters are a pure function of (i, k, seed)
(:meth:`~kdistill.data.augment.Augment.view_params`), so nothing but the teacher's outputs is stored:
the student is shown one of the K views per sample per epoch, re-made from the same parameters, and
looks the teacher's logits up by (sample id, view). The outputs go to a safetensors file with a
manifest (teacher weights hash, data fingerprint, augmentation, K, top-k, seed) that later runs reuse when
everything matches and refuse, saying which field differs, when it does not.

With ``top-k`` storage only the k largest logits of each view are kept; the others are filled with the
mean of the dropped ones, which keeps the teacher's ranking and (for small k) most of the soft mass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kdistill.data.augment import Augment
from kdistill.data.dataset import TensorData
from kdistill.data.stream import iterate, labels_of
from kdistill.io import atomic_path

MANIFEST_KEY = "kdistill_teacher_views"


def data_fingerprint(data) -> str:
    """sha256 of a split's sample ids, labels and (in memory) inputs: what cached outputs were made for."""
    h = hashlib.sha256()
    h.update(data.index.cpu().contiguous().numpy().tobytes())
    h.update(labels_of(data).cpu().contiguous().numpy().tobytes())
    if isinstance(data, TensorData):
        h.update(str(tuple(data.x.shape)).encode())
        h.update(data.x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{type(data.dataset).__name__}:{len(data)}:{data.input_shape}".encode())
    return h.hexdigest()


def teacher_fingerprint(teacher: Any) -> str | None:
    """A hash of the teacher's weights, or None when it has none to hash."""
    if hasattr(teacher, "weights_hash"):
        return teacher.weights_hash()
    if hasattr(teacher, "fingerprint"):
        return teacher.fingerprint()
    return None


class ViewTeacher:
    """Teacher logits on K cached augmented views per sample, looked up by (sample id, view)."""

    needs_inputs = False
    uses_views = True

    def __init__(self, ids: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None, rest: torch.Tensor | None,
                 num_classes: int, manifest: dict[str, Any]) -> None:
        self.ids, self.values, self.indices, self.rest = ids.long(), values.float(), indices, rest
        self.num_classes, self.manifest = num_classes, manifest
        size = int(self.ids.max()) + 1 if len(self.ids) else 0
        self.row_of = torch.full((size,), -1, dtype=torch.long)
        self.row_of[self.ids] = torch.arange(len(self.ids))

    @property
    def views(self) -> int:
        return int(self.values.shape[1])

    def to(self, device) -> "ViewTeacher":
        self.values, self.row_of = self.values.to(device), self.row_of.to(device)
        if self.indices is not None:
            self.indices, self.rest = self.indices.to(device).long(), self.rest.to(device)
        return self

    def logits(self, x, ids: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[ids]
        if self.indices is None:
            return self.values[rows, views]
        out = self.rest[rows, views].unsqueeze(-1).expand(len(rows), self.num_classes).clone()
        return out.scatter_(1, self.indices[rows, views], self.values[rows, views])

    def check_covers(self, data) -> None:
        ids = data.index
        if len(ids) and (int(ids.max()) >= len(self.row_of) or bool((self.row_of.cpu()[ids] < 0).any())):
            raise ValueError("train.teacher_cache: the cached views do not cover every training sample")


@torch.no_grad()
def compute_views(teacher, data, aug: Augment, views: int, seed: int, topk: int, device: torch.device,
                  batch_size: int = 128):
    """(ids, values, indices, rest): the teacher's logits on ``views`` augmented views of every sample.

    Batches of 128: with freed memory kept (``fit`` turns it on before caching) a CIFAR resnet20 teacher on
    2 CPU cores took 0.339 ms per image at 128 and 0.347 at 512 (benchmarks/teacher_runtime.py, 2026-12-04);
    under glibc's defaults the batch of 512 faults in fresh pages and took 0.611 ms (a second run,
    ``KDISTILL_RETAIN_HEAP=0``) while 128 stayed at 0.342.
    """
    ids_all, per_view = [], [[] for _ in range(views)]
    for x, _, ids in iterate(data, batch_size):
        ids_all.append(ids.cpu())
        x = x.to(device)
        for k in range(views):
            params = aug.view_params(ids, k, seed).to(device)
            per_view[k].append(teacher.logits(aug.apply(x, params), ids.to(device)).float().cpu())
    ids = torch.cat(ids_all)
    table = torch.stack([torch.cat(v) for v in per_view], dim=1)  # (n, K, C)
    if not topk or topk >= table.shape[-1]:
        return ids, table, None, None
    vals, idx = table.topk(topk, dim=-1)
    rest = (table.sum(-1) - vals.sum(-1)) / (table.shape[-1] - topk)
    return ids, vals, idx.to(torch.int32), rest


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [k for k in wanted if found.get(k) != wanted[k]]


def load_or_compute(teacher, data, aug: Augment, views: int, seed: int, topk: int, device: torch.device,
                    path: Path | None, num_classes: int) -> ViewTeacher:
    """The cached views in ``path`` when its manifest matches this run, else computed (and written there)."""
    t_hash = teacher_fingerprint(teacher)
    manifest = {"teacher_sha256": t_hash, "data_sha256": data_fingerprint(data), "augment": str(aug), "views": views,
                "topk": topk, "seed": seed, "num_classes": num_classes, "samples": len(data)}
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            found = json.loads((f.metadata() or {}).get(MANIFEST_KEY, "{}"))
        diff = _differences(found, manifest)
        if diff or t_hash is None:
            what = ", ".join(f"{k} (file: {found.get(k)!r}, this run: {manifest[k]!r})" if not k.endswith("sha256")
                             else f"{k} differs" for k in diff) or "the teacher has no weights hash"
            raise ValueError(f"train.teacher_cache: {path} was made for another setup: {what}; delete it, or give "
                             "another path with --set train.teacher_cache=FILE")
        t = load_file(str(path))
        return ViewTeacher(t["ids"], t["values"], t.get("indices"), t.get("rest"), num_classes, manifest)
    ids, values, indices, rest = compute_views(teacher, data, aug, views, seed, topk, device)
    if path is not None and t_hash is not None:
        tensors = {"ids": ids, "values": values.contiguous()}
        if indices is not None:
            tensors.update(indices=indices.contiguous(), rest=rest.contiguous())
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest)})
    return ViewTeacher(ids, values, indices, rest, num_classes, manifest)
