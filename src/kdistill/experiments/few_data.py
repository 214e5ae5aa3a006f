"""Hinton, Vinyals & Dean (2015), section 6: soft targets as a regulariser.

A stratified 3% of the training set is kept. The same architecture is trained on it three ways, each with
the same epochs, optimiser and early stopping on the validation split:

* ``hard-small``: on the hard labels of the 3%;
* ``soft-small``: on the soft targets, for the same 3%, of a teacher trained on all the data (by default
  the ``hard-all`` model of the same seed, as in the paper), T and the soft weight chosen on validation;
* ``hard-all``: on the hard labels of all the training data.

The paper (speech): 44.5% with hard targets on 3% (even with early stopping), 57.0% with soft targets,
58.9% with hard targets on all the data, i.e. soft targets recover 87% of the gap. The target here is 70%.
A sweep over the fraction (1% ... 100%) shows where soft targets stop mattering.

Small training sets are repeated so that one epoch has at least ``min_epoch_samples`` samples: every run
then gets a comparable number of steps, and hard and soft students of one fraction get exactly the same.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data.dataset import TensorData
from kdistill.engine.evaluate import predict_logits
from kdistill.models import build_model
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize, write_results
from kdistill.teachers.base import CachedTeacher
from kdistill.engine import FitResult, TrainConfig, fit
from kdistill.experiments import RunContext

NAME = "few-data"
DESCRIPTION = "Soft targets as a regulariser: 3% of the data with hard vs soft targets vs all the data; fraction sweep"

_COMMON: dict[str, Any] = {
    "dataset": "mnist",
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "lr": 0.05,
    "fraction": 0.03,
    "sweep": [0.01, 0.03, 0.1, 0.3, 1.0],
    "teacher": "",  # empty: the hard-all model of the same seed is the teacher
    "target_recovered": 0.7,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "student": "mlp:256", "epochs": 10, "min_epoch_samples": 8000, "seeds": 3, "sweep_seeds": 1,
              "temperatures": [4.0, 10.0], "alphas": [1.0]},
    "full": {**_COMMON, "student": "mlp:800,800", "epochs": 20, "min_epoch_samples": 11000, "seeds": 3, "sweep_seeds": 3,
             "temperatures": [4.0, 10.0, 20.0], "alphas": [1.0, 0.9]},
}


def _repeat(data: TensorData, min_samples: int) -> TensorData:
    """``data`` repeated whole until it has at least ``min_samples`` rows (ids repeat with it)."""
    times = max(1, math.ceil(min_samples / len(data)))
    return data if times == 1 else data.subset(torch.arange(len(data)).repeat(times))


def _config(s: dict[str, Any], seed: int, temperature: float = 1.0, alpha: float = 1.0) -> TrainConfig:
    return TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=seed, temperature=temperature,
                       alpha=alpha, keep_best=True, checkpoint=False)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    if not 0 < s["fraction"] < 1 or any(not 0 < f <= 1 for f in s["sweep"]):
        raise ValueError(f"fraction: must be in (0, 1) and sweep values in (0, 1], got {s['fraction']}, {s['sweep']}")
    bundle = kdata.load(s["dataset"], val_size=s["val_size"], seed=s["seed"],
                        **({"path": ctx.data_path} if ctx.data_path else {}))
    train, val, test = bundle.train, bundle.val, bundle.test
    shape, classes = bundle.input_shape, train.num_classes
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    ctx.log(f"{s['dataset']}: {len(train)} train, {len(val)} validation; student {s['student']}, seeds {seeds}")

    def student(seed: int) -> torch.nn.Module:
        return build_model(s["student"], shape, classes, seed=seed)

    def subset(fraction: float, seed: int) -> TensorData:
        part = train if fraction >= 1 else kdata.stratified_fraction(train, fraction, seed)
        return _repeat(part, s["min_epoch_samples"])

    hard_all: dict[int, FitResult] = {}
    teachers: dict[int, CachedTeacher] = {}
    first_teacher: torch.nn.Module | None = None  # the first seed's, for the deployment table
    for seed in seeds:
        hard_all[seed] = fit(student(seed), train, _config(s, seed), val=val, test=test, progress=ctx.progress)
        teacher_model = hard_all[seed].model
        if s["teacher"]:
            teacher_model = fit(build_model(s["teacher"], shape, classes, seed=seed), train, _config(s, seed),
                                val=val, test=test, progress=ctx.progress).model
        teachers[seed] = CachedTeacher(train.index, predict_logits(teacher_model, train.x))
        if first_teacher is None:
            first_teacher = teacher_model
        ctx.log(f"seed {seed}: hard-all {hard_all[seed].test['errors']} test errors")

    def hard(fraction: float, seed: int) -> FitResult:
        return fit(student(seed), subset(fraction, seed), _config(s, seed), val=val, test=test, progress=ctx.progress)

    def soft(fraction: float, seed: int, temperature: float, alpha: float) -> FitResult:
        return fit(student(seed), subset(fraction, seed), _config(s, seed, temperature, alpha), teacher=teachers[seed],
                   val=val, test=test, progress=ctx.progress)

    # T and the soft weight, on validation, first seed, main fraction.
    grid = list(itertools.product(s["temperatures"], s["alphas"]))
    by_choice = {c: soft(s["fraction"], seeds[0], *c) for c in grid}
    for c, r in by_choice.items():
        ctx.log(f"soft {100 * s['fraction']:g}% T={c[0]} alpha={c[1]}: {r.val['errors']} validation errors")
    chosen = min(grid, key=lambda c: (by_choice[c].val["errors"], grid.index(c)))

    runs: dict[tuple[str, float, int], FitResult] = {}
    frac = s["fraction"]
    for seed in seeds:
        runs[("hard", frac, seed)] = hard(frac, seed)
        runs[("soft", frac, seed)] = by_choice[chosen] if seed == seeds[0] else soft(frac, seed, *chosen)
        ctx.log(f"seed {seed}, {100 * frac:g}%: hard {runs[('hard', frac, seed)].test['errors']}, "
                f"soft {runs[('soft', frac, seed)].test['errors']} test errors")
    for f in s["sweep"]:
        for seed in seeds[: s["sweep_seeds"]]:
            if ("hard", f, seed) not in runs:
                runs[("hard", f, seed)] = hard_all[seed] if f >= 1 else hard(f, seed)
            if ("soft", f, seed) not in runs:
                runs[("soft", f, seed)] = soft(f, seed, *chosen)
            ctx.log(f"sweep {100 * f:g}% seed {seed}: hard {runs[('hard', f, seed)].test['errors']}, "
                    f"soft {runs[('soft', f, seed)].test['errors']} test errors")

    acc = {k: r.test["accuracy"] for k, r in runs.items()}
    hard_small = [acc[("hard", frac, sd)] for sd in seeds]
    soft_small = [acc[("soft", frac, sd)] for sd in seeds]
    full = [hard_all[sd].test["accuracy"] for sd in seeds]
    gap = sum(full) / len(full) - sum(hard_small) / len(hard_small)
    recovered = (sum(soft_small) / len(soft_small) - sum(hard_small) / len(hard_small)) / gap if gap > 0 else float("nan")
    per_seed = [(sf - hs) / (fl - hs) if fl > hs else float("nan") for sf, hs, fl in zip(soft_small, hard_small, full)]

    sweep = {}
    for f in s["sweep"]:
        sweep[str(f)] = {kind: summarize([acc[(kind, f, sd)] for sd in seeds[: s["sweep_seeds"]]])
                         for kind in ("hard", "soft")}
    _plot(s, sweep, summarize(full), ctx.out / "few_data.png")

    pct = f"{100 * frac:g}%"
    models = {
        f"hard-{pct}": {**role_metrics([runs[("hard", frac, sd)].test for sd in seeds]), "spec": s["student"],
                        "best_epochs": [runs[("hard", frac, sd)].best_epoch for sd in seeds]},
        f"soft-{pct}": {**role_metrics([runs[("soft", frac, sd)].test for sd in seeds]), "spec": s["student"],
                        "best_epochs": [runs[("soft", frac, sd)].best_epoch for sd in seeds]},
        "hard-all": {**role_metrics([hard_all[sd].test for sd in seeds]), "spec": s["student"]},
    }
    sweep_rows = "\n".join(
        f"| {100 * float(f):g}% | {100 * v['hard']['mean']:.2f} ± {100 * v['hard']['std']:.2f} | "
        f"{100 * v['soft']['mean']:.2f} ± {100 * v['soft']['std']:.2f} |" for f, v in sweep.items()
    )
    grid_rows = "\n".join(f"| {t} | {a} | {by_choice[(t, a)].val['errors']} |{' chosen |' if (t, a) == chosen else ' |'}"
                          for t, a in grid)
    md = f"""
Paper (speech): hard targets on 3%: 44.5%, soft targets on 3%: 57.0%, hard targets on all: 58.9% (87% of the gap).

`{s['student']}` on {s['dataset']}, {s['epochs']} epochs (small sets repeated to >= {s['min_epoch_samples']} samples
per epoch), the same optimiser, and the best validation epoch kept, for every student. Teacher:
{'the hard-all model of the same seed' if not s['teacher'] else f"`{s['teacher']}` trained on all the data"}.
Seeds {seeds} (the seed also draws the stratified subset).

Test accuracy — hard {pct}: {fmt(models[f'hard-{pct}']['test_accuracy'], 4)}, soft {pct}:
{fmt(models[f'soft-{pct}']['test_accuracy'], 4)}, hard all: {fmt(models['hard-all']['test_accuracy'], 4)}.
**Soft targets recover {100 * recovered:.0f}% of the gap** (of the means; per seed:
{', '.join(f'{100 * r:.0f}%' for r in per_seed)}); target {100 * s['target_recovered']:.0f}%:
{'met' if recovered >= s['target_recovered'] else 'not met'}.

Choice on validation ({pct}, seed {seeds[0]}):

| T | alpha (soft weight) | validation errors | |
|---|---|---|---|
{grid_rows}

Fraction sweep (test accuracy %, {s['sweep_seeds']} seed(s); 100% "hard" is hard-all, "soft" is distilled on all the data):

| fraction | hard | soft |
|---|---|---|
{sweep_rows}

![fraction sweep](few_data.png)
"""
    results = write_results(
        ctx.out, NAME, ctx.profile, ctx.elapsed, models, md,
        extra={"recovered_share_of_gap": recovered, "recovered_by_seed": per_seed,
               "target_met": bool(recovered >= s["target_recovered"]),
               "chosen": {"temperature": chosen[0], "alpha": chosen[1]},
               "validation_errors": {f"T={t}, alpha={a}": by_choice[(t, a)].val["errors"] for t, a in grid},
               "sweep": sweep, "threads": torch.get_num_threads()},
    )
    # The first seed's models: the teacher (trained on all the data), the soft-target student chosen on
    # validation and the same student on the hard labels of the same subset.
    teacher_name = (f"teacher {s['teacher']} (hard, all data)" if s["teacher"]
                    else f"teacher {s['student']} (hard-all)")
    shown = {
        teacher_name: first_teacher,
        f"distilled {s['student']} (soft-{pct}, T={chosen[0]:g}, alpha={chosen[1]:g})": by_choice[chosen].model,
        f"student alone {s['student']} (hard-{pct})": runs[("hard", frac, seeds[0])].model,
    }
    return ctx.deployment(shown, test, results)


def _plot(s: dict[str, Any], sweep: dict[str, Any], full: dict[str, Any], path) -> None:
    import matplotlib.pyplot as plt

    fracs = [float(f) for f in sweep]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for kind, colour in (("hard", "#999999"), ("soft", "#cc6677")):
        means = [100 * sweep[f][kind]["mean"] for f in sweep]
        stds = [100 * sweep[f][kind]["std"] for f in sweep]
        ax.errorbar([100 * f for f in fracs], means, yerr=stds, marker="o", capsize=3, color=colour,
                    label=f"{kind} targets on the fraction")
    ax.axhline(100 * full["mean"], color="black", linestyle="--", linewidth=1, label="hard targets on all the data")
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{s['dataset']}: `{s['student']}`, soft targets from a teacher trained on all the data", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
