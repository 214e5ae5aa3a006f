"""Evaluation metrics, computed from logits so they serve live models, cached outputs and ensembles alike."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.data.stream import Inputs, inputs_len, inputs_rows, inputs_to
from kdistill.losses import IGNORE_INDEX, soft_loss
from kdistill.models.layout import as_layout, use_channels_last
from kdistill.models.outputs import forward_logits
from kdistill.data.stream import iterate
from kdistill.data.stream import labels_of


@torch.no_grad()
def predict_logits(model: nn.Module, x: Inputs, batch_size: int | None = None) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, restored afterwards) for all of ``x``, on the CPU.

    ``x``: a tensor, or a dict of tensors passed as keyword arguments; the model may return logits, a
    ``(logits, ...)`` tuple, a dict or a ``ModelOutput`` (:func:`~kdistill.models.outputs.forward_logits`).
    Batches default to 256 images for convolutional models (faster than bigger ones on a CPU: the
    activations stay in cache) and 2048 rows otherwise.
    """
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    nhwc = use_channels_last(model)
    batch_size = batch_size or (256 if nhwc else 2048)

    def batch(i: int) -> Inputs:
        rows = inputs_to(inputs_rows(x, slice(i, i + batch_size)), device)
        return rows if isinstance(rows, dict) else as_layout(rows, nhwc)

    try:
        return torch.cat([forward_logits(model, batch(i)).float().cpu() for i in range(0, inputs_len(x), batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_split(model: nn.Module, data, batch_size: int | None = None) -> torch.Tensor:
    """Logits of ``model`` for every sample of a split, in order: in-memory or streamed from disk."""

    if isinstance(data, TensorData):
        return predict_logits(model, data.x, batch_size)
    return torch.cat([predict_logits(model, x, batch_size) for x, _, _ in iterate(data, batch_size or 512)])


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    probs = F.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece = torch.zeros(())
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.float().mean() * (correct[mask].mean() - conf[mask].mean()).abs()
    return float(ece)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows = true class, columns = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    detailed: bool = True,
) -> dict[str, Any]:
    """Accuracy, error count, NLL, ECE, per-class accuracy, confusion; KL and agreement if a teacher is given.

    Per-position data (logits (N, L, C), labels (N, L) with -100 = not scored) is scored over its valid
    positions (:func:`position_metrics`).
    """
    if logits.dim() > 2:
        return position_metrics(logits, labels, teacher_logits, temperature, detailed)
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    correct = pred == labels
    out: dict[str, Any] = {
        "accuracy": float(correct.float().mean()),
        "errors": int((~correct).sum()),
        "count": int(len(labels)),
        "nll": float(F.cross_entropy(logits, labels)),
    }
    if teacher_logits is not None:
        teacher_logits = teacher_logits.float().cpu()
        # Report plain KL(p||q) at T (not T^2-scaled), comparable across temperatures as a divergence.
        out["kl_to_teacher"] = float(soft_loss(logits, teacher_logits, temperature=temperature) / temperature**2)
        out["teacher_agreement"] = float((pred == teacher_logits.argmax(dim=1)).float().mean())
    if detailed:
        cm = confusion_matrix(pred, labels, num_classes)
        per_class = cm.diag().float() / cm.sum(dim=1).clamp_min(1).float()
        out["ece"] = expected_calibration_error(logits, labels)
        out["per_class_accuracy"] = [round(float(a), 6) for a in per_class]
        out["confusion"] = cm.tolist()
    return out


def position_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    detailed: bool = True,
) -> dict[str, Any]:
    """:func:`classification_metrics` over the valid positions (label not -100) of (N, L, C) logits, plus
    ``perplexity`` = exp(mean NLL per valid position); ``count`` and ``errors`` count positions."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' positions "
                         f"{tuple(logits.shape[:-1])}")
    valid = labels.cpu() != IGNORE_INDEX
    if not bool(valid.any()):
        raise ValueError("labels: every position is -100 (not scored), so there is nothing to evaluate")
    flat = logits.float().cpu()[valid]
    teacher = None if teacher_logits is None else teacher_logits.float().cpu()[valid]
    out = classification_metrics(flat, labels.cpu()[valid], teacher, temperature, detailed)
    out["perplexity"] = float(math.exp(out["nll"])) if out["nll"] < 709 else math.inf
    return out


def evaluate_model(
    model: nn.Module,
    data: TensorData,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    detailed: bool = True,
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``model`` on ``data``."""

    return classification_metrics(predict_split(model, data), labels_of(data), teacher_logits, temperature, detailed)
