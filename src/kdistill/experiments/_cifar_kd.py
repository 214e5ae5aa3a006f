"""Shared scaffolding of ``cifar10-kd`` and ``cifar100-kd``: teacher/student pairs, each student trained alone
(``ce``) and with KD, DKD, FitNets and AT from a teacher trained once per run, summarised over seeds.

The two experiment files hold what differs (the data set, the pairs, the budgets, published numbers); this
module holds the protocol they share:

* data: the training split minus a seeded, stratified validation split (reported, never used to choose
  anything), optional stratified subsets, inputs standardised per channel with the training split's
  statistics; ``data: fake`` swaps in a seeded random CIFAR-shaped bundle (tests, pipeline checks);
* per pair, the teacher trained once (same optimiser and augmentation as the students, its own epochs),
  then for every seed every method's student distilling from it *live*: the teacher runs on each augmented
  batch, so FitNets and AT read its features;
* the students' hyper-parameters come from the papers' CIFAR recipes as mdistiller configures them
  (``METHODS``), nothing is tuned here; the DKD warm-up is a share of the student epochs (20/240);
* one role per (pair, method) in ``results.json`` (last-epoch test accuracy over seeds), a Markdown table
  (methods x pairs), a plot with error bars, and how the protocol differs from mdistiller's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.data import DataBundle, TensorData
from kdistill.data.splits import split_validation
from kdistill.models import build_model, count_parameters
from kdistill.outputs.results import save_figure, summarize, write_results
from kdistill.sweeps.grid import TEACHER_SEED_OFFSET, intra_op_threads, seed_list
from kdistill.engine import TrainConfig, fit
from kdistill.experiments import RunContext

# The papers' CIFAR hyper-parameters, as mdistiller's defaults (mdistiller/engine/cfg.py) and configs set them.
METHODS: dict[str, dict[str, Any]] = {
    "ce": {},  # the student alone
    # Hinton et al.: CFG.KD.TEMPERATURE 4, LOSS.CE_WEIGHT 0.1, LOSS.KD_WEIGHT 0.9 -> alpha 0.9 (KL * T^2).
    "kd": {"temperature": 4.0, "alpha": 0.9},
    # Zhao et al.: CFG.DKD CE_WEIGHT 1, ALPHA 1, BETA 8 (the configs set 2 for resnet56/110 students, 6 for
    # wrn:40,2 -> wrn:16,2 and vgg13 -> vgg8; pairs override it), T 4, WARMUP 20 of 240 epochs.
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup_share": 20 / 240},
    # Romero et al.: CFG.FITNET HINT_LAYER 2 (the middle of three stages), LOSS.FEAT_WEIGHT 100, CE_WEIGHT 1.
    "fitnet": {"weight": 100.0, "ce_weight": 1.0, "stage": "middle"},
    # Zagoruyko & Komodakis: CFG.AT P 2, LOSS.FEAT_WEIGHT 1000, CE_WEIGHT 1, every stage (feats[1:]).
    "at": {"beta": 1000.0, "p": 2.0, "ce_weight": 1.0, "stages": "all"},
}
LOSS_TERMS = {"ce": ("ce",), "kd": ("kd", "ce"), "dkd": ("dkd", "ce"), "fitnet": ("hint", "ce"), "at": ("at", "ce")}
"""The loss terms each method logs (``loss_<term>`` in the students' per-epoch metrics)."""
LABELS = {"ce": "student alone (CE)", "kd": "KD", "dkd": "DKD", "fitnet": "FitNets", "at": "AT"}

# Shared by both experiments' profiles: mdistiller's optimiser (lr 0.05 at batch 64, scaled linearly).
COMMON: dict[str, Any] = {
    "seed": 0,
    "data": "cifar",  # "cifar": the real archive (--data-path / $KDISTILL_DATA); "fake": seeded random images
    "strict": True,  # the archive's per-class counts checked (false: a hand-made subset in the official layout)
    "batch_size": 64,
    "lr": 0.05,  # at lr_batch; the rate used is lr * batch_size / lr_batch
    "lr_batch": 64,
    "momentum": 0.9,  # plain momentum (no Nesterov), as mdistiller's SGD
    "weight_decay": 5e-4,
    "augment": "crop4,flip",
    "amp": True,  # bf16 autocast on CUDA only (no effect on the CPU)
    "methods": copy.deepcopy(METHODS),
}


@dataclass
class Recipe:
    """What one experiment adds to the shared protocol."""

    name: str
    dataset: str  # kdata.load name
    title: str  # "CIFAR-10"
    num_classes: int
    archive: str  # file the user must provide
    plot: str  # PNG file name under the run's folder
    intro: str  # the paper paragraph, for results.md
    published: dict[str, Any] = field(default_factory=dict)  # {"source", "top1": {pair: {method: %}}}


# ------------------------------------------------------------------------------------------------- data


def fake_bundle(num_classes: int, seed: int, train: int = 320, test: int = 128) -> DataBundle:
    """Seeded random (3, 32, 32) images in [0, 1] whose class shifts the mean colour: learnable in an epoch."""
    g = torch.Generator().manual_seed(seed)
    classes = tuple(f"class{i}" for i in range(num_classes))

    def split(n: int, name: str) -> TensorData:
        y = torch.randperm(n, generator=g) % num_classes
        tint = torch.stack([(y % 3 == c).float() for c in range(3)], 1) * (y.float() / num_classes).view(-1, 1)
        x = (torch.rand(n, 3, 32, 32, generator=g) * 0.5 + tint.view(n, 3, 1, 1)).clamp(0, 1)
        return TensorData(x, y, classes, name=name)

    return DataBundle(train=split(train, "fake-train"), test=split(test, "fake-test"))


def _take(d: TensorData, count: int | None, seed: int) -> TensorData:
    """A stratified, seeded subset of exactly ``count`` samples (all of ``d`` for None or count >= len)."""
    if not count or count >= len(d):
        return d
    return split_validation(d, int(count), seed)[1]


def standardise(train: TensorData, *others: TensorData) -> tuple[TensorData, ...]:
    """Per-channel mean/std of ``train`` applied to every split (new tensors, sample ids kept)."""
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return tuple(TensorData((d.x - mean) / std, d.y, d.classes, d.index, d.name) for d in (train, *others))


def load_splits(recipe: Recipe, s: dict[str, Any], ctx: RunContext) -> tuple[TensorData, TensorData, TensorData]:
    """(train, validation, test), standardised; the validation split is carved from the training split."""
    if s["data"] == "fake":
        bundle = fake_bundle(recipe.num_classes, s["seed"])
    elif s["data"] == "cifar":
        try:
            bundle = kdata.load(recipe.dataset, path=ctx.data_path, val_size=0, strict=s["strict"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{recipe.name}: {recipe.title} not found. Put {recipe.archive} (the official binary release) in a "
                f"folder and pass it with --data-path FOLDER, or set KDISTILL_DATA=FOLDER.\n{exc}"
            ) from None
    else:
        raise ValueError(f"data: 'cifar' (the {recipe.title} archive) or 'fake' (random images), got {s['data']!r}")
    full = bundle.train
    val_size = int(s["val_size"])
    if not 0 < val_size < len(full):
        smaller = max(1, len(full) // 10)
        ctx.log(f"val_size {val_size} does not fit {len(full)} training images; carving {smaller} instead")
        val_size = smaller
    train, val = split_validation(full, val_size, s["seed"])
    train = _take(train, s["train_size"], s["seed"])
    test = _take(bundle.test, s["test_size"], s["seed"])
    train, val, test = standardise(train, val, test)
    if train.num_classes != recipe.num_classes:
        raise ValueError(f"{recipe.name}: expected {recipe.num_classes} classes, the data has {train.num_classes}")
    return train, val, test


# ----------------------------------------------------------------------------------------------- methods


def pair_name(pair: dict[str, Any]) -> str:
    return f"{pair['teacher']}->{pair['student']}"


def _stages(model, role: str, pair: str) -> tuple[str, ...]:
    stages = tuple(getattr(model, "feature_layers", ()) or ())
    if not stages:
        raise ValueError(f"pairs: the {role} of {pair} declares no feature_layers; give the layers in the pair's "
                         "methods (e.g. methods: {fitnet: {student_layers: [...], teacher_layers: [...]}})")
    return stages


def method_spec(name: str, opts: dict[str, Any], teacher, student, pair: str, student_epochs: int) -> dict[str, Any]:
    """The ``fit(method=...)`` dict of method ``name``: the recipe's options resolved for this pair."""
    opts = dict(opts)
    if name == "dkd" and "warmup_share" in opts:
        share = float(opts.pop("warmup_share"))
        if not 0 <= share <= 1:
            raise ValueError(f"methods.dkd.warmup_share: a share of the student epochs in [0, 1], got {share}")
        opts["warmup"] = share * student_epochs
    if name == "fitnet":
        stage = opts.pop("stage", "middle")
        if stage != "middle":
            raise ValueError(f"methods.fitnet.stage: only 'middle' (or name the layers), got {stage!r}")
        for key, model, role in (("student_layers", student, "student"), ("teacher_layers", teacher, "teacher")):
            if not opts.get(key):
                stages = _stages(model, role, pair)
                opts[key] = [stages[len(stages) // 2]]  # mdistiller's HINT_LAYER 2: layer2 of a ResNet's three
    if name == "at":
        stages = opts.pop("stages", "all")
        if stages != "all":
            raise ValueError(f"methods.at.stages: only 'all' (or name the layers), got {stages!r}")
        if not opts.get("student_layers") and not opts.get("teacher_layers"):
            s_st, t_st = _stages(student, "student", pair), _stages(teacher, "teacher", pair)
            if len(s_st) != len(t_st):
                raise ValueError(f"pairs: {pair}: AT pairs every stage, but the student has {len(s_st)} and the "
                                 f"teacher {len(t_st)}; name them in the pair (methods: {{at: {{student_layers: "
                                 "[...], teacher_layers: [...]}})")
            opts["student_layers"], opts["teacher_layers"] = list(s_st), list(t_st)
    return {"name": name, **opts}


def _pair_methods(s: dict[str, Any], pair: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The methods (in order) with the pair's overrides (``pair["methods"][name]``) over the profile's."""
    over = pair.get("methods") or {}
    unknown = set(over) - set(s["methods"])
    if unknown:
        raise ValueError(f"pairs: {pair_name(pair)} overrides method(s) {sorted(unknown)} that the profile "
                         "does not run")
    return {m: {**(opts or {}), **(over.get(m) or {})} for m, opts in s["methods"].items()}


def check_settings(s: dict[str, Any]) -> None:
    if not s["pairs"]:
        raise ValueError("pairs: need at least one {teacher: ..., student: ...}")
    for p in s["pairs"]:
        keys = set(p) if isinstance(p, dict) else set()
        if not {"teacher", "student"} <= keys or keys - {"teacher", "student", "methods"}:
            raise ValueError(f"pairs: each pair is {{teacher: SPEC, student: SPEC[, methods: {{...}}]}}, got {p!r}")
    names = [pair_name(p) for p in s["pairs"]]
    if len(set(names)) != len(names):
        raise ValueError(f"pairs: each teacher->student pair once, got {names}")
    if not s["methods"] or "ce" not in s["methods"]:
        raise ValueError(f"methods: the student alone ('ce') is the baseline of every table; got {list(s['methods'])}")
    for m, opts in s["methods"].items():
        if opts is not None and not isinstance(opts, dict):
            raise ValueError(f"methods.{m}: options are a mapping, got {opts!r}")
    for k in ("teacher_epochs", "student_epochs"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise ValueError(f"{k}: an integer >= 1, got {s[k]!r}")


def train_config(s: dict[str, Any], epochs: int, seed: int) -> TrainConfig:
    """The one optimiser, schedule and augmentation of every model in the run (teachers included)."""
    return TrainConfig(
        epochs=epochs,
        batch_size=s["batch_size"],
        lr=s["lr"] * s["batch_size"] / s["lr_batch"],
        momentum=s["momentum"],
        nesterov=False,
        weight_decay=s["weight_decay"],
        schedule=s["schedule"],
        milestones=tuple(f * epochs for f in s["step_decay_at"]) if s.get("step_decay_at") else None,
        augment=s["augment"],
        amp=s["amp"],
        seed=seed,
        checkpoint=False,
    )


# -------------------------------------------------------------------------------------------------- run


def _history(r) -> list[dict[str, Any]]:
    keep = ("epoch", "lr", "train_loss", "val_accuracy", "time_s")
    return [{k: v for k, v in h.items() if k in keep or k.startswith("loss_")} for h in r.history]


def run(recipe: Recipe, s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    with intra_op_threads(s["threads"]):
        return _run(recipe, s, ctx)


@dataclass
class _Study:
    """What every stage reads (settings, splits, the run's context) and what the stages found so far."""

    s: dict[str, Any]
    ctx: RunContext
    train: TensorData
    val: TensorData
    test: TensorData
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # pair -> the teacher's record
    records: list[dict[str, Any]] = field(default_factory=list)  # one per (pair, method, seed)
    alone: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # (student, seed) -> its ce record
    deploy: dict[str, Any] = field(default_factory=dict)  # the first pair's teacher and first KD student


def _run(recipe: Recipe, s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Per pair: train the teacher once; then for every seed, the student alone and with every method,
    distilling from the teacher live; summarise over seeds (nothing is chosen: the papers' settings)."""
    check_settings(s)
    seeds = seed_list(s["seed"], s["seeds"])
    study = _Study(s, ctx, *load_splits(recipe, s, ctx))
    ctx.log(f"{recipe.title}: {len(study.train)} train, {len(study.val)} validation, {len(study.test)} test images; "
            f"{len(s['pairs'])} pair(s) x {list(s['methods'])} x seeds {seeds}")
    for pair in s["pairs"]:
        teacher = train_teacher(study, pair)
        for seed in seeds:
            for m, opts in _pair_methods(s, pair).items():
                train_student(study, pair, teacher, seed, m, opts)
    results = _write(recipe, s, ctx, study.teachers, study.records, seeds,
                     (len(study.train), len(study.val), len(study.test)))
    return ctx.deployment(study.deploy, study.test, results) if len(study.deploy) == 2 else results


def train_teacher(study: _Study, pair: dict[str, Any]):
    """The pair's teacher, trained once with its own seed (no student starts from its initial weights), or
    taken from an earlier attempt; its record goes to ``study.teachers``."""
    s, ctx = study.s, study.ctx
    pname = pair_name(pair)
    t_seed = s["seed"] + TEACHER_SEED_OFFSET
    teacher = build_model(pair["teacher"], study.train.input_shape, study.train.num_classes, seed=t_seed)
    stored = ctx.store.record(f"{pname}/teacher")
    if stored is not None and ctx.store.load_into(f"{pname}/teacher", teacher):
        study.teachers[pname] = stored
    else:
        t0 = time.perf_counter()
        t_fit = fit(teacher, study.train, train_config(s, s["teacher_epochs"], t_seed), val=study.val,
                    test=study.test, progress=ctx.progress)
        study.teachers[pname] = {
            "spec": pair["teacher"], "epochs": s["teacher_epochs"], "seed": t_seed,
            "params": count_parameters(teacher), "test_accuracy": t_fit.test["accuracy"],
            "test_errors": t_fit.test["errors"], "val_accuracy": t_fit.val["accuracy"],
            "wall_time_s": round(time.perf_counter() - t0, 2), "history": _history(t_fit),
        }
        ctx.unit(f"{pname}/teacher", study.teachers[pname], teacher)
    t_rec = study.teachers[pname]
    ctx.log(f"{pname}: teacher {100 * t_rec['test_accuracy']:.2f}% test, {100 * t_rec['val_accuracy']:.2f}% "
            f"validation ({t_rec['wall_time_s']:.0f} s{', from an earlier attempt' if stored else ''})")
    return teacher


def train_student(study: _Study, pair: dict[str, Any], teacher, seed: int, m: str, opts: dict[str, Any]) -> None:
    """The pair's student with method ``m`` (``ce``: alone, one run per student and seed shared by every pair),
    or its record from an earlier attempt; appends its record."""
    s, ctx = study.s, study.ctx
    pname = pair_name(pair)
    if m == "ce" and (pair["student"], seed) in study.alone:
        study.records.append({**study.alone[(pair["student"], seed)], "pair": pname, "shared": True})
        return
    student = build_model(pair["student"], study.train.input_shape, study.train.num_classes, seed=seed)
    shown = not study.deploy or (len(study.deploy) == 1 and m == "kd")  # in the deployment table
    key = f"{pname}/{m}/seed{seed}"
    rec = ctx.store.record(key)
    if rec is None or (shown and m == "kd" and not ctx.store.load_into(key, student)):
        spec = method_spec(m, opts, teacher, student, pname, s["student_epochs"])
        t0 = time.perf_counter()
        r = fit(student, study.train, train_config(s, s["student_epochs"], seed), method=spec,
                teacher=None if m == "ce" else teacher, val=study.val, test=study.test, progress=ctx.progress)
        rec = {
            "pair": pname, "method": m, "seed": seed, "student": pair["student"], "options": spec,
            "test_accuracy": r.test["accuracy"], "test_errors": r.test["errors"],
            "val_accuracy": r.val["accuracy"], "epochs": len(r.history),
            "wall_time_s": round(time.perf_counter() - t0, 2), "history": _history(r),
        }
        if m == "ce":
            rec["params"] = count_parameters(student)
        ctx.unit(key, rec, student if shown and m == "kd" else None)
    if shown:
        study.deploy.setdefault(f"teacher {pair['teacher']}", teacher)
        if m == "kd":
            study.deploy[f"student {pair['student']} (kd)"] = student
    if m == "ce":
        study.alone[(pair["student"], seed)] = rec
    study.records.append(rec)
    ctx.log(f"{pname}/{m} seed {seed}: {100 * rec['test_accuracy']:.2f}% test (last epoch), "
            f"{100 * rec['val_accuracy']:.2f}% validation ({rec['wall_time_s']:.0f} s)")


# ---------------------------------------------------------------------------------------------- outputs


def _select(records, **where) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def _pct(records, key: str) -> dict[str, Any]:
    return summarize([100 * r[key] for r in records])


def tables(s, records) -> dict[str, dict[str, dict[str, Any]]]:
    """pair -> method -> test/validation accuracy (%, last epoch) and wall time over seeds, gain over CE."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pair in s["pairs"]:
        pname = pair_name(pair)
        rows: dict[str, dict[str, Any]] = {}
        for m in s["methods"]:
            runs = _select(records, pair=pname, method=m)
            rows[m] = {"test_accuracy_pct": _pct(runs, "test_accuracy"), "val_accuracy_pct": _pct(runs, "val_accuracy"),
                       "wall_time_s": summarize([r["wall_time_s"] for r in runs]), "seeds": len(runs)}
        base = rows["ce"]["test_accuracy_pct"]["mean"]
        for row in rows.values():
            row["gain_over_ce_pct"] = row["test_accuracy_pct"]["mean"] - base
        out[pname] = rows
    return out


def _cell(summary: dict[str, Any]) -> str:
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def differences(recipe: Recipe, s: dict[str, Any], sizes: tuple[int, int, int]) -> list[str]:
    """How this run's protocol differs from mdistiller's CIFAR-100 protocol, point by point."""
    lr = s["lr"] * s["batch_size"] / s["lr_batch"]
    n_train, n_val, n_test = sizes
    out = []
    if recipe.dataset != "cifar100":
        out.append(f"Data set: {recipe.title}, not CIFAR-100 (mdistiller's CIFAR tables, and the hyper-parameters "
                   "used here, are CIFAR-100's).")
    out.append(f"Data: {n_train} training images after carving a {n_val}-image validation split (reported only), "
               f"{n_test} test images; mdistiller trains on all 50,000 and evaluates on the 10,000 test images.")
    if s["data"] == "fake":
        out.append("Images: seeded random stand-ins (`data: fake`), not the real archive: a pipeline check.")
    if s["student_epochs"] != 240 or s["teacher_epochs"] != 240:
        out.append(f"Budget: students {s['student_epochs']} epochs, teachers {s['teacher_epochs']} (trained here); "
                   "mdistiller: 240 epochs, teachers pre-trained by CRD's 240-epoch recipe.")
    else:
        out.append("Teachers are trained here with the students' 240-epoch recipe (mdistiller downloads CRD's).")
    decay = s.get("step_decay_at") or (0.5, 0.75)
    e = s["student_epochs"]
    at = ", ".join(f"{f * e:g}" for f in decay)
    sched = {"step": f"x0.1 after epochs {at} of {e}", "cosine": "cosine to 0 (no warm-up)",
             "onecycle": "one-cycle (warm-up, then cosine)", "constant": "constant"}.get(s["schedule"], s["schedule"])
    note = ""
    if s["schedule"] == "step" and [round(f, 6) for f in decay] != [0.625, 0.75, 0.875]:
        note = " Set `step_decay_at: [0.625, 0.75, 0.875]` for mdistiller's three drops."
    out.append(f"Optimiser: SGD momentum {s['momentum']}, weight decay {s['weight_decay']:g}, batch {s['batch_size']}, "
               f"lr {lr:g}, {sched}; mdistiller: SGD momentum 0.9, batch 64, lr 0.05, x0.1 at epochs 150, 180 and 210 "
               f"of 240, weight decay 5e-4.{note}")
    out.append("Reported: last-epoch test accuracy, mean ± std over seeds; mdistiller's trainer keeps the best test "
               "accuracy over epochs (`best_acc`), a choice made on the test set.")
    out.append("Augmentation: random 4-pixel crop and flip on standardised inputs, so the padding is the mean colour "
               "(torchvision pads black before normalising); statistics from this training split, not fixed constants.")
    out.append("FitNets' regressor: 1x1 conv + BN (mdistiller's ConvReg adds a ReLU). CUDA runs use bf16 autocast "
               "(`amp: false` for fp32, as mdistiller).")
    return out


def _plot(s, table, teachers, path) -> None:
    import matplotlib.pyplot as plt

    methods = list(s["methods"])
    pairs = list(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(methods) * max(1, len(pairs)) ** 0.5), 4.5))
    width = 0.8 / len(pairs)
    cmap = plt.get_cmap("tab10")
    lows = []
    for j, p in enumerate(pairs):
        xs = [i + (j - (len(pairs) - 1) / 2) * width for i in range(len(methods))]
        means = [table[p][m]["test_accuracy_pct"]["mean"] for m in methods]
        stds = [table[p][m]["test_accuracy_pct"]["std"] for m in methods]
        lows += [mu - sd for mu, sd in zip(means, stds)]
        ax.bar(xs, means, width * 0.95, yerr=stds, capsize=3, color=cmap(j), label=f"{p} (n={table[p]['ce']['seeds']})")
        t_acc = 100 * teachers[p]["test_accuracy"]
        lows.append(t_acc)
        ax.axhline(t_acc, color=cmap(j), linestyle="--", linewidth=1,
                   label=f"teacher {teachers[p]['spec']}: {t_acc:.1f}%")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([LABELS.get(m, m) for m in methods])
    ax.set_ylim(max(0.0, min(lows) - 5), None)
    ax.set_ylabel("test accuracy (%), last epoch")
    ax.set_title(f"Students per method and pair (mean ± std over {s['seeds']} seed(s); dashed: teachers)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def _models(s, teachers, records) -> dict[str, dict[str, Any]]:
    """results.json's roles: each pair's teacher and, per method, its students over seeds."""
    models: dict[str, dict[str, Any]] = {}
    for pair in s["pairs"]:
        p = pair_name(pair)
        t = teachers[p]
        models[f"{p}/teacher"] = {"test_accuracy": t["test_accuracy"], "test_errors": t["test_errors"], "seeds": 1,
                                  "spec": t["spec"], "params": t["params"], "epochs": t["epochs"]}
        for m in s["methods"]:
            runs = _select(records, pair=p, method=m)
            models[f"{p}/{m}"] = {
                "test_accuracy": summarize([r["test_accuracy"] for r in runs]),
                "test_errors": summarize([r["test_errors"] for r in runs]),
                "val_accuracy": summarize([r["val_accuracy"] for r in runs]),
                "seeds": len(runs), "spec": pair["student"], "teacher": pair["teacher"],
                "method": runs[0]["options"], "epochs": s["student_epochs"],
                "wall_time_s": summarize([r["wall_time_s"] for r in runs]),
            }
    return models


def _table_lines(s, table, teachers, records) -> list[str]:
    """results.md's tables: methods x pairs, then one detailed table per pair."""
    pairs = list(table)
    head = "| method | " + " | ".join(f"`{p}`" for p in pairs) + " |"
    lines = [head, "|---" * (len(pairs) + 1) + "|",
             "| teacher | " + " | ".join(f"{100 * teachers[p]['test_accuracy']:.2f}" for p in pairs) + " |"]
    for m in s["methods"]:
        cells = " | ".join(_cell(table[p][m]["test_accuracy_pct"]) for p in pairs)
        lines.append(f"| {LABELS.get(m, m)} | {cells} |")
    reused = {r["student"] for r in records if r.get("shared")}
    shared_ce = {pair_name(p) for p in s["pairs"] if p["student"] in reused}
    detail = []
    for p in pairs:
        detail += [f"\n`{p}`: teacher {teachers[p]['params']:,} parameters, {teachers[p]['epochs']} epoch(s), "
                   f"{teachers[p]['wall_time_s']:.0f} s, {100 * teachers[p]['val_accuracy']:.2f}% validation; "
                   f"student {_select(records, pair=p, method='ce')[0]['params']:,} parameters.\n",
                   "| method | test (last epoch) | vs CE | validation | wall time per student (s) |",
                   "|---|---|---|---|---|"]
        for m in s["methods"]:
            row = table[p][m]
            shared = " *" if m == "ce" and p in shared_ce else ""
            detail.append(f"| {LABELS.get(m, m)}{shared} | {_cell(row['test_accuracy_pct'])} | "
                          f"{row['gain_over_ce_pct']:+.2f} | {_cell(row['val_accuracy_pct'])} | "
                          f"{row['wall_time_s']['mean']:.1f} |")
        if p in shared_ce:
            detail.append("\n\\* The student alone needs no teacher: one run per seed serves every pair of this "
                          "student.")
    return ["\n".join(lines), "\n".join(detail)]


def _published(recipe: Recipe) -> str:
    """The paper's published numbers, as a results.md table (not measured here)."""
    if not recipe.published:
        return ""
    top1 = recipe.published["top1"]
    ms = sorted({m for v in top1.values() for m in v}, key=lambda m: list(METHODS).index(m) if m in METHODS else 99)
    return (f"\nPublished top-1 on CIFAR-100 ({recipe.published['source']}), **not measured here**:\n\n"
            "| method | " + " | ".join(f"`{p}`" for p in top1) + " |\n" + "|---" * (len(top1) + 1) + "|\n"
            + "\n".join(f"| {LABELS.get(m, m)} | " + " | ".join(str(top1[p].get(m, "")) for p in top1) + " |"
                        for m in ms) + "\n")


def _markdown(recipe, s, ctx, elapsed, table, teachers, records, seeds, sizes) -> str:
    m_opts = "; ".join(f"{LABELS.get(m, m)} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in o.items()) for m, o in s["methods"].items() if o)
    overrides = "; ".join(f"`{pair_name(p)}`: {p['methods']}" for p in s["pairs"] if p.get("methods"))
    check = ""
    if ctx.profile == "quick" or s["data"] == "fake":
        check = ("\n\n**A pipeline check** (subsets, a few epochs, few seeds): these numbers say nothing about the "
                 "methods; the `full` and `paper` profiles are the experiment.")
    resumed = ""
    if ctx.store.resumed:
        resumed = (f" Resumed (`--resume`): {len(ctx.store.resumed)} finished model(s) were taken from an earlier "
                   "attempt; the wall time counts that attempt up to its last finished model.")
    lines, detail = _table_lines(s, table, teachers, records)
    return f"""
{recipe.intro}

Test accuracy (%) at the **last epoch**, mean ± std over seeds {seeds}; the teacher is trained once per run.
Students {s['student_epochs']} epoch(s), teachers {s['teacher_epochs']}; {sizes[0]} training, {sizes[1]} validation,
{sizes[2]} test images. Hyper-parameters come from the papers (as mdistiller sets them), none were tuned here:
{m_opts}.{(' Per pair: ' + overrides + '.') if overrides else ''} The validation split is reported, never used to
choose anything. Wall time {elapsed:.0f} s on {torch.get_num_threads()} thread(s).{resumed}{check}

{lines}
{detail}
{_published(recipe)}
### How this protocol differs from mdistiller's

{chr(10).join('- ' + d for d in differences(recipe, s, sizes))}

Plot: `{recipe.plot}`.
"""


def _write(recipe, s, ctx, teachers, records, seeds, sizes) -> dict[str, Any]:
    """The results tail: roles, results.md, plot, results.json."""
    elapsed = ctx.elapsed
    table = tables(s, records)
    models = _models(s, teachers, records)
    md = _markdown(recipe, s, ctx, elapsed, table, teachers, records, seeds, sizes)
    _plot(s, table, teachers, ctx.out / recipe.plot)
    extra = {
        "torch_threads": torch.get_num_threads(),
        "resumed_units": list(ctx.store.resumed),
        "seeds": seeds,
        "sizes": {"train": sizes[0], "val": sizes[1], "test": sizes[2]},
        "teachers": teachers,
        "tables": table,
        "protocol_differences": differences(recipe, s, sizes),
        "records": records,
    }
    if recipe.published:
        extra["published"] = {**recipe.published,
                              "note": "published by the DKD authors (mdistiller), not measured here"}
    return write_results(ctx.out, recipe.name, ctx.profile, elapsed, models, md, extra=extra)


def experiment(recipe: Recipe) -> Callable[[dict[str, Any], RunContext], dict[str, Any]]:
    """The ``run(settings, ctx)`` of an experiment module built on ``recipe``."""

    def run_it(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        return run(recipe, s, ctx)

    return run_it


MDISTILLER_PAIRS = [
    {"teacher": "resnet32x4", "student": "resnet8x4"},  # DKD beta 8 (configs/cifar100/dkd/res32x4_res8x4.yaml)
    {"teacher": "resnet56", "student": "resnet20", "methods": {"dkd": {"beta": 2.0}}},
    {"teacher": "wrn:40,2", "student": "wrn:16,2", "methods": {"dkd": {"beta": 6.0}}},
]
"""mdistiller's CIFAR-100 pairs with its DKD beta per pair (configs/cifar100/dkd/*.yaml)."""


def paper_profile() -> dict[str, Any]:
    """mdistiller's protocol (for a GPU): 240 epochs, batch 64, SGD 0.05 with x0.1 after epochs 150, 180 and 210,
    weight decay 5e-4, 3 seeds, its pairs; 5,000 training images are held out as a validation split."""
    return {**COMMON, "pairs": [dict(p) for p in MDISTILLER_PAIRS], "val_size": 5000, "train_size": None,
            "test_size": None, "teacher_epochs": 240, "student_epochs": 240, "seeds": 3, "schedule": "step",
            "step_decay_at": [0.625, 0.75, 0.875], "threads": None}
