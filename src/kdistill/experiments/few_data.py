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
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data.dataset import TensorData
from kdistill.engine.evaluate import predict_logits
from kdistill.models import build_model
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize
from kdistill.teachers.base import CachedTeacher
from kdistill.engine import FitResult, TrainConfig, fit
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import choose_on_validation, finish, kd

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


def _config(s: dict[str, Any], seed: int) -> TrainConfig:
    """Every student's recipe: the same epochs and optimiser, the best validation epoch kept."""
    return TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=seed, keep_best=True,
                       checkpoint=False)


@dataclass
class _Students:
    """The data, the teachers (one per seed, once trained) and the three ways of training the student."""

    s: dict[str, Any]
    ctx: RunContext
    bundle: Any
    teachers: dict[int, CachedTeacher] = field(default_factory=dict)

    def student(self, seed: int) -> torch.nn.Module:
        return build_model(self.s["student"], self.bundle.input_shape, self.bundle.train.num_classes, seed=seed)

    def subset(self, fraction: float, seed: int) -> TensorData:
        train = self.bundle.train
        part = train if fraction >= 1 else kdata.stratified_fraction(train, fraction, seed)
        return _repeat(part, self.s["min_epoch_samples"])

    def fit(self, model: torch.nn.Module, data: TensorData, seed: int, **kw: Any) -> FitResult:
        return fit(model, data, _config(self.s, seed), val=self.bundle.val, test=self.bundle.test,
                   progress=self.ctx.progress, **kw)

    def hard(self, fraction: float, seed: int) -> FitResult:
        """The student on the hard labels of ``fraction`` of the training set."""
        return self.fit(self.student(seed), self.subset(fraction, seed), seed)

    def soft(self, fraction: float, seed: int, temperature: float, alpha: float) -> FitResult:
        """The student on the seed's teacher's soft targets for the same ``fraction``."""
        return self.fit(self.student(seed), self.subset(fraction, seed), seed, teacher=self.teachers[seed],
                        method=kd(temperature, alpha))


def _train_on_all(st: _Students, seeds: list[int]) -> tuple[dict[int, FitResult], torch.nn.Module]:
    """``hard-all`` per seed, and each seed's teacher trained on all the data (by default that same model),
    its logits on the training set cached; returns hard-all and the first seed's teacher."""
    s, train = st.s, st.bundle.train
    hard_all: dict[int, FitResult] = {}
    first_teacher = None
    for seed in seeds:
        hard_all[seed] = st.fit(st.student(seed), train, seed)
        teacher_model = hard_all[seed].model
        if s["teacher"]:
            teacher_model = st.fit(build_model(s["teacher"], st.bundle.input_shape, train.num_classes, seed=seed),
                                   train, seed).model
        st.teachers[seed] = CachedTeacher(train.index, predict_logits(teacher_model, train.x))
        if first_teacher is None:
            first_teacher = teacher_model
        st.ctx.log(f"seed {seed}: hard-all {hard_all[seed].test['errors']} test errors")
    return hard_all, first_teacher


def _choose_soft(st: _Students, seed: int) -> tuple[dict[tuple[float, float], FitResult], tuple[float, float]]:
    """T and the soft weight, on validation, with the first seed at the main fraction: every grid point
    (``temperatures`` x ``alphas``, in that order of preference) trained; returns them and the choice."""
    s = st.s
    by_choice = {c: st.soft(s["fraction"], seed, *c) for c in itertools.product(s["temperatures"], s["alphas"])}
    for c, r in by_choice.items():
        st.ctx.log(f"soft {100 * s['fraction']:g}% T={c[0]} alpha={c[1]}: {r.val['errors']} validation errors")
    chosen = choose_on_validation({c: r.val["errors"] for c, r in by_choice.items()}, ["temperature", "alpha"])
    return by_choice, chosen


def _hard_and_soft(st: _Students, seeds: list[int], hard_all: dict[int, FitResult], first_soft: FitResult,
                   chosen: tuple[float, float]) -> dict[tuple[str, float, int], FitResult]:
    """Hard and soft students of the main fraction over every seed, then of each sweep fraction over the
    sweep seeds (100% hard is hard-all); the chosen first-seed soft student is reused."""
    s, frac = st.s, st.s["fraction"]
    runs: dict[tuple[str, float, int], FitResult] = {}
    for seed in seeds:
        runs[("hard", frac, seed)] = st.hard(frac, seed)
        runs[("soft", frac, seed)] = first_soft if seed == seeds[0] else st.soft(frac, seed, *chosen)
        st.ctx.log(f"seed {seed}, {100 * frac:g}%: hard {runs[('hard', frac, seed)].test['errors']}, "
                   f"soft {runs[('soft', frac, seed)].test['errors']} test errors")
    for f in s["sweep"]:
        for seed in seeds[: s["sweep_seeds"]]:
            if ("hard", f, seed) not in runs:
                runs[("hard", f, seed)] = hard_all[seed] if f >= 1 else st.hard(f, seed)
            if ("soft", f, seed) not in runs:
                runs[("soft", f, seed)] = st.soft(f, seed, *chosen)
            st.ctx.log(f"sweep {100 * f:g}% seed {seed}: hard {runs[('hard', f, seed)].test['errors']}, "
                       f"soft {runs[('soft', f, seed)].test['errors']} test errors")
    return runs


def _recovered(runs, hard_all, seeds: list[int], frac: float) -> tuple[float, list[float]]:
    """The share of the hard-small -> hard-all accuracy gap that soft targets recover: of the means, and per seed."""
    acc = {k: r.test["accuracy"] for k, r in runs.items()}
    hard_small = [acc[("hard", frac, sd)] for sd in seeds]
    soft_small = [acc[("soft", frac, sd)] for sd in seeds]
    full = [hard_all[sd].test["accuracy"] for sd in seeds]
    gap = sum(full) / len(full) - sum(hard_small) / len(hard_small)
    recovered = (sum(soft_small) / len(soft_small) - sum(hard_small) / len(hard_small)) / gap if gap > 0 else float("nan")
    per_seed = [(sf - hs) / (fl - hs) if fl > hs else float("nan") for sf, hs, fl in zip(soft_small, hard_small, full)]
    return recovered, per_seed


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train hard-all (the teacher) per seed; choose T and the soft weight on validation; train hard and soft
    students on the fraction and across the sweep; summarise the share of the gap recovered."""
    if not 0 < s["fraction"] < 1 or any(not 0 < f <= 1 for f in s["sweep"]):
        raise ValueError(f"fraction: must be in (0, 1) and sweep values in (0, 1], got {s['fraction']}, {s['sweep']}")
    bundle = kdata.load(s["dataset"], val_size=s["val_size"], seed=s["seed"],
                        **({"path": ctx.data_path} if ctx.data_path else {}))
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    ctx.log(f"{s['dataset']}: {len(bundle.train)} train, {len(bundle.val)} validation; student {s['student']}, "
            f"seeds {seeds}")
    st = _Students(s, ctx, bundle)
    hard_all, first_teacher = _train_on_all(st, seeds)
    by_choice, chosen = _choose_soft(st, seeds[0])
    runs = _hard_and_soft(st, seeds, hard_all, by_choice[chosen], chosen)
    frac = s["fraction"]
    recovered, per_seed = _recovered(runs, hard_all, seeds, frac)
    sweep = {str(f): {kind: summarize([runs[(kind, f, sd)].test["accuracy"] for sd in seeds[: s["sweep_seeds"]]])
                      for kind in ("hard", "soft")} for f in s["sweep"]}
    _plot(s, sweep, summarize([hard_all[sd].test["accuracy"] for sd in seeds]), ctx.out / "few_data.png")
    pct = f"{100 * frac:g}%"
    models = {
        f"{kind}-{pct}": {**role_metrics([runs[(kind, frac, sd)].test for sd in seeds]), "spec": s["student"],
                          "best_epochs": [runs[(kind, frac, sd)].best_epoch for sd in seeds]} for kind in ("hard", "soft")
    }
    models["hard-all"] = {**role_metrics([hard_all[sd].test for sd in seeds]), "spec": s["student"]}
    md = _markdown(s, seeds, models, by_choice, chosen, sweep, recovered, per_seed)
    extra = {"recovered_share_of_gap": recovered, "recovered_by_seed": per_seed,
             "target_met": bool(recovered >= s["target_recovered"]),
             "chosen": {"temperature": chosen[0], "alpha": chosen[1]},
             "validation_errors": {f"T={t}, alpha={a}": r.val["errors"] for (t, a), r in by_choice.items()},
             "sweep": sweep, "threads": torch.get_num_threads()}
    # The first seed's models: the teacher (trained on all the data), the soft-target student chosen on
    # validation and the same student on the hard labels of the same subset.
    teacher_name = (f"teacher {s['teacher']} (hard, all data)" if s["teacher"]
                    else f"teacher {s['student']} (hard-all)")
    shown = {
        teacher_name: first_teacher,
        f"distilled {s['student']} (soft-{pct}, T={chosen[0]:g}, alpha={chosen[1]:g})": by_choice[chosen].model,
        f"student alone {s['student']} (hard-{pct})": runs[("hard", frac, seeds[0])].model,
    }
    return finish(ctx, NAME, models, md, extra, shown, bundle.test)


def _markdown(s: dict[str, Any], seeds: list[int], models: dict[str, Any], by_choice: dict[tuple[float, float], FitResult],
              chosen: tuple[float, float], sweep: dict[str, Any], recovered: float, per_seed: list[float]) -> str:
    """results.md: the paper's numbers, the setting, the share of the gap recovered, the choice, the sweep."""
    pct = f"{100 * s['fraction']:g}%"
    sweep_rows = "\n".join(
        f"| {100 * float(f):g}% | {100 * v['hard']['mean']:.2f} ± {100 * v['hard']['std']:.2f} | "
        f"{100 * v['soft']['mean']:.2f} ± {100 * v['soft']['std']:.2f} |" for f, v in sweep.items()
    )
    grid_rows = "\n".join(f"| {t} | {a} | {r.val['errors']} |{' chosen |' if (t, a) == chosen else ' |'}"
                          for (t, a), r in by_choice.items())
    return f"""
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
