"""The IDX file format (MNIST, Fashion-MNIST) and the ordered search for its files.

A loader tries its sources in order — an explicit path, ``$KDISTILL_DATA``, the user cache, then
network sources — and when all fail it raises one error listing every attempt and how to supply the
files by hand. Network sources are only reached if nothing local was found.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, name: str = "idx") -> np.ndarray:
    """Decode IDX bytes into an array, checking the magic number and that the size matches the header."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{name}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4).astype(int).tolist()
    dtype = np.dtype(_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{name}: header says {expected} bytes, file has {len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdistill"


@dataclass(frozen=True)
class IdxFile:
    """One file of an IDX data set: its name, expected decoded shape and, when pinned, the raw (decompressed)
    file's md5 and sha256."""

    name: str
    shape: tuple[int, ...]
    raw_md5: str | None = None
    raw_sha256: str | None = None


def find_local(directory: Path, file: IdxFile) -> Path | None:
    """The file under ``directory``, raw or gzipped, if present."""
    for candidate in (directory / file.name, directory / (file.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_checked(path: Path, file: IdxFile) -> tuple[np.ndarray, bytes]:
    """Read and validate one file: shape and, where pinned, content md5 and sha256."""
    raw = read_maybe_gz(path)
    arr = parse_idx(raw, str(path))
    if tuple(arr.shape) != file.shape:
        raise ValueError(f"{path}: expected shape {file.shape}, found {tuple(arr.shape)}")
    if file.raw_md5 and md5(raw) != file.raw_md5:
        raise ValueError(f"{path}: md5 {md5(raw)} does not match the pinned {file.raw_md5}")
    if file.raw_sha256 and hashlib.sha256(raw).hexdigest() != file.raw_sha256:
        digest = hashlib.sha256(raw).hexdigest()
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {file.raw_sha256}")
    return arr, raw


def load_from_dir(directory: Path, files: Sequence[IdxFile]) -> dict[str, np.ndarray]:
    """All ``files`` from one directory, or raise naming what is missing or wrong."""
    out = {}
    for f in files:
        path = find_local(directory, f)
        if path is None:
            raise FileNotFoundError(f"{directory}: no {f.name} or {f.name}.gz")
        out[f.name], _ = load_checked(path, f)
    return out


def save_raw(directory: Path, files: Sequence[IdxFile], arrays: dict[str, bytes]) -> None:
    """Write raw files into the cache atomically (temp file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{f.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(arrays[f.name])
        os.replace(tmp, directory / f.name)


def download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def first_working(sources: Sequence[tuple[str, Callable[[], dict[str, np.ndarray]]]], dataset: str, howto: str):
    """Try each ``(description, loader)`` in order; return the first result or raise listing all attempts."""
    tried = []
    for desc, loader in sources:
        try:
            return loader()
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            tried.append(f"  - {desc}: {type(exc).__name__}: {exc}")
    raise FileNotFoundError(f"could not load {dataset}. Tried, in order:\n" + "\n".join(tried) + "\n" + howto)
