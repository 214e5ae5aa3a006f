"""Soft targets, pictured: what a teacher's outputs look like at T = 1 and at a high temperature.

Three figures, from one trained MNIST teacher (the same cached teacher the transfer experiments use):

* ``temperatures.png``: the softmax of one logit vector (the teacher's, for one real test digit) at
  several temperatures: near one-hot at T = 1, flatter as T grows, with the ranking of the wrong
  classes (the "dark knowledge") coming into view;
* ``dark_knowledge.png``: for a few real test digits, the image, its one-hot label and the teacher's soft
  targets at T = 1 and T = 20 (log scale at T = 1, where the wrong classes hold tiny probabilities);
* ``class_similarity.png``: the teacher's soft targets at T = 20 averaged over the test digits of each
  class, which shows which digits it finds alike.

Numbers in results.json: the teacher's test errors, and per temperature the mean entropy of its soft
targets on the test set, the mean probability of the true class and of the runner-up class.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kdistill import data as kdata
from kdistill.engine.evaluate import predict_logits
from kdistill.losses import soft_targets
from kdistill.outputs.results import save_figure
from kdistill.experiments import RunContext
from kdistill.experiments._recipe import finish
from kdistill.experiments._mnist_teachers import TEACHER_SETTINGS, TeacherRecipe, cache_dir, get_teacher

NAME = "soft-labels"
DESCRIPTION = "MNIST: pictures of a teacher's soft targets at several temperatures (dark knowledge)"

_COMMON: dict[str, Any] = {
    **TEACHER_SETTINGS,
    "temperatures": [1.0, 2.0, 5.0, 10.0, 20.0],
    "high_temperature": 20.0,
    "example_index": 0,
    "digits_shown": [2, 3, 4, 7, 9],
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {**_COMMON, "teacher": "cnn:16,32", "teacher_epochs": 2},
    "full": {**_COMMON, "teacher": "cnn:32,64", "teacher_epochs": 8},
}


def soft_target_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """Mean entropy (bits), mean probability of the true class and of the largest wrong class at ``temperature``."""
    p = soft_targets(logits.double(), temperature)
    entropy = -(p * p.clamp_min(1e-300).log2()).sum(dim=1)
    true_p = p[torch.arange(len(labels)), labels]
    wrong = p.clone()
    wrong[torch.arange(len(labels)), labels] = 0.0
    return {"entropy_bits": float(entropy.mean()), "true_class_prob": float(true_p.mean()),
            "top_wrong_prob": float(wrong.max(dim=1).values.mean())}


def class_similarity(logits: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Row c: the mean soft target at ``temperature`` over the samples of class c."""
    p = soft_targets(logits.double(), temperature)
    rows = []
    for c in range(num_classes):
        mask = labels == c
        if not mask.any():
            raise ValueError(f"digits_shown/class_similarity: no test sample of class {c}")
        rows.append(p[mask].mean(dim=0))
    return torch.stack(rows)


def _plot_temperatures(path, logits: torch.Tensor, image: torch.Tensor, label: int, temperatures: list[float]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(temperatures) + 1, figsize=(2.6 * (len(temperatures) + 1), 2.8))
    axes[0].imshow(image.squeeze(0), cmap="gray_r")
    axes[0].set_title(f"test digit (label {label})", fontsize=9)
    axes[0].axis("off")
    for ax, T in zip(axes[1:], temperatures):
        p = soft_targets(logits, T)
        ax.bar(range(10), p, color=["tab:red" if c == label else "tab:blue" for c in range(10)])
        ax.set_ylim(0, 1)
        ax.set_xticks(range(10))
        ax.set_title(f"T = {T:g}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[1].set_ylabel("softmax(z / T)")
    fig.suptitle("One logit vector z (the teacher's) at several temperatures", fontsize=10, y=1.05)
    save_figure(fig, path)


def _plot_dark_knowledge(path, images, labels, logits, high_T: float) -> None:
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(11, 1.9 * n), gridspec_kw={"width_ratios": [0.7, 1, 1, 1]})
    axes = axes.reshape(n, 4)
    for i in range(n):
        y = int(labels[i])
        onehot = torch.zeros(10)
        onehot[y] = 1.0
        axes[i, 0].imshow(images[i].squeeze(0), cmap="gray_r")
        axes[i, 0].axis("off")
        panels = ((onehot, "one-hot label", False), (soft_targets(logits[i], 1.0), "teacher, T = 1 (log scale)", True),
                  (soft_targets(logits[i], high_T), f"teacher, T = {high_T:g}", False))
        for ax, (p, title, log) in zip(axes[i, 1:], panels):
            ax.bar(range(10), p.clamp_min(1e-12) if log else p,
                   color=["tab:red" if c == y else "tab:blue" for c in range(10)])
            ax.set_xticks(range(10))
            ax.tick_params(labelsize=7)
            if log:
                ax.set_yscale("log")
                ax.set_ylim(1e-12, 2)
            else:
                ax.set_ylim(0, 1.05 if title == "one-hot label" else max(0.3, float(p.max()) * 1.15))
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("What a student learns from: hard label vs the teacher's soft targets (red = true class)", fontsize=10)
    save_figure(fig, path)


def _plot_similarity(path, sim: torch.Tensor, T: float) -> None:
    import matplotlib.pyplot as plt

    off = sim.clone()
    off.fill_diagonal_(float("nan"))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(off, cmap="viridis")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("class the teacher gives probability to")
    ax.set_ylabel("true class of the test digits")
    ax.set_title(f"Mean soft target at T = {T:g}, diagonal hidden", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean probability")
    save_figure(fig, path)


def run(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    bundle = kdata.load("mnist", path=ctx.data_path, val_size=s["val_size"], seed=s["seed"])
    test = bundle.test
    if not 0 <= s["example_index"] < len(test):
        raise ValueError(f"example_index: must be in 0..{len(test) - 1}, got {s['example_index']}")
    bad = [c for c in s["digits_shown"] if not 0 <= int(c) < test.num_classes]
    if bad:
        raise ValueError(f"digits_shown: classes {bad} are not in 0..{test.num_classes - 1}")
    recipe = TeacherRecipe(spec=s["teacher"], epochs=s["teacher_epochs"], lr=s["teacher_lr"],
                           weight_decay=s["teacher_weight_decay"], jitter=s["teacher_jitter"],
                           batch_size=s["batch_size"], seed=s["seed"])
    teacher, record = get_teacher(recipe, bundle.train, bundle.val, test, ctx, cache_dir(s["teacher_cache"], ctx.out))
    logits = predict_logits(teacher, test.x)
    high_T = float(s["high_temperature"])
    temperatures = sorted({float(t) for t in s["temperatures"]} | {1.0, high_T})

    i = s["example_index"]
    _plot_temperatures(ctx.out / "temperatures.png", logits[i], test.x[i], int(test.y[i]), temperatures)
    rows = [int(torch.nonzero(test.y == int(c))[0]) for c in s["digits_shown"]]  # first test digit of each class
    _plot_dark_knowledge(ctx.out / "dark_knowledge.png", test.x[rows], test.y[rows], logits[rows], high_T)
    sim = class_similarity(logits, test.y, high_T, test.num_classes)
    _plot_similarity(ctx.out / "class_similarity.png", sim, high_T)

    stats = {f"{T:g}": soft_target_stats(logits, test.y, T) for T in temperatures}
    off = sim.clone().fill_diagonal_(-1.0)
    nearest = {str(c): int(off[c].argmax()) for c in range(test.num_classes)}
    t = record["test"]
    models = {"teacher": {"test_errors": t["errors"], "test_accuracy": t["accuracy"], "seeds": 1, "spec": s["teacher"],
                          "loaded_from_cache": record["loaded_from_cache"], "train_wall_time_s": record["train_wall_time_s"]}}
    stat_rows = "\n".join(f"| {T} | {v['entropy_bits']:.3f} | {v['true_class_prob']:.4f} | {v['top_wrong_prob']:.2e} |"
                          for T, v in stats.items())
    md = f"""
Teacher: `{s['teacher']}`, {s['teacher_epochs']} epochs, jitter ±{s['teacher_jitter']} px: {t['errors']} test errors.
Entropy of a 10-class distribution is at most {math.log2(10):.3f} bits.

Soft targets on the {len(test)} test digits:

| T | mean entropy (bits) | mean p(true class) | mean p(largest wrong class) |
|---|---|---|---|
{stat_rows}

The class each digit is most confused with, from the mean soft target at T = {high_T:g}:
{", ".join(f"{c}→{n}" for c, n in nearest.items())}.

Plots: `temperatures.png` (test digit {i}), `dark_knowledge.png` (the first test digit of each class in
{list(s['digits_shown'])}), `class_similarity.png`.
"""
    extra = {"soft_target_stats": stats, "nearest_class": nearest, "similarity_T": high_T,
             "class_similarity": [[round(float(v), 6) for v in row] for row in sim]}
    # No student is trained here: the table has the teacher alone, measured as in the other experiments.
    return finish(ctx, NAME, models, md, extra, {f"teacher {s['teacher']}": teacher}, test)
