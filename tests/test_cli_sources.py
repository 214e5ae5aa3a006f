"""The CLI on a user's own data and models: folder:, npz:, csv: data, py: models, methods by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdistill.cli.app import main

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_shape, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return {"logits": self.head(self.body(x)), "features": self.body(x)}


def make(in_shape, num_classes, width=16):
    return Net(in_shape, num_classes, width)
'''


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 6)):
        for c, name in enumerate(("cat", "dog", "emu")):
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((12, 12, 3)) * 80).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    return tmp_path / "imgs"


def _ok(argv):
    assert main(argv + ["--no-progress"]) == 0, argv
    out = argv[argv.index("--out") + 1]
    with open(f"{out}/results.json") as fh:
        return json.load(fh)


def test_folder_train_then_distill_evaluate_export(image_folder, tmp_path, capsys):
    t, s = str(tmp_path / "t"), str(tmp_path / "s")
    _ok(["train", "--data", f"folder:{image_folder}", "--model", "resnet8", "--epochs", "1", "--batch-size", "12",
         "--augment", "crop2,flip", "--out", t])
    res = _ok(["distill", "--data", f"folder:{image_folder}", "--teacher", f"{t}/model.safetensors", "--student", "cnn:8,16",
               "--method", "kd", "-T", "4", "--epochs", "1", "--batch-size", "12", "--augment", "crop2,flip",
               "--set", "data.in_memory=false", "--out", s])
    assert res["models"]["distilled"]["method"] == "kd"
    rows = res["deployment"]["rows"]
    assert set(rows) == {"teacher", "student"} and rows["student"]["x_smaller"] > 0
    capsys.readouterr()
    assert main(["evaluate", "--model", f"{s}/model.safetensors"]) == 0  # data from the run's own config.yaml
    assert json.loads(capsys.readouterr().out)["count"] == 18
    assert main(["export-onnx", "--model", f"{s}/model.safetensors", "--onnx", f"{s}/m.onnx"]) == 0


def test_npz_and_py_factory_teacher_and_student(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(NETS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    nets = tmp_path / "nets.py"
    t, s = str(tmp_path / "t"), str(tmp_path / "s")
    _ok(["train", "--data", f"npz:{tmp_path}/d.npz", "--model", f"py:{nets}:make,width=32", "--epochs", "2",
         "--batch-size", "32", "--out", t])
    _ok(["distill", "--data", f"npz:{tmp_path}/d.npz", "--teacher", f"{t}/model.safetensors", "--trust-code",
         "--student", f"py:{nets}:make", "--method", "dkd", "--set", "method.beta=2", "--epochs", "2",
         "--batch-size", "32", "--out", s])  # the teacher file's py: spec runs nets.py: opted in
    capsys.readouterr()
    assert main(["evaluate", "--model", f"{t}/model.safetensors", "--trust-code"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40
    assert main(["export-onnx", "--model", f"{s}/model.safetensors", "--onnx", f"{s}/m.onnx", "--trust-code"]) == 0


def test_csv_with_teacher_model_and_weights(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["a,b,c,label"]
    for _ in range(150):
        a, b, c = rng.normal(size=3)
        lines.append(f"{a},{b},{c},{'yes' if a + b > 0 else 'no'}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    t, s = str(tmp_path / "t"), str(tmp_path / "s")
    rt = _ok(["train", "--data", f"csv:{tmp_path}/d.csv", "--model", "mlp:16", "--epochs", "10", "--batch-size", "16",
              "--out", t])
    res = _ok(["distill", "--data", f"csv:{tmp_path}/d.csv", "--teacher-model", "mlp:16", "--teacher-weights",
               f"{t}/model.safetensors", "--student", "mlp:4", "-T", "2", "--alpha", "0.5", "--epochs", "10",
               "--batch-size", "16", "--out", s])
    # The teacher built from the spec carries the saved weights: on the same test split it scores exactly what
    # the saved model scored (a freshly initialised mlp:16 would not give the same NLL).
    saved, loaded = rt["models"]["model"], res["deployment"]["rows"]["teacher"]
    assert loaded["accuracy"] == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert loaded["nll"] == pytest.approx(saved["test_nll"], rel=1e-4)
    # The soft term was trained on, every epoch, and the student learnt the rule (chance ~0.5; 1.0 in one run).
    with open(f"{s}/metrics.jsonl") as fh:
        epochs = [json.loads(line) for line in fh]
    assert len(epochs) == 10 and all(e["loss_kd"] > 0 for e in epochs)
    assert saved["test_accuracy"] >= 0.85 and res["models"]["distilled"]["test_accuracy"] >= 0.85


@pytest.mark.parametrize("extra, match", [
    (["--method", "kdd"], "unknown method 'kdd'"),
    (["--set", "method.alfa=0.5"], "did you mean 'alpha'"),
    (["--method", "fitnet", "--set", "method.student_layers=nope"], "method.student_layers"),
])
def test_bad_method_is_one_clear_error_before_work(extra, match, tmp_path, capsys, image_folder):
    t = tmp_path / "t"
    assert main(["train", "--data", f"folder:{image_folder}", "--model", "resnet8", "--epochs", "1", "--out", str(t),
                 "--no-progress"]) == 0
    out = tmp_path / "X"
    argv = ["distill", "--data", f"folder:{image_folder}", "--teacher", f"{t}/model.safetensors", "--student", "resnet8",
            "--epochs", "1", "--out", str(out), "--no-progress"] + extra
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("kdistill: error:") and "Traceback" not in err
    assert not out.exists()
