"""One training loop for supervised training and distillation.

The loop keeps the whole training split on the device as tensors, draws batches with a seeded random
permutation, jitters them in one batched op, and asks the teacher (if any) for logits by sample id.
When the inputs are not augmented, a module teacher is replaced by its cached logits, so each teacher
forward happens once per sample instead of once per sample per epoch. Nothing in the hot loop
synchronises with the host: losses are accumulated on the device and read once per epoch. On CUDA the
whole step is captured once as a CUDA graph and replayed (:mod:`kdistill.cuda_graph`), since a small
model's step is otherwise bound by the host's kernel launches.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cuda_graph import GraphedStep, graph_safe_teacher
from .data.augment import jitter_offsets, to_device_async, translate
from .data.dataset import TensorData
from .distributed import mean_over_processes, process_device, shard, world
from .evaluate import classification_metrics, predict_logits
from .io import load_checkpoint, save_checkpoint, save_model
from .losses import LOSS_KINDS, distillation_loss
from .models.layout import as_layout, use_channels_last
from .models.mlp import apply_max_norm
from .teachers import CachedTeacher, ModuleTeacher, Teacher

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "onecycle", "step")


@dataclass
class TrainConfig:
    """Everything that decides a training run; validated before any work starts."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.1
    max_norm: float | None = None
    jitter: int = 0
    seed: int = 0
    # Distillation (ignored without a teacher).
    temperature: float = 1.0
    alpha: float = 1.0
    loss: str = "kl"
    cache_teacher: bool = True
    # Evaluation and bookkeeping.
    eval_every_steps: int = 0
    keep_best: bool = False
    checkpoint: bool = True
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    cuda_graph: bool = True  # on CUDA, replay each step as one captured graph (no effect elsewhere)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"train.{name}: {msg} (got {getattr(self, name)!r})")

        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(0 <= self.warmup < 1, "warmup", "is a fraction of the steps in [0, 1)")
        need(self.max_norm is None or self.max_norm > 0, "max_norm", "must be > 0 or null")
        need(isinstance(self.jitter, int) and self.jitter >= 0, "jitter", "is a pixel count >= 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 <= self.alpha <= 1, "alpha", "is the soft-target weight, in [0, 1]")
        need(self.loss in LOSS_KINDS, "loss", f"must be one of {LOSS_KINDS}")
        need(self.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"train: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    best_epoch: int | None = None


def resolve_device(name: str) -> torch.device:
    """``auto``: ``$KDISTILL_DEVICE`` if set (e.g. ``cpu`` to keep a GPU machine's runs on the CPU), else CUDA
    when available, else the CPU."""
    if name == "auto":
        return torch.device(os.environ.get("KDISTILL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device(name)


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: a pure function, so resuming is exact."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    warm = int(warmup * total) if schedule == "onecycle" else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params, cfg: TrainConfig, device: torch.device | None = None,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam; the fused (single-kernel) step where the device supports it: 2-9x cheaper steps.

    ``capturable``: Adam keeps its step count on the device, as a CUDA graph capture requires.
    """
    fused = {"fused": True} if device is not None and device.type in ("cpu", "cuda") else {}
    if cfg.optimizer == "adam":
        extra = {"capturable": True} if capturable else {}
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused, **extra)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay, **fused,
    )


def prepare_teacher(teacher: Teacher | nn.Module | None, train: TensorData, cfg: TrainConfig, device: torch.device):
    """Validate the teacher against the data and config; cache a module teacher when inputs are not augmented."""
    if teacher is None:
        return None
    if isinstance(teacher, nn.Module):
        teacher = ModuleTeacher(teacher)
    if isinstance(teacher, ModuleTeacher) and cfg.jitter == 0 and cfg.cache_teacher:
        teacher = teacher.cache(train)
    if isinstance(teacher, CachedTeacher):
        if cfg.jitter:
            raise ValueError(
                "train.jitter: cached teacher logits were computed on un-augmented inputs; "
                "set jitter to 0 or give a module teacher that can see the jittered batch"
            )
        teacher.check_covers(train)
    if hasattr(teacher, "to"):  # a live teacher runs on the student's batches, so on the student's device
        teacher = teacher.to(device)
    if cfg.alpha < 1 and train.has_unlabelled:
        raise ValueError("train.alpha: the transfer set has unlabelled samples, so alpha must be 1 (soft targets only)")
    return teacher


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def fit(
    model: nn.Module,
    train: TensorData,
    config: TrainConfig | None = None,
    *,
    teacher: Teacher | nn.Module | None = None,
    val: TensorData | None = None,
    test: TensorData | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` (distilling from ``teacher`` if given); return history and metrics.

    With ``out_dir`` each epoch appends to ``metrics.jsonl`` and rewrites ``checkpoint.safetensors``
    (model, optimiser, RNG states); ``resume=True`` continues from that checkpoint exactly. Inside a
    process group of several processes the global batch is split between them (:mod:`kdistill.distributed`).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    if train.has_unlabelled and teacher is None:
        raise ValueError(f"{train.name}: has unlabelled samples; supervised training needs labels (give a teacher)")
    rank, n_proc = world()
    if cfg.batch_size % n_proc:
        raise ValueError(f"train.batch_size: {cfg.batch_size} does not split evenly between {n_proc} processes; "
                         f"use a multiple of {n_proc}")
    device = process_device(resolve_device(cfg.device), n_proc)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    teacher = prepare_teacher(teacher, train, cfg, device)
    val_teacher = None
    if teacher is not None and val is not None and isinstance(teacher, ModuleTeacher):
        val_teacher = teacher.predict(val)

    # Convolutions run faster on NHWC tensors, on CPU (oneDNN) as on CUDA; MLPs are untouched.
    channels_last = use_channels_last(model)
    x, y, ids = train.x.to(device), train.y.to(device), train.index.to(device)
    n = len(train)
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop the ragged last batch: equal-sized steps
    total_steps = steps_per_epoch * cfg.epochs
    use_graph = (cfg.cuda_graph and device.type == "cuda" and not cfg.compile and graph_safe_teacher(teacher)
                 and n_proc == 1)  # gradient all-reduces stay outside graphs
    optimizer = make_optimizer(model.parameters(), cfg, device, capturable=use_graph)
    use_amp = cfg.amp and device.type == "cuda"
    net: nn.Module = model
    if n_proc > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(net) if cfg.compile else net
    constrain_fns = [m.constrain for m in model.modules() if hasattr(m, "constrain") and callable(m.constrain)]
    loss_sum = torch.zeros((), device=device)

    def train_step(rows: torch.Tensor, offsets: torch.Tensor | None) -> None:
        """One update on the batch ``rows`` (jittered by ``offsets``): pure device work, so it can be captured."""
        xb, yb = x.index_select(0, rows), y.index_select(0, rows)  # ~4x cheaper than x[rows] on CPU
        if offsets is not None:
            xb = translate(xb, offsets, cfg.jitter)
        xb = as_layout(xb, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not use_graph):
            logits = forward(xb)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), yb)
            else:
                t_logits = teacher.logits(xb, ids.index_select(0, rows))
                loss = distillation_loss(
                    logits.float(), t_logits, yb if cfg.alpha < 1 else None,
                    temperature=cfg.temperature, alpha=cfg.alpha, kind=cfg.loss,
                )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.max_norm:
            apply_max_norm(model, cfg.max_norm)
        for fn in constrain_fns:
            fn()
        loss_sum.add_(loss.detach())

    graphed = None
    if use_graph:  # static inputs of the captured step, refilled in place before every replay
        rows_buf = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
        offsets_buf = torch.zeros(2, cfg.batch_size, dtype=torch.long, device=device) if cfg.jitter else None
        lr_buf = torch.tensor(float(cfg.lr), device=device)  # the schedule's rate, read by the fused update
        graphed = GraphedStep(lambda: train_step(rows_buf, offsets_buf), optimizer)

    out = Path(out_dir) if out_dir else None
    ckpt = out / "checkpoint.safetensors" if out else None
    write = out is not None and rank == 0  # every process reads a checkpoint; only rank 0 writes
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    best = (math.inf, None, None)  # (val errors, epoch, state)
    if resume:
        if not (ckpt and ckpt.is_file()):
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt}; run without --resume first")
        state = load_checkpoint(ckpt, model, optimizer)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")

    def evaluate_val(epoch: float, train_loss: float | None) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": float(optimizer.param_groups[0]["lr"])}
        if train_loss is not None:
            row["train_loss"] = train_loss
        if val is not None:
            logits = predict_logits(model, val.x)
            m = classification_metrics(logits, val.y, val_teacher, cfg.temperature, detailed=False)
            row.update({f"val_{k}": v for k, v in m.items() if k != "count"})
        row["time_s"] = round(time.perf_counter() - t0, 3)
        return row

    if graphed is not None:  # after any resume, whose optimiser state brings back a float rate
        for g in optimizer.param_groups:
            g["lr"] = lr_buf

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=getattr(model, "spec", "train"), leave=False)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum.zero_()
        for i in range(steps_per_epoch):
            rows = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            offsets = jitter_offsets(len(rows), cfg.jitter, gen) if cfg.jitter else None
            rows, offsets = shard(rows, offsets, rank, n_proc)  # every process drew the same global batch
            lr = cfg.lr * lr_factor(cfg.schedule, step, total_steps, cfg.warmup)
            if graphed is None:
                for g in optimizer.param_groups:
                    g["lr"] = lr
                train_step(rows, None if offsets is None else to_device_async(offsets, device))
            else:
                rows_buf.copy_(rows)
                if offsets is not None:
                    offsets_buf.copy_(offsets.pin_memory(), non_blocking=True)
                lr_buf.fill_(lr)
                graphed()
            step += 1
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and on_eval:
                on_eval(evaluate_val(step / steps_per_epoch, None))
                model.train()
        row = evaluate_val(epoch + 1, float(mean_over_processes(loss_sum, n_proc)) / steps_per_epoch)
        model.train()
        history.append(row)
        if on_eval:
            on_eval(row)
        if cfg.keep_best and val is not None and row["val_errors"] < best[0]:
            best = (row["val_errors"], epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if write:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if cfg.checkpoint:
                state = {"epoch": epoch + 1, "step": step, "history": history, "config": asdict(cfg), "rng": _rng_state(gen)}
                save_checkpoint(ckpt, model, optimizer, state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_err=row.get("val_errors", "-"))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    best_epoch = None
    if cfg.keep_best and best[2] is not None:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    model.eval()
    result = FitResult(model=model, history=history, wall_time_s=wall, best_epoch=best_epoch)
    if val is not None:
        result.val = classification_metrics(predict_logits(model, val.x), val.y, val_teacher, cfg.temperature, detailed=False)
    if test is not None:
        result.test = classification_metrics(predict_logits(model, test.x), test.y)
    if write:
        save_model(out / "model.safetensors", model, in_shape=list(train.input_shape), num_classes=train.num_classes)
    return result
