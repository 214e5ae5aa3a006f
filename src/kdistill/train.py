"""The public training API: :func:`fit` and :class:`TrainConfig` (the engine lives in :mod:`kdistill.engine`).

Kept as the import path users and experiments know (``from kdistill.train import TrainConfig, fit``).
"""

from __future__ import annotations

import torch

from .engine.config import OPTIMIZERS, SCHEDULES, FitResult, TrainConfig
from .engine.loop import fit, resolve_method
from .engine.optim import lr_factor, make_optimizer, resolve_device
from .engine.teaching import prepare_teaching

__all__ = ["OPTIMIZERS", "SCHEDULES", "FitResult", "TrainConfig", "fit", "lr_factor", "make_optimizer",
           "resolve_device", "prepare_teacher", "resolve_method"]


def prepare_teacher(teacher, train, cfg: TrainConfig, device: torch.device):
    """The teacher as :func:`fit` would use it for KD with ``cfg`` (cached when inputs are not augmented)."""
    if teacher is None:
        return None
    method = resolve_method(None, teacher, cfg)
    if method.needs_labels and train.has_unlabelled:
        raise ValueError("train.alpha: the transfer set has unlabelled samples, so alpha must be 1 (soft targets only)")
    return prepare_teaching(teacher, train, cfg, method, cfg.augmentation(), device, None).teacher
