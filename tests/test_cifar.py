import io
import tarfile

import numpy as np
import pytest
import torch

from kdistill import data
from kdistill.data import cifar
from kdistill.models import build_model, count_parameters


def _batch(labels, offset=0):
    """CIFAR-10 binary records whose pixels encode (label, record, plane) so the layout can be checked."""
    out = bytearray()
    for i, lab in enumerate(labels):
        out.append(lab)
        for plane in range(3):  # R, G, B planes of 1024 bytes, row-major
            out += bytes([(lab * 20 + plane * 5 + (offset + i)) % 256]) * 1024
    return bytes(out)


def _files(per_file=4, test=6):
    files = {f"data_batch_{k}.bin": _batch([(k + i) % 10 for i in range(per_file)], offset=k * 10) for k in range(1, 6)}
    files["test_batch.bin"] = _batch([i % 10 for i in range(test)])
    files["batches.meta.txt"] = b"\n".join(c.encode() for c in cifar.CLASSES)
    return files


def _write_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def fake_archive(tmp_path):
    return _write_archive(tmp_path / "cifar-10-binary.tar.gz", _files())


def test_reads_the_binary_layout(fake_archive):
    b = cifar.load_cifar10(fake_archive, download_ok=False, strict=False)
    assert b.train.x.shape == (20, 3, 32, 32) and b.test.x.shape == (6, 3, 32, 32)
    assert b.train.x.dtype == torch.float32 and b.train.classes == cifar.CLASSES
    assert b.train.y.tolist()[:4] == [1, 2, 3, 4]  # data_batch_1 first, records in order
    # Record 0 of data_batch_1: label 1, offset 10 -> R = 30, G = 35, B = 40 (over 255).
    img = b.train.x[0]
    assert torch.allclose(img[:, 0, 0] * 255, torch.tensor([30.0, 35.0, 40.0]))
    assert torch.all(img[0] == img[0, 0, 0])
    assert b.test.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert 0.0 <= float(b.train.x.min()) and float(b.train.x.max()) <= 1.0


def test_strict_checks_the_official_counts(fake_archive):
    with pytest.raises(FileNotFoundError, match="per class"):
        cifar.load_cifar10(fake_archive, download_ok=False)  # reported among the attempts
    ok = {"y_train": np.repeat(np.arange(10), 5000), "y_test": np.repeat(np.arange(10), 1000)}
    cifar.check_counts(ok, "x")
    bad = dict(ok, y_test=np.repeat(np.arange(10), 999))
    with pytest.raises(ValueError, match="1000 each"):
        cifar.check_counts(bad, "x")


def test_directory_layouts_and_env(tmp_path, monkeypatch):
    files = _files()
    extracted = tmp_path / "ex" / "cifar-10-batches-bin"
    extracted.mkdir(parents=True)
    for name, raw in files.items():
        (extracted / name).write_bytes(raw)
    for path in (extracted, extracted.parent):
        assert len(cifar.load_cifar10(path, download_ok=False, strict=False).train) == 20
    holder = tmp_path / "holder" / "cifar10"
    holder.mkdir(parents=True)
    _write_archive(holder / "cifar-10-binary.tar.gz", files)
    monkeypatch.setenv("KDISTILL_DATA", str(holder.parent))
    assert len(cifar.load_cifar10(download_ok=False, strict=False).test) == 6


def test_bad_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="whole number"):
        cifar.parse_batch(b"\x01" * 3000, "x.bin")
    with pytest.raises(ValueError, match="outside 0..9"):
        cifar.parse_batch(bytes([12]) + bytes(3072), "x.bin")
    files = _files()
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-7]
    bad = _write_archive(tmp_path / "bad.tar.gz", files)
    with pytest.raises(FileNotFoundError, match="whole number") as err:
        cifar.load_cifar10(bad, download_ok=False, strict=False)
    assert "user cache" in str(err.value) and "--data-path" in str(err.value)
    missing = dict(_files())
    del missing["test_batch.bin"]
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        cifar.load_cifar10(_write_archive(tmp_path / "m.tar.gz", missing), download_ok=False, strict=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        cifar.load_cifar10(tmp_path / "nope.tar.gz", download_ok=False)


def test_registered_with_a_5000_image_validation_split(fake_archive, monkeypatch):
    assert data.LOADERS["cifar10"] is cifar.load_cifar10 and data.DEFAULT_VAL_SIZE["cifar10"] == 5000
    monkeypatch.setitem(data.DEFAULT_VAL_SIZE, "cifar10", 5)
    b = data.load("cifar10", path=str(fake_archive), strict=False, download_ok=False)
    assert len(b.train) == 15 and len(b.val) == 5


@pytest.mark.parametrize(
    "spec, shape, params",
    [
        ("caffe_lenet", (1, 28, 28), 431_080),  # 20 and 50 5x5 maps, fc 500: Caffe's MNIST example
        ("cifar_quick", (3, 32, 32), 145_578),  # 32-32-64 5x5 maps, 4x4 after three round-up poolings, fc 64
        ("cifar_mini", (3, 32, 32), 61_546),  # the same without the third convolution
    ],
)
def test_caffe_nets(spec, shape, params):
    model = build_model(spec, shape, 10, seed=0)
    assert count_parameters(model) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_caffe_nets_reject_bad_shapes():
    with pytest.raises(ValueError, match="image input"):
        build_model("cifar_quick", (784,), 10)
    with pytest.raises(ValueError, match="16x16"):
        build_model("caffe_lenet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="widths"):
        build_model("cifar_mini:8", (3, 32, 32), 10)
