"""The training loop: one for supervised training, distillation with any method, and stacked sweeps.

:func:`run_epochs` is the loop itself: for each epoch, each step draws one batch per seed group from its
source, sets the schedule's learning rate and asks the backend to step; at the end of the epoch it reads
the loss terms, evaluates, keeps the best state and calls the callbacks. :func:`fit` composes it for one
model: data, method and teacher checked before any work, then batches from memory or disk, the autograd
step, checkpoints and keep-best, and the result.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.convert import as_split
from ..data.stream import labels_of
from ..distributed import process_device, world
from ..evaluate import classification_metrics, predict_split
from ..io import load_checkpoint, save_checkpoint, save_model
from .callbacks import Callback, LoopState, MetricsFiles, ProgressBar
from .config import FitResult, TrainConfig
from .optim import lr_factor, resolve_device
from .sources import make_source
from .teaching import prepare_teaching, teacher_classes

RESUME_IGNORED = ("device", "amp", "compile", "cuda_graph", "workers", "checkpoint", "eval_every_steps")
"""Config fields a resumed run may change: they decide where and how fast it runs, not what it computes."""


def run_epochs(backend, streams: Sequence[tuple[Any, torch.Generator]], cfg: TrainConfig, state: LoopState,
               evaluate: Callable[[float, list[dict[str, float]] | None], list[dict[str, Any]]],
               callbacks: Sequence[Callback], end_of_epoch: Callable[[list[dict[str, Any]]], None]) -> None:
    """Train from ``state.epoch`` to ``cfg.epochs`` (or until a callback sets ``state.stop``)."""
    steps = state.steps_per_epoch
    total = state.total_steps
    step_cbs = [c for c in callbacks if c.every_steps]
    for epoch in range(state.epoch, cfg.epochs):
        iters = [iter(source.epoch(gen)) for source, gen in streams]
        for i in range(steps):
            batches = [next(it) for it in iters]
            backend.step(batches, lr_factor(cfg.schedule, state.step, total, cfg.warmup), epoch + i / steps)
            state.step += 1
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                rows = evaluate(state.step / steps, None)
                for s, row in enumerate(rows):
                    for c in callbacks:
                        c.on_eval(state, s, row)
            for c in step_cbs:
                if state.step % c.every_steps == 0:
                    c.on_step(state)
        state.epoch = epoch + 1
        rows = evaluate(epoch + 1, backend.take_losses(steps))
        for h, row in zip(state.histories, rows):
            h.append(row)
        for s, row in enumerate(rows):
            for c in callbacks:
                c.on_eval(state, s, row)
        end_of_epoch(rows)
        for c in callbacks:
            c.on_epoch_end(state, rows)
        if state.stop:
            break


class _OnEval(Callback):
    """The ``on_eval(row)`` function of :func:`fit`'s signature, as a callback."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_eval(self, state, student, row) -> None:
        self.fn(row)


def resolve_method(method, teacher, cfg: TrainConfig):
    """The method a run uses: the one given (a name, a ``{"name": ..., **options}`` dict or a Method), else KD
    from the config's ``temperature``/``alpha``/``loss`` with a teacher, else plain cross-entropy."""
    from ..methods import Method, build_method

    if method is None:
        if teacher is None:
            return build_method("ce")
        return build_method("kd", temperature=cfg.temperature, alpha=cfg.alpha, kind=cfg.loss)
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return build_method(method)
    if isinstance(method, dict):
        opts = dict(method)
        name = opts.pop("name", None)
        if not name:
            raise ValueError("method.name: say which method, e.g. {'name': 'kd', 'temperature': 4}")
        return build_method(name, opts)
    raise ValueError(f"method: give a name, a dict with 'name' and options, or a Method, not {type(method).__name__}")


def check_data(train, name: str = "train") -> None:
    """Labels in range and at least two classes, before anything is trained (in-memory splits; streamed ones
    when their labels are listed)."""
    labels = train.y if hasattr(train, "y") else train.labels
    if train.num_classes < 2:
        raise ValueError(f"data: {train.name} has {train.num_classes} class(es); classification needs at least 2")
    if labels is None or not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < -1 or hi >= train.num_classes:
        raise ValueError(f"data: {name} labels must be in 0..{train.num_classes - 1} (or -1 for unlabelled), "
                         f"found {lo if lo < -1 else hi}")


def _check_outputs(model: nn.Module, train, device: torch.device) -> None:
    """A dry forward of one sample: catches a model whose outputs do not match the classes, or that cannot
    take these inputs, before any file is written."""
    from ..engine.step import _first_inputs
    from ..models.layout import as_layout, use_channels_last

    x = _first_inputs(type("S", (), {"data": train})(), 1).to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(as_layout(x, use_channels_last(model)))
    except Exception as exc:  # noqa: BLE001 - any failure here is the model's, named for the user
        raise ValueError(f"model: {getattr(model, 'spec', type(model).__name__)} cannot run on inputs shaped "
                         f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != train.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: outputs {shape} for one sample, but {train.name} has {train.num_classes} classes; "
                         "build it with num_classes equal to the data's")


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, method_opts: dict[str, Any], ckpt: Path) -> None:
    now = asdict(cfg)
    diff = [k for k in now if k not in RESUME_IGNORED and k in saved.get("config", {}) and saved["config"][k] != now[k]]
    if "method" in saved and saved["method"] != method_opts:
        diff.append("method")
    if diff:
        k = diff[0]
        was = saved["config"].get(k) if k != "method" else saved["method"]
        got = now.get(k) if k != "method" else method_opts
        raise ValueError(f"--resume: {ckpt} was trained with another {'method' if k == 'method' else 'train.' + k} "
                         f"({was!r}, now {got!r}); resume with the same settings or start a new run"
                         + (f" (also differs: {diff[1:]})" if len(diff) > 1 else ""))


def fit(
    model: nn.Module,
    train,
    config: TrainConfig | None = None,
    *,
    teacher=None,
    method=None,
    val=None,
    test=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``model`` on ``train`` with ``method`` (distilling from ``teacher`` if given); return history and metrics.

    ``train``/``val``/``test``: a TensorData, ``(x, y)`` arrays or tensors, or any map-style ``Dataset``
    (streamed through a ``DataLoader``). ``method``: a name (``"kd"``), ``{"name": "dkd", "beta": 8}``, or a
    :class:`~kdistill.methods.Method`; default KD from the config's ``temperature``/``alpha`` with a teacher.
    With ``out_dir``, every epoch rewrites ``metrics.jsonl``/``metrics.csv`` and ``checkpoint.safetensors``
    (model, optimiser, method extras, keep-best state, RNG states); ``resume=True`` continues exactly.
    Inside a process group the global batch is split between the processes (:mod:`kdistill.distributed`).
    The teacher module passed in is handed back as it was given (mode and ``requires_grad``).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    train = as_split(train, name="train")
    val = None if val is None else as_split(val, classes=train.classes, name="val")
    test = None if test is None else as_split(test, classes=train.classes, name="test")
    method = resolve_method(method, teacher, cfg)
    check_data(train)
    rank, n_proc = world()
    if cfg.batch_size % n_proc:
        raise ValueError(f"train.batch_size: {cfg.batch_size} does not split evenly between {n_proc} processes; "
                         f"use a multiple of {n_proc}")
    if len(train) == 0:
        raise ValueError(f"data: {train.name} is empty")
    device = process_device(resolve_device(cfg.device), n_proc)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    _check_outputs(model, train, device)
    aug = cfg.augmentation()
    out = Path(out_dir) if out_dir else None
    write = out is not None and rank == 0  # every process reads a checkpoint; only rank 0 writes
    ckpt = out / "checkpoint.safetensors" if out else None
    if resume and not (ckpt and ckpt.is_file()):
        raise FileNotFoundError(f"resume: no checkpoint at {ckpt}; run without --resume first")
    cache_path = Path(cfg.teacher_cache) if cfg.teacher_cache else (out / "teacher_views.safetensors" if write else None)
    teaching = prepare_teaching(teacher, train, cfg, method, aug, device, cache_path)
    backend = None
    try:
        method.validate(num_classes=train.num_classes, teacher_classes=teacher_classes(teaching.teacher),
                        has_unlabelled=train.has_unlabelled)
        if method.needs_teacher and teaching.teacher is None:
            raise ValueError(f"method: {method.name} distils from a teacher; give one (--teacher ...) or use --method ce")
        method.bind(model, teaching.module)
        val_teacher = teaching.teacher.predict(val) if val is not None and teaching.live else None
        source = make_source(train, device, cfg.batch_size, aug, cfg.teacher_views, cfg.seed, rank, n_proc, cfg.workers)
        backend = _single_backend(model, method, teaching, source, aug, cfg, device, n_proc)
        return _train(backend, model, method, train, val, test, val_teacher, source, gen, cfg, out, write, ckpt,
                      resume, progress, on_eval, callbacks, rank)
    finally:
        if backend is not None:
            backend.close()
        teaching.release()


def _single_backend(model, method, teaching, source, aug, cfg, device, n_proc):
    from .step import StudentStep

    return StudentStep(model, method, teaching, source, aug, cfg, device, n_proc)


def _train(backend, model, method, train, val, test, val_teacher, source, gen, cfg, out, write, ckpt, resume,
           progress, on_eval, callbacks, rank) -> FitResult:
    state = LoopState(epochs=cfg.epochs, steps_per_epoch=source.steps_per_epoch, histories=[[]])
    best: dict[str, Any] = {"errors": math.inf, "epoch": None, "state": None}
    method_opts = json.loads(json.dumps({"name": method.name, **method.options()}, default=str))  # as stored
    val_y = labels_of(val) if val is not None else None
    if resume:
        saved = load_checkpoint(ckpt, model, backend.optimizer)
        _check_resume(saved, cfg, method_opts, ckpt)
        method_state = {k[len("method."):]: v for k, v in saved["extra"].items() if k.startswith("method.")}
        if method_state:
            method.load_state_dict(method_state)
        state.epoch, state.step, state.histories = saved["epoch"], saved["step"], [saved["history"]]
        gen.set_state(saved["rng"]["data"])
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        if saved.get("best_epoch") is not None:
            best_state = {k[len("best."):]: v for k, v in saved["extra"].items() if k.startswith("best.")}
            best.update(errors=saved["best_errors"], epoch=saved["best_epoch"], state=best_state)
    elif write:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()

    def evaluate(epoch: float, losses) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": backend.lrs()[0]}
        if losses is not None:
            row.update(losses[0])
        if val is not None:
            logits = backend.predict(val)[0]
            m = classification_metrics(logits, val_y, val_teacher, method.temperature, detailed=False)
            row.update({f"val_{k}": v for k, v in m.items() if k != "count"})
        row["time_s"] = round(time.perf_counter() - t0, 3)
        model.train()
        return [row]

    def end_of_epoch(rows) -> None:
        row = rows[0]
        if cfg.keep_best and val is not None and row["val_errors"] < best["errors"]:
            best.update(errors=row["val_errors"], epoch=state.epoch, state=backend.snapshot()[0])
        if write and cfg.checkpoint:
            extra = {f"method.{k}": v for k, v in method.state_dict().items()}
            if best["state"] is not None:
                extra.update({f"best.{k}": v for k, v in best["state"].items()})
            meta = {"epoch": state.epoch, "step": state.step, "history": state.histories[0], "config": asdict(cfg),
                    "method": method_opts, "rng": _rng_state(gen), "best_errors": best["errors"] if best["epoch"] else None,
                    "best_epoch": best["epoch"]}
            save_checkpoint(ckpt, model, backend.optimizer, meta, extra)

    cbs: list[Callback] = []
    if write:
        cbs.append(MetricsFiles([out]))
    if progress and rank == 0:
        cbs.append(ProgressBar(getattr(model, "spec", "train"), state.epoch))
    if on_eval is not None:
        cbs.append(_OnEval(on_eval))
    cbs += list(callbacks)
    for c in cbs:
        c.on_fit_start(state)
    model.train()
    try:
        run_epochs(backend, [(source, gen)], cfg, state, evaluate, cbs, end_of_epoch)
    finally:
        for c in cbs:
            c.on_fit_end(state)
    wall = time.perf_counter() - t0
    best_epoch = None
    if cfg.keep_best and best["state"] is not None:
        backend.restore([best["state"]])
        best_epoch = best["epoch"]
    model.eval()
    result = FitResult(model=model, history=state.histories[0], wall_time_s=wall, best_epoch=best_epoch)
    if val is not None:
        result.val = classification_metrics(predict_split(model, val), val_y, val_teacher, method.temperature, detailed=False)
    if test is not None:
        result.test = classification_metrics(predict_split(model, test), labels_of(test))
    if write:
        save_model(out / "model.safetensors", model, in_shape=list(train.input_shape), num_classes=train.num_classes)
    return result

