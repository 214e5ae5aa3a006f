"""Intermediate features read by forward hooks on named module paths, so no model is ever edited."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FeatureTap:
    """Keeps the latest output of each module in ``paths`` of ``model`` in :attr:`out` (path -> tensor).

    A module returning a tuple contributes its first element. :meth:`close` removes the hooks (also on exit of
    a ``with`` block), leaving the model exactly as it was.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in paths:
            module = model.get_submodule(path)
            self._handles.append(module.register_forward_hook(self._keep(path)))

    def _keep(self, path: str):
        def hook(_module, _inputs, output):
            self.out[path] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
