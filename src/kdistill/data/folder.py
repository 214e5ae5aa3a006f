"""Image folders (the ImageFolder layout) as data sets: ``folder:DIR``.

``DIR/train/CLASS/*.png`` (also ``.jpg``, ``.jpeg``, ``.bmp``), ``DIR/test/CLASS/...`` and optionally
``DIR/val/CLASS/...``. Classes are the sorted subfolder names of ``train``. Images are decoded with Pillow
to float32 (C, H, W) in [0, 1], RGB or (``channels=1``) greyscale, at one size for the whole data set.

Small sets are decoded once into memory (the fast path: batches are tensor slices); large ones stay on
disk as :class:`~kdistill.data.dataset.StreamData` whose :class:`FolderDataset` decodes one file per item,
so they can be read by ``DataLoader`` workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import DataBundle, Split, StreamData, TensorData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SPLITS = ("train", "val", "test")
LAYOUT = "DIR/train/CLASS/*.png (or .jpg, .jpeg, .bmp), DIR/test/CLASS/... and optionally DIR/val/CLASS/..."


@dataclass(frozen=True)
class FolderSplit:
    """The files of one split, sorted by class then file name; a file's position is its sample id."""

    files: tuple[str, ...]
    labels: tuple[int, ...]


def list_split(split_dir: Path, classes: Sequence[str] | None) -> tuple[FolderSplit, tuple[str, ...]]:
    """The images under ``split_dir/CLASS/``; ``classes`` (the training classes) must cover its folders."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"folder: {split_dir} has no class subfolders; expected the layout {LAYOUT}")
    if classes is None:
        classes = tuple(found)
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise ValueError(
                f"folder: {split_dir} has class folders {extra} that train/ does not have; every class "
                f"needs training images (train/ has {list(classes)})"
            )
    lookup = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        for f in sorted((split_dir / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."):
                files.append(str(f))
                labels.append(lookup[c])
    if not files:
        raise ValueError(f"folder: no {'/'.join(IMAGE_SUFFIXES)} images under {split_dir}/CLASS/")
    return FolderSplit(tuple(files), tuple(labels)), tuple(classes)


def _resample() -> Any:
    from PIL import Image

    return getattr(Image, "Resampling", Image).BILINEAR


def decode_image(path: str, size: tuple[int, int], channels: int, resize: bool) -> torch.Tensor:
    """One image file as float32 (channels, H, W) in [0, 1] at ``size`` = (H, W).

    With ``resize`` off, an image of another size is an error (the size was taken from the first image,
    so a different one means the set is not uniform).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"folder: cannot decode {path} ({exc})") from exc
    h, w = size
    if img.size != (w, h):
        if not resize:
            raise ValueError(
                f"folder: {path} is {img.size[1]}x{img.size[0]} (HxW) but the first training image is {h}x{w}; "
                "set data.image_size (e.g. image_size=32 or [H, W]) to resize every image to one size"
            )
        img = img.resize((w, h), _resample())
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div_(255.0)


class FolderDataset(Dataset):
    """Decodes one image file per item: ``(x, label, sample_id)``, ``sample_id`` being the file's position.

    Holds only file names and settings, so it pickles cheaply into ``DataLoader`` worker processes.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], size: tuple[int, int], channels: int,
                 resize: bool) -> None:
        self.files = tuple(files)
        self.targets = list(labels)
        self.size = size
        self.channels = channels
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return decode_image(self.files[i], self.size, self.channels, self.resize), self.targets[i], int(i)


def _image_size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"image_size: expected an int, 'HxW' or [H, W], got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, Sequence) and len(value) == 1:
        value = (value[0], value[0])
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"image_size: expected a positive int, 'HxW' or [H, W], got {value!r}")
    return int(value[0]), int(value[1])


def _in_memory(value: Any) -> bool | None:
    """``True``/``False``, or ``None`` for auto."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    choices = {"auto": None, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
    if text not in choices:
        raise ValueError(f"in_memory: expected auto, true or false, got {value!r}")
    return choices[text]


def _first_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"folder: cannot decode {path} ({exc})") from exc
    return h, w


def _decode_all(split: FolderSplit, size: tuple[int, int], channels: int, resize: bool, threads: int) -> torch.Tensor:
    x = torch.empty(len(split.files), channels, *size, dtype=torch.float32)

    def one(i: int) -> None:
        x[i] = decode_image(split.files[i], size, channels, resize)

    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow decodes outside the GIL
        list(pool.map(one, range(len(split.files))))
    return x


def load_folder(
    directory: str | os.PathLike,
    image_size: int | Sequence[int] | str | None = None,
    channels: int = 3,
    in_memory: bool | str = "auto",
    memory_budget_mb: float = 2048,
) -> DataBundle:
    """The images of ``directory`` in the ImageFolder layout (see the module docstring).

    ``image_size`` (an int or (H, W)) resizes every image; by default the first training image's size is
    used and every other image must have it. ``in_memory``: ``true`` decodes everything now into tensors,
    ``false`` streams from disk, ``auto`` decodes into memory when the decoded float32 train+val+test
    images take less than ``memory_budget_mb`` MiB. A ``val/`` folder, when present, is the validation
    split. Sample ids are each file's position in its split's sorted file list; streamed splits know
    their labels from the folder names without decoding.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder: no such directory {str(root)!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: 1 (greyscale) or 3 (RGB), got {channels!r}")
    size = _image_size(image_size)
    memory = _in_memory(in_memory)
    for need in ("train", "test"):
        if not (root / need).is_dir():
            raise FileNotFoundError(f"folder: {root} has no {need}/ subfolder; expected the layout {LAYOUT}")
    train, classes = list_split(root / "train", None)
    splits = {"train": train}
    for s in ("val", "test"):
        if (root / s).is_dir():
            splits[s], _ = list_split(root / s, classes)
    resize = size is not None
    if size is None:
        size = _first_size(train.files[0])
    count = sum(len(s.files) for s in splits.values())
    if memory is None:
        if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb: expected a number of MiB >= 0, got {memory_budget_mb!r}")
        memory = count * channels * size[0] * size[1] * 4 < memory_budget_mb * 2**20
    shape = (channels, *size)
    threads = max(1, min(8, os.cpu_count() or 1))
    out: dict[str, Split] = {}
    for s, split in splits.items():
        name = f"{root.name}-{s}"
        labels = torch.tensor(split.labels, dtype=torch.long)
        if memory:
            out[s] = TensorData(x=_decode_all(split, size, channels, resize, threads), y=labels, classes=classes,
                                name=name)
        else:
            ds = FolderDataset(split.files, split.labels, size, channels, resize)
            out[s] = StreamData(dataset=ds, classes=classes, input_shape=shape, labels=labels, name=name)
    return DataBundle(train=out["train"], test=out["test"], val=out.get("val"))
