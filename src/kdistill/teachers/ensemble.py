"""Ensembles of teachers, used as one teacher (Hinton et al. 2015, section 4).

The soft targets of an ensemble are a mean of its members' predictive distributions at temperature T
(per-position outputs (B, L, C), a language model's tokens or a speech model's frames, at each position):

* ``geometric``: the renormalised geometric mean, ``∝ Π_k p_k^(1/K)``. Since ``p_k ∝ exp(z_k / T)``, this
  equals ``softmax(mean_k z_k / T)``: averaging the members' *logits* gives targets that are exact at
  **every** temperature (equivalently, average the log-probabilities and renormalise).
* ``arithmetic``: ``mean_k softmax(z_k / T)``. A mixture of softmaxes is in general not the softmax of any
  fixed logits at all temperatures, so the ensemble **combines at its own temperature** ``T`` (stored on
  the object) and returns ``T · log(mixture)``; ``softmax(returned / T)`` is then exactly the mixture.
  Distil with the KD method's ``temperature`` equal to the ensemble's ``temperature`` (the trainer cannot check
  this for you; :meth:`EnsembleTeacher.at_temperature` makes a copy for another T). For the distribution at
  any T without that contract, use :meth:`EnsembleTeacher.log_probs` / :meth:`EnsembleTeacher.probs`.

Members are ``nn.Module`` s (wrapped, frozen, in :class:`ModuleTeacher`) or any teacher (cached, ONNX,
saved logits, another ensemble). When the transfer set is not augmented, :meth:`EnsembleTeacher.cache`
computes the combined logits once per sample and returns a :class:`CachedTeacher` keyed by sample id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.teachers.logits_files import run_teacher
from kdistill.data.dataset import TensorData
from kdistill.teachers.base import CachedTeacher, ModuleTeacher, Teacher

MEANS = ("arithmetic", "geometric")
POSITION_CHUNK = 256
"""Windows of per-position data combined at a time by :meth:`EnsembleTeacher.predict`."""


def _check(mean: str, temperature: float) -> None:
    if mean not in MEANS:
        raise ValueError(f"mean: must be one of {MEANS}, got {mean!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


def combine_log_probs(member_logits: torch.Tensor, mean: str = "arithmetic", temperature: float = 1.0) -> torch.Tensor:
    """Log of the ensemble distribution at ``temperature`` from stacked member logits: K x N x C, or
    K x N x L x C (any number of position dimensions) for per-position outputs, combined at each position."""
    _check(mean, temperature)
    if member_logits.dim() < 3 or member_logits.shape[0] < 1:
        raise ValueError(f"member_logits: need K x N x C (or K x N x L x C) with K >= 1, got shape "
                         f"{tuple(member_logits.shape)}")
    z = member_logits.double() / temperature
    if mean == "geometric":
        return F.log_softmax(z.mean(dim=0), dim=-1).float()
    log_p = F.log_softmax(z, dim=-1)
    return (torch.logsumexp(log_p, dim=0) - math.log(member_logits.shape[0])).float()


def combine_logits(member_logits: torch.Tensor, mean: str = "arithmetic", temperature: float = 1.0) -> torch.Tensor:
    """Logits ``L`` with ``softmax(L / temperature)`` = the ensemble distribution at ``temperature``.

    For ``geometric`` this is the members' mean logit (up to a per-row constant): exact at every T.
    """
    return temperature * combine_log_probs(member_logits, mean, temperature)


class EnsembleTeacher:
    """K teachers combined into one (see the module docstring for the temperature contract)."""

    def __init__(
        self, members: Sequence[nn.Module | Teacher], mean: str = "arithmetic", temperature: float = 1.0
    ) -> None:
        _check(mean, temperature)
        if len(members) == 0:
            raise ValueError("members: an ensemble needs at least one member")
        wrapped: list[Teacher] = []
        for i, m in enumerate(members):
            if isinstance(m, nn.Module):
                m = ModuleTeacher(m)
            if not (hasattr(m, "logits") and hasattr(m, "needs_inputs")):
                raise ValueError(f"members[{i}]: {type(m).__name__} is neither an nn.Module nor a teacher")
            wrapped.append(m)
        self.members = wrapped
        self.mean = mean
        self.temperature = float(temperature)
        self.needs_inputs = any(m.needs_inputs for m in wrapped)

    def __len__(self) -> int:
        return len(self.members)

    def to(self, device: torch.device | str) -> "EnsembleTeacher":
        """Move every member that can move to ``device`` (where the student trains)."""
        for m in self.members:
            if hasattr(m, "to"):
                m.to(device)
        return self

    def at_temperature(self, temperature: float) -> "EnsembleTeacher":
        """The same members and mean, combining at ``temperature``."""
        return EnsembleTeacher(self.members, self.mean, temperature)

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """K x B x C logits of the members for one batch."""
        out = [m.logits(x, ids).float() for m in self.members]
        classes = {o.shape[-1] for o in out}
        if len(classes) != 1:
            raise ValueError(f"members: disagree on the number of classes {sorted(classes)}")
        device = x.device if x is not None else out[0].device
        return torch.stack([o.to(device) for o in out])

    def log_probs(self, x: torch.Tensor, ids: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        """Log of the combined distribution at ``temperature`` (default: the ensemble's own)."""
        return combine_log_probs(self.member_logits(x, ids), self.mean, temperature or self.temperature)

    def probs(self, x: torch.Tensor, ids: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        return self.log_probs(x, ids, temperature).exp()

    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``T · log p_ensemble`` at the stored temperature T (the Teacher protocol)."""
        return self.temperature * self.log_probs(x, ids)

    def predict_members(self, data: TensorData, batch_size: int = 2048) -> torch.Tensor:
        """K x N x C member logits for every sample of ``data`` (on the CPU)."""
        out = [run_teacher(m, data, batch_size) for m in self.members]
        classes = {o.shape[-1] for o in out}
        if len(classes) != 1:
            raise ValueError(f"members: disagree on the number of classes {sorted(classes)}")
        return torch.stack(out)

    def predict(self, data: TensorData, batch_size: int = 2048) -> torch.Tensor:
        """Combined logits (as :meth:`logits`) for every sample of ``data``, in order. Per-position data is
        combined ``POSITION_CHUNK`` windows at a time, so the K members' (N, L, V) logits are never all held."""
        if data.y.dim() < 2:
            return combine_logits(self.predict_members(data, batch_size), self.mean, self.temperature)
        parts = [combine_logits(self.predict_members(data.subset(torch.arange(i, min(i + POSITION_CHUNK, len(data)))),
                                                     batch_size), self.mean, self.temperature)
                 for i in range(0, len(data), POSITION_CHUNK)]
        return torch.cat(parts)

    def cache(self, data: TensorData) -> CachedTeacher:
        """The combined logits over ``data`` looked up by sample id: for un-augmented transfer sets."""
        cached = CachedTeacher(data.index, self.predict(data))
        cached.teachers = len(self.members)  # recorded in a checkpoint, so --resume can name another count
        return cached


class EnsembleModel(nn.Module):
    """K networks as one ``nn.Module``: ``forward`` is the log of their ``mean`` distribution at T = 1.

    That is the ensemble as a classifier (:func:`combine_log_probs` of the members' logits at T = 1), in a
    form that can be counted, saved, exported and timed like any model, e.g. for a deployment table.
    Its size and cost are those of all its members together.
    """

    def __init__(self, members: Sequence[nn.Module], mean: str = "arithmetic") -> None:
        super().__init__()
        _check(mean, 1.0)
        if len(members) == 0:
            raise ValueError("members: an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.mean = mean
        specs = sorted({str(getattr(m, "spec", None) or type(m).__name__) for m in members})
        self.spec = f"ensemble of {len(members)} x {' + '.join(specs)} ({mean} mean)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_log_probs(torch.stack([m(x).float() for m in self.members]), self.mean, 1.0)
