"""Train N students in one pass: a sweep over temperatures, alphas, learning rates and seeds.

``fit_many(models, train, configs, teacher=...)`` gives the same students as calling
:func:`kdistill.train.fit` once per (model, config) pair, up to floating-point rounding (the tests
check 1e-4 on the weights), but shares the work they have in common:

* every student of one architecture (an MLP without dropout) is held in one
  :class:`~kdistill.stacked.StackedMLP`: a step is a few large matrix products for all of them, with
  hand-written backward passes, the loss gradient in closed form
  (:func:`~kdistill.losses.stacked_distillation_loss_and_grad`) and one optimiser update over the
  stacked tensors (torch's fused kernel when lr, momentum and weight decay are shared);
* **sharing rule**: students whose configs have the same ``seed`` draw their batches from the same
  seeded generator, exactly as ``fit`` would, so they see identical batches and identical jitter. Such a
  *group* shares one gather of the batch, one jitter op, one first-layer matrix product and one teacher
  lookup; with a live (jittered) teacher, one forward per step serves every group (their batches are
  concatenated). Students with different seeds never share batches. To get different
  initialisations on shared batches, build the models with different ``build_model(..., seed=)``
  (``fit_grid``'s ``init_seeds``) and give them configs with the same ``seed``; each still equals
  ``fit`` of that model and config.
* a module teacher without jitter is cached once, as ``fit`` does, and the cache serves all students.
* a student with ``alpha=0`` learns from the labels alone and equals ``fit`` of its config without a
  teacher, so directly trained baselines can share a distillation pass.

What may differ between students: ``seed``, ``lr``, ``momentum``, ``weight_decay``, ``temperature``,
``alpha``. Everything else in :class:`~kdistill.train.TrainConfig` (epochs, batch size, optimiser,
schedule, jitter, loss kind, ...) must be equal, because it sets the shape of the shared pass.
Students that cannot be stacked (other architectures, dropout) are trained one after another with
``fit``, still sharing a cached teacher. The stacked path writes no checkpoints (no resume), validates
once per epoch (``eval_every_steps`` must be 0), runs in float32 (``amp`` unused) and ignores ``compile``.
On CUDA each step of the stacked pass is captured once and replayed as a CUDA graph (``cuda_graph``, as
in ``fit``), except with Adam at per-student rates, whose hand-written update needs the host every step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cuda_graph import GraphedStep, graph_safe_teacher
from .data.augment import jitter_offsets, to_device_async, translate
from .data.dataset import TensorData
from .distributed import world
from .evaluate import classification_metrics
from .io import save_model
from .losses import stacked_distillation_loss_and_grad
from .stacked import StackedMLP, StackedOptimizer, mlp_signature
from .teachers import ModuleTeacher, Teacher
from .train import FitResult, TrainConfig, fit, lr_factor, prepare_teacher, resolve_device

PER_STUDENT = ("seed", "lr", "momentum", "weight_decay", "temperature", "alpha")
"""TrainConfig fields that may differ between the students of one pass."""
IGNORED = ("compile", "checkpoint")
"""Fields without effect here (no per-step compile; no checkpoints of a stacked pass)."""


def check_configs(configs: Sequence[TrainConfig]) -> None:
    """Raise ValueError unless ``configs`` can share one pass (see :data:`PER_STUDENT`)."""
    if not configs:
        raise ValueError("configs: need at least one student config")
    for cfg in configs:
        cfg.validate()
    first = configs[0]
    for name in first.__dataclass_fields__:
        if name in PER_STUDENT or name in IGNORED:
            continue
        values = {repr(getattr(c, name)) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"train.{name}: must be the same for every student of a sweep, got {sorted(values)}; "
                f"only {', '.join(PER_STUDENT)} may differ (run separate sweeps otherwise)"
            )
    if first.eval_every_steps:
        raise ValueError("train.eval_every_steps: not supported by fit_many (validation runs once per epoch); set 0")


def seed_groups(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Student indices grouped by data seed, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(cfg.seed, []).append(i)
    return list(groups.values())


def fit_many(
    models: Sequence[nn.Module],
    train: TensorData,
    configs: Sequence[TrainConfig] | TrainConfig,
    *,
    teacher: Teacher | nn.Module | None = None,
    val: TensorData | None = None,
    test: TensorData | None = None,
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[FitResult]:
    """Train ``models[i]`` with ``configs[i]`` (one config: the same for all); return one FitResult each.

    The models are trained in place, like ``fit`` does. ``out_dir`` gets one sub-directory per student
    (``names[i]``, default ``student{i}``) with ``metrics.jsonl`` and ``model.safetensors``.
    Each result's ``wall_time_s`` is the wall time of the whole shared pass.
    """
    if world()[1] > 1:
        raise ValueError("fit_many: a sweep is not data-parallel; run it in one process (several sweeps can share "
                         "a machine's GPUs, one process each)")
    models = list(models)
    configs = list(configs) if isinstance(configs, Sequence) else [configs] * len(models)
    if len(configs) != len(models):
        raise ValueError(f"configs: need one per model ({len(models)}), got {len(configs)}")
    check_configs(configs)
    names = list(names) if names is not None else [f"student{i}" for i in range(len(models))]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"names: need {len(models)} distinct names, got {names}")
    if train.has_unlabelled and teacher is None:
        raise ValueError(f"{train.name}: has unlabelled samples; supervised training needs labels (give a teacher)")
    cfg0 = configs[0]
    device = resolve_device(cfg0.device)
    # The teacher checks of fit (alpha < 1 on unlabelled data, cache coverage) with the smallest alpha.
    prepared = prepare_teacher(teacher, train, min(configs, key=lambda c: c.alpha), device)
    out = Path(out_dir) if out_dir else None

    sigs = [mlp_signature(m) for m in models]
    if None in sigs or len(set(sigs)) > 1:
        return [
            fit(m, train, c, teacher=prepared, val=val, test=test, out_dir=out / nm if out else None, progress=progress)
            for m, c, nm in zip(models, configs, names)
        ]
    return _fit_stacked(models, train, configs, prepared, val, test, out, names, progress, device)


def fit_grid(
    spec: str,
    train: TensorData,
    configs: Sequence[TrainConfig],
    *,
    init_seeds: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[FitResult]:
    """Build one ``spec`` student per config (initialised with ``init_seeds[i]``, default its config's
    seed, exactly as ``build_model(spec, ..., seed=)`` does for a solo run) and train them all with
    :func:`fit_many`; ``kwargs`` go to it. A seed loop ``[fit(build_model(spec, seed=s), ...) for s in
    seeds]`` becomes ``fit_grid(spec, train, [replace(cfg, seed=s) for s in seeds], ...)``.
    """
    seeds = list(init_seeds) if init_seeds is not None else [c.seed for c in configs]
    if len(seeds) != len(configs):
        raise ValueError(f"init_seeds: need one per config ({len(configs)}), got {len(seeds)}")
    from .models import build_model

    models = [build_model(spec, train.input_shape, train.num_classes, seed=s) for s in seeds]
    return fit_many(models, train, configs, **kwargs)


def _fit_stacked(models, train, configs, teacher, val, test, out, names, progress, device) -> list[FitResult]:
    cfg0 = configs[0]
    n_students = len(models)
    groups = seed_groups(configs)
    order = [i for g in groups for i in g]  # stacked position -> caller's index
    cfgs = [configs[i] for i in order]
    group_of = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=device)
    gens = [torch.Generator().manual_seed(configs[g[0]].seed) for g in groups]

    for m in models:
        m.to(device)
    net = StackedMLP([models[i] for i in order], [len(g) for g in groups], device)
    maybe_graph = cfg0.cuda_graph and device.type == "cuda" and graph_safe_teacher(teacher)
    opt = StackedOptimizer(net, cfg0.optimizer, [c.lr for c in cfgs], [c.momentum for c in cfgs], [c.weight_decay for c in cfgs],
                           cfg0.nesterov and any(c.momentum > 0 for c in cfgs), capturable=maybe_graph)
    temps = torch.tensor([c.temperature for c in cfgs], dtype=torch.float64, device=device)
    alphas = torch.tensor([c.alpha for c in cfgs], dtype=torch.float64, device=device)
    need_labels = teacher is None or bool((alphas < 1).any())
    val_teacher = teacher.predict(val) if teacher is not None and val is not None and isinstance(teacher, ModuleTeacher) else None

    x, y, ids = train.x.to(device), train.y.to(device), train.index.to(device)
    n = len(train)
    bs = cfg0.batch_size
    steps_per_epoch = max(1, n // bs)
    total_steps = steps_per_epoch * cfg0.epochs
    histories: list[list[dict[str, Any]]] = [[] for _ in range(n_students)]  # stacked order
    best = [(math.inf, None)] * n_students
    best_params = [p.clone() for p in net.params] if cfg0.keep_best and val is not None else None
    if out:
        for nm in names:
            (out / nm).mkdir(parents=True, exist_ok=True)
            (out / nm / "metrics.jsonl").write_text("")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg0.epochs, desc=f"{n_students} students", leave=False)
    loss_sum = torch.zeros(n_students, device=device)

    def train_step(rows: list[torch.Tensor], offsets: list[torch.Tensor] | None, factor: float | torch.Tensor) -> None:
        """One update of every student: pure device work, so it can be captured as a CUDA graph."""
        xbs = [x.index_select(0, r) for r in rows]
        if offsets is not None:
            xbs = [translate(xb, o, cfg0.jitter) for xb, o in zip(xbs, offsets)]
        logits = net.forward(xbs)
        losses, grad = _losses(logits, rows, xbs, y, ids, teacher, temps, alphas, need_labels, group_of, cfg0.loss)
        net.backward(grad)
        opt.step(factor)
        if cfg0.max_norm:
            net.apply_max_norm(cfg0.max_norm)
        if net.max_norm:  # what MLP.constrain does after each of fit's steps
            net.apply_max_norm(net.max_norm)
        loss_sum.add_(losses.detach())

    graphed = None
    if maybe_graph and opt.graph_safe:  # static inputs of the captured step, refilled before every replay
        rows_bufs = [torch.zeros(bs, dtype=torch.long, device=device) for _ in gens]
        offsets_bufs = [torch.zeros(2, bs, dtype=torch.long, device=device) for _ in gens] if cfg0.jitter else None
        factor_buf = torch.ones((), dtype=torch.float64, device=device)
        graphed = GraphedStep(lambda: train_step(rows_bufs, offsets_bufs, factor_buf))

    step = 0
    t0 = time.perf_counter()
    for epoch in range(cfg0.epochs):
        perms = [torch.randperm(n, generator=g).to(device) for g in gens]
        loss_sum.zero_()
        factor = 1.0
        for i in range(steps_per_epoch):
            rows = [p[i * bs : (i + 1) * bs] for p in perms]
            offsets = [jitter_offsets(len(r), cfg0.jitter, g) for r, g in zip(rows, gens)] if cfg0.jitter else None
            factor = lr_factor(cfg0.schedule, step, total_steps, cfg0.warmup)
            if graphed is None:
                train_step(rows, None if offsets is None else [to_device_async(o, device) for o in offsets], factor)
            else:
                for buf, r in zip(rows_bufs, rows):
                    buf.copy_(r)
                for buf, o in zip(offsets_bufs or [], offsets or []):
                    buf.copy_(o.pin_memory(), non_blocking=True)
                factor_buf.fill_(factor)
                graphed()
            step += 1
        train_loss = (loss_sum / steps_per_epoch).tolist()
        lrs = [c.lr * factor for c in cfgs]  # the last step's rates, as fit's history reports them
        val_logits = net.predict(val.x) if val is not None else None
        elapsed = round(time.perf_counter() - t0, 3)
        for s in range(n_students):
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": lrs[s], "train_loss": train_loss[s]}
            if val_logits is not None:
                m = classification_metrics(val_logits[s], val.y, val_teacher, cfgs[s].temperature, detailed=False)
                row.update({f"val_{k}": v for k, v in m.items() if k != "count"})
                if best_params is not None and row["val_errors"] < best[s][0]:
                    best[s] = (row["val_errors"], epoch + 1)
                    for k in range(len(net.params)):
                        _student_slice(net, best_params, k, s).copy_(net.student_view(k, s))
            row["time_s"] = elapsed
            histories[s].append(row)
            if out:
                with open(out / names[order[s]] / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{min(train_loss):.4f}")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    if best_params is not None:
        for s in range(n_students):
            if best[s][1] is not None:
                for k in range(len(net.params)):
                    net.student_view(k, s).copy_(_student_slice(net, best_params, k, s))

    net.write_to([models[i] for i in order])
    val_logits = net.predict(val.x) if val is not None else None
    test_logits = net.predict(test.x) if test is not None else None
    results: list[FitResult | None] = [None] * n_students
    for s, idx in enumerate(order):
        model = models[idx].eval()
        r = FitResult(model=model, history=histories[s], wall_time_s=wall,
                      best_epoch=best[s][1] if best_params is not None else None)
        if val_logits is not None:
            r.val = classification_metrics(val_logits[s], val.y, val_teacher, cfgs[s].temperature, detailed=False)
        if test_logits is not None:
            r.test = classification_metrics(test_logits[s], test.y)
        if out:
            save_model(out / names[idx] / "model.safetensors", model, in_shape=list(train.input_shape),
                       num_classes=train.num_classes)
        results[idx] = r
    return results  # type: ignore[return-value]


def _student_slice(net: StackedMLP, tensors: list[torch.Tensor], k: int, s: int) -> torch.Tensor:
    """Student ``s``'s slice of ``tensors[k]`` (laid out like ``net.params[k]``)."""
    if k < 2:
        w = net.widths[1]
        return tensors[k][..., s * w : (s + 1) * w]
    return tensors[k][s]


def _losses(z, rows, xbs, y, ids, teacher, temps, alphas, need_labels, group_of, kind):
    """Per-student losses (N,) of logits ``z`` (N, B, C), each as ``fit`` computes it, and their gradient."""
    single = len(rows) == 1

    def per_student(parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if single else torch.stack(parts).index_select(0, group_of)

    labels = per_student([y.index_select(0, r) for r in rows]) if need_labels else None
    t_logits = None
    if teacher is not None:
        if getattr(teacher, "needs_inputs", True):
            t_all = teacher.logits(torch.cat(xbs) if not single else xbs[0],
                                   torch.cat([ids.index_select(0, r) for r in rows]))
            t_logits = per_student(list(t_all.split(len(rows[0]))))
        else:
            t_logits = per_student([teacher.logits(xb, ids.index_select(0, r)) for xb, r in zip(xbs, rows)])
    return stacked_distillation_loss_and_grad(z, t_logits, labels, temperature=temps, alpha=alphas, kind=kind,
                                              checked=True)
