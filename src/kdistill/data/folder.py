"""Image folders (the ImageFolder layout) as data sets: ``folder:DIR``.

``DIR/train/CLASS/*.png`` (or any extension torchvision's ``ImageFolder`` reads: ``.jpg``, ``.jpeg``, ``.bmp``,
``.ppm``, ``.pgm``, ``.tif``, ``.tiff``, ``.webp``), ``DIR/test/CLASS/...`` and optionally
``DIR/val/CLASS/...``. Classes are the sorted subfolder names of ``train``. Images are decoded with Pillow
to float32 (C, H, W) in [0, 1] (8-bit pixels / 255, 16-bit greyscale / 65535), RGB or (``channels=1``)
greyscale, at one size for the whole data set. Like torchvision's ``ImageFolder``, symlinked class folders and
subfolders of a class are followed; empty or image-less class folders and dangling symlinks are refused by
name, and image headers are checked (size, ``max_pixels``) before any pixel is decoded.

Small sets are decoded once into memory (the fast path: batches are tensor slices); large ones stay on
disk as :class:`~kdistill.data.dataset.StreamData` whose :class:`FolderDataset` decodes one file per item,
so they can be read by ``DataLoader`` workers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdistill.data.dataset import DataBundle, Split, StreamData, TensorData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""The image extensions read: torchvision's ``IMG_EXTENSIONS``, so a folder lists the same files as ``ImageFolder``."""
SPLITS = ("train", "val", "test")
LAYOUT = "DIR/train/CLASS/*.png (or .jpg, .bmp, .tif, .webp ...), DIR/test/CLASS/... and optionally DIR/val/CLASS/..."
MAX_PIXELS = 2**25
"""Most pixels an image may declare (33.5 million, 5792x5792; ``data.max_pixels``): larger headers are refused
before decoding, so a few-KB file declaring 30000x30000 pixels (a decompression bomb) never fills memory."""
LIMIT_FIX = "shrink the image, or raise data.max_pixels if it is genuine"
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
DECODE_FIX = "the file is corrupt or not the image its extension says: save it again (e.g. as .png), or remove it"


@dataclass(frozen=True)
class FolderSplit:
    """The files of one split, sorted by class then file name; a file's position is its sample id."""

    files: tuple[str, ...]
    labels: tuple[int, ...]


def _dangling(path: Path) -> ValueError:
    return ValueError(f"folder: {path} is a dangling symlink (its target {os.readlink(path)!r} does not exist); "
                      "fix the link or remove it")


def _class_folders(split_dir: Path) -> list[str]:
    """The class folders of a split: its subfolders, symlinked ones followed (as torchvision's ImageFolder);
    a dangling symlink is refused rather than silently dropped."""
    found = []
    for d in sorted(split_dir.iterdir()):
        if d.name.startswith("."):
            continue
        if d.is_symlink() and not d.exists():
            raise _dangling(d)
        if d.is_dir():
            found.append(d.name)
    return found


def _walk(class_dir: Path) -> list[tuple[str, list[str]]]:
    """``(folder, file names)`` under ``class_dir``, subfolders and symlinks followed like ImageFolder's
    ``os.walk(followlinks=True)``, sorted as it sorts them; hidden names skipped, symlink loops refused."""
    out, seen, todo = [], set(), [class_dir]
    while todo:
        d = todo.pop()
        real = os.path.realpath(d)
        if real in seen:
            raise ValueError(f"folder: {d} links back to a folder already read (a symlink loop); remove the link")
        seen.add(real)
        names = [e for e in sorted(os.listdir(d)) if not e.startswith(".")]
        subdirs = [d / n for n in names if (d / n).is_dir()]
        out.append((str(d), [n for n in names if not (d / n).is_dir()]))
        todo.extend(reversed(subdirs))
    return sorted(out)


@functools.lru_cache(maxsize=None)
def pillow_reads(suffix: str) -> bool:
    """Whether this Pillow decodes files of ``suffix`` (WebP needs Pillow built with libwebp)."""
    from PIL import Image, features

    if suffix == ".webp" and not features.check("webp"):
        return False
    return suffix in Image.registered_extensions()


def _class_files(class_dir: Path) -> list[str]:
    """The image files of one class folder, or a ValueError naming the folder when it has none (or naming a
    file whose image format this Pillow cannot decode: refused, never silently dropped)."""
    images, others = [], []
    for folder, names in _walk(class_dir):
        for n in names:
            f = Path(folder) / n
            if f.is_symlink() and not f.exists():
                raise _dangling(f)
            image = f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            if image and not pillow_reads(f.suffix.lower()):
                raise ValueError(f"folder: {f} is a {f.suffix} image, which this Pillow cannot decode (built without "
                                 "that format); convert it (e.g. to .png), or install a Pillow that reads it")
            (images if image else others).append(str(f))
    if images:
        return images
    if not others:
        raise ValueError(f"folder: class folder {class_dir} is empty; put its images in it, or remove the folder")
    shown = ", ".join(Path(o).name for o in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    raise ValueError(f"folder: class folder {class_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images, only {shown}; "
                     "convert them (e.g. to .png) or remove the folder")


def list_split(split_dir: Path, classes: Sequence[str] | None) -> tuple[FolderSplit, tuple[str, ...]]:
    """The images under ``split_dir/CLASS/``; ``classes`` (the training classes) must cover its folders.

    Like torchvision's ``ImageFolder``, symlinked class folders and subfolders of a class are followed; unlike
    it, an empty class folder, one holding no supported image, or a dangling symlink is refused by name.
    """
    found = _class_folders(split_dir)
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
        for f in _class_files(split_dir / c):
            files.append(f)
            labels.append(lookup[c])
    return FolderSplit(tuple(files), tuple(labels)), tuple(classes)


def _resample() -> Any:
    from PIL import Image

    return getattr(Image, "Resampling", Image).BILINEAR


def open_image(path: str, where: str = "folder", max_pixels: int = MAX_PIXELS, limit_fix: str = LIMIT_FIX) -> Any:
    """``path`` opened by Pillow (header only, nothing decoded), refused when it cannot be read or declares more
    than ``max_pixels`` pixels, so a decompression bomb is never decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{where}: {path} declares more pixels than Pillow decodes safely ({exc}); shrink the image "
                         "(a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: cannot decode {path} ({exc}); {DECODE_FIX}") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ValueError(f"{where}: {path} declares {h}x{w} (HxW) = {w * h:,} pixels, more than the {max_pixels:,} "
                         f"allowed (a decompression bomb?); {limit_fix}")
    return img


def _pixels(img: Any, size: tuple[int, int], channels: int) -> torch.Tensor:
    """A decoded Pillow image as float32 (channels, H, W) in [0, 1], resized to ``size`` if it differs: 8-bit
    images divided by 255, 16-bit greyscale (mode ``I;16``, ``I``) by 65535 rather than clipped."""
    from PIL import Image

    h, w = size
    if img.mode in SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float32)
        if img.size != (w, h):
            arr = np.asarray(Image.fromarray(arr).resize((w, h), _resample()), dtype=np.float32)  # mode F
        t = torch.from_numpy(arr.copy()).div_(65535.0).clamp_(0, 1).unsqueeze(0)
        return t.expand(channels, h, w).contiguous()
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), _resample())
    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div_(255.0)


def decode_image(path: str, size: tuple[int, int], channels: int, resize: bool,
                 max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """One image file as float32 (channels, H, W) in [0, 1] at ``size`` = (H, W).

    The header is checked before anything is decoded: at most ``max_pixels`` pixels, and with ``resize`` off
    exactly ``size`` (taken from the first image, so a different one means the set is not uniform).
    """
    with open_image(path, max_pixels=max_pixels) as img:
        h, w = size
        if img.size != (w, h) and not resize:
            raise ValueError(
                f"folder: {path} is {img.size[1]}x{img.size[0]} (HxW) but the first training image is {h}x{w}; "
                "set data.image_size (e.g. image_size=32 or [H, W]) to resize every image to one size"
            )
        try:
            return _pixels(img, size, channels)
        except (OSError, ValueError) as exc:  # truncated or corrupt data past a valid header
            raise ValueError(f"folder: cannot decode {path} ({exc}); {DECODE_FIX}") from exc


class FolderDataset(Dataset):
    """Decodes one image file per item: ``(x, label, sample_id)``, ``sample_id`` being the file's position.

    Holds only file names and settings, so it pickles cheaply into ``DataLoader`` worker processes.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], size: tuple[int, int], channels: int,
                 resize: bool, max_pixels: int = MAX_PIXELS) -> None:
        self.files = tuple(files)
        self.targets = list(labels)
        self.size = size
        self.channels = channels
        self.resize = resize
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = decode_image(self.files[i], self.size, self.channels, self.resize, self.max_pixels)
        return x, self.targets[i], int(i)


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


def _first_size(path: str, max_pixels: int) -> tuple[int, int]:
    with open_image(path, max_pixels=max_pixels) as img:
        w, h = img.size
    return h, w


def _max_pixels(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_pixels: expected a positive number of pixels per image, got {value!r}")
    return value


def _decode_all(split: FolderSplit, size: tuple[int, int], channels: int, resize: bool, threads: int,
                max_pixels: int) -> torch.Tensor:
    x = torch.empty(len(split.files), channels, *size, dtype=torch.float32)

    def one(i: int) -> None:
        x[i] = decode_image(split.files[i], size, channels, resize, max_pixels)

    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow decodes outside the GIL
        list(pool.map(one, range(len(split.files))))
    return x


def load_folder(
    directory: str | os.PathLike,
    image_size: int | Sequence[int] | str | None = None,
    channels: int = 3,
    in_memory: bool | str = "auto",
    memory_budget_mb: float = 2048,
    max_pixels: int = MAX_PIXELS,
) -> DataBundle:
    """The images of ``directory`` in the ImageFolder layout (see the module docstring).

    ``image_size`` (an int or (H, W)) resizes every image; by default the first training image's size is
    used and every other image must have it. ``in_memory``: ``true`` decodes everything now into tensors,
    ``false`` streams from disk, ``auto`` decodes into memory when the decoded float32 train+val+test
    images take less than ``memory_budget_mb`` MiB. A ``val/`` folder, when present, is the validation
    split. Sample ids are each file's position in its split's sorted file list; streamed splits know
    their labels from the folder names without decoding. An image whose header declares more than
    ``max_pixels`` pixels (default :data:`MAX_PIXELS`) is refused before it is decoded.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder: no such directory {str(root)!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: 1 (greyscale) or 3 (RGB), got {channels!r}")
    size = _image_size(image_size)
    memory = _in_memory(in_memory)
    max_pixels = _max_pixels(max_pixels)
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
        size = _first_size(train.files[0], max_pixels)
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
            x = _decode_all(split, size, channels, resize, threads, max_pixels)
            out[s] = TensorData(x=x, y=labels, classes=classes, name=name)
        else:
            ds = FolderDataset(split.files, split.labels, size, channels, resize, max_pixels)
            out[s] = StreamData(dataset=ds, classes=classes, input_shape=shape, labels=labels, name=name)
    return DataBundle(train=out["train"], test=out["test"], val=out.get("val"))
