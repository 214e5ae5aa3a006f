"""The in-memory data set every loader returns and every trainer consumes.

Whole data sets (MNIST, CIFAR-10, synthetic) fit in memory as tensors, so kdistill never goes through a
per-sample ``Dataset``/``DataLoader``: batches are slices of these tensors picked by a permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

UNLABELLED = -1
"""Label value of a sample whose label was dropped (transfer sets may be unlabelled)."""


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

    def subset(self, rows: torch.Tensor, name: str | None = None) -> "TensorData":
        """Rows ``rows`` of this split; sample ids travel with them."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, x=self.x[rows], y=self.y[rows], index=self.index[rows], name=name or self.name)

    def to(self, device: torch.device | str) -> "TensorData":
        return replace(self, x=self.x.to(device), y=self.y.to(device), index=self.index.to(device))


@dataclass(frozen=True)
class DataBundle:
    """The splits of one data set. ``val`` is carved from the training data; ``test`` is only reported."""

    train: TensorData
    test: TensorData
    val: TensorData | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape
