"""data.normalize (issue 26 item 6): applied once to every split, recorded with the model and its ONNX export,
and a teacher trained on other preprocessing refused with the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill import data
from kdistill.cli.app import main
from kdistill.data.dataset import StreamData, TensorData
from kdistill.io import load_model, read_model_meta, save_model

CIFAR_MEAN = [125.307 / 255, 122.950 / 255, 113.865 / 255]
CIFAR_STD = [62.993 / 255, 62.089 / 255, 66.705 / 255]


def _folder(root, n=(12, 4)):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), n):
        for c, name in enumerate(("cat", "dog", "emu")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                a = (rng.random((8, 8, 3)) * 80).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A cnn trained by the CLI on a small image folder with data.normalize=cifar10."""
    root = tmp_path_factory.mktemp("pre")
    imgs = _folder(root / "imgs")
    assert main(["train", "--data", f"folder:{imgs}", "--model", "cnn:4,8", "--epochs", "1", "--batch-size", "12",
                 "--set", "data.normalize=cifar10", "--out", str(root / "t"), "--no-progress"]) == 0
    return imgs, root / "t"


def _channels(values):
    return torch.tensor(values).view(1, -1, 1, 1)


def test_normalize_forms_apply_once_to_every_split_in_memory_and_streamed(tmp_path):
    imgs = _folder(tmp_path / "imgs")
    raw = data.load(f"folder:{imgs}", in_memory=True, val_size=6)
    assert raw.train.preprocessing == {"normalize": "none", "scale": 1 / 255}
    for setting, (mean, std) in {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                                 "CIFAR10": (CIFAR_MEAN, CIFAR_STD),
                                 "mean=0.5,0.4,0.3;std=0.2,0.25,0.5": ([0.5, 0.4, 0.3], [0.2, 0.25, 0.5]),
                                 "mean: 0.5 std: 0.25": ([0.5], [0.25])}.items():
        mem = data.load(f"folder:{imgs}", in_memory=True, val_size=6, normalize=setting)
        disk = data.load(f"folder:{imgs}", in_memory=False, val_size=6, normalize=setting)
        assert isinstance(mem.train, TensorData) and isinstance(disk.train, StreamData)
        for part in ("train", "val", "test"):
            a, b, r = getattr(mem, part), getattr(disk, part), getattr(raw, part)
            want = (r.x - _channels(mean)) / _channels(std)
            assert torch.allclose(a.x, want, atol=1e-6), setting
            streamed = torch.stack([b.dataset[i][0] for i in range(len(b))])
            assert torch.allclose(streamed, want, atol=1e-6), setting
            assert a.preprocessing["normalize"]["mean"] == pytest.approx(mean) and a.preprocessing["scale"] == 1 / 255
    mapping = data.load(f"folder:{imgs}", val_size=0, normalize={"mean": [0.5, 0.4, 0.3], "std": "0.2,0.25,0.5"})
    string = data.load(f"folder:{imgs}", val_size=0, normalize="mean=0.5,0.4,0.3;std=0.2,0.25,0.5")
    assert torch.equal(mapping.train.x, string.train.x)


@pytest.mark.parametrize("setting, channels, match", [
    ("imagenett", 3, r"data.normalize: unknown setting 'imagenett' \(did you mean 'imagenet'\?\)"),
    ("imagenet", 1, r"imagenet has 3 channels' mean/std but imgs-train inputs have 1 \(shape \[1, 8, 8\]\)"),
    ({"mean": [0.5], "std": [0]}, 3, r"data.normalize.std: every std must be > 0"),
    ({"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}, 3,
     r"not on the \[0, 1\] scale.*divide 0-255 values by 255"),
    ({"mean": [0.5, 0.5]}, 3, r"give both mean and std"),
])
def test_bad_normalize_is_refused_naming_the_fix(tmp_path, setting, channels, match):
    imgs = _folder(tmp_path / "imgs", n=(2, 1))
    with pytest.raises(ValueError, match=match):
        data.load(f"folder:{imgs}", channels=channels, val_size=0, normalize=setting)


def test_cli_refuses_a_bad_normalize_before_writing(tmp_path, capsys):
    imgs = _folder(tmp_path / "imgs", n=(2, 1))
    assert main(["train", "--data", f"folder:{imgs}", "--model", "mlp:8", "--set", "data.normalize=cifar100",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.normalize: unknown setting 'cifar100' (did you mean 'cifar10'?)" in err
    assert not (tmp_path / "r").exists()


def test_model_and_onnx_export_record_classes_and_preprocessing(teacher_run, tmp_path, capsys):
    imgs, run = teacher_run
    assert "normalize: cifar10" in (run / "config.yaml").read_text()
    meta = read_model_meta(run / "model.safetensors")
    assert meta["class_names"] == ["cat", "dog", "emu"]
    pre = meta["preprocessing"]
    assert pre["normalize"]["name"] == "cifar10" and pre["normalize"]["mean"] == pytest.approx(CIFAR_MEAN)
    assert pre["normalize"]["std"] == pytest.approx(CIFAR_STD)
    assert pre["scale"] == pytest.approx(1 / 255) and pre["input_shape"] == [3, 8, 8]
    assert pre["input_dtype"] == "float32"
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from kdistill.teachers.onnx_model import read_onnx_metadata

    assert main(["export-onnx", "--model", str(run / "model.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["class_names"] == ["cat", "dog", "emu"] and props["input_shape"] == [3, 8, 8]
    assert props["preprocessing"] == pre and read_onnx_metadata(tmp_path / "m.onnx") == props


def test_teacher_with_other_preprocessing_is_refused_unrecorded_one_kept(teacher_run, tmp_path, capsys):
    imgs, run = teacher_run
    student = ["distill", "--data", f"folder:{imgs}", "--student", "mlp:8", "--epochs", "1", "--batch-size", "12",
               "--no-progress"]
    assert main([*student, "--teacher", str(run / "model.safetensors"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "a").exists()
    assert ("model.safetensors was trained on inputs normalised with cifar10 (mean [0.4914, 0.4822, 0.4465]" in err
            and "this run's data (imgs-train) uses none" in err and "--set data.normalize='cifar10'" in err)
    assert main([*student, "--teacher", str(run / "model.safetensors"), "--set", "data.normalize=cifar10",
                 "--out", str(tmp_path / "b")]) == 0
    meta = read_model_meta(run / "model.safetensors")
    bare = tmp_path / "bare.safetensors"  # a teacher saved without a record (older kdistill, or the API)
    save_model(bare, load_model(run / "model.safetensors"), in_shape=meta["in_shape"], num_classes=3)
    assert "preprocessing" not in read_model_meta(bare)
    assert main([*student, "--teacher", str(bare), "--out", str(tmp_path / "c")]) == 0


def test_evaluate_on_named_data_keeps_the_models_normalisation(teacher_run, capsys):
    imgs, run = teacher_run
    model = str(run / "model.safetensors")
    results = []
    for extra in ([], ["--data", f"folder:{imgs}"]):  # the run's own data, then the same data named by --data
        capsys.readouterr()
        assert main(["evaluate", "--model", model, *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["nll"] == pytest.approx(results[0]["nll"], rel=1e-6)
