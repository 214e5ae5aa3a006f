"""Shared pieces of feature-level methods: layer pairs named by module path, optional KD and CE terms."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import soft_loss
from kdistill.models.stages import FAMILIES, default_stages


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


def _auto(model: nn.Module, role: str, method: str) -> tuple[tuple[str, ...], str]:
    """The model's default stages and their family (:mod:`kdistill.models.stages`); a ValueError when none."""
    stages, fam = default_stages(model)
    if not stages:
        raise ValueError(f"method.{role}_layers: {method} found no default feature stages in the {role} "
                         f"({type(model).__name__}: no feature_layers and no known family among "
                         f"{list(FAMILIES)}); name the module paths, e.g. --set method.{role}_layers=layer2")
    return stages, str(fam)


def pair_defaults(s_paths: tuple[str, ...], t_paths: tuple[str, ...], s_auto: tuple[str, ...] | None,
                  t_auto: tuple[str, ...] | None, default: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Fill the sides the user did not name (``*_auto`` not None: their default stages).

    ``"middle"`` (FitNets' one hint layer): each defaulted side's middle stage (of 3: the 2nd, as mdistiller),
    unless the other side names several paths. ``"all"``: the deepest ``k`` stages of each defaulted side,
    ``k`` being the other side's count (both defaulted: the smaller count, so a 3-stage student reads a
    4-stage teacher's last 3).
    """
    def fill(auto: tuple[str, ...], other: tuple[str, ...] | None) -> tuple[str, ...]:
        if default == "middle" and (other is None or len(other) == 1):
            return (auto[len(auto) // 2],)
        k = len(other) if other is not None else len(auto)
        return auto[-k:]

    if s_auto is not None and t_auto is not None and default != "middle":
        k = min(len(s_auto), len(t_auto))
        return s_auto[-k:], t_auto[-k:]
    s_out = fill(s_auto, None if t_auto is not None else t_paths) if s_auto is not None else s_paths
    t_out = fill(t_auto, None if s_auto is not None else s_paths) if t_auto is not None else t_paths
    return s_out, t_out


def resolve_pairs(student: nn.Module, teacher: nn.Module | None, student_layers, teacher_layers, default: str,
                  method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (student paths, teacher paths) a feature method reads; unnamed sides from the models' default stages.

    ``default``: ``"all"`` pairs every stage, ``"middle"`` the middle stage (FitNets' hint layer). Defaults
    come from :func:`kdistill.models.stages.default_stages` (a model's ``feature_layers``, else its family:
    ResNet, ConvNeXt, MobileNet, timm's ``feature_info``, a sequential trunk); the choice is printed to stderr.
    """
    if teacher is None:
        raise ValueError(f"method: {method} reads the teacher's intermediate features, so it needs a live teacher "
                         "network (features are not cached: not --teacher-logits / --teacher-onnx / teacher_views)")
    s_paths, t_paths = _as_paths(student_layers), _as_paths(teacher_layers)
    s_auto = None if s_paths else _auto(student, "student", method)
    t_auto = None if t_paths else _auto(teacher, "teacher", method)
    s_out, t_out = pair_defaults(s_paths, t_paths, s_auto and s_auto[0], t_auto and t_auto[0], default)
    if len(s_out) != len(t_out):
        raise ValueError(f"method.student_layers / method.teacher_layers: need as many student layers as teacher layers, "
                         f"got {list(s_out)} and {list(t_out)}")
    for p in s_out:
        check_path(student, p, "student", "method.student_layers")
    for p in t_out:
        check_path(teacher, p, "teacher", "method.teacher_layers")
    if s_auto or t_auto:
        print(f"kdistill: {method} pairs student {list(s_out)} ({s_auto[1] if s_auto else 'named'}) with teacher "
              f"{list(t_out)} ({t_auto[1] if t_auto else 'named'}); name others with --set method.student_layers=... "
              "/ method.teacher_layers=...", file=sys.stderr)
    return s_out, t_out


def extra_terms(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """The hard-label term and the optional KD term that the papers add to a feature loss."""
    terms: dict[str, torch.Tensor] = {}
    if ce_weight:
        terms["ce"] = ce_weight * F.cross_entropy(logits.float(), labels)
    if kd_weight:
        terms["kd"] = kd_weight * soft_loss(logits.float(), teacher_logits, temperature=temperature)
    return terms
