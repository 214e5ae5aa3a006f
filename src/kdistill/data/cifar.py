"""CIFAR-10 from the official *binary* release, as in-memory float tensors (N, 3, 32, 32) in [0, 1].

The binary layout: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``, each a run of
10,000 records of 3,073 bytes (one label byte, then the 1,024 red, 1,024 green and 1,024 blue pixels,
row-major). Sources are tried in order: an explicit ``path``, ``$KDISTILL_DATA`` (each may be the
``.tar.gz`` itself, a directory holding it, or the extracted ``cifar-10-batches-bin`` folder or its
parent, directly or under ``cifar10/``), the user cache, and last the official download (md5-checked).

A local archive is validated by what it holds (record sizes, 50,000 + 10,000 images, 5,000 and 1,000 per
class) rather than by a checksum, since re-packed copies of the same images have other checksums.
The source search (:class:`Release`, :func:`find_release`) is shared with CIFAR-100 (``cifar100.py``).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdistill.data.dataset import DataBundle, TensorData
from kdistill.data.idx import download, first_working, user_cache_dir

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # of the official archive at CIFAR10_URL
# md5 as published with the data set; no sha256 is pinned: none could be verified against the official archive here.
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
BATCH_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
RECORD_BYTES = 1 + 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS, TEST_PER_CLASS = 5000, 1000

Arrays = dict[str, np.ndarray]


def parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``.bin`` batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)); raise on a malformed file."""
    if not raw or len(raw) % RECORD_BYTES:
        raise ValueError(f"{name}: {len(raw)} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{name}: label {int(labels.max())} outside 0..9 (not a CIFAR-10 binary batch)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _assemble(raws: dict[str, bytes], origin: str, strict: bool) -> Arrays:
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if f not in raws]
    if missing:
        raise FileNotFoundError(f"{origin}: missing {missing}")
    train = [parse_batch(raws[f], f"{origin}/{f}") for f in TRAIN_FILES]
    x_test, y_test = parse_batch(raws[TEST_FILE], f"{origin}/{TEST_FILE}")
    arrays = {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }
    if strict:
        check_counts(arrays, origin)
    return arrays


def check_counts(arrays: Arrays, origin: str) -> None:
    """The official split: 5,000 training and 1,000 test images of each of the ten classes."""
    check_per_class(arrays, origin, len(CLASSES), TRAIN_PER_CLASS, TEST_PER_CLASS)


def check_per_class(arrays: Arrays, origin: str, classes: int, train_per_class: int, test_per_class: int,
                    key: str = "y") -> None:
    """Raise unless ``arrays[key_train]``/``[key_test]`` hold exactly that many images of every class."""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        counts = np.bincount(arrays[f"{key}_{split}"], minlength=classes)
        if len(counts) != classes or (counts != per_class).any():
            raise ValueError(
                f"{origin}: {split} split has {counts.tolist()} images per class, expected {per_class} each "
                "(a truncated or different data set)"
            )


@dataclass(frozen=True)
class Release:
    """Where one binary CIFAR release lives and how its files become arrays.

    ``assemble(raws, origin, strict)`` turns the bytes of the ``members`` found (keyed by base name) into
    arrays; ``marker`` is the member whose presence shows that a directory holds the extracted release.
    """

    title: str
    archive: str
    folder: str
    members: tuple[str, ...]
    marker: str
    url: str
    md5: str
    cache: str
    aliases: tuple[str, ...]
    assemble: Callable[[dict[str, bytes], str, bool], Arrays]


CIFAR10 = Release(
    title="CIFAR-10", archive=ARCHIVE_NAME, folder=BATCH_DIR, members=(*TRAIN_FILES, TEST_FILE), marker=TEST_FILE,
    url=CIFAR10_URL, md5=CIFAR10_MD5, cache="cifar10", aliases=("cifar10", "cifar-10"), assemble=_assemble,
)


def read_archive(path: Path, strict: bool = True, release: Release = CIFAR10) -> Arrays:
    """The release's files inside its ``.tar.gz`` (read in memory, nothing extracted to disk)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    wanted = set(release.members)
    raws: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        raws[base] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable tar archive ({exc})") from exc
    return release.assemble(raws, str(path), strict)


def read_directory(directory: Path, strict: bool = True, release: Release = CIFAR10) -> Arrays:
    """The release's files from its extracted folder (``cifar-10-batches-bin`` for CIFAR-10)."""
    raws = {f: (directory / f).read_bytes() for f in release.members if (directory / f).is_file()}
    return release.assemble(raws, str(directory), strict)


def _local_sources(base: str | os.PathLike, strict: bool,
                   release: Release = CIFAR10) -> list[tuple[str, Callable[[], Arrays]]]:
    """Ways ``base`` (a file or a directory) may hold the release, most specific first; only existing ones."""
    base = Path(base)
    if not base.is_dir():  # a file, or a path that does not exist (reported as such by the archive reader)
        return [(f"archive {base}", lambda: read_archive(base, strict, release))]
    candidates: list[tuple[str, Path]] = []
    for d in (base, *(base / a for a in release.aliases)):
        candidates += [("archive", d / release.archive), ("directory", d / release.folder), ("directory", d)]
    found = [
        (kind, p) for kind, p in candidates if (p.is_file() if kind == "archive" else (p / release.marker).is_file())
    ]
    if not found:
        return [(f"directory {base}", lambda: read_directory(base, strict, release))]
    return [
        (
            f"{kind} {p}",
            (lambda p=p: read_archive(p, strict, release)) if kind == "archive"
            else (lambda p=p: read_directory(p, strict, release)),
        )
        for kind, p in found
    ]


def _download(cache: Path, strict: bool, release: Release = CIFAR10) -> Callable[[], Arrays]:
    def load() -> Arrays:
        target = cache / release.archive
        part = cache / f"{release.archive}.part"
        download(release.url, part, timeout=60.0)
        digest = hashlib.md5(part.read_bytes()).hexdigest()
        if digest != release.md5:
            part.unlink()
            raise ValueError(f"downloaded archive md5 {digest} != official {release.md5}")
        arrays = read_archive(part, strict, release)
        os.replace(part, target)
        return arrays

    return load


def find_release(release: Release, path: str | os.PathLike | None, download_ok: bool, strict: bool) -> Arrays:
    """The release's arrays from the first source that works: ``path``, ``$KDISTILL_DATA``, the user
    cache, then (if ``download_ok``) the official download; else one error listing every attempt."""
    cache = user_cache_dir() / release.cache
    sources: list[tuple[str, Callable[[], Arrays]]] = []
    for base in (path, os.environ.get("KDISTILL_DATA")):
        if base:
            sources += _local_sources(base, strict, release)
    sources.append((f"user cache {cache}", lambda: read_archive(cache / release.archive, strict, release)))
    if download_ok:
        sources.append((f"official download {release.url}", _download(cache, strict, release)))
    howto = (
        f"Pass the binary release ({release.archive}, or its extracted {release.folder} folder) with --data-path "
        f"or KDISTILL_DATA, or put {release.archive} in {cache}. It is at {release.url}."
    )
    return first_working(sources, release.title, howto)


def to_bundle(arrays: Arrays, classes: tuple[str, ...] = CLASSES, name: str = "cifar10",
              label_key: str = "y") -> DataBundle:
    """uint8 arrays -> float tensors in [0, 1] (no normalisation: that is the experiment's choice)."""

    def split(x: np.ndarray, y: np.ndarray, part: str) -> TensorData:
        images = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
        return TensorData(x=images, y=torch.from_numpy(y.astype(np.int64)), classes=classes, name=f"{name}-{part}")

    return DataBundle(
        train=split(arrays["x_train"], arrays[f"{label_key}_train"], "train"),
        test=split(arrays["x_test"], arrays[f"{label_key}_test"], "test"),
    )


def load_cifar10(path: str | os.PathLike | None = None, download_ok: bool = True, strict: bool = True) -> DataBundle:
    """CIFAR-10: 50,000 training and 10,000 test images, (3, 32, 32) floats in [0, 1], classes in order.

    ``strict=False`` skips the per-class count check (for hand-made subsets in the official layout).
    """
    return to_bundle(find_release(CIFAR10, path, download_ok, strict))
