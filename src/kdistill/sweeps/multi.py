"""Train N students in one pass: a sweep over temperatures, alphas, learning rates and seeds.

``fit_many(models, train, configs, teacher=...)`` gives the same students as calling
:func:`kdistill.engine.fit` once per (model, config) pair, up to floating-point rounding (the tests
check 1e-4 on the weights), but shares the work they have in common:

* every student of one architecture (an MLP without dropout) is held in one
  :class:`~kdistill.sweeps.stacked.StackedMLP`: a step is a few large matrix products for all of them, with
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
* a student whose method is KD with ``alpha=0`` (or CE) learns from the labels alone and equals ``fit`` of its
  config without a teacher, so directly trained baselines can share a distillation pass.

What may differ between students: ``seed``, ``lr``, ``momentum``, ``weight_decay`` and the method's options
(``methods[i]``: KD's ``temperature`` and ``alpha``). Everything else in :class:`~kdistill.engine.TrainConfig` (epochs, batch size, optimiser,
schedule, jitter, ...) must be equal, and the soft-term kind, because it sets the shape of the shared pass.
Students that cannot be stacked (other architectures, dropout) are trained one after another with
``fit``, still sharing a cached teacher. The stacked path writes no checkpoints (no resume), validates
once per epoch (``eval_every_steps`` must be 0), runs in float32 (``amp`` unused) and ignores ``compile``.
On CUDA each step of the stacked pass is captured once and replayed as a CUDA graph (``cuda_graph``, as
in ``fit``), except with Adam at per-student rates, whose hand-written update needs the host every step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.engine.cuda_graph import GraphedStep, graph_safe_teacher
from kdistill.data.augment import translate
from kdistill.data.dataset import TensorData
from kdistill.engine.distributed import world
from kdistill.engine.evaluate import classification_metrics
from kdistill.losses import STACKED_KINDS, stacked_distillation_loss_and_grad
from kdistill.sweeps.stacked import StackedMLP, StackedOptimizer, mlp_signature
from kdistill.teachers.base import ModuleTeacher, Teacher
from kdistill.engine.callbacks import Callback, KeepBest, LoopState, MetricsFiles, ProgressBar, final_results, save_models
from kdistill.engine.heap import retain_freed_memory
from kdistill.engine.loop import as_splits, run_epochs
from kdistill.engine.sources import make_source
from kdistill.engine import FitResult, TrainConfig, fit, resolve_device, resolve_method
from kdistill.methods import Method
from kdistill.teachers.teaching import prepare_teaching
from kdistill.models import build_model

PER_STUDENT = ("seed", "lr", "momentum", "weight_decay")
"""TrainConfig fields that may differ between the students of one pass (and each student's method options)."""
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
    train: Any,
    configs: Sequence[TrainConfig] | TrainConfig,
    *,
    teacher: Teacher | nn.Module | None = None,
    methods: Sequence[Any] | Any = None,
    val: Any = None,
    test: Any = None,
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[FitResult]:
    """Train ``models[i]`` with ``configs[i]`` and ``methods[i]`` (one config or method: the same for all);
    return one FitResult each. A method is what :func:`~kdistill.engine.fit` takes (a name, a ``{"name": "kd",
    "temperature": 4, "alpha": 0.9}`` dict or a Method); ``None``: KD with its defaults with a teacher, else CE.

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
    train, val, test = as_splits(train, val, test)  # any data fit takes: in memory, (x, y), or a streamed Dataset
    if any(getattr(split, "per_position", False) for split in (train, val, test)):
        raise ValueError("fit_many: per-position targets (labels (N, L)) are not supported by the multi-student "
                         "sweep; train each student with fit (method kd or ce)")
    names = list(names) if names is not None else [f"student{i}" for i in range(len(models))]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"names: need {len(models)} distinct names, got {names}")
    if train.has_unlabelled and teacher is None:
        raise ValueError(f"{train.name}: has unlabelled samples; supervised training needs labels (give a teacher)")
    methods = resolve_methods(methods, teacher, configs)
    cfg0 = configs[0]
    device = resolve_device(cfg0.device)
    retain_freed_memory()  # before the teacher's outputs are cached, not only from the first step
    # The teacher checks of fit (labels needed on unlabelled data, cache coverage) with the method needing most.
    prepared = prepare_teacher(teacher, train, cfg0, max(methods, key=lambda m: m.needs_labels), device)
    out = Path(out_dir) if out_dir else None

    sigs = [mlp_signature(m) for m in models]
    soft = stacked_options(methods, teacher is not None)
    in_memory = all(s is None or isinstance(s, TensorData) for s in (train, val, test))
    if None in sigs or len(set(sigs)) > 1 or soft is None or not in_memory:  # else each student through fit
        return [
            fit(m, train, c, teacher=prepared, method=me, val=val, test=test, out_dir=out / nm if out else None,
                progress=progress, overwrite=out is not None)  # a sweep owns its students' directories, as stacked
            for m, c, me, nm in zip(models, configs, methods, names)
        ]
    return _fit_stacked(models, train, configs, soft, prepared, val, test, out, names, progress, device)


def resolve_methods(methods: Sequence[Any] | Any, teacher: Any, configs: Sequence[TrainConfig]) -> list[Method]:
    """One :class:`~kdistill.methods.Method` per student: a list as given, or one spec built once per student
    (so no two students share a method's state)."""
    if isinstance(methods, (list, tuple)):
        if len(methods) != len(configs):
            raise ValueError(f"methods: need one per model ({len(configs)}), got {len(methods)}")
        return [resolve_method(m, teacher, c) for m, c in zip(methods, configs)]
    if isinstance(methods, Method) and len(configs) > 1:
        raise ValueError("methods: give one Method per student (a list), or a name or dict built once for each")
    return [resolve_method(methods, teacher, c) for c in configs]


def stacked_options(methods: Sequence[Method], has_teacher: bool) -> tuple[list[float], list[float], str] | None:
    """Per-student temperatures and soft weights and the shared soft-term kind, when every method declares
    itself ``stackable`` (its loss is the closed form of the stacked backend: KD, or CE as KD with alpha 0);
    ``None`` sends the students to ``fit`` one after another."""
    if not all(m.stackable for m in methods):
        return None
    kinds = {getattr(m, "kind", None) for m in methods} - {None}
    if len(kinds) > 1 or not kinds <= set(STACKED_KINDS) or (kinds and not has_teacher):
        return None
    temps = [float(getattr(m, "temperature", 1.0)) for m in methods]
    alphas = [float(getattr(m, "alpha", 0.0)) if has_teacher else 1.0 for m in methods]
    return temps, alphas, next(iter(kinds), "kl")


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

    models = [build_model(spec, train.input_shape, train.num_classes, seed=s) for s in seeds]
    return fit_many(models, train, configs, **kwargs)


class StackedStep:
    """The stacked backend of :func:`kdistill.engine.loop.run_epochs`: every student of one MLP architecture
    in one :class:`StackedMLP`, hand-written backward, one optimiser update over the stacked tensors."""

    def __init__(self, models, cfgs, soft, groups, teacher, sources, device) -> None:
        cfg0 = cfgs[0]
        temps, alphas, self.kind = soft
        self.cfgs, self.cfg0, self.teacher, self.sources, self.device = cfgs, cfg0, teacher, sources, device
        self.n = len(models)
        self.net = StackedMLP(models, [len(g) for g in groups], device)
        self.group_of = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=device)
        maybe_graph = cfg0.cuda_graph and device.type == "cuda" and graph_safe_teacher(teacher)
        self.opt = StackedOptimizer(self.net, cfg0.optimizer, [c.lr for c in cfgs], [c.momentum for c in cfgs],
                                    [c.weight_decay for c in cfgs], cfg0.nesterov and any(c.momentum > 0 for c in cfgs),
                                    capturable=maybe_graph)
        self.temps = torch.tensor(temps, dtype=torch.float64, device=device)
        self.alphas = torch.tensor(alphas, dtype=torch.float64, device=device)
        self.need_labels = teacher is None or bool((self.alphas < 1).any())
        self.loss_sum = torch.zeros(self.n, device=device)
        self.factor = 1.0
        self.graphed = None
        if maybe_graph and self.opt.graph_safe:  # static inputs of the captured step, refilled before every replay
            bs = cfg0.batch_size
            self.rows_bufs = [torch.zeros(bs, dtype=torch.long, device=device) for _ in groups]
            self.offsets_bufs = [torch.zeros(2, bs, dtype=torch.long, device=device) for _ in groups] if cfg0.jitter else None
            self.factor_buf = torch.ones((), dtype=torch.float64, device=device)
            self.graphed = GraphedStep(lambda: self._step(self.rows_bufs, self.offsets_bufs, self.factor_buf))

    def _step(self, rows, offsets, factor) -> None:
        """One update of every student: pure device work, so it can be captured as a CUDA graph."""
        cfg0, src, net = self.cfg0, self.sources[0], self.net
        xbs = [src.x.index_select(0, r) for r in rows]
        if offsets is not None:
            xbs = [translate(xb, o, cfg0.jitter) for xb, o in zip(xbs, offsets)]
        logits = net.forward(xbs)
        losses, grad = _losses(logits, rows, xbs, src.y, src.ids, self.teacher, self.temps, self.alphas,
                               self.need_labels, self.group_of, self.kind)
        net.backward(grad)
        self.opt.step(factor)
        if cfg0.max_norm:
            net.apply_max_norm(cfg0.max_norm)
        if net.max_norm:  # what MLP.constrain does after each of fit's steps
            net.apply_max_norm(net.max_norm)
        self.loss_sum.add_(losses.detach())

    def step(self, batches, lr_factor: float, progress: float) -> None:
        self.factor = lr_factor
        rows = [b.rows for b in batches]
        offsets = [b.params.offsets for b in batches] if self.cfg0.jitter else None
        if self.graphed is None:
            self._step(rows, offsets, lr_factor)
            return
        for buf, r in zip(self.rows_bufs, rows):
            buf.copy_(r)
        for buf, o in zip(self.offsets_bufs or [], offsets or []):
            buf.copy_(o, non_blocking=True)
        self.factor_buf.fill_(lr_factor)
        self.graphed()

    def take_losses(self, steps: int) -> list[dict[str, float]]:
        out = [{"train_loss": v} for v in (self.loss_sum / steps).tolist()]
        self.loss_sum.zero_()
        return out

    def lrs(self) -> list[float]:
        return [c.lr * self.factor for c in self.cfgs]  # the last step's rates, as fit's history reports them

    def predict(self, data) -> list[torch.Tensor]:
        return list(self.net.predict(data.x))

    def snapshot(self, s: int) -> list[torch.Tensor]:
        return [self.net.student_view(k, s).clone() for k in range(len(self.net.params))]

    def restore(self, s: int, snap: list[torch.Tensor]) -> None:
        for k, t in enumerate(snap):
            self.net.student_view(k, s).copy_(t)


def _fit_stacked(models, train, configs, soft, teacher, val, test, out, names, progress, device) -> list[FitResult]:
    cfg0 = configs[0]
    n_students = len(models)
    groups = seed_groups(configs)
    order = [i for g in groups for i in g]  # stacked position -> caller's index
    cfgs = [configs[i] for i in order]
    soft = ([soft[0][i] for i in order], [soft[1][i] for i in order], soft[2])
    temps = soft[0]
    gens = [torch.Generator().manual_seed(configs[g[0]].seed) for g in groups]
    for m in models:
        m.to(device)
    aug = cfg0.augmentation()
    sources = [make_source(train, device, cfg0.batch_size, aug, 0, 0, 0, 1)] * len(groups)  # one copy of the data
    backend = StackedStep([models[i] for i in order], cfgs, soft, groups, teacher, sources, device)
    val_teacher = teacher.predict(val) if teacher is not None and val is not None and isinstance(teacher, ModuleTeacher) else None
    state = LoopState(epochs=cfg0.epochs, steps_per_epoch=sources[0].steps_per_epoch,
                      histories=[[] for _ in range(n_students)], names=[names[i] for i in order])
    keep = KeepBest(backend, n_students, cfg0.keep_best and val is not None)
    t0 = time.perf_counter()

    def evaluate(epoch, losses):
        val_logits = backend.predict(val) if val is not None else None
        elapsed = round(time.perf_counter() - t0, 3)
        rows = []
        for s in range(n_students):
            row: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": backend.lrs()[s]}
            if losses is not None:
                row.update(losses[s])
            if val_logits is not None:
                m = classification_metrics(val_logits[s], val.y, val_teacher, temps[s], detailed=False)
                row.update({f"val_{k}": v for k, v in m.items() if k != "count"})
            row["time_s"] = elapsed
            rows.append(row)
        return rows

    cbs: list[Callback] = [keep]
    if out:
        for nm in names:
            (out / nm).mkdir(parents=True, exist_ok=True)
        cbs.append(MetricsFiles([out / names[i] for i in order]))
    if progress:
        cbs.append(ProgressBar(f"{n_students} students"))
    for c in cbs:
        c.on_fit_start(state)
    try:
        run_epochs(backend, list(zip(sources, gens)), cfg0, state, evaluate, cbs)
    finally:
        for c in cbs:
            c.on_fit_end(state)
    wall = time.perf_counter() - t0
    best_epochs = keep.restore()
    stacked_models = [models[i] for i in order]
    backend.net.write_to(stacked_models)
    results = final_results(backend, stacked_models, state, wall, best_epochs, val, val_teacher, temps, test)
    if out:  # no class names / preprocessing record, as the stacked pass always wrote them
        save_models([out / names[i] / "model.safetensors" for i in order], stacked_models, train, record=False)
    return [results[order.index(i)] for i in range(n_students)]


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


def prepare_teacher(teacher, train, cfg: TrainConfig, method: Method, device: torch.device):
    """The teacher as :func:`fit` would use it with ``cfg`` and ``method`` (cached when inputs are not augmented)."""
    if teacher is None:
        return None
    if method.needs_labels and train.has_unlabelled:
        raise ValueError("method.alpha: the transfer set has unlabelled samples, so alpha must be 1 (soft targets only)")
    return prepare_teaching(teacher, train, cfg, method, cfg.augmentation(), device, None).teacher
