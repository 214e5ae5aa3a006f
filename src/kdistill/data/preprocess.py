"""Input preprocessing as data config (``data.normalize``), applied once and recorded with the model.

Every loader gives float32 inputs; image loaders (MNIST, CIFAR, ``folder:``, uint8 ``npz:``) scale 8-bit
pixels by 1/255 into [0, 1] (:data:`PIXEL_SCALE`). ``data.normalize`` then maps each channel to
``(x - mean) / std``:

* ``none`` (the default): inputs as the loader gives them;
* a preset: ``imagenet`` (mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225) or ``cifar10`` (the CIFAR-10
  training set's per-channel mean 125.307, 122.950, 113.865 and std 62.993, 62.089, 66.705 on 0-255);
* ``{mean: [..], std: [..]}`` (one value, or one per channel), or the string ``"mean=a,b,c;std=d,e,f"``
  (usable with ``--set data.normalize=...``).

Means and stds are on the loaded inputs' scale ([0, 1] for images). In-memory splits are normalised once,
as a tensor; streamed ones per item (:class:`NormalizedDataset`, so DataLoader workers do it). The split
keeps a ``preprocessing`` record that ``model.safetensors`` and exported ONNX models carry, so a model can
be run on new images (``kdistill predict``) and a teacher trained on other inputs is refused.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from kdistill.config.types import closest
from kdistill.data.dataset import DataBundle, Split, StreamData, TensorData

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": (tuple(v / 255 for v in (125.307, 122.950, 113.865)), tuple(v / 255 for v in (62.993, 62.089, 66.705))),
}
"""Named per-channel (mean, std) on the [0, 1] scale of decoded 8-bit images."""

PIXEL_SCALE: dict[str, float] = {name: 1 / 255 for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "folder")}
"""Loaders (names or file-spec prefixes) whose inputs are 8-bit pixels divided by 255; 16-bit images
(``folder:``) are divided by 65535 onto the same [0, 1] scale. Others keep their values (scale unknown)."""

FORMS = "none, imagenet, cifar10, {mean: [..], std: [..]} or \"mean=a,b,c;std=d,e,f\""
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``; ``name`` is ``none``, a preset or ``custom``."""

    name: str = "none"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.name == "none"

    def setting(self) -> str | dict[str, list[float]]:
        """As written in ``config.yaml``: a name, or ``{mean, std}``."""
        return self.name if self.name != "custom" else {"mean": list(self.mean), "std": list(self.std)}

    def record(self) -> str | dict[str, Any]:
        """As recorded with a model: ``"none"`` or ``{name, mean, std}`` (the numbers, even for a preset)."""
        if self.is_identity:
            return "none"
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        if self.is_identity:
            return "none"
        numbers = f"mean {[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]}"
        return f"{self.name} ({numbers})" if self.name != "custom" else numbers


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: expected a number or a list of numbers (one per channel), "
                         f"got {reprlib.repr(value)}")
    out = []
    for i, v in enumerate(value):
        try:
            number = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{where}[{i}]: expected a finite number, got {reprlib.repr(v)}")
        out.append(number)
    return tuple(out)


def _from_string(text: str) -> Normalization | dict[str, str]:
    key = text.strip().lower()
    if key in ("", "none", "null", "false", "off"):
        return Normalization()
    if key in PRESETS:
        mean, std = PRESETS[key]
        return Normalization(key, mean, std)
    parts = re.split(r"\b(mean|std)\s*[=:]\s*", key)
    if len(parts) < 3 or parts[0].strip(" ;/"):

        raise ValueError(f"data.normalize: unknown setting {reprlib.repr(text)}{closest(key[:100], PRESETS)}; "
                         f"give {FORMS}")
    return {parts[i]: parts[i + 1].strip(" ;/") for i in range(1, len(parts) - 1, 2)}


def parse_normalize(value: Any) -> Normalization:
    """``data.normalize`` in any of its forms (see the module docstring), checked; a ValueError names the fix."""
    if value is None or value is False:
        return Normalization()
    if isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        parsed = _from_string(value)
        if isinstance(parsed, Normalization):
            return parsed
        value = parsed
    if not isinstance(value, Mapping):
        raise ValueError(f"data.normalize: expected {FORMS}, got {type(value).__name__} {reprlib.repr(value)}")
    extra = sorted(set(value) - {"mean", "std", "name"})
    if extra or "mean" not in value or "std" not in value:
        raise ValueError(f"data.normalize: give both mean and std (one value or one per channel), "
                         f"got keys {sorted(value)}; e.g. {{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}")
    mean, std = _numbers(value["mean"], "data.normalize.mean"), _numbers(value["std"], "data.normalize.std")
    if len(mean) != len(std):
        raise ValueError(f"data.normalize: mean has {len(mean)} values but std has {len(std)}; give one per channel")
    if min(std) <= 0:
        raise ValueError(f"data.normalize.std: every std must be > 0, got {list(std)}")
    name = str(value.get("name", "custom"))
    return Normalization(name if name in PRESETS and PRESETS[name] == (mean, std) else "custom", mean, std)


def _channels(norm: Normalization, shape: Sequence[int], data_name: str) -> int:
    """The channel count of inputs shaped ``shape`` (the first dimension), checked against ``norm``."""
    if not shape:
        raise ValueError(f"data.normalize: {data_name} inputs are scalars; per-channel normalisation needs "
                         "inputs shaped (C, ...)")
    c = int(shape[0])
    if len(norm.mean) not in (1, c):
        raise ValueError(f"data.normalize: {norm.name if norm.name != 'custom' else 'the setting'} has "
                         f"{len(norm.mean)} channels' mean/std but {data_name} inputs have {c} (shape {list(shape)}); "
                         f"give {{mean: [..], std: [..]}} with one value or {c}")
    return c


def _check_scale(norm: Normalization, scale: float | None) -> None:
    if scale is not None and max(max(map(abs, norm.mean)), max(norm.std)) > 1:
        raise ValueError(f"data.normalize: mean {list(norm.mean)} / std {list(norm.std)} are not on the [0, 1] "
                         "scale of the decoded images; divide 0-255 values by 255 (or use a preset: imagenet, "
                         "cifar10)")


def channel_view(values: Sequence[float], c: int, ndim: int) -> torch.Tensor:
    """``values`` (one, or one per channel) as a float32 tensor broadcasting over (C, ...) of ``ndim`` dims."""
    t = torch.tensor(values, dtype=torch.float32)
    t = t.expand(c) if t.numel() == 1 else t
    return t.reshape(c, *([1] * (ndim - 1)))


class NormalizedDataset(Dataset):
    """A streamed data set whose items' inputs are normalised as they are read (picklable for workers)."""

    def __init__(self, dataset: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean, self.std = tuple(mean), tuple(std)
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        x, *rest = self.dataset[i]
        c = x.shape[0]
        return ((x - channel_view(self.mean, c, x.dim())) / channel_view(self.std, c, x.dim()), *rest)


def normalize_split(split: Split, norm: Normalization, scale: float | None) -> Split:
    """``split`` normalised (a new tensor in memory, a :class:`NormalizedDataset` when streamed), carrying its
    ``preprocessing`` record."""
    record = {**(split.preprocessing or {}), "normalize": norm.record(), "scale": scale}  # keeps a text tokenizer
    if norm.is_identity:
        return replace(split, preprocessing=record)
    c = _channels(norm, split.input_shape, split.name)
    if isinstance(split, TensorData):
        ndim = split.x.dim() - 1
        x = (split.x - channel_view(norm.mean, c, ndim)) / channel_view(norm.std, c, ndim)
        return replace(split, x=x, preprocessing=record)
    if isinstance(split, StreamData):
        return replace(split, dataset=NormalizedDataset(split.dataset, norm.mean, norm.std), preprocessing=record)
    raise ValueError(f"data.normalize: cannot normalise a {type(split).__name__}")


def preprocess_bundle(bundle: DataBundle, norm: Normalization, scale: float | None) -> DataBundle:
    """Every split of ``bundle`` normalised by ``norm`` (checked against the inputs' channels and scale)."""
    if not norm.is_identity:
        _channels(norm, bundle.train.input_shape, bundle.train.name)
        _check_scale(norm, scale)
    val = None if bundle.val is None else normalize_split(bundle.val, norm, scale)
    return DataBundle(train=normalize_split(bundle.train, norm, scale), test=normalize_split(bundle.test, norm, scale),
                      val=val)


def model_record(split: Split) -> dict[str, Any]:
    """What ``model.safetensors`` records about the data it was trained on: ``class_names`` and, for data
    loaded by :func:`kdistill.data.load`, ``preprocessing`` (normalize, scale, input_shape, input_dtype)."""
    out: dict[str, Any] = {"class_names": [str(c) for c in split.classes]}
    pre = getattr(split, "preprocessing", None)
    if pre:
        dtype = str(split.x.dtype).removeprefix("torch.") if isinstance(split, TensorData) else "float32"
        out["preprocessing"] = {**pre, "input_shape": list(split.input_shape), "input_dtype": dtype}
    return out


def recorded_normalization(record: Mapping[str, Any] | None) -> Normalization | None:
    """The :class:`Normalization` of a model's ``preprocessing`` record; None when there is no record."""
    if not isinstance(record, Mapping) or "normalize" not in record:
        return None
    norm = record["normalize"]
    if norm in (None, "none"):
        return Normalization()
    return parse_normalize(norm)


def same_preprocessing(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two ``preprocessing`` records feed a model the same numbers (scale and mean/std)."""
    na, nb = recorded_normalization(a), recorded_normalization(b)
    if na is None or nb is None:
        return True
    sa, sb = a.get("scale"), b.get("scale")
    if sa is not None and sb is not None and not math.isclose(sa, sb, rel_tol=_TOLERANCE):
        return False
    if na.is_identity or nb.is_identity:
        return na.is_identity == nb.is_identity
    c = max(len(na.mean), len(nb.mean))
    full = [[v[0]] * c if len(v) == 1 else list(v) for v in (na.mean, nb.mean, na.std, nb.std)]
    return all(len(full[i]) == len(full[i + 1]) and all(math.isclose(x, y, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)
                                                        for x, y in zip(full[i], full[i + 1])) for i in (0, 2))


def check_teacher_preprocessing(path: str, record: Mapping[str, Any] | None, split: Split,
                                what: str = "teacher") -> None:
    """Refuse a teacher (or model) whose recorded preprocessing differs from the run's data; a model that
    records none, or data without a record, passes as before."""
    ours = getattr(split, "preprocessing", None)
    if not record or not ours or same_preprocessing(record, ours):
        return
    theirs, mine = recorded_normalization(record), recorded_normalization(ours)
    fix = theirs.setting() if theirs is not None else "none"
    if not isinstance(fix, str):
        fix = f"mean={','.join(map(str, fix['mean']))};std={','.join(map(str, fix['std']))}"
    scale = ""
    if record.get("scale") != ours.get("scale"):
        scale = f" and pixel scale {record.get('scale')} (this data's: {ours.get('scale')})"
    raise ValueError(f"{what}: {path} was trained on inputs normalised with {theirs.describe()}{scale}, but this "
                     f"run's data ({split.name}) uses {mine.describe()}; the {what} would see other numbers than it "
                     f"learnt from. Set --set data.normalize='{fix}' to match it, or use a {what} trained with "
                     f"this run's preprocessing")
