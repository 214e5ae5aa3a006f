"""CIFAR-100 from the official *binary* release, as in-memory float tensors (N, 3, 32, 32) in [0, 1].

The layout: ``cifar-100-binary/train.bin`` (50,000 records) and ``test.bin`` (10,000), each record 3,074
bytes (one coarse-label byte, one fine-label byte, then the red, green and blue 32x32 planes, row-major),
with the class names in ``fine_label_names.txt`` (100) and ``coarse_label_names.txt`` (20). Sources are
searched as for CIFAR-10 (see :mod:`kdistill.data.cifar`), and a local copy is validated by its content:
record sizes and, unless ``strict=False``, 500 training and 100 test images of every fine class.
"""

from __future__ import annotations

import os

import numpy as np

from kdistill.data.cifar import Arrays, Release, check_per_class, find_release, to_bundle
from kdistill.data.dataset import DataBundle

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"  # of the official archive at CIFAR100_URL
# md5 as published with the data set; no sha256 is pinned: none could be verified against the official archive here.
ARCHIVE_NAME = "cifar-100-binary.tar.gz"
FOLDER = "cifar-100-binary"
TRAIN_FILE, TEST_FILE = "train.bin", "test.bin"
FINE_NAMES, COARSE_NAMES = "fine_label_names.txt", "coarse_label_names.txt"
RECORD_BYTES = 2 + 3 * 32 * 32
FINE_CLASSES, COARSE_CLASSES = 100, 20
TRAIN_PER_CLASS, TEST_PER_CLASS = 500, 100
LABELS = ("fine", "coarse")


def parse_names(raw: bytes, name: str, expected: int, strict: bool) -> np.ndarray:
    """One label-name file: a name per line (blank lines ignored)."""
    names = [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not names or (strict and len(names) != expected):
        raise ValueError(f"{name}: {len(names)} class names, expected {expected}")
    return np.array(names, dtype=str)


def parse_records(raw: bytes, name: str, fine: int, coarse: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``.bin`` file -> (uint8 images (N, 3, 32, 32), fine labels, coarse labels); raise if malformed."""
    if not raw or len(raw) % RECORD_BYTES:
        raise ValueError(f"{name}: {len(raw)} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-100 records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    coarse_y, fine_y = records[:, 0].astype(np.int64), records[:, 1].astype(np.int64)
    if fine_y.max() >= fine or coarse_y.max() >= coarse:
        raise ValueError(
            f"{name}: labels up to fine {int(fine_y.max())} / coarse {int(coarse_y.max())}, outside the "
            f"{fine} fine and {coarse} coarse classes (not a CIFAR-100 binary file)"
        )
    return records[:, 2:].reshape(-1, 3, 32, 32), fine_y, coarse_y


def _assemble(raws: dict[str, bytes], origin: str, strict: bool) -> Arrays:
    missing = [f for f in (TRAIN_FILE, TEST_FILE, FINE_NAMES, COARSE_NAMES) if f not in raws]
    if missing:
        raise FileNotFoundError(f"{origin}: missing {missing}")
    fine = parse_names(raws[FINE_NAMES], f"{origin}/{FINE_NAMES}", FINE_CLASSES, strict)
    coarse = parse_names(raws[COARSE_NAMES], f"{origin}/{COARSE_NAMES}", COARSE_CLASSES, strict)
    arrays: Arrays = {"fine_names": fine, "coarse_names": coarse}
    for split, f in (("train", TRAIN_FILE), ("test", TEST_FILE)):
        x, y, c = parse_records(raws[f], f"{origin}/{f}", len(fine), len(coarse))
        arrays.update({f"x_{split}": x, f"fine_{split}": y, f"coarse_{split}": c})
    if strict:
        check_per_class(arrays, origin, FINE_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, key="fine")
    return arrays


CIFAR100 = Release(
    title="CIFAR-100", archive=ARCHIVE_NAME, folder=FOLDER, members=(TRAIN_FILE, TEST_FILE, FINE_NAMES, COARSE_NAMES),
    marker=TEST_FILE, url=CIFAR100_URL, md5=CIFAR100_MD5, cache="cifar100", aliases=("cifar100", "cifar-100"),
    assemble=_assemble,
)


def load_cifar100(
    path: str | os.PathLike | None = None,
    label: str = "fine",
    download_ok: bool = True,
    strict: bool = True,
) -> DataBundle:
    """CIFAR-100: 50,000 training and 10,000 test images, (3, 32, 32) floats in [0, 1].

    ``label="fine"`` gives the 100 classes, ``"coarse"`` the 20 superclasses (names from the archive's
    label-name files). ``strict=False`` skips the count checks (for hand-made subsets in the official
    layout).
    """
    if label not in LABELS:
        raise ValueError(f"label: 'fine' (100 classes) or 'coarse' (20 superclasses), got {label!r}")
    arrays = find_release(CIFAR100, path, download_ok, strict)
    names = tuple(str(n) for n in arrays[f"{label}_names"].tolist())
    return to_bundle(arrays, classes=names, name=f"cifar100-{label}", label_key=label)
