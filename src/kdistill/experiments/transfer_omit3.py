"""Hinton, Vinyals & Dean (2015), section 3: a transfer set with no 3s.

The teacher is trained on every digit. The 2x800 student is distilled on the training split with all 3s
removed, so it never sees a 3, only the teacher's soft targets for the other digits, which say how
3-like each of them looks. Its class-3 logit comes out too low; one scalar added to the class-3 output
bias fixes that. The offset is chosen two ways, both without test data:

* (a) on the labelled validation split: the offset with the fewest validation errors;
* (b) without labels: the offset making the student's mean predicted probability of class 3 on the
  validation inputs equal the teacher's on the same inputs.

A student trained on the hard labels of the same transfer set, with the same budget, is the control:
it has no way to know what a 3 is. The paper: 206 test errors (133 on the 1,010 threes) before, 109
(14 on threes, 98.6% right) after raising the class-3 bias by 3.5.

The functions below, up to :func:`run`, are the procedure for any transfer set that lacks classes;
transfer-keep78 uses them with a transfer set of only 7s and 8s.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

import kdistill.models.bias as bias
from kdistill import data as kdata
from kdistill.data.dataset import TensorData
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.models import build_model, count_parameters
from kdistill.outputs.results import fmt, save_figure, summarize
from kdistill.teachers.base import ModuleTeacher
from kdistill.sweeps.multi import fit_many
from kdistill.engine import TrainConfig
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import choose_on_validation, finish, kd
from kdistill.experiments._mnist_teachers import TEACHER_SETTINGS, TeacherRecipe, cache_dir, get_teacher

NAME = "transfer-omit3"
DESCRIPTION = "MNIST: 2x800 student distilled on a transfer set with no 3s, class-3 bias fixed on validation / label-free"

_COMMON: dict[str, Any] = {
    **TEACHER_SETTINGS,
    "student": "mlp:800,800",
    "student_lr": 0.05,
    "omit": [3],
    "baseline": True,
    "transfer_copies": 1,  # > 1: the transfer set plus jittered copies (fixed), student_epochs / copies passes
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "teacher": "cnn:16,32", "teacher_epochs": 2, "student_epochs": 4,
              "temperatures": [20.0], "alphas": [1.0], "seeds": 2},
    # The transfer set plus 9 jittered copies (fixed), 3 passes: as many steps as 30 epochs of it.
    "full": {**_COMMON, "teacher": "cnn:32,64", "teacher_epochs": 8, "student_epochs": 30, "transfer_copies": 10,
             "temperatures": [8.0, 20.0], "alphas": [1.0], "seeds": 3},
    # The paper's protocol: the un-augmented transfer set, 30 epochs.
    "plain": {**_COMMON, "teacher": "cnn:32,64", "teacher_epochs": 8, "student_epochs": 30,
              "temperatures": [20.0], "alphas": [1.0], "seeds": 3},
}

VARIANTS = ("none", "val", "label_free")
VARIANT_LABEL = {"none": "", "val": "+bias(val)", "label_free": "+bias(label-free)"}


def check_classes(values: Any, field: str, num_classes: int = 10) -> list[int]:
    """``values`` as a sorted list of distinct digits, or a ValueError naming ``field`` (before any work)."""
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{field}: give a non-empty list of digits, e.g. --set {field}=[3], got {values!r}")
    out = sorted(set(values))
    if out[0] < 0 or out[-1] >= num_classes or len(out) == num_classes:
        raise ValueError(f"{field}: digits must lie in 0..{num_classes - 1} and leave at least one out, got {values!r}")
    return out


def check_copies(s: dict[str, Any]) -> int:
    """``transfer_copies``, or a ValueError naming it (raised before any training)."""
    copies = s["transfer_copies"]
    if not isinstance(copies, int) or copies < 1 or s["student_epochs"] % copies:
        raise ValueError(f"transfer_copies: a whole number >= 1 dividing student_epochs ({s['student_epochs']}), "
                         f"so every student takes the same steps; got {copies!r}")
    return copies


def load_mnist(s: dict[str, Any], ctx: RunContext):
    """MNIST with the seeded validation split, and the teacher for ``s`` (trained or from the cache)."""
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    ctx.log(f"MNIST: {len(bundle.train)} train, {len(bundle.val)} validation, {len(bundle.test)} test")
    recipe = TeacherRecipe(spec=s["teacher"], epochs=s["teacher_epochs"], lr=s["teacher_lr"],
                           weight_decay=s["teacher_weight_decay"], jitter=s["teacher_jitter"],
                           batch_size=s["batch_size"], seed=s["seed"])
    teacher, record = get_teacher(recipe, bundle.train, bundle.val, bundle.test, ctx, cache_dir(s["teacher_cache"], ctx.out))
    return bundle, teacher, record


def assess(
    model: nn.Module, val: TensorData, test: TensorData, teacher_val: torch.Tensor, classes: list[int], unseen: list[int]
) -> dict[str, Any]:
    """Test metrics of ``model`` as trained and after each offset on ``classes`` (chosen on ``val`` only).

    ``unseen`` are the classes the transfer set lacked; their test errors and accuracy are reported apart.
    """
    val_logits, test_logits = predict_logits(model, val.x), predict_logits(model, test.x)
    offsets = {
        "none": 0.0,
        "val": bias.choose_offset_on_labels(val_logits, val.y, classes).offset,
        "label_free": bias.label_free_offset(val_logits, teacher_val, classes),
    }
    unseen_rows = torch.isin(test.y, torch.tensor(unseen))
    out: dict[str, Any] = {}
    for name, b in offsets.items():
        logits = bias.add_offset(test_logits, classes, b)
        m = classification_metrics(logits, test.y)
        wrong = logits.argmax(1) != test.y
        out[name] = {
            "offset": b,
            "val_errors": int((bias.add_offset(val_logits, classes, b).argmax(1) != val.y).sum()),
            "test_errors": m["errors"],
            "test_accuracy": m["accuracy"],
            "test_error_pct": 100.0 * (1.0 - m["accuracy"]),
            "test_unseen_errors": int(wrong[unseen_rows].sum()),
            "test_unseen_accuracy": float(1.0 - wrong[unseen_rows].float().mean()),
            "per_class_accuracy": m["per_class_accuracy"],
        }
    out["_val_logits"], out["_test_logits"] = val_logits, test_logits
    return out


def train_students(
    s: dict[str, Any],
    ctx: RunContext,
    bundle,
    teacher: nn.Module,
    transfer: TensorData,
    classes: list[int],
    unseen: list[int],
) -> dict[str, Any]:
    """Distilled students (T and alpha chosen on validation after offset (a)) and hard-label baselines.

    Returns the chosen settings, the per-candidate validation errors, one :func:`assess` record per
    student and seed, and under ``nets`` the first seed's chosen distilled student and baseline (None
    without one), for the deployment table. Every student gets the same epochs, optimiser and transfer
    set (with ``transfer_copies > 1``: the transfer set plus jittered copies, fixed once, so the teacher's
    logits are still computed once per image and looked up by sample id).
    """
    val, test = bundle.val, bundle.test
    copies = check_copies(s)
    if copies > 1:  # the transfer set plus jittered copies, fixed once: the teacher still runs once per image
        transfer = kdata.jittered_copies(transfer, copies, s["teacher_jitter"], seed=s["seed"] + 7)
        ctx.log(f"augmented transfer set: {len(transfer)} images ({copies} copies, jitter ±{s['teacher_jitter']} px)")
    cached = ModuleTeacher(teacher).cache(transfer)
    teacher_val = predict_logits(teacher, val.x)
    seeds = [s["seed"] + i for i in range(s["seeds"])]

    def train_pass(jobs: list[tuple[int, float | None, float | None]]) -> list[nn.Module]:
        """Students ``(seed, T, alpha)`` in one stacked pass; ``T=None`` is the hard-label baseline.

        The baseline rides along with soft-target weight 0, i.e. the transfer set's hard labels alone,
        exactly as ``fit`` without a teacher (kdistill.sweeps.multi's guarantee). Every student gets the same
        transfer set, epochs and optimiser; students with the same seed share batches.
        """
        cfgs = [TrainConfig(epochs=s["student_epochs"] // copies, batch_size=s["batch_size"], lr=s["student_lr"],
                            seed=seed, checkpoint=False) for seed, _, _ in jobs]
        methods = [kd(1.0, 0.0) if T is None else kd(T, alpha) for _, T, alpha in jobs]
        names = [f"{'baseline' if T is None else f'distilled-T{T}-a{alpha}'}-seed{seed}" for seed, T, alpha in jobs]
        models = [build_model(s["student"], bundle.input_shape, 10, seed=seed) for seed, _, _ in jobs]
        results = fit_many(models, transfer, cfgs, teacher=cached, methods=methods, val=val, out_dir=ctx.out,
                           names=names, progress=ctx.progress)
        ctx.log(f"{len(jobs)} students in one pass: {results[0].wall_time_s:.0f} s")
        return [r.model for r in results]

    candidates = list(itertools.product(s["temperatures"], s["alphas"]))
    first_nets = dict(zip(candidates, train_pass([(seeds[0], T, a) for T, a in candidates])))
    first = {c: assess(m, val, test, teacher_val, classes, unseen) for c, m in first_nets.items()}
    for (T, alpha), v in first.items():
        ctx.log(f"distilled T={T} alpha={alpha} seed {seeds[0]}: validation errors "
                f"{v['none']['val_errors']} before, {v['val']['val_errors']} after offset {v['val']['offset']:+.2f}")
    # Chosen on validation errors after offset (a); ties go to the candidate that needed less correction
    # (fewer validation errors as distilled), then to the higher T: the order of preference.
    preference = sorted(candidates, key=lambda c: (first[c]["none"]["val_errors"], -c[0]))
    chosen = choose_on_validation({c: first[c]["val"]["val_errors"] for c in preference}, ["temperature", "alpha"])
    jobs = [(seed, *chosen) for seed in seeds[1:]] + ([(seed, None, None) for seed in seeds] if s["baseline"] else [])
    rest_nets = train_pass(jobs) if jobs else []
    rest = [assess(m, val, test, teacher_val, classes, unseen) for m in rest_nets]
    distilled = [first[chosen]] + rest[: len(seeds) - 1]
    baseline = rest[len(seeds) - 1:]
    for name, runs in (("distilled", distilled), ("baseline", baseline)):
        for seed, r in zip(seeds, runs):
            ctx.log(f"{name} seed {seed}: test errors " + ", ".join(
                f"{VARIANT_LABEL[v] or 'as trained'} {r[v]['test_errors']} ({r[v]['test_unseen_errors']} unseen, offset {r[v]['offset']:+.2f})"
                for v in VARIANTS))
    text = (f"{len(transfer)}-image transfer set ({copies} copies: the original and jittered ±{s['teacher_jitter']} px, "
            f"{s['student_epochs'] // copies} passes)" if copies > 1 else f"{len(transfer)}-image transfer set (no augmentation)")
    nets = {"distilled": first_nets[chosen], "baseline": rest_nets[len(seeds) - 1] if baseline else None}
    return {"seeds": seeds, "chosen": chosen, "transfer_text": text, "candidates": first, "distilled": distilled, "baseline": baseline,
            "teacher_val": teacher_val, "nets": nets}


def deployment_models(runs: dict[str, Any], teacher: nn.Module, s: dict[str, Any], classes: list[int],
                      transfer_label: str) -> dict[str, nn.Module]:
    """The deployment table's models: the teacher, the first seed's distilled student as trained and with
    offset (a) folded into its output bias (the headline student), and the hard-label baseline."""
    T, alpha = runs["chosen"]
    distilled, baseline = runs["nets"]["distilled"], runs["nets"]["baseline"]
    name = f"distilled {s['student']} (T={T:g}, alpha={alpha:g})"
    shown = {f"teacher {s['teacher']}": teacher, name: distilled,
             f"{name} +bias(val)": bias.with_logit_offset(distilled, classes, runs["distilled"][0]["val"]["offset"])}
    if baseline is not None:
        shown[f"student alone {s['student']} (hard labels, {transfer_label})"] = baseline
    return shown


_SUMMARY_KEYS = ("test_errors", "test_accuracy", "test_error_pct", "test_unseen_errors", "test_unseen_accuracy",
                 "offset", "val_errors")


def roles(runs: dict[str, Any], teacher: nn.Module, record: dict[str, Any], student_spec: str) -> dict[str, Any]:
    """The ``models`` section of results.json: teacher, then each student role before/after each offset."""
    t = record["test"]
    models: dict[str, Any] = {"teacher": {
        "test_errors": t["errors"], "test_accuracy": t["accuracy"], "test_error_pct": 100 * (1 - t["accuracy"]),
        "seeds": 1, "spec": record["spec"], "params": count_parameters(teacher),
        "loaded_from_cache": record["loaded_from_cache"], "train_wall_time_s": record["train_wall_time_s"]}}
    for name in ("distilled", "baseline"):
        for v in VARIANTS:
            per_seed = [r[v] for r in runs[name]]
            if not per_seed:
                continue
            entry = {k: summarize([p[k] for p in per_seed]) for k in _SUMMARY_KEYS}
            entry.update(seeds=len(per_seed), spec=student_spec)
            models[name + VARIANT_LABEL[v]] = entry
    return models


def table(models: dict[str, Any], unseen_label: str, pct: bool = False) -> str:
    """Markdown table: test errors (or %) overall and on the unseen classes, and the offset, per role."""
    head = "test error %" if pct else "test errors"
    rows = [f"| role | {head} | {unseen_label} errors | {unseen_label} accuracy | offset |", "|---|---|---|---|---|"]
    for role, m in models.items():
        if role == "teacher":
            continue
        overall = m["test_error_pct"] if pct else m["test_errors"]
        acc = m["test_unseen_accuracy"]
        rows.append(f"| {role} | {fmt(overall)} | {fmt(m['test_unseen_errors'])} | "
                    f"{acc['mean']:.3f} ± {acc['std']:.3f} | {fmt(m['offset'])} |")
    return "\n".join(rows)


def plot_offset_curve(path, r: dict[str, Any], val: TensorData, test: TensorData, classes: list[int], title: str):
    """Errors against the offset for one distilled student: validation (used) and test (shown only)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    chosen = [r[v]["offset"] for v in VARIANTS]
    lo, hi = min(chosen) - 4.0, max(chosen) + 4.0
    grid = torch.linspace(lo, hi, 401)
    val_err = bias.errors_at_offsets(r["_val_logits"], val.y, classes, grid)
    test_err = bias.errors_at_offsets(r["_test_logits"], test.y, classes, grid)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(grid, 100 * val_err / len(val), label=f"validation ({len(val)} images): used to choose (a)")
    ax.plot(grid, 100 * test_err / len(test), "--", label=f"test ({len(test)} images): shown only, never used")
    for v, style in (("val", "tab:green"), ("label_free", "tab:red")):
        ax.axvline(r[v]["offset"], color=style, linestyle=":",
                   label=f"{'(a) validation' if v == 'val' else '(b) label-free'}: {r[v]['offset']:+.2f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(f"offset added to the logit(s) of class(es) {classes}")
    ax.set_ylabel("error % (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_per_class(path, runs: list[dict[str, Any]], title: str):
    """Per-class test accuracy of the distilled students (mean over seeds) as trained and after each offset."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.27
    accs = {v: 100 * np.mean([r[v]["per_class_accuracy"] for r in runs], axis=0) for v in VARIANTS}
    low = min(float(a.min()) for a in accs.values())
    for i, v in enumerate(VARIANTS):
        ax.bar(np.arange(10) + (i - 1) * width, accs[v], width,
               label={"none": "as distilled", "val": "(a) offset from validation", "label_free": "(b) label-free offset"}[v])
    ax.set_xticks(range(10))
    ax.set_xlabel("true digit")
    ax.set_ylabel(f"test accuracy % (mean of {len(runs)} seeds)")
    ax.set_ylim(max(0.0, 5 * np.floor((low - 2) / 5)), 100)  # zoomed in when every digit is near 100%
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    save_figure(fig, path)


def candidate_table(runs: dict[str, Any]) -> str:
    rows = ["| T | alpha | validation errors as distilled | after offset (a) | |", "|---|---|---|---|---|"]
    for (T, alpha), r in runs["candidates"].items():
        rows.append(f"| {T} | {alpha} | {r['none']['val_errors']} | {r['val']['val_errors']} |"
                    + (" chosen |" if (T, alpha) == runs["chosen"] else " |"))
    return "\n".join(rows)


def extra_record(runs: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    return {
        "chosen_temperature": runs["chosen"][0], "chosen_alpha": runs["chosen"][1], "seeds": runs["seeds"],
        "validation_errors_by_candidate": {f"T={T},alpha={a}": {v: r[v]["val_errors"] for v in VARIANTS}
                                           for (T, a), r in runs["candidates"].items()},
        "teacher": {k: v for k, v in record.items() if k != "test"} | {"test_errors": record["test"]["errors"]},
    }


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    omit = check_classes(s["omit"], "omit")
    check_copies(s)
    bundle, teacher, record = load_mnist(s, ctx)
    transfer = kdata.omit_classes(bundle.train, omit)
    ctx.log(f"transfer set: {len(transfer)} images, no {omit}")
    runs = train_students(s, ctx, bundle, teacher, transfer, omit, omit)
    models = roles(runs, teacher, record, s["student"])
    test_unseen = int(torch.isin(bundle.test.y, torch.tensor(omit)).sum())
    label = "/".join(map(str, omit)) + "s"
    plot_offset_curve(ctx.out / "offset_curve.png", runs["distilled"][0], bundle.val, bundle.test, omit,
                      f"Distilled without {label} (seed {runs['seeds'][0]}): errors vs class-{label[:-1]} offset")
    plot_per_class(ctx.out / "per_class_accuracy.png", runs["distilled"],
                   f"Student distilled without {label}: test accuracy per digit")
    d, da, db = (models[f"distilled{VARIANT_LABEL[v]}"] for v in VARIANTS)
    md = f"""
Paper (Hinton et al. 2015): 206 test errors (133 of them on the 1,010 threes) before, 109 errors
(14 on threes, 98.6% of threes right) after raising the class-3 bias by 3.5.
Reference 004 (Keras, 20-20 student): 56% of threes right after setting the class-3 bias.

Teacher: `{s['teacher']}`, {s['teacher_epochs']} epochs, jitter ±{s['teacher_jitter']} px, trained on all digits:
{record['test']['errors']} test errors.
Students: `{s['student']}`, {s['student_epochs']} epochs' worth of steps each on the {runs['transfer_text']} without
{label}, seeds {runs['seeds']}. Distilled students use the teacher's soft targets (KL·T²);
the baseline uses the transfer set's hard labels, same budget. T and alpha were chosen on the
{len(bundle.val)}-image validation split (seed {runs['seeds'][0]}, errors after offset (a)):

{candidate_table(runs)}

Offsets on the logit of class {omit}, chosen per student without test data: (a) fewest validation errors
(ties: lowest validation NLL); (b) label-free: the student's mean probability of {label} on the validation
inputs (labels unused) matched to the teacher's.

{table(models, label)}

Headline ({test_unseen} test {label}): distilled {fmt(d['test_errors'])} errors before,
{fmt(da['test_errors'])} after (a), {fmt(db['test_errors'])} after (b); {label} right:
{100 * d['test_unseen_accuracy']['mean']:.1f}% → {100 * da['test_unseen_accuracy']['mean']:.1f}% (a),
{100 * db['test_unseen_accuracy']['mean']:.1f}% (b).

Plots: `offset_curve.png` (errors against the offset; the test curve is drawn for illustration only),
`per_class_accuracy.png` (test accuracy per digit before and after each offset).
"""
    shown = deployment_models(runs, teacher, s, omit, f"no {label}")
    return finish(ctx, NAME, models, md, extra_record(runs, record), shown, bundle.test)
