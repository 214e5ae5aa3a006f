"""The NNFwP "student-teacher" article on MNIST, and its open question.

Part 1 follows the article: a 784-16-16-10 LeakyReLU teacher trained with cross-entropy (plain SGD,
lr 0.03, one sample per step, one pass over the data); the "benchmark", a 784-10 net trained directly
on the labels the same way at lr 0.001; six 784-10 students trained by mean squared error on the
teacher's outputs (logits) at learning rates 0.001 ... 0.3, one pass, all fed from one cached teacher
pass over the data. The article: teacher ~86.7%, benchmark ~90%, students ~82% with the two largest
rates collapsing. It asked whether any student can beat the benchmark.

Part 2 answers it under a fair budget: the student and the benchmark get the same data, one pass, the
same plain SGD with one sample per step; each gets its learning rate (and the student its T, soft-term
weight and loss) chosen on the validation split with the first seed; then both are trained with every
seed. The student learns from the library's softened losses (KL·T², optionally mixed with the labels)
instead of MSE on raw outputs. Its teacher has the article's architecture but is trained to convergence
(mini-batches, several epochs): the one-pass teacher is about as accurate as the benchmark itself, so
it has little to teach. Only the student's budget is compared; the teacher's is reported. A student
"beats the benchmark" when its mean test accuracy over the seeds is higher.

One-sample steps are Python-overhead bound, so the nets that differ only in seed, learning rate, temperature
or soft weight train together in one stacked pass (:func:`kdistill.sweeps.multi.fit_grid`; each equals its solo
``fit`` up to float rounding): every seed's teachers of each kind in one pass; per seed, the article's
benchmark with the six MSE students; the whole search (student grid and benchmark rates) in one pass per
loss kind; per later seed, the chosen benchmark with the chosen student. A benchmark shares its seed's
distillation pass as a student with soft weight alpha = 0, i.e. trained on the labels alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data import TensorData
from kdistill.engine import FitResult, TrainConfig
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import finish, kd
from kdistill.outputs.results import role_metrics, save_figure, summarize
from kdistill.sweeps.grid import TEACHER_SEED_OFFSET, choose_best, grid, intra_op_threads, label, seed_list, select
from kdistill.sweeps.multi import fit_grid
from kdistill.teachers.base import ModuleTeacher

NAME = "nnfwp"
DESCRIPTION = "MNIST 784-16-16-10 teacher, 784-10 benchmark and MSE students (NNFwP article); a distilled 784-10 that beats the benchmark"


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    """``n`` values from ``lo`` to ``hi``, evenly spaced on a log scale, to 3 significant digits."""
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)]


_COMMON: dict[str, Any] = {
    "seed": 0,
    "val_size": 5000,
    "teacher": "mlp:16,16,activation=leaky_relu",
    "teacher_lr": 0.03,
    "student": "linear",
    "benchmark_lr": 0.001,
    "student_lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
    "batch_size": 1,
    "epochs": 1,
    # Part 2's teacher: same spec, SGD with momentum and mini-batches (0 epochs: reuse the article's teacher).
    "part2_teacher_batch_size": 64,
    "part2_teacher_lr": 0.05,
    # Part 2's students and benchmark: the same plain SGD and one pass, with the rate decayed to zero over the
    # pass (constant: the article's rate schedule). The last one-sample steps then add little noise.
    "part2_schedule": "cosine",
    "threads": 1,  # torch intra-op threads: one-sample steps on a 784-10 net gain nothing from more
}
PROFILES: dict[str, dict[str, Any]] = {
    # One pass over 10,000 training images, a small search and two seeds.
    "quick": {
        **_COMMON,
        "train_size": 10000,
        "seeds": 2,
        "part2_teacher_epochs": 5,
        "search_benchmark_lrs": [0.02, 0.05],
        "search_student_lrs": [0.05],
        "search_temperatures": [1.0, 2.0],
        "search_alphas": [1.0],
        "search_losses": ["kl"],
    },
    # The article's setting (one pass over all 55,000 training images) with five seeds. Stacked, this is 12
    # passes (2 of teachers, 5 of part 1, 1 search, 4 of part 2) instead of ~70 solo runs: about 8 min on one
    # core. The search, cheap when stacked, is wide: 60 student settings (5 rates x 4 temperatures x 3 soft
    # weights) and, for an equal validation budget, 60 benchmark rates log-spaced over 0.003 ... 0.6.
    "full": {
        **_COMMON,
        "train_size": None,
        "seeds": 5,
        "part2_teacher_epochs": 10,
        "search_benchmark_lrs": _logspace(0.003, 0.6, 60),
        "search_student_lrs": [0.01, 0.02, 0.05, 0.1, 0.2],
        "search_temperatures": [1.0, 2.0, 4.0, 8.0],
        "search_alphas": [1.0, 0.7, 0.4],
        "search_losses": ["kl"],
    },
}


def student_grid(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Part 2's student search, in order of preference (a tie on validation goes to the first): soft-term kind,
    temperature, soft weight alpha and learning rate, as the profile lists them."""
    return grid(
        loss=s["search_losses"],
        T=[float(t) for t in s["search_temperatures"]],
        alpha=[float(a) for a in s["search_alphas"]],
        lr=[float(v) for v in s["search_student_lrs"]],
    )


def benchmark_rates(s: dict[str, Any]) -> list[float]:
    """Part 2's benchmark search: its learning rates ascending (a tie on validation goes to the lower rate)."""
    return sorted(float(lr) for lr in s["search_benchmark_lrs"])


def _config(s: dict[str, Any], lr: float, seed: int, schedule: str = "constant") -> TrainConfig:
    """The article's optimiser: plain SGD (no momentum), one pass, ``batch_size`` samples per step."""
    return TrainConfig(
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=lr,
        momentum=0.0,
        nesterov=False,
        schedule=schedule,
        seed=seed,
        checkpoint=False,
    )


def _benchmark(s: dict[str, Any], seed: int, lr: float, schedule: str, kind: str) -> tuple[TrainConfig, dict]:
    """The benchmark as a member of its seed's distillation pass: soft weight alpha = 0, so its loss is the
    cross-entropy with the labels alone and it trains exactly as ``fit`` without a teacher would
    (tests/test_multi.py checks this equivalence); ``kind`` is the pass's soft-term kind (it shapes the pass)."""
    return _config(s, lr, seed, schedule), kd(1.0, 0.0, kind)


def _student(s: dict[str, Any], seed: int, c: dict[str, Any], schedule: str) -> tuple[TrainConfig, dict]:
    """A distilled 784-10 of the search grid's setting ``c``."""
    return _config(s, c["lr"], seed, schedule), kd(c["T"], c["alpha"], c["loss"])


def _record(result, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "val_accuracy": result.val["accuracy"],
        "test_accuracy": result.test["accuracy"],
        "test_errors": result.test["errors"],
        "test": result.test,
    }


def _pct(values: list[float]) -> str:
    summary = summarize(values)
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def _plot(s, records, teacher_acc, chosen_student, path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    lrs = s["student_lrs"]
    accs = [
        summarize([100 * r["test_accuracy"] for r in select(records, part=1, role="mse-student", lr=lr)]) for lr in lrs
    ]
    left.errorbar(
        lrs,
        [a["mean"] for a in accs],
        yerr=[a["std"] for a in accs],
        marker="o",
        capsize=3,
        label="784-10 student, MSE on teacher outputs",
    )
    bench = summarize([100 * r["test_accuracy"] for r in select(records, part=1, role="benchmark")])
    teach = summarize([100 * a for a in teacher_acc])
    left.axhline(
        bench["mean"], color="tab:green", label=f"784-10 benchmark, lr {s['benchmark_lr']} ({bench['mean']:.1f}%)"
    )
    left.axhline(teach["mean"], color="tab:red", label=f"784-16-16-10 teacher ({teach['mean']:.1f}%)")
    left.set_xscale("log")
    left.set_xlabel("student learning rate")
    left.set_ylabel("test accuracy (%)")
    left.set_title("Part 1: the article's students (one pass, one sample per step)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    roles = [
        ("article benchmark", select(records, part=1, role="benchmark")),
        ("best MSE student", _best_mse(s, records)),
        ("tuned benchmark", select(records, part=2, role="benchmark")),
        ("tuned distilled student", select(records, part=2, role="student", **chosen_student)),
    ]
    names = [n for n, _ in roles]
    vals = [[100 * r["test_accuracy"] for r in rs] for _, rs in roles]
    means = [summarize(v)["mean"] for v in vals]
    right.bar(
        range(len(roles)),
        means,
        yerr=[summarize(v)["std"] for v in vals],
        capsize=4,
        color=["tab:green", "tab:gray", "tab:olive", "tab:blue"],
    )
    for i, v in enumerate(vals):
        right.plot([i] * len(v), v, "k.", alpha=0.6)
    right.set_xticks(range(len(roles)))
    right.set_xticklabels(names, fontsize=8)
    right.set_ylim(min(min(v) for v in vals) - 1.0, max(max(v) for v in vals) + 0.6)
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"784-10 nets, same budget (dots: {s['seeds']} seeds)")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def _best_mse(s, records) -> list[dict[str, Any]]:
    """The part-1 MSE student with the best validation accuracy (for the summary bar only)."""
    part1 = select(records, part=1, role="mse-student")
    best = choose_best(part1, ["lr"], "val_accuracy")["lr"]
    return select(part1, lr=best)


@dataclass
class _Study:
    """What every stage reads (settings, splits, seeds, the run's context) and the records written so far."""

    s: dict[str, Any]
    ctx: RunContext
    train: TensorData
    val: TensorData
    test: TensorData
    seeds: list[int]
    records: list[dict[str, Any]] = field(default_factory=list)

    def one_pass(self, what: str, spec: str, runs: list[tuple[TrainConfig, Any]], teacher=None) -> list[FitResult]:
        """``fit(build_model(spec, seed=cfg.seed), cfg, method=m)`` for every ``(cfg, m)`` of ``runs``, all in
        one stacked pass (:func:`kdistill.sweeps.multi.fit_grid`: each equals its solo ``fit`` up to float
        rounding)."""
        results = fit_grid(spec, self.train, [c for c, _ in runs], teacher=teacher, methods=[m for _, m in runs],
                           val=self.val, test=self.test, progress=self.ctx.progress)
        self.ctx.log(f"{what}: {len(runs)} net(s) `{spec}` in one pass, {results[0].wall_time_s:.1f} s")
        return results


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    with intra_op_threads(s["threads"]):
        return _run(s, ctx)


def _run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Train each seed's teachers; per seed, the article's part 1; then part 2: choose the benchmark's rate and
    the student's setting on validation with the first seed, train both with every later seed; summarise."""
    study = load_mnist(s, ctx)
    t_fits, t2_fits = train_teachers(study)
    choice: dict[str, Any] = {}
    for k, seed in enumerate(study.seeds):
        cached = ModuleTeacher(t_fits[k].model).cache(study.train)  # one teacher pass feeds this seed's students
        ctx.log(f"seed {seed}: teacher {100 * t_fits[k].test['accuracy']:.2f}% test")
        article_part1(study, seed, cached)
        if s["part2_teacher_epochs"]:  # part 2 learns from a converged teacher of the same architecture
            cached = ModuleTeacher(t2_fits[k].model).cache(study.train)
            ctx.log(f"seed {seed}: part-2 teacher {100 * t2_fits[k].test['accuracy']:.2f}% test")
        if k == 0:
            choice = choose_on_validation(study, seed, cached, t2_fits[k].model)
        else:
            train_chosen(study, seed, cached, choice)
    return summarise(study, [r.test for r in t_fits], [r.test for r in t2_fits], choice)


def load_mnist(s: dict[str, Any], ctx: RunContext) -> _Study:
    """MNIST (inputs in [0, 1]) with its validation split, the training split cut to ``train_size``."""
    if s["batch_size"] < 1 or s["epochs"] < 1:
        raise ValueError("batch_size / epochs: must be >= 1")
    seeds = seed_list(s["seed"], s["seeds"])
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    train = bundle.train
    if s["train_size"]:
        train = kdata.stratified_fraction(train, s["train_size"] / len(train), seed=s["seed"])
    ctx.log(f"MNIST: {len(train)} training images (inputs in [0, 1]), {len(bundle.val)} validation, "
            f"{len(bundle.test)} test")
    return _Study(s, ctx, train, bundle.val, bundle.test, seeds)


def train_teachers(study: _Study) -> tuple[list[FitResult], list[FitResult]]:
    """Every seed's article teacher, then every seed's part-2 teacher (the article's when
    ``part2_teacher_epochs`` is 0): they differ only in seed, so each kind trains all seeds in one pass."""
    s = study.s
    t_seeds = [seed + TEACHER_SEED_OFFSET for seed in study.seeds]  # never a student's init or data order
    t_fits = study.one_pass("article teachers", s["teacher"],
                            [(_config(s, s["teacher_lr"], ts), None) for ts in t_seeds])
    if not s["part2_teacher_epochs"]:
        return t_fits, t_fits
    t2_cfgs = [
        TrainConfig(epochs=s["part2_teacher_epochs"], batch_size=s["part2_teacher_batch_size"],
                    lr=s["part2_teacher_lr"], seed=ts + TEACHER_SEED_OFFSET, checkpoint=False)
        for ts in t_seeds
    ]
    return t_fits, study.one_pass("part-2 teachers", s["teacher"], [(c, None) for c in t2_cfgs])


def article_part1(study: _Study, seed: int, cached) -> None:
    """Part 1, the article: the benchmark and the six MSE students of one seed, in one pass."""
    s = study.s
    runs = [_benchmark(s, seed, s["benchmark_lr"], "constant", "logit_mse")]
    runs += [(_config(s, lr, seed), kd(1.0, 1.0, "logit_mse")) for lr in s["student_lrs"]]
    rs = study.one_pass(f"seed {seed}: part 1", s["student"], runs, cached)
    study.records.append(_record(rs[0], part=1, role="benchmark", seed=seed, lr=s["benchmark_lr"]))
    for lr, r in zip(s["student_lrs"], rs[1:]):
        study.records.append(_record(r, part=1, role="mse-student", seed=seed, lr=lr))
    study.ctx.log(
        f"seed {seed}: benchmark {100 * rs[0].test['accuracy']:.2f}%, MSE students "
        + ", ".join(f"{100 * r.test['accuracy']:.1f}" for r in rs[1:])
        + " % test"
    )


def search(study: _Study, seed: int, cached) -> tuple[list[FitResult], dict[float, FitResult]]:
    """Part 2's search with the first seed: one pass per soft-term kind (the kind shapes the pass), the
    benchmark's rates riding in the first. Returns the students in grid order and the benchmarks by rate."""
    s = study.s
    settings, rates = student_grid(s), benchmark_rates(s)
    students: dict[int, FitResult] = {}
    benchmarks: dict[float, FitResult] = {}
    for j, kind in enumerate(dict.fromkeys(c["loss"] for c in settings)):
        idx = [i for i, c in enumerate(settings) if c["loss"] == kind]
        runs = [_benchmark(s, seed, lr, s["part2_schedule"], kind) for lr in rates] if j == 0 else []
        n_bench = len(runs)
        runs += [_student(s, seed, settings[i], s["part2_schedule"]) for i in idx]
        what = f"seed {seed}: search, loss {kind}" + (", with the benchmark's rates" if n_bench else "")
        rs = study.one_pass(what, s["student"], runs, cached)
        for lr, r in zip(rates, rs[:n_bench]):
            study.records.append(_record(r, part=2, role="benchmark-search", seed=seed, lr=lr))
            benchmarks[lr] = r
        students.update(zip(idx, rs[n_bench:]))
    for i, c in enumerate(settings):
        study.records.append(_record(students[i], part=2, role="student-search", seed=seed, **c))
    return [students[i] for i in range(len(settings))], benchmarks


def choose_on_validation(study: _Study, seed: int, cached, teacher) -> dict[str, Any]:
    """Run the search and choose the benchmark's rate and the student's setting on validation
    (:func:`~kdistill.sweeps.grid.choose_best`); the chosen runs become the first seed's part-2 records.
    Returns the choice and, for the deployment table, the chosen nets and the teacher they learned from."""
    s, records = study.s, study.records
    students, benchmarks = search(study, seed, cached)
    bench_lr = choose_best(select(records, role="benchmark-search"), ["lr"], "val_accuracy")["lr"]
    student = choose_best(select(records, role="student-search"), ["loss", "T", "alpha", "lr"], "val_accuracy")
    study.ctx.log(f"chosen on validation: benchmark lr {bench_lr}; student {label(student)}")
    for rec in select(records, role="benchmark-search", lr=bench_lr):
        records.append({**rec, "role": "benchmark"})
    for rec in select(records, role="student-search", **student):
        records.append({**rec, "role": "student"})
    teacher_name = f"teacher {s['teacher']}" + (" (part 2, converged)" if s["part2_teacher_epochs"] else "")
    shown = {
        teacher_name: teacher,
        f"distilled {s['student']} ({label(student)})": students[student_grid(s).index(student)].model,
        f"student alone {s['student']} (tuned benchmark, lr={bench_lr:g})": benchmarks[bench_lr].model,
    }
    return {"benchmark_lr": bench_lr, "student": student, "shown": shown}


def train_chosen(study: _Study, seed: int, cached, choice: dict[str, Any]) -> None:
    """Part 2 with a later seed: the chosen benchmark and the chosen student, in one pass."""
    s, c = study.s, choice["student"]
    rb, rst = study.one_pass(
        f"seed {seed}: part 2",
        s["student"],
        [_benchmark(s, seed, choice["benchmark_lr"], s["part2_schedule"], c["loss"]),
         _student(s, seed, c, s["part2_schedule"])],
        cached,
    )
    study.records.append(_record(rb, part=2, role="benchmark", seed=seed, lr=choice["benchmark_lr"]))
    study.records.append(_record(rst, part=2, role="student", seed=seed, **c))


def compare(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuned student against the tuned and the article's benchmark: mean test-accuracy gaps (points) and
    the per-seed differences."""
    p2_bench = select(records, part=2, role="benchmark")
    p2_student = select(records, part=2, role="student")
    p1_bench = select(records, part=1, role="benchmark")
    student_mean = summarize([100 * r["test_accuracy"] for r in p2_student])["mean"]
    gain = student_mean - summarize([100 * r["test_accuracy"] for r in p2_bench])["mean"]
    gain_article = student_mean - summarize([100 * r["test_accuracy"] for r in p1_bench])["mean"]
    per_seed = [
        100 * (a["test_accuracy"] - b["test_accuracy"])
        for a, b in zip(sorted(p2_student, key=lambda r: r["seed"]), sorted(p2_bench, key=lambda r: r["seed"]))
    ]
    return {"gain": gain, "gain_article": gain_article, "per_seed": per_seed, "wins": sum(d > 0 for d in per_seed),
            "beats": gain > 0}


def _models(s, records, teacher_tests, part2_teacher_tests, choice) -> dict[str, dict[str, Any]]:
    """results.json's roles: test errors and accuracy over seeds, with each net's spec and setting."""
    keys = ("errors", "accuracy")
    models: dict[str, dict[str, Any]] = {
        "teacher": {**role_metrics(teacher_tests, keys), "spec": s["teacher"], "lr": s["teacher_lr"]},
        "benchmark": {**role_metrics([r["test"] for r in select(records, part=1, role="benchmark")], keys),
                      "spec": s["student"], "lr": s["benchmark_lr"]},
    }
    for lr in s["student_lrs"]:
        runs = select(records, part=1, role="mse-student", lr=lr)
        models[f"mse-student-lr{lr:g}"] = {**role_metrics([r["test"] for r in runs], keys), "spec": s["student"],
                                           "lr": lr, "loss": "logit_mse"}
    models["part2-teacher"] = {**role_metrics(part2_teacher_tests, keys), "spec": s["teacher"],
                               "epochs": s["part2_teacher_epochs"] or s["epochs"]}
    models["tuned-benchmark"] = {**role_metrics([r["test"] for r in select(records, part=2, role="benchmark")], keys),
                                 "spec": s["student"], "lr": choice["benchmark_lr"]}
    models["distilled"] = {**role_metrics([r["test"] for r in select(records, part=2, role="student")], keys),
                           "spec": s["student"], **choice["student"]}
    return models


def _tables(s, records, choice) -> dict[str, str]:
    """results.md's rows: part 1's MSE students, part 2's student search and benchmark search."""
    chosen, bench_lr = choice["student"], choice["benchmark_lr"]
    mse_rows = "\n".join(
        f"| {lr:g} | {_pct([r['test_accuracy'] for r in select(records, part=1, role='mse-student', lr=lr)])} |"
        for lr in s["student_lrs"]
    )
    search_rows = "\n".join(
        f"| {r['loss']} | {r['T']:g} | {r['alpha']:g} | {r['lr']:g} | {100 * r['val_accuracy']:.2f} |"
        + (" chosen |" if all(r[k] == chosen[k] for k in chosen) else " |")
        for r in select(records, role="student-search")
    )
    bench_rows = "\n".join(
        f"| {r['lr']:g} | {100 * r['val_accuracy']:.2f} |" + (" chosen |" if r["lr"] == bench_lr else " |")
        for r in select(records, role="benchmark-search")
    )
    return {"mse": mse_rows, "search": search_rows, "bench": bench_rows}


def _markdown(study: _Study, teacher_tests, part2_teacher_tests, choice, cmp: dict[str, Any]) -> str:
    s, records, seeds = study.s, study.records, study.seeds
    rows = _tables(s, records, choice)
    p1_bench = select(records, part=1, role="benchmark")
    n = len(seeds)
    t2_text = (
        f"`{s['teacher']}` trained for {s['part2_teacher_epochs']} epochs (batch {s['part2_teacher_batch_size']}, "
        f"SGD lr {s['part2_teacher_lr']} with momentum)"
        if s["part2_teacher_epochs"]
        else "the article's teacher"
    )
    return f"""
Article (NNFwP, from-scratch NumPy): teacher ~86.7%, benchmark ~90%, MSE students 82.0 / 82.7 / 82.6 / 82.3 /
69.4 / 36.6% at learning rates 0.001 ... 0.3. Open question: can a 784-10 student beat the benchmark?

{len(study.train)} training images, one pass, {s["batch_size"]} sample(s) per plain SGD step (no momentum);
inputs in [0, 1]. Test accuracy in %, mean ± std over {n} seed(s) {seeds}; each seed trains its own teachers,
whose outputs are computed once and shared by all that seed's students.

## Part 1: the article (constant learning rates)

Teacher `{s["teacher"]}` (lr {s["teacher_lr"]}): {_pct([t["accuracy"] for t in teacher_tests])}.
Benchmark `{s["student"]}` trained directly (lr {s["benchmark_lr"]}): {_pct([r["test_accuracy"] for r in p1_bench])}.

| student lr (MSE on teacher logits) | test accuracy |
|---|---|
{rows["mse"]}

## Part 2: a distilled 784-10 student against the benchmark, same budget

Both get the same pass over the same images, the same plain SGD and the same {s["part2_schedule"]} rate
schedule. Benchmark learning rate, chosen on validation (seed {seeds[0]}):

| lr | validation accuracy | |
|---|---|---|
{rows["bench"]}

Teacher for part 2: {t2_text}: {_pct([t["accuracy"] for t in part2_teacher_tests])} test.
Distilled student (soft-target loss, temperature, soft weight alpha, learning rate), chosen on validation (seed {seeds[0]}):

| loss | T | alpha | lr | validation accuracy | |
|---|---|---|---|---|---|
{rows["search"]}

Test accuracy over {n} seeds — tuned benchmark (lr {choice["benchmark_lr"]:g}): {_pct([r["test_accuracy"] for r in select(records, part=2, role="benchmark")])};
distilled student ({label(choice["student"])}): {_pct([r["test_accuracy"] for r in select(records, part=2, role="student")])}.
Difference {cmp["gain"]:+.2f} points (student higher on {cmp["wins"]} of {n} seeds; per seed: {", ".join(f"{d:+.2f}" for d in cmp["per_seed"])});
against the article's benchmark (lr {s["benchmark_lr"]}): {cmp["gain_article"]:+.2f} points.
**The distilled student {"beats" if cmp["beats"] else "does not beat"} the tuned benchmark on mean test accuracy.**
Plot: `nnfwp.png`.
"""


def summarise(study: _Study, teacher_tests, part2_teacher_tests, choice: dict[str, Any]) -> dict[str, Any]:
    """The results tail: roles, plot, results.md, results.json and the deployment table."""
    s, ctx, records = study.s, study.ctx, study.records
    cmp = compare(records)
    models = _models(s, records, teacher_tests, part2_teacher_tests, choice)
    _plot(s, records, [t["accuracy"] for t in teacher_tests], choice["student"], ctx.out / "nnfwp.png")
    md = _markdown(study, teacher_tests, part2_teacher_tests, choice, cmp)
    extra = {
        "torch_threads": torch.get_num_threads(),
        "chosen_benchmark_lr": choice["benchmark_lr"],
        "chosen_student": choice["student"],
        "student_minus_benchmark_points": cmp["gain"],
        "student_minus_article_benchmark_points": cmp["gain_article"],
        "per_seed_difference_points": cmp["per_seed"],
        "beats_benchmark": cmp["beats"],
        "records": [{k: v for k, v in r.items() if k != "test"} for r in records],
    }
    return finish(ctx, NAME, models, md, extra, choice["shown"], study.test)
