"""Data sets as in-memory tensors, validation splits, transfer-set filters and batched jitter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .augment import jitter, jittered_copies
from .dataset import UNLABELLED, DataBundle, TensorData
from .mnist import load_fashion_mnist, load_mnist
from .splits import (
    drop_labels,
    keep_classes,
    omit_classes,
    split_validation,
    stratified_fraction,
    with_validation,
)
from .toy import load_digits, load_synthetic

LOADERS: dict[str, Callable[..., DataBundle]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "synthetic": load_synthetic,
}
DEFAULT_VAL_SIZE = {"mnist": 5000, "fashion-mnist": 5000, "digits": 0.15, "synthetic": 0.1}


def register_loader(name: str, loader: Callable[..., DataBundle], val_size: int | float = 0.1) -> None:
    """Make ``name`` loadable by :func:`load` (and so by the CLI and configs)."""
    LOADERS[name] = loader
    DEFAULT_VAL_SIZE[name] = val_size


def load(name: str, *, val_size: int | float | None = None, seed: int = 0, **options: Any) -> DataBundle:
    """Load data set ``name`` with a seeded validation split carved from its training set.

    ``options`` go to the loader (``path=`` for local files, ``class_sep=`` for synthetic, ...).
    ``val_size=0`` keeps all training data and no validation split.
    """
    if name not in LOADERS:
        raise ValueError(f"data: unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    bundle = LOADERS[name](**options)
    size = DEFAULT_VAL_SIZE.get(name, 0.1) if val_size is None else val_size
    return with_validation(bundle, size, seed) if size else bundle


from .cifar import load_cifar10  # noqa: E402

register_loader("cifar10", load_cifar10, 5000)


__all__ = [
    "UNLABELLED", "DataBundle", "TensorData", "LOADERS", "load", "register_loader", "jitter", "jittered_copies",
    "load_mnist", "load_fashion_mnist", "load_digits", "load_synthetic", "split_validation",
    "with_validation", "omit_classes", "keep_classes", "stratified_fraction", "drop_labels",
]
