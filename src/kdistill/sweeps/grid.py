"""Sweep bookkeeping: grids of settings, flat per-run records, choices made on validation, seed summaries.

A sweep's results are a list of flat *records*, one per trained model: the setting's fields (``T``,
``alpha``, ``width`` ...), ``seed``, and metrics named ``val_*`` / ``test_*``. Everything here is a pure
function of such lists, so the experiments stay short and the bookkeeping is tested on its own.

:func:`choose_best` refuses any metric that is not a validation metric: settings are never picked on test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kdistill.outputs.results import summarize

Record = dict[str, Any]

TEACHER_SEED_OFFSET = 1000
"""Teachers are seeded ``seed + TEACHER_SEED_OFFSET``: a student with the teacher's seed and architecture would
start from the teacher's initial weights and see its batches in the same order."""


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest.

    >>> grid(T=[1, 4], alpha=[0.5])
    [{'T': 1, 'alpha': 0.5}, {'T': 4, 'alpha': 0.5}]
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"{name}: a sweep axis must be a list of values, got {values!r}")  # noqa: TRY004
        if len(list(values)) == 0:
            raise ValueError(f"{name}: a sweep axis needs at least one value")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(axes[n]) for n in names))]


def seed_list(first: int, count: int) -> list[int]:
    """``count`` consecutive seeds starting at ``first``."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"seeds: need an integer >= 1, got {count!r}")
    return [first + i for i in range(count)]


def label(setting: Mapping[str, Any]) -> str:
    """A stable, readable key for a setting: ``T=4,alpha=0.5`` (used as JSON keys and plot labels)."""
    return ",".join(f"{k}={v}" for k, v in setting.items())


def select(records: Iterable[Record], **where: Any) -> list[Record]:
    """The records whose fields equal every ``where`` value."""
    return [r for r in records if all(k in r and r[k] == v for k, v in where.items())]


def group(records: Iterable[Record], by: Sequence[str]) -> dict[tuple, list[Record]]:
    """Records grouped by the values of the fields ``by``, groups in order of first appearance."""
    out: dict[tuple, list[Record]] = {}
    for r in records:
        missing = [k for k in by if k not in r]
        if missing:
            raise ValueError(f"record {r!r} lacks field(s) {missing} to group by")
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    return out


def aggregate(records: Iterable[Record], by: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group of ``by``: its fields, ``n`` (records) and ``{"mean","std","values"}`` per metric."""
    rows = []
    for key, members in group(records, by).items():
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = len(members)
        for m in metrics:
            vals = [r[m] for r in members if r.get(m) is not None]
            if vals:
                row[m] = summarize(vals)
        rows.append(row)
    return rows


def mean_of(records: Iterable[Record], metric: str) -> float:
    vals = [float(r[metric]) for r in records if r.get(metric) is not None]
    if not vals:
        raise ValueError(f"no record has metric {metric!r}")
    return sum(vals) / len(vals)


def _is_validation_metric(metric: str) -> bool:
    return metric.startswith("val_")


def choose_best(
    records: Iterable[Record],
    by: Sequence[str],
    metric: str,
    *,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """The setting (fields ``by``) whose records have the best mean ``metric`` over seeds: every recipe's one
    way to choose on validation.

    ``metric`` must be a validation metric (its name starts with ``val_``): a choice made on test data
    would make the test numbers optimistic. **Tie-break rule** (the only one in the project): equal means go
    to the setting whose records come first, so a recipe declares its grid in order of preference (the
    plainer setting first: lower T, lower lambda, the default before the variant).
    """
    if not _is_validation_metric(metric):
        raise ValueError(f"metric: settings are chosen on validation metrics (val_*), not {metric!r}")
    groups = group(records, by)
    if not groups:
        raise ValueError("choose_best: no records to choose from")
    scored = []
    for order, (key, members) in enumerate(groups.items()):
        setting = dict(zip(by, key))
        score = mean_of(members, metric)
        if math.isnan(score):
            continue
        primary = -score if higher_is_better else score
        scored.append((primary, order, setting))
    if not scored:
        raise ValueError(f"choose_best: every setting's {metric} is NaN")
    return min(scored, key=lambda s: s[:2])[2]


def within_noise(
    records: Iterable[Record], by: Sequence[str], metric: str, *, higher_is_better: bool = True
) -> list[dict[str, Any]]:
    """The settings whose mean ``metric`` is within one seed standard deviation of the best setting's mean.

    With a single seed per setting there is no spread to go by, and only the best setting is returned.
    """
    if not _is_validation_metric(metric):
        raise ValueError(f"metric: settings are chosen on validation metrics (val_*), not {metric!r}")
    rows = aggregate(records, by, [metric])
    rows = [r for r in rows if metric in r]
    if not rows:
        raise ValueError("within_noise: no records to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best = max(rows, key=lambda r: sign * r[metric]["mean"])
    spread = best[metric]["std"]
    return [{k: r[k] for k in by} for r in rows if sign * (best[metric]["mean"] - r[metric]["mean"]) <= spread + 1e-12]


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """Align ``(step, value)`` curves of several seeds on their common steps: steps, means, stds."""
    if not curves:
        raise ValueError("mean_curve: no curves")
    common = {s for s, _ in curves[0]}
    for c in curves[1:]:
        common &= {s for s, _ in c}
    steps = sorted(common)
    lookups = [dict(c) for c in curves]
    means, stds = [], []
    for s in steps:
        summary = summarize([lk[s] for lk in lookups])
        means.append(summary["mean"])
        stds.append(summary["std"])
    return steps, means, stds


def first_step_reaching(steps: Sequence[float], values: Sequence[float], threshold: float) -> float | None:
    """The first step at which ``values`` reaches ``threshold`` (None if it never does)."""
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length: {len(steps)} vs {len(values)}")
    for s, v in zip(steps, values):
        if v >= threshold:
            return s
    return None


def curve_mean_until(steps: Sequence[float], values: Sequence[float], last_step: float) -> float:
    """Mean of ``values`` over the points with step <= ``last_step`` (how fast a curve rose, in one number)."""
    picked = [v for s, v in zip(steps, values) if s <= last_step]
    if not picked:
        raise ValueError(f"no curve point at or before step {last_step}")
    return sum(picked) / len(picked)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"rank_correlation: need two equally long sequences of >= 2 values, got {len(x)}, {len(y)}")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return float("nan")
    return cov / math.sqrt(vx * vy)


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads (None: leave as is), restoring the old count after.

    Sweeps of many tiny nets gain nothing from more threads, and on a busy machine threads that wait on
    each other cost far more than they save.
    """
    import torch

    if count is None:
        yield
        return
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"threads: a positive integer or null, got {count!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
