"""A catalogue of bad inputs: each one is refused before any work with one line naming the field or file.

CLI cases assert exit code 2, exactly one stderr line ``kdistill: error: ...`` containing the field or file,
no traceback, and nothing left in ``--out``; API cases assert a ValueError (or FileNotFoundError) naming
the field. Everything runs on scikit-learn digits and tiny files written here, on one thread.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import data
from kdistill.cli.app import main

T = "train --data digits --model mlp:8 --epochs 1 --no-progress"
D = "distill --data digits --model mlp:8 --teacher {teacher} --epochs 1 --no-progress"


# ----------------------------------------------------------------------------------------------- files

NETS = """
import torch
from torch import nn


class Diverging(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.lin = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x):
        out = self.lin(x.flatten(1))
        return out * float("nan") if self.training else out


def diverging(in_shape, num_classes):
    return Diverging(in_shape, num_classes)
"""


def _npz(path: Path, x_train, y_train, x_test=None, y_test=None, **extra) -> str:
    x_test = x_train[:6] if x_test is None else x_test
    y_test = y_train[:6] if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return str(path)


def _header_file(path: Path, header: dict, body: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file the catalogue feeds the CLI: a real teacher run, broken weights, logits, data, configs."""
    from kdistill.teachers.logits_files import save_logits
    from kdistill.engine.evaluate import predict_split
    from kdistill.io import load_model, save_model
    from kdistill.models import build_model

    root = tmp_path_factory.mktemp("bad")
    f: dict[str, str] = {"root": str(root)}
    torch.set_num_threads(1)
    run = root / "finished_run"
    assert main(["train", "--data", "digits", "--model", "mlp:16", "--epochs", "1", "--out", str(run),
                 "--no-progress"]) == 0
    f["run"] = str(run)
    f["teacher"] = str(run / "model.safetensors")
    good = (run / "model.safetensors").read_bytes()
    unfinished = root / "unfinished_run"
    unfinished.mkdir()
    for name in ("config.yaml", "checkpoint.safetensors"):
        shutil.copy(run / name, unfinished / name)
    f["unfinished"] = str(unfinished)
    corrupt = root / "corrupt_run"
    corrupt.mkdir()
    shutil.copy(run / "config.yaml", corrupt / "config.yaml")
    ckpt = (run / "checkpoint.safetensors").read_bytes()
    (corrupt / "checkpoint.safetensors").write_bytes(ckpt[: len(ckpt) // 2])
    f["corrupt_run"] = str(corrupt)
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine\n")
    f["foreign"] = str(root / "foreign")
    (root / "afile").write_text("a file\n")
    f["afile"] = str(root / "afile")

    # Weights that are not what they claim.
    (root / "empty.safetensors").write_bytes(b"")
    (root / "trunc.safetensors").write_bytes(good[: len(good) * 2 // 3])
    (root / "garbage.safetensors").write_bytes(os.urandom(300))
    (root / "pickle.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    torch.save({"w": torch.zeros(2)}, root / "torchsave.safetensors")
    (root / "text.pt").write_text("hello, not weights\n")
    (root / "weights.bin").write_bytes(b"\x00" * 64)
    f["badoffsets"] = _header_file(
        root / "badoffsets.safetensors", {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}},
        b"\0" * 16)
    f["huge_meta"] = _header_file(
        root / "huge_meta.safetensors",
        {"__metadata__": {"kdistill": json.dumps({"spec": "mlp:12000,12000", "in_shape": [1, 8, 8],
                                                  "num_classes": 10})},
         "net.1.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    m = load_model(f["teacher"])
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    save_model(root / "nan.safetensors", m, in_shape=[1, 8, 8], num_classes=10)
    save_model(root / "other_shape.safetensors", build_model("mlp:8", (20,), 10), in_shape=[20], num_classes=10)
    save_model(root / "other_classes.safetensors", build_model("mlp:8", (1, 8, 8), 3), in_shape=[1, 8, 8],
               num_classes=3)
    for name in ("empty", "trunc", "garbage", "pickle", "torchsave", "nan", "other_shape", "other_classes"):
        f[name] = str(root / f"{name}.safetensors")
    f["text_pt"], f["weights_bin"] = str(root / "text.pt"), str(root / "weights.bin")

    # Logits files: good ones for digits (seed 0), and broken or foreign ones.
    bundle = data.load("digits", seed=0)
    train = bundle.train
    logits = predict_split(load_model(f["teacher"]), train)
    f["logits_ok"] = str(save_logits(root / "ok.safetensors", logits, train.index, data=train.name, split=train))
    bad = logits.clone()
    bad[3, 1] = float("nan")
    f["logits_nan"] = str(save_logits(root / "nan_logits.safetensors", bad, train.index, data=train.name))
    f["logits_classes"] = str(save_logits(root / "c3.safetensors", logits[:, :3], train.index, data=train.name))
    f["logits_bigid"] = str(save_logits(root / "bigid.safetensors", logits, train.index + 10**12, data=train.name))
    other = data.load("digits", seed=1).train  # the same name, other samples in the transfer set
    f["logits_other"] = str(save_logits(root / "other.safetensors", predict_split(load_model(f["teacher"]), other),
                                        other.index, data=other.name, split=other))
    np.save(root / "rows.npy", logits[:10].numpy())
    f["logits_rows"] = str(root / "rows.npy")
    (root / "empty_logits.safetensors").write_bytes(b"")
    f["logits_empty"] = str(root / "empty_logits.safetensors")

    # Data files.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    f["npz_ok"] = _npz(root / "ok.npz", x, y)
    xn = x.copy()
    xn[5, 2] = np.nan
    f["npz_nan"] = _npz(root / "nan.npz", xn, y)
    xi = x.copy()
    xi[7, 0] = np.inf
    f["npz_inf"] = _npz(root / "inf.npz", xi, y)
    f["npz_big"] = _npz(root / "big.npz", x * 1e30, y)
    f["npz_test_nan"] = _npz(root / "test_nan.npz", x, y, x_test=xn[:6], y_test=y[:6])
    f["npz_label_range"] = _npz(root / "range.npz", x, y, classes=np.array(["a", "b"]))
    yneg = y.copy()
    yneg[4] = -100
    f["npz_label_neg"] = _npz(root / "neg.npz", x, yneg)
    f["npz_one_class"] = _npz(root / "one.npz", x, np.zeros(60, dtype=np.int64))
    f["npz_strings"] = _npz(root / "str.npz", np.array([["a", "b"]] * 60), y)
    np.savez(root / "missing.npz", x_train=x, y_train=y)
    f["npz_missing"] = str(root / "missing.npz")
    f["npz_shape"] = _npz(root / "shape.npz", x, y, x_test=rng.normal(size=(6, 5)), y_test=y[:6])
    rows = "".join(f"{i % 5},{'nan' if i == 3 else i},{i % 2}\n" for i in range(40))
    (root / "nan.csv").write_text("a,b,label\n" + rows)
    f["csv_nan"] = str(root / "nan.csv")
    (root / "one.csv").write_text("a,b,label\n" + "".join(f"{i},{i * 2},x\n" for i in range(40)))
    f["csv_one_class"] = str(root / "one.csv")

    # Logits made for other data of the same name (d.npz in another directory): other labels, or same labels
    # and other pixels.
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "c").mkdir()
    f["npz_same_name"] = _npz(root / "a" / "d.npz", x, y)
    other_y = (y + 1) % 3
    for d, (xx, yy) in {"b": (x, other_y), "c": (x + 1.0, y)}.items():
        _npz(root / d / "d.npz", xx, yy)
    for d, key in (("b", "logits_same_name"), ("c", "logits_same_labels")):
        split = data.load(f"npz:{root / d / 'd.npz'}", seed=0, val_size=0).train
        f[key] = str(save_logits(root / d / "logits.safetensors", torch.randn(len(split), 3), split.index,
                                 data=split.name, split=split))
    (root / "nets.py").write_text(NETS)
    f["nets"] = str(root / "nets.py")

    # Configs.
    for name, text in {
        "cfg_trian": "data: digits\nmodel: mlp:8\ntrian:\n  epochs: 1\n",
        "cfg_epochs_true": "data: digits\nmodel: mlp:8\ntrain:\n  epochs: true\n",
        "cfg_bad_yaml": "data: digits\nmodel: [mlp:8\n",
        "cfg_list": "- data\n- model\n",
        "cfg_method_int": "method: 5\n",
        "cfg_model_int": "model: 123\n",
        "cfg_two_students": "model: mlp:8\nstudent: mlp:9\n",
        "cfg_train_list": "train: [1, 2]\n",
        "cfg_lr_nan": "train:\n  lr: .nan\n",
    }.items():
        (root / f"{name}.yaml").write_text(text)
        f[name] = str(root / f"{name}.yaml")
    (root / "cfgdir").mkdir()
    f["cfgdir"] = str(root / "cfgdir")
    return f


# ------------------------------------------------------------------------------------------- the catalogue

CLI_CASES = [
    # 1. Non-finite and out-of-range settings.
    ("lr-inf", T + " --lr inf", "train.lr"),
    ("lr-nan", T + " --lr nan", "train.lr"),
    ("lr-negative", T + " --lr -1", "train.lr"),
    ("lr-huge", T + " --lr 1e200", "train.lr"),
    ("T-inf", D + " -T inf", "method.temperature"),
    ("T-huge", D + " -T 1e200", "method.temperature"),
    ("T-zero", D + " -T 0", "method.temperature"),
    ("alpha-nan", D + " --alpha nan", "method.alpha"),
    ("alpha-2", D + " --alpha 2", "method.alpha"),
    ("wd-inf", T + " --set train.weight_decay=.inf", "train.weight_decay"),
    ("wd-negative", T + " --set train.weight_decay=-1", "train.weight_decay"),
    ("momentum-nan", T + " --set train.momentum=nan", "train.momentum"),
    ("train-T-inf", T + " --set train.temperature=inf", "train.temperature: is an option of the method (KD) now"),
    ("clip-inf", T + " --set train.clip_grad_norm=inf", "train.clip_grad_norm"),
    ("warmup-1.5", T + " --set train.warmup=1.5", "train.warmup"),
    ("fraction-nan", D + " --fraction nan", "fraction"),
    ("fraction-0", D + " --fraction 0", "fraction"),
    ("yaml-lr-nan", "train --data digits --model mlp:8 --no-progress --config {cfg_lr_nan}", "train.lr"),
    ("method-beta-inf", D + " --method dkd --set method.beta=inf", "method.beta"),
    # 2. Config typing: values coerced or refused by type, unknown keys with the closest name.
    ("epochs-true", T + " --set train.epochs=true", "train.epochs"),
    ("epochs-2.5", T + " --set train.epochs=2.5", "train.epochs"),
    ("epochs-0", T + " --epochs 0", "train.epochs"),
    ("lr-abc", T + " --set train.lr=abc", "train.lr"),
    ("batch-list", T + " --set train.batch_size=[1,2]", "train.batch_size"),
    ("batch-0", T + " --batch-size 0", "train.batch_size"),
    ("nesterov-maybe", T + " --set train.nesterov=maybe", "train.nesterov"),
    ("optimizer-typo", T + " --set train.optimizer=sgdd", "train.optimizer"),
    ("schedule-unknown", T + " --set train.schedule=linear", "train.schedule"),
    ("train-key-typo", T + " --set train.lrr=1", "did you mean 'lr'"),
    ("top-key-typo", T + " --set modle=mlp:8", "did you mean 'model'"),
    ("section-typo-set", T + " --set trian.epochs=1", "did you mean 'train'"),
    ("section-typo-yaml", T + " --config {cfg_trian}", "did you mean 'train'"),
    ("yaml-epochs-true", "train --data digits --model mlp:8 --no-progress --config {cfg_epochs_true}", "train.epochs"),
    ("yaml-invalid", T + " --config {cfg_bad_yaml}", "not valid YAML"),
    ("yaml-list", T + " --config {cfg_list}", "mapping"),
    ("yaml-missing", T + " --config {root}/nope.yaml", "nope.yaml"),
    ("yaml-directory", T + " --config {cfgdir}", "cfgdir"),
    ("yaml-method-int", T + " --config {cfg_method_int}", "method"),
    ("yaml-model-int", "train --data digits --epochs 1 --no-progress --config {cfg_model_int}", "model"),
    ("yaml-two-students", "train --data digits --epochs 1 --no-progress --config {cfg_two_students}", "student"),
    ("yaml-train-list", T + " --config {cfg_train_list}", "train"),
    ("set-train-scalar", T + " --set train=5", "train"),
    ("set-method-list", T + " --set method=[1]", "method"),
    ("set-data-number", T + " --set data=5", "data"),
    ("set-no-equals", T + " --set train.lr", "--set"),
    ("set-bad-yaml", T + " --set train.lr=[", "--set"),
    ("set-empty-part", T + " --set train..lr=1", "--set"),
    ("set-into-value", T + " --set train.lr.x=1", "train.lr"),
    ("method-option-typo", D + " --set method.alfa=0.5", "did you mean 'alpha'"),
    ("method-option-type", D + " --set method.kind=5", "method.kind"),
    ("method-name-typo", T + " --method kdd", "unknown method 'kdd'"),
    ("method-needs-teacher", T + " --method kd", "distils from a teacher"),
    ("data-option-unknown", T + " --set data.bogus=1", "data.bogus"),
    ("data-option-typo", T + " --set data.tets_size=0.1", "did you mean 'test_size'"),
    ("data-val-size-negative", T + " --set data.val_size=-1", "data.val_size"),
    ("data-seed-abc", T + " --set data.seed=abc", "data.seed"),
    ("data-test-size-nan", T + " --set data.test_size=nan", "data.test_size"),
    ("data-option-type", "train --data synthetic --model mlp:8 --epochs 1 --no-progress --set data.class_sep=abc",
     "data.class_sep"),
    ("train-with-teacher-key", T + " --set teacher={teacher}", "teacher"),
    ("jitter-negative", T + " --jitter -1", "train.jitter"),
    ("accumulate-indivisible", T + " --set train.accumulate=3", "train.accumulate"),
    ("augment-unknown", T + " --augment blur", "blur"),
    ("teacher-views-no-augment", T + " --set train.teacher_views=2", "train.teacher_views"),
    ("augment-flat-data", "train --data npz:{npz_ok} --model mlp:8 --epochs 1 --no-progress --augment flip",
     "train.augment"),
    ("crop-whole-image", T + " --augment crop8", "train.augment"),
    ("jitter-whole-image", T + " --jitter 9", "train.jitter"),
    ("seed-overflow", T + " --seed 100000000000000000000000", "train.seed"),
    ("data-seed-negative", T + " --set data.seed=-1", "data.seed"),
    ("val-size-too-big", T + " --set data.val_size=5000", "data.val_size"),
    ("argparse-int", T + " --epochs abc", "--epochs"),
    ("argparse-choice", T + " --optimizer rmsprop", "--optimizer"),
    # 4. Models impossible for the data, ill-typed or unknown.
    ("model-option-type", "train --data digits --model mlp:10,dropout=abc --epochs 1 --no-progress", "dropout"),
    ("model-dropout-range", "train --data digits --model mlp:10,dropout=1.5 --epochs 1 --no-progress", "dropout"),
    ("model-dropout-nan", "train --data digits --model mlp:10,dropout=nan --epochs 1 --no-progress", "dropout"),
    ("cnn-too-deep", "train --data digits --model cnn:4,4,4,4 --epochs 1 --no-progress", "cnn:4,4,4,4"),
    ("cnn-kernel-0", "train --data digits --model cnn:8,kernel=0 --epochs 1 --no-progress", "cnn:8,kernel=0"),
    ("cnn-hidden-negative", "train --data digits --model cnn:8,hidden=-3 --epochs 1 --no-progress", "cnn:8,hidden=-3"),
    ("mlp-max-norm-negative", "train --data digits --model mlp:8,max_norm=-1 --epochs 1 --no-progress", "max_norm"),
    ("train-max-norm-negative", T + " --set train.max_norm=-1", "train.max_norm"),
    ("model-name-typo", "train --data digits --model mlpp:8 --epochs 1 --no-progress", "did you mean 'mlp'"),
    ("mlp-no-widths", "train --data digits --model mlp --epochs 1 --no-progress", "mlp needs hidden widths"),
    ("mlp-width-text", "train --data digits --model mlp:a --epochs 1 --no-progress", "cannot read"),
    ("model-option-unknown", "train --data digits --model mlp:8,bogus=1 --epochs 1 --no-progress", "bogus"),
    ("resnet-with-ints", "train --data digits --model resnet8:3 --epochs 1 --no-progress", "resnet8"),
    ("cnn-on-tables", "train --data npz:{npz_ok} --model cnn:8 --epochs 1 --no-progress", "cnn"),
    ("lenet-on-8x8", "train --data digits --model lenet5 --epochs 1 --no-progress", "lenet5"),
    ("py-model-missing", "train --data digits --model py:{root}/nope.py:make --epochs 1 --no-progress", "nope.py"),
    ("no-model", "train --data digits --epochs 1 --no-progress", "model"),
    ("model-too-big", "train --data digits --model mlp:99999999999 --epochs 1 --no-progress", "parameters"),
    # 1 and 4. Data: non-finite inputs, labels out of range, one class.
    ("inputs-nan", "train --data npz:{npz_nan} --model mlp:8 --epochs 1 --no-progress", "inputs (x)"),
    ("inputs-inf", "train --data npz:{npz_inf} --model mlp:8 --epochs 1 --no-progress", "inputs (x)"),
    ("inputs-1e30", "train --data npz:{npz_big} --model mlp:8 --epochs 1 --no-progress", "inputs (x)"),
    ("test-inputs-nan", "train --data npz:{npz_test_nan} --model mlp:8 --epochs 1 --no-progress", "test inputs"),
    ("csv-nan", "train --data csv:{csv_nan} --model mlp:8 --epochs 1 --no-progress", "inputs (x)"),
    ("labels-beyond-classes", "train --data npz:{npz_label_range} --model mlp:8 --epochs 1 --no-progress", "label 2"),
    ("label-minus-100", "train --data npz:{npz_label_neg} --model mlp:8 --epochs 1 --no-progress", "-100"),
    ("one-class-npz", "train --data npz:{npz_one_class} --model mlp:8 --epochs 1 --no-progress", "class"),
    ("one-class-csv", "train --data csv:{csv_one_class} --model mlp:8 --epochs 1 --no-progress", "class"),
    ("string-inputs", "train --data npz:{npz_strings} --model mlp:8 --epochs 1 --no-progress", "numeric"),
    ("npz-missing-arrays", "train --data npz:{npz_missing} --model mlp:8 --epochs 1 --no-progress", "missing arrays"),
    ("npz-split-shapes", "train --data npz:{npz_shape} --model mlp:8 --epochs 1 --no-progress", "same sample shape"),
    # 5. Paths and devices.
    ("data-path-missing", "train --data mnist --data-path /does/not/exist --model mlp:8 --epochs 1 --no-progress",
     "/does/not/exist"),
    ("npz-missing-file", "train --data npz:{root}/nope.npz --model mlp:8 --epochs 1 --no-progress", "nope.npz"),
    ("folder-missing", "train --data folder:{root}/nope --model mlp:8 --epochs 1 --no-progress", "nope"),
    ("data-unknown", "train --data digitz --model mlp:8 --epochs 1 --no-progress", "did you mean 'digits'"),
    ("npz-no-path", "train --data npz: --model mlp:8 --epochs 1 --no-progress", "names no path"),
    ("out-is-file", T + " OUT={afile}", "--out"),
    ("out-under-file", T + " OUT={afile}/sub", "--out"),
    ("out-not-writable", T + " OUT=/proc/kdistill-test/out", "--out"),
    ("device-cuda", T + " --device cuda", "train.device"),
    ("device-cuda-7", T + " --device cuda:7", "train.device"),
    ("device-banana", T + " --device banana", "train.device"),
    ("device-meta", T + " --device meta", "train.device"),
    # 3 and 8. Files: weights that are not safetensors, crafted, for other data; logits for other data.
    ("teacher-missing", D.replace("{teacher}", "{root}/missing.safetensors"), "missing.safetensors"),
    ("teacher-empty", D.replace("{teacher}", "{empty}"), "empty.safetensors"),
    ("teacher-truncated", D.replace("{teacher}", "{trunc}"), "trunc.safetensors"),
    ("teacher-garbage", D.replace("{teacher}", "{garbage}"), "garbage.safetensors"),
    ("teacher-pickle", D.replace("{teacher}", "{pickle}"), "pickle"),
    ("teacher-torch-save", D.replace("{teacher}", "{torchsave}"), "torch.save"),
    ("teacher-text-pt", D.replace("{teacher}", "{text_pt}"), "text.pt"),
    ("teacher-zeros-bin", D.replace("{teacher}", "{weights_bin}"), "weights.bin"),
    ("teacher-bad-offsets", D.replace("{teacher}", "{badoffsets}"), "badoffsets.safetensors"),
    ("teacher-claims-huge-model", D.replace("{teacher}", "{huge_meta}"), "huge_meta.safetensors"),
    ("teacher-nan-weights", D.replace("{teacher}", "{nan}"), "NaN"),
    ("teacher-other-shape", D.replace("{teacher}", "{other_shape}"), "inputs shaped"),
    ("teacher-other-classes", D.replace("{teacher}", "{other_classes}"), "classes"),
    ("teacher-model-no-weights", "distill --data digits --model mlp:8 --teacher-model mlp:16 --epochs 1 --no-progress",
     "--teacher-weights"),
    ("teacher-model-wrong-spec", "distill --data digits --model mlp:8 --teacher-model mlp:32 "
     "--teacher-weights {teacher} "
     "--epochs 1 --no-progress", "does not fit"),
    ("logits-nan", "distill --data digits --model mlp:8 --teacher-logits {logits_nan} --epochs 1 --no-progress", "NaN"),
    ("logits-classes", "distill --data digits --model mlp:8 --teacher-logits {logits_classes} --epochs 1 --no-progress",
     "classes"),
    ("logits-huge-ids", "distill --data digits --model mlp:8 --teacher-logits {logits_bigid} --epochs 1 --no-progress",
     "no row"),
    ("logits-other-split", "distill --data digits --model mlp:8 --teacher-logits {logits_other} --epochs 1 "
     "--no-progress", "no row"),
    ("logits-other-data", "distill --data npz:{npz_same_name} --model mlp:8 --teacher-logits {logits_same_name} "
     "--epochs 1 --no-progress --set data.val_size=0", "other labels"),
    ("logits-other-pixels", "distill --data npz:{npz_same_name} --model mlp:8 --teacher-logits {logits_same_labels} "
     "--epochs 1 --no-progress --set data.val_size=0", "other inputs"),
    ("logits-npy-rows", "distill --data digits --model mlp:8 --teacher-logits {logits_rows} --epochs 1 --no-progress",
     "rows"),
    ("logits-empty", "distill --data digits --model mlp:8 --teacher-logits {logits_empty} --epochs 1 --no-progress",
     "empty_logits.safetensors"),
    ("logits-augmented", "distill --data digits --model mlp:8 --teacher-logits {logits_ok} --augment crop2 --epochs 1 "
     "--no-progress", "augmented"),
    ("onnx-missing", "distill --data digits --model mlp:8 --teacher-onnx {root}/nope.onnx --epochs 1 --no-progress",
     "teacher_onnx"),
    ("ensemble-mean-one-teacher", D + " --ensemble-mean geometric", "ensemble_mean"),
    ("unlabelled-needs-alpha-1", D + " --unlabelled --alpha 0.5", "method.alpha"),
    # 6. Runs: finished, unfinished and foreign directories; resume checks.
    ("out-finished-run", T + " OUT={run}", "finished run"),
    ("out-unfinished-run", T + " OUT={unfinished}", "unfinished run"),
    ("out-foreign-dir", T + " OUT={foreign}", "not empty"),
    ("resume-nothing", T + " --resume", "--resume"),
    ("resume-and-overwrite", T + " --resume --overwrite OUT={run}", "--overwrite"),
    ("resume-other-model", "train --data digits --model mlp:17 --epochs 1 --no-progress --resume OUT={run}", "model"),
    ("resume-other-data", "train --data digits --model mlp:16 --epochs 1 --no-progress --resume --set data.seed=1 "
     "OUT={run}", "data"),
    ("resume-corrupt-checkpoint", T + " --resume OUT={corrupt_run}", "checkpoint.safetensors"),
    ("resume-other-lr", "train --data digits --model mlp:16 --epochs 1 --no-progress --resume --lr 0.01 OUT={run}",
     "train.lr"),
    # evaluate and predict.
    ("evaluate-missing", "evaluate --model {root}/nope.safetensors", "nope.safetensors"),
    ("evaluate-empty", "evaluate --data digits --model {empty}", "empty.safetensors"),
    ("evaluate-other-data", "evaluate --data synthetic --model {teacher}", "cannot run"),
    ("evaluate-T-0", "evaluate --model {teacher} -T 0", "--temperature"),
    ("evaluate-no-val", "evaluate --model {teacher} --split val --val-size 0", "--split val"),
    ("evaluate-teacher-pickle", "evaluate --model {teacher} --teacher {pickle}", "pickle"),
    ("predict-bad-suffix", "predict --data digits --model {teacher} --save-logits {root}/x.txt", "--save-logits"),
    ("predict-no-model", "predict --data digits --save-logits {root}/x.safetensors", "predict"),
    # 7. A run whose loss becomes NaN stops with the epoch named (nothing kept: no epoch finished).
    ("loss-diverges", "train --data digits --model py:{nets}:diverging --epochs 2 --no-progress",
     "the loss became nan"),
]


def _argv(template: str, files: dict[str, str], out: Path) -> tuple[list[str], Path | None]:
    text = template.format(**files)
    argv = text.split()
    outs = [a for a in argv if a.startswith("OUT=")]
    if outs:
        argv.remove(outs[0])
        target = Path(outs[0][4:])
    else:
        target = out
    if argv[0] in ("train", "distill"):
        argv += ["--out", str(target)]
    return argv, (out if not outs else None)


def _snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("template, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_one_line(template, match, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv, fresh = _argv(template, files, out)
    target = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    before = _snapshot(target) if target is not None and fresh is None else None
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    if fresh is not None:
        assert not fresh.exists() or not any(fresh.iterdir()), sorted(p.name for p in fresh.iterdir())
    elif before is not None:
        assert _snapshot(target) == before  # an existing run's directory is left exactly as it was


@pytest.fixture(autouse=True)
def _argparse_exit(monkeypatch):
    """argparse exits through SystemExit; report its code as main's return value."""
    import kdistill.cli.app as cli

    real = cli.main

    def main_(argv=None):
        try:
            return real(argv)
        except SystemExit as exc:
            return exc.code

    monkeypatch.setattr(sys.modules[__name__], "main", main_)


def test_catalogue_size():
    assert len(CLI_CASES) + len(API_CASES) >= 80


# ------------------------------------------------------------------------------------------- subprocess


@pytest.mark.parametrize("args, match", [
    ("train --data digits --model mlp:8 --epochs 1 --lr inf --no-progress", "train.lr"),
    ("train --data digits --model cnn:8,kernel=0 --epochs 1 --no-progress", "cnn:8,kernel=0"),
    ("train --data digits --model mlp:8 --epochs abc", "--epochs"),
])
def test_the_real_command_prints_one_line(args, match, tmp_path):
    """The installed entry point, warnings and all: one stderr line, exit code 2, nothing in --out."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "kdistill.cli", *args.split(), "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdistill: error: "), r.stderr
    assert match in lines[0] and not out.exists()


# ------------------------------------------------------------------------------------------- the API


def _xy(n=60, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % k


def _fit(**kw):
    from kdistill.engine import TrainConfig, fit

    train = kw.pop("data", _xy())
    x, y = (train.x, train.y) if isinstance(train, data.TensorData) else train
    train = train if isinstance(train, data.TensorData) else (x, y)
    model = kw.pop("model", None) or nn.Linear(x.shape[1], 3)
    cfg = kw.pop("cfg", None) or TrainConfig(epochs=1, batch_size=20)
    return fit(model, train, cfg, progress=False, **kw)


def _tc(**kw):
    from kdistill.engine import TrainConfig

    return TrainConfig(**kw)


def _y_with(row: int, label: int) -> torch.Tensor:
    return torch.where(torch.arange(60) == row, label, torch.arange(60) % 3)


def _build(spec: str, shape=(4,)):
    from kdistill.models import build_model

    return build_model(spec, shape, 3)


def _tc_from(values):
    from kdistill.engine import TrainConfig

    return TrainConfig.from_dict(values)


def _x_with(value):
    x, y = _xy()
    x = x.clone()
    x[3, 1] = value
    return x, y


API_CASES = [
    ("tc-lr-nan", lambda: _tc(lr=float("nan")), "train.lr"),
    ("tc-lr-inf", lambda: _tc(lr=math.inf), "train.lr"),
    ("tc-epochs-bool", lambda: _tc(epochs=True), "train.epochs"),
    ("tc-lr-text", lambda: _tc(lr="fast"), "train.lr"),
    ("tc-T-huge", lambda: _tc_from({"temperature": 1e200}), "train.temperature: is an option of the method (KD) now"),
    ("tc-device", lambda: _tc(device="banana"), "train.device"),
    ("tc-wd-inf-string", lambda: _tc(weight_decay=".inf"), "train.weight_decay"),
    ("tc-unknown-key", lambda: _tc_from({"lrr": 1}), "did you mean 'lr'"),
    ("fit-inputs-nan", lambda: _fit(data=_x_with(float("nan"))), "inputs (x)"),
    ("fit-inputs-1e30", lambda: _fit(data=(_xy()[0] * 1e30, _xy()[1])), "inputs (x)"),
    ("fit-labels-range", lambda: _fit(data=data.TensorData(_xy()[0], _y_with(9, 5), ("a", "b", "c"))), "labels"),
    ("fit-val-labels-range", lambda: _fit(val=data.TensorData(_xy()[0], torch.full((60,), 5), ("a", "b", "c"))),
     "val labels"),
    ("fit-label-minus-100", lambda: _fit(data=(_xy()[0], _y_with(4, -100))), "-100"),
    ("fit-one-class", lambda: _fit(data=(_xy()[0], torch.zeros(60, dtype=torch.long)), model=nn.Linear(4, 1)), "class"),
    ("fit-12-outputs", lambda: _fit(model=nn.Linear(4, 12)), "classes"),
    ("fit-method-T-inf", lambda: _fit(method={"name": "kd", "temperature": math.inf}, teacher=nn.Linear(4, 3)),
     "method.temperature"),
    ("fit-method-typo", lambda: _fit(method={"name": "kd", "alfa": 1}, teacher=nn.Linear(4, 3)),
     "did you mean 'alpha'"),
    ("fit-device-cuda", lambda: _fit(cfg=_tc(epochs=1, batch_size=20, device="cuda")), "train.device"),
    ("load-unknown-option", lambda: data.load("digits", bogus=1), "data.bogus"),
    ("load-option-type", lambda: data.load("synthetic", class_sep="abc"), "data.class_sep"),
    ("load-missing-path", lambda: data.load("mnist", path="/does/not/exist"), "data.path"),
    ("load-val-size-nan", lambda: data.load("digits", val_size=float("nan")), "data.val_size"),
    ("build-option-type", lambda: _build("mlp:10,dropout=abc"), "dropout"),
    ("build-negative-width", lambda: _build("cnn:8,hidden=-3", (1, 8, 8)), "cnn:8,hidden=-3"),
    ("dict-config-typo", lambda: _fit(cfg={"epochs": 1, "lrr": 0.1}), "did you mean 'lr'"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_naming_the_field(call, match):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        call()
    assert match in str(info.value)


def test_api_coerces_yaml_1_1_strings():
    cfg = _tc(lr="1e-3", weight_decay="5e-4", epochs="3", nesterov="false")
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.nesterov) == (0.001, 0.0005, 3, False)
    assert type(cfg.lr) is float and type(cfg.epochs) is int


def test_yaml_strings_become_floats_in_a_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: digits\nmodel: mlp:8\ntrain:\n  lr: 1e-3\n  weight_decay: 5e-4\n  epochs: 1\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--set", "train.momentum=5e-1", "--out", str(out),
                 "--no-progress"]) == 0
    import yaml

    written = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (written["lr"], written["weight_decay"], written["momentum"]) == (0.001, 0.0005, 0.5)


def test_overwrite_replaces_a_finished_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(files["run"], out)
    (out / "mine.txt").write_text("kept")
    assert main(["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--out", str(out), "--no-progress",
                 "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["models"]["model"]["spec"] == "mlp:8"
    assert (out / "mine.txt").read_text() == "kept"


@pytest.mark.parametrize("name", ["empty", "trunc", "garbage", "pickle", "torchsave", "badoffsets"])
def test_broken_weights_are_one_value_error_naming_the_file(files, name):
    from kdistill.io import load_checkpoint, load_model

    with pytest.raises(ValueError) as info:
        load_model(files[name])
    assert Path(files[name]).name in str(info.value) and "SafetensorError" not in str(info.value)
    with pytest.raises(ValueError) as info:
        load_checkpoint(files[name], nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    assert Path(files[name]).name in str(info.value)


def test_a_small_file_claiming_a_huge_model_allocates_nothing(files, monkeypatch):
    """mlp:12000,12000 would be 576 MB: the shapes are compared on the meta device first."""
    from kdistill.io import load_model
    from kdistill.models import registry

    devices = []
    real = registry.build_model

    def spy(spec, *a, **k):
        devices.append(str(torch.get_default_device()))
        return real(spec, *a, **k)

    monkeypatch.setattr(registry, "build_model", spy)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(files["huge_meta"])
    assert devices == ["meta"]


def test_logits_with_huge_ids_use_no_dense_table():
    from kdistill.teachers.base import CachedTeacher

    ids = torch.tensor([3, 10**12, 7])
    teacher = CachedTeacher(ids, torch.eye(3))
    assert teacher.row_of is None
    assert torch.equal(teacher.logits(None, torch.tensor([10**12, 3])), torch.eye(3)[[1, 0]])


def test_logits_for_the_same_data_are_accepted(files):
    """The file's own data and a subset of it are accepted, and each sample gets the teacher's row for its id."""
    from kdistill.teachers.logits_files import logits_teacher
    from kdistill.engine.evaluate import predict_split
    from kdistill.io import load_model

    train = data.load("digits", seed=0).train
    expected = predict_split(load_model(files["teacher"]), train)
    teacher = logits_teacher(files["logits_ok"], train)
    torch.testing.assert_close(teacher.logits(None, train.index), expected)
    subset = data.stratified_fraction(train, 0.5, 0)  # other rows at other positions: matched by id
    position = {int(i): n for n, i in enumerate(train.index)}
    rows = torch.tensor([position[int(i)] for i in subset.index])
    assert not torch.equal(rows, torch.arange(len(subset)))  # a positional lookup would give other rows
    torch.testing.assert_close(logits_teacher(files["logits_ok"], subset).logits(None, subset.index), expected[rows])


class _DivergesAt(nn.Module):
    """A linear model whose logits become NaN from the ``at``-th forward on (in training mode)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin, self.at, self.calls = nn.Linear(4, 3), at, 0

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                out = out * float("nan")
        return out


def test_nan_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    from kdistill.io import read_checkpoint_state

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"epoch 2 \(steps 4-6\)") as info:
        _fit(model=_DivergesAt(5), cfg=_tc(epochs=3, batch_size=20), out_dir=out)
    assert "keeps epoch 1" in str(info.value)
    assert read_checkpoint_state(out / "checkpoint.safetensors")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "model.safetensors").exists()


def test_resume_refuses_other_data_naming_it(tmp_path):
    out = tmp_path / "run"
    _fit(cfg=_tc(epochs=1, batch_size=20), out_dir=out)
    with pytest.raises(ValueError, match="another data"):
        _fit(data=_xy(seed=1), cfg=_tc(epochs=1, batch_size=20), out_dir=out, resume=True)
