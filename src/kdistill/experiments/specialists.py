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
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.outputs.results import fmt, role_metrics, save_figure, summarize, write_results
from kdistill.teachers.specialists import SpecialistModel, SpecialistSystem, confusable_clusters, train_specialist
from kdistill.teachers.base import CachedTeacher
from kdistill.engine import TrainConfig, fit
from kdistill.models import build_model
from kdistill.experiments import RunContext

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


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    bundle = kdata.load(s["dataset"], val_size=s["val_size"], seed=s["seed"],
                        **({"path": ctx.data_path} if ctx.data_path else {}))
    train, val, test = bundle.train, bundle.val, bundle.test
    shape, classes = bundle.input_shape, train.num_classes
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    ctx.log(f"{s['dataset']}: {len(train)} train, {len(val)} validation; model {s['model']}, seeds {seeds}")

    def cfg(seed: int, epochs: int, lr: float, temperature: float = 1.0, alpha: float = 1.0, best: bool = False):
        return TrainConfig(epochs=epochs, batch_size=s["batch_size"], lr=lr, seed=seed, temperature=temperature,
                           alpha=alpha, keep_best=best, checkpoint=False)

    def build_system(seed: int, generalist, gen_train_logits, clusters, alpha: float):
        specialists = []
        for cl in clusters:
            spec, r = train_specialist(
                generalist, train, cl, cfg(seed, s["specialist_epochs"], s["specialist_lr"], s["specialist_temperature"],
                                           alpha, best=True),
                generalist_logits=gen_train_logits, val=val, progress=ctx.progress)
            specialists.append(spec)
            ctx.log(f"seed {seed}: specialist {list(cl)} (alpha {alpha}): {r.val['accuracy']:.4f} on its validation mix")
        return SpecialistSystem(generalist, specialists)

    per_seed, chosen = [], None
    shown: dict[str, torch.nn.Module] = {}  # the first seed's models, for the deployment table
    for seed in seeds:
        g_fit = fit(build_model(s["model"], shape, classes, seed=seed), train, cfg(seed, s["epochs"], s["lr"]),
                    val=val, test=test, progress=ctx.progress)
        generalist = g_fit.model
        gen_train_logits = predict_logits(generalist, train.x)
        clusters = confusable_clusters(torch.softmax(predict_logits(generalist, val.x), dim=1), s["n_clusters"], seed)
        names = [[train.classes[c] for c in cl] for cl in clusters]
        ctx.log(f"seed {seed}: generalist {g_fit.test['errors']} test errors; clusters {names}")
        if not clusters:
            raise ValueError("n_clusters: every cluster has one class, so there is nothing to specialise; use fewer")
        special_ids = torch.tensor(sorted(c for cl in clusters for c in cl))

        # Specialist soft weight and top-k on validation (first seed); the rest reuse them.
        systems, val_outputs = {}, {}
        for alpha in (s["specialist_alphas"] if chosen is None else [chosen["specialist_alpha"]]):
            systems[alpha] = build_system(seed, generalist, gen_train_logits, clusters, alpha)
            val_outputs[alpha] = systems[alpha].outputs(val.x)
        if chosen is None:
            scores = {}
            for alpha, k in itertools.product(s["specialist_alphas"], s["top_ks"]):
                lq = systems[alpha].combine(*val_outputs[alpha], top_k=k)
                scores[(alpha, k)] = int((lq.argmax(1) != val.y).sum())
            best = min(scores, key=lambda c: (scores[c], list(scores).index(c)))
            gen_val_errors = int((val_outputs[best[0]][0].argmax(1) != val.y).sum())
            chosen = {"specialist_alpha": best[0], "top_k": best[1],
                      "validation_errors": {f"alpha={a}, top_k={k}": v for (a, k), v in scores.items()},
                      "generalist_validation_errors": gen_val_errors}
            ctx.log(f"chosen on validation: {chosen}")
        system = systems[chosen["specialist_alpha"]]
        system.top_k = chosen["top_k"]

        special_test = torch.isin(test.y, special_ids)
        gen_test_lp = torch.log_softmax(predict_logits(generalist, test.x), dim=1)
        comb_test_lp = system.log_probs(test.x)
        gen_m, comb_m = _metrics(gen_test_lp, test.y, special_test), _metrics(comb_test_lp, test.y, special_test)
        active = (comb_test_lp.argmax(1) != gen_test_lp.argmax(1))
        ctx.log(f"seed {seed}: generalist {gen_m['errors']} / combined {comb_m['errors']} test errors "
                f"({int(active.sum())} predictions changed)")

        # Distil the combination (its distribution on the training set) into one generalist-sized model.
        teacher = CachedTeacher(train.index, system.predict(train))
        grid = list(itertools.product(s["distill_temperatures"], s["distill_alphas"]))
        if "distill" not in chosen:
            fits = {c: fit(build_model(s["model"], shape, classes, seed=seed + 1000), train,
                           cfg(seed + 1000, s["epochs"], s["lr"], *c), teacher=teacher, val=val, test=test,
                           progress=ctx.progress) for c in grid}
            pick = min(grid, key=lambda c: (fits[c].val["errors"], grid.index(c)))
            chosen["distill"] = {"temperature": pick[0], "alpha": pick[1],
                                 "validation_errors": {f"T={t}, alpha={a}": fits[(t, a)].val["errors"] for t, a in grid}}
            d_fit = fits[pick]
        else:
            c = (chosen["distill"]["temperature"], chosen["distill"]["alpha"])
            d_fit = fit(build_model(s["model"], shape, classes, seed=seed + 1000), train, cfg(seed + 1000, s["epochs"], s["lr"], *c),
                        teacher=teacher, val=val, test=test, progress=ctx.progress)
        dist_m = _metrics(torch.log_softmax(predict_logits(d_fit.model, test.x), dim=1), test.y, special_test)
        if not shown:
            # The teacher is the whole system (generalist + specialists, combined as above); the generalist
            # has the distilled model's architecture and budget on the labels alone: the student alone.
            n, d = len(clusters), chosen["distill"]
            teacher_name = f"teacher generalist {s['model']} + {n} specialist{'s' * (n > 1)} (top-{system.top_k})"
            shown = {
                teacher_name: SpecialistModel(system),
                f"distilled {s['model']} (T={d['temperature']:g}, alpha={d['alpha']:g})": d_fit.model,
                f"student alone {s['model']} (the generalist)": generalist,
            }
        ctx.log(f"seed {seed}: distilled combination {dist_m['errors']} test errors")
        per_seed.append({"seed": seed, "clusters": [list(c) for c in clusters], "cluster_names": names,
                         "generalist": gen_m, "combined": comb_m, "distilled": dist_m,
                         "changed_predictions": int(active.sum()),
                         "fixed": int(((comb_test_lp.argmax(1) == test.y) & (gen_test_lp.argmax(1) != test.y)).sum()),
                         "broken": int(((comb_test_lp.argmax(1) != test.y) & (gen_test_lp.argmax(1) == test.y)).sum())})

    keys = ("errors", "accuracy", "nll", "accuracy_special", "errors_special")
    models = {
        "generalist": {**role_metrics([p["generalist"] for p in per_seed], keys), "spec": s["model"]},
        "generalist+specialists": {**role_metrics([p["combined"] for p in per_seed], keys),
                                   "specialists": summarize([len(p["clusters"]) for p in per_seed])},
        "distilled-combination": {**role_metrics([p["distilled"] for p in per_seed], keys), "spec": s["model"]},
    }
    diff = summarize([p["combined"]["accuracy"] - p["generalist"]["accuracy"] for p in per_seed])
    diff_special = summarize([p["combined"]["accuracy_special"] - p["generalist"]["accuracy_special"] for p in per_seed])
    diff_distilled = summarize([p["distilled"]["accuracy"] - p["generalist"]["accuracy"] for p in per_seed])
    _plot(per_seed, train.classes, ctx.out / "specialists.png")

    cluster_lines = "\n".join(f"- seed {p['seed']}: {p['cluster_names']} (changed {p['changed_predictions']} test "
                              f"predictions: {p['fixed']} fixed, {p['broken']} broken)" for p in per_seed)

    def row(role: str) -> str:
        m = models[role]
        return (f"| {role} | {fmt(m['test_accuracy'], 4)} | {fmt(m['test_errors'], 1)} | "
                f"{fmt(m['test_accuracy_special'], 4)} |")

    md = f"""
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
    results = write_results(ctx.out, NAME, ctx.profile, ctx.elapsed, models, md,
                            extra={"chosen": chosen, "per_seed": per_seed, "accuracy_change": diff,
                                   "accuracy_change_special": diff_special, "distilled_change": diff_distilled,
                                   "threads": torch.get_num_threads()})
    return ctx.deployment(shown, test, results)


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
