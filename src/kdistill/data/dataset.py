"""The in-memory data set every loader returns and every trainer consumes.

Whole data sets (MNIST, CIFAR-10, synthetic) fit in memory as tensors, so kdistill never goes through a
per-sample ``Dataset``/``DataLoader``: batches are slices of these tensors picked by a permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

UNLABELLED = -1
"""Label value of a sample whose label was dropped (transfer sets may be unlabelled)."""
IGNORE_LABEL = -100
"""A per-position label that is not scored (padding), the PyTorch / Hugging Face convention."""


@dataclass(frozen=True)
class TensorData:
    """Inputs, labels and stable sample ids of one split.

    ``index`` holds each sample's id in the split it was taken from (its row in the original training
    set, for instance); cached teacher logits are keyed by it, so filtered or re-ordered subsets still
    find their own teacher outputs.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    index: torch.Tensor = field(default=None)  # type: ignore[assignment]
    name: str = "data"
    preprocessing: dict[str, Any] | None = field(default=None, compare=False)  # by data.load (data/preprocess.py)

    def __post_init__(self) -> None:
        if self.index is None:
            object.__setattr__(self, "index", torch.arange(len(self.x)))
        if len(self.x) != len(self.y) or len(self.x) != len(self.index):
            raise ValueError(
                f"{self.name}: x, y and index must have the same length, got "
                f"{len(self.x)}, {len(self.y)}, {len(self.index)}"
            )
        if self.y.dtype != torch.long:
            object.__setattr__(self, "y", self.y.long())

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def has_unlabelled(self) -> bool:
        return bool((self.y == UNLABELLED).any())

    @property
    def per_position(self) -> bool:
        """Whether the labels are per position, (N, L) or (N, H, W, ...) with -100 = not scored (a language
        model's tokens, a sequence's frames, an image's pixels)."""
        return self.y.dim() >= 2

    @property
    def positions(self) -> tuple[int, ...]:
        """One sample's positions, the labels' shape after the batch: (L,), (H, W), or () for one label each."""
        return tuple(self.y.shape[1:])

    def subset(self, rows: torch.Tensor, name: str | None = None) -> "TensorData":
        """Rows ``rows`` of this split; sample ids travel with them."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, x=self.x[rows], y=self.y[rows], index=self.index[rows], name=name or self.name)

    def to(self, device: torch.device | str) -> "TensorData":
        return replace(self, x=self.x.to(device), y=self.y.to(device), index=self.index.to(device))


@dataclass(frozen=True)
class StreamData:
    """A split that stays on disk: a map-style ``torch.utils.data.Dataset`` read through a ``DataLoader``.

    Item ``i`` of ``dataset`` is ``(x, y)`` or ``(x, y, sample_id)``; without a sample id, ``index[i]`` is
    used (default ``i``). ``labels`` (one per item, when known without decoding the inputs) lets splits be
    stratified and labels be checked before training; ``input_shape`` is one sample's shape.
    """

    dataset: Any
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    index: torch.Tensor = field(default=None)  # type: ignore[assignment]
    labels: torch.Tensor | None = None
    name: str = "data"
    preprocessing: dict[str, Any] | None = field(default=None, compare=False)  # by data.load (data/preprocess.py)
    per_position: bool = False
    """Items' labels are per position, (L,) with -100 = not scored (see :attr:`TensorData.per_position`)."""
    positions: tuple[int, ...] = ()
    """One item's label shape when ``per_position`` ((L,), (H, W)); () otherwise."""

    def __post_init__(self) -> None:
        n = len(self.dataset)
        if self.index is None:
            object.__setattr__(self, "index", torch.arange(n))
        if len(self.index) != n or (self.labels is not None and len(self.labels) != n):
            raise ValueError(f"{self.name}: index and labels need one entry per item ({n})")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_unlabelled(self) -> bool:
        return self.labels is not None and bool((self.labels == UNLABELLED).any())

    def subset(self, rows: torch.Tensor, name: str | None = None) -> "StreamData":
        """Items ``rows`` of this split (a ``torch.utils.data.Subset``); sample ids travel with them."""
        from torch.utils.data import Subset

        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, dataset=Subset(self.dataset, rows.tolist()), index=self.index[rows],
                       labels=None if self.labels is None else self.labels[rows], name=name or self.name)


Split = TensorData | StreamData
"""What a data set's split may be: in memory (the fast path) or streamed from disk."""


@dataclass(frozen=True)
class DataBundle:
    """The splits of one data set. ``val`` is carved from the training data; ``test`` is only reported."""

    train: Split
    test: Split
    val: Split | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape
