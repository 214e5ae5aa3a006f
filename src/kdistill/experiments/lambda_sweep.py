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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kdistill import data as kdata
from kdistill.engine import TrainConfig, fit
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import finish, kd
from kdistill.losses import soft_loss
from kdistill.models import build_model
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize
from kdistill.sweeps.grid import (TEACHER_SEED_OFFSET, choose_best, curve_mean_until, first_step_reaching,
                                  intra_op_threads, mean_curve, rank_correlation, seed_list)
from kdistill.teachers.base import ModuleTeacher

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


def lambda_grid(s: dict[str, Any]) -> list[float]:
    """The soft-label weights lambda, ascending: a tie on validation goes to the smaller lambda."""
    return sorted(float(v) for v in s["lambdas"])


def families(s: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The two families, (key, title, soft term): the write-up's T = 1 soft cross-entropy, and KL·T² at the
    higher T that the write-up guessed might help."""
    high = float(s["high_temperature"])
    return [
        ("T1", "T = 1, soft cross-entropy (as the write-up)", {"temperature": 1.0, "loss": "soft_ce"}),
        (f"T{high:g}", f"T = {high:g}, KL·T²", {"temperature": high, "loss": "kl"}),
    ]


def family_settings(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Family key -> its soft term (``temperature``, ``loss``: the soft-term kind), as the roles report them."""
    return {key: setting for key, _, setting in families(s)}


def _config(s: dict[str, Any], epochs: int, seed: int, eval_every_steps: int = 0) -> TrainConfig:
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
        eval_every_steps=eval_every_steps,
    )


def teacher_student_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> dict[str, float]:
    """The soft cross-entropy at T = 1 (the write-up's teacher-student loss) and KL·T² at ``temperature``."""
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
    """Train the teacher; with every seed, the student at every lambda of both families (lambda = 0 once, shared);
    summarise the curves and choose lambda on validation."""
    sweep = load_mnist(s, ctx)
    teacher, t_fit = train_teacher(sweep)
    for seed in sweep.seeds:
        train_students(sweep, seed)
    return summarise(sweep, teacher, t_fit)


@dataclass
class _Sweep:
    """What every stage reads (settings, splits, seeds, lambdas, the teacher's outputs) and the runs so far."""

    s: dict[str, Any]
    ctx: RunContext
    train: kdata.TensorData
    val: kdata.TensorData
    test: kdata.TensorData
    curve_val: kdata.TensorData
    seeds: list[int]
    lambdas: list[float]
    teacher: dict[str, Any] = field(default_factory=dict)  # cached (training split), curve, val, test, entropy
    # family -> lambda -> one run per seed
    by_family: dict[str, dict[float, list[dict[str, Any]]]] = field(default_factory=dict)
    # The first seed's students of the KL·T² family (lambda = 0 included) by lambda: the candidates for the
    # deployment table, whose lambda is only chosen (on validation, over all seeds) once every seed ran.
    first_seed: dict[float, torch.nn.Module] = field(default_factory=dict)


def load_mnist(s: dict[str, Any], ctx: RunContext) -> _Sweep:
    """MNIST with the profile's subsets, the fixed validation subset of the curves, and the declared grid."""
    lambdas = lambda_grid(s)
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
    curve_val = kdata.stratified_fraction(val, min(1.0, s["curve_val_size"] / len(val)), seed=s["seed"])
    ctx.log(f"MNIST: {len(train)} train, {len(val)} validation ({len(curve_val)} for the curves), {len(test)} test")
    by_family = {fam: {lam: [] for lam in lambdas} for fam, _, _ in families(s)}
    return _Sweep(s, ctx, train, val, test, curve_val, seeds, lambdas, by_family=by_family)


def train_teacher(sweep: _Sweep) -> tuple[torch.nn.Module, Any]:
    """The teacher, on the students' training images (the transfer set), and its outputs, computed once."""
    s = sweep.s
    # The teacher gets its own seed: with the students' seed the lambda = 0 student would retrace it exactly.
    t_seed = s["seed"] + TEACHER_SEED_OFFSET
    teacher = build_model(s["teacher"], sweep.train.input_shape, 10, seed=t_seed)
    t_fit = fit(teacher, sweep.train, _config(s, s["teacher_epochs"], t_seed), val=sweep.val, test=sweep.test,
                progress=sweep.ctx.progress)
    sweep.ctx.log(f"teacher {s['teacher']}: {100 * t_fit.test['accuracy']:.2f}% test ({t_fit.wall_time_s:.0f} s)")
    frozen = ModuleTeacher(teacher)
    cached = frozen.cache(sweep.train)  # one teacher pass, shared by every student
    t_curve = frozen.predict(sweep.curve_val)
    sweep.teacher = {
        "cached": cached,
        "curve": t_curve,
        "val": frozen.predict(sweep.val),
        "test": frozen.predict(sweep.test),
        "entropy": float(-(F.softmax(t_curve, 1) * F.log_softmax(t_curve, 1)).sum(1).mean()),
    }
    return teacher, t_fit


def train_students(sweep: _Sweep, seed: int) -> None:
    """One seed: lambda = 0 once (no teacher signal: the same run serves both families), then every lambda > 0
    of each family."""
    shared = train_student(sweep, 0.0, seed, "T1")
    for fam in sweep.by_family:
        sweep.by_family[fam][0.0].append({**shared, "family": fam})
    for fam in sweep.by_family:
        for lam in (x for x in sweep.lambdas if x > 0):
            r = train_student(sweep, lam, seed, fam)
            sweep.by_family[fam][lam].append(r)
            sweep.ctx.log(
                f"{fam} lambda={lam:g} seed {seed}: {100 * r['val_accuracy']:.2f}% validation "
                f"after {r['iterations']} iterations ({r['wall_time_s']:.0f} s)"
            )


def train_student(sweep: _Sweep, lam: float, seed: int, fam: str) -> dict[str, Any]:
    """One student of family ``fam`` at soft weight ``lam`` (0: no teacher), its curve and final accuracies."""
    s, t = sweep.s, sweep.teacher
    model = build_model(s["student"], sweep.train.input_shape, 10, seed=seed)
    rec = CurveRecorder(model, sweep.curve_val, t["curve"], float(s["high_temperature"]))
    rec.record(0)
    cfg = _config(s, s["student_epochs"], seed, eval_every_steps=s["eval_every"])
    soft = family_settings(s)[fam]
    method = kd(soft["temperature"], lam, soft["loss"]) if lam > 0 else None  # lambda = 0: the labels alone
    r = fit(model, sweep.train, cfg, teacher=t["cached"] if lam > 0 else None, method=method,
            progress=sweep.ctx.progress, on_eval=rec)
    if seed == sweep.seeds[0] and (lam == 0 or fam == families(s)[1][0]):
        sweep.first_seed[lam] = model
    v = classification_metrics(predict_logits(model, sweep.val.x), sweep.val.y, t["val"], 1.0, detailed=False)
    te = classification_metrics(predict_logits(model, sweep.test.x), sweep.test.y, t["test"], 1.0, detailed=False)
    return {
        "lambda": lam,
        "seed": seed,
        "family": fam,
        "val_accuracy": v["accuracy"],
        "test": te,
        "test_accuracy": te["accuracy"],
        "test_errors": te["errors"],
        "curve": rec.points,
        "iterations": rec.points[-1]["step"],
        "wall_time_s": r.wall_time_s,
    }


def best_lambda(sweep: _Sweep, fam: str, distilled_only: bool = False) -> float:
    """The lambda of family ``fam`` with the best mean validation accuracy over seeds (``choose_best``; the grid
    is ascending, so a tie goes to the smaller lambda); ``distilled_only``: among lambda > 0."""
    records = [{"lam": lam, "val_accuracy": r["val_accuracy"]} for lam in sweep.lambdas
               if lam > 0 or not distilled_only for r in sweep.by_family[fam][lam]]
    return choose_best(records, ["lam"], "val_accuracy")["lam"]


def family_tables(sweep: _Sweep, early: int, models: dict[str, dict[str, Any]]) -> tuple[dict, dict, dict]:
    """Per family and lambda: the speed summary, a results.md row, the role in ``models`` (added here);
    per family the verdict and the lambda chosen on validation. Returns (tables, verdicts, summary)."""
    s, lambdas = sweep.s, sweep.lambdas
    settings = family_settings(s)
    tables, verdicts, summary = {}, {}, {}
    for fam in sweep.by_family:
        rows = []
        for lam in lambdas:
            runs = sweep.by_family[fam][lam]
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
        verdicts[fam]["best_lambda_on_validation"] = best_lambda(sweep, fam)
    return tables, verdicts, summary


def plots(sweep: _Sweep, early: int, iterations: int) -> None:
    """The accuracy curves (the early window, the whole run) and the teacher-student loss curves."""
    s, fams, by_family, out = sweep.s, [(f, title) for f, title, _ in families(sweep.s)], sweep.by_family, sweep.ctx.out
    _plot_curves(s, fams, by_family, "val_accuracy", "validation accuracy (%)",
                 f"LeNet student, first {early} iterations (mean over {len(sweep.seeds)} seed(s))",
                 out / "accuracy_first_1000.png", until=early)
    _plot_curves(s, fams, by_family, "val_accuracy", "validation accuracy (%)",
                 f"LeNet student, whole run ({iterations} iterations)", out / "accuracy_whole_run.png")
    _plot_curves(s, fams, by_family, lambda fam: "soft_ce_T1" if fam == "T1" else "kl_T2",
                 "teacher-student loss on validation",
                 "Teacher-student loss: soft cross-entropy at T = 1 (left), KL·T² at the higher T (right)",
                 out / "teacher_student_loss.png", log=True)


def _markdown(sweep: _Sweep, t_fit, early: int, iterations: int, tables: dict, verdicts: dict) -> str:
    s, lambdas, seeds, fams = sweep.s, sweep.lambdas, sweep.seeds, families(sweep.s)

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
    return f"""
Write-up (Caffe, MNIST): over the first 1,000 iterations accuracy was highest at λ = 0 and fell as λ grew
(λ = 1 lowest): soft labels slowed training; the teacher-student loss stayed near 80% of its maximum.

Teacher `{s["teacher"]}`: {fmt(100 * t_fit.test["accuracy"])}% test after {s["teacher_epochs"]} epoch(s). Students
`{s["student"]}`, {iterations} iterations (batch {s["batch_size"]}, {len(sweep.train)} training images), SGD lr {s["lr"]},
momentum {s["momentum"]}, weight decay {s["weight_decay"]}; seeds {seeds}. "curve" columns: a fixed subset of {len(sweep.curve_val)}
validation images, measured every {s["eval_every"]} iterations; "final" columns: the whole validation split and test. Accuracies in %, mean ± std over seeds. Teacher entropy
at T = 1 on those images: {sweep.teacher["entropy"]:.3f} nats (the soft cross-entropy's floor).

### {fams[0][1]}

{head}
{tables["T1"]}

### {fams[1][1]}

{head}
{tables[fams[1][0]]}

### Does "soft labels slow training" still hold?

{verdict_line("T1", fams[0][1])}
{verdict_line(fams[1][0], fams[1][1])}

Plots: `accuracy_first_1000.png`, `accuracy_whole_run.png`, `teacher_student_loss.png`.
"""


def summarise(sweep: _Sweep, teacher: torch.nn.Module, t_fit) -> dict[str, Any]:
    """The results tail: roles, tables, verdicts, plots, results.json / results.md and the deployment table."""
    s, ctx, lambdas = sweep.s, sweep.ctx, sweep.lambdas
    iterations = sweep.by_family["T1"][0.0][0]["iterations"]
    early = min(s["early_iterations"], iterations)
    models: dict[str, dict[str, Any]] = {
        "teacher": {**role_metrics([t_fit.test], ("errors", "accuracy")), "spec": s["teacher"]},
    }
    tables, verdicts, summary = family_tables(sweep, early, models)
    plots(sweep, early, iterations)
    md = _markdown(sweep, t_fit, early, iterations, tables, verdicts)
    extra = {
        "torch_threads": torch.get_num_threads(),
        "iterations": iterations,
        "early_iterations": early,
        "teacher_entropy_T1": sweep.teacher["entropy"],
        "verdicts": verdicts,
        "summary": summary,
        "curves": {fam: {f"{lam:g}": [r["curve"] for r in runs[lam]] for lam in lambdas}
                   for fam, runs in sweep.by_family.items()},
    }
    # The teacher, the first seed's KL·T² student at the lambda > 0 best on validation (the same choice as
    # best_lambda_on_validation, which may also be 0) and its lambda = 0 run (no teacher signal).
    high_family = families(s)[1][0]
    lam = best_lambda(sweep, high_family, distilled_only=True)
    shown = {f"teacher {s['teacher']}": teacher,
             f"distilled {s['student']} (lambda={lam:g}, T={float(s['high_temperature']):g})": sweep.first_seed[lam],
             f"student alone {s['student']} (lambda=0)": sweep.first_seed[0.0]}
    return finish(ctx, NAME, models, md, extra, shown, sweep.test)
