import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kdistill import data
from kdistill.teachers.logits_files import load_logits, logits_teacher, save_logits
from kdistill.cli.app import main
from kdistill.models import build_model
from kdistill.teachers.base import ModuleTeacher
from kdistill.engine import TrainConfig, fit

CFG = dict(epochs=3, batch_size=64, lr=0.1, seed=3, checkpoint=False)
KD = {"name": "kd", "temperature": 4.0, "alpha": 1.0}


@pytest.fixture(scope="module")
def teacher_net(digits):
    torch.set_num_threads(2)
    return fit(build_model("mlp:48", digits.input_shape, 10, seed=0), digits.train,
               TrainConfig(epochs=4, batch_size=64, lr=0.1), progress=False).model


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_logits_file_roundtrip_keeps_rows_aligned_by_id(digits, teacher_net, tmp_path, suffix):
    logits = ModuleTeacher(teacher_net).predict(digits.train)
    path = save_logits(tmp_path / f"t{suffix}", logits, digits.train.index, data=digits.train.name)
    saved = load_logits(path)
    assert torch.equal(saved.logits, logits)
    if suffix == ".safetensors":
        assert torch.equal(saved.ids, digits.train.index) and saved.meta["data"] == digits.train.name
    # Ids, not positions: a shuffled subset of the transfer set finds its own rows.
    sub = digits.train.subset(torch.randperm(len(digits.train))[:50])
    teacher = logits_teacher(path, digits.train if suffix == ".npy" else sub)
    assert torch.allclose(teacher.logits(None, sub.index), ModuleTeacher(teacher_net).logits(sub.x), atol=1e-6)


def test_student_from_saved_logits_equals_student_from_live_module(digits, teacher_net, tmp_path):
    live = fit(build_model("mlp:32", digits.input_shape, 10, seed=3), digits.train, TrainConfig(**CFG),
               teacher=teacher_net, method=KD, progress=False).model
    path = save_logits(tmp_path / "t.safetensors", ModuleTeacher(teacher_net).predict(digits.train),
                       digits.train.index, data=digits.train.name)
    unlabelled = data.drop_labels(digits.train)  # alpha = 1: the labels are never needed
    from_file = fit(build_model("mlp:32", digits.input_shape, 10, seed=3), unlabelled, TrainConfig(**CFG),
                    teacher=logits_teacher(path, unlabelled), method=KD, progress=False).model
    x = digits.test.x
    assert torch.allclose(live(x), from_file(x), atol=1e-5)
    # A different teacher would give a different student: the comparison can fail.
    other = fit(build_model("mlp:32", digits.input_shape, 10, seed=3), digits.train, TrainConfig(**CFG),
                teacher=build_model("mlp:48", digits.input_shape, 10, seed=1), method=KD, progress=False).model
    assert not torch.allclose(live(x), other(x), atol=1e-3)


def test_mismatched_files_are_clear_errors(digits, tmp_path):
    train = digits.train
    good = torch.randn(len(train), 10)
    with pytest.raises(ValueError, match="rows"):
        np.save(tmp_path / "short.npy", good[:-1].numpy())
        logits_teacher(tmp_path / "short.npy", train)
    with pytest.raises(ValueError, match="classes"):
        logits_teacher(save_logits(tmp_path / "c.safetensors", torch.randn(len(train), 9), train.index), train)
    with pytest.raises(ValueError, match="dtype"):
        np.save(tmp_path / "int.npy", np.zeros((len(train), 10), dtype=np.int64))
        logits_teacher(tmp_path / "int.npy", train)
    with pytest.raises(ValueError, match="dtype"):
        save_file({"logits": torch.zeros(len(train), 10, dtype=torch.int32), "ids": train.index},
                  str(tmp_path / "int.safetensors"))
        logits_teacher(tmp_path / "int.safetensors", train)
    with pytest.raises(ValueError, match="no row"):
        logits_teacher(save_logits(tmp_path / "part.safetensors", good[:100], train.index[:100]), train)
    with pytest.raises(ValueError, match="written for"):
        logits_teacher(save_logits(tmp_path / "test.safetensors", torch.randn(len(digits.test), 10),
                                   digits.test.index, data=digits.test.name), train.subset(torch.arange(10)))
    bad = good.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        logits_teacher(save_logits(tmp_path / "nan.npy", bad), train)
    with pytest.raises(ValueError, match="end in"):
        save_logits(tmp_path / "t.pt", good)
    with pytest.raises(FileNotFoundError):
        load_logits(tmp_path / "absent.npy")


def test_onnx_teacher_matches_module(digits, teacher_net, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdistill.teachers.onnx_model import OnnxTeacher, export_onnx

    path = export_onnx(teacher_net, tmp_path / "t.onnx", digits.input_shape)
    onnx = OnnxTeacher(path)
    onnx.check(digits.train)
    assert torch.allclose(onnx.predict(digits.test), ModuleTeacher(teacher_net).predict(digits.test), atol=1e-4)
    student = fit(build_model("mlp:32", digits.input_shape, 10, seed=3), digits.train, TrainConfig(**{**CFG, "jitter": 1}),
                  teacher=onnx, method=KD, test=digits.test, progress=False)  # live: it sees the jittered batches
    assert student.test["accuracy"] > 0.7
    nine = data.TensorData(digits.train.x, digits.train.y % 9, tuple(str(i) for i in range(9)))
    with pytest.raises(ValueError, match="classes"):
        onnx.check(nine)


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_predict_then_distill_from_logits_onnx_and_weights(tmp_path, capsys):
    common = ["--data", "digits", "--no-progress", "--epochs", "3", "--lr", "0.1", "--seed", "5",
              "--set", "train.batch_size=64"]
    assert main(["train", "--model", "mlp:48", "--out", str(tmp_path / "t"), *common]) == 0
    weights = tmp_path / "t" / "model.safetensors"
    capsys.readouterr()
    assert main(["predict", "--model", str(weights), "--data", "digits", "--save-logits", str(tmp_path / "l.safetensors")]) == 0
    info = _last_json(capsys)
    assert info["num_classes"] == 10 and info["data"] == "digits-train"
    student = ["distill", "--model", "mlp:32", "-T", "4", *common]
    assert main([*student, "--teacher", str(weights), "--out", str(tmp_path / "live")]) == 0
    live = _last_json(capsys)
    assert main([*student, "--teacher-logits", str(tmp_path / "l.safetensors"), "--unlabelled",
                 "--out", str(tmp_path / "file")]) == 0
    from_file = _last_json(capsys)
    assert from_file["test_errors"] == live["test_errors"]
    a, b = load_file(str(tmp_path / "live" / "model.safetensors")), load_file(str(tmp_path / "file" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    if importlib.util.find_spec("onnxruntime"):  # the ONNX leg only where onnxruntime is installed
        assert main(["export-onnx", "--model", str(weights), "--onnx", str(tmp_path / "t.onnx")]) == 0
        assert main([*student, "--teacher-onnx", str(tmp_path / "t.onnx"), "--out", str(tmp_path / "onnx")]) == 0
        assert abs(_last_json(capsys)["test_errors"] - live["test_errors"]) <= 3


def test_cli_ensemble_of_mixed_teacher_sources_equals_ensemble_of_modules(tmp_path, capsys):
    common = ["--data", "digits", "--no-progress", "--epochs", "2", "--lr", "0.1", "--set", "train.batch_size=64"]
    for seed in (1, 2):
        assert main(["train", "--model", "mlp:24", "--seed", str(seed), "--out", str(tmp_path / f"t{seed}"), *common]) == 0
    t1, t2 = (str(tmp_path / f"t{seed}" / "model.safetensors") for seed in (1, 2))
    assert main(["predict", "--model", t2, "--data", "digits", "--save-logits", str(tmp_path / "l2.npy")]) == 0
    student = ["distill", "--model", "mlp:16", "-T", "3", "--ensemble-mean", "geometric", "--seed", "0", *common]
    assert main([*student, "--teacher", t1, "--teacher", t2, "--out", str(tmp_path / "mods")]) == 0
    assert main([*student, "--teacher", t1, "--teacher-logits", str(tmp_path / "l2.npy"), "--out", str(tmp_path / "mixed")]) == 0
    a, b = load_file(str(tmp_path / "mods" / "model.safetensors")), load_file(str(tmp_path / "mixed" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert main([*student, "--teacher", t1, "--out", str(tmp_path / "one")]) == 2  # a mean of one teacher
    assert "ensemble_mean" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    ([], "teacher"),
    (["--teacher-logits", "absent.npy"], "absent.npy"),
    (["--teacher-logits", "WRONGSPLIT"], "written for"),
    (["--teacher-logits", "SHORT"], "rows"),
    (["--teacher-logits", "GOOD", "--teacher-logits", "SHORT"], "rows"),
    (["--teacher-logits", "WRONGSPLIT", "--unlabelled", "--alpha", "0.5"], "alpha"),
    (["--teacher-logits", "GOOD", "--fraction", "1.5"], "fraction"),
    (["--teacher-logits", "GOOD", "--jitter", "1"], "jitter"),
])
def test_cli_distill_bad_teacher_is_clear_error_before_work(extra, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle = data.load("digits")
    save_logits(tmp_path / "wrong.safetensors", torch.randn(len(bundle.test), 10), bundle.test.index, data=bundle.test.name)
    save_logits(tmp_path / "good.safetensors", torch.randn(len(bundle.train), 10), bundle.train.index, data=bundle.train.name)
    np.save(tmp_path / "short.npy", np.zeros((5, 10), dtype=np.float32))
    files = {"WRONGSPLIT": "wrong.safetensors", "SHORT": "short.npy", "GOOD": "good.safetensors"}
    extra = [files.get(e, e) for e in extra]
    assert main(["distill", "--data", "digits", "--model", "mlp:8", "--out", "X", *extra]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "X").exists()
