"""What the recipes share: the KD method of a grid point, choosing on validation, and the results tail.

A recipe reads like its paper's paragraph: a declared grid, named stages (train the teacher, train the
student alone, distil, choose on validation, summarise) and one tail that writes ``results.json`` /
``results.md`` and the deployment table. Choosing on validation always goes through
:func:`kdistill.sweeps.grid.choose_best`, whose one tie-break rule is: **equal validation scores go to the
setting that comes first**, so each recipe lists its candidates in its order of preference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.experiments import RunContext
from kdistill.outputs.results import write_results
from kdistill.sweeps.grid import choose_best


def kd(temperature: float, alpha: float = 1.0, kind: str | None = None) -> dict[str, Any]:
    """The ``method=`` of a KD student: soft targets at ``temperature``, weight ``alpha`` (0: hard labels);
    ``kind``: the soft term (``kl`` when not given; ``soft_ce``, ``logit_mse``, ... see :mod:`kdistill.losses`)."""
    return {"name": "kd", "temperature": temperature, "alpha": alpha, **({"kind": kind} if kind else {})}


def choose_on_validation(val_errors: Mapping[Any, float], by: Sequence[str]) -> Any:
    """The candidate with the fewest validation errors, by :func:`~kdistill.sweeps.grid.choose_best`.

    ``val_errors`` maps each candidate (a tuple of the values of the fields ``by``, or the value itself
    when ``by`` names one field) to its validation errors, in the order of preference: ties go to the
    candidate that comes first. Returns the chosen key.
    """
    by = list(by)
    records = []
    for key, errors in val_errors.items():
        values = key if len(by) > 1 else (key,)
        if len(values) != len(by):
            raise ValueError(f"choose_on_validation: candidate {key!r} does not have the fields {by}")
        records.append({**dict(zip(by, values)), "val_errors": errors})
    best = choose_best(records, by, "val_errors", higher_is_better=False)
    chosen = tuple(best[k] for k in by)
    return chosen if len(by) > 1 else chosen[0]


def finish(
    ctx: RunContext, name: str, models: dict[str, Any], markdown: str, extra: dict[str, Any] | None,
    shown: dict[str, nn.Module], test: TensorData,
) -> dict[str, Any]:
    """The results tail: ``results.json``/``results.md`` with ``models`` and ``extra``, then the deployment
    table of ``shown`` (teacher first) measured on ``test``; returns the results."""
    results = write_results(ctx.out, name, ctx.profile, ctx.elapsed, models, markdown, extra=extra)
    return ctx.deployment(shown, test, results)
