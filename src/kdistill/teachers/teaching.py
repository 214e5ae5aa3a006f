"""Getting the teacher ready for a run: wrapped, validated against the data and the method, cached where
its outputs cannot change (no augmentation, and data whose items read the same every time), or cached per
augmented view, and handed back afterwards. Everywhere else the teacher runs on the student's exact batch."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.data.stream import changing_items
from kdistill.teachers.base import CachedTeacher, ModuleTeacher
from kdistill.engine.config import TrainConfig
from kdistill.teachers.views import ViewTeacher, load_or_compute
from kdistill.teachers.sparse import SparseCachedTeacher, sparse_cache


class Teaching:
    """The teacher a run uses (:attr:`teacher`), its network for feature hooks (:attr:`module`), and
    :meth:`release`, which returns a module the caller passed in to the state it was given in."""

    def __init__(self, teacher: Any, module: nn.Module | None, owned: ModuleTeacher | None,
                 compiled: ModuleTeacher | None = None) -> None:
        self.teacher, self.module, self._owned, self._compiled = teacher, module, owned, compiled

    @property
    def live(self) -> bool:
        return isinstance(self.teacher, ModuleTeacher)

    def release(self) -> None:
        if self._compiled is not None:  # a caller's ModuleTeacher is not left compiling after the run
            self._compiled.compile = False
            self._compiled = None
        if self._owned is not None:
            self._owned.release()
            self._owned = None


def prepare_teaching(teacher: Any, train, cfg: TrainConfig, method, aug, device: torch.device,
                     cache_path: Path | None) -> Teaching:
    """Wrap, check and (where it is valid) cache ``teacher`` for training on ``train``."""
    if teacher is None:
        return Teaching(None, None, None)
    owned = None
    if isinstance(teacher, nn.Module):
        teacher = owned = ModuleTeacher(teacher)
    compiled = None
    if cfg.compile and isinstance(teacher, ModuleTeacher) and not teacher.compile:
        teacher.compile = True  # its forward (live, or caching the views) compiled as the student's is
        compiled = teacher
    try:
        needs_features = _reads_teacher_features(method)
        if cfg.teacher_views:
            if needs_features:
                raise ValueError("train.teacher_views: the method reads the teacher's features, which are not cached; "
                                 "set teacher_views to 0")
            if not getattr(teacher, "needs_inputs", True):
                raise ValueError("train.teacher_views: the teacher is a logits file, which cannot see augmented views; "
                                 "give a teacher network (or ONNX model), or set teacher_views to 0")
            if hasattr(teacher, "to"):
                teacher = teacher.to(device)
            views = load_or_compute(teacher, train, aug, cfg.teacher_views, cfg.seed, cfg.teacher_topk, device,
                                    cache_path, train.num_classes)
            views.check_covers(train)
            return Teaching(views.to(device), None, owned, compiled)
        if isinstance(teacher, ModuleTeacher) and aug.is_identity and not needs_features \
                and should_cache(train, cfg.cache_teacher):
            if cfg.teacher_topk:  # top-k log-probabilities and the mass left out (kdistill.teachers.sparse)
                teacher = sparse_cache(teacher, train, cfg.teacher_topk, path=topk_path(cfg, cache_path))
            else:
                check_position_cache(teacher, train)
                teacher = teacher.cache(train)
        if isinstance(teacher, SparseCachedTeacher) and not getattr(method, "sparse_targets", False):
            raise ValueError(f"teacher: a sparse (top-k) cached teacher gives no full logits, which method {method.name} "
                             "needs; use method kd, or a dense teacher (train.teacher_topk: 0)")
        if isinstance(teacher, (CachedTeacher, SparseCachedTeacher)):
            if not aug.is_identity:
                raise ValueError(f"train.augment: cached teacher logits were computed on un-augmented inputs ({aug}); "
                                 "remove the augmentation (and jitter) or give a teacher network that sees each batch")
            teacher.check_covers(train)
        if hasattr(teacher, "to"):  # a live teacher runs on the student's batches, so on the student's device
            teacher = teacher.to(device)
        module = teacher.module if isinstance(teacher, ModuleTeacher) else None
        return Teaching(teacher, module, owned, compiled)
    except BaseException:
        if compiled is not None:
            compiled.compile = False
        if owned is not None:
            owned.release()
        raise


def topk_path(cfg: TrainConfig, views_path: Path | None) -> Path | None:
    """Where ``train.teacher_topk`` keeps the sparse cache: ``train.teacher_cache``, else beside the run's files."""
    if cfg.teacher_cache:
        return Path(cfg.teacher_cache)
    return views_path.with_name("teacher_topk.safetensors") if views_path is not None else None


POSITION_CACHE_BYTES = 2 * 2**30
"""Largest cache of a teacher's per-position outputs (N x L x C float32) ``fit`` builds in memory."""


def check_position_cache(teacher: ModuleTeacher, train) -> None:
    """Refuse to cache a teacher's (N, L, C) outputs beyond :data:`POSITION_CACHE_BYTES`, naming the way out:
    a live teacher."""
    if not getattr(train, "per_position", False):
        return
    shape = (len(train), *getattr(train, "positions", ()), train.num_classes)
    size = math.prod(shape) * 4
    if size > POSITION_CACHE_BYTES:
        raise ValueError(f"train.cache_teacher: caching the teacher's per-position outputs for {train.name} "
                         f"({shape} float32) would take {size / 2**30:.2f} GiB, "
                         f"beyond the {POSITION_CACHE_BYTES / 2**30:g} GiB budget; set train.cache_teacher: false "
                         "to use a live teacher (it runs on each student batch)")


def should_cache(train, cache_teacher: bool | None) -> bool:
    """Whether a teacher network may run once over ``train`` (``train.cache_teacher``: None = auto).

    In memory, a sample is the same tensor every epoch: cached unless told not to. A streamed data set may
    transform its items at random on every read (torchvision's ``RandomCrop``): then a cache would hold one
    random view while the student sees others, so the teacher stays live (auto, with a warning saying why)
    or, where the user asked for the cache, the run is refused before any work.
    """
    if cache_teacher is False:
        return False
    if isinstance(train, TensorData):
        return True
    why = changing_items(train)
    if why is None:
        return True
    if cache_teacher:
        raise ValueError(f"train.cache_teacher: true caches the teacher's outputs on one read of each sample, but "
                         f"{train.name}'s items change between reads ({why}), so the teacher would not see the "
                         "student's inputs; leave cache_teacher unset (auto: the teacher runs on each batch) or set "
                         "it to false")
    warnings.warn(f"train.cache_teacher: {train.name}'s items change between reads ({why}); the teacher runs on "
                  "each student batch instead of once over the data (set cache_teacher: false to skip this check)",
                  UserWarning, stacklevel=4)
    return False


def _reads_teacher_features(method) -> bool:
    """Whether ``method`` hooks the teacher's layers (after :meth:`bind`, or by its declared class attribute)."""
    return bool(method.teacher_features) or hasattr(method, "teacher_layers")


def teacher_classes(teacher: Any) -> int | None:
    """The teacher's number of outputs where it is known without running it."""
    if teacher is None:
        return None
    n = getattr(teacher, "num_classes", None)
    return int(n) if n is not None else None
