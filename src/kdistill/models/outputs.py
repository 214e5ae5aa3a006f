"""Reduce a model's output to its logits tensor, so models from other libraries fit the trainer.

Everything in kdistill (losses, trainer, evaluation) expects ``model(x)`` to be a logits tensor. Models
from torchvision (GoogLeNet/Inception return namedtuples while training), timm, Hugging Face
(``ModelOutput`` with ``.logits``) or a user's own code (``(logits, features)``) return more;
:func:`ensure_logits` puts a forward hook on such a model that keeps only the logits, leaving its
weights and ``state_dict`` untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["logits_of", "ensure_logits"]


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
