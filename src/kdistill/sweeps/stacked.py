"""N fully connected students of one architecture held as stacked tensors, trained by hand-written passes.

A sweep trains many small MLPs of the same shape. Run one after another, each step is a handful of
small matrix products plus Python and autograd overhead; stacked, the N students' layer-l weights form
one (N, in, out) tensor and a step is one batched product per layer for all of them.

Layout. The first layer's weights are one (in, N * out) matrix whose column block i is student i's
(transposed) ``nn.Linear`` weight: students that see the same input batch (a *group*: the students
sharing a data seed, placed next to each other) go through the first layer in a single large matrix
product, which is where most of an MLP's arithmetic is. Later layers are (N, in, out) and use
``baddbmm``. Activations are (N, B, width).

Forward and backward passes are written out (no autograd graph): the gradient of the loss with
respect to the logits comes from the caller, and the backward pass computes weight and bias
gradients only (never the input gradient of the first layer, which nothing needs). The optimiser
steps below repeat ``torch.optim.SGD`` / ``torch.optim.Adam``'s update rules with one learning rate,
momentum and weight decay per student, so each student follows the trajectory it would follow alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.models.mlp import MLP

# Activations whose derivative is a function of their output (so no pre-activation is kept), and GELU.
_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.GELU: "gelu"}


def mlp_signature(model: nn.Module) -> tuple | None:
    """A hashable description of ``model`` if it can be stacked, else None.

    Stackable: a :class:`~kdistill.models.mlp.MLP` without dropout (dropout masks cannot reproduce a
    solo run's random stream, so such students are trained one by one instead).
    """
    if not isinstance(model, MLP):
        return None
    layers = list(model.net)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    acts = [m for m in layers if type(m) in _ACTIVATIONS]
    if any(isinstance(m, nn.Dropout) for m in layers) or any(not isinstance(m, (nn.Flatten, nn.Linear)) and
                                                              type(m) not in _ACTIVATIONS for m in layers):
        return None
    if len(acts) != len(linears) - 1 or len({type(a) for a in acts}) > 1:
        return None
    if any(getattr(a, "approximate", "none") != "none" for a in acts):
        return None
    act = (_ACTIVATIONS[type(acts[0])], float(getattr(acts[0], "negative_slope", 0.0))) if acts else ("none", 0.0)
    widths = tuple([linears[0].in_features] + [m.out_features for m in linears])
    return ("mlp", widths, act, model.max_norm)


class StackedMLP:
    """The parameters of N same-shaped MLPs, their forward/backward passes and their gradients.

    ``group_sizes`` partitions the students, in order, into groups that share an input batch.
    """

    def __init__(self, models: Sequence[MLP], group_sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        sigs = {mlp_signature(m) for m in models}
        if len(sigs) != 1 or None in sigs:
            raise ValueError("students: stacking needs MLPs of one architecture without dropout")
        if sum(group_sizes) != len(models) or min(group_sizes) < 1:
            raise ValueError(f"group_sizes {list(group_sizes)} must be positive and sum to {len(models)}")
        _, widths, (self.activation, self.slope), self.max_norm = sigs.pop()  # max_norm: the spec's own
        self.n = len(models)
        self.widths = widths
        self.group_sizes = list(group_sizes)
        self.device = torch.device(device)
        lin = [[m for m in model.net if isinstance(m, nn.Linear)] for model in models]
        with torch.no_grad():
            w1 = torch.stack([ls[0].weight.t() for ls in lin], dim=1)  # (in, N, out)
            self.params: list[torch.Tensor] = [
                w1.reshape(widths[0], -1).contiguous(),
                torch.cat([ls[0].bias for ls in lin]),
            ]
            for k in range(1, len(widths) - 1):
                self.params.append(torch.stack([ls[k].weight.t() for ls in lin]).contiguous())  # (N, in, out)
                self.params.append(torch.stack([ls[k].bias for ls in lin]).unsqueeze(1).contiguous())  # (N, 1, out)
        self.params = [p.detach().float().to(self.device).clone() for p in self.params]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self._saved: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []

    # ----- per-student views -------------------------------------------------------------------------
    def per_student(self, values: torch.Tensor, index: int) -> torch.Tensor:
        """Broadcast an (N,) vector to parameter ``index``'s shape (student axis aligned)."""
        if index < 2:  # first layer: columns grouped by student
            return values.repeat_interleave(self.widths[1])
        return values.view(self.n, 1, 1)

    def student_view(self, index: int, student: int) -> torch.Tensor:
        """Student ``student``'s slice of parameter ``index`` (a view, in stacked layout)."""
        p = self.params[index]
        if index < 2:
            w = self.widths[1]
            return p[..., student * w : (student + 1) * w]
        return p[student]

    def write_to(self, models: Sequence[MLP]) -> None:
        """Copy the stacked weights back into the ``nn.Linear`` layers of ``models`` (same order)."""
        with torch.no_grad():
            for i, model in enumerate(models):
                linears = [m for m in model.net if isinstance(m, nn.Linear)]
                for k, layer in enumerate(linears):
                    w, b = self.student_view(2 * k, i), self.student_view(2 * k + 1, i)
                    layer.weight.copy_(w.t())
                    layer.bias.copy_(b.reshape(-1))

    # ----- passes ------------------------------------------------------------------------------------
    def _act(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return z.relu_()
        if self.activation == "leaky_relu":
            return F.leaky_relu_(z, self.slope)
        if self.activation == "tanh":
            return z.tanh_()
        return F.gelu(z)

    def _act_backward(self, grad: torch.Tensor, out: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
        if self.activation == "relu":
            return torch.ops.aten.threshold_backward(grad, out, 0)
        if self.activation == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(grad, out, self.slope, True)
        if self.activation == "tanh":
            return torch.ops.aten.tanh_backward(grad, out)
        return torch.ops.aten.gelu_backward(grad, pre)

    def forward(self, inputs: Sequence[torch.Tensor], keep: bool = True) -> torch.Tensor:
        """Logits (N, B, classes) given one input batch (B, ...) per group (or one batch for all)."""
        sizes = self.group_sizes if len(inputs) == len(self.group_sizes) else [self.n]
        if len(inputs) != len(sizes):
            raise ValueError(f"forward: need one input batch per group ({len(self.group_sizes)}) or one for all")
        xs = [x.reshape(len(x), -1) for x in inputs]
        w1, b1 = self.params[0], self.params[1]
        width = self.widths[1]
        parts, lo = [], 0
        for x, size in zip(xs, sizes):
            cols = slice(lo * width, (lo + size) * width)
            parts.append(torch.addmm(b1[cols], x, w1[:, cols]))
            lo += size
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, N * width)
        batch = h.shape[0]
        z = h.view(batch, self.n, width).transpose(0, 1)  # (N, B, width): a strided view
        saved: list[torch.Tensor] = []
        pres: list[torch.Tensor | None] = []
        for k in range(1, len(self.widths) - 1):
            pres.append(z if self.activation == "gelu" else None)
            a = self._act(z)
            saved.append(a)
            z = torch.baddbmm(self.params[2 * k + 1], a, self.params[2 * k])
        if keep:
            self._inputs, self._saved, self._pres, self._sizes = xs, saved, pres, sizes
        return z

    def backward(self, grad_logits: torch.Tensor) -> list[torch.Tensor]:
        """Weight and bias gradients (into ``self.grads``) of the last :meth:`forward`, given dLoss/dlogits."""
        dz = grad_logits.to(self.params[0].dtype)
        for k in range(len(self.widths) - 2, 0, -1):
            a = self._saved[k - 1]
            torch.bmm(a.transpose(1, 2), dz, out=self.grads[2 * k])
            torch.sum(dz, dim=1, keepdim=True, out=self.grads[2 * k + 1])
            da = torch.bmm(dz, self.params[2 * k].transpose(1, 2))
            dz = self._act_backward(da, a, self._pres[k - 1])
        batch = dz.shape[1]
        d1 = dz.transpose(0, 1).reshape(batch, -1)  # (B, N * width), columns grouped by student
        width = self.widths[1]
        if len(self._inputs) == 1:
            torch.mm(self._inputs[0].t(), d1, out=self.grads[0])
        else:
            lo = 0
            for x, size in zip(self._inputs, self._sizes):
                cols = slice(lo * width, (lo + size) * width)
                self.grads[0][:, cols] = x.t() @ d1[:, cols]
                lo += size
        torch.sum(d1, dim=0, out=self.grads[1])
        self._inputs, self._saved, self._pres = [], [], []
        return self.grads

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Every student's logits for all of ``x``: (N, len(x), classes), on the CPU."""
        outs = [self.forward([x[i : i + batch_size].to(self.device)], keep=False).float().cpu()
                for i in range(0, len(x), batch_size)]
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> None:
        """Each unit's incoming weight vector to L2 norm <= ``max_norm``, as :func:`apply_max_norm` does."""
        for k in range(len(self.widths) - 1):
            w = self.params[2 * k]
            norms = w.norm(dim=-2, keepdim=True).clamp_min(1e-12)  # over the inputs of each unit
            w.mul_(torch.clamp(max_norm / norms, max=1.0))


class StackedOptimizer:
    """SGD (momentum, Nesterov, L2 weight decay) or Adam over a :class:`StackedMLP`, per-student settings.

    Each update repeats the arithmetic of ``torch.optim.SGD`` / ``torch.optim.Adam`` (default betas and
    eps, no amsgrad) with per-student ``lr``, ``momentum`` and ``weight_decay`` broadcast along the
    student axis, so a student's trajectory matches its solo run up to floating-point rounding.
    When all students share lr, momentum and weight decay, torch's fused kernel is used instead.
    """

    def __init__(self, net: StackedMLP, kind: str, lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float], nesterov: bool, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, capturable: bool = False) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer: {kind!r} is not one of ('sgd', 'adam')")
        if not (len(lr) == len(momentum) == len(weight_decay) == net.n):
            raise ValueError(f"lr, momentum, weight_decay: need one value per student ({net.n})")
        self.net, self.kind, self.nesterov = net, kind, nesterov
        dev = net.device
        self.base_lr = torch.tensor(list(lr), dtype=torch.float64, device=dev)
        self.shared_lr = float(lr[0])
        mom = torch.tensor(list(momentum), dtype=torch.float32, device=dev)
        wd = torch.tensor(list(weight_decay), dtype=torch.float32, device=dev)
        self.use_wd = bool((wd != 0).any())
        self.mom = [net.per_student(mom, i) for i in range(len(net.params))]
        self.wd = [net.per_student(wd, i) for i in range(len(net.params))]
        self.betas, self.eps, self.t = betas, eps, 0
        self.capturable = capturable
        shared = len(set(lr)) == 1 and len(set(momentum)) == 1 and len(set(weight_decay)) == 1
        self.fused = self._fused_optimizer(kind, momentum[0], weight_decay[0], nesterov) if shared else None
        if self.fused is None:
            self.state = [torch.zeros_like(p) for p in net.params]
            self.state2 = [torch.zeros_like(p) for p in net.params] if kind == "adam" else []

    def _fused_optimizer(self, kind: str, momentum: float, weight_decay: float, nesterov: bool):
        """torch's fused SGD/Adam over the stacked tensors: one pass over memory instead of four or more.

        Only when every student has the same learning rate, momentum and weight decay (a temperature or
        alpha sweep), since the fused kernels take one value of each.
        """
        if self.net.device.type not in ("cpu", "cuda"):
            return None
        for p, g in zip(self.net.params, self.net.grads):
            p.grad = g
        try:
            if kind == "adam":
                extra = {"capturable": True} if self.capturable else {}
                return torch.optim.Adam(self.net.params, lr=1.0, weight_decay=weight_decay, betas=self.betas,
                                        eps=self.eps, fused=True, **extra)
            return torch.optim.SGD(self.net.params, lr=1.0, momentum=momentum, nesterov=nesterov and momentum > 0,
                                   weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel in this torch build
            return None

    @property
    def graph_safe(self) -> bool:
        """Whether :meth:`step` can be captured in a CUDA graph (all but the unfused Adam, whose bias
        corrections are host-side numbers that change every step)."""
        return self.fused is not None or self.kind == "sgd"

    @torch.no_grad()
    def step(self, factor: float | torch.Tensor = 1.0) -> None:
        """One update at learning rate ``lr[i] * factor`` for student i (``factor``: the schedule's value).

        ``factor`` may be a float64 device scalar (refilled before each CUDA-graph replay).
        """
        net = self.net
        self.t += 1
        if self.fused is not None:
            lr = self.shared_lr * factor
            self.fused.param_groups[0]["lr"] = lr.float() if isinstance(lr, torch.Tensor) else lr
            self.fused.step()
            return
        lr = (self.base_lr * factor).float()  # rounded like fit's python-float lr * factor
        for i, (p, g) in enumerate(zip(net.params, net.grads)):
            if self.use_wd:
                g.addcmul_(p, self.wd[i])
            lr_i = net.per_student(lr, i)
            if self.kind == "sgd":
                buf = self.state[i]
                if self.t == 1:
                    buf.copy_(g)
                else:
                    buf.mul_(self.mom[i]).add_(g)
                if self.nesterov:
                    g.addcmul_(buf, self.mom[i])
                    p.addcmul_(g, lr_i, value=-1.0)
                else:
                    p.addcmul_(buf, lr_i, value=-1.0)
            else:
                b1, b2 = self.betas
                m, v = self.state[i], self.state2[i]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = lr_i / (1 - b1**self.t)
                denom = (v.sqrt() / ((1 - b2**self.t) ** 0.5)).add_(self.eps)
                p.addcdiv_(m * step_size, denom, value=-1.0)
