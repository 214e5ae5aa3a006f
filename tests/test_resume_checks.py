"""``--resume`` refuses a checkpoint whose data or teacher changed; the teacher is checked before the first
step and handed back as it came.

Real runs of the command (in-process ``main``) on a CSV file, an image folder streamed from disk (PNG files
decoded by Pillow) and the scikit-learn digits; the API cases on a few random tensors.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.cli.app import main
from kdistill.engine.callbacks import Callback


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv + ["--no-progress"])
    return rc, capsys.readouterr().err.strip()


def test_resume_refuses_a_csv_with_one_value_edited(tmp_path, capsys):
    """The fingerprint sampled 256 rows: an edit in any other row was resumed on."""
    rng = np.random.default_rng(0)
    rows = ["a,b,label,split"] + [f"{a:.6f},{b:.6f},{int(a + b > 0)},{'train' if i < 540 else 'test'}"
                                  for i, (a, b) in enumerate(rng.normal(size=(600, 2)))]
    csv = tmp_path / "d.csv"
    csv.write_text("\n".join(rows) + "\n")
    argv = ["train", "--data", f"csv:{csv}", "--model", "mlp:4", "--epochs", "1", "--batch-size", "64",
            "--set", "data.val_size=0", "--out", str(tmp_path / "run")]
    assert _run(argv, capsys)[0] == 0
    sampled = set(torch.linspace(0, 539, 256).long().tolist())  # the rows the old fingerprint read
    row = next(r for r in range(300, 540) if r not in sampled)
    a, b, label, split = rows[1 + row].split(",")
    rows[1 + row] = f"{float(a) + 0.5:.6f},{b},{label},{split}"
    csv.write_text("\n".join(rows) + "\n")
    rc, err = _run(argv + ["--resume"], capsys)
    assert rc == 2 and "another data" in err and "input values" in err, err


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(("cat", "dog")):
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((8, 8, 3)) * 80).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    return tmp_path / "imgs"


def test_resume_refuses_streamed_images_replaced(image_folder, tmp_path, capsys):
    from PIL import Image

    argv = ["train", "--data", f"folder:{image_folder}", "--model", "mlp:4", "--epochs", "1", "--batch-size", "4",
            "--set", "data.in_memory=false", "--set", "data.val_size=0", "--out", str(tmp_path / "run")]
    assert _run(argv, capsys)[0] == 0
    time.sleep(0.01)
    img = image_folder / "train" / "dog" / "5.png"
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(img)  # same name, class and size: other pixels
    rc, err = _run(argv + ["--resume"], capsys)
    assert rc == 2 and "another data" in err, err


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two digits teachers of one spec with other weights (mlp:16, seeds 0 and 1), trained one epoch each."""
    root = tmp_path_factory.mktemp("teachers")
    for seed in (0, 1):
        assert main(["train", "--data", "digits", "--model", "mlp:16", "--epochs", "1", "--seed", str(seed),
                     "--no-progress", "--out", str(root / f"t{seed}")]) == 0
    return root


DISTILL = ["distill", "--data", "digits", "--student", "mlp:8", "--epochs", "1", "--batch-size", "64", "-T", "4",
           "--alpha", "0.5"]


@pytest.mark.parametrize("change, match", [
    ("other-teacher-file", "teacher (weights)"),
    ("edited-teacher-weights", "teacher (weights)"),
    ("other-T", "method.temperature"),
    ("other-alpha", "method.alpha"),
    ("other-method", "another method"),
])
def test_resume_of_a_distill_run_refuses_another_teacher_or_method_options(teachers, tmp_path, capsys, change, match):
    t0, t1 = teachers / "t0" / "model.safetensors", teachers / "t1" / "model.safetensors"
    mine = tmp_path / "teacher.safetensors"
    mine.write_bytes(t0.read_bytes())
    out = ["--out", str(tmp_path / "run")]
    assert _run(DISTILL + ["--teacher", str(mine)] + out, capsys)[0] == 0
    argv = DISTILL + ["--teacher", str(mine)] + out + ["--resume"]
    if change == "other-teacher-file":
        argv[argv.index(str(mine))] = str(t1)
    elif change == "edited-teacher-weights":  # the same file name, retrained weights
        mine.write_bytes(t1.read_bytes())
    elif change == "other-T":
        argv[argv.index("-T") + 1] = "2"
    elif change == "other-alpha":
        argv[argv.index("--alpha") + 1] = "0.9"
    else:
        argv += ["--method", "dkd"]
        argv = [a for a in argv if a not in ("-T", "4", "--alpha", "0.5")]
    rc, err = _run(argv, capsys)
    assert rc == 2 and match in err and "--resume" in err, err


def test_resume_with_the_same_teacher_and_options_is_accepted(teachers, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--teacher", str(teachers / "t0" / "model.safetensors")]
    assert _run(DISTILL + out, capsys)[0] == 0
    rc, err = _run(DISTILL + out + ["--resume"], capsys)
    assert rc == 0, err


def _xy(n: int = 60):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3


class _Counting(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.lin, self.calls = nn.Linear(36, classes), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1))


def test_api_resume_refuses_changed_teacher_weights(tmp_path):
    teacher = _Counting(3)
    cfg = TrainConfig(epochs=1, batch_size=20, augment="flip")
    fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), cfg, teacher=teacher, out_dir=tmp_path / "r",
        progress=False)
    with torch.no_grad():
        teacher.lin.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"another teacher \(weights\)"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), cfg, teacher=teacher, out_dir=tmp_path / "r",
            resume=True, progress=False)


def test_a_live_teacher_with_other_classes_is_refused_before_the_first_step(tmp_path):
    teacher = _Counting(5)  # the data has 3 classes
    with pytest.raises(ValueError, match="3 classes") as info:
        fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), TrainConfig(epochs=1, batch_size=20, augment="flip"),
            teacher=teacher, out_dir=tmp_path / "r", progress=False)
    assert "teacher" in str(info.value) and teacher.calls == 1  # one dry forward, no training step
    assert not (tmp_path / "r").exists()


def test_a_teacher_with_mixed_submodule_modes_is_handed_back_as_it_came():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3))
    teacher.train()
    teacher[2].eval()  # a frozen BatchNorm in a training model, a common fine-tuning setup
    modes = [m.training for m in teacher.modules()]
    fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), TrainConfig(epochs=1, batch_size=20, augment="flip"),
        teacher=teacher, progress=False)
    assert [m.training for m in teacher.modules()] == modes


def test_a_layer_shared_by_teacher_and_student_is_refused_naming_it():
    shared = nn.Linear(36, 16)
    teacher = nn.Sequential(nn.Flatten(), shared, nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Flatten(), shared, nn.Linear(16, 3))
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"shares parameters with the student .*student's 1\.weight is the teacher's "
                                         r"1\.weight.*'1'.*deepcopy"):
        fit(student, _xy(), TrainConfig(epochs=1, batch_size=20), teacher=teacher, progress=False)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in shared.parameters())  # nothing frozen by the refusal


def test_the_fingerprint_hashes_every_row_quickly():
    from kdistill.data.dataset import TensorData
    from kdistill.io import data_fingerprint

    x = torch.rand(60000, 784)
    split = TensorData(x, torch.arange(60000) % 10, tuple(str(i) for i in range(10)))
    t0 = time.perf_counter()
    a = data_fingerprint(split)
    took = time.perf_counter() - t0
    x[41234, 17] += 1e-3
    assert data_fingerprint(split) != a
    assert took < 5.0, took  # 188 MB of float32 (MNIST's size)


def test_a_batchnorm_buffer_shared_by_teacher_and_student_is_refused_and_the_teacher_kept():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    student[2].register_buffer("running_mean", teacher[2].running_mean)  # tied statistics, not parameters
    before = teacher[2].running_mean.clone()
    with pytest.raises(ValueError, match=r"shares the buffer 2\.running_mean with the student's 2\.running_mean.*"
                                         r"deepcopy"):
        fit(student, _xy(), TrainConfig(epochs=1, batch_size=20), teacher=teacher, progress=False)
    assert torch.equal(teacher[2].running_mean, before)


def test_a_student_with_every_parameter_frozen_is_one_value_error():
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter of Sequential has requires_grad=False.*requires_grad_"):
        fit(student, _xy(), TrainConfig(epochs=1, batch_size=20), progress=False)


class _Killed(Exception):
    pass


class _KillAtFirstStep(Callback):
    """Stops the run at its first step, as a kill before the first checkpoint would."""

    every_steps = 1

    def on_step(self, state):
        raise _Killed


def test_resume_without_a_checkpoint_says_why_and_how_to_restart(tmp_path, capsys):
    """A run killed before its first checkpoint: --resume says so and to run again without it (which then works);
    a directory with other files is told to add --overwrite; an empty one that it holds no run."""
    out = tmp_path / "r"
    with pytest.raises(_Killed):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), TrainConfig(epochs=1, batch_size=20), out_dir=out,
            progress=False, callbacks=[_KillAtFirstStep()])
    assert not (out / "checkpoint.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"resume=True: no checkpoint in .*r \(the run stopped before its first "
                                                r"checkpoint\); run again without resume=True$"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), TrainConfig(epochs=1, batch_size=20), out_dir=out,
            resume=True, progress=False)
    fit(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), _xy(), TrainConfig(epochs=1, batch_size=20), out_dir=out,
        progress=False)  # the advice works: no --overwrite needed
    (out / "checkpoint.safetensors").unlink()
    argv = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--resume"]
    rc, err = _run(argv + ["--out", str(out)], capsys)
    assert rc == 2 and "run again without --resume, adding --overwrite to replace the run's files there" in err, err
    (tmp_path / "empty").mkdir()
    rc, err = _run(argv + ["--out", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "empty holds no run to continue (no checkpoint.safetensors); run without --resume" in err, err


@pytest.mark.parametrize("keep", [100, "half"])
def test_a_truncated_checkpoint_is_refused_with_the_way_out(tmp_path, capsys, keep):
    argv = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert _run(argv, capsys)[0] == 0
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: keep if keep != "half" else len(raw) // 2])  # a copy or a disk that ran out
    rc, err = _run(argv + ["--resume"], capsys)
    assert rc == 2 and "checkpoint.safetensors" in err and "truncated" in err, err
    assert "the checkpoint cannot be read" in err and "again with --overwrite" in err, err
    assert _run(argv + ["--overwrite"], capsys)[0] == 0  # the way out works


def test_resume_with_another_number_of_teachers_says_so_plainly(teachers, tmp_path, capsys):
    t0, t1 = (str(teachers / t / "model.safetensors") for t in ("t0", "t1"))
    one, two = ["--teacher", t0], ["--teacher", t0, "--teacher", t1]
    for name, given in (("one", one), ("two", two)):
        assert _run(DISTILL + given + ["--out", str(tmp_path / name)], capsys)[0] == 0
    rc, err = _run(DISTILL + two + ["--out", str(tmp_path / "one"), "--resume"], capsys)
    assert rc == 2 and "was made with 1 teacher, this run gives 2" in err, err  # was "another teacher (kind)"
    rc, err = _run(DISTILL + one + ["--out", str(tmp_path / "two"), "--resume"], capsys)
    assert rc == 2 and "was made with 2 teachers, this run gives 1" in err, err
    assert _run(DISTILL + two + ["--out", str(tmp_path / "two"), "--resume"], capsys)[0] == 0


def test_checkpoints_recorded_before_the_teacher_count_still_resume():
    """A cached teacher's record gained a count; a checkpoint without one is compared as before."""
    from kdistill.engine.loop import _check_resume

    old = {"kind": "logits", "sha256": "ab" * 32}
    _check_resume({"teacher": old}, TrainConfig(epochs=1), None, "ckpt", teacher={**old, "teachers": 2})
    with pytest.raises(ValueError, match="another teacher"):
        _check_resume({"teacher": old}, TrainConfig(epochs=1), None, "ckpt",
                      teacher={**old, "sha256": "cd" * 32, "teachers": 1})
