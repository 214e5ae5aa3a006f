"""A tiny 2x20 student on MNIST: alone, distilled, distilled with hard labels, and from a CNN teacher.

Reference 004 (a Keras reproduction of Hinton et al. 2015) could not show distillation with the
paper's 2x800 student on un-jittered MNIST, so it shrank the student to two hidden layers of 20 units:
368 test errors alone, 331 distilled at T = 3 from a 2x1200 dropout teacher, 323 with the hard labels
mixed in (weight 0.7 on the labels), 340 distilled from a CNN teacher. The paper itself reports that
for 30-unit layers a temperature between 2.5 and 4 worked best.

Here every student gets the same epochs, optimiser and data; each role is repeated over several seeds.
The hard-label weight is chosen on the validation split, and a temperature sweep (a few seeds per T)
picks the best T on validation; the student at that T is then trained over the full set of seeds.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import data as kdata
from ..models import build_model, count_parameters
from ..report import fmt, save_figure, summarize, write_results
from ..teachers import ModuleTeacher
from ..train import FitResult, TrainConfig, fit
from . import RunContext
from ._mnist_teachers import TeacherRecipe, cache_dir, get_teacher

NAME = "small-student"
DESCRIPTION = "MNIST: 2x20 student alone / distilled T=3 / + hard labels / from a CNN teacher, and a T sweep"

_COMMON: dict[str, Any] = {
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "teacher_jitter": 2,
    "teacher_lr": 0.05,
    "teacher_weight_decay": 5e-4,
    "teacher_cache": "auto",
    "teacher_mlp": "mlp:1200,1200,dropout=0.5,input_dropout=0.2,max_norm=15",
    "student": "mlp:20,20",
    "student_lr": 0.05,
    "temperature": 3.0,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "teacher_mlp_epochs": 2, "teacher_cnn": "cnn:16,32", "teacher_cnn_epochs": 3,
              "student_epochs": 10, "seeds": 2, "hard_alphas": [0.3, 0.7],
              "sweep_temperatures": [1.0, 3.0, 10.0], "sweep_seeds": 1},
    "full": {**_COMMON, "teacher_mlp_epochs": 20, "teacher_cnn": "cnn:32,64", "teacher_cnn_epochs": 8,
             "student_epochs": 50, "seeds": 5, "hard_alphas": [0.1, 0.3, 0.5, 0.7, 0.9],
             "sweep_temperatures": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0, 20.0], "sweep_seeds": 3},
}
REFERENCE_004 = {"baseline": 368, "distilled": 331, "distilled+hard": 323, "distilled-from-cnn": 340}


def sweep_summary(records: list[dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """Group sweep records ``{"temperature", "seed", "val_errors", "test_errors"}`` by T (ascending).

    Each T gets the mean/std/values of its validation and test errors and its seeds; a (T, seed) pair
    recorded twice is an error, since it would count one run twice.
    """
    seen = set()
    by_t: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        key = (float(r["temperature"]), int(r["seed"]))
        if key in seen:
            raise ValueError(f"sweep: temperature {key[0]} seed {key[1]} recorded twice")
        seen.add(key)
        by_t.setdefault(key[0], []).append(r)
    return {
        T: {"val_errors": summarize([r["val_errors"] for r in rows]),
            "test_errors": summarize([r["test_errors"] for r in rows]),
            "seeds": sorted(int(r["seed"]) for r in rows)}
        for T, rows in sorted(by_t.items())
    }


def best_temperature(summary: dict[float, dict[str, Any]]) -> float:
    """The T with the fewest mean validation errors (test errors are never looked at); ties go to the lower T."""
    if not summary:
        raise ValueError("sweep: no temperatures were run")
    return min(summary, key=lambda T: (summary[T]["val_errors"]["mean"], T))


def _role(results: list[FitResult], **info: Any) -> dict[str, Any]:
    return {"test_errors": summarize([r.test["errors"] for r in results]),
            "test_accuracy": summarize([r.test["accuracy"] for r in results]),
            "val_errors": summarize([r.val["errors"] for r in results]), "seeds": len(results), **info}


def _plot_sweep(path, summary: dict[float, dict[str, Any]], baseline: dict[str, Any], best: float, spec: str) -> None:
    import matplotlib.pyplot as plt

    Ts = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, color in (("val", "tab:blue"), ("test", "tab:orange")):
        mean = [summary[T][f"{split}_errors"]["mean"] for T in Ts]
        std = [summary[T][f"{split}_errors"]["std"] for T in Ts]
        scale = 10000 / 5000 if split == "val" else 1.0  # validation has 5,000 images: show per 10,000
        label = "validation errors ×2 (per 10k; chooses T)" if split == "val" else "test errors (shown only)"
        ax.errorbar(Ts, [m * scale for m in mean], [s * scale for s in std], marker="o", capsize=3, color=color, label=label)
    b = baseline["test_errors"]
    ax.axhspan(b["mean"] - b["std"], b["mean"] + b["std"], color="gray", alpha=0.25)
    ax.axhline(b["mean"], color="gray", label=f"baseline (no teacher): {b['mean']:.0f} test errors")
    ax.axvline(best, color="tab:green", linestyle=":", label=f"chosen on validation: T = {best:g}")
    ax.axvspan(2.5, 4, color="tab:green", alpha=0.08, label="paper's best range for 30-unit layers")
    ax.set_xscale("log")
    ax.set_xticks(Ts)
    ax.set_xticklabels([f"{T:g}" for T in Ts])
    ax.set_xlabel("distillation temperature T")
    ax.set_ylabel("errors per 10,000 images (mean ± std over seeds)")
    ax.set_title(f"{spec} student distilled at each T (soft targets only)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_roles(path, models: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    names = [n for n in models if not n.startswith("teacher")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    means = [models[n]["test_errors"]["mean"] for n in names]
    stds = [models[n]["test_errors"]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, label="this run (mean ± std over seeds)")
    ref = [(i, REFERENCE_004[n]) for i, n in enumerate(names) if n in REFERENCE_004]
    ax.scatter([i for i, _ in ref], [v for _, v in ref], color="black", marker="x", zorder=3, label="reference 004")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_ylabel("test errors (of 10,000)")
    ax.set_ylim(min(means + [v for _, v in ref]) * 0.85, max(means + [v for _, v in ref]) * 1.08)
    ax.set_title("2x20 student on MNIST")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train, val, test = bundle.train, bundle.val, bundle.test
    ctx.log(f"MNIST: {len(train)} train, {len(val)} validation, {len(test)} test")
    cache = cache_dir(s["teacher_cache"], ctx.out)
    teachers, records = {}, {}
    for role, spec, epochs in (("teacher_mlp", s["teacher_mlp"], s["teacher_mlp_epochs"]),
                               ("teacher_cnn", s["teacher_cnn"], s["teacher_cnn_epochs"])):
        recipe = TeacherRecipe(spec=spec, epochs=epochs, lr=s["teacher_lr"], weight_decay=s["teacher_weight_decay"],
                               jitter=s["teacher_jitter"], batch_size=s["batch_size"], seed=s["seed"])
        model, records[role] = get_teacher(recipe, train, val, test, ctx, cache)
        teachers[role] = ModuleTeacher(model).cache(train)  # students are not augmented: one pass each
    seeds = [s["seed"] + i for i in range(s["seeds"])]

    def student(name: str, seed: int, teacher: str | None = None, T: float = 1.0, alpha: float = 1.0) -> FitResult:
        distill = {} if teacher is None else {"temperature": T, "alpha": alpha}
        cfg = TrainConfig(epochs=s["student_epochs"], batch_size=s["batch_size"], lr=s["student_lr"], seed=seed, **distill)
        r = fit(build_model(s["student"], bundle.input_shape, 10, seed=seed), train, cfg,
                teacher=None if teacher is None else teachers[teacher], val=val, test=test,
                out_dir=ctx.out / f"{name}-seed{seed}", progress=ctx.progress)
        ctx.log(f"{name} seed {seed}: {r.val['errors']} validation, {r.test['errors']} test errors")
        return r

    T = s["temperature"]
    baseline = [student("baseline", seed) for seed in seeds]
    distilled = [student(f"distilled-T{T}", seed, "teacher_mlp", T) for seed in seeds]
    from_cnn = [student(f"distilled-cnn-T{T}", seed, "teacher_cnn", T) for seed in seeds]
    # Hard-label weight: chosen on validation with the first seed, then the other seeds at that weight.
    by_alpha = {a: student(f"distilled-T{T}-a{a}", seeds[0], "teacher_mlp", T, a) for a in s["hard_alphas"]}
    alpha = min(by_alpha, key=lambda a: (by_alpha[a].val["errors"], -a))
    with_hard = [by_alpha[alpha]] + [student(f"distilled-T{T}-a{alpha}", seed, "teacher_mlp", T, alpha) for seed in seeds[1:]]

    # Temperature sweep (soft targets only, MLP teacher): runs already made at T are reused.
    sweep_runs: dict[tuple[float, int], FitResult] = {(T, seed): r for seed, r in zip(seeds, distilled)}
    sweep_seeds = seeds[: s["sweep_seeds"]] if s["sweep_seeds"] <= len(seeds) else \
        [s["seed"] + i for i in range(s["sweep_seeds"])]
    for t in s["sweep_temperatures"]:
        for seed in sweep_seeds:
            if (float(t), seed) not in sweep_runs:
                sweep_runs[(float(t), seed)] = student(f"sweep-T{t}", seed, "teacher_mlp", float(t))
    records_sweep = [{"temperature": t, "seed": seed, "val_errors": r.val["errors"], "test_errors": r.test["errors"]}
                     for (t, seed), r in sweep_runs.items() if seed in sweep_seeds and t in map(float, s["sweep_temperatures"])]
    summary = sweep_summary(records_sweep)
    best_T = best_temperature(summary)
    at_best = [sweep_runs.get((best_T, seed)) or student(f"sweep-T{best_T}", seed, "teacher_mlp", best_T)
               for seed in seeds]
    for seed, r in zip(seeds, at_best):
        sweep_runs[(best_T, seed)] = r

    models: dict[str, Any] = {}
    for role, rec in records.items():
        models[role] = {"test_errors": rec["test"]["errors"], "test_accuracy": rec["test"]["accuracy"], "seeds": 1,
                        "spec": rec["spec"], "loaded_from_cache": rec["loaded_from_cache"],
                        "train_wall_time_s": rec["train_wall_time_s"]}
    student_model = baseline[0].model
    models["baseline"] = _role(baseline, spec=s["student"], params=count_parameters(student_model))
    models["distilled"] = _role(distilled, teacher="teacher_mlp", temperature=T, alpha=1.0)
    models["distilled+hard"] = _role(with_hard, teacher="teacher_mlp", temperature=T, alpha=alpha)
    models["distilled-from-cnn"] = _role(from_cnn, teacher="teacher_cnn", temperature=T, alpha=1.0)
    models["distilled-best-T"] = _role(at_best, teacher="teacher_mlp", temperature=best_T, alpha=1.0)

    _plot_sweep(ctx.out / "temperature_sweep.png", summary, models["baseline"], best_T, s["student"])
    _plot_roles(ctx.out / "roles.png", models)
    sweep_rows = "\n".join(
        f"| {t:g} | {fmt(v['val_errors'])} | {fmt(v['test_errors'])} |" + (" chosen |" if t == best_T else " |")
        for t, v in summary.items())
    alpha_rows = "\n".join(f"| {a} | {r.val['errors']} |" + (" chosen |" if a == alpha else " |") for a, r in by_alpha.items())
    role_rows = "\n".join(
        f"| {n} | {fmt(models[n]['test_errors'])} | {REFERENCE_004.get(n, '')} |"
        for n in ("baseline", "distilled", "distilled+hard", "distilled-from-cnn", "distilled-best-T"))
    md = f"""
Reference 004 (Keras, 20-20 student, Adam, 50 epochs): 368 test errors alone, 331 distilled at T = 3,
323 with hard labels (weight 0.7), 340 from a CNN teacher. Paper: best T between 2.5 and 4 for 30-unit layers.

Teachers (jitter ±{s['teacher_jitter']} px): `{s['teacher_mlp']}` ({s['teacher_mlp_epochs']} epochs):
{records['teacher_mlp']['test']['errors']} test errors; `{s['teacher_cnn']}` ({s['teacher_cnn_epochs']} epochs):
{records['teacher_cnn']['test']['errors']} test errors.
Students: `{s['student']}` ({count_parameters(student_model)} parameters), {s['student_epochs']} epochs each, SGD
lr {s['student_lr']}, same data (no augmentation), seeds {seeds}. Distillation: KL·T² on soft targets.

| role | test errors (this run) | reference 004 |
|---|---|---|
{role_rows}

Hard-label weight (1 - alpha) for `distilled+hard`, chosen on validation (seed {seeds[0]}, T = {T:g}):

| alpha (soft weight) | validation errors | |
|---|---|---|
{alpha_rows}

Temperature sweep (soft targets only, 2x1200 teacher, seeds {sweep_seeds}); T chosen by mean validation
errors (5,000 images), test errors shown for the record:

| T | validation errors | test errors | |
|---|---|---|---|
{sweep_rows}

`distilled-best-T` is the student at the chosen T = {best_T:g} over all seeds {seeds}.
Plots: `temperature_sweep.png`, `roles.png`.
"""
    extra = {"chosen_alpha": alpha, "chosen_temperature": best_T,
             "validation_errors_by_alpha": {str(a): r.val["errors"] for a, r in by_alpha.items()},
             "sweep": {str(t): v for t, v in summary.items()},
             "teachers": {k: {kk: vv for kk, vv in v.items() if kk != "test"} for k, v in records.items()}}
    return write_results(ctx.out, NAME, ctx.profile, ctx.elapsed, models, md, extra=extra)
