"""Validation splits and transfer-set filters: pure functions from data to data, all seeded."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kdistill.config.types import short_repr
from kdistill.data.dataset import UNLABELLED, DataBundle, Split, TensorData


def _check_classes(data: TensorData, classes: Iterable[int], field: str) -> list[int]:
    out = sorted({int(c) for c in classes})
    bad = [c for c in out if not 0 <= c < data.num_classes]
    if bad:
        raise ValueError(f"{field}: classes {bad} are not in 0..{data.num_classes - 1} for {data.name}")
    return out


def stratified_rows(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Rows keeping ``fraction`` of every class (at least one each), chosen with ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        n = max(1, round(fraction * len(rows)))
        keep.append(rows[torch.randperm(len(rows), generator=g)[:n]])
    return torch.sort(torch.cat(keep)).values


def _known_labels(data: Split) -> torch.Tensor | None:
    """Labels available without reading inputs: a TensorData's ``y``, a StreamData's ``labels`` if set."""
    return data.y if isinstance(data, TensorData) else data.labels


def split_validation(train: Split, size: int | float, seed: int = 0) -> tuple[Split, Split]:
    """Carve a validation split of ``size`` samples (or, if below 1, that fraction) from ``train``.

    Stratified by class whenever the labels are known (always for in-memory data; for streamed data when
    its ``labels`` are set), else a seeded random choice, since stratifying would mean reading every item.
    Returns ``(train_rest, val)`` of the same kind as ``train``. Sample ids keep pointing at the original
    training rows.
    """
    n = len(train)
    count = round(size * n) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < count < n:
        raise ValueError(f"val_size: need 0 < size < {n} samples, got {size}")
    labels = _known_labels(train)
    if labels is None:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=g)[:count].sort().values
        mask = torch.zeros(n, dtype=torch.bool)
        mask[rows] = True
        return train.subset(torch.nonzero(~mask).flatten()), train.subset(rows, name=f"{train.name}-val")
    labels = labels.cpu()
    pool = torch.nonzero(labels != UNLABELLED).flatten()  # a validation row must have a label to be scored
    if not count < len(pool):
        raise ValueError(f"val_size: {size} asks for {count} validation rows, but only {len(pool)} training rows have "
                         f"a label ({n - len(pool)} are unlabelled, {UNLABELLED}); use a smaller val_size, or 0")
    rows = pool[_exact_stratified(labels[pool], count, seed)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    return train.subset(torch.nonzero(~mask).flatten()), train.subset(rows, name=f"{train.name}-val")


def _exact_stratified(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Exactly ``count`` sorted rows of ``labels``, stratified by class (seeded)."""
    n = len(labels)
    rows = stratified_rows(labels, count / n, seed)
    # Rounding per class may miss the exact count by a few; top up or trim deterministically.
    g = torch.Generator().manual_seed(seed + 1)
    if len(rows) > count:
        rows = rows[torch.randperm(len(rows), generator=g)[:count]].sort().values
    elif len(rows) < count:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[rows] = True
        rest = torch.nonzero(~mask).flatten()
        extra = rest[torch.randperm(len(rest), generator=g)[: count - len(rows)]]
        rows = torch.cat([rows, extra]).sort().values
    return rows


def check_eval_split(split: Split | None, role: str, origin: str) -> None:
    """A validation or test split must hold rows, each with a label (``-1`` marks an unlabelled row, which
    only a training split may hold): checked when the data is loaded, not after training."""
    if split is None:
        return
    if len(split) == 0:
        raise ValueError(f"data: {origin}'s {role} split is empty; it needs rows to score the model on")
    labels = _known_labels(split)
    if labels is not None and bool((labels == UNLABELLED).any()):
        n = int((labels == UNLABELLED).sum())
        raise ValueError(f"data: {origin}'s {role} split has {n} unlabelled row(s) (label {UNLABELLED}); every "
                         f"{role} row needs a class to be scored: label them, or move them to the training split")


def check_same_classes(train: Split, split: Split, role: str) -> None:
    """Refuse a validation or test split whose class names differ from the training split's: its label ids
    would mean other classes. A split naming only the first classes (a prefix of the names) is fine."""
    names, mine = tuple(train.classes), tuple(split.classes)
    if mine != names[: len(mine)]:
        raise ValueError(f"{role}: {split.name} names its classes {short_repr(list(mine))}, but the training split "
                         f"{train.name} names them {short_repr(list(names))}; build the {role} split with "
                         f"classes=train.classes (the same names, in the same order)")


def with_validation(bundle: DataBundle, size: int | float, seed: int = 0) -> DataBundle:
    """The bundle with ``val`` carved from its training split."""
    rest, val = split_validation(bundle.train, size, seed)
    return DataBundle(train=rest, val=val, test=bundle.test)


def omit_classes(data: TensorData, classes: Iterable[int]) -> TensorData:
    """Transfer set without the samples of ``classes`` (the paper's 'no 3s' experiment)."""
    drop = _check_classes(data, classes, "omit_classes")
    keep = ~torch.isin(data.y, torch.tensor(drop, dtype=torch.long))
    return data.subset(torch.nonzero(keep).flatten())


def keep_classes(data: TensorData, classes: Iterable[int]) -> TensorData:
    """Transfer set of only the samples of ``classes`` (the paper's 'only 7s and 8s')."""
    keep_list = _check_classes(data, classes, "keep_classes")
    keep = torch.isin(data.y, torch.tensor(keep_list, dtype=torch.long))
    if not keep.any():
        raise ValueError(f"keep_classes: no sample of classes {keep_list} in {data.name}")
    return data.subset(torch.nonzero(keep).flatten())


def stratified_fraction(data: TensorData, fraction: float, seed: int = 0) -> TensorData:
    """A stratified ``fraction`` of ``data`` (soft targets as a regulariser: train on 3%)."""
    return data.subset(stratified_rows(data.y, fraction, seed))


def drop_labels(data: TensorData) -> TensorData:
    """The same inputs with every label replaced by ``UNLABELLED``: only soft targets can teach on it."""
    from dataclasses import replace

    return replace(data, y=torch.full_like(data.y, UNLABELLED))
