"""Shared pieces of feature-level methods: layer pairs named by module path, optional KD and CE terms."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import soft_loss


def _as_paths(value: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    return tuple(v.strip() for v in value if v.strip())


def check_path(model: nn.Module, path: str, role: str, field: str) -> None:
    """Raise a ValueError naming ``field`` and the closest module path when ``model`` has no ``path``."""
    names = [n for n, _ in model.named_modules() if n]
    if path not in names:
        near = difflib.get_close_matches(path, names, n=3)
        hint = f"; closest: {near}" if near else f"; it has e.g. {names[:8]}"
        raise ValueError(f"{field}: the {role} has no module {path!r}{hint}")


def resolve_pairs(student: nn.Module, teacher: nn.Module | None, student_layers, teacher_layers, default: str,
                  method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (student paths, teacher paths) a feature method reads; defaults from the models' ``feature_layers``.

    ``default``: ``"all"`` pairs every stage, ``"middle"`` the middle stage (FitNets' hint layer).
    """
    if teacher is None:
        raise ValueError(f"method: {method} reads the teacher's intermediate features, so it needs a live teacher "
                         "network (features are not cached: not --teacher-logits / --teacher-onnx / teacher_views)")
    s_paths, t_paths = _as_paths(student_layers), _as_paths(teacher_layers)
    for paths, model, role in ((s_paths, student, "student"), (t_paths, teacher, "teacher")):
        if not paths:
            stages = tuple(getattr(model, "feature_layers", ()) or ())
            if not stages:
                raise ValueError(f"method.{role}_layers: the {role} ({type(model).__name__}) declares no feature_layers; "
                                 f"name the module paths, e.g. --set method.{role}_layers=layer2")
            chosen = stages if default == "all" else (stages[len(stages) // 2],)  # 3 stages: the 2nd (mdistiller)
            if role == "student":
                s_paths = chosen
            else:
                t_paths = chosen
    if len(s_paths) != len(t_paths):
        raise ValueError(f"method.student_layers / method.teacher_layers: need as many student layers as teacher layers, "
                         f"got {list(s_paths)} and {list(t_paths)}")
    for p in s_paths:
        check_path(student, p, "student", "method.student_layers")
    for p in t_paths:
        check_path(teacher, p, "teacher", "method.teacher_layers")
    return s_paths, t_paths


def extra_terms(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """The hard-label term and the optional KD term that the papers add to a feature loss."""
    terms: dict[str, torch.Tensor] = {}
    if ce_weight:
        terms["ce"] = ce_weight * F.cross_entropy(logits.float(), labels)
    if kd_weight:
        terms["kd"] = kd_weight * soft_loss(logits.float(), teacher_logits, temperature=temperature)
    return terms
