"""The soft-target loss kinds: one function per divergence, registered by name with :func:`register`.

Each kind is a pure function ``fn(s, t, temperature, **options) -> values`` of student logits ``s`` and
teacher logits ``t`` shaped (rows, classes), already in the working dtype (float64 where the device has
it, see :mod:`kdistill.losses`), returning one value per row (per position). :mod:`kdistill.losses`
does everything else -- shapes, masks, ``-100`` labels, averaging over valid positions, chunking,
detaching the teacher -- so a new kind is one decorated function::

    @register("my_kind", gamma=1.0)          # options and their defaults
    def my_kind(s, t, temperature, gamma):
        ...                                    # return a (rows,) tensor

With p = softmax(t / T) (teacher) and q = softmax(s / T) (student), the built-in kinds are ``kl``,
``reverse_kl``, ``jsd``, ``tv``, ``soft_ce``, ``logit_mse`` and ``prob_mse``. Why T^2: for the KL
family the gradient with respect to the student logits scales as 1/T^2 at high T (Hinton et al. 2015,
section 2), so multiplying by T^2 keeps its weight relative to the hard-label cross-entropy unchanged
when T changes. Every probability comes from ``log_softmax``, so logits of any magnitude give finite
values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Divergence:
    """A registered loss kind: its per-row function, its options' defaults and an optional check."""

    name: str
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    check: Callable[..., None] | None = None


REGISTRY: dict[str, Divergence] = {}


def register(name: str, *, check: Callable[..., None] | None = None, **defaults: float):
    """Decorator: register ``fn(s, t, temperature, **options)`` as loss kind ``name``.

    ``defaults`` names the kind's options (keyword arguments of ``soft_loss``/``distillation_loss``
    beyond the common ones) and their default values; ``check(**options)`` raises ``ValueError`` on a
    bad option value before any work starts.
    """

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in REGISTRY:
            raise ValueError(f"kind: {name!r} is already registered; pick another name")
        REGISTRY[name] = Divergence(name, fn, dict(defaults), check)
        return fn

    return decorate


class KindNames(Sequence):
    """A live, read-only view of the registered kinds' names (what ``LOSS_KINDS`` is).

    Membership, iteration and printing follow the registry, so a kind registered after import is
    accepted wherever ``LOSS_KINDS`` is checked; it compares equal to the tuple of names.
    """

    def __getitem__(self, index):
        return tuple(REGISTRY)[index]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in REGISTRY

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (Sequence, KindNames)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(REGISTRY))


KIND_NAMES = KindNames()


def resolve(kind: str, options: Mapping[str, float]) -> tuple[Divergence, dict[str, float]]:
    """The registered ``kind`` and its full options (defaults overridden by ``options``), checked."""
    if kind not in REGISTRY:
        raise ValueError(f"kind: {kind!r} is not one of {KIND_NAMES}")
    div = REGISTRY[kind]
    unknown = sorted(set(options) - set(div.defaults))
    if unknown:
        allowed = ", ".join(div.defaults) or "none"
        raise ValueError(f"{unknown[0]}: not an option of kind {kind!r} (its options: {allowed}); remove it")
    merged = {**div.defaults, **options}
    if div.check is not None:
        div.check(**merged)
    return div, merged


def _log_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(z / temperature, dim=-1)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, sum over the last dim of a (log a - log b); a = 0 contributes 0."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(dim=-1)


@register("kl")
def kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL, T^2 * KL(p || q): the teacher's mass weights the student's log-ratio (mode-covering).

    Temperature softens both distributions; T^2 applies (its gradient, T (q - p) / T^2 per unit of
    logit, scales as 1/T^2). This is Hinton et al.'s distillation loss and the default kind.
    """
    return _kl_rows(_log_probs(t, temperature), _log_probs(s, temperature)) * (temperature * temperature)


@register("reverse_kl")
def reverse_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reverse KL, T^2 * KL(q || p): the student's own mass weights the log-ratio (mode-seeking).

    Temperature softens both distributions; T^2 applies, as for ``kl`` (an f-divergence, locally the
    same quadratic form, so its gradient also scales as 1/T^2). MiniLLM and GKD (beta = 1) use it.
    """
    return _kl_rows(_log_probs(s, temperature), _log_probs(t, temperature)) * (temperature * temperature)


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta: the jsd interpolation weight must be a number in [0, 1], got {beta!r}")


@register("jsd", check=_check_beta, beta=0.5)
def jsd(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence, T^2 * (beta KL(p || m) + (1 - beta) KL(q || m)).

    m = beta p + (1 - beta) q; ``beta`` weights the teacher p, as ``beta`` in TRL's ``GKDTrainer``
    (``generalized_jsd_loss``: ``beta * kl_teacher + (1 - beta) * kl_student``, mixture
    ``beta * teacher + (1 - beta) * student``); beta = 0.5 is the symmetric JSD (<= log 2 before T^2).
    As beta -> 0 or 1 the mixture collapses onto one side and the value vanishes (its gradient, divided
    by beta or 1 - beta, tends to forward or reverse KL), so, as TRL does, beta = 0 returns ``kl`` and
    beta = 1 returns ``reverse_kl`` exactly. log m is a logaddexp of log-probabilities (stable for any
    logits). Temperature softens both distributions; T^2 applies (an f-divergence: gradient ~ 1/T^2).
    """
    if beta == 0.0:
        return kl(s, t, temperature)
    if beta == 1.0:
        return reverse_kl(s, t, temperature)
    log_q, log_p = _log_probs(s, temperature), _log_probs(t, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    value = beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    return value * (temperature * temperature)


@register("tv")
def tv(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Total variation distance, 1/2 * sum |p - q|, in [0, 1]; no T^2.

    Temperature softens both distributions. Unlike the KL family, TV is not locally quadratic: near
    p = q its value and gradient scale as 1/T, not 1/T^2, so a T^2 factor would make it grow with T;
    it is left unscaled (as ``prob_mse``), a bounded distance whose weight you set with alpha.
    """
    q, p = _log_probs(s, temperature).exp(), _log_probs(t, temperature).exp()
    return 0.5 * (q - p).abs().sum(dim=-1)


@register("soft_ce")
def soft_ce(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft cross-entropy, T^2 * -sum p log q: ``kl`` plus the teacher's entropy, so the same gradient.

    Temperature softens both distributions; T^2 applies, as for ``kl``.
    """
    log_q, log_p = _log_probs(s, temperature), _log_probs(t, temperature)
    return -(log_p.exp() * log_q).sum(dim=-1) * (temperature * temperature)


@register("logit_mse")
def logit_mse(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logit matching (Caruana; Ba & Caruana 2014): mean over classes of (s - t)^2.

    Temperature does not enter and there is no T^2: the logits are compared directly (this is the
    high-T limit that T^2 * KL approaches, up to a 1/(2 C) factor and the logits' row means).
    """
    return (s - t).square().mean(dim=-1)


@register("prob_mse")
def prob_mse(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over classes of (q - p)^2; no T^2 (kept as it always was, so existing runs do not move).

    Temperature softens both distributions. At high T, q - p ~ (s - t) / (C T), so its value and
    gradient shrink as 1/T^2 like the KL family's; it has never carried the T^2 factor that would undo
    this, and adding it now would change existing runs: scale alpha by T^2 yourself if you want it.
    """
    q, p = _log_probs(s, temperature).exp(), _log_probs(t, temperature).exp()
    return (q - p).square().mean(dim=-1)
