import json

import pytest
import torch

from kdistill import TrainConfig, fit
from kdistill.data import drop_labels
from kdistill.models import build_model
from kdistill.teachers.base import ModuleTeacher
from kdistill.engine import lr_factor
from kdistill.methods import build_method


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_same_seed_same_numbers(digits):
    cfg = TrainConfig(epochs=2, lr=0.1, jitter=1, seed=3)
    runs = [fit(build_model("mlp:32,dropout=0.2", digits.input_shape, 10, seed=3), digits.train, cfg,
                val=digits.val, progress=False) for _ in range(2)]
    assert torch.equal(_params(runs[0].model), _params(runs[1].model))
    assert runs[0].history[-1]["train_loss"] == runs[1].history[-1]["train_loss"]
    other = fit(build_model("mlp:32,dropout=0.2", digits.input_shape, 10, seed=3), digits.train,
                TrainConfig(epochs=2, lr=0.1, jitter=1, seed=4), progress=False)
    assert not torch.equal(_params(runs[0].model), _params(other.model))


def test_supervised_training_learns(digits):
    r = fit(build_model("mlp:64", digits.input_shape, 10, seed=0), digits.train,
            TrainConfig(epochs=15, lr=0.1, batch_size=64), val=digits.val, test=digits.test, progress=False)
    assert r.test["accuracy"] > 0.9 and r.val["accuracy"] > 0.9


def test_teacher_is_never_updated_and_student_learns_from_it(digits):
    teacher = build_model("mlp:64,dropout=0.3", digits.input_shape, 10, seed=0)
    fit(teacher, digits.train, TrainConfig(epochs=15, lr=0.1, batch_size=64), progress=False)
    before = _params(teacher).clone()
    for jitter in (0, 1):  # cached and live teacher paths
        student = build_model("mlp:32", digits.input_shape, 10, seed=1)
        r = fit(student, drop_labels(digits.train), TrainConfig(epochs=15, lr=0.1, batch_size=64, jitter=jitter),
                teacher=teacher, method={"name": "kd", "temperature": 4.0, "alpha": 1.0}, test=digits.test,
                progress=False)
        assert torch.equal(before, _params(teacher))
        assert not teacher.training
        assert r.test["accuracy"] > 0.85  # learned from soft targets alone, labels were dropped


def test_cached_and_live_teacher_give_identical_students(digits):
    teacher = build_model("mlp:32", digits.input_shape, 10, seed=0)
    kd = {"name": "kd", "temperature": 3.0, "alpha": 0.5}
    cfg = TrainConfig(epochs=2, lr=0.1, seed=1)
    a = fit(build_model("mlp:16", digits.input_shape, 10, seed=1), digits.train, cfg, teacher=teacher, method=kd,
            progress=False)
    cfg_live = TrainConfig(epochs=2, lr=0.1, seed=1, cache_teacher=False)
    b = fit(build_model("mlp:16", digits.input_shape, 10, seed=1), digits.train, cfg_live, teacher=teacher, method=kd,
            progress=False)
    assert torch.allclose(_params(a.model), _params(b.model), atol=1e-5)


def test_resume_continues_exactly(digits, tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.1, jitter=1, seed=2, optimizer="adam")
    spec = "mlp:32,dropout=0.2"
    full = fit(build_model(spec, digits.input_shape, 10, seed=2), digits.train, cfg, out_dir=tmp_path / "a", progress=False)

    class Crash(Exception):
        pass

    def crash_at_epoch_3(row):
        if row["epoch"] == 3:
            raise Crash

    with pytest.raises(Crash):  # dies during epoch 3, after the epoch-2 checkpoint was written
        fit(build_model(spec, digits.input_shape, 10, seed=2), digits.train, cfg, out_dir=tmp_path / "b",
            progress=False, on_eval=crash_at_epoch_3)
    fresh = build_model(spec, digits.input_shape, 10, seed=123)  # weights come from the checkpoint
    resumed = fit(fresh, digits.train, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert torch.equal(_params(resumed.model), _params(full.model))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["epoch"] == 4
    assert (tmp_path / "a" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("a/*.tmp"))


def test_bad_config_fails_before_work(digits):
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="method.alpha"):
        build_method("kd", alpha=2)
    with pytest.raises(ValueError, match="train.alpha: is an option of the method .* set method.alpha"):
        TrainConfig.from_dict({"alpha": 0.5})
    with pytest.raises(ValueError, match="unknown option"):
        TrainConfig.from_dict({"epochz": 3})
    teacher = build_model("mlp:8", digits.input_shape, 10)
    with pytest.raises(ValueError, match="alpha"):
        fit(build_model("mlp:8", digits.input_shape, 10), drop_labels(digits.train), TrainConfig(),
            teacher=teacher, method={"name": "kd", "alpha": 0.5}, progress=False)
    cached = ModuleTeacher(teacher).cache(digits.train)
    with pytest.raises(ValueError, match="jitter"):
        fit(build_model("mlp:8", digits.input_shape, 10), digits.train, TrainConfig(jitter=2), teacher=cached,
            progress=False)
    with pytest.raises(ValueError, match="resume: resume=True continues the run in out_dir; give out_dir"):
        fit(build_model("mlp:8", digits.input_shape, 10), digits.train, TrainConfig(), resume=True, progress=False)


def test_lr_schedules():
    assert lr_factor("constant", 50, 100, 0.1) == 1.0
    assert lr_factor("onecycle", 0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor("onecycle", 9, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 100, 100, 0.0) == pytest.approx(0.0)
    assert lr_factor("step", 80, 100, 0.0) == pytest.approx(0.01)
    assert [lr_factor("step", s, 100, 0.0) for s in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_step_schedule_at_milestone_epochs():
    """mdistiller's CIFAR schedule: x0.1 after epochs 150, 180 and 210 of 240, exactly at the epoch boundary."""
    cfg = TrainConfig(epochs=240, schedule="step", milestones=(150, 180, 210))
    spe = 782  # steps per epoch (50,000 images at batch 64)
    total = 240 * spe
    f = [lr_factor("step", e * spe + d, total, 0.0, cfg.decay_points()) for e in (150, 180, 210) for d in (-1, 0)]
    assert f == pytest.approx([1, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert TrainConfig(epochs=240, schedule="step").decay_points() == (0.5, 0.75)
    for bad, msg in (((180, 150), "increasing"), ((0, 10), "between 0"), ((240,), "between 0"), ((), "increasing")):
        with pytest.raises(ValueError, match=f"train.milestones: .*{msg}"):
            TrainConfig(epochs=240, schedule="step", milestones=bad)
    with pytest.raises(ValueError, match="schedule: step only"):
        TrainConfig(epochs=240, schedule="cosine", milestones=(150,))


def test_training_follows_the_milestones(digits):
    cfg = TrainConfig(epochs=4, batch_size=256, schedule="step", milestones=(1, 3), momentum=0.0, seed=0)
    r = fit(build_model("mlp:8", digits.input_shape, 10), digits.train, cfg, progress=False)
    assert [h["lr"] for h in r.history] == pytest.approx([0.05, 0.005, 0.005, 0.0005])
