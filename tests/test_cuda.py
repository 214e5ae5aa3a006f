"""The CUDA path: data on the device, bf16 autocast on CUDA only, no host synchronisation per step.

Skipped where no GPU is visible (CI has none); run them on a GPU machine with ``python3 -m pytest
tests/test_cuda.py``. Each test can fail there: they count the host synchronisations torch reports
(``torch.cuda.set_sync_debug_mode``), look at the dtypes that actually flow, and compare results.
"""

import warnings

import pytest
import torch

import kdistill.sweeps.multi
import kdistill.engine
from kdistill import TrainConfig, fit
from kdistill.engine.cuda_graph import GraphedStep
from kdistill.data import TensorData
from kdistill.models import build_model
from kdistill.sweeps.multi import fit_many
from kdistill.teachers.base import ModuleTeacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sync_count(fn) -> int:
    """How many synchronising CUDA calls ``fn()`` makes, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.fixture(scope="module")
def teacher(digits):
    t = build_model("mlp:48", digits.input_shape, 10, seed=0)
    fit(t, digits.train, TrainConfig(epochs=3, lr=0.1, batch_size=64, device="cuda"), progress=False)
    return t.eval()


def _first(data: TensorData, n: int) -> TensorData:
    return data.subset(torch.arange(n))


@pytest.mark.parametrize("jitter", [0, 1])
def test_fit_synchronises_per_epoch_not_per_step(digits, teacher, jitter):
    # 4x the steps must not add a single synchronisation: the loop never waits for the GPU mid-epoch.
    def run(n):
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, jitter=jitter, device="cuda")
        return lambda: fit(build_model("mlp:32", digits.input_shape, 10, seed=0), _first(digits.train, n), cfg,
                           teacher=ModuleTeacher(teacher), method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
                           progress=False)

    few, many = _sync_count(run(160)), _sync_count(run(640))  # 10 vs 40 steps per epoch
    assert many <= few, f"{few} synchronisations for 20 steps, {many} for 80"  # one per step would add 60


def test_fit_many_synchronises_per_epoch_not_per_step(digits, teacher):
    def run(n):
        cfgs = [TrainConfig(epochs=2, batch_size=16, lr=0.05, jitter=1, device="cuda") for _ in range(2)]
        methods = [{"name": "kd", "temperature": t} for t in (2.0, 5.0)]
        return lambda: fit_many([build_model("mlp:32", digits.input_shape, 10, seed=s) for s in (0, 1)],
                                _first(digits.train, n), cfgs, teacher=ModuleTeacher(teacher), methods=methods,
                                progress=False)

    few, many = _sync_count(run(160)), _sync_count(run(640))
    assert many <= few, f"{few} synchronisations for 20 steps, {many} for 80"


@pytest.mark.parametrize("amp, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_amp_means_bf16_activations_and_float32_weights(digits, teacher, amp, want):
    student = build_model("mlp:32", digits.input_shape, 10, seed=0)
    seen = []
    first = next(m for m in student.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda m, i, o: seen.append((o.dtype, o.device.type)))
    t_before = [p.detach().clone() for p in teacher.parameters()]
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1, amp=amp, jitter=1, device="cuda")
    r = fit(student, digits.train, cfg, teacher=teacher, method={"name": "kd", "temperature": 4.0}, test=digits.test,
            progress=False)
    assert (want, "cuda") in seen
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in student.parameters())
    assert r.test["errors"] < 0.3 * len(digits.test)  # it learns in bf16 too (float32 on the CPU: 48 of 359)
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters())), "the teacher was updated"
    assert not teacher.training


def test_fit_many_equals_fit_on_cuda(digits, teacher):
    # fit_many trains in float32, so its students equal fit's with amp=False (TF32 off, torch's default).
    assert not torch.backends.cuda.matmul.allow_tf32
    cfgs = [TrainConfig(epochs=2, batch_size=32, lr=0.05, jitter=1, amp=False, device="cuda") for _ in range(2)]
    methods = [{"name": "kd", "temperature": t, "alpha": a} for t, a in [(2.0, 1.0), (6.0, 0.7)]]
    together = fit_many([build_model("mlp:24,16", digits.input_shape, 10, seed=0) for _ in cfgs], digits.train, cfgs,
                        teacher=teacher, methods=methods, progress=False)
    for cfg, method, r in zip(cfgs, methods, together):
        alone = fit(build_model("mlp:24,16", digits.input_shape, 10, seed=0), digits.train, cfg, teacher=teacher,
                    method=method, progress=False)
        a = torch.cat([p.detach().flatten() for p in r.model.parameters()])
        b = torch.cat([p.detach().flatten() for p in alone.model.parameters()])
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (method, (a - b).abs().max().item())


def test_cnn_trains_channels_last_on_cuda(digits, teacher):
    student = build_model("cnn:4,8,hidden=16", digits.input_shape, 10, seed=0)
    layouts = []
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_pre_hook(lambda m, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    r = fit(student, digits.train, TrainConfig(epochs=4, batch_size=32, lr=0.1, device="cuda"),
            teacher=teacher, method={"name": "kd", "temperature": 4.0}, test=digits.test, progress=False)
    assert layouts and all(layouts)
    assert r.test["errors"] < 0.5 * len(digits.test)  # float32 on the CPU: 107 of 359


class _Recorder(GraphedStep):
    made: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _Recorder.made.append(self)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optimizer, jitter, alpha", [("sgd", 1, 0.5), ("adam", 0, 1.0), ("sgd", 0, 0.0)])
def test_graphed_steps_equal_eager_steps(digits, teacher, monkeypatch, optimizer, jitter, alpha):
    # Live teacher (jitter), cached teacher, and plain supervised training; onecycle changes lr every step.
    monkeypatch.setattr(kdistill.engine, "GraphedStep", _Recorder)
    _Recorder.made = []
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05 if optimizer == "sgd" else 3e-3, optimizer=optimizer,
                      jitter=jitter, amp=False, device="cuda", max_norm=3.0)
    tch = teacher if alpha > 0 else None
    method = {"name": "kd", "temperature": 4.0, "alpha": alpha} if tch is not None else None  # None: CE
    graphed = fit(build_model("mlp:32,16", digits.input_shape, 10, seed=0), digits.train, cfg, teacher=tch,
                  method=method, val=digits.val, progress=False)
    assert len(_Recorder.made) == 1 and _Recorder.made[0].graph is not None, "the step was not captured"
    assert _Recorder.made[0].calls == 3 * (len(digits.train) // 32)
    cfg.cuda_graph = False
    eager = fit(build_model("mlp:32,16", digits.input_shape, 10, seed=0), digits.train, cfg, teacher=tch,
                method=method, val=digits.val, progress=False)
    assert len(_Recorder.made) == 1  # no graph without cuda_graph
    assert torch.allclose(_flat(graphed.model), _flat(eager.model), atol=1e-5, rtol=0)
    assert [h["train_loss"] for h in graphed.history] == pytest.approx([h["train_loss"] for h in eager.history], abs=1e-5)
    assert [h["lr"] for h in graphed.history] == pytest.approx([h["lr"] for h in eager.history])


@pytest.mark.parametrize("optimizer, lrs, jitter, graphed", [
    ("sgd", (0.05, 0.1), 1, True),     # per-student rates: the hand-written update, live teacher
    ("adam", (3e-3, 3e-3), 0, True),   # shared rate: torch's fused (capturable) Adam, cached teacher
    ("adam", (3e-3, 1e-3), 0, False),  # hand-written Adam: host-side bias corrections, so no graph
])
def test_graphed_sweep_equals_eager_sweep(digits, teacher, monkeypatch, optimizer, lrs, jitter, graphed):
    monkeypatch.setattr(kdistill.sweeps.multi, "GraphedStep", _Recorder)
    _Recorder.made = []

    def sweep(cuda_graph):
        cfgs = [TrainConfig(epochs=2, batch_size=32, optimizer=optimizer, lr=lr, jitter=jitter,
                            seed=s, amp=False, device="cuda", cuda_graph=cuda_graph)
                for lr, s in zip(lrs, (0, 1))]  # two seeds: two batch groups
        methods = [{"name": "kd", "temperature": t, "alpha": 0.7} for t in (2.0, 5.0)]
        models = [build_model("mlp:24,16", digits.input_shape, 10, seed=s) for s in (0, 1)]
        return fit_many(models, digits.train, cfgs, teacher=teacher, methods=methods, progress=False)

    a = sweep(True)
    assert len(_Recorder.made) == int(graphed) and all(g.graph is not None for g in _Recorder.made)
    b = sweep(False)
    for ra, rb in zip(a, b):
        assert torch.allclose(_flat(ra.model), _flat(rb.model), atol=1e-5, rtol=0)
        assert ra.history[-1]["train_loss"] == pytest.approx(rb.history[-1]["train_loss"], abs=1e-5)


class _HostSyncMLP(torch.nn.Module):
    """A model that asks the host for a value every forward: cannot be captured."""

    def __init__(self):
        super().__init__()
        self.net = build_model("mlp:16", (1, 8, 8), 10, seed=0)

    def forward(self, x):
        if x.abs().sum().item() < 0:  # always false, but needs the host
            x = -x
        return self.net(x)


def test_uncapturable_step_falls_back_to_eager_with_a_warning(digits, teacher):
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, amp=False, device="cuda")
    kd = {"name": "kd", "temperature": 4.0}
    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        a = fit(_HostSyncMLP(), digits.train, cfg, teacher=teacher, method=kd, progress=False)
    cfg.cuda_graph = False
    b = fit(_HostSyncMLP(), digits.train, cfg, teacher=teacher, method=kd, progress=False)
    assert torch.allclose(_flat(a.model), _flat(b.model), atol=1e-5, rtol=0)


def test_compiled_student_matches_eager(digits, teacher):
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, amp=False, device="cuda")
    eager = fit(build_model("mlp:32", digits.input_shape, 10, seed=0), digits.train, cfg, teacher=teacher, progress=False)
    cfg.compile = True
    compiled = fit(build_model("mlp:32", digits.input_shape, 10, seed=0), digits.train, cfg, teacher=teacher,
                   progress=False)
    a = torch.cat([p.detach().flatten() for p in eager.model.parameters()])
    b = torch.cat([p.detach().flatten() for p in compiled.model.parameters()])
    assert torch.allclose(a, b, atol=1e-3, rtol=0)
