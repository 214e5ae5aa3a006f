"""Specialists for confusable classes (Hinton et al. 2015, section 5).

A *generalist* covers every class. Classes it tends to predict together are found by clustering the
covariance matrix of its predicted distributions (:func:`confusable_clusters`). Each cluster S gets a
*specialist*: a copy of the generalist whose output layer is cut down to S plus one "dustbin" class for
everything else (:func:`specialist_from_generalist`), trained on data that is half S and half random
other samples (:func:`specialist_data`), with the generalist's soft targets collapsed onto S + dustbin
(:func:`collapse_logits`) mixed with the hard labels.

At test time the generalist's top-k classes choose the active specialists (those whose S meets them) and
the prediction is the full distribution q that minimises

    KL(p_g || q) + Σ_{m active} KL(p_m || collapse_m(q)),

where collapse_m(q) keeps q on S_m and sums the rest into the dustbin (:func:`combine_distributions`,
solved numerically: the objective is convex in q and an EM fixed-point iteration reaches its minimum). :class:`SpecialistSystem` does all of this and is
itself a teacher, so the combination can be distilled back into one model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.engine.evaluate import predict_logits
from kdistill.methods.kd import KD
from kdistill.teachers.base import CachedTeacher, freeze

if TYPE_CHECKING:
    from kdistill.engine import FitResult, TrainConfig

DUSTBIN = "dustbin"


# --- finding confusable classes ------------------------------------------------------------------------


def prediction_covariance(probs: torch.Tensor) -> torch.Tensor:
    """C x C covariance, over samples, of the predicted probabilities of each pair of classes."""
    if probs.dim() != 2 or len(probs) < 2:
        raise ValueError(f"probs: need N x C predicted distributions with N >= 2, got {tuple(probs.shape)}")
    return torch.cov(probs.double().T)


def confusable_clusters(
    probs: torch.Tensor, n_clusters: int, seed: int = 0, min_size: int = 2
) -> list[tuple[int, ...]]:
    """Groups of classes that the generalist predicts together: K-means on the covariance's columns.

    Two classes that are often given probability on the same inputs have a positive covariance, so their
    columns are close. Clusters smaller than ``min_size`` need no specialist and are dropped.
    """
    from sklearn.cluster import KMeans

    num_classes = probs.shape[1]
    if not 1 <= n_clusters <= num_classes:
        raise ValueError(f"n_clusters: must be in 1..{num_classes}, got {n_clusters}")
    cov = prediction_covariance(probs).numpy()
    labels = KMeans(n_clusters=n_clusters, n_init=20, random_state=seed).fit_predict(cov)
    groups = [tuple(int(c) for c in np.flatnonzero(labels == k)) for k in range(n_clusters)]
    return sorted((g for g in groups if len(g) >= min_size), key=lambda g: g[0])


# --- building and training one specialist --------------------------------------------------------------


def _check_classes(classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
    out = tuple(int(c) for c in classes)
    if len(out) == 0 or len(set(out)) != len(out) or not all(0 <= c < num_classes for c in out):
        raise ValueError(f"classes: need distinct class numbers in 0..{num_classes - 1}, got {list(classes)}")
    if len(out) == num_classes:
        raise ValueError("classes: a specialist covering every class has an empty dustbin; leave one class out")
    return out


def _others(classes: Sequence[int], num_classes: int) -> list[int]:
    own = set(classes)
    return [c for c in range(num_classes) if c not in own]


def collapse_logits(logits: torch.Tensor, classes: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
    """Logits over ``classes`` + dustbin whose softmax at ``temperature`` is the collapsed distribution.

    The dustbin logit is ``T · logsumexp(z_others / T)``: exact at that temperature only.
    """
    classes = _check_classes(classes, logits.shape[1])
    z = logits.double() / temperature
    dust = torch.logsumexp(z[:, _others(classes, logits.shape[1])], dim=1, keepdim=True)
    return (temperature * torch.cat([z[:, list(classes)], dust], dim=1)).float()


def collapse_labels(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Class c in ``classes`` -> its position; anything else -> the dustbin, ``len(classes)``."""
    local = torch.full_like(labels, len(classes))
    for i, c in enumerate(classes):
        local[labels == c] = i
    return local


def specialist_data(data: TensorData, classes: Sequence[int], seed: int = 0, others_per_own: float = 1.0) -> TensorData:
    """All samples of ``classes`` plus ``others_per_own`` times as many random others, labelled S + dustbin.

    With the default 1.0 the set is half special, half other (or all the others if there are fewer).
    Sample ids are kept, so cached teacher logits still find their rows.
    """
    classes = _check_classes(classes, data.num_classes)
    if data.has_unlabelled:
        raise ValueError(f"{data.name}: a specialist's training set is chosen by label; it has unlabelled samples")
    if others_per_own < 0:
        raise ValueError(f"others_per_own: must be >= 0, got {others_per_own}")
    own_mask = torch.isin(data.y, torch.tensor(classes))
    own = torch.nonzero(own_mask).flatten()
    rest = torch.nonzero(~own_mask).flatten()
    g = torch.Generator().manual_seed(seed)
    n_other = min(len(rest), round(others_per_own * len(own)))
    rows = torch.cat([own, rest[torch.randperm(len(rest), generator=g)[:n_other]]]).sort().values
    sub = data.subset(rows)
    names = tuple(data.classes[c] for c in classes) + (DUSTBIN,)
    tag = "-".join(str(c) for c in classes)
    return replace(sub, y=collapse_labels(sub.y, classes), classes=names, name=f"{data.name}-specialist-{tag}")


def _output_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        raise ValueError(
            f"generalist: its last nn.Linear must be the {num_classes}-way output layer to make a specialist"
        )
    return linears[-1]


def specialist_from_generalist(generalist: nn.Module, classes: Sequence[int], num_classes: int) -> nn.Module:
    """A trainable copy of ``generalist`` whose output layer covers ``classes`` + dustbin.

    The rows for ``classes`` are the generalist's own. The dustbin row is the mean of the other rows,
    with bias ``mean + log(#others)``: the log-sum-exp of the other logits when these are equal.
    """
    classes = _check_classes(classes, num_classes)
    others = _others(classes, num_classes)
    model = copy.deepcopy(generalist)
    name, old = _output_layer(model, num_classes)
    new = nn.Linear(old.in_features, len(classes) + 1, bias=old.bias is not None).to(old.weight.device)
    with torch.no_grad():
        new.weight[: len(classes)] = old.weight[list(classes)]
        new.weight[len(classes)] = old.weight[others].mean(dim=0)
        if old.bias is not None:
            new.bias[: len(classes)] = old.bias[list(classes)]
            new.bias[len(classes)] = old.bias[others].mean() + math.log(len(others))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model


def specialist_teacher(
    generalist_logits: torch.Tensor, ids: torch.Tensor, classes: Sequence[int], temperature: float
) -> CachedTeacher:
    """The generalist's soft targets collapsed onto ``classes`` + dustbin, keyed by sample id."""
    return CachedTeacher(ids, collapse_logits(generalist_logits, classes, temperature))


@dataclass
class Specialist:
    """A model over ``classes`` (generalist class numbers) plus a final dustbin output."""

    classes: tuple[int, ...]
    model: nn.Module


def train_specialist(
    generalist: nn.Module,
    train: TensorData,
    classes: Sequence[int],
    config: "TrainConfig",
    *,
    temperature: float,
    alpha: float,
    generalist_logits: torch.Tensor | None = None,
    val: TensorData | None = None,
    others_per_own: float = 1.0,
    progress: bool = False,
    out_dir=None,
) -> tuple[Specialist, "FitResult"]:
    """Initialise a specialist from ``generalist`` and train it on half-special data.

    The loss is ``alpha`` x the KL to the generalist's collapsed soft targets at ``temperature`` plus
    ``1 - alpha`` x cross-entropy with the S + dustbin labels (KD, :mod:`kdistill.methods.kd`; ``alpha`` 0:
    the labels alone, no teacher). ``config`` is the training recipe (epochs, optimiser, keep-best ...).
    ``generalist_logits`` (rows in ``train``'s order) saves a pass over the data when given.
    The validation split, if any, is made half-special the same way.
    """
    from kdistill.engine import fit

    classes = _check_classes(classes, train.num_classes)
    method = KD(temperature=temperature, alpha=alpha)  # checks both (method.temperature, method.alpha)
    model = specialist_from_generalist(generalist, classes, train.num_classes)
    data = specialist_data(train, classes, config.seed, others_per_own)
    teacher = None
    if alpha > 0:
        logits = predict_logits(generalist, train.x) if generalist_logits is None else generalist_logits
        if len(logits) != len(train):
            raise ValueError(f"generalist_logits: {len(logits)} rows for {len(train)} training samples")
        teacher = specialist_teacher(logits, train.index, classes, temperature)
    val_data = specialist_data(val, classes, config.seed, others_per_own) if val is not None else None
    result = fit(model, data, config, teacher=teacher, method=method if teacher is not None else None, val=val_data,
                 progress=progress, out_dir=out_dir)
    return Specialist(classes=classes, model=result.model), result


# --- combining generalist and specialists --------------------------------------------------------------


def active_specialists(gen_log_probs: torch.Tensor, clusters: Sequence[Sequence[int]], top_k: int) -> torch.Tensor:
    """N x M: specialist m is active for a sample when its classes meet the generalist's ``top_k`` classes."""
    if not 1 <= top_k <= gen_log_probs.shape[1]:
        raise ValueError(f"top_k: must be in 1..{gen_log_probs.shape[1]}, got {top_k}")
    top = gen_log_probs.topk(top_k, dim=1).indices
    cols = [torch.isin(top, torch.tensor(list(c), device=top.device)).any(dim=1) for c in clusters]
    return torch.stack(cols, dim=1) if cols else torch.zeros(len(top), 0, dtype=torch.bool)


def _objective(
    z: torch.Tensor, p_gen: torch.Tensor, p_spec: list[torch.Tensor], masks: list[torch.Tensor],
    own: list[list[int]], rest: list[list[int]],
) -> torch.Tensor:
    """Σ over samples of the cross-entropy part of the KL objective, at q = softmax(z) (for checking)."""
    log_q = F.log_softmax(z, dim=1)
    total = -(p_gen * log_q).sum()
    for p, mask, s, o in zip(p_spec, masks, own, rest):
        log_cq = torch.cat([log_q[:, s], torch.logsumexp(log_q[:, o], dim=1, keepdim=True)], dim=1)
        total = total - (mask[:, None] * p * log_cq).sum()
    return total


def combine_distributions(
    gen_log_probs: torch.Tensor,
    spec_log_probs: Sequence[torch.Tensor],
    clusters: Sequence[Sequence[int]],
    active: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> torch.Tensor:
    """log q minimising KL(p_g||q) + Σ_active KL(p_m||collapse_m(q)) for every sample (N x C).

    In q the objective is convex: each term is ``-p log(sum of some q_i)``. Its minimum is found by the
    EM fixed-point iteration for coarsened observations: a specialist's probability for one of its own
    classes goes to that class; its dustbin probability is shared among the other classes in proportion
    to the current q; the generalist's goes class by class; q is the normalised total. Each step lowers
    the objective; iteration stops when q moves by less than ``tol``. Samples with no active specialist
    keep the generalist's distribution.
    """
    n, c = gen_log_probs.shape
    if len(spec_log_probs) != len(clusters) or active.shape != (n, len(clusters)):
        raise ValueError(
            f"specialists: {len(spec_log_probs)} outputs, {len(clusters)} clusters and an active mask of "
            f"shape {tuple(active.shape)} must agree with {n} samples"
        )
    for lp, cl in zip(spec_log_probs, clusters):
        if lp.shape != (n, len(cl) + 1):
            raise ValueError(f"specialist over {list(cl)}: needs {n} x {len(cl) + 1} outputs, got {tuple(lp.shape)}")
    out = gen_log_probs.double().log_softmax(dim=1)
    rows = torch.nonzero(active.any(dim=1)).flatten()
    if len(rows) == 0:
        return out.float()
    p_gen = out[rows].exp()
    p_spec = [lp[rows].double().log_softmax(dim=1).exp() for lp in spec_log_probs]
    masks = [active[rows, m].double()[:, None] for m in range(len(clusters))]
    own = [list(cl) for cl in clusters]
    rest = [_others(cl, c) for cl in clusters]
    fixed = p_gen.clone()  # the parts of the update that do not depend on q
    for p, mask, s in zip(p_spec, masks, own):
        fixed[:, s] += mask * p[:, :-1]
    weight = 1.0 + sum(masks)
    q = p_gen
    for _ in range(max_iter):
        new = fixed.clone()
        for p, mask, o in zip(p_spec, masks, rest):
            q_o = q[:, o]
            new[:, o] += mask * p[:, -1:] * q_o / q_o.sum(dim=1, keepdim=True).clamp_min(1e-300)
        new /= weight
        done = (new - q).abs().max() < tol
        q = new
        if done:
            break
    out[rows] = q.clamp_min(1e-300).log().log_softmax(dim=1)
    return out.float()


class SpecialistSystem:
    """A generalist and its specialists, combined as above; usable as a (frozen) teacher.

    ``logits`` returns log q: ``softmax(log q / T)`` is q sharpened or softened by T, as for any logits.
    """

    needs_inputs = True

    def __init__(self, generalist: nn.Module, specialists: Sequence[Specialist], top_k: int = 1, max_iter: int = 1000):
        self.generalist = freeze(generalist)
        self.specialists = list(specialists)
        for s in self.specialists:
            freeze(s.model)
        self.top_k = top_k
        self.max_iter = max_iter

    @property
    def clusters(self) -> list[tuple[int, ...]]:
        return [s.classes for s in self.specialists]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Generalist and specialist log-probabilities (T = 1) for inputs ``x``, on the CPU."""
        gen = F.log_softmax(predict_logits(self.generalist, x), dim=1)
        specs = [F.log_softmax(predict_logits(s.model, x), dim=1) for s in self.specialists]
        return gen, specs

    def combine(self, gen: torch.Tensor, specs: Sequence[torch.Tensor], top_k: int | None = None) -> torch.Tensor:
        """log q from precomputed outputs (lets a caller try several ``top_k`` without re-running models)."""
        active = active_specialists(gen, self.clusters, top_k or self.top_k)
        return combine_distributions(gen, specs, self.clusters, active, self.max_iter)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.outputs(x))

    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_probs(x).to(x.device)

    def predict(self, data: TensorData) -> torch.Tensor:
        return self.log_probs(data.x)

    def cache(self, data: TensorData) -> CachedTeacher:
        return CachedTeacher(data.index, self.predict(data))


class SpecialistModel(nn.Module):
    """A :class:`SpecialistSystem` as one ``nn.Module``: ``forward`` returns log q, as ``system.log_probs``.

    The generalist and the specialists are its submodules (the same objects, not copies), so its size and
    cost are the whole system's, e.g. in a deployment table. The combination is an iterative solve whose
    stopping depends on the data, which tracing (TorchScript, ONNX export) would freeze into a fixed
    number of steps computing another function; tracing is refused instead.
    """

    def __init__(self, system: SpecialistSystem) -> None:
        super().__init__()
        self.generalist = system.generalist
        self.specialist_nets = nn.ModuleList(s.model for s in system.specialists)
        self.clusters = system.clusters
        self.top_k, self.max_iter = system.top_k, system.max_iter
        self.spec = (f"{getattr(system.generalist, 'spec', None) or type(system.generalist).__name__} generalist "
                     f"+ {len(self.clusters)} specialist{'s' * (len(self.clusters) > 1)} (top-{self.top_k})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("SpecialistModel: the specialists' combination stops on a data-dependent test "
                               "and cannot be traced")
        gen = F.log_softmax(self.generalist(x).float(), dim=1)
        specs = [F.log_softmax(m(x).float(), dim=1) for m in self.specialist_nets]
        active = active_specialists(gen, self.clusters, self.top_k)
        return combine_distributions(gen, specs, self.clusters, active, self.max_iter)
