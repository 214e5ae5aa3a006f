"""Reduce a model's output to its logits tensor, so models from other libraries fit the trainer.

Everything in kdistill (losses, trainer, evaluation) works on a logits tensor. Models from torchvision
(GoogLeNet/Inception return namedtuples while training), timm, Hugging Face (``ModelOutput`` with
``.logits``) or a user's own code (``(logits, features)``, ``{"logits": z}``) return more.

Every place kdistill runs a model it was given (the student's training step and dry forward, a teacher
network, evaluation, latency) goes through :func:`forward_logits`, which also passes a dict of input
tensors as keyword arguments (``model(**x)``, as Hugging Face models take ``input_ids``/``attention_mask``).
The user's module is left as it was: no hook stays on it after ``fit``, and a teacher keeps its
BatchNorm-folded fast path (a hook would turn folding off). :class:`LogitsOnly` wraps a model for tracing
(ONNX export); :func:`ensure_logits` puts a forward hook on a model that keeps only the logits (the model
registry uses it for the models it builds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["logits_of", "ensure_logits", "forward_logits", "LogitsOnly"]


def logits_of(output: Any, key: str = "logits") -> torch.Tensor:
    """The logits in ``output``: a tensor itself, ``output[key]`` of a dict, ``output.<key>`` of an object
    (Hugging Face style, namedtuples), else element 0 of a tuple/list (``(logits, features)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if key not in output:
            raise ValueError(
                f"model output: the dict output has no {key!r} entry (keys: {sorted(map(str, output))}); "
                f"pick the logits with logits_key=NAME in the model spec"
            )
        return logits_of(output[key], key)
    if hasattr(output, key) and not isinstance(output, (str, bytes)):
        return logits_of(getattr(output, key), key)
    if isinstance(output, (tuple, list)):
        if not output:
            raise ValueError("model output: the model returned an empty tuple/list; expected logits first")
        return logits_of(output[0], key)
    raise ValueError(
        f"model output: cannot find logits in a {type(output).__name__}; return a tensor, a (logits, ...) "
        f"tuple, a dict with {key!r} or an object with .{key}"
    )


def _logits_hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    """Forward hook replacing the output by its logits (module level so models still deepcopy/pickle)."""
    return logits_of(output, getattr(module, "logits_key", "logits"))


def ensure_logits(model: nn.Module, key: str = "logits") -> nn.Module:
    """Make ``model(x)`` return a logits tensor, whatever its forward returns; returns ``model``.

    Idempotent: a second call only updates ``model.logits_key``. A model already returning tensors is
    unaffected (the hook passes tensors through).
    """
    model.logits_key = key  # type: ignore[attr-defined]
    if not any(hook is _logits_hook for hook in model._forward_hooks.values()):
        model.register_forward_hook(_logits_hook)
    return model


def forward_logits(model: nn.Module, x: Any, key: str | None = None) -> torch.Tensor:
    """``model``'s logits for the batch ``x``: a tensor goes in positionally, a dict of tensors as keyword
    arguments (``model(**x)``); the output is reduced by :func:`logits_of` (``key``: the model's
    ``logits_key`` attribute, else ``"logits"``)."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return logits_of(out, key or getattr(model, "logits_key", None) or "logits")


class LogitsOnly(nn.Module):
    """``model`` with a forward that returns only its logits tensor: what tracing (``torch.onnx.export``)
    needs from a model whose forward returns a dict, a tuple or a ``ModelOutput``."""

    def __init__(self, model: nn.Module, key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.key = key or getattr(model, "logits_key", None) or "logits"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return logits_of(self.model(*args, **kwargs), self.key)


class ClassesLast(nn.Module):
    """``model`` with its class dimension moved last: (N, C, H, W) -> (N, H, W, C).

    Per-position logits in kdistill have the classes last (``(B, L, C)``, ``(B, H, W, C)``), as the losses and
    metrics read them; segmentation networks (torchvision's, most U-Nets) put them second, as
    ``F.cross_entropy`` takes them. Wrapping such a network makes it fit, teacher or student, with nothing
    copied: ``fit(ClassesLast(unet), (images, masks), ...)`` with masks (N, H, W). The state dict is the
    wrapped model's under ``model.``."""

    def __init__(self, model: nn.Module, key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.key = key or getattr(model, "logits_key", None) or "logits"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return logits_of(self.model(*args, **kwargs), self.key).movedim(1, -1)
