import gzip

import numpy as np
import pytest
import torch

from kdistill import data
from kdistill.data import idx as idx_mod
from kdistill.data.dataset import UNLABELLED, TensorData
from kdistill.data.mnist import MNIST_FILES, load_mnist


def _labels(n=100, classes=10):
    y = torch.arange(n) % classes
    return TensorData(x=torch.randn(n, 1, 4, 4), y=y, classes=tuple(map(str, range(classes))), name="toy")


def test_validation_split_is_stratified_disjoint_and_seeded():
    d = _labels(1000)
    train, val = data.split_validation(d, 200, seed=3)
    assert len(val) == 200 and len(train) == 800
    assert set(train.index.tolist()).isdisjoint(val.index.tolist())
    assert torch.bincount(val.y).tolist() == [20] * 10
    _, val2 = data.split_validation(d, 200, seed=3)
    _, val3 = data.split_validation(d, 200, seed=4)
    assert torch.equal(val.index, val2.index) and not torch.equal(val.index, val3.index)
    with pytest.raises(ValueError, match="val_size"):
        data.split_validation(d, 1000)


def test_transfer_filters_keep_sample_ids():
    d = _labels(100)
    no3 = data.omit_classes(d, [3])
    assert 3 not in no3.y.tolist() and len(no3) == 90
    assert torch.equal(d.y[no3.index], no3.y)  # ids point back at the original rows
    only78 = data.keep_classes(d, [7, 8])
    assert set(only78.y.tolist()) == {7, 8} and len(only78) == 20
    frac = data.stratified_fraction(d, 0.3, seed=0)
    assert torch.bincount(frac.y).tolist() == [3] * 10
    unl = data.drop_labels(d)
    assert (unl.y == UNLABELLED).all() and unl.has_unlabelled
    with pytest.raises(ValueError, match="omit_classes"):
        data.omit_classes(d, [10])
    with pytest.raises(ValueError, match="fraction"):
        data.stratified_fraction(d, 0.0)


def test_jitter_translates_each_image_within_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # a single bright pixel in the centre
    out = data.jitter(x, 2, g)
    assert out.shape == x.shape
    pos = out.view(64, -1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.sum().item() == 64  # nothing falls off the edge for a centred pixel
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # offsets differ per image
    assert torch.equal(data.jitter(x, 0), x)
    # same generator seed -> same offsets
    assert torch.equal(data.jitter(x, 2, torch.Generator().manual_seed(1)), data.jitter(x, 2, torch.Generator().manual_seed(1)))


def _write_fake_mnist(directory, gz=False):
    rng = np.random.default_rng(0)
    for f in MNIST_FILES:
        n = f.shape[0]
        if len(f.shape) == 3:
            header = bytes([0, 0, 8, 3]) + np.array(f.shape, ">i4").tobytes()
            payload = rng.integers(0, 256, size=f.shape, dtype=np.uint8).tobytes()
        else:
            header = bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes()
            payload = (np.arange(n) % 10).astype(np.uint8).tobytes()
        raw = header + payload
        path = directory / (f.name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_parsing_checks_header_and_size():
    raw = bytes([0, 0, 8, 2]) + np.array([2, 3], ">i4").tobytes() + bytes(range(6))
    assert idx_mod.parse_idx(raw).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="truncated"):
        idx_mod.parse_idx(raw[:-1])
    with pytest.raises(ValueError, match="magic"):
        idx_mod.parse_idx(b"\x01\x02\x03\x04")


def test_mnist_local_path_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    _write_fake_mnist(tmp_path, gz=True)
    # Right shapes, wrong content: the pinned md5 rejects it, and with downloads off the error lists every source.
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(path=tmp_path, download_ok=False)
    msg = str(err.value)
    assert "md5" in msg and "user cache" in msg and "KDISTILL_DATA" in msg


def test_mnist_loader_reads_files_when_checksums_match(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_fake_mnist(tmp_path)
    pinned = [idx_mod.IdxFile(f.name, f.shape) for f in MNIST_FILES]  # no md5 pin for synthetic files
    monkeypatch.setattr("kdistill.data.mnist.MNIST_FILES", tuple(pinned))
    bundle = load_mnist(path=tmp_path, download_ok=False)
    assert bundle.train.x.shape == (60000, 1, 28, 28) and bundle.test.x.shape == (10000, 1, 28, 28)
    assert bundle.train.x.min() >= 0 and bundle.train.x.max() <= 1
    assert bundle.train.y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_loaders_and_registry(digits):
    assert digits.input_shape == (1, 8, 8) and digits.val is not None
    total = len(digits.train) + len(digits.val) + len(digits.test)
    assert total == 1797
    syn = data.load("synthetic", samples=2000, features=20, classes=5, class_sep=1.0, informative=0.5, seed=1)
    assert syn.input_shape == (20,) and syn.train.num_classes == 5
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="informative"):
        data.load("synthetic", informative=0.0)


def test_jittered_copies_have_unique_ids_and_keep_the_original():
    d = _labels(50)
    d = TensorData(x=torch.rand(50, 1, 6, 6), y=d.y, classes=d.classes, name="toy")
    sub = data.omit_classes(d, [3])  # non-contiguous ids
    big = data.jittered_copies(sub, 3, 1, seed=0)
    assert len(big) == 3 * len(sub) and len(torch.unique(big.index)) == len(big)
    assert torch.equal(big.x[: len(sub)], sub.x) and torch.equal(big.y, sub.y.repeat(3))
    assert not torch.equal(big.x[len(sub):2 * len(sub)], sub.x)
    assert torch.equal(data.jittered_copies(sub, 3, 1, seed=0).x, big.x)
    with pytest.raises(ValueError, match="copies"):
        data.jittered_copies(sub, 0, 1)
