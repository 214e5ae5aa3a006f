"""Turn what users hold (arrays, tensors, torch data sets and loaders) into kdistill splits.

Every trainer consumes a :data:`~kdistill.data.dataset.Split`; these converters are the one place where
outside data gets checked, so a bad label or dtype is reported once, by field name, with the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any

import numpy as np
import torch

from kdistill.config.types import short_repr
from kdistill.data.dataset import IGNORE_LABEL, UNLABELLED, Split, StreamData, TensorData

_NUMERIC_KINDS = "biuf"  # numpy dtype kinds: bool, signed, unsigned, float


def _as_array(v: Any, field: str) -> np.ndarray | torch.Tensor:
    """A tensor stays a tensor; anything else becomes a numpy array (lists, tuples, scalars per row)."""
    if isinstance(v, torch.Tensor):
        return v.detach()
    try:
        return np.asarray(v)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise ValueError(f"{field}: cannot be read as one array ({exc}); pass a numpy array or tensor") from exc


def to_inputs(x: Any, field: str = "x", keep_integers: bool = False) -> torch.Tensor:
    """Inputs as float32; ``uint8`` inputs (8-bit images) are scaled by 1/255 into [0, 1].

    Other integer, bool and float dtypes are cast as they are (no scaling): only uint8 is unambiguously
    pixel data. With ``keep_integers`` (what :func:`to_tensor_data`, so ``fit``, asks for) signed and wider
    unsigned integers (int8..int64, uint16..uint64) become int64 instead: token ids for an embedding layer
    must reach the model as ids. ``uint8`` is still read as pixels, bool as 0/1 floats.
    """
    arr = _as_array(x, field)
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(
                f"{field}: inputs must be numeric, got dtype {arr.dtype} (strings or Python objects); "
                "convert features to numbers first (e.g. one-hot encode categorical columns)"
            )
        arr = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.is_complex():
        raise ValueError(f"{field}: complex inputs are not supported; pass real features")
    if arr.ndim == 0:
        raise ValueError(f"{field}: need one row per sample, got a scalar")
    if arr.dtype == torch.uint8:
        return arr.to(torch.float32).div_(255.0)
    if keep_integers and not arr.is_floating_point() and arr.dtype != torch.bool:
        return arr.to(torch.long)
    return arr.to(torch.float32)


def _check_int64_range(arr: torch.Tensor, field: str) -> None:
    """Refuse labels an int64 cast would wrap (floats or uint64 values >= 2**63 become negative ids)."""
    if arr.is_floating_point():
        big = (arr >= 2.0**63) | (arr < -(2.0**63))
    elif arr.dtype == getattr(torch, "uint64", None):  # compared in numpy: torch has few uint64 kernels
        big = torch.from_numpy(arr.cpu().numpy() > np.iinfo(np.int64).max)
    else:
        return
    if bool(big.any()):
        v = arr[big][0].item()
        raise ValueError(f"{field}: label {v:.0f} is beyond int64's range, so it is no class id; labels are ids "
                         "0..K-1: renumber them (ids, y = np.unique(y, return_inverse=True))")


def to_labels(y: Any, field: str = "y") -> torch.Tensor:
    """Class labels as int64 (one per sample; ``UNLABELLED`` = -1 marks a dropped label).

    Float labels are accepted when every value is a whole number (``3.0``); anything else is an error,
    since silently truncating ``2.7`` or a one-hot row would train on wrong targets.
    """
    arr = _as_array(y, field)
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(
                f"{field}: labels must be integer class ids, got dtype {arr.dtype}; map class names to "
                "0..K-1 (e.g. names = sorted(set(y)); y = [names.index(v) for v in y]) and pass classes=names"
            )
        arr = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.ndim != 1:
        raise ValueError(
            f"{field}: need one integer label per sample (1-D), got shape {tuple(arr.shape)}; "
            "for one-hot or probability rows pass y.argmax(1) (per-position targets: integer (N, L) labels, "
            "-100 where not scored, with inputs (N, L, ...))"
        )
    if arr.is_floating_point() or arr.is_complex():
        if arr.is_complex() or not bool(torch.isfinite(arr).all()):
            raise ValueError(f"{field}: labels contain NaN or infinite values; drop or fix those rows")
        if not bool((arr == arr.round()).all()):
            bad = arr[arr != arr.round()][:3].tolist()
            raise ValueError(
                f"{field}: labels must be whole class ids, found fractional values such as {bad}; "
                "soft targets are not labels: pass hard class ids (e.g. y.argmax(1))"
            )
    _check_int64_range(arr, field)
    labels = arr.to(torch.long)
    if len(labels) and int(labels.min()) < UNLABELLED:
        raise ValueError(f"{field}: labels must be >= 0 (or {UNLABELLED} for unlabelled), found {int(labels.min())}")
    return labels


"""Per-position label value of a position that is not scored (padding, prompt): the PyTorch convention."""


def label_positions_match(label_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> bool:
    """Whether one sample's labels of ``label_shape`` are per position of an input of ``input_shape``: the
    leading dimensions (tokens (L,) of ids (L,), frames (L,) of features (L, F)) or, for two or more label
    dimensions, the trailing ones (pixels (H, W) of an image (C, H, W); a 1-D trailing match such as one-hot
    rows as wide as an image is not taken for positions)."""
    k = len(label_shape)
    if not k or len(input_shape) < k:
        return False
    return tuple(input_shape[:k]) == tuple(label_shape) or (k >= 2 and tuple(input_shape[-k:]) == tuple(label_shape))


def is_position_labels(y: Any, x: torch.Tensor) -> bool:
    """Whether ``y`` holds per-position targets for inputs ``x``: an integer (N, L) or (N, H, W, ...) array
    (or tensor) whose positions match the inputs' (:func:`label_positions_match`): (N, L) token ids or (N, L,
    ...) frames, (N, C, H, W) images with (N, H, W) labels. A float (N, C) array (one-hot or probability rows)
    is not: :func:`to_labels` refuses it naming the fix."""
    arr = y if isinstance(y, torch.Tensor) else np.asarray(y) if isinstance(y, np.ndarray) else None
    if arr is None or arr.ndim < 2 or len(arr) != len(x) \
            or not label_positions_match(tuple(arr.shape[1:]), tuple(x.shape[1:])):
        return False
    kind = "i" if isinstance(arr, torch.Tensor) and not arr.is_floating_point() and arr.dtype != torch.bool \
        and not arr.is_complex() else getattr(getattr(arr, "dtype", None), "kind", "")
    return kind in ("i", "u")


def labels_copy_inputs(split: Any) -> bool:
    """Whether a per-position split's labels equal its integer inputs (token ids) at every scored position: the
    Hugging Face causal-LM convention (labels = input_ids, shifted inside the model), which kdistill does not
    follow (its labels are each position's own target). Read from memory, or from a streamed split's first item."""
    x, y = getattr(split, "x", None), getattr(split, "y", None)
    if y is None and isinstance(getattr(split, "dataset", None), Sized) and len(split.dataset):
        item = split.dataset[0]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            x, y = item[0], torch.as_tensor(item[1])
    if isinstance(x, Mapping):
        x = x.get("input_ids")
    if not isinstance(x, torch.Tensor) or y is None or x.is_floating_point() or tuple(x.shape) != tuple(y.shape):
        return False
    keep = y != IGNORE_LABEL
    return bool(keep.any()) and bool((x[keep] == y[keep]).all())


def to_position_labels(y: Any, field: str = "y") -> torch.Tensor:
    """Per-position labels (N, L) as int64: class ids >= 0, or -100 for a position not scored (padding)."""
    arr = _as_array(y, field)
    labels = (torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr).to(torch.long)
    bad = (labels < 0) & (labels != IGNORE_LABEL)
    if bool(bad.any()):
        raise ValueError(f"{field}: per-position labels must be class ids >= 0 or {IGNORE_LABEL} (not scored), "
                         f"found {int(labels[bad][0])}; mark padding with {IGNORE_LABEL}")
    if len(labels) and not bool((labels != IGNORE_LABEL).any()):
        raise ValueError(f"{field}: every per-position label is {IGNORE_LABEL} (not scored), so there is nothing "
                         "to learn; label at least one position")
    return labels


def default_classes(labels: torch.Tensor) -> tuple[str, ...]:
    """``("0", ..., str(max label))``: names for data sets that bring none."""
    top = int(labels.max()) if len(labels) else -1
    return tuple(str(i) for i in range(top + 1))


def check_classes(labels: torch.Tensor, classes: Sequence[str], field: str) -> tuple[str, ...]:
    """``classes`` as a tuple of names, checked to cover every label."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ValueError(f"{field}: classes must be a sequence of names, got {type(classes).__name__}")
    names = tuple(str(c) for c in classes)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:  # two ids of one name: predictions and reports could not tell them apart
            raise ValueError(f"{field}: class name {short_repr(name, 60)} is given twice (ids {seen[name]} and {i}); "
                             "give each class id its own name")
        seen[name] = i
    if len(labels) and int(labels.max()) >= len(names):
        raise ValueError(
            f"{field}: label {int(labels.max())} has no name among the {len(names)} classes; "
            "pass one name per class id 0..K-1"
        )
    return names


def to_tensor_data(
    x: Any,
    y: Any,
    *,
    classes: Sequence[str] | None = None,
    index: Any = None,
    name: str = "data",
) -> TensorData:
    """An in-memory split from arrays, tensors or lists of any numeric dtype.

    Float inputs become float32, ``uint8`` is scaled by 1/255 into float32, other integers (token ids)
    stay integers as int64 (see :func:`to_inputs`); labels become int64 (see :func:`to_labels`).
    ``classes`` defaults to ``str(i)`` for every id up to the largest label;
    ``index`` (sample ids) defaults to ``0..N-1``.
    """
    inputs = to_inputs(x, "x", keep_integers=True)
    labels = to_position_labels(y, "y") if is_position_labels(y, inputs) else to_labels(y, "y")
    if len(inputs) != len(labels):
        raise ValueError(f"{name}: x has {len(inputs)} rows but y has {len(labels)} labels; pass one label per row")
    names = default_classes(labels) if classes is None else check_classes(labels, classes, "classes")
    ids = None
    if index is not None:
        ids = to_labels(index, "index")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("index: sample ids must be unique")
    return TensorData(x=inputs, y=labels, classes=names, index=ids, name=name)


def _stream_classes(dataset: Any, classes: Sequence[str] | None) -> tuple[Sequence[str] | None, torch.Tensor | None]:
    """Class names and labels of a map-style data set, from what it declares (no decoding)."""
    labels = None
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        labels = to_labels(targets, "dataset.targets")
        if len(labels) != len(dataset):
            labels = None  # targets that do not describe the items (a wrapper's): not trusted
    if classes is not None:
        return classes, labels
    declared = getattr(dataset, "classes", None)
    if isinstance(declared, Sequence) and not isinstance(declared, (str, bytes)) and declared \
            and all(isinstance(c, str) for c in declared):
        return tuple(declared), labels
    if labels is not None:
        return default_classes(labels), labels
    return None, None


def _item_label(item: Any, i: int) -> int:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(
            f"dataset: item {i} is a {type(item).__name__}, expected (x, y) or (x, y, sample_id)"
        )
    label = torch.as_tensor(item[1])
    if label.numel() != 1:
        raise ValueError(
            f"dataset: item {i}'s label has shape {tuple(label.shape)}; items need one integer class id "
            "(for one-hot labels return y.argmax())"
        )
    return int(to_labels(label.reshape(1), f"dataset item {i} label")[0])


def _input_shape(x: Any, name: str, fix: str) -> tuple[int, ...]:
    """One item's input shape, checked numeric. A dict of tensors (keyword inputs such as ``input_ids`` and
    ``attention_mask``) needs numeric values; its shape is its first entry's."""
    if isinstance(x, Mapping):
        if not x or not all(isinstance(k, str) for k in x):
            raise ValueError(f"{name}: item 0's input is a dict; it needs string keys naming the model's keyword "
                             f"arguments (e.g. input_ids, attention_mask), got {list(x)[:4]}")
        shapes = [_input_shape(v, f"{name}: input {k!r}", fix) for k, v in x.items()]
        return shapes[0]
    try:
        shape = tuple(np.shape(x))
        arr = np.asarray(x) if not isinstance(x, torch.Tensor) else None
        if arr is not None and arr.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(arr.dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: item 0's input is a {type(x).__name__}, not a numeric array; {fix}") from exc
    return shape


def _item_positions(item: Any, shape: tuple[int, ...]) -> bool:
    """Whether an item's label is per position: integer, more than one entry, its shape matching the input's
    leading or trailing dimensions (:func:`label_positions_match`)."""
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not shape:
        return False
    label = torch.as_tensor(item[1])
    return label.dim() >= 1 and label.numel() > 1 and not label.is_floating_point() \
        and label_positions_match(tuple(label.shape), tuple(shape))


def _stream_positions(dataset: Any, classes: Sequence[str] | None, shape: tuple[int, ...], name: str,
                      positions: tuple[int, ...]) -> StreamData:
    """A streamed split whose items carry per-position labels (``positions``, -100 = not scored); class names from
    ``classes=`` or the data set's ``classes``, else from every item's labels (read once)."""
    declared = classes if classes is not None else getattr(dataset, "classes", None)
    if isinstance(declared, Sequence) and not isinstance(declared, (str, bytes)) and declared:
        names = check_classes(torch.zeros(0, dtype=torch.long), declared, "classes")
    else:
        top = max(int(to_position_labels(torch.as_tensor(dataset[i][1]).reshape(1, -1), f"dataset item {i} label").max())
                  for i in range(len(dataset)))
        names = default_classes(torch.tensor([top]))
    return StreamData(dataset=dataset, classes=names, input_shape=shape, labels=None, name=name, per_position=True,
                      positions=positions)


def _dataset_to_stream(dataset: Any, classes: Sequence[str] | None, name: str) -> StreamData:
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name}: the data set is empty")
    first = dataset[0]
    fix = "give the data set a transform that returns tensors (e.g. torchvision's ToTensor())"
    if isinstance(first, (tuple, list)) and len(first) >= 2 \
            and isinstance(first[0], (torch.Tensor, np.ndarray, Mapping)):  # a dict: keyword inputs (input_ids)
        shape = _input_shape(first[0], name, fix)
        if _item_positions(first, shape):
            return _stream_positions(dataset, classes, shape, name, tuple(torch.as_tensor(first[1]).shape))
    _item_label(first, 0)
    if type(first[0]).__module__.startswith("PIL"):
        raise ValueError(f"{name}: items are PIL images, not tensors; {fix}")
    shape = _input_shape(first[0], name, fix)
    names, labels = _stream_classes(dataset, classes)
    if names is None:  # nothing declared: read every label once (decodes every item, slow for big sets)
        labels = torch.tensor([_item_label(dataset[i], i) for i in range(n)], dtype=torch.long)
        names = default_classes(labels)
    names = check_classes(labels if labels is not None else torch.zeros(0, dtype=torch.long), names, "classes")
    return StreamData(dataset=dataset, classes=names, input_shape=shape, labels=labels, name=name)


def as_split(obj: Any, *, classes: Sequence[str] | None = None, name: str = "data") -> Split:
    """Whatever a user passes as training or evaluation data, as a kdistill split.

    Accepted:

    * a :class:`TensorData` or :class:`StreamData`: returned as it is;
    * a pair ``(x, y)`` of arrays, tensors or lists: :func:`to_tensor_data`;
    * a ``torch.utils.data.TensorDataset`` of ``(x, y)`` or ``(x, y, sample_ids)``: its tensors, in memory
      (the fast path: batches are tensor slices);
    * any other map-style ``torch.utils.data.Dataset`` with ``__len__`` whose items are ``(x, y)`` or
      ``(x, y, sample_id)``: a :class:`StreamData`. ``input_shape`` is item 0's input shape. Class names
      come from ``classes=``, else the data set's ``classes`` (a sequence of names), else its ``targets``
      (which also give the labels); with none of these, every item is read once to collect its label,
      which decodes the whole data set (slow: pass ``classes=`` to avoid it);
    * a ``torch.utils.data.DataLoader``: its ``dataset``, by the rules above. Its batch size, workers and
      sampler are not used: the engine reads the data set with its own loader settings.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

    if isinstance(obj, (TensorData, StreamData)):
        return obj
    if isinstance(obj, DataLoader):
        return as_split(obj.dataset, classes=classes, name=name)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return to_tensor_data(obj[0], obj[1], classes=classes, name=name)
    if isinstance(obj, TensorDataset):
        if len(obj.tensors) not in (2, 3):
            raise ValueError(
                f"{name}: a TensorDataset needs tensors (x, y) or (x, y, sample_ids), got {len(obj.tensors)}"
            )
        index = obj.tensors[2] if len(obj.tensors) == 3 else None
        return to_tensor_data(obj.tensors[0], obj.tensors[1], classes=classes, index=index, name=name)
    if isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__"):
        return _dataset_to_stream(obj, classes, name)
    raise ValueError(
        f"{name}: cannot use a {type(obj).__module__}.{type(obj).__qualname__} as data; pass a TensorData or "
        "StreamData, a pair (x, y) of arrays or tensors, a torch TensorDataset, a map-style torch Dataset "
        "with __len__ whose items are (x, y[, sample_id]), or a DataLoader over one"
    )
