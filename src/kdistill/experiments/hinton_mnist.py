"""Hinton, Vinyals & Dean (2015), section 3: MNIST.

A large net trained with strong regularisation and inputs jittered by up to two pixels is the teacher.
A 2x800 student with no regularisation is trained twice on the same un-jittered training set: once on
the hard labels alone (the baseline), once on the teacher's soft targets at T = 20, mixed with the hard
labels at a weight chosen on the validation split. Both students get the same epochs and optimiser.
The paper: teacher 67 test errors, baseline 146, distilled 74.

Because the transfer set is not augmented, the teacher's logits are computed once and looked up by
sample id for every student and epoch.
"""

from __future__ import annotations

from typing import Any

from .. import data as kdata
from ..evaluate import classification_metrics, predict_logits
from ..models import build_model, count_flops, count_parameters
from ..report import fmt, role_metrics, write_results
from ..teachers import ModuleTeacher
from ..train import TrainConfig, fit
from . import RunContext

NAME = "hinton-mnist"
DESCRIPTION = "MNIST: jittered teacher, 2x800 student alone vs distilled at T=20 (paper: 67 / 146 / 74 errors)"

_COMMON: dict[str, Any] = {
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "teacher_jitter": 2,
    "teacher_lr": 0.05,
    "teacher_weight_decay": 5e-4,
    "student": "mlp:800,800",
    "student_lr": 0.05,
    "temperature": 20.0,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "teacher": "cnn:16,32", "teacher_epochs": 6, "student_epochs": 10, "alphas": [1.0, 0.5], "seeds": 1},
    "paper": {**_COMMON, "teacher": "cnn:32,64", "teacher_epochs": 10, "student_epochs": 30, "alphas": [1.0, 0.9, 0.5], "seeds": 3},
}


def _student_config(s: dict[str, Any], seed: int, alpha: float | None = None) -> TrainConfig:
    distill = {} if alpha is None else {"temperature": s["temperature"], "alpha": alpha}
    return TrainConfig(epochs=s["student_epochs"], batch_size=s["batch_size"], lr=s["student_lr"], seed=seed, **distill)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train, val, test = bundle.train, bundle.val, bundle.test
    ctx.log(f"MNIST: {len(train)} train, {len(val)} validation, {len(test)} test")

    # The teacher: regularised and trained on jittered inputs.
    teacher = build_model(s["teacher"], bundle.input_shape, 10, seed=s["seed"])
    tcfg = TrainConfig(
        epochs=s["teacher_epochs"], batch_size=s["batch_size"], lr=s["teacher_lr"],
        weight_decay=s["teacher_weight_decay"], jitter=s["teacher_jitter"], seed=s["seed"],
    )
    ctx.log(f"teacher {s['teacher']}: {tcfg.epochs} epochs, jitter ±{tcfg.jitter} px")
    t_fit = fit(teacher, train, tcfg, val=val, test=test, out_dir=ctx.out / "teacher", progress=ctx.progress)
    ctx.log(f"teacher: {t_fit.test['errors']} test errors ({t_fit.wall_time_s:.0f} s)")
    cached = ModuleTeacher(teacher).cache(train)  # one teacher pass, shared by every student

    # The hard-label weight (1 - alpha) is chosen on validation with the first seed.
    def distill(seed: int, alpha: float):
        return fit(
            build_model(s["student"], bundle.input_shape, 10, seed=seed), train, _student_config(s, seed, alpha),
            teacher=cached, val=val, test=test, out_dir=ctx.out / f"distilled-a{alpha}-seed{seed}", progress=ctx.progress,
        )

    seeds = [s["seed"] + i for i in range(s["seeds"])]
    by_alpha = {}
    for alpha in s["alphas"]:
        by_alpha[alpha] = distill(seeds[0], alpha)
        ctx.log(f"distilled alpha={alpha}: {by_alpha[alpha].val['errors']} validation errors")
    best_alpha = min(s["alphas"], key=lambda a: (by_alpha[a].val["errors"], -a))
    distilled = [by_alpha[best_alpha]] + [distill(seed, best_alpha) for seed in seeds[1:]]

    baseline = []
    for seed in seeds:
        student = build_model(s["student"], bundle.input_shape, 10, seed=seed)
        baseline.append(fit(student, train, _student_config(s, seed), val=val, test=test,
                            out_dir=ctx.out / f"baseline-seed{seed}", progress=ctx.progress))
        ctx.log(f"baseline seed {seed}: {baseline[-1].test['errors']} test errors")
    for r in distilled:
        ctx.log(f"distilled seed: {r.test['errors']} test errors")

    # Fidelity to the teacher on test, for the record.
    t_test = predict_logits(teacher, test.x)
    agreement = [classification_metrics(predict_logits(r.model, test.x), test.y, t_test, s["temperature"], False)
                 for r in distilled]
    student_model = distilled[0].model
    models = {
        "teacher": {**role_metrics([t_fit.test]), "params": count_parameters(teacher),
                    "flops": count_flops(teacher, bundle.input_shape), "spec": s["teacher"]},
        "baseline": {**role_metrics([r.test for r in baseline]), "spec": s["student"]},
        "distilled": {
            **role_metrics([r.test for r in distilled]), "spec": s["student"],
            "params": count_parameters(student_model), "flops": count_flops(student_model, bundle.input_shape),
            "teacher_agreement": role_metrics([{"agreement": a["teacher_agreement"]} for a in agreement], ("agreement",))["test_agreement"],
        },
    }
    alpha_table = "\n".join(
        f"| {a} | {by_alpha[a].val['errors']} |" + (" chosen |" if a == best_alpha else " |") for a in s["alphas"]
    )
    md = f"""
Paper (Hinton et al. 2015): teacher 67, baseline 146, distilled 74 test errors.

Teacher: `{s['teacher']}`, {s['teacher_epochs']} epochs, jitter ±{s['teacher_jitter']} px.
Students: `{s['student']}`, {s['student_epochs']} epochs each, same optimiser and data (no augmentation),
seeds {seeds}. Distillation at T = {s['temperature']} with KL·T²; soft-target weight alpha chosen on the
{len(val)}-image validation split (seed {seeds[0]}):

| alpha (soft weight) | validation errors | |
|---|---|---|
{alpha_table}

Test errors — teacher: {fmt(models['teacher']['test_errors'])}, baseline: {fmt(models['baseline']['test_errors'])},
distilled: {fmt(models['distilled']['test_errors'])}.
"""
    return write_results(
        ctx.out, NAME, ctx.profile, ctx.elapsed, models, md,
        extra={"chosen_alpha": best_alpha, "temperature": s["temperature"],
               "validation_errors_by_alpha": {str(a): by_alpha[a].val["errors"] for a in s["alphas"]}},
    )
