"""The general engine: user modules and Datasets, streamed == in-memory, methods as modules, cached views."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from kdistill import TrainConfig, fit
from kdistill.data import TensorData
from kdistill.data.augment import parse_augment
from kdistill.methods import Method, StepIO, build_method, register
from kdistill.models import build_model


def _images(n=96, classes=3, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, side, side, generator=g) * 0.3
    x[torch.arange(n), y % 3] += (0.7 * (1 + y // 3)).view(n, 1, 1)  # the class: which channel is bright, how bright
    return x, y


class PairData(Dataset):
    """A user's own map-style Dataset of (image, label): not a TensorData."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class SmallNet(nn.Module):
    def __init__(self, width=16, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args)


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])


def test_readme_api_example_user_modules_and_dataset():
    x, y = _images()
    train, test = PairData(x[:72], y[:72]), PairData(x[72:], y[72:])
    # The README's ten lines: a user's own teacher, student and Dataset (seeded; 20 student epochs, as the
    # README's 30, since 3 leave the 8-wide student at chance for some seeds).
    torch.manual_seed(0)
    teacher, student = SmallNet(32), SmallNet(8)
    fit(teacher, train, TrainConfig(epochs=3, batch_size=24, lr=0.1), progress=False)
    result = fit(student, train, TrainConfig(epochs=20, batch_size=24, lr=0.1), teacher=teacher,
                 method={"name": "kd", "temperature": 4.0, "alpha": 0.9}, test=test, progress=False)
    # Learnt: 3 balanced classes (chance 1/3), 1.0 in the seeded run; the soft term shrank as the student
    # came to match the teacher (0.084 -> 0.004 in the seeded run).
    assert result.test["count"] == 24 and result.test["accuracy"] >= 0.9
    first, last = result.history[0], result.history[-1]
    assert last["loss_ce"] > 0 and 0 < last["loss_kd"] < 0.5 * first["loss_kd"]
    with torch.no_grad():
        agree = (student(x[72:]).argmax(1) == teacher(x[72:]).argmax(1)).float().mean()
    assert agree >= 0.9
    # The teacher is handed back as it was given: its own train(), trainable, in the mode it had.
    assert "train" not in vars(teacher) and all(p.requires_grad for p in teacher.parameters())


def test_teacher_left_in_its_mode_and_never_updated():
    x, y = _images()
    teacher = SmallNet(16).train()
    before = copy.deepcopy(teacher.state_dict())
    fit(SmallNet(8), (x, y), TrainConfig(epochs=1, batch_size=32, augment="crop1,flip"), teacher=teacher, progress=False)
    assert teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("augment", ["", "crop2,flip"])
def test_streamed_dataset_trains_exactly_like_in_memory(augment):
    x, y = _images()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, augment=augment, seed=3)
    teacher = SmallNet(16)
    torch.manual_seed(0)
    a = SmallNet(8)
    b = copy.deepcopy(a)
    ra = fit(a, TensorData(x, y, classes=("a", "b", "c")), cfg, teacher=copy.deepcopy(teacher), progress=False)
    rb = fit(b, PairData(x, y), cfg, teacher=copy.deepcopy(teacher), progress=False)
    assert torch.allclose(_params(a), _params(b), atol=1e-6)
    assert [h["train_loss"] for h in ra.history] == pytest.approx([h["train_loss"] for h in rb.history], abs=1e-6)


def test_numpy_and_float64_inputs_are_accepted():
    x, y = _images(48)
    r = fit(SmallNet(4), (x.double().numpy(), y.numpy()), TrainConfig(epochs=1, batch_size=16), progress=False,
            test=(x.numpy(), y.numpy()))
    assert r.test["count"] == 48
    with pytest.raises(ValueError, match="y"):
        fit(SmallNet(4), (x.numpy(), y.numpy() + 0.5), TrainConfig(epochs=1), progress=False)


_SEEN: list = []


@register("test_probe")
class Probe(Method):
    """A toy method defined in this test file alone: KD at T=1 that records what the step handed it."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @property
    def needs_labels(self):
        return False

    def losses(self, io: StepIO):
        _SEEN.append((io.student_logits.detach().clone(), io.teacher_logits.detach().clone()))
        p = torch.log_softmax(io.teacher_logits, -1)
        q = torch.log_softmax(io.student_logits.float(), -1)
        return {"probe": self.weight * torch.nn.functional.kl_div(q, p, reduction="batchmean", log_target=True)}


class Recorder(nn.Module):
    """Wraps a network and keeps the inputs of its training forwards."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        if self.training:
            self.inputs.append(x.detach().clone())
        return self.net(x)


def test_toy_method_registered_from_a_test_file_trains():
    x, y = _images()
    teacher = SmallNet(16)
    student = SmallNet(8)
    r = fit(student, (x, y), TrainConfig(epochs=4, batch_size=16, lr=0.2), teacher=teacher,
            method=build_method("test_probe", weight=2.0), progress=False)
    losses = [h["loss_probe"] for h in r.history]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("views", [0, 3])
def test_teacher_sees_the_students_pixels(views):
    """Live or cached per view, the teacher's logits in each step are its outputs on the student's exact input."""
    _SEEN.clear()
    x, y = _images(48)
    teacher = SmallNet(16).eval()
    student = Recorder(SmallNet(8))
    fit(student, (x, y), TrainConfig(epochs=2, batch_size=16, augment="crop2,flip", teacher_views=views),
        teacher=teacher, method="test_probe", progress=False)
    assert len(student.inputs) == len(_SEEN) == 6
    with torch.no_grad():
        for xin, (_, t_logits) in zip(student.inputs, _SEEN):
            assert torch.allclose(teacher(xin), t_logits, atol=1e-5)
    assert not torch.equal(student.inputs[0], x[:16])  # augmented indeed


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.samples = net, 0

    def forward(self, x):
        self.samples += x.shape[0]
        return self.net(x)


def test_cached_views_run_the_teacher_k_times_and_are_reused_then_refused(tmp_path):
    x, y = _images(60)
    k = 4
    teacher = Counting(SmallNet(16))
    cfg = TrainConfig(epochs=3, batch_size=20, augment="crop2,flip", teacher_views=k,
                      teacher_cache=str(tmp_path / "views.safetensors"))
    fit(SmallNet(8), (x, y), cfg, teacher=teacher, progress=False)
    assert teacher.samples == 60 * k  # once per sample and view, never during the 3 epochs
    fit(SmallNet(8), (x, y), cfg, teacher=teacher, progress=False)
    assert teacher.samples == 60 * k  # the second run reuses the file
    with torch.no_grad():
        teacher.net.head.weight.add_(0.1)
    with pytest.raises(ValueError, match="teacher_cache.*teacher_sha256"):
        fit(SmallNet(8), (x, y), cfg, teacher=teacher, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "augment": "crop1"})
    with pytest.raises(ValueError, match="augment"):
        fit(SmallNet(8), (x, y), other, teacher=Counting(SmallNet(16)), progress=False)


def test_topk_views_keep_the_top_logits(tmp_path):
    x, y = _images(40, classes=5)
    teacher = SmallNet(16, classes=5).eval()
    _SEEN.clear()
    fit(Recorder(SmallNet(8, classes=5)), (x, y), TrainConfig(epochs=1, batch_size=20, augment="flip", teacher_views=2,
        teacher_topk=2), teacher=teacher, method="test_probe", progress=False)
    _, t_logits = _SEEN[0]
    assert t_logits.shape == (20, 5)
    # Three of five classes share the fill value; the top two are the teacher's own logits.
    assert (t_logits.sort(dim=1).values[:, :3].diff(dim=1).abs() < 1e-6).all()


@pytest.mark.parametrize("method", ["dkd", "fitnet", "at"])
def test_feature_and_decoupled_methods_train(method, tmp_path):
    x, y = _images(64, side=16)
    teacher = build_model("resnet8", (3, 16, 16), 3, seed=1)
    student = build_model("resnet8", (3, 16, 16), 3, seed=2)
    cfg = TrainConfig(epochs=2, batch_size=16, augment="crop2,flip")
    r = fit(student, (x, y), cfg, teacher=teacher, method=method, out_dir=tmp_path / "a", progress=False)
    term = {"dkd": "loss_dkd", "fitnet": "loss_hint", "at": "loss_at"}[method]
    assert term in r.history[-1] and "loss_ce" in r.history[-1]
    # Resuming a finished run reproduces it, regressors included.
    again = build_model("resnet8", (3, 16, 16), 3, seed=2)
    r2 = fit(again, (x, y), cfg, teacher=teacher, method=method, out_dir=tmp_path / "a", resume=True, progress=False)
    assert torch.equal(_params(again), _params(student)) and r2.history == r.history


def test_fitnet_regressor_is_trained_and_checkpointed(tmp_path):
    from safetensors.torch import load_file

    x, y = _images(32, side=16)
    method = build_method("fitnet")
    fit(build_model("resnet8", (3, 16, 16), 3, seed=2), (x, y), TrainConfig(epochs=1, batch_size=16),
        teacher=build_model("resnet20", (3, 16, 16), 3, seed=1), method=method, out_dir=tmp_path, progress=False)
    assert len(method.regressors) == 1
    keys = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert any(k.startswith("extra.method.regressors.0") for k in keys)
    assert any(k.startswith("optim.") and int(k.split(".")[1]) >= len(list(build_model("resnet8", (3, 16, 16), 3).parameters()))
               for k in keys)  # the optimiser holds the regressor's state too


def test_feature_method_with_cached_logits_is_refused(digits):
    from kdistill.teachers.base import CachedTeacher

    cached = CachedTeacher(digits.train.index, torch.zeros(len(digits.train), 10))
    with pytest.raises(ValueError, match="features are not cached"):
        fit(build_model("cnn:4", digits.input_shape, 10), digits.train, TrainConfig(epochs=1), teacher=cached,
            method={"name": "at", "student_layers": ["features.0"], "teacher_layers": ["features.0"]}, progress=False)


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        build_method("kd", alfa=0.5)
    with pytest.raises(ValueError, match="unknown method 'kdd'"):
        build_method("kdd")
    with pytest.raises(ValueError, match="method.temperature"):
        build_method("kd", temperature=float("inf"))
    assert build_method("dkd", {"beta": "8"}).beta == 8.0  # YAML 1.1 strings coerced by the option's type


def test_keep_best_survives_a_resume(tmp_path):
    from kdistill.engine import Callback

    x, y = _images(96)
    val = (x[:30], y[:30])

    class Stop(Callback):
        def on_epoch_end(self, state, rows):
            if state.epoch == 2:
                raise KeyboardInterrupt

    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.3, keep_best=True)
    # Both runs start from the same seeded weights, whatever ran before this test (the resumed net's own
    # initial weights are replaced by the checkpoint's).
    full = fit(_seeded(SmallNet, 8), (x, y), cfg, val=val, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_seeded(SmallNet, 8), (x, y), cfg, val=val, out_dir=tmp_path / "b", progress=False, callbacks=[Stop()])
    resumed = fit(SmallNet(8), (x, y), cfg, val=val, out_dir=tmp_path / "b", resume=True, progress=False)
    assert full.best_epoch in (1, 2)  # chosen before the interruption: the resumed run has it from the checkpoint
    assert resumed.best_epoch == full.best_epoch
    assert torch.equal(_params(resumed.model), _params(full.model))


def test_wrong_output_count_is_refused_before_training():
    x, y = _images(32)
    with pytest.raises(ValueError, match="3 classes"):
        fit(SmallNet(8, classes=5), (x, y), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="augment"):
        parse_augment("crp2")


def test_streamed_run_resumes_exactly_after_an_interruption(tmp_path):
    from kdistill.engine import Callback

    x, y = _images(64)

    class Stop(Callback):
        def on_epoch_end(self, state, rows):
            if state.epoch == 1:
                raise KeyboardInterrupt

    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, augment="crop1,flip", workers=1)
    teacher = SmallNet(16)
    torch.manual_seed(0)
    init = SmallNet(8)
    full = fit(copy.deepcopy(init), PairData(x, y), cfg, teacher=teacher, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(copy.deepcopy(init), PairData(x, y), cfg, teacher=teacher, out_dir=tmp_path / "b", progress=False,
            callbacks=[Stop()])
    resumed = fit(copy.deepcopy(init), PairData(x, y), cfg, teacher=teacher, out_dir=tmp_path / "b", resume=True,
                  progress=False)
    assert torch.equal(_params(resumed.model), _params(full.model))
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") == 3


def test_compile_on_cpu_trains_as_eager_and_compiles_the_live_teacher(monkeypatch):
    """``train.compile`` on a CPU: the student and the frozen teacher both go through torch.compile (counted),
    training follows the eager run, and a caller's ModuleTeacher is handed back no longer compiling."""
    from kdistill.teachers.base import ModuleTeacher

    x, y = _images(64)
    compiled_modules = []
    real_compile = torch.compile

    def counting_compile(module, *args, **kwargs):
        compiled_modules.append(type(module).__name__)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, augment="crop2,flip", seed=0, checkpoint=False)
    teacher = ModuleTeacher(SmallNet(16).eval())
    eager = fit(_seeded(SmallNet, 8), (x, y), cfg, teacher=teacher, progress=False)
    assert compiled_modules == []
    compiled = fit(_seeded(SmallNet, 8), (x, y), TrainConfig(**{**cfg.__dict__, "compile": True}), teacher=teacher,
                   progress=False)
    assert len(compiled_modules) == 2  # the student's network and the teacher's (BatchNorm-folded) network
    assert not teacher.compile
    assert torch.allclose(_params(eager.model), _params(compiled.model), atol=1e-4, rtol=0)


def test_streamed_workers_persist_across_epochs_and_train_like_in_memory(monkeypatch):
    """With DataLoader workers, one loader (one set of worker processes) serves every epoch of a streamed run,
    and the run still equals the in-memory one."""
    import kdistill.data.stream as stream

    built = []
    real = stream.DataLoader

    def counting(*args, **kwargs):
        built.append(kwargs.get("persistent_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "DataLoader", counting)
    x, y = _images(64)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, augment="crop1,flip", seed=1, workers=2, checkpoint=False)
    a = fit(_seeded(SmallNet, 8), TensorData(x, y, classes=("a", "b", "c")), cfg, progress=False)
    b = fit(_seeded(SmallNet, 8), PairData(x, y), cfg, progress=False)
    assert built.count(True) == 1  # one persistent loader for the 3 streamed epochs (others: one-pass reads)
    assert torch.allclose(_params(a.model), _params(b.model), atol=1e-6)
