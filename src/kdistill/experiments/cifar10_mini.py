"""CIFAR-10: Caffe's "quick" model teaches the "mini" model (one conv layer removed) — the Caffe write-up.

The write-up trained the mini model alone (78%) and with a teacher-student cross-entropy term weighted
lambda = 0.1 at T = 1 (77%, ahead early in training, behind at the end), after the quick model had
reached 80-81%. Here the mini model is trained alone and with lambda in {0.05, 0.1} at T = 1 (soft
cross-entropy, as the write-up) and at T = 4 (KL·T²), every student with the same epochs, optimiser and
seeds, no augmentation (Caffe's quick example has none). The best (lambda, T) is the one with the
highest mean validation accuracy; test accuracy is only reported. Inputs are standardised per channel
with the training split's statistics (Caffe's example subtracts the mean image). The teacher is trained
once; its logits are computed once and looked up by sample id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data import DataBundle, TensorData
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.models import build_model, count_flops, count_parameters
from kdistill.outputs.results import role_metrics, save_figure, summarize
from kdistill.sweeps.grid import TEACHER_SEED_OFFSET, choose_best, grid, intra_op_threads, label, seed_list, select
from kdistill.teachers.base import ModuleTeacher
from kdistill.engine import TrainConfig, fit
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import finish, kd

NAME = "cifar10-mini"
DESCRIPTION = (
    "CIFAR-10: Caffe quick model teaches the mini model (one conv removed), lambda 0.05/0.1 at T=1 and T=4"
)

_COMMON: dict[str, Any] = {
    "seed": 0,
    "teacher": "cifar_quick",
    "student": "cifar_mini",
    "batch_size": 100,
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "lambdas": [0.05, 0.1],  # the write-up's two weights (0.5 as well: --set "lambdas=[0.05, 0.1, 0.5]")
    "temperatures": [1.0, 4.0],
}
PROFILES: dict[str, dict[str, Any]] = {
    # Subsets and few epochs: the whole pipeline on 2 CPU cores in a few minutes; numbers far below the paper's.
    "quick": {
        **_COMMON,
        "val_size": 1000,
        "train_size": 4000,
        "test_size": 1000,
        "teacher_epochs": 3,
        "student_epochs": 2,
        "seeds": 1,
        "threads": 1,  # robust on a busy machine; full uses every core
    },
    # All 45,000 training images (5,000 held out for validation), the 10,000 test images, three seeds.
    # Measured: 3,671 s on 2 cores (results/cifar10-mini/full; ~150 s per student on the idle machine, the
    # teacher ~14 min with the cores partly shared). Stops are kept: `--resume` continues.
    "full": {
        **_COMMON,
        "val_size": 5000,
        "train_size": None,
        "test_size": None,
        "teacher_epochs": 15,
        "student_epochs": 10,
        "seeds": 3,
        "threads": None,  # the process default (every core)
    },
}


def standardise(bundle: DataBundle, train: TensorData, test: TensorData) -> tuple[TensorData, TensorData, TensorData]:
    """Per-channel mean/std of ``train`` applied to train, validation and test (new tensors, ids kept)."""
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(d: TensorData) -> TensorData:
        return TensorData((d.x - mean) / std, d.y, d.classes, d.index, d.name)

    assert bundle.val is not None
    return norm(train), norm(bundle.val), norm(test)


def distill_grid(s: dict[str, Any]) -> list[dict[str, float]]:
    """The distilled students' settings in order of preference (a tie on validation goes to the first), T slowest:
    [{"T": 1, "lam": 0.05}, ...]."""
    return grid(T=[float(t) for t in s["temperatures"]], lam=[float(v) for v in s["lambdas"]])


def _config(s: dict[str, Any], epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=s["batch_size"],
        lr=s["lr"],
        momentum=s["momentum"],
        weight_decay=s["weight_decay"],
        schedule=s["schedule"],
        seed=seed,
        checkpoint=False,
    )


def _method(T: float, lam: float) -> dict[str, Any]:
    """A distilled student's ``fit(method=...)``: at T = 1 the write-up's soft cross-entropy, above it KL·T²
    (both have the same gradients at T = 1); ``lam`` is the soft term's weight."""
    return kd(float(T), float(lam), "soft_ce" if T == 1 else "kl")


def _plot(s, teacher_hist, records, chosen, path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    left.plot(
        [h["epoch"] for h in teacher_hist],
        [100 * h["val_accuracy"] for h in teacher_hist],
        "k--",
        label=f"teacher {s['teacher']}",
    )
    configs = [("alone", None, None)] + [("distilled", c["lam"], c["T"]) for c in distill_grid(s)]
    cmap = plt.get_cmap("tab10")
    names, means, stds, colors = [], [], [], []
    for i, (role, lam, T) in enumerate(configs):
        runs = select(records, role=role) if role == "alone" else select(records, role=role, lam=lam, T=T)
        epochs = [h["epoch"] for h in runs[0]["history"]]
        curve = [summarize([r["history"][k]["val_accuracy"] for r in runs])["mean"] for k in range(len(epochs))]
        name = "mini alone" if role == "alone" else f"λ={lam:g}, T={T:g}"
        style = "-" if role == "alone" or T == 1 else ":"
        left.plot(
            epochs, [100 * c for c in curve], style, color=cmap(i), label=name, linewidth=2 if role == "alone" else 1.3
        )
        test = summarize([100 * r["test_accuracy"] for r in runs])
        names.append(name + (" *" if role != "alone" and chosen == {"lam": lam, "T": T} else ""))
        means.append(test["mean"])
        stds.append(test["std"])
        colors.append(cmap(i))
    left.set_xlabel("epoch")
    left.set_ylabel("validation accuracy (%)")
    left.set_title("Mini model: validation accuracy during training (mean over seeds)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    lo = min(m - sd for m, sd in zip(means, stds))
    right.set_ylim(max(0.0, lo - 3), max(m + sd for m, sd in zip(means, stds)) + 2)
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"Mini model, test accuracy ({s['seeds']} seed(s); * = chosen on validation)")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    with intra_op_threads(s["threads"]):
        return _run(s, ctx)


@dataclass
class _Study:
    """What every stage reads (settings, splits, seeds, the teacher) and the students' records so far."""

    s: dict[str, Any]
    ctx: RunContext
    input_shape: tuple[int, ...]
    train: TensorData
    val: TensorData
    test: TensorData
    seeds: list[int]
    teacher: dict[str, Any] = field(default_factory=dict)  # model, record (test, history), cached, test logits
    records: list[dict[str, Any]] = field(default_factory=list)
    first_seed: dict[str, torch.nn.Module] = field(default_factory=dict)  # label -> first seed's model (deployment)


def _run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train the teacher; with every seed, the mini model alone and distilled at every (T, lambda) of the grid;
    choose (lambda, T) on validation; summarise."""
    study = load_cifar10(s, ctx)
    train_teacher(study)
    for seed in study.seeds:
        train_student(study, seed, "alone")
        for c in distill_grid(s):
            train_student(study, seed, "distilled", lam=c["lam"], T=c["T"])
    return summarise(study, choose_on_validation(study.records))


def load_cifar10(s: dict[str, Any], ctx: RunContext) -> _Study:
    """CIFAR-10 with its validation split and the profile's subsets, standardised with the training statistics."""
    if not s["lambdas"] or not all(0 < lam <= 1 for lam in s["lambdas"]):
        raise ValueError(f"lambdas: soft-term weights in (0, 1], got {s['lambdas']}")
    if not s["temperatures"] or min(s["temperatures"]) <= 0:
        raise ValueError(f"temperatures: need T > 0, got {s['temperatures']}")
    seeds = seed_list(s["seed"], s["seeds"])
    bundle = kdata.load("cifar10", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train, test = bundle.train, bundle.test
    if s["train_size"]:
        train = kdata.stratified_fraction(train, s["train_size"] / len(train), seed=s["seed"])
    if s["test_size"]:
        test = kdata.stratified_fraction(test, s["test_size"] / len(test), seed=s["seed"])
    train, val, test = standardise(bundle, train, test)
    ctx.log(f"CIFAR-10: {len(train)} train, {len(val)} validation, {len(test)} test images")
    return _Study(s, ctx, bundle.input_shape, train, val, test, seeds)


def train_teacher(study: _Study) -> None:
    """The quick model, trained once (or taken from an earlier attempt), and its logits computed once."""
    s, ctx = study.s, study.ctx
    # The teacher gets its own seed, so no student starts from the teacher's initial conv weights.
    t_seed = s["seed"] + TEACHER_SEED_OFFSET
    teacher = build_model(s["teacher"], study.input_shape, 10, seed=t_seed)
    t_rec = ctx.store.record("teacher")
    if t_rec is None or not ctx.store.load_into("teacher", teacher):
        t_fit = fit(teacher, study.train, _config(s, s["teacher_epochs"], t_seed), val=study.val, test=study.test,
                    progress=ctx.progress)
        t_rec = {"test": t_fit.test, "history": t_fit.history, "wall_time_s": round(t_fit.wall_time_s, 2)}
        ctx.unit("teacher", t_rec, teacher)
    ctx.log(f"teacher {s['teacher']}: {100 * t_rec['test']['accuracy']:.2f}% test ({t_rec['wall_time_s']:.0f} s)")
    frozen = ModuleTeacher(teacher)
    cached = frozen.cache(study.train)  # one teacher pass over the training images, shared by every student
    study.teacher = {"model": teacher, "record": t_rec, "cached": cached, "test_logits": frozen.predict(study.test)}


def train_student(study: _Study, seed: int, role: str, **fields: Any) -> None:
    """One mini model, alone or distilled at ``fields`` (lam, T); taken from an earlier attempt when stored."""
    s, ctx = study.s, study.ctx
    model = build_model(s["student"], study.input_shape, 10, seed=seed)
    name = label(fields) if fields else "alone"
    key = f"{name}/seed{seed}"
    keep = seed == study.seeds[0]
    stored = ctx.store.record(key)
    if stored is not None and (not keep or ctx.store.load_into(key, model)):
        study.records.append(stored)
        if keep:
            study.first_seed[name] = model
        return
    method = _method(fields["T"], fields["lam"]) if fields else None
    teacher = study.teacher["cached"] if fields else None
    r = fit(model, study.train, _config(s, s["student_epochs"], seed), teacher=teacher, method=method, val=study.val,
            progress=ctx.progress)
    # One test pass gives the accuracy and the agreement with the teacher.
    tm = classification_metrics(predict_logits(model, study.test.x), study.test.y, study.teacher["test_logits"],
                                detailed=False)
    r.test = {k: v for k, v in tm.items() if k not in ("kl_to_teacher", "teacher_agreement")}
    rec = {
        "role": role,
        "seed": seed,
        **fields,
        "val_accuracy": r.val["accuracy"],
        "test_accuracy": r.test["accuracy"],
        "test": r.test,
        "teacher_agreement": tm["teacher_agreement"],
        "wall_time_s": round(r.wall_time_s, 2),
        "history": [{"epoch": h["epoch"], "val_accuracy": h["val_accuracy"]} for h in r.history],
    }
    study.records.append(rec)
    ctx.unit(key, rec, model if keep else None)
    if keep:
        study.first_seed[name] = model
    ctx.log(
        f"mini {role} {label(fields) if fields else ''} seed {seed}: {100 * r.val['accuracy']:.2f}% validation, "
        f"{100 * r.test['accuracy']:.2f}% test ({r.wall_time_s:.0f} s)"
    )


def choose_on_validation(records: list[dict[str, Any]]) -> dict[str, float]:
    """The distilled setting {"lam", "T"} with the best mean validation accuracy over seeds
    (``choose_best``: a tie goes to the setting first in the grid, T slowest, as the profile lists them)."""
    return choose_best(select(records, role="distilled"), ["lam", "T"], "val_accuracy")


def _models(study: _Study, chosen: dict[str, float]) -> dict[str, dict[str, Any]]:
    """results.json's roles: the teacher, the mini model alone, distilled at the chosen and at every setting."""
    s, shape, records = study.s, study.input_shape, study.records
    keys = ("errors", "accuracy")
    models: dict[str, dict[str, Any]] = {
        "teacher": {
            **role_metrics([study.teacher["record"]["test"]], keys),
            "spec": s["teacher"],
            "params": count_parameters(study.teacher["model"]),
            "flops": count_flops(study.teacher["model"], shape),
        },
        "mini-alone": {
            **role_metrics([r["test"] for r in select(records, role="alone")], keys),
            "spec": s["student"],
            "params": count_parameters(build_model(s["student"], shape, 10)),
            "flops": count_flops(build_model(s["student"], shape, 10), shape),
        },
        "mini-distilled": {
            **role_metrics([r["test"] for r in select(records, role="distilled", **chosen)], keys),
            "spec": s["student"],
            "lambda": chosen["lam"],
            "temperature": chosen["T"],
        },
    }
    for cfg in distill_grid(s):
        models[f"mini-lambda{cfg['lam']:g}-T{cfg['T']:g}"] = {
            **role_metrics([r["test"] for r in select(records, role="distilled", **cfg)], keys),
            "spec": s["student"],
            "lambda": cfg["lam"],
            "temperature": cfg["T"],
        }
    return models


def _rows(study: _Study, chosen: dict[str, float]) -> list[str]:
    """results.md's table: validation, test and teacher agreement of every setting (alone first)."""
    rows = []
    for cfg in [None, *distill_grid(study.s)]:
        runs = select(study.records, role="alone") if cfg is None else select(study.records, role="distilled", **cfg)
        val_acc = summarize([100 * r["val_accuracy"] for r in runs])
        test_acc = summarize([100 * r["test_accuracy"] for r in runs])
        agree = summarize([100 * r["teacher_agreement"] for r in runs])
        name = "alone" if cfg is None else f"λ = {cfg['lam']:g}, T = {cfg['T']:g}"
        mark = " chosen" if cfg is not None and cfg == chosen else ""
        rows.append(
            f"| {name} | {val_acc['mean']:.2f} ± {val_acc['std']:.2f} | {test_acc['mean']:.2f} ± {test_acc['std']:.2f} "
            f"| {agree['mean']:.1f} |{mark} |"
        )
    return rows


def _markdown(study: _Study, chosen: dict[str, float], gain: float) -> str:
    s, t_rec = study.s, study.teacher["record"]
    md = f"""
Write-up (Caffe): quick model 80-81%; mini model alone 78%, distilled at λ = 0.1, T = 1: 77% (ahead of the
plain mini model early in training, behind at the end); λ = 0.1 and 0.05 beat normal training of the
quick model itself.

Teacher `{s["teacher"]}`: {100 * t_rec["test"]["accuracy"]:.2f}% test after {s["teacher_epochs"]} epochs. Students
`{s["student"]}`, {s["student_epochs"]} epochs each; SGD lr {s["lr"]} ({s["schedule"]}), momentum {s["momentum"]},
weight decay {s["weight_decay"]}, batch {s["batch_size"]}, no augmentation; {len(study.train)} training,
{len(study.val)} validation, {len(study.test)} test images; seeds {study.seeds}. λ is the soft term's weight. Accuracy in %,
mean ± std over seeds; teacher agreement = share of test images where the student's top class is the teacher's.

| mini model | validation | test | teacher agreement | |
|---|---|---|---|---|
{chr(10).join(_rows(study, chosen))}

Chosen on validation: λ = {chosen["lam"]:g}, T = {chosen["T"]:g}; its test accuracy minus the mini model
alone: {gain:+.2f} points. Plot: `cifar10_mini.png`.
"""
    if study.ctx.store.resumed:
        md += (f"\nResumed (`--resume`): {len(study.ctx.store.resumed)} finished model(s) were taken from an earlier "
               "attempt; the wall time counts that attempt up to its last finished model.\n")
    return md


def summarise(study: _Study, chosen: dict[str, float]) -> dict[str, Any]:
    """The results tail: roles, plot, results.json / results.md and the deployment table."""
    s, ctx, records, t_rec = study.s, study.ctx, study.records, study.teacher["record"]
    models = _models(study, chosen)
    teacher_hist = [{"epoch": h["epoch"], "val_accuracy": h["val_accuracy"]} for h in t_rec["history"]]
    _plot(s, teacher_hist, records, chosen, ctx.out / "cifar10_mini.png")
    gain = (
        summarize([100 * r["test_accuracy"] for r in select(records, role="distilled", **chosen)])["mean"]
        - summarize([100 * r["test_accuracy"] for r in select(records, role="alone")])["mean"]
    )
    extra = {
        "torch_threads": torch.get_num_threads(),
        "chosen": {"lambda": chosen["lam"], "temperature": chosen["T"]},
        "distilled_minus_alone_points": gain,
        "teacher_history": t_rec["history"],
        "resumed_units": list(ctx.store.resumed),
        "records": [{k: v for k, v in r.items() if k != "test"} for r in records],
    }
    shown = {f"teacher {s['teacher']}": study.teacher["model"], f"{s['student']} alone": study.first_seed["alone"],
             f"{s['student']} distilled (λ={chosen['lam']:g}, T={chosen['T']:g})":
                 study.first_seed[label({"lam": chosen["lam"], "T": chosen["T"]})]}
    return finish(ctx, NAME, models, _markdown(study, chosen, gain), extra, shown, study.test)
