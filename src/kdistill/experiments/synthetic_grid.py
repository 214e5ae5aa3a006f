"""Distillation temperature against data quality on ``make_classification`` data (tutorial part III).

Nine data sets: 50,000 samples, 100 features, 10 classes, one cluster per class, class separation in
{0.2, 0.6, 1} times informative fraction in {0.5, 0.8, 1} (the other features are linear combinations
of the informative ones, as in the tutorial). Per data set a 3x100 teacher with dropout 0.2 is trained
on the hard labels; a 2x50 student is trained on the hard labels alone (baseline) and, with the same
epochs and optimiser, on the teacher's soft targets alone at each T in {2, 2.5, ..., 20}. The best T
is the one with the highest mean validation accuracy over seeds; test accuracy is only reported.

The tutorial found the best T between 2.5 and 5 everywhere and left open whether wider students prefer
a higher T (Hinton et al.: T >= 8 fine at 300+ units per layer, 2.5-4 best at 30). The second part
tests that: students 2x10, 2x30, 2x100, 2x300 distilled at every T on one of the data sets.

The teacher is trained once per data set and its logits are cached (the transfer set is not
augmented); seeds vary the students' initialisation and batch order. Features are standardised with
the training split's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdistill.data import DataBundle, TensorData, split_validation
from kdistill.engine import TrainConfig, fit
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import finish, kd
from kdistill.models import build_model
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize
from kdistill.sweeps.grid import (TEACHER_SEED_OFFSET, aggregate, choose_best, grid, intra_op_threads,
                                  rank_correlation, seed_list, select, within_noise)
from kdistill.sweeps.multi import fit_grid
from kdistill.teachers.base import ModuleTeacher

NAME = "synthetic-grid"
DESCRIPTION = "make_classification 3x3 data-quality grid: student accuracy vs T (best T on validation); width vs best T"

_COMMON: dict[str, Any] = {
    "seed": 0,
    "samples": 50000,
    "features": 100,
    "classes": 10,
    "test_fraction": 0.2,
    "val_size": 5000,
    "class_seps": [0.2, 0.6, 1.0],
    "informative": [0.5, 0.8, 1.0],
    "teacher": "mlp:100,100,100,dropout=0.2",
    "student_width": 50,
    "temperatures": [2, 2.5, 3, 4, 5, 10, 15, 20],
    "alpha": 1.0,
    "optimizer": "adam",
    "schedule": "constant",
    "widths": [10, 30, 100, 300],
    "width_class_sep": 0.6,
    "width_informative": 0.8,
    "threads": 1,  # torch intra-op threads for these small MLPs (null: leave the process default)
}
PROFILES: dict[str, dict[str, Any]] = {
    # Fewer, larger batches and epochs: the whole grid in ~2 min, for plumbing. At 3 epochs the students are
    # far from converged and soft targets lose to hard labels; only the full budget reproduces the tutorial.
    "quick": {**_COMMON, "batch_size": 250, "lr": 0.002, "teacher_epochs": 3, "student_epochs": 3, "seeds": 1},
    # The tutorial's budget (Adam, batch 100, 50 epochs for teacher and students), three student seeds:
    # 9 teachers and ~350 students (those of one width and data set in one stacked pass).
    "full": {**_COMMON, "batch_size": 100, "lr": 0.001, "teacher_epochs": 50, "student_epochs": 50, "seeds": 3},
}


def make_data(s: dict[str, Any], class_sep: float, informative: float) -> DataBundle:
    """One standardised ``make_classification`` data set with train / validation / test splits."""
    from sklearn.datasets import make_classification

    if not 0.0 < informative <= 1.0:
        raise ValueError(f"informative: fractions must be in (0, 1], got {informative}")
    n_inf = round(informative * s["features"])
    if s["classes"] > 2**n_inf:
        raise ValueError(f"informative: {n_inf} informative features cannot separate {s['classes']} classes")
    x, y = make_classification(
        n_samples=s["samples"],
        n_features=s["features"],
        n_informative=n_inf,
        n_redundant=s["features"] - n_inf,
        n_classes=s["classes"],
        n_clusters_per_class=1,
        class_sep=class_sep,
        random_state=s["seed"],
    )
    name = f"synthetic-sep{class_sep}-inf{informative}"
    classes = tuple(str(c) for c in range(s["classes"]))
    full = TensorData(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), classes, name=name)
    rest, test = split_validation(full, s["test_fraction"], seed=s["seed"] + 1000)
    train, val = split_validation(
        TensorData(rest.x, rest.y, classes, name=f"{name}-train"), s["val_size"], seed=s["seed"]
    )
    mean, std = train.x.mean(dim=0), train.x.std(dim=0).clamp_min(1e-6)

    def norm(d: TensorData, split: str) -> TensorData:
        return TensorData((d.x - mean) / std, d.y, classes, d.index, f"{name}-{split}")

    return DataBundle(train=norm(train, "train"), val=norm(val, "val"), test=norm(test, "test"))


def data_grid(s: dict[str, Any]) -> list[dict[str, float]]:
    """The nine data sets: class separation (slowest) times informative fraction."""
    return grid(class_sep=s["class_seps"], informative=s["informative"])


def temperature_grid(s: dict[str, Any]) -> list[float]:
    """The distillation temperatures, ascending: a tie on validation goes to the lower T."""
    return sorted(float(t) for t in s["temperatures"])


def _config(s: dict[str, Any], epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=s["batch_size"],
        optimizer=s["optimizer"],
        lr=s["lr"],
        schedule=s["schedule"],
        seed=seed,
        checkpoint=False,
    )


def _method(s: dict[str, Any], T: float | None) -> dict[str, Any]:
    """A distilled student's ``fit(method=...)`` at temperature ``T`` (KL·T², soft weight ``alpha``); ``None``:
    the baseline, soft weight 0, i.e. the hard labels alone (it shares the width's stacked pass)."""
    return kd(1.0, 0.0) if T is None else kd(float(T), float(s["alpha"]))


def _record(result, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "val_accuracy": result.val["accuracy"],
        "test_accuracy": result.test["accuracy"],
        "test_errors": result.test["errors"],
    }


def _train_students(s, bundle, cached, widths, seeds, records, progress, **setting) -> dict[float | None, nn.Module]:
    """Baseline and one distilled student per T, for each width and seed; append their records.

    All students of one width train in one stacked pass (:func:`~kdistill.sweeps.multi.fit_grid`): each equals
    the same student trained alone by ``fit``. The baseline is the alpha = 0 member (hard labels only).
    Returns the first seed's students of width ``student_width`` by T (None: the baseline), the
    candidates for a deployment table; the other students are not kept.
    """
    first: dict[float | None, nn.Module] = {}
    for width in widths:
        spec = f"mlp:{width},{width}"
        plan = [(seed, T) for seed in seeds for T in [None, *temperature_grid(s)]]
        results = fit_grid(spec, bundle.train, [_config(s, s["student_epochs"], seed) for seed, _ in plan],
                           teacher=cached, methods=[_method(s, T) for _, T in plan], val=bundle.val,
                           test=bundle.test, progress=progress)
        for (seed, T), r in zip(plan, results):
            role = "baseline" if T is None else "distilled"
            records.append(_record(r, **setting, width=width, role=role, T=None if T is None else float(T), seed=seed))
            if width == s["student_width"] and seed == seeds[0]:
                first[None if T is None else float(T)] = r.model
    return first


def _pct(summary: dict[str, Any]) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def _plot_grid(s, records, teachers, best_T, path) -> None:
    import matplotlib.pyplot as plt

    seps, infs = s["class_seps"], s["informative"]
    fig, axes = plt.subplots(len(seps), len(infs), figsize=(4.2 * len(infs), 3.4 * len(seps)), squeeze=False)
    for i, sep in enumerate(seps):
        for j, inf in enumerate(infs):
            ax = axes[i][j]
            mine = select(records, class_sep=sep, informative=inf, width=s["student_width"])
            rows = aggregate(select(mine, role="distilled"), ["T"], ["val_accuracy", "test_accuracy"])
            Ts = [r["T"] for r in rows]
            ax.errorbar(
                Ts,
                [100 * r["test_accuracy"]["mean"] for r in rows],
                yerr=[100 * r["test_accuracy"]["std"] for r in rows],
                marker="o",
                capsize=3,
                label="distilled student (test)",
            )
            ax.plot(
                Ts,
                [100 * r["val_accuracy"]["mean"] for r in rows],
                "--",
                color="tab:blue",
                alpha=0.5,
                label="distilled student (validation)",
            )
            base = summarize([r["test_accuracy"] for r in select(mine, role="baseline")])
            ax.axhline(100 * teachers[(sep, inf)], color="tab:red", label="teacher (test)")
            ax.axhline(100 * base["mean"], color="tab:green", label="baseline student (test)")
            if base["std"]:
                ax.axhspan(
                    100 * (base["mean"] - base["std"]),
                    100 * (base["mean"] + base["std"]),
                    color="tab:green",
                    alpha=0.15,
                )
            chosen = next(r for r in rows if r["T"] == best_T[(sep, inf)])
            ax.plot(
                [chosen["T"]],
                [100 * chosen["test_accuracy"]["mean"]],
                "*",
                color="black",
                markersize=14,
                label="best T on validation",
            )
            ax.set_xscale("log")
            ax.set_xticks(Ts)
            ax.set_xticklabels([f"{t:g}" for t in Ts], fontsize=8)
            ax.minorticks_off()
            ax.set_title(f"class_sep = {sep}, informative = {inf}", fontsize=10)
            ax.set_xlabel("temperature T")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(
        f"2x{s['student_width']} student: accuracy against distillation temperature "
        f"(mean ± std over {s['seeds']} seed(s))"
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save_figure(fig, path)


def _plot_widths(s, wrec, widths, best_by_width, near_by_width, path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    for w in widths:
        rows = aggregate(select(wrec, width=w, role="distilled"), ["T"], ["val_accuracy"])
        best = max(r["val_accuracy"]["mean"] for r in rows)
        left.plot(
            [r["T"] for r in rows], [100 * (r["val_accuracy"]["mean"] - best) for r in rows], marker="o", label=f"2x{w}"
        )
    left.set_xscale("log")
    left.set_xticks(s["temperatures"])
    left.set_xticklabels([f"{t:g}" for t in s["temperatures"]])
    left.minorticks_off()
    left.set_xlabel("temperature T")
    left.set_ylabel("validation accuracy minus the width's best (points)")
    left.set_title("How much each T loses against the best T, per student width")
    left.legend()
    left.grid(alpha=0.3)
    best = [best_by_width[w] for w in widths]
    lo = [min(near_by_width[w]) for w in widths]
    hi = [max(near_by_width[w]) for w in widths]
    right.errorbar(
        widths,
        best,
        yerr=[[b - a for a, b in zip(lo, best)], [c - b for b, c in zip(best, hi)]],
        marker="o",
        capsize=4,
        label="best T on validation (bar: T within one seed std)",
    )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xticks(widths)
    right.set_xticklabels([str(w) for w in widths])
    right.set_yticks(s["temperatures"])
    right.set_yticklabels([f"{t:g}" for t in s["temperatures"]])
    right.minorticks_off()
    right.set_xlabel("hidden units per layer (2 layers)")
    right.set_ylabel("best temperature")
    right.set_title(f"Best T against width (class_sep {s['width_class_sep']}, informative {s['width_informative']})")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    with intra_op_threads(s["threads"]):
        return _run(s, ctx)


@dataclass
class _Study:
    """What every stage reads (settings, seeds, the run's context) and what they found so far."""

    s: dict[str, Any]
    ctx: RunContext
    seeds: list[int]
    records: list[dict[str, Any]] = field(default_factory=list)
    teachers: dict[tuple, float] = field(default_factory=dict)  # (class_sep, informative) -> teacher test accuracy
    best_T: dict[tuple, float] = field(default_factory=dict)  # (class_sep, informative) -> T chosen on validation
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # results.json's roles
    table: list[str] = field(default_factory=list)  # results.md's rows, one per data set
    shown: dict[str, nn.Module] = field(default_factory=dict)  # the deployment table's models ...
    shown_test: TensorData | None = None  # ... and their test split

    @property
    def width_key(self) -> tuple[float, float]:
        return self.s["width_class_sep"], self.s["width_informative"]


def _run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Per data set of the grid: train the teacher, the baseline and a student per T, choose T on validation;
    then, on one data set, the best T per student width; summarise."""
    study = _Study(s, ctx, check_settings(s))
    for setting in data_grid(s):
        distil_on_dataset(study, setting["class_sep"], setting["informative"])
    _plot_grid(s, study.records, study.teachers, study.best_T, ctx.out / "accuracy_vs_T.png")
    return summarise(study, width_study(study))


def check_settings(s: dict[str, Any]) -> list[int]:
    """Refuse settings the grid cannot run, before any work; return the student seeds."""
    seeds = seed_list(s["seed"], s["seeds"])
    if s["width_class_sep"] not in s["class_seps"] or s["width_informative"] not in s["informative"]:
        raise ValueError(
            "width_class_sep / width_informative: must name one of the grid's data sets "
            f"(class_seps {s['class_seps']}, informative {s['informative']})"
        )
    if not s["temperatures"] or min(s["temperatures"]) <= 0:
        raise ValueError(f"temperatures: need a list of T > 0, got {s['temperatures']}")
    return seeds


def train_teacher(s: dict[str, Any], bundle: DataBundle, progress: bool) -> tuple[nn.Module, Any]:
    """The data set's teacher, on the hard labels, with its own seed (never a student's init or data order)."""
    t_seed = s["seed"] + TEACHER_SEED_OFFSET
    teacher = build_model(s["teacher"], bundle.input_shape, s["classes"], seed=t_seed)
    t_fit = fit(teacher, bundle.train, _config(s, s["teacher_epochs"], t_seed), val=bundle.val, test=bundle.test,
                progress=progress)
    return teacher, t_fit


def choose_T(records: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """The T whose distilled students have the best mean validation accuracy (``choose_best``: the temperatures
    are declared ascending, so a tie goes to the lower T), and the temperatures within one seed std of it."""
    dist = select(records, role="distilled")
    best = choose_best(dist, ["T"], "val_accuracy")["T"]
    return best, [d["T"] for d in within_noise(dist, ["T"], "val_accuracy")]


def distil_on_dataset(study: _Study, sep: float, inf: float) -> None:
    """One data set: its teacher, baseline and distilled students (every width on the width study's data set),
    T chosen on validation, its roles and results.md row."""
    s = study.s
    bundle = make_data(s, sep, inf)
    teacher, t_fit = train_teacher(s, bundle, study.ctx.progress)
    study.teachers[(sep, inf)] = t_fit.test["accuracy"]
    cached = ModuleTeacher(teacher).cache(bundle.train)  # one teacher pass, shared by every student
    widths = [s["student_width"]] + (
        [w for w in s["widths"] if w != s["student_width"]] if (sep, inf) == study.width_key else []
    )
    students = _train_students(s, bundle, cached, widths, study.seeds, study.records, study.ctx.progress,
                               class_sep=sep, informative=inf)
    mine = select(study.records, class_sep=sep, informative=inf, width=s["student_width"])
    best, near = choose_T(mine)
    study.best_T[(sep, inf)] = best
    if (sep, inf) == study.width_key:
        # The deployment table's data set: the one of the width study. Its teacher, the first seed's
        # student at the best T (validation) and the same student on the hard labels.
        spec = f"mlp:{s['student_width']},{s['student_width']}"
        study.shown = {f"teacher {s['teacher']}": teacher, f"distilled {spec} (T={best:g})": students[best],
                       f"student alone {spec}": students[None]}
        study.shown_test = bundle.test
    report_dataset(study, sep, inf, t_fit, mine, best, near)


def report_dataset(study: _Study, sep, inf, t_fit, mine, best: float, near: list[float]) -> None:
    """The data set's roles (teacher, baseline, distilled at the chosen T), results.md row and log line."""
    s = study.s
    spec = f"mlp:{s['student_width']},{s['student_width']}"
    base = select(mine, role="baseline")
    at_best = select(mine, role="distilled", T=best)
    key = f"sep{sep}-inf{inf}"

    def tests(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return role_metrics([r | {"errors": r["test_errors"], "accuracy": r["test_accuracy"]} for r in rs],
                            ("errors", "accuracy"))

    study.models[f"{key}/teacher"] = {**role_metrics([t_fit.test], ("errors", "accuracy")), "spec": s["teacher"]}
    study.models[f"{key}/baseline"] = {**tests(base), "spec": spec}
    study.models[f"{key}/distilled"] = {**tests(at_best), "spec": spec, "temperature": best}
    b_sum = summarize([r["test_accuracy"] for r in base])
    d_sum = summarize([r["test_accuracy"] for r in at_best])
    study.table.append(
        f"| {sep} | {inf} | {100 * t_fit.test['accuracy']:.2f} | {_pct(b_sum)} | {best:g} | "
        f"{', '.join(f'{t:g}' for t in near)} | {_pct(d_sum)} |"
    )
    study.ctx.log(
        f"{key}: teacher {100 * t_fit.test['accuracy']:.2f}%, baseline {_pct(b_sum)}%, best T {best:g} "
        f"(validation) -> distilled {_pct(d_sum)}% test"
    )


def width_study(study: _Study) -> dict[str, Any]:
    """Part 2: the best T (on validation) against student width, on one data set; its plot and table rows."""
    s = study.s
    wrec = select(study.records, class_sep=study.width_key[0], informative=study.width_key[1])
    widths = sorted({r["width"] for r in wrec})
    best_by_width, near_by_width, rows = {}, {}, []
    for w in widths:
        best_by_width[w], near_by_width[w] = choose_T(select(wrec, width=w))
        base = summarize([r["test_accuracy"] for r in select(wrec, width=w, role="baseline")])
        at_best = summarize([r["test_accuracy"] for r in select(wrec, width=w, role="distilled", T=best_by_width[w])])
        rows.append(
            f"| 2x{w} | {_pct(base)} | {best_by_width[w]:g} | "
            f"{', '.join(f'{t:g}' for t in near_by_width[w])} | {_pct(at_best)} |"
        )
    _plot_widths(s, wrec, widths, best_by_width, near_by_width, study.ctx.out / "best_T_vs_width.png")
    rho = rank_correlation(widths, [best_by_width[w] for w in widths])
    return {"widths": widths, "best": best_by_width, "near": near_by_width, "rows": rows, "rho": rho}


def _markdown(study: _Study, width: dict[str, Any]) -> str:
    s, width_key, rho = study.s, study.width_key, width["rho"]
    in_range = sum(2.5 <= t <= 5 for t in study.best_T.values())
    claim = "rises with width" if rho > 0.5 else "falls with width" if rho < -0.5 else "shows no clear trend with width"
    return f"""
Tutorial (part III): the best T lay between 2.5 and 5 on all nine data sets and distilled students
beat the baseline everywhere; whether wider students prefer a higher T was left open.

Teacher `{s["teacher"]}`, student `mlp:{s["student_width"]},{s["student_width"]}`; {s["optimizer"]} lr {s["lr"]}
({s["schedule"]}), batch {s["batch_size"]}, {s["teacher_epochs"]} teacher / {s["student_epochs"]} student epochs;
distilled students learn from the soft targets alone (alpha = {s["alpha"]}, KL·T²). {s["samples"]} samples:
{s["test_fraction"]:.0%} test, {s["val_size"]} validation, the rest training. Student seeds {study.seeds}; teacher and
data fixed per data set. Accuracy in %, mean ± std over seeds; "T within noise" lists the temperatures whose
mean validation accuracy is within one seed standard deviation of the best.

| class_sep | informative | teacher (test) | baseline (test) | best T (validation) | T within noise | distilled at best T (test) |
|---|---|---|---|---|---|---|
{chr(10).join(study.table)}

Best T within [2.5, 5] on {in_range} of {len(study.best_T)} data sets. Plot: `accuracy_vs_T.png`.

## Does a wider student prefer a higher T?

Data set class_sep {width_key[0]}, informative {width_key[1]}; every width gets the same teacher, epochs and seeds.

| student | baseline (test) | best T (validation) | T within noise | distilled at best T (test) |
|---|---|---|---|---|
{chr(10).join(width["rows"])}

Spearman rank correlation between width and best T: {fmt(rho)} — on this data the best T {claim}
(n = {len(width["widths"])} widths, {s["seeds"]} seed(s) each). Plot: `best_T_vs_width.png`.
"""


def summarise(study: _Study, width: dict[str, Any]) -> dict[str, Any]:
    """The results tail: results.json / results.md and the deployment table."""
    ctx = study.ctx
    extra = {
        "torch_threads": torch.get_num_threads(),
        "best_T": {f"sep{k[0]}-inf{k[1]}": v for k, v in study.best_T.items()},
        "best_T_by_width": {str(w): width["best"][w] for w in width["widths"]},
        "T_within_noise_by_width": {str(w): width["near"][w] for w in width["widths"]},
        "width_best_T_spearman": width["rho"],
        "records": study.records,
    }
    assert study.shown_test is not None  # width_key is one of the grid's data sets (checked before any work)
    return finish(ctx, NAME, study.models, _markdown(study, width), extra, study.shown, study.shown_test)
