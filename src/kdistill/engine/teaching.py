"""Getting the teacher ready for a run: wrapped, validated against the data and the method, cached where
its outputs cannot change (no augmentation), or cached per augmented view, and handed back afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..teachers import CachedTeacher, ModuleTeacher
from .config import TrainConfig
from .views import ViewTeacher, load_or_compute


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
        if isinstance(teacher, ModuleTeacher) and aug.is_identity and cfg.cache_teacher and not needs_features:
            teacher = teacher.cache(train)
        if isinstance(teacher, CachedTeacher):
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


def _reads_teacher_features(method) -> bool:
    """Whether ``method`` hooks the teacher's layers (after :meth:`bind`, or by its declared class attribute)."""
    return bool(method.teacher_features) or hasattr(method, "teacher_layers")


def teacher_classes(teacher: Any) -> int | None:
    """The teacher's number of outputs where it is known without running it."""
    if teacher is None:
        return None
    n = getattr(teacher, "num_classes", None)
    return int(n) if n is not None else None
