"""Hinton, Vinyals & Dean (2015), section 4: distilling an ensemble into one model.

On each data set (MNIST and Fashion-MNIST), K models of one architecture are trained on the hard labels
with different seeds. Each is "a single model"; together they are an ensemble whose soft targets are the
arithmetic or the geometric mean of the members' distributions (:mod:`kdistill.teachers.ensemble`). One more model
of the same architecture is distilled from the ensemble with the same optimiser and number of steps.

The full profile is the plain protocol: members and students all train on the un-augmented training set.
The ``augmented`` profile trains members on inputs jittered by up to ``member_jitter`` pixels (fresh
offsets every epoch) and the student on a fixed augmented transfer set of the same kind: ``copies``
copies of the training set (the original plus jittered ones, :func:`kdistill.data.augment.jittered_copies`),
``epochs / copies`` passes, so it takes exactly as many steps as a member; the ensemble's logits on the
copies are computed once and looked up by sample id.

For each mean, the temperature and the soft-target weight are chosen on the validation split with the
first repetition; every repetition then trains a fresh ensemble and a fresh student per mean. The headline
is the share of the ensemble's accuracy gain over a single model that the distilled model keeps (the
paper's speech model kept over 80%: 58.9% -> 61.1% ensemble, 60.8% distilled), computed from the means
over repetitions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill import data as kdata
from kdistill.data.augment import jittered_copies
from kdistill.data.dataset import TensorData
from kdistill.teachers.ensemble import EnsembleModel, combine_log_probs, combine_logits
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.models import build_model, count_parameters
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize
from kdistill.teachers.base import CachedTeacher
from kdistill.sweeps.multi import fit_grid
from kdistill.engine import FitResult, TrainConfig, fit
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import choose_on_validation, finish, kd

NAME = "ensemble"
DESCRIPTION = "Ensemble teachers: single model vs K-model ensemble vs one model distilled from it (MNIST, Fashion-MNIST)"

_COMMON: dict[str, Any] = {
    "datasets": ["mnist", "fashion-mnist"],
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "lr": 0.05,
    "member_jitter": 2,
    "target_retained": 0.8,
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "model": "mlp:256", "members": 3, "epochs": 4, "copies": 1, "member_jitter": 0, "reps": 2,
              "means": ["arithmetic", "geometric"], "temperatures": [4.0], "alphas": [1.0, 0.5]},
    # The plain protocol: members and students on the un-augmented training set.
    "full": {**_COMMON, "model": "mlp:400,400", "members": 5, "epochs": 10, "copies": 1, "member_jitter": 0,
             "reps": 3, "means": ["arithmetic", "geometric"], "temperatures": [2.0, 4.0], "alphas": [1.0, 0.5]},
    # Members on jittered inputs, the student on 10 fixed jittered copies (commit c89bd7e ran it as "full").
    "augmented": {**_COMMON, "model": "mlp:400,400", "members": 5, "epochs": 10, "copies": 10, "reps": 3,
                  "means": ["arithmetic", "geometric"], "temperatures": [4.0], "alphas": [1.0]},
}


def _config(s: dict[str, Any], seed: int, student: bool = False) -> TrainConfig:
    """A member's recipe (jittered inputs), or the student's: the same steps as passes over the copies."""
    if not student:
        return TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                           jitter=s["member_jitter"], checkpoint=False)
    return TrainConfig(epochs=s["epochs"] // s["copies"], batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                       checkpoint=False)


Choice = tuple[str, float, float]
"""A grid point: ``(mean, T, alpha)``; the grid is ``means x temperatures x alphas``, in order of preference."""


@dataclass
class _DataSet:
    """One data set's splits, the student's transfer set and the two training stages of a repetition."""

    name: str
    s: dict[str, Any]
    ctx: RunContext
    bundle: Any
    transfer: TensorData

    def train_members(self, rep: int) -> tuple[dict[str, torch.Tensor], list[dict], list[nn.Module]]:
        """The repetition's members (one stacked pass: they differ only in seed, each exactly as fit would
        train it); their logits on the transfer set and the test split, test metrics and networks."""
        s, test = self.s, self.bundle.test
        logits = {"transfer": [], "test": []}
        tests, nets = [], []
        configs = [_config(s, s["seed"] + 100 * rep + i) for i in range(s["members"])]
        for r in fit_grid(s["model"], self.bundle.train, configs, test=test, progress=self.ctx.progress):
            tests.append(r.test)
            nets.append(r.model)
            for split, d in (("transfer", self.transfer), ("test", test)):
                logits[split].append(predict_logits(r.model, d.x))
        self.ctx.log(f"{self.name} rep {rep}: members' test errors {[t['errors'] for t in tests]}")
        return {split: torch.stack(v) for split, v in logits.items()}, tests, nets

    def distill(self, rep: int, member_logits: dict[str, torch.Tensor], choice: Choice) -> FitResult:
        """A fresh student distilled from the members' ``mean`` at T, soft weight alpha."""
        mean, temperature, alpha = choice
        teacher = CachedTeacher(self.transfer.index, combine_logits(member_logits["transfer"], mean, temperature))
        seed = self.s["seed"] + 100 * rep + 99
        model = build_model(self.s["model"], self.bundle.input_shape, self.bundle.train.num_classes, seed=seed)
        return fit(model, self.transfer, _config(self.s, seed, student=True), teacher=teacher,
                   method=kd(temperature, alpha), val=self.bundle.val, test=self.bundle.test, progress=self.ctx.progress)


def _repetitions(d: _DataSet, keep: bool) -> dict[str, Any]:
    """Every repetition: a fresh ensemble and, per mean, a fresh student. In the first, every grid point is
    distilled and each mean's (T, alpha) chosen on validation; later ones reuse the choice."""
    s, test = d.s, d.bundle.test
    means = list(s["means"])
    grid: list[Choice] = list(itertools.product(means, s["temperatures"], s["alphas"]))
    out: dict[str, Any] = {"singles": [], "by_choice": {}, "chosen": {}, "first_members": [],
                           "ens": {m: [] for m in means},  # the ensemble as a classifier (its distribution at T = 1)
                           "dist": {m: [] for m in means}}  # the student distilled from it
    by_choice, chosen, ens, dist = out["by_choice"], out["chosen"], out["ens"], out["dist"]
    for rep in range(s["reps"]):
        member_logits, member_tests, nets = d.train_members(rep)
        out["singles"].append(member_tests)
        if keep and rep == 0:
            out["first_members"] = nets
        for mean in means:
            ens[mean].append(classification_metrics(combine_log_probs(member_logits["test"], mean, 1.0), test.y))
        if not chosen:
            for choice in grid:
                by_choice[choice] = d.distill(rep, member_logits, choice)
                d.ctx.log(f"{d.name} {choice}: {by_choice[choice].val['errors']} validation errors")
            for mean in means:
                options = {c: by_choice[c].val["errors"] for c in grid if c[0] == mean}
                chosen[mean] = choose_on_validation(options, ["mean", "temperature", "alpha"])
                dist[mean].append(by_choice[chosen[mean]].test)
        else:
            for mean in means:
                dist[mean].append(d.distill(rep, member_logits, chosen[mean]).test)
        d.ctx.log(f"{d.name} rep {rep}: " + "; ".join(
            f"{m}: ensemble {ens[m][-1]['errors']}, distilled {dist[m][-1]['errors']}" for m in means) + " test errors")
    # The headline mean: the one whose chosen student did best on validation (ties: the first mean listed).
    out["head"] = choose_on_validation({m: by_choice[chosen[m]].val["errors"] for m in means}, ["mean"])
    out["grid"] = grid
    return out


def _share(r: dict[str, Any], mean: str, single_acc: list[float]) -> dict[str, Any]:
    """Gains in test accuracy over the mean single model of the same repetition, and the share kept."""
    ens_gain = [e["accuracy"] - a for e, a in zip(r["ens"][mean], single_acc)]
    dist_gain = [d["accuracy"] - a for d, a in zip(r["dist"][mean], single_acc)]
    e, d = sum(ens_gain) / len(ens_gain), sum(dist_gain) / len(dist_gain)
    return {"ensemble_gain": summarize(ens_gain), "distilled_gain": summarize(dist_gain),
            "retained_share_of_gain": d / e if e > 0 else float("nan"),
            "retained_by_rep": [dg / eg if eg > 0 else float("nan") for dg, eg in zip(dist_gain, ens_gain)],
            "chosen": {"temperature": r["chosen"][mean][1], "alpha": r["chosen"][mean][2]}}


def _run_dataset(
    name: str, s: dict[str, Any], ctx: RunContext, keep: bool = False
) -> tuple[dict[str, Any], tuple[dict[str, nn.Module], TensorData] | None]:
    """The data set's results, and with ``keep`` the models of its deployment table with its test split."""
    bundle = kdata.load(name, val_size=s["val_size"], seed=s["seed"], **({"path": ctx.data_path} if ctx.data_path else {}))
    train, k = bundle.train, s["members"]
    # The student's transfer set: the training set plus jittered copies, each with its own sample ids.
    transfer = jittered_copies(train, s["copies"], s["member_jitter"], seed=s["seed"] + 7) if s["copies"] > 1 else train
    ctx.log(f"{name}: {len(train)} train, {len(bundle.val)} validation, {len(bundle.test)} test; {k} members of "
            f"{s['model']}; transfer set of {len(transfer)} ({s['copies']} copies)")
    r = _repetitions(_DataSet(name, s, ctx, bundle, transfer), keep)
    head, means, chosen, by_choice = r["head"], list(s["means"]), r["chosen"], r["by_choice"]
    single_acc = [sum(t["accuracy"] for t in rep) / len(rep) for rep in r["singles"]]
    by_mean = {m: _share(r, m, single_acc) for m in means}
    params = count_parameters(build_model(s["model"], bundle.input_shape, train.num_classes))
    models: dict[str, Any] = {
        f"{name}:single": {**role_metrics([t for rep in r["singles"] for t in rep]), "spec": s["model"], "params": params},
        f"{name}:ensemble": {**role_metrics(r["ens"][head]), "mean": head, "members": k, "params": k * params},
        f"{name}:distilled": {**role_metrics(r["dist"][head]), "spec": s["model"], "mean": head},
    }
    for m in means:
        if m != head:
            models[f"{name}:ensemble-{m}"] = {**role_metrics(r["ens"][m]), "mean": m}
            models[f"{name}:distilled-{m}"] = {**role_metrics(r["dist"][m]), "mean": m}
    retained = by_mean[head]["retained_share_of_gain"]
    result = {"name": name, "models": models, "summary": {
        "chosen": {"mean": head, **by_mean[head]["chosen"]},
        "validation_errors": {f"{m}, T={t}, alpha={a}": by_choice[(m, t, a)].val["errors"] for m, t, a in r["grid"]},
        "single_accuracy_by_rep": single_acc,
        **{key: by_mean[head][key] for key in ("ensemble_gain", "distilled_gain", "retained_by_rep")},
        "retained_share_of_gain": retained,
        "by_mean": by_mean,
        "target_met": bool(retained >= s["target_retained"]),
    }}
    if not keep:
        return result, None
    # The first repetition's models: its ensemble, combined with the headline mean as the experiment
    # scores it; the student distilled from it with the chosen T and alpha; one of its members, which
    # is the same architecture trained on the labels alone.
    _, T, alpha = chosen[head]
    shown = {
        f"teacher ensemble {k} x {s['model']} ({head} mean)": EnsembleModel(r["first_members"], head),
        f"distilled {s['model']} ({head}, T={T:g}, alpha={alpha:g})": by_choice[chosen[head]].model,
        f"student alone {s['model']} (one member)": r["first_members"][0],
    }
    return result, (shown, bundle.test)


def _plot(per_dataset: list[dict[str, Any]], path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_dataset), figsize=(4.2 * len(per_dataset), 3.4), squeeze=False)
    for ax, res in zip(axes[0], per_dataset):
        roles = ["single", "ensemble", "distilled"]
        stats = [res["models"][f"{res['name']}:{r}"]["test_accuracy"] for r in roles]
        means = [100 * (v["mean"] if isinstance(v, dict) else v) for v in stats]
        stds = [100 * (v["std"] if isinstance(v, dict) else 0.0) for v in stats]
        ax.bar(roles, means, yerr=stds, capsize=4, color=["#999999", "#4477aa", "#cc6677"])
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(low - 0.5 * (max(means) - low + 0.1), max(m + s for m, s in zip(means, stds)) + 0.1)
        ax.set_title(f"{res['name']}: {100 * res['summary']['retained_share_of_gain']:.0f}% of the gain kept")
        ax.set_ylabel("test accuracy (%), mean ± std")
    fig.tight_layout()
    save_figure(fig, path)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    if s["members"] < 2:
        raise ValueError(f"members: an ensemble needs at least 2 members, got {s['members']}")
    if s["copies"] < 1 or s["epochs"] % s["copies"]:
        raise ValueError(f"copies: must be >= 1 and divide epochs ({s['epochs']}) so the student takes the members' "
                         f"number of steps, got {s['copies']}")
    # One deployment table per run: the first data set's models, measured on its test split.
    first, deployment = _run_dataset(s["datasets"][0], s, ctx, keep=True)
    per_dataset = [first] + [_run_dataset(name, s, ctx)[0] for name in s["datasets"][1:]]
    _plot(per_dataset, ctx.out / "ensemble.png")
    models = {role: m for res in per_dataset for role, m in res["models"].items()}
    rows = []
    for res in per_dataset:
        n, sm, m = res["name"], res["summary"], res["models"]
        for mean, share in sm["by_mean"].items():
            suffix = "" if mean == sm["chosen"]["mean"] else f"-{mean}"
            rows.append(
                f"| {n} | {mean}{' (headline)' if not suffix else ''} | {fmt(m[f'{n}:single']['test_errors'])} | "
                f"{fmt(m[f'{n}:ensemble{suffix}']['test_errors'])} | {fmt(m[f'{n}:distilled{suffix}']['test_errors'])} | "
                f"{100 * share['ensemble_gain']['mean']:.3f} | {100 * share['distilled_gain']['mean']:.3f} | "
                f"{100 * share['retained_share_of_gain']:.0f}% | "
                f"{'yes' if share['retained_share_of_gain'] >= s['target_retained'] else 'no'} | "
                f"T={share['chosen']['temperature']}, alpha={share['chosen']['alpha']} |"
            )
    md = f"""
Paper (speech, 10 models): baseline 58.9%, ensemble 61.1%, distilled 60.8% frame accuracy (over 80% of the gain).

Each repetition ({s['reps']}) trains {s['members']} `{s['model']}` members with different seeds ({s['epochs']} epochs,
{f"inputs jittered by up to {s['member_jitter']} px" if s['member_jitter'] else 'no augmentation'}) and, per mean, one student of the same architecture, trained for
the same number of steps with the same optimiser on {f"{s['copies']} fixed copies of the training set (original +"
" jittered)" if s['copies'] > 1 else 'the same training set'}, whose ensemble logits are cached. "single" is
every member alone (n = members x repetitions); gains are accuracy points over the mean single model of the same
repetition, averaged over repetitions. For each mean, T and alpha are chosen on the validation split (first
repetition); the headline mean is the one whose chosen student made fewer validation errors.

| data | mean | single errors | ensemble errors | distilled errors | ensemble gain (points) | distilled gain (points) | kept | >= {100 * s['target_retained']:.0f}% | chosen on validation |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![accuracies](ensemble.png)
"""
    extra = {"per_dataset": {res["name"]: res["summary"] for res in per_dataset}, "threads": torch.get_num_threads()}
    shown, test = deployment
    return finish(ctx, NAME, models, md, extra, shown, test)
