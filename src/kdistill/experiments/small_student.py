"""A tiny 2x20 student on MNIST: alone, distilled, distilled with hard labels, from a second teacher.

Reference 004 (a Keras reproduction of Hinton et al. 2015) could not show distillation with the
paper's 2x800 student on un-jittered MNIST, so it shrank the student to two hidden layers of 20 units:
368 test errors alone, 331 distilled at T = 3 from a 2x1200 dropout teacher, 323 with the hard labels
mixed in (weight 0.7 on the labels), 340 distilled from a CNN teacher. The paper itself reports that
for 30-unit layers a temperature between 2.5 and 4 worked best.

Two teachers are trained (jittered inputs): the paper's 2x1200 dropout net and a CNN; ``main_teacher``
names the one used for the distilled roles and the temperature sweep, the other gives one more role.
Every student gets the same epochs, optimiser and transfer set; each role is repeated over several
seeds. The hard-label weight is chosen on the validation split, and a temperature sweep (a few seeds
per T) picks a T on validation, at which the student is then trained over all seeds.

The transfer set: the ``plain`` profile uses the training split as it is (reference 004's conditions).
Such a small net overfits it, so the ``full`` profile adds ``augment_copies`` copies of it shifted by up
to ``augment_pixels`` pixels, fixed once: the teachers' logits are still computed once per image (cached
by sample id) and every student, the baseline included, sees exactly the same images and steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data.dataset import TensorData
from kdistill.models import build_model, count_parameters
from kdistill.outputs.results import fmt, save_figure, summarize
from kdistill.teachers.base import ModuleTeacher
from kdistill.sweeps.multi import fit_many
from kdistill.engine import FitResult, TrainConfig
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import choose_on_validation, finish, kd
from kdistill.experiments._mnist_teachers import TEACHER_SETTINGS, TeacherRecipe, cache_dir, get_teacher

NAME = "small-student"
DESCRIPTION = "MNIST: 2x20 student alone / distilled T=3 / + hard labels / from a 2nd teacher, and a T sweep"

_COMMON: dict[str, Any] = {
    **TEACHER_SETTINGS,
    "teacher_mlp": "mlp:1200,1200,dropout=0.5,input_dropout=0.2,max_norm=15",
    "main_teacher": "cnn",
    "student": "mlp:20,20",
    "student_lr": 0.05,
    "temperature": 3.0,
    "augment_pixels": 1,
}
_FULL: dict[str, Any] = {
    **_COMMON, "teacher_mlp_epochs": 20, "teacher_cnn": "cnn:32,64", "teacher_cnn_epochs": 8,
    "seeds": 5, "hard_alphas": [0.3, 0.5, 0.7, 0.9],
    "sweep_temperatures": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0, 20.0], "sweep_seeds": 3,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "teacher_mlp_epochs": 2, "teacher_cnn": "cnn:16,32", "teacher_cnn_epochs": 2,
              "augment_copies": 1, "student_epochs": 5, "seeds": 2, "hard_alphas": [0.3, 0.7],
              "sweep_temperatures": [1.0, 3.0, 10.0], "sweep_seeds": 1},
    # 3 shifted copies + the originals: 12 epochs are as many steps as 48 epochs of the plain split.
    "full": {**_FULL, "augment_copies": 3, "student_epochs": 12},
    "plain": {**_FULL, "augment_copies": 0, "student_epochs": 50},
}
REFERENCE_004 = {"baseline": 368, "distilled-mlp": 331, "distilled-mlp+hard": 323, "distilled-cnn": 340}


def augmented_copies(train: TensorData, copies: int, pixels: int, seed: int) -> TensorData:
    """``train`` followed by ``copies`` copies of it, each image shifted by up to ``pixels`` (seeded, fixed).

    Copy k's sample ids are the originals' plus k times (largest id + 1): unique, so cached teacher logits
    can be looked up by id exactly as for the plain split.
    """
    if not isinstance(copies, int) or copies < 0:
        raise ValueError(f"augment_copies: a number of shifted copies >= 0, got {copies!r}")
    if copies and (not isinstance(pixels, int) or pixels < 1):
        raise ValueError(f"augment_pixels: a shift of at least 1 pixel is needed with copies, got {pixels!r}")
    if copies == 0:
        return train
    g = torch.Generator().manual_seed(seed)
    span = int(train.index.max()) + 1
    xs, ids = [train.x], [train.index]
    for k in range(1, copies + 1):
        xs.append(kdata.jitter(train.x, pixels, g))
        ids.append(train.index + k * span)
    return TensorData(torch.cat(xs), train.y.repeat(copies + 1), train.classes, torch.cat(ids),
                      f"{train.name}+{copies}x-shift{pixels}")


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
    """The T with the fewest mean validation errors (test errors are never looked at), by ``choose_best``:
    the summary lists T ascending, so ties go to the lower T."""
    if not summary:
        raise ValueError("sweep: no temperatures were run")
    return choose_on_validation({T: v["val_errors"]["mean"] for T, v in summary.items()}, ["temperature"])


def _role(results: list[FitResult], **info: Any) -> dict[str, Any]:
    return {"test_errors": summarize([r.test["errors"] for r in results]),
            "test_accuracy": summarize([r.test["accuracy"] for r in results]),
            "val_errors": summarize([r.val["errors"] for r in results]), "seeds": len(results), **info}


def _plot_sweep(path, summary: dict[float, dict[str, Any]], baseline: dict[str, Any], best: float, title: str,
                n_val: int, n_test: int) -> None:
    """Validation (chooses T) and test (shown only) errors per 10,000 images against T, baseline as a band."""
    import matplotlib.pyplot as plt

    Ts = list(summary)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, color, n in (("val", "tab:blue", n_val), ("test", "tab:orange", n_test)):
        scale = 10000 / n
        mean = [summary[T][f"{split}_errors"]["mean"] * scale for T in Ts]
        std = [summary[T][f"{split}_errors"]["std"] * scale for T in Ts]
        label = "validation (chooses T)" if split == "val" else "test (shown only)"
        ax.errorbar(Ts, mean, std, marker="o", capsize=3, color=color, label=label)
        b = baseline[f"{split}_errors"]
        ax.axhline(b["mean"] * scale, color=color, alpha=0.5, linestyle="--",
                   label=f"baseline (no teacher), {'validation' if split == 'val' else 'test'}")
    ax.axvline(best, color="tab:green", linestyle=":", label=f"chosen on validation: T = {best:g}")
    ax.axvspan(2.5, 4, color="tab:green", alpha=0.08, label="paper's best range for 30-unit layers")
    ax.set_xscale("log")
    ax.set_xticks(Ts)
    ax.set_xticklabels([f"{T:g}" for T in Ts])
    ax.minorticks_off()
    ax.set_xlabel("distillation temperature T")
    ax.set_ylabel("errors per 10,000 images (mean ± std)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_roles(path, models: dict[str, Any], names: list[str]) -> None:
    """Test errors per student role (mean ± std over seeds), with reference 004's numbers where it has them."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    means = [models[n]["test_errors"]["mean"] for n in names]
    stds = [models[n]["test_errors"]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, label="this run (mean ± std over seeds)")
    ref = [(i, REFERENCE_004[n]) for i, n in enumerate(names) if n in REFERENCE_004]
    if ref:
        ax.scatter([i for i, _ in ref], [v for _, v in ref], color="black", marker="x", zorder=3,
                   label="reference 004 (no augmentation)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_ylabel("test errors (of 10,000)")
    values = means + [v for _, v in ref]
    ax.set_ylim(min(values) * 0.8, max(values) * 1.1)
    ax.set_title("2x20 student on MNIST", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


Job = tuple[str, int, float, float]
"""A student of one pass: ``(role name, seed, T, alpha)``."""


@dataclass
class _Cohort:
    """The students' shared setting: the transfer set, the teachers' cached outputs, the splits."""

    s: dict[str, Any]
    ctx: RunContext
    bundle: Any
    train: TensorData
    teachers: dict[str, ModuleTeacher]

    def train_together(self, teacher: str | None, jobs: list[Job]) -> list[FitResult]:
        """Students ``(name, seed, T, alpha)`` learning from one teacher (None: hard labels), in one stacked pass.

        Each equals the same student trained alone by ``fit`` (kdistill.sweeps.multi's guarantee); students with
        the same seed share batches, as their solo runs would draw the same ones.
        """
        if not jobs:
            return []
        s, ctx, bundle = self.s, self.ctx, self.bundle
        models = [build_model(s["student"], bundle.input_shape, 10, seed=seed) for _, seed, _, _ in jobs]
        configs = [TrainConfig(epochs=s["student_epochs"], batch_size=s["batch_size"], lr=s["student_lr"], seed=seed,
                               checkpoint=False) for _, seed, _, _ in jobs]
        methods = None if teacher is None else [kd(T, a) for _, _, T, a in jobs]
        results = fit_many(models, self.train, configs, teacher=None if teacher is None else self.teachers[teacher],
                           methods=methods, val=bundle.val, test=bundle.test, out_dir=ctx.out,
                           names=[f"{n}-seed{seed}" for n, seed, _, _ in jobs], progress=ctx.progress)
        ctx.log(f"{len(jobs)} students ({teacher or 'no'} teacher) in one pass: {results[0].wall_time_s:.0f} s")
        for (name, seed, _, _), r in zip(jobs, results):
            ctx.log(f"{name} seed {seed}: {r.val['errors']} validation, {r.test['errors']} test errors")
        return results


def _load(s: dict[str, Any], ctx: RunContext) -> tuple[Any, TensorData]:
    """MNIST with its validation split, and the transfer set (the training split, plus shifted copies)."""
    if s["main_teacher"] not in ("mlp", "cnn"):
        raise ValueError(f"main_teacher: 'mlp' or 'cnn', got {s['main_teacher']!r}")
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train = augmented_copies(bundle.train, s["augment_copies"], s["augment_pixels"], s["seed"] + 1)
    ctx.log(f"MNIST: {len(train)} transfer images ({train.name}), {len(bundle.val)} validation, "
            f"{len(bundle.test)} test")
    return bundle, train


def _train_teachers(s: dict[str, Any], ctx: RunContext, bundle, train: TensorData):
    """Both teachers (trained on jittered inputs, or from the cache), each run once over the transfer set;
    their records, and the main teacher's network (for the deployment table)."""
    cache = cache_dir(s["teacher_cache"], ctx.out)
    teachers, records, main_net = {}, {}, None
    for name in ("mlp", "cnn"):
        recipe = TeacherRecipe(spec=s[f"teacher_{name}"], epochs=s[f"teacher_{name}_epochs"], lr=s["teacher_lr"],
                               weight_decay=s["teacher_weight_decay"], jitter=s["teacher_jitter"],
                               batch_size=s["batch_size"], seed=s["seed"])
        model, records[name] = get_teacher(recipe, bundle.train, bundle.val, bundle.test, ctx, cache)
        if name == s["main_teacher"]:
            main_net = model
        teachers[name] = ModuleTeacher(model).cache(train)  # one teacher pass over the fixed transfer set
    return teachers, records, main_net


def _distil_and_choose(s: dict[str, Any], cohort: _Cohort, main: str, seeds: list[int]) -> dict[str, Any]:
    """Distil from the main teacher, choosing the hard-label weight and T on validation.

    First pass: the T = ``temperature`` role over all seeds, the hard-label weights (first seed) and the
    temperature sweep (soft targets only) on the sweep seeds; a (T, seed) pair is trained once. The
    hard-label weight is chosen on the first seed (ties: the larger soft weight), T by mean validation
    errors (ties: the lower T). Second pass: the chosen weight and the chosen T over the remaining seeds.
    """
    T = float(s["temperature"])
    sweep_seeds = [s["seed"] + i for i in range(s["sweep_seeds"])]
    sweep_ts = sorted({float(t) for t in s["sweep_temperatures"]})
    runs: dict[tuple[float, int], FitResult] = {}
    soft = list(dict.fromkeys([(T, seed) for seed in seeds] + [(t, seed) for t in sweep_ts for seed in sweep_seeds]))
    jobs = [(f"distilled-{main}-T{t:g}", seed, t, 1.0) for t, seed in soft]
    jobs += [(f"distilled-{main}-T{T:g}-a{a}", seeds[0], T, float(a)) for a in s["hard_alphas"]]
    first = cohort.train_together(main, jobs)
    runs.update(zip(soft, first))
    by_alpha = dict(zip(s["hard_alphas"], first[len(soft):]))

    alpha = choose_on_validation({a: by_alpha[a].val["errors"] for a in sorted(by_alpha, reverse=True)}, ["alpha"])
    summary = sweep_summary([{"temperature": t, "seed": seed, "val_errors": runs[(t, seed)].val["errors"],
                              "test_errors": runs[(t, seed)].test["errors"]} for t in sweep_ts for seed in sweep_seeds])
    best_T = best_temperature(summary)

    hard_jobs = [(f"distilled-{main}-T{T:g}-a{alpha}", seed, T, float(alpha)) for seed in seeds[1:]]
    best_jobs = [(f"distilled-{main}-T{best_T:g}", seed, best_T, 1.0) for seed in seeds if (best_T, seed) not in runs]
    second = cohort.train_together(main, hard_jobs + best_jobs)
    runs.update({(best_T, seed): r for (_, seed, _, _), r in zip(best_jobs, second[len(hard_jobs):])})
    return {"T": T, "sweep_seeds": sweep_seeds, "by_alpha": by_alpha, "alpha": alpha, "summary": summary,
            "best_T": best_T, "distilled": [runs[(T, seed)] for seed in seeds],
            "with_hard": [by_alpha[alpha]] + second[:len(hard_jobs)], "at_best": [runs[(best_T, seed)] for seed in seeds]}


def _roles(s: dict[str, Any], records: dict[str, Any], baseline: list[FitResult], from_other: list[FitResult],
           d: dict[str, Any], main: str, other: str) -> dict[str, Any]:
    """The ``models`` section: each teacher, then each student role over its seeds."""
    models: dict[str, Any] = {}
    for name, rec in records.items():
        models[f"teacher-{name}"] = {"test_errors": rec["test"]["errors"], "test_accuracy": rec["test"]["accuracy"],
                                     "seeds": 1, "spec": rec["spec"], "loaded_from_cache": rec["loaded_from_cache"],
                                     "train_wall_time_s": rec["train_wall_time_s"]}
    T = d["T"]
    models["baseline"] = _role(baseline, spec=s["student"], params=count_parameters(baseline[0].model))
    models[f"distilled-{main}"] = _role(d["distilled"], teacher=main, temperature=T, alpha=1.0)
    models[f"distilled-{main}+hard"] = _role(d["with_hard"], teacher=main, temperature=T, alpha=d["alpha"])
    models[f"distilled-{other}"] = _role(from_other, teacher=other, temperature=T, alpha=1.0)
    models[f"distilled-{main}-best-T"] = _role(d["at_best"], teacher=main, temperature=d["best_T"], alpha=1.0)
    return models


def _markdown(s: dict[str, Any], models: dict[str, Any], records: dict[str, Any], d: dict[str, Any], main: str,
              seeds: list[int], sizes: dict[str, int]) -> str:
    """results.md: the reference, the teachers and transfer set, the roles, the two choices on validation."""
    students = [n for n in models if not n.startswith("teacher")]
    best_T, alpha, T = d["best_T"], d["alpha"], d["T"]
    sweep_rows = "\n".join(
        f"| {t:g} | {fmt(v['val_errors'])} | {fmt(v['test_errors'])} |" + (" chosen |" if t == best_T else " |")
        for t, v in d["summary"].items())
    alpha_rows = "\n".join(f"| {a} | {r.val['errors']} |" + (" chosen |" if a == alpha else " |")
                           for a, r in d["by_alpha"].items())
    role_rows = "\n".join(
        f"| {n} | {models[n].get('teacher', '-')} | {models[n].get('temperature', '-')} | {models[n].get('alpha', '-')} | "
        f"{fmt(models[n]['val_errors'])} | {fmt(models[n]['test_errors'])} | {REFERENCE_004.get(n, '')} |"
        for n in students)
    aug = (f"the {sizes['split']}-image training split plus {s['augment_copies']} copies shifted by up to "
           f"{s['augment_pixels']} px ({sizes['transfer']} images, fixed once)" if s["augment_copies"]
           else f"the {sizes['split']}-image training split, not augmented (reference 004's conditions)")
    return f"""
Reference 004 (Keras, 20-20 student, Adam, 50 epochs, no augmentation): 368 test errors alone, 331
distilled at T = 3 from its 2x1200 teacher (168 errors), 323 with hard labels (weight 0.7), 340 from its
CNN teacher (97 errors). Paper: best T between 2.5 and 4 for 30-unit layers.

Teachers (trained on jittered inputs, ±{s['teacher_jitter']} px): mlp = `{s['teacher_mlp']}`
({s['teacher_mlp_epochs']} epochs): {records['mlp']['test']['errors']} test errors; cnn = `{s['teacher_cnn']}`
({s['teacher_cnn_epochs']} epochs): {records['cnn']['test']['errors']} test errors.
Transfer set: {aug}.
Students: `{s['student']}` ({models['baseline']['params']} parameters), {s['student_epochs']} epochs each, SGD lr {s['student_lr']},
one-cycle schedule, seeds {seeds}. Distillation: KL·T² on soft targets (alpha = weight of the soft term).

| role | teacher | T | alpha | validation errors | test errors | reference 004 |
|---|---|---|---|---|---|---|
{role_rows}

Hard-label weight for `distilled-{main}+hard`, chosen on validation (seed {seeds[0]}, T = {T:g}):

| alpha (soft weight) | validation errors | |
|---|---|---|
{alpha_rows}

Temperature sweep (soft targets only, {main} teacher, seeds {d['sweep_seeds']}); T chosen by mean validation
errors ({sizes['val']} images); test errors shown for the record:

| T | validation errors | test errors | |
|---|---|---|---|
{sweep_rows}

`distilled-{main}-best-T` is the student at the chosen T = {best_T:g} over all seeds {seeds}.
Plots: `temperature_sweep.png`, `roles.png`.
"""


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train the two teachers; train the student alone; distil it from the second teacher at T; distil it from
    the main teacher, choosing the hard-label weight and T on validation; summarise."""
    bundle, train = _load(s, ctx)
    val, test = bundle.val, bundle.test
    teachers, records, main_net = _train_teachers(s, ctx, bundle, train)
    main, other = s["main_teacher"], "mlp" if s["main_teacher"] == "cnn" else "cnn"
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    cohort = _Cohort(s, ctx, bundle, train, teachers)
    T = float(s["temperature"])
    baseline = cohort.train_together(None, [("baseline", seed, 1.0, 1.0) for seed in seeds])
    from_other = cohort.train_together(other, [(f"distilled-{other}-T{T:g}", seed, T, 1.0) for seed in seeds])
    d = _distil_and_choose(s, cohort, main, seeds)

    models = _roles(s, records, baseline, from_other, d, main, other)
    best_T = d["best_T"]
    _plot_sweep(ctx.out / "temperature_sweep.png", d["summary"], models["baseline"], best_T,
                f"{s['student']} student distilled from the {main} teacher at each T", len(val), len(test))
    _plot_roles(ctx.out / "roles.png", models, [n for n in models if not n.startswith("teacher")])
    md = _markdown(s, models, records, d, main, seeds,
                   {"split": len(bundle.train), "transfer": len(train), "val": len(val)})
    extra = {"chosen_alpha": d["alpha"], "chosen_temperature": best_T, "main_teacher": main,
             "transfer_set": {"name": train.name, "images": len(train), "augment_copies": s["augment_copies"]},
             "validation_errors_by_alpha": {str(a): r.val["errors"] for a, r in d["by_alpha"].items()},
             "sweep": {str(t): v for t, v in d["summary"].items()},
             "teachers": {k: {kk: vv for kk, vv in v.items() if kk != "test"} for k, v in records.items()}}
    # The main teacher, the first seed's student at the temperature chosen on validation, and its baseline.
    shown = {
        f"teacher {records[main]['spec']}": main_net,
        f"distilled {s['student']} ({main} teacher, T={best_T:g})": d["at_best"][0].model,
        f"student alone {s['student']}": baseline[0].model,
    }
    return finish(ctx, NAME, models, md, extra, shown, test)
