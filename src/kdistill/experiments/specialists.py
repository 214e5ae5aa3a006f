"""Hinton, Vinyals & Dean (2015), section 5: specialists for confusable classes (here on Fashion-MNIST).

1. A generalist is trained on all classes.
2. Clusters of classes it confuses are found by K-means on the covariance of its predicted distributions
   over the validation split; each cluster of two or more classes gets a specialist.
3. A specialist starts from the generalist's weights with an output layer cut to its classes plus a
   dustbin, and is fine-tuned on half its own classes, half random other samples, with the generalist's
   collapsed soft targets mixed with the hard labels.
4. At test time the generalist's top-k classes choose the active specialists, and the prediction is the
   distribution minimising the summed KL to the generalist and the active specialists.
5. The combination is distilled back into one model of the generalist's size and budget (the paper leaves
   this open).

Reported: overall test accuracy and accuracy on the specialists' classes for the generalist, the
generalist + specialists and the distilled model, over several seeds. The paper's JFT result was a
relative 4.4% gain in top-1 accuracy (25.0% -> 26.1%) with 61 specialists; a small gain, none or a loss
here is reported as measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize
from kdistill.teachers.specialists import SpecialistModel, SpecialistSystem, confusable_clusters, train_specialist
from kdistill.teachers.base import CachedTeacher
from kdistill.engine import FitResult, TrainConfig, fit
from kdistill.models import build_model
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import choose_on_validation, finish, kd

NAME = "specialists"
DESCRIPTION = "Specialists for confusable classes (Fashion-MNIST): generalist vs generalist + specialists, then distilled"

_COMMON: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "seed": 0,
    "val_size": 5000,
    "batch_size": 128,
    "lr": 0.05,
    "n_clusters": 4,
    "specialist_lr": 0.01,
    "specialist_temperature": 2.0,
    "top_ks": [1, 2, 3],
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "model": "mlp:256", "epochs": 6, "specialist_epochs": 3, "specialist_alphas": [0.5],
              "distill_temperatures": [2.0], "distill_alphas": [0.7], "seeds": 2},
    "full": {**_COMMON, "model": "mlp:800,800", "epochs": 20, "specialist_epochs": 8, "specialist_alphas": [0.0, 0.5],
             "distill_temperatures": [2.0, 5.0], "distill_alphas": [1.0, 0.7], "seeds": 3},
}


def _metrics(log_probs: torch.Tensor, labels: torch.Tensor, special: torch.Tensor) -> dict[str, Any]:
    m = classification_metrics(log_probs, labels)
    m.pop("confusion")
    pred = log_probs.argmax(dim=1)
    m["accuracy_special"] = float((pred[special] == labels[special]).float().mean())
    m["errors_special"] = int((pred[special] != labels[special]).sum())
    return m


@dataclass
class _Stages:
    """The data and recipes of every stage: the generalist, its specialists, the distilled combination."""

    s: dict[str, Any]
    ctx: RunContext
    bundle: Any

    def cfg(self, seed: int, epochs: int, lr: float, best: bool = False) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.s["batch_size"], lr=lr, seed=seed, keep_best=best,
                           checkpoint=False)

    def train_generalist(self, seed: int):
        """The generalist on all classes, its training logits, and the clusters of classes it confuses."""
        s, train, val, test = self.s, self.bundle.train, self.bundle.val, self.bundle.test
        g_fit = fit(build_model(s["model"], self.bundle.input_shape, train.num_classes, seed=seed), train,
                    self.cfg(seed, s["epochs"], s["lr"]), val=val, test=test, progress=self.ctx.progress)
        generalist = g_fit.model
        clusters = confusable_clusters(torch.softmax(predict_logits(generalist, val.x), dim=1), s["n_clusters"], seed)
        names = [[train.classes[c] for c in cl] for cl in clusters]
        self.ctx.log(f"seed {seed}: generalist {g_fit.test['errors']} test errors; clusters {names}")
        if not clusters:
            raise ValueError("n_clusters: every cluster has one class, so there is nothing to specialise; use fewer")
        return generalist, predict_logits(generalist, train.x), clusters, names

    def build_system(self, seed: int, generalist, gen_train_logits, clusters, alpha: float) -> SpecialistSystem:
        """One specialist per cluster, from the generalist's weights, at soft weight ``alpha``."""
        s, specialists = self.s, []
        for cl in clusters:
            spec, r = train_specialist(
                generalist, self.bundle.train, cl, self.cfg(seed, s["specialist_epochs"], s["specialist_lr"], best=True),
                temperature=s["specialist_temperature"], alpha=alpha, generalist_logits=gen_train_logits,
                val=self.bundle.val, progress=self.ctx.progress)
            specialists.append(spec)
            self.ctx.log(f"seed {seed}: specialist {list(cl)} (alpha {alpha}): {r.val['accuracy']:.4f} on its validation mix")
        return SpecialistSystem(generalist, specialists)

    def distil(self, seed: int, teacher: CachedTeacher, temperature: float, alpha: float) -> FitResult:
        """A model of the generalist's size and budget distilled from the combination."""
        s, b = self.s, self.bundle
        return fit(build_model(s["model"], b.input_shape, b.train.num_classes, seed=seed + 1000), b.train,
                   self.cfg(seed + 1000, s["epochs"], s["lr"]), teacher=teacher, method=kd(temperature, alpha),
                   val=b.val, test=b.test, progress=self.ctx.progress)


def _specialists(st: _Stages, seed: int, generalist, gen_train_logits, clusters, chosen: dict | None):
    """The specialists and how they are combined. With the first seed (``chosen`` None) every specialist
    soft weight and top-k is tried and the pair with the fewest validation errors chosen (ties: the first
    in ``specialist_alphas`` x ``top_ks``); later seeds reuse it. Returns the system and the choice."""
    s, val = st.s, st.bundle.val
    systems, val_outputs = {}, {}
    for alpha in (s["specialist_alphas"] if chosen is None else [chosen["specialist_alpha"]]):
        systems[alpha] = st.build_system(seed, generalist, gen_train_logits, clusters, alpha)
        val_outputs[alpha] = systems[alpha].outputs(val.x)
    if chosen is None:
        scores = {}
        for alpha, k in itertools.product(s["specialist_alphas"], s["top_ks"]):
            lq = systems[alpha].combine(*val_outputs[alpha], top_k=k)
            scores[(alpha, k)] = int((lq.argmax(1) != val.y).sum())
        best = choose_on_validation(scores, ["specialist_alpha", "top_k"])
        gen_val_errors = int((val_outputs[best[0]][0].argmax(1) != val.y).sum())
        chosen = {"specialist_alpha": best[0], "top_k": best[1],
                  "validation_errors": {f"alpha={a}, top_k={k}": v for (a, k), v in scores.items()},
                  "generalist_validation_errors": gen_val_errors}
        st.ctx.log(f"chosen on validation: {chosen}")
    system = systems[chosen["specialist_alpha"]]
    system.top_k = chosen["top_k"]
    return system, chosen


def _distil_combination(st: _Stages, seed: int, system: SpecialistSystem, chosen: dict) -> FitResult:
    """Distil the combination (its distribution on the training set) into one generalist-sized model; with
    the first seed, T and alpha are chosen on validation (ties: the first in ``distill_temperatures`` x
    ``distill_alphas``) and recorded in ``chosen["distill"]``."""
    s = st.s
    teacher = CachedTeacher(st.bundle.train.index, system.predict(st.bundle.train))
    if "distill" in chosen:
        return st.distil(seed, teacher, chosen["distill"]["temperature"], chosen["distill"]["alpha"])
    fits = {c: st.distil(seed, teacher, *c) for c in itertools.product(s["distill_temperatures"], s["distill_alphas"])}
    pick = choose_on_validation({c: r.val["errors"] for c, r in fits.items()}, ["temperature", "alpha"])
    chosen["distill"] = {"temperature": pick[0], "alpha": pick[1],
                         "validation_errors": {f"T={t}, alpha={a}": r.val["errors"] for (t, a), r in fits.items()}}
    return fits[pick]


def _seed(st: _Stages, seed: int, chosen: dict | None, shown: dict[str, torch.nn.Module]):
    """One seed: the generalist, its specialists, their combination and the distilled combination, scored
    on test (overall and on the specialists' classes). Fills ``shown`` with the first seed's models."""
    s, test = st.s, st.bundle.test
    generalist, gen_train_logits, clusters, names = st.train_generalist(seed)
    system, chosen = _specialists(st, seed, generalist, gen_train_logits, clusters, chosen)
    special_test = torch.isin(test.y, torch.tensor(sorted(c for cl in clusters for c in cl)))
    gen_test_lp = torch.log_softmax(predict_logits(generalist, test.x), dim=1)
    comb_test_lp = system.log_probs(test.x)
    gen_m, comb_m = _metrics(gen_test_lp, test.y, special_test), _metrics(comb_test_lp, test.y, special_test)
    active = (comb_test_lp.argmax(1) != gen_test_lp.argmax(1))
    st.ctx.log(f"seed {seed}: generalist {gen_m['errors']} / combined {comb_m['errors']} test errors "
               f"({int(active.sum())} predictions changed)")
    d_fit = _distil_combination(st, seed, system, chosen)
    dist_m = _metrics(torch.log_softmax(predict_logits(d_fit.model, test.x), dim=1), test.y, special_test)
    if not shown:
        # The teacher is the whole system (generalist + specialists, combined as above); the generalist
        # has the distilled model's architecture and budget on the labels alone: the student alone.
        n, d = len(clusters), chosen["distill"]
        shown.update({
            f"teacher generalist {s['model']} + {n} specialist{'s' * (n > 1)} (top-{system.top_k})": SpecialistModel(system),
            f"distilled {s['model']} (T={d['temperature']:g}, alpha={d['alpha']:g})": d_fit.model,
            f"student alone {s['model']} (the generalist)": generalist,
        })
    st.ctx.log(f"seed {seed}: distilled combination {dist_m['errors']} test errors")
    record = {"seed": seed, "clusters": [list(c) for c in clusters], "cluster_names": names,
              "generalist": gen_m, "combined": comb_m, "distilled": dist_m, "changed_predictions": int(active.sum()),
              "fixed": int(((comb_test_lp.argmax(1) == test.y) & (gen_test_lp.argmax(1) != test.y)).sum()),
              "broken": int(((comb_test_lp.argmax(1) != test.y) & (gen_test_lp.argmax(1) == test.y)).sum())}
    return record, chosen


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Per seed: train the generalist, its specialists (soft weight and top-k chosen on validation), combine
    them, distil the combination (T and alpha chosen on validation); summarise over seeds."""
    bundle = kdata.load(s["dataset"], val_size=s["val_size"], seed=s["seed"],
                        **({"path": ctx.data_path} if ctx.data_path else {}))
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    ctx.log(f"{s['dataset']}: {len(bundle.train)} train, {len(bundle.val)} validation; model {s['model']}, seeds {seeds}")
    st = _Stages(s, ctx, bundle)
    per_seed, chosen = [], None
    shown: dict[str, torch.nn.Module] = {}  # the first seed's models, for the deployment table
    for seed in seeds:
        record, chosen = _seed(st, seed, chosen, shown)
        per_seed.append(record)

    keys = ("errors", "accuracy", "nll", "accuracy_special", "errors_special")
    models = {
        "generalist": {**role_metrics([p["generalist"] for p in per_seed], keys), "spec": s["model"]},
        "generalist+specialists": {**role_metrics([p["combined"] for p in per_seed], keys),
                                   "specialists": summarize([len(p["clusters"]) for p in per_seed])},
        "distilled-combination": {**role_metrics([p["distilled"] for p in per_seed], keys), "spec": s["model"]},
    }
    changes = {"accuracy_change": summarize([p["combined"]["accuracy"] - p["generalist"]["accuracy"] for p in per_seed]),
               "accuracy_change_special": summarize([p["combined"]["accuracy_special"] - p["generalist"]["accuracy_special"]
                                                     for p in per_seed]),
               "distilled_change": summarize([p["distilled"]["accuracy"] - p["generalist"]["accuracy"] for p in per_seed])}
    _plot(per_seed, bundle.train.classes, ctx.out / "specialists.png")
    md = _markdown(s, models, chosen, per_seed, changes)
    extra = {"chosen": chosen, "per_seed": per_seed, **changes, "threads": torch.get_num_threads()}
    return finish(ctx, NAME, models, md, extra, shown, bundle.test)


def _markdown(s: dict[str, Any], models: dict[str, Any], chosen: dict, per_seed: list[dict], changes: dict) -> str:
    """results.md: the paper's number, the setting and choices, the three models, the change, the clusters."""
    diff, diff_special, diff_distilled = (changes[k] for k in ("accuracy_change", "accuracy_change_special",
                                                                "distilled_change"))
    cluster_lines = "\n".join(f"- seed {p['seed']}: {p['cluster_names']} (changed {p['changed_predictions']} test "
                              f"predictions: {p['fixed']} fixed, {p['broken']} broken)" for p in per_seed)

    def row(role: str) -> str:
        m = models[role]
        return (f"| {role} | {fmt(m['test_accuracy'], 4)} | {fmt(m['test_errors'], 1)} | "
                f"{fmt(m['test_accuracy_special'], 4)} |")

    return f"""
Paper (JFT, 61 specialists): top-1 accuracy 25.0% -> 26.1%.

`{s['model']}` generalist, {s['epochs']} epochs; {s['n_clusters']} K-means clusters of the validation
prediction covariance, one specialist per cluster of >= 2 classes ({s['specialist_epochs']} epochs from the
generalist's weights, lr {s['specialist_lr']}, half own / half other data, collapsed soft targets at
T = {s['specialist_temperature']}); specialist soft weight and top-k chosen on validation:
alpha = {chosen['specialist_alpha']}, top_k = {chosen['top_k']}. The distilled model has the generalist's
architecture and budget; T = {chosen['distill']['temperature']}, alpha = {chosen['distill']['alpha']} (validation).

| model | test accuracy | test errors | accuracy on the specialists' classes |
|---|---|---|---|
{row('generalist')}
{row('generalist+specialists')}
{row('distilled-combination')}

Change in test accuracy from adding specialists: {100 * diff['mean']:+.3f} ± {100 * diff['std']:.3f} points overall,
{100 * diff_special['mean']:+.3f} ± {100 * diff_special['std']:.3f} points on the specialists' classes;
distilled combination vs generalist: {100 * diff_distilled['mean']:+.3f} ± {100 * diff_distilled['std']:.3f} points.

Clusters found:
{cluster_lines}

![per-class accuracy](specialists.png)
"""


def _plot(per_seed: list[dict[str, Any]], class_names, path) -> None:
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.27
    for i, (role, colour) in enumerate((("generalist", "#999999"), ("combined", "#4477aa"), ("distilled", "#cc6677"))):
        per_class = torch.tensor([p[role]["per_class_accuracy"] for p in per_seed]) * 100
        ax.bar([c + (i - 1) * width for c in range(n)], per_class.mean(dim=0).tolist(), width,
               yerr=(per_class.std(dim=0) if len(per_seed) > 1 else torch.zeros(n)).tolist(), capsize=2,
               color=colour, label={"combined": "generalist + specialists", "distilled": "distilled combination"}.get(role, role))
    special = sorted({c for p in per_seed for cl in p["clusters"] for c in cl})
    ax.set_xticks(range(n), [f"{name}{'*' if c in special else ''}" for c, name in enumerate(class_names)],
                  rotation=30, fontsize=8)
    ax.set_ylim(max(0, float(min(min(p["generalist"]["per_class_accuracy"]) for p in per_seed)) * 100 - 10), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("per-class accuracy, mean over seeds (* = covered by a specialist)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
