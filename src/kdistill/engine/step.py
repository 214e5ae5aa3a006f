"""The autograd training step of one student: forward, the method's loss terms, backward, update.

Everything in :meth:`StudentStep._step` is device work, so on CUDA it is captured once as a CUDA graph and
replayed (:mod:`kdistill.engine.cuda_graph`); what changes from step to step (row ids, augmentation parameters,
cached-view choices, the learning rate, the epoch counter) lives in static buffers refilled before each replay.
Loss terms are summed on the device and read once per epoch, so nothing here waits for the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: F401  (methods' losses run under this module's autocast)
from torch import nn

from kdistill.engine.cuda_graph import GraphedStep, graph_safe_teacher
from kdistill.data.augment import AugParams
from kdistill.data.stream import Inputs, chunk_inputs, inputs_to
from kdistill.engine.distributed import mean_over_processes
from kdistill.engine.evaluate import predict_split
from kdistill.losses import IGNORE_INDEX
from kdistill.methods.base import StepIO
from kdistill.models.layout import as_layout, use_channels_last
from kdistill.models.mlp import apply_max_norm
from kdistill.models.outputs import forward_logits
from kdistill.engine.features import FeatureTap
from kdistill.engine.optim import make_optimizer
from kdistill.engine.sources import Batch
from kdistill.data.stream import iterate


class StudentStep:
    """One student trained by autograd with a method: the single-model backend of the loop."""

    n = 1

    def __init__(self, model: nn.Module, method, teaching, source, aug, cfg, device: torch.device, n_proc: int) -> None:
        self.model, self.method, self.teacher, self.source, self.aug, self.cfg = model, method, teaching.teacher, source, aug, cfg
        self.device, self.n_proc = device, n_proc
        self.channels_last = use_channels_last(model)  # NHWC convolutions are faster on CPU (oneDNN) as on CUDA
        self.logits_key = getattr(model, "logits_key", None) or "logits"  # DDP and compiled wrappers lack it
        self.uses_views = bool(getattr(self.teacher, "uses_views", False))
        method.to(device)
        self.s_tap = FeatureTap(model, method.student_features) if method.student_features else None
        self.t_tap = FeatureTap(teaching.module, method.teacher_features) if method.teacher_features else None
        if self.s_tap or self.t_tap:
            self._setup_method()
        extras = list(method.parameters())
        params = list(model.parameters()) + extras
        self.params = params
        self.use_graph = (cfg.cuda_graph and device.type == "cuda" and not cfg.compile and graph_safe_teacher(self.teacher)
                          and n_proc == 1 and not source.streamed)  # gradient all-reduces stay outside graphs
        self.optimizer = make_optimizer(params, cfg, device, capturable=self.use_graph)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.net: nn.Module = model
        if n_proc > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.extras = extras  # averaged over processes by hand: they are outside the DDP module
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        self.constrain_fns = [m.constrain for m in model.modules() if hasattr(m, "constrain") and callable(m.constrain)]
        self.sums: dict[str, torch.Tensor] = {}
        self.total = torch.zeros((), device=device)
        self.graphed: GraphedStep | None = None
        self.static: Batch | None = None
        self.lr_buf = torch.tensor(float(cfg.lr), device=device) if self.use_graph else None
        self.progress_buf = torch.zeros((), device=device) if self.use_graph else None

    # -- set-up -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _setup_method(self) -> None:
        """One dry forward of two training samples so the method can size its extras (FitNets' regressors)."""
        x = inputs_to(_first_inputs(self.source, 2), self.device)
        was = self.model.training
        self.model.eval()
        try:
            s_logits = forward_logits(self.model, _layout(x, self.channels_last))
            t_logits = self.teacher.logits(x, None) if self.t_tap is not None else None
        finally:
            self.model.train(was)
        self.method.setup(dict(self.s_tap.out) if self.s_tap else {}, dict(self.t_tap.out) if self.t_tap else {},
                          s_logits, t_logits)
        self.method.to(self.device)

    def close(self) -> None:
        for tap in (self.s_tap, self.t_tap):
            if tap is not None:
                tap.close()

    # -- the step ---------------------------------------------------------------------------------------
    def _step(self, batch: Batch, progress) -> None:
        if batch.rows is not None:
            xb, yb, ib = self.source.gather(batch.rows)
        else:
            xb, yb, ib = batch.x, batch.y, batch.ids
        if batch.params is not None:
            xb = self.aug.apply(xb, batch.params)
        xb = _layout(xb, self.channels_last)
        k = self.cfg.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        if yb.dim() > 1 and (k > 1 or self.n_proc > 1):  # per position: every term / the whole batch's count
            norm = position_normalizer(yb, self.n_proc)
            parts = [self._forward_backward(*chunk, progress, 1.0, norm)
                     for chunk in zip(chunk_inputs(xb, k), yb.chunk(k), ib.chunk(k), _views(batch.views, k))]
            loss = sum(p[0] for p in parts)  # micro-batch losses add up to the batch's (same divisor)
            terms = {name: sum(p[1][name] for p in parts) for name in parts[0][1]}
        elif k == 1:
            loss, terms = self._forward_backward(xb, yb, ib, batch.views, progress, 1.0)
        else:  # micro-batches, each loss weighted 1/k: the summed gradient is the whole batch's mean gradient
            views = batch.views.chunk(k) if batch.views is not None else [None] * k
            parts = [self._forward_backward(*chunk, progress, 1.0 / k)
                     for chunk in zip(chunk_inputs(xb, k), yb.chunk(k), ib.chunk(k), views)]
            loss = sum(p[0] for p in parts) / k
            terms = {name: sum(p[1][name] for p in parts) / k for name in parts[0][1]}
        if self.n_proc > 1:
            for p in self.extras:
                if p.grad is not None:
                    mean_over_processes(p.grad, self.n_proc)
        if self.cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)  # device work only: no host sync
        self.optimizer.step()
        if self.cfg.max_norm:
            apply_max_norm(self.model, self.cfg.max_norm)
        for fn in self.constrain_fns:
            fn()
        self.total.add_(loss.detach())
        for name, t in terms.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros((), device=self.device)
            self.sums[name].add_(t.detach().float())

    def _forward_backward(self, xb, yb, ib, views, progress, weight: float, normalizer=None):
        """Forward, the method's terms and backward of one (micro-)batch; returns the loss and its terms.
        ``normalizer``: per-position data's whole-batch valid count (:func:`position_normalizer`)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp, cache_enabled=not self.use_graph):
            logits = forward_logits(self.forward, xb, self.logits_key)
            t_logits = None
            if self.teacher is not None:
                t_logits = self.teacher.logits(xb, ib, views) if self.uses_views else self.teacher.logits(xb, ib)
            io = StepIO(logits, yb, t_logits, self.s_tap.out if self.s_tap else {}, self.t_tap.out if self.t_tap else {},
                        progress, normalizer)
            terms = self.method.losses(io)
        loss = None
        for t in terms.values():
            loss = t if loss is None else loss + t
        (loss if weight == 1.0 else loss * weight).backward()
        return loss.detach(), {n: t.detach() for n, t in terms.items()}

    def step(self, batches: list[Batch], lr_factor: float, progress: float) -> None:
        (batch,) = batches
        lr = self.cfg.lr * lr_factor
        if not self.use_graph:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self._step(batch, progress)
            return
        if self.graphed is None:
            self.static = Batch(*(_empty_like(t) for t in batch))
            for g in self.optimizer.param_groups:  # after any resume, whose optimiser state brings back a float rate
                g["lr"] = self.lr_buf
            self.graphed = GraphedStep(lambda: self._step(self.static, self.progress_buf), self.optimizer)
        _fill(self.static, batch)
        self.lr_buf.fill_(lr)
        self.progress_buf.fill_(progress)
        self.graphed()

    # -- what the loop reads ----------------------------------------------------------------------------
    def take_losses(self, steps: int) -> list[dict[str, float]]:
        """Each term's mean over the epoch's steps (one host read per epoch), then reset."""
        names = list(self.sums)
        values = mean_over_processes(torch.stack([self.total, *self.sums.values()]), self.n_proc).tolist()
        self.total.zero_()
        for t in self.sums.values():
            t.zero_()
        row = {"train_loss": values[0] / steps}
        row.update({f"loss_{k}": v / steps for k, v in zip(names, values[1:])})
        return [row]

    def lrs(self) -> list[float]:
        return [float(self.optimizer.param_groups[0]["lr"])]

    def predict(self, data) -> list[torch.Tensor]:
        return [predict_split(self.model, data)]

    def snapshot(self, s: int = 0) -> dict[str, torch.Tensor]:
        """A copy of the (only) student's state, for keep-best (:class:`~kdistill.engine.callbacks.KeepBest`)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, s: int, snap: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(snap)

    def models(self) -> list[nn.Module]:
        return [self.model]


def position_normalizer(labels: torch.Tensor, n_proc: int) -> torch.Tensor:
    """The divisor of per-position loss terms for one process's share of a global batch: the global batch's
    valid-position count (label not -100, summed over processes) / ``n_proc`` (DDP averages gradients over
    processes, so each process's sum over its positions / this adds up to the global mean). At least one
    valid position is counted (a batch of padding only gives 0 losses, not NaN). Device work: no host sync."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float32)
    count = mean_over_processes(count, n_proc)
    return count.clamp(min=1.0 / n_proc)


def _views(views: torch.Tensor | None, k: int) -> list[torch.Tensor | None]:
    return list(views.chunk(k)) if views is not None else [None] * k


def _layout(x: Inputs, channels_last: bool) -> Inputs:
    """A tensor batch in the model's memory layout; a dict of keyword inputs as it is."""
    return as_layout(x, channels_last) if isinstance(x, torch.Tensor) else x


def _first_inputs(source, k: int) -> Inputs:
    data = source.data
    if hasattr(data, "x"):
        return data.x[:k]

    x, _, _ = next(iter(iterate(data, k)))
    return x


def _empty_like(t: Any):
    if t is None:
        return None
    if isinstance(t, AugParams):
        return AugParams(*(None if u is None else torch.empty_like(u) for u in t))
    return torch.empty_like(t)


def _fill(static: Batch, batch: Batch) -> None:
    for s, b in zip(static, batch):
        if isinstance(s, AugParams):
            for su, bu in zip(s, b):
                if su is not None:
                    su.copy_(bu, non_blocking=True)
        elif s is not None:
            s.copy_(b, non_blocking=True)
