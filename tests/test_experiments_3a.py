"""Plumbing of the transfer-set, small-student and soft-label experiments, on scikit-learn digits."""

import json
import time

import pytest
import torch

from kdistill import data
from kdistill.cli.app import main
from kdistill.experiments.small_student import augmented_copies, best_temperature, sweep_summary
from kdistill.experiments.soft_labels import class_similarity, soft_target_stats
from deploy_checks import check_deployment, check_png, check_wall_time

SMALL_TEACHER = ["--set", "teacher=mlp:64", "--set", "teacher_epochs=12", "--set", "teacher_lr=0.1",
                 "--set", "teacher_jitter=0", "--set", "val_size=200", "--set", "batch_size=64"]
SMALL_STUDENT = ["--set", "student=mlp:32", "--set", "student_epochs=10", "--set", "student_lr=0.1", "--set", "seeds=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: one thread is as fast, and it does not stall when other processes load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_mnist(monkeypatch):
    """`mnist` resolves to scikit-learn digits (1x8x8), so the experiments run in seconds, offline."""
    monkeypatch.setitem(data.LOADERS, "mnist", lambda path=None: data.load_digits())
    monkeypatch.setitem(data.DEFAULT_VAL_SIZE, "mnist", 200)


def _run(name, out, *extra):
    started = time.perf_counter()
    assert main(["run", name, "--profile", "quick", "--out", str(out), "--no-progress", *extra]) == 0
    res = json.loads((out / "results.json").read_text())
    check_wall_time(res, time.perf_counter() - started)
    return res



def test_transfer_omit3_on_small_data_and_teacher_cache(tmp_path, small_mnist):
    res = _run("transfer-omit3", tmp_path / "omit3", *SMALL_TEACHER, *SMALL_STUDENT, "--set", "temperatures=[4.0, 8.0]")
    m = res["models"]
    assert set(m) == {"teacher", "distilled", "distilled+bias(val)", "distilled+bias(label-free)",
                      "baseline", "baseline+bias(val)", "baseline+bias(label-free)"}
    assert res["chosen_temperature"] in (4.0, 8.0) and len(res["validation_errors_by_candidate"]) == 2
    # Trained on hard labels without 3s, the baseline never predicts a 3.
    assert m["baseline"]["test_unseen_accuracy"]["values"] == [0.0, 0.0]
    # The student never saw a 3, yet distilled it gets some right, and the offset (a) never hurts validation.
    assert m["distilled"]["test_unseen_accuracy"]["mean"] > 0.2
    for before, after in zip(m["distilled"]["val_errors"]["values"], m["distilled+bias(val)"]["val_errors"]["values"]):
        assert after <= before
    assert m["distilled"]["offset"]["values"] == [0.0, 0.0]
    assert len(m["distilled+bias(label-free)"]["test_errors"]["values"]) == 2
    check_png(tmp_path / "omit3" / "offset_curve.png", (7, 4))
    check_png(tmp_path / "omit3" / "per_class_accuracy.png", (8, 3.6))
    assert "3s errors" in (tmp_path / "omit3" / "results.md").read_text()
    assert m["teacher"]["loaded_from_cache"] is False
    distilled = f"distilled mlp:32 (T={res['chosen_temperature']:g}, alpha=1)"
    rows = check_deployment(res, tmp_path / "omit3", ["teacher mlp:64", distilled, f"{distilled} +bias(val)",
                                                         "student alone mlp:32 (hard labels, no 3s)"])
    # The first seed's students, as trained and with offset (a) folded into the output bias.
    for name, role in zip(rows, ("teacher", "distilled", "distilled+bias(val)", "baseline")):
        first = m[role]["test_accuracy"]
        assert rows[name]["accuracy"] == pytest.approx(first if role == "teacher" else first["values"][0]), name
    # A second experiment with the same teacher settings reloads it from the cache beside the run folders.
    again = _run("soft-labels", tmp_path / "soft", *SMALL_TEACHER)
    assert again["models"]["teacher"]["loaded_from_cache"] is True
    assert again["models"]["teacher"]["test_errors"] == m["teacher"]["test_errors"]
    check_png(tmp_path / "soft" / "temperatures.png", (2.6 * 6, 2.8))  # the digit and five temperatures
    check_png(tmp_path / "soft" / "dark_knowledge.png", (11, 1.9 * 5))  # five digits shown
    check_png(tmp_path / "soft" / "class_similarity.png", (5.2, 4.4))
    # No student is trained there: the teacher alone.
    rows = check_deployment(again, tmp_path / "soft", ["teacher mlp:64"])
    assert rows["teacher mlp:64"]["accuracy"] == pytest.approx(m["teacher"]["test_accuracy"])


@pytest.mark.parametrize("copies", [1, 3])
def test_transfer_keep78_on_small_data(tmp_path, small_mnist, copies):
    res = _run("transfer-keep78", tmp_path / "k", *SMALL_TEACHER, *SMALL_STUDENT, "--set", "teacher_cache=none",
               "--set", "student_epochs=30", "--set", f"transfer_copies={copies}")
    m = res["models"]
    text = (tmp_path / "k" / "results.md").read_text()
    assert ("3 copies" in text and "10 passes" in text) if copies == 3 else "no augmentation" in text
    # Hard labels of 7s and 8s only: the baseline gets no other digit right.
    assert m["baseline"]["test_unseen_accuracy"]["values"] == [0.0, 0.0]
    # The distilled student's 7/8 logits are too high: both offsets lower them, and that helps a lot.
    assert all(b < 0 for b in m["distilled+bias(val)"]["offset"]["values"])
    assert all(b < 0 for b in m["distilled+bias(label-free)"]["offset"]["values"])
    assert m["distilled+bias(val)"]["test_errors"]["mean"] < m["distilled"]["test_errors"]["mean"]
    assert not (tmp_path / "teacher-cache").exists()
    distilled = f"distilled mlp:32 (T={res['chosen_temperature']:g}, alpha=1)"
    rows = check_deployment(res, tmp_path / "k", ["teacher mlp:64", distilled, f"{distilled} +bias(val)",
                                                     "student alone mlp:32 (hard labels, only 7/8)"])
    assert rows[f"{distilled} +bias(val)"]["accuracy"] == pytest.approx(
        m["distilled+bias(val)"]["test_accuracy"]["values"][0])


def test_small_student_on_small_data(tmp_path, small_mnist):
    res = _run("small-student", tmp_path / "s", "--set", "teacher_mlp=mlp:64", "--set", "teacher_mlp_epochs=8",
               "--set", "teacher_cnn=cnn:8,16,hidden=32", "--set", "teacher_cnn_epochs=4", "--set", "teacher_lr=0.1",
               "--set", "val_size=200", "--set", "student=mlp:8,8", "--set", "student_epochs=3",
               "--set", "sweep_temperatures=[1.0, 3.0, 6.0]", "--set", "teacher_cache=none")
    m = res["models"]
    assert set(m) == {"teacher-mlp", "teacher-cnn", "baseline", "distilled-cnn", "distilled-cnn+hard",
                      "distilled-mlp", "distilled-cnn-best-T"}
    for role in ("baseline", "distilled-cnn", "distilled-cnn+hard", "distilled-mlp", "distilled-cnn-best-T"):
        assert len(m[role]["test_errors"]["values"]) == 2, role
    # The quick profile adds one shifted copy of the training split: every student saw twice the images.
    assert res["transfer_set"]["augment_copies"] == 1 and res["main_teacher"] == "cnn"
    assert res["transfer_set"]["images"] == 2 * (len(data.load_digits().train) - 200)
    assert res["chosen_alpha"] in (0.3, 0.7)
    assert set(res["sweep"]) == {"1.0", "3.0", "6.0"}
    assert res["chosen_temperature"] == best_temperature({float(k): v for k, v in res["sweep"].items()})
    assert m["distilled-cnn-best-T"]["temperature"] == res["chosen_temperature"]
    check_png(tmp_path / "s" / "temperature_sweep.png", (7, 4))
    check_png(tmp_path / "s" / "roles.png", (8, 3.8))
    rows = check_deployment(res, tmp_path / "s", ["teacher cnn:8,16,hidden=32",
                                                    f"distilled mlp:8,8 (cnn teacher, T={res['chosen_temperature']:g})",
                                                    "student alone mlp:8,8"])
    teacher, distilled, alone = rows.values()
    assert teacher["params"] > alone["params"] == distilled["params"]
    assert distilled["accuracy"] == pytest.approx(m["distilled-cnn-best-T"]["test_accuracy"]["values"][0])
    assert alone["accuracy"] == pytest.approx(m["baseline"]["test_accuracy"]["values"][0])


def test_sweep_bookkeeping():
    records = [
        {"temperature": 2.0, "seed": 0, "val_errors": 10, "test_errors": 50},
        {"temperature": 2.0, "seed": 1, "val_errors": 14, "test_errors": 10},
        {"temperature": 4.0, "seed": 0, "val_errors": 11, "test_errors": 1},
        {"temperature": 4.0, "seed": 1, "val_errors": 11, "test_errors": 1},
        {"temperature": 1.0, "seed": 0, "val_errors": 20, "test_errors": 0},
    ]
    summary = sweep_summary(records)
    assert list(summary) == [1.0, 2.0, 4.0]
    assert summary[2.0]["val_errors"]["mean"] == 12 and summary[2.0]["seeds"] == [0, 1]
    assert summary[1.0]["val_errors"]["std"] == 0.0
    # Validation decides, never test: T = 4 has the fewest mean validation errors (11 < 12 < 20).
    assert best_temperature(summary) == 4.0
    # Ties go to the lower temperature.
    tie = sweep_summary(records[:2] + [{"temperature": 8.0, "seed": 0, "val_errors": 12, "test_errors": 0}])
    assert best_temperature(tie) == 2.0
    with pytest.raises(ValueError, match="recorded twice"):
        sweep_summary(records + [records[0]])
    with pytest.raises(ValueError, match="sweep"):
        best_temperature({})


def test_augmented_copies_keep_labels_and_get_unique_ids(digits):
    train = digits.train.subset(torch.arange(10, 60))
    aug = augmented_copies(train, 2, 1, seed=0)
    assert len(aug) == 3 * len(train) and aug.input_shape == train.input_shape
    assert torch.equal(aug.x[: len(train)], train.x) and torch.equal(aug.y, train.y.repeat(3))
    assert len(torch.unique(aug.index)) == len(aug)
    assert not torch.equal(aug.x[len(train):2 * len(train)], train.x)  # the copies are shifted
    assert torch.equal(augmented_copies(train, 2, 1, seed=0).x, aug.x)  # and seeded
    assert augmented_copies(train, 0, 1, seed=0) is train
    with pytest.raises(ValueError, match="augment_copies"):
        augmented_copies(train, -1, 1, seed=0)
    with pytest.raises(ValueError, match="augment_pixels"):
        augmented_copies(train, 1, 0, seed=0)


def test_soft_target_statistics():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(20)
    logits = torch.randn(200, 10, generator=g)
    logits[torch.arange(200), labels] += 6.0
    stats = [soft_target_stats(logits, labels, T) for T in (1.0, 2.0, 5.0, 20.0)]
    entropies = [s["entropy_bits"] for s in stats]
    assert entropies == sorted(entropies) and entropies[-1] < 3.33  # flatter with T, at most log2(10)
    assert stats[0]["true_class_prob"] > 0.9 > stats[-1]["true_class_prob"]
    sim = class_similarity(logits, labels, 20.0, 10)
    assert torch.allclose(sim.sum(1), torch.ones(10, dtype=sim.dtype))
    assert int(sim.argmax(1).eq(torch.arange(10)).sum()) == 10


def test_bad_settings_are_clear_errors(tmp_path, small_mnist, capsys):
    assert main(["run", "transfer-omit3", "--out", str(tmp_path / "x"), "--set", "omit=[12]",
                 "--set", "teacher_cache=none"]) == 2
    assert "omit: digits" in capsys.readouterr().err
    assert main(["run", "transfer-keep78", "--out", str(tmp_path / "z"), "--set", "transfer_copies=7",
                 "--set", "teacher_cache=none"]) == 2
    assert "transfer_copies" in capsys.readouterr().err
    assert main(["run", "soft-labels", "--out", str(tmp_path / "y"), "--set", "example_index=-1", "--set", "val_size=200",
                 "--set", "teacher_cache=none"]) == 2
    assert "example_index" in capsys.readouterr().err
