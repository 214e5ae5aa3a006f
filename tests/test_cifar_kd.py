"""cifar10-kd and cifar100-kd end to end on tiny CIFAR-shaped data (seeded fake images, a hand-made CIFAR-100
archive), tiny pairs and one epoch: the results contract, last-epoch numbers, loss terms, data errors."""

import io
import json
import tarfile
import time

import numpy as np
import pytest
import torch

from kdistill import experiments
from kdistill.cli.app import main
from kdistill.data import cifar
from kdistill.experiments import _cifar_kd, cifar10_kd, cifar100_kd
from kdistill.models import build_model
from deploy_checks import check_png, check_wall_time

METHODS = ["ce", "kd", "dkd", "fitnet", "at"]
TINY = ["teacher_epochs=1", "student_epochs=1", "batch_size=64", "threads=1"]


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture
def fits(monkeypatch):
    """Every FitResult the recipes produce, in order, with the method each was trained with."""
    seen = []
    real = _cifar_kd.fit

    def spy(model, train, cfg, **kw):
        r = real(model, train, cfg, **kw)
        seen.append((kw.get("method"), r))
        return r

    monkeypatch.setattr(_cifar_kd, "fit", spy)
    return seen


def _run(tmp_path, name, *sets, data_path=None):
    out = tmp_path / name
    argv = ["run", name, "--profile", "quick", "--out", str(out), "--no-progress"]
    if data_path:
        argv += ["--data-path", str(data_path)]
    for s in sets:
        argv += ["--set", s]
    started = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - started
    return out, json.loads((out / "results.json").read_text()), elapsed  # elapsed: the test's clock around the run


def _check_students(res, fits, pairs, seeds):
    models, records = res["models"], res["records"]
    for p in pairs:
        assert isinstance(models[f"{p}/teacher"]["test_accuracy"], float)
        for m in METHODS:
            role = models[f"{p}/{m}"]
            assert role["seeds"] == seeds and len(role["test_accuracy"]["values"]) == seeds, (p, m)
            runs = [r for r in records if r["pair"] == p and r["method"] == m]
            assert role["test_accuracy"]["values"] == [r["test_accuracy"] for r in runs]
            pct = res["tables"][p][m]["test_accuracy_pct"]
            assert pct["mean"] == pytest.approx(100 * role["test_accuracy"]["mean"])
            for r in runs:  # each method's loss terms are in the students' per-epoch metrics
                assert {f"loss_{t}" for t in _cifar_kd.LOSS_TERMS[m]} <= set(r["history"][-1]), (p, m)
                assert r["history"][-1]["val_accuracy"] == r["val_accuracy"]  # no keep-best: the last epoch
    # The numbers reported are the FitResults' final test accuracies: students in training order (the CE student
    # shared between pairs of one student is trained once), teachers likewise.
    students = [r for m, r in fits if m is not None]
    trained = [r for r in records if not r.get("shared")]
    assert [r.test["accuracy"] for r in students] == [r["test_accuracy"] for r in trained]
    assert [m["name"] for m, _ in fits if m is not None] == [r["method"] for r in trained]
    teachers = [r for m, r in fits if m is None]
    assert [t.test["accuracy"] for t in teachers] == [res["teachers"][p]["test_accuracy"] for p in pairs]


def test_cifar10_kd_end_to_end_on_fake_data(tmp_path, fits):
    out, res, elapsed = _run(tmp_path, "cifar10-kd", "data=fake", "val_size=64", "seeds=2", *TINY,
                    'pairs=[{teacher: resnet8, student: resnet8}, {teacher: "wrn:10,1", student: resnet8}]')
    pairs = ["resnet8->resnet8", "wrn:10,1->resnet8"]
    assert res["experiment"] == "cifar10-kd" and res["seeds"] == [0, 1]
    check_wall_time(res, elapsed, [r.wall_time_s for _, r in fits])  # the fits ran one after another
    assert res["sizes"] == {"train": 256, "val": 64, "test": 128}
    assert set(res["models"]) == {f"{p}/{m}" for p in pairs for m in ["teacher", *METHODS]}
    # ce: 2 seeds trained once; kd/dkd/fitnet/at: 2 pairs x 2 seeds
    assert sum(m is not None for m, _ in fits) == 2 + 2 * 2 * 4 and sum(m is None for m, _ in fits) == 2
    _check_students(res, fits, pairs, 2)
    shared = [r for r in res["records"] if r.get("shared")]
    assert [(r["pair"], r["method"]) for r in shared] == [("wrn:10,1->resnet8", "ce")] * 2
    opts = {(r["pair"], r["method"]): r["options"] for r in res["records"]}
    assert opts[("wrn:10,1->resnet8", "fitnet")]["teacher_layers"] == ["block2"]
    assert opts[("resnet8->resnet8", "fitnet")]["student_layers"] == ["layer2"]
    assert opts[("wrn:10,1->resnet8", "at")]["teacher_layers"] == ["block1", "block2", "block3"]
    assert opts[("resnet8->resnet8", "dkd")]["warmup"] == pytest.approx(20 / 240)
    assert opts[("resnet8->resnet8", "kd")] == {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    md = (out / "results.md").read_text()
    assert md.startswith("# cifar10-kd") and "| method | `resnet8->resnet8` | `wrn:10,1->resnet8` |" in md
    assert "How this protocol differs from mdistiller's" in md and "150, 180 and 210" in md
    check_png(out / "cifar10_kd.png", (1.6 * len(METHODS) * len(pairs) ** 0.5, 4.5))  # 5 methods, 2 pairs


def _records(n, seed):
    """CIFAR-100 binary records: coarse label, fine label, then three 32x32 planes (seeded noise)."""
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % 100
    pix = rng.integers(0, 256, (n, 3 * 1024), dtype=np.uint8)
    return b"".join(bytes([f // 5, f]) + pix[i].tobytes() for i, f in enumerate(fine))


def _cifar100_archive(folder, train=300, test=100):
    files = {"train.bin": _records(train, 0), "test.bin": _records(test, 1),
             "fine_label_names.txt": "\n".join(f"fine{i}" for i in range(100)).encode(),
             "coarse_label_names.txt": "\n".join(f"coarse{i}" for i in range(20)).encode()}
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar-100-binary.tar.gz", "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return folder


def test_cifar100_kd_quick_on_a_tiny_archive(tmp_path, fits, monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    data_dir = _cifar100_archive(tmp_path / "data")
    out, res, _ = _run(tmp_path, "cifar100-kd", *TINY, "pairs=[{teacher: resnet8, student: resnet8}]",
                    data_path=data_dir)
    # val_size 500 does not fit 300 images: a tenth is carved instead; train_size/test_size above the counts: all
    assert res["sizes"] == {"train": 270, "val": 30, "test": 100}
    _check_students(res, fits, ["resnet8->resnet8"], 1)
    pub = res["published"]
    assert pub["top1"]["resnet32x4->resnet8x4"] == {"kd": 73.33, "dkd": 76.32} and "not measured" in pub["note"]
    md = (out / "results.md").read_text()
    assert "**not measured here**" in md and "73.33" in md and "76.32" in md
    assert "Data set: CIFAR-10," not in md
    check_png(out / "cifar100_kd.png", (1.6 * len(METHODS), 4.5))  # 5 methods, one pair


def test_cifar100_kd_without_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(cache, strict, release):
        def load():
            raise OSError("offline")
        return load

    monkeypatch.setattr(cifar, "_download", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar-100-binary\.tar\.gz.*--data-path.*KDISTILL_DATA"):
        experiments.run_experiment("cifar100-kd", "quick", tmp_path / "out", TINY, data_path=str(tmp_path / "empty"),
                                   progress=False)


def test_method_options_follow_mdistiller():
    shape = (3, 32, 32)
    r20, r8, wrn, vgg = (build_model(m, shape, 10) for m in ("resnet20", "resnet8", "wrn:16,2", "vgg8"))
    spec = _cifar_kd.method_spec
    m = _cifar_kd.METHODS
    assert spec("fitnet", m["fitnet"], r20, r8, "p", 4) == {
        "name": "fitnet", "weight": 100.0, "ce_weight": 1.0, "student_layers": ["layer2"], "teacher_layers": ["layer2"]}
    assert spec("fitnet", m["fitnet"], vgg, r8, "p", 4)["teacher_layers"] == ["block2"]
    assert spec("at", m["at"], wrn, r8, "p", 4)["teacher_layers"] == ["block1", "block2", "block3"]
    with pytest.raises(ValueError, match="AT pairs every stage"):
        spec("at", m["at"], vgg, r8, "vgg8->resnet8", 4)
    assert spec("dkd", m["dkd"], r20, r8, "p", 240)["warmup"] == pytest.approx(20.0)
    assert spec("kd", m["kd"], r20, r8, "p", 4) == {"name": "kd", "temperature": 4.0, "alpha": 0.9}


def test_profiles():
    for module in (cifar10_kd, cifar100_kd):
        assert experiments.get(module.NAME) is module and module.DESCRIPTION
        paper = module.PROFILES["paper"]
        assert (paper["student_epochs"], paper["teacher_epochs"], paper["batch_size"], paper["lr"],
                paper["weight_decay"], paper["momentum"], paper["seeds"], paper["schedule"]) == (
            240, 240, 64, 0.05, 5e-4, 0.9, 3, "step")
        assert list(paper["methods"]) == METHODS and module.PROFILES["quick"]["seeds"] == 1
        cfg = _cifar_kd.train_config(paper, paper["student_epochs"], 0)  # x0.1 after epochs 150, 180, 210
        assert cfg.milestones == pytest.approx((150, 180, 210)) and cfg.schedule == "step"
    full = cifar10_kd.PROFILES["full"]
    assert full["seeds"] >= 3 and full["val_size"] == 5000 and full["augment"] == "crop4,flip"
    pairs = {_cifar_kd.pair_name(p) for p in full["pairs"]}
    assert pairs == {"resnet20->resnet8", "wrn:16,2->resnet8"}
    c100 = {_cifar_kd.pair_name(p): p for p in cifar100_kd.PROFILES["paper"]["pairs"]}
    assert "resnet32x4->resnet8x4" in c100 and c100["resnet56->resnet20"]["methods"]["dkd"]["beta"] == 2.0


def test_settings_are_checked(tmp_path):
    def run(*sets):
        experiments.run_experiment("cifar10-kd", "quick", tmp_path / "bad", ["data=fake", *sets], progress=False)

    with pytest.raises(ValueError, match="each teacher->student pair once"):
        run("pairs=[{teacher: resnet8, student: resnet8}, {teacher: resnet8, student: resnet8}]")
    with pytest.raises(ValueError, match="baseline"):
        run("methods={kd: {}}")
    with pytest.raises(ValueError, match="does not run"):
        run("pairs=[{teacher: resnet8, student: resnet8, methods: {crd: {}}}]")
    with pytest.raises(ValueError, match="'cifar'.*'fake'"):
        experiments.run_experiment("cifar10-kd", "quick", tmp_path / "bad", ["data=mnist"], progress=False)


class _SessionEnded(Exception):
    pass


RESUME = ["data=fake", "val_size=64", "seeds=1", *TINY, "pairs=[{teacher: resnet8, student: resnet8}]",
          "methods={ce: {}, kd: {temperature: 4.0, alpha: 0.9}, at: {beta: 1000.0, p: 2.0, ce_weight: 1.0, stages: all}}"]


def test_an_interrupted_run_resumes_where_it_stopped_with_the_same_numbers(tmp_path, fits, monkeypatch):
    _, whole, _ = _run(tmp_path / "a", "cifar10-kd", *RESUME)
    assert len(fits) == 4  # teacher, ce, kd, at

    real = _cifar_kd.fit
    calls, crash = [], [True]

    def crash_on_third(*a, **kw):  # the session ends while the third model (kd) trains
        calls.append(kw.get("method"))
        if len(calls) == 3 and crash and crash.pop():
            raise _SessionEnded
        return real(*a, **kw)

    monkeypatch.setattr(_cifar_kd, "fit", crash_on_third)
    out = tmp_path / "b" / "cifar10-kd"
    with pytest.raises(_SessionEnded):
        _run(tmp_path / "b", "cifar10-kd", *RESUME)
    assert sorted(p.name for p in (out / "progress").glob("*.json")) == [
        "_elapsed.json", "resnet8-_resnet8_ce_seed0.json", "resnet8-_resnet8_teacher.json"]

    calls.clear()
    argv = ["run", "cifar10-kd", "--profile", "quick", "--out", str(out), "--no-progress", "--resume"]
    assert main(argv + [a for s in RESUME for a in ("--set", s)]) == 0
    assert [c["name"] for c in calls] == ["kd", "at"]  # the teacher and the CE student are not trained again
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_units"] == ["resnet8->resnet8/teacher", "resnet8->resnet8/ce/seed0"]
    key = ("pair", "method", "seed", "test_accuracy", "val_accuracy", "test_errors")
    assert [[r[k] for k in key] for r in res["records"]] == [[r[k] for k in key] for r in whole["records"]]
    assert res["teachers"]["resnet8->resnet8"]["test_accuracy"] == whole["teachers"]["resnet8->resnet8"]["test_accuracy"]
    acc = {n: r["accuracy"] for n, r in res["deployment"]["rows"].items()}
    assert acc == {n: r["accuracy"] for n, r in whole["deployment"]["rows"].items()}
    assert "Resumed (`--resume`): 2 finished model(s)" in (out / "results.md").read_text()

    # A second resume of the finished run trains nothing; a rerun without --resume starts afresh.
    calls.clear()
    assert main(argv + [a for s in RESUME for a in ("--set", s)]) == 0
    assert calls == []
    assert main(argv[:-1] + [a for s in RESUME for a in ("--set", s)]) == 0
    assert [c and c["name"] for c in calls] == [None, "ce", "kd", "at"]


def test_resume_refuses_other_settings_or_an_empty_folder(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["run", "cifar10-kd", "--profile", "quick", "--out", str(out), "--no-progress", "--resume"]
    assert main(argv) == 2
    assert "holds no run to continue" in capsys.readouterr().err
    out.mkdir()
    (out / "config.yaml").write_text("experiment: cifar10-kd\nprofile: quick\nsettings: {seeds: 7}\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "seeds" in err
