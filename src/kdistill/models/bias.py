"""Logit offsets for classes a transfer set left out (Hinton et al. 2015, section 3).

A student distilled on a transfer set without some classes (no 3s; only 7s and 8s) learns the teacher's
relative logits well but gets its class priors wrong: the absent classes' logits come out too low (no 3s)
or the present ones too high (only 7s and 8s). One scalar ``b`` added to the logits of a set of classes
``S`` fixes the prior. This module picks ``b`` two ways, both as pure functions of logits:

* :func:`choose_offset_on_labels` uses a labelled validation split: the offset with the fewest errors
  (found exactly, not on a grid: the errors are a step function of ``b``), ties broken by the lowest NLL;
* :func:`label_free_offset` needs no labels: the offset that makes the student's mean predicted
  probability of ``S`` on unlabelled inputs equal the teacher's on the same inputs.

:func:`with_logit_offset` then folds the offset into a copy of the model's final ``nn.Linear`` bias, so the
adjusted student is an ordinary model again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def _class_mask(num_classes: int, classes: Iterable[int]) -> torch.Tensor:
    chosen = sorted({int(c) for c in classes})
    if not chosen:
        raise ValueError("classes: give at least one class to offset")
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes: {bad} are not in 0..{num_classes - 1}")
    if len(chosen) == num_classes:
        raise ValueError("classes: offsetting every class changes nothing; leave at least one class out")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[chosen] = True
    return mask


def _check_logits(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    if logits.dim() != 2 or len(logits) == 0:
        raise ValueError(f"logits: need a non-empty (samples, classes) tensor, got shape {tuple(logits.shape)}")
    if labels is not None:
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match {len(logits)} logit rows")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError("labels: every label must be a class index (unlabelled samples cannot choose an offset)")
    return logits.detach().double().cpu()


def offset_vector(num_classes: int, classes: Iterable[int], offset: float) -> torch.Tensor:
    """A ``num_classes`` vector holding ``offset`` at ``classes`` and 0 elsewhere."""
    return _class_mask(num_classes, classes).float() * float(offset)


def add_offset(logits: torch.Tensor, classes: Iterable[int], offset: float) -> torch.Tensor:
    """``logits`` with ``offset`` added to the columns of ``classes``."""
    return logits + offset_vector(logits.shape[1], classes, offset).to(logits.device, logits.dtype)


def _log_odds(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, log P(S) - log P(not S) at offset 0: the probability of S at offset b is sigmoid(this + b)."""
    return torch.logsumexp(logits[:, mask], dim=1) - torch.logsumexp(logits[:, ~mask], dim=1)


def mass_at_offset(logits: torch.Tensor, classes: Iterable[int], offset: float) -> float:
    """Mean over samples of the softmax probability summed over ``classes``, after adding ``offset`` to them."""
    z = _check_logits(logits)
    return float(torch.sigmoid(_log_odds(z, _class_mask(z.shape[1], classes)) + offset).mean())


def _solve_mass(log_odds: torch.Tensor, target: float, tol: float = 1e-9) -> float:
    """The ``b`` with mean(sigmoid(log_odds + b)) == ``target``, by bisection (the mean is increasing in b)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target: a probability mass strictly between 0 and 1 is needed, got {target}")

    def excess(b: float) -> float:
        return float(torch.sigmoid(log_odds + b).mean()) - target

    lo, hi = -1.0, 1.0
    while excess(lo) > 0:
        lo *= 2
        if lo < -1e4:
            raise ValueError(f"target: mass {target} is not reachable with any offset (logits too extreme)")
    while excess(hi) < 0:
        hi *= 2
        if hi > 1e4:
            raise ValueError(f"target: mass {target} is not reachable with any offset (logits too extreme)")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def match_mass_offset(logits: torch.Tensor, classes: Iterable[int], target: float) -> float:
    """The offset for ``classes`` that makes their mean predicted probability mass over ``logits`` equal ``target``."""
    z = _check_logits(logits)
    return _solve_mass(_log_odds(z, _class_mask(z.shape[1], classes)), float(target))


def label_free_offset(student_logits: torch.Tensor, teacher_logits: torch.Tensor, classes: Iterable[int]) -> float:
    """The offset matching the student's mean probability of ``classes`` to the teacher's, on the same inputs.

    No labels are used: both nets only see the (unlabelled) inputs whose logits are given.
    """
    s, t = _check_logits(student_logits), _check_logits(teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"teacher_logits: shape {tuple(t.shape)} differs from student_logits {tuple(s.shape)}")
    mask = _class_mask(s.shape[1], classes)
    target = float(torch.softmax(t, dim=1)[:, mask].sum(dim=1).mean())
    return _solve_mass(_log_odds(s, mask), target)


def nll_at_offset(logits: torch.Tensor, labels: torch.Tensor, classes: Iterable[int], offset: float) -> float:
    """Mean cross-entropy of ``labels`` after adding ``offset`` to the logits of ``classes``."""
    z = _check_logits(logits, labels)
    return float(torch.nn.functional.cross_entropy(add_offset(z, classes, offset), labels.cpu()))


def errors_at_offsets(
    logits: torch.Tensor, labels: torch.Tensor, classes: Iterable[int], offsets: torch.Tensor | Iterable[float]
) -> torch.Tensor:
    """Error counts at each of ``offsets`` (for plots and checks): one batched pass per offset."""
    z = _check_logits(logits, labels)
    offsets = torch.as_tensor(list(offsets) if not isinstance(offsets, torch.Tensor) else offsets, dtype=torch.float64)
    vec = offset_vector(z.shape[1], classes, 1.0).double()
    labels = labels.cpu()
    return torch.stack([((z + b * vec).argmax(dim=1) != labels).sum() for b in offsets])


@dataclass(frozen=True)
class OffsetChoice:
    """An offset chosen on labelled data, with what it achieves there."""

    offset: float
    errors: int
    errors_at_zero: int
    interval: tuple[float, float]
    """The range of offsets (open) that all give ``errors``; ``offset`` lies inside it."""
    nll: float


def error_steps(logits: torch.Tensor, labels: torch.Tensor, classes: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The errors as an exact step function of the offset: ``(breakpoints, errors)``.

    With offset ``b`` on the classes ``S`` a sample is predicted as its best class in ``S`` when
    ``b`` exceeds its switch point (best logit outside ``S`` minus best inside), else as its best class
    outside ``S``. ``errors[k]`` is the count on the open interval between ``breakpoints[k-1]`` and
    ``breakpoints[k]`` (``-inf`` and ``+inf`` at the ends), so ``len(errors) == len(breakpoints) + 1``.
    """
    z = _check_logits(logits, labels)
    mask = _class_mask(z.shape[1], classes)
    labels = labels.cpu()
    inside = torch.nonzero(mask).flatten()
    outside = torch.nonzero(~mask).flatten()
    best_in, arg_in = z[:, inside].max(dim=1)
    best_out, arg_out = z[:, outside].max(dim=1)
    switch = best_out - best_in
    right_in = inside[arg_in] == labels  # correct once b > switch
    right_out = outside[arg_out] == labels  # correct while b < switch
    breaks = torch.unique(switch)  # sorted
    # One probe per interval: below all, between neighbours, above all.
    probes = torch.cat([breaks[:1] - 1.0, 0.5 * (breaks[1:] + breaks[:-1]), breaks[-1:] + 1.0])
    sw_in = torch.sort(switch[right_in]).values
    sw_out = torch.sort(switch[right_out]).values
    correct = torch.searchsorted(sw_in, probes, side="left") + (len(sw_out) - torch.searchsorted(sw_out, probes, side="right"))
    return breaks, len(labels) - correct


def choose_offset_on_labels(logits: torch.Tensor, labels: torch.Tensor, classes: Iterable[int]) -> OffsetChoice:
    """The offset for ``classes`` with the fewest errors on ``(logits, labels)``; ties go to the lowest NLL.

    The NLL is convex in the offset, so within each interval of fewest errors its best point is the
    global NLL minimiser clamped into the interval (kept a small margin inside, off the switch points).
    """
    classes = list(classes)
    z = _check_logits(logits, labels)
    breaks, errors = error_steps(z, labels, classes)
    best = int(errors.min())
    mask = _class_mask(z.shape[1], classes)
    # The NLL minimiser is where the mean predicted mass of S equals S's share of the labels.
    share = float(mask[labels.cpu()].double().mean())
    if 0.0 < share < 1.0:
        nll_opt = _solve_mass(_log_odds(z, mask), share)
    else:
        nll_opt = -math.inf if share == 0.0 else math.inf
    edges = [-math.inf] + breaks.tolist() + [math.inf]
    candidates = []
    for k in torch.nonzero(errors == best).flatten().tolist():
        lo, hi = edges[k], edges[k + 1]
        margin = min(1e-3, (hi - lo) / 4) if math.isfinite(hi - lo) else 1e-3
        b = min(max(nll_opt, lo + margin), hi - margin)
        if not math.isfinite(b):  # an unbounded interval and an unbounded NLL optimum: step past the edge
            b = (hi - 1.0) if math.isfinite(hi) else (lo + 1.0)
        candidates.append((nll_at_offset(z, labels, classes, b), b, (lo, hi)))
    nll, offset, interval = min(candidates)
    zero_errors = int(((z.argmax(dim=1)) != labels.cpu()).sum())
    return OffsetChoice(offset=float(offset), errors=best, errors_at_zero=zero_errors, interval=interval, nll=nll)


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model``'s module order: the layer producing the logits in kdistill's nets."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear layer whose bias could take an offset")
    return last


@torch.no_grad()
def with_logit_offset(model: nn.Module, classes: Iterable[int], offset: float) -> nn.Module:
    """A copy of ``model`` whose final ``nn.Linear`` bias has ``offset`` added for ``classes``.

    Its logits equal the original's plus the offset vector, so it can be saved and evaluated like any model.
    """
    adjusted = copy.deepcopy(model)
    layer = final_linear(adjusted)
    if layer.bias is None:
        raise ValueError("model: the final nn.Linear has no bias; build it with bias=True to take an offset")
    layer.bias.add_(offset_vector(layer.out_features, classes, offset).to(layer.bias.device, layer.bias.dtype))
    return adjusted
