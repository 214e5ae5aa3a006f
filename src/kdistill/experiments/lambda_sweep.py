"""Soft-label weight lambda on MNIST with Caffe's LeNet as teacher and student (the Caffe write-up).

The write-up trained a LeNet student on (1 - lambda) * hard cross-entropy + lambda * teacher-student
cross-entropy at T = 1, for lambda = 0, 0.1, ..., 1, and found that over the first 1,000 iterations the
accuracy was lower the higher lambda: "soft labels slow training". It guessed that a higher
temperature (with KL instead of cross-entropy) might change that. This experiment runs both families
with the same student, seeds, data order and optimiser:

* T = 1 with the soft cross-entropy (``soft_ce``; same gradients as KL, which differs by the teacher's
  entropy), as in the write-up;
* a higher T with KL·T² (``kl``), the Hinton et al. recipe.

Accuracy and the teacher-student loss are measured on a fixed validation subset every few iterations;
final accuracies on the whole validation split and on test. lambda = 0 uses no teacher signal, so it is
trained once per seed and shared by both families. Caffe's solver is mirrored: SGD, lr 0.01, momentum
0.9, weight decay 5e-4, batch 64 (Caffe's "inv" decay changes the rate by under 10% in 1,000 iterations;
a constant rate is used).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdistill import data as kdata
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.models import build_model
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize, write_results
from kdistill.sweeps.grid import TEACHER_SEED_OFFSET, choose_best, curve_mean_until, first_step_reaching, intra_op_threads, mean_curve, rank_correlation, seed_list
from kdistill.teachers.base import ModuleTeacher
from kdistill.engine import TrainConfig, fit
from kdistill.experiments import RunContext

NAME = "lambda-sweep"
DESCRIPTION = (
    "MNIST LeNet->LeNet: soft-label weight lambda 0..1 at T=1 (soft CE) and at a higher T (KL·T²); learning curves"
)

_COMMON: dict[str, Any] = {
    "seed": 0,
    "val_size": 5000,
    "curve_val_size": 1000,
    "teacher": "caffe_lenet",
    "student": "caffe_lenet",
    "batch_size": 64,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "high_temperature": 4.0,
    "early_iterations": 1000,
    "reach_accuracy": 0.95,
}
PROFILES: dict[str, dict[str, Any]] = {
    # 4 lambdas, 300 iterations on a 9,600-image training subset, smaller evaluation sets, one seed:
    # the curves' shape in a few minutes.
    "quick": {
        **_COMMON,
        "lambdas": [0.0, 0.1, 0.5, 1.0],
        "train_size": 9600,
        "teacher_epochs": 2,
        "student_epochs": 2,
        "eval_every": 30,
        "val_size": 2000,
        "curve_val_size": 500,
        "threads": 1,  # robust on a busy machine; full uses every core
        "test_size": 2000,
        "seeds": 1,
    },
    # All 11 lambdas, 3 epochs (2,577 iterations) on the full training split, three seeds: 64 LeNet trainings,
    # about 1.5 h on 2 idle cores (3.5 h on a busy shared machine).
    "full": {
        **_COMMON,
        "lambdas": [round(0.1 * i, 1) for i in range(11)],
        "train_size": None,
        "teacher_epochs": 10,
        "student_epochs": 3,
        "eval_every": 50,
        "test_size": None,
        "seeds": 3,
        "threads": None,  # the process default (every core)
    },
}


def _config(s: dict[str, Any], epochs: int, seed: int, **distill: Any) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=s["batch_size"],
        lr=s["lr"],
        momentum=s["momentum"],
        nesterov=False,
        weight_decay=s["weight_decay"],
        schedule="constant",
        seed=seed,
        checkpoint=False,
        **distill,
    )


def teacher_student_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> dict[str, float]:
    """The soft cross-entropy at T = 1 (the write-up's teacher-student loss) and KL·T² at ``temperature``."""
    from kdistill.losses import soft_loss

    return {
        "soft_ce_T1": float(soft_loss(logits, teacher_logits, temperature=1.0, kind="soft_ce")),
        "kl_T2": float(soft_loss(logits, teacher_logits, temperature=temperature, kind="kl")),
    }


class CurveRecorder:
    """``on_eval`` callback: validation accuracy and teacher-student losses of ``model`` at each evaluation step."""

    def __init__(self, model: torch.nn.Module, val: kdata.TensorData, teacher_logits: torch.Tensor, temperature: float):
        self.model, self.val, self.teacher_logits, self.temperature = model, val, teacher_logits, temperature
        self.points: list[dict[str, float]] = []

    def record(self, step: int) -> None:
        if self.points and self.points[-1]["step"] == step:
            return  # the end-of-epoch evaluation can fall on an evaluation step
        logits = predict_logits(self.model, self.val.x)
        acc = float((logits.argmax(1) == self.val.y).float().mean())
        self.points.append(
            {"step": step, "val_accuracy": acc, **teacher_student_losses(logits, self.teacher_logits, self.temperature)}
        )

    def __call__(self, row: dict[str, Any]) -> None:
        self.record(int(row["step"]))


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    return mean_curve([[(p["step"], p[key]) for p in r["curve"]] for r in runs])


def _plot_curves(s, families, by_family, key, ylabel, title, path, until=None, log=False) -> None:
    """One panel per family, one line per lambda (mean over seeds); accuracy plots get a zoomed second row."""
    import matplotlib.pyplot as plt

    zoom = not log
    rows = 2 if zoom else 1
    fig, axes = plt.subplots(rows, len(families), figsize=(6.2 * len(families), 4.0 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    lambdas = s["lambdas"]
    tail_values: list[float] = []
    for col, (fam, fam_title) in enumerate(families):
        k = key(fam) if callable(key) else key
        scale = 100.0 if k == "val_accuracy" else 1.0
        for lam in lambdas:
            steps, mean, _ = _curve(by_family[fam][lam], k)
            pts = [
                (st, scale * m) for st, m in zip(steps, mean) if (until is None or st <= until) and (m > 0 or not log)
            ]
            color = cmap(lam / max(1e-9, max(lambdas)))
            for row in range(rows):
                axes[row][col].plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"λ = {lam:g}")
            tail_values += [v for st, v in pts[len(pts) // 4 :]]
        axes[0][col].set_title(fam_title, fontsize=10)
        for row in range(rows):
            ax = axes[row][col]
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel + (" (zoomed)" if row else ""))
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    if zoom and tail_values:
        lo, hi = min(tail_values), max(tail_values)
        for ax in axes[1]:
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    if zoom:  # the full-range row shares one scale across families
        limits = [ax.get_ylim() for ax in axes[0]]
        for ax in axes[0]:
            ax.set_ylim(min(lo for lo, _ in limits), max(hi for _, hi in limits))
    axes[0][-1].legend(fontsize=8, ncol=2, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _pct(summary: dict[str, Any]) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def _speed(runs: list[dict[str, Any]], early: int, reach: float, loss_key: str) -> dict[str, Any]:
    """How fast and how far one lambda's students learned: window mean, window-end and final accuracies, losses."""
    per_seed = [([p["step"] for p in r["curve"]], [p["val_accuracy"] for p in r["curve"]]) for r in runs]
    at_end = [acc[max(i for i, st in enumerate(steps) if st <= early)] for steps, acc in per_seed]
    steps, acc, _ = _curve(runs, "val_accuracy")
    _, loss, _ = _curve(runs, loss_key)
    return {
        "early_mean_val_accuracy": summarize([curve_mean_until(st, a, early) for st, a in per_seed]),
        "val_accuracy_at_early_end": summarize(at_end),
        "first_iteration_reaching": first_step_reaching(steps, acc, reach),
        "val_accuracy": summarize([r["val_accuracy"] for r in runs]),
        "test_accuracy": summarize([r["test_accuracy"] for r in runs]),
        "teacher_student_loss_first": loss[0],
        "teacher_student_loss_last": loss[-1],
        "teacher_student_loss_max": max(loss),
    }


def _verdict(lambdas: list[float], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Does accuracy early in training fall as lambda grows? Judged on the window mean and the window-end accuracy.

    A measure says "slower" when its rank correlation with lambda is <= -0.5 and the largest lambda is below
    lambda = 0 by more than the larger of their seed standard deviations. Both: holds; one: partly; none: does not.
    """
    out: dict[str, Any] = {}
    slower = 0
    for name, key in (("window_mean", "early_mean_val_accuracy"), ("window_end", "val_accuracy_at_early_end")):
        first, last = rows[f"{lambdas[0]:g}"][key], rows[f"{lambdas[-1]:g}"][key]
        rho = rank_correlation(lambdas, [rows[f"{lam:g}"][key]["mean"] for lam in lambdas])
        diff = 100 * (last["mean"] - first["mean"])
        noise = 100 * max(first["std"], last["std"])
        out[f"spearman_{name}"], out[f"{name}_points"] = rho, diff
        slower += bool(rho <= -0.5 and diff < -noise)
    out["verdict"] = {2: "holds", 1: "holds partly", 0: "does not hold"}[slower]
    return out


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    with intra_op_threads(s["threads"]):
        return _run(s, ctx)


def _run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    lambdas = [float(v) for v in s["lambdas"]]
    if not lambdas or min(lambdas) < 0 or max(lambdas) > 1:
        raise ValueError(f"lambdas: soft-term weights in [0, 1], got {s['lambdas']}")
    if 0.0 not in lambdas:
        raise ValueError("lambdas: must include 0 (ordinary training, the reference curve)")
    if s["high_temperature"] <= 1:
        raise ValueError(f"high_temperature: must be > 1, got {s['high_temperature']}")
    seeds = seed_list(s["seed"], s["seeds"])
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train, val, test = bundle.train, bundle.val, bundle.test
    if s["train_size"]:
        train = kdata.stratified_fraction(train, s["train_size"] / len(train), seed=s["seed"])
    if s["test_size"]:
        test = kdata.stratified_fraction(test, s["test_size"] / len(test), seed=s["seed"])
    transfer = train  # teacher and students see the same training images
    curve_val = kdata.stratified_fraction(val, min(1.0, s["curve_val_size"] / len(val)), seed=s["seed"])
    ctx.log(f"MNIST: {len(train)} train, {len(val)} validation ({len(curve_val)} for the curves), {len(test)} test")

    # The teacher gets its own seed: with the students' seed the lambda = 0 student would retrace it exactly.
    t_seed = s["seed"] + TEACHER_SEED_OFFSET
    teacher = build_model(s["teacher"], bundle.input_shape, 10, seed=t_seed)
    t_fit = fit(teacher, train, _config(s, s["teacher_epochs"], t_seed), val=val, test=test, progress=ctx.progress)
    ctx.log(f"teacher {s['teacher']}: {100 * t_fit.test['accuracy']:.2f}% test ({t_fit.wall_time_s:.0f} s)")
    frozen = ModuleTeacher(teacher)
    cached = frozen.cache(transfer)  # one teacher pass, shared by every student
    t_curve = frozen.predict(curve_val)
    t_val, t_test = frozen.predict(val), frozen.predict(test)
    teacher_entropy = float(-(F.softmax(t_curve, 1) * F.log_softmax(t_curve, 1)).sum(1).mean())

    high = float(s["high_temperature"])
    families = [("T1", "T = 1, soft cross-entropy (as the write-up)"), (f"T{high:g}", f"T = {high:g}, KL·T²")]
    settings = {"T1": {"temperature": 1.0, "loss": "soft_ce"}, f"T{high:g}": {"temperature": high, "loss": "kl"}}
    by_family: dict[str, dict[float, list[dict[str, Any]]]] = {f: {lam: [] for lam in lambdas} for f, _ in families}
    high_family = families[1][0]
    # The first seed's students of the KL·T² family (lambda = 0 included) by lambda: the candidates for the
    # deployment table, whose lambda is only chosen (on validation, over all seeds) once every seed ran.
    first_seed: dict[float, torch.nn.Module] = {}

    def train_one(lam: float, seed: int, fam: str) -> dict[str, Any]:
        model = build_model(s["student"], bundle.input_shape, 10, seed=seed)
        rec = CurveRecorder(model, curve_val, t_curve, high)
        rec.record(0)
        cfg = _config(s, s["student_epochs"], seed, alpha=lam, eval_every_steps=s["eval_every"], **settings[fam])
        r = fit(model, transfer, cfg, teacher=cached if lam > 0 else None, progress=ctx.progress, on_eval=rec)
        if seed == seeds[0] and (lam == 0 or fam == high_family):
            first_seed[lam] = model
        v = classification_metrics(predict_logits(model, val.x), val.y, t_val, 1.0, detailed=False)
        t = classification_metrics(predict_logits(model, test.x), test.y, t_test, 1.0, detailed=False)
        return {
            "lambda": lam,
            "seed": seed,
            "family": fam,
            "val_accuracy": v["accuracy"],
            "test": t,
            "test_accuracy": t["accuracy"],
            "test_errors": t["errors"],
            "curve": rec.points,
            "iterations": rec.points[-1]["step"],
            "wall_time_s": r.wall_time_s,
        }

    for seed in seeds:
        shared = train_one(0.0, seed, "T1")  # no teacher signal: the same run serves both families
        for fam, _ in families:
            by_family[fam][0.0].append({**shared, "family": fam})
        for fam, _ in families:
            for lam in (x for x in lambdas if x > 0):
                by_family[fam][lam].append(train_one(lam, seed, fam))
                r = by_family[fam][lam][-1]
                ctx.log(
                    f"{fam} lambda={lam:g} seed {seed}: {100 * r['val_accuracy']:.2f}% validation "
                    f"after {r['iterations']} iterations ({r['wall_time_s']:.0f} s)"
                )

    iterations = by_family["T1"][0.0][0]["iterations"]
    early = min(s["early_iterations"], iterations)
    models: dict[str, dict[str, Any]] = {
        "teacher": {**role_metrics([t_fit.test], ("errors", "accuracy")), "spec": s["teacher"]},
    }
    tables, verdicts, summary = {}, {}, {}
    for fam, _ in families:
        rows = []
        for lam in lambdas:
            runs = by_family[fam][lam]
            role = "baseline" if lam == 0 else f"{fam}-lambda{lam:g}"
            if role not in models:
                models[role] = {
                    **role_metrics([r["test"] for r in runs], ("errors", "accuracy")),
                    "spec": s["student"],
                    "lambda": lam,
                    **({} if lam == 0 else settings[fam]),
                }
            row = _speed(runs, early, s["reach_accuracy"], "soft_ce_T1" if fam == "T1" else "kl_T2")
            summary.setdefault(fam, {})[f"{lam:g}"] = row
            loss_last, loss_max = row["teacher_student_loss_last"], row["teacher_student_loss_max"]
            rows.append(
                f"| {lam:g} | {_pct(row['early_mean_val_accuracy'])} | {_pct(row['val_accuracy_at_early_end'])} | "
                f"{row['first_iteration_reaching'] if row['first_iteration_reaching'] is not None else 'never'} | "
                f"{_pct(row['val_accuracy'])} | {_pct(row['test_accuracy'])} | "
                f"{loss_last:.3f} ({loss_last / loss_max:.0%} of max) |"
            )
        tables[fam] = "\n".join(rows)
        verdicts[fam] = _verdict(lambdas, summary[fam])
        best_lam = choose_best(
            [{"lam": lam, "val_accuracy": r["val_accuracy"]} for lam in lambdas for r in by_family[fam][lam]],
            ["lam"],
            "val_accuracy",
            tie_break=lambda st: st["lam"],
        )["lam"]
        verdicts[fam]["best_lambda_on_validation"] = best_lam

    _plot_curves(
        s,
        families,
        by_family,
        "val_accuracy",
        "validation accuracy (%)",
        f"LeNet student, first {early} iterations (mean over {len(seeds)} seed(s))",
        ctx.out / "accuracy_first_1000.png",
        until=early,
    )
    _plot_curves(
        s,
        families,
        by_family,
        "val_accuracy",
        "validation accuracy (%)",
        f"LeNet student, whole run ({iterations} iterations)",
        ctx.out / "accuracy_whole_run.png",
    )
    _plot_curves(
        s,
        families,
        by_family,
        lambda fam: "soft_ce_T1" if fam == "T1" else "kl_T2",
        "teacher-student loss on validation",
        "Teacher-student loss: soft cross-entropy at T = 1 (left), KL·T² at the higher T (right)",
        ctx.out / "teacher_student_loss.png",
        log=True,
    )

    def verdict_line(fam: str, title: str) -> str:
        v = verdicts[fam]
        return (
            f"- {title}: Spearman(λ, mean validation accuracy over the first {early} iterations) = "
            f"{fmt(v['spearman_window_mean'])}, λ = {lambdas[-1]:g} minus λ = 0: {v['window_mean_points']:+.2f} points; "
            f"Spearman(λ, accuracy at iteration {early}) = {fmt(v['spearman_window_end'])}, "
            f'{v["window_end_points"]:+.2f} points. "Soft labels slow training" **{v["verdict"]}** here. '
            f"Best λ on validation at the end of the run: {v['best_lambda_on_validation']:g}."
        )

    head = (
        "| λ | curve: mean val. acc., first {e} it. | curve: val. acc. at it. {e} | curve: first it. ≥ {r:.0%} "
        "| final val. acc. "
        "| final test acc. | teacher-student loss, last (share of max) |\n|---|---|---|---|---|---|---|"
    ).format(e=early, r=s["reach_accuracy"])
    md = f"""
Write-up (Caffe, MNIST): over the first 1,000 iterations accuracy was highest at λ = 0 and fell as λ grew
(λ = 1 lowest): soft labels slowed training; the teacher-student loss stayed near 80% of its maximum.

Teacher `{s["teacher"]}`: {fmt(100 * t_fit.test["accuracy"])}% test after {s["teacher_epochs"]} epoch(s). Students
`{s["student"]}`, {iterations} iterations (batch {s["batch_size"]}, {len(transfer)} training images), SGD lr {s["lr"]},
momentum {s["momentum"]}, weight decay {s["weight_decay"]}; seeds {seeds}. "curve" columns: a fixed subset of {len(curve_val)}
validation images, measured every {s["eval_every"]} iterations; "final" columns: the whole validation split and test. Accuracies in %, mean ± std over seeds. Teacher entropy
at T = 1 on those images: {teacher_entropy:.3f} nats (the soft cross-entropy's floor).

### {families[0][1]}

{head}
{tables["T1"]}

### {families[1][1]}

{head}
{tables[families[1][0]]}

### Does "soft labels slow training" still hold?

{verdict_line("T1", families[0][1])}
{verdict_line(families[1][0], families[1][1])}

Plots: `accuracy_first_1000.png`, `accuracy_whole_run.png`, `teacher_student_loss.png`.
"""
    results = write_results(
        ctx.out,
        NAME,
        ctx.profile,
        ctx.elapsed,
        models,
        md,
        extra={
            "torch_threads": torch.get_num_threads(),
            "iterations": iterations,
            "early_iterations": early,
            "teacher_entropy_T1": teacher_entropy,
            "verdicts": verdicts,
            "summary": summary,
            "curves": {
                fam: {f"{lam:g}": [r["curve"] for r in by_family[fam][lam]] for lam in lambdas} for fam, _ in families
            },
        },
    )
    # The teacher, the first seed's KL·T² student at the lambda > 0 best on validation (the same choice and
    # tie-break as best_lambda_on_validation, which may also be 0) and its lambda = 0 run (no teacher signal).
    distilled = [{"lam": lam, "val_accuracy": r["val_accuracy"]} for lam in lambdas if lam > 0
                 for r in by_family[high_family][lam]]
    lam = choose_best(distilled, ["lam"], "val_accuracy", tie_break=lambda st: st["lam"])["lam"]
    shown = {f"teacher {s['teacher']}": teacher,
             f"distilled {s['student']} (lambda={lam:g}, T={high:g})": first_seed[lam],
             f"student alone {s['student']} (lambda=0)": first_seed[0.0]}
    return ctx.deployment(shown, test, results)
