"""Adapter specs (py:, tv:, timm:), logits extraction, weights files from elsewhere, custom-class models."""

import os
import pickle
import sys
import textwrap
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ecosystem import need
from kdistill.io import load_model, load_weights, read_model_meta, save_checkpoint, save_model
from kdistill.models import ModelSpec, build_model
from kdistill.models.adapters import describe_model
from kdistill.models.outputs import ensure_logits, logits_of

NETS = textwrap.dedent('''
    import math
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, in_shape, num_classes, hidden=8):
            super().__init__()
            self.hidden = hidden
            self.fc1 = nn.Linear(math.prod(in_shape), hidden)
            self.fc2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    class TupleNet(Net):
        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            return self.fc2(h), [h]

    class DictNet(Net):
        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            return {"out": self.fc2(h), "features": h}

    def make(in_shape, num_classes, hidden=8, double=False):
        return Net(in_shape, num_classes, hidden * 2 if double else hidden)

    def not_a_model(in_shape, num_classes):
        return 42
''')
SHAPE, CLASSES = (1, 4, 4), 3


@pytest.fixture
def nets_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


# ------------------------------------------------------------------------------------------------ py:

def test_py_file_factory_with_options_and_absolute_spec(nets_file, tmp_path, monkeypatch):
    model = build_model(f"py:{nets_file}:make,hidden=5,double=true", SHAPE, CLASSES, seed=0)
    assert model.hidden == 10 and model(torch.randn(2, *SHAPE)).shape == (2, CLASSES)
    parsed = ModelSpec.parse(f"py:{nets_file}:make,hidden=5")
    assert parsed.name == "py" and parsed.target == f"{nets_file}:make" and parsed.options == {"hidden": 5}
    monkeypatch.chdir(tmp_path)
    rel = build_model("py:nets.py:Net,hidden=4", SHAPE, CLASSES)
    assert rel.spec == f"py:{nets_file.resolve()}:Net,hidden=4" and rel.hidden == 4


def test_py_module_factory_from_sys_path(tmp_path, monkeypatch):
    pkg = tmp_path / "kd_adapter_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("py:kd_adapter_test_pkg.nets:make,hidden=6", SHAPE, CLASSES)
    assert model.hidden == 6 and model.spec == "py:kd_adapter_test_pkg.nets:make,hidden=6"
    for name in [m for m in sys.modules if m.startswith("kd_adapter_test_pkg")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("spec, match", [
    ("py:{dir}/missing.py:make", "no Python file"),
    ("py:{file}:nope", r"has no 'nope'.*make"),
    ("py:{file}:make,width=3", r"must take \(in_shape, num_classes"),
    ("py:{file}:not_a_model", "not a torch.nn.Module"),
    ("py:{file}", "py:FILE.py:FACTORY"),
    ("py:{file}:make,7", "key=value"),
    ("py:kd_no_such_module_xyz:make", "no module 'kd_no_such_module_xyz'"),
])
def test_py_errors_name_spec_and_problem(nets_file, spec, match):
    spec = spec.format(dir=nets_file.parent, file=nets_file)
    with pytest.raises(ValueError, match=match) as info:
        build_model(spec, SHAPE, CLASSES)
    assert repr(spec) in str(info.value)


# -------------------------------------------------------------------------------------------- logits

def test_tuple_and_dict_outputs_become_logits(nets_file):
    tup = build_model(f"py:{nets_file}:TupleNet", SHAPE, CLASSES)
    assert isinstance(tup(torch.randn(2, *SHAPE)), torch.Tensor)
    dic = build_model(f"py:{nets_file}:DictNet,logits_key=out", SHAPE, CLASSES)
    assert dic.logits_key == "out" and dic(torch.randn(2, *SHAPE)).shape == (2, CLASSES)
    bad = build_model(f"py:{nets_file}:DictNet", SHAPE, CLASSES)
    with pytest.raises(ValueError, match=r"no 'logits'.*features.*out.*logits_key"):
        bad(torch.randn(2, *SHAPE))


def test_logits_of_and_ensure_logits():
    t = torch.randn(2, 3)
    HFOut = type("HFOut", (), {"__init__": lambda self, logits: setattr(self, "logits", logits)})
    assert logits_of(t) is t and logits_of((t, 1)) is t and logits_of([t]) is t
    assert logits_of({"logits": t, "x": 0}) is t and logits_of(HFOut(t)) is t
    assert logits_of(namedtuple("Out", "logits aux")(t, None)) is t
    with pytest.raises(ValueError, match="cannot find logits"):
        logits_of(3)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return HFOut(self.fc(x))

    model = Pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ensure_logits(ensure_logits(model), "logits") is model
    assert len(model._forward_hooks) == 1
    assert model(torch.randn(2, 4)).shape == (2, 3)
    assert before.keys() == model.state_dict().keys()


# ------------------------------------------------------------------------------------------ tv / timm

@pytest.mark.ecosystem
def test_torchvision_builds_when_installed():
    need("torchvision")
    model = build_model("tv:resnet18", (3, 32, 32), 10)
    # eval: in training mode BatchNorm refuses one sample of 1x1 features (ValueError, not this test's subject)
    assert model.spec == "tv:resnet18" and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="no model 'nonexistent_net'"):
        build_model("tv:nonexistent_net", (3, 32, 32), 10)


@pytest.mark.ecosystem
def test_timm_builds_when_installed():
    need("timm")
    model = build_model("timm:resnet18,drop_rate=0.1", (1, 32, 32), 10)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("kind, module, extra", [("tv", "torchvision", "kdistill[tv]"), ("timm", "timm", "kdistill[timm]")])
def test_missing_library_names_the_extra(monkeypatch, kind, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed, also where it is
    with pytest.raises(ImportError) as info:
        build_model(f"{kind}:resnet18", (3, 32, 32), 10)
    assert f"pip install '{extra}'" in str(info.value)


# ------------------------------------------------------------------------------------------- weights

def _mlp():
    return build_model("mlp:8", SHAPE, CLASSES, seed=1)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_weights_reads_all_formats(tmp_path):
    model = _mlp()
    sd = model.state_dict()
    save_model(tmp_path / "model.safetensors", model, in_shape=list(SHAPE), num_classes=CLASSES)
    state, meta = load_weights(tmp_path / "model.safetensors")
    assert _same(state, sd) and meta["spec"] == "mlp:8" and meta["num_classes"] == CLASSES

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    state, meta = load_weights(tmp_path / "plain.safetensors")
    assert _same(state, sd) and meta == {}

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, *SHAPE)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "checkpoint.safetensors", model, opt, {"epoch": 1, "rng": {"torch": torch.get_rng_state()}})
    state, meta = load_weights(tmp_path / "checkpoint.safetensors")
    assert _same(state, model.state_dict()) and meta == {"spec": "mlp:8"}

    sd = model.state_dict()
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "best_acc": 0.5}, tmp_path / "w.bin")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("w.pt", "w.pth", "w.bin", "legacy.pt"):
        state, meta = load_weights(tmp_path / name)
        assert _same(state, sd) and meta == {}, name


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(marker)))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")
    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"w": 1}))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "garbage.bin").write_bytes(b"not weights")
    (tmp_path / "garbage.safetensors").write_bytes(b"not weights")
    for name, match in [("evil.pt", "never loaded"), ("module.pth", "state_dict"), ("state.pkl", "unknown weights format"),
                        ("tensor.pt", "not a state dict"), ("garbage.bin", "not a torch.save file"),
                        ("garbage.safetensors", "not a readable safetensors")]:
        with pytest.raises(ValueError, match=match) as info:
            load_weights(tmp_path / name)
        assert name in str(info.value) and "Accepted" in str(info.value)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "absent.safetensors")


def test_load_model_from_plain_state_dict_and_mismatches(tmp_path):
    model = _mlp()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="spec/in_shape/num_classes"):
        load_model(tmp_path / "w.pt")
    again = load_model(tmp_path / "w.pt", spec="mlp:8", in_shape=SHAPE, num_classes=CLASSES)
    assert _same(again.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match=r"w\.pt.*shape mismatch.*net\.\d+\.(weight|bias)"):
        load_model(tmp_path / "w.pt", spec="mlp:8", in_shape=SHAPE, num_classes=5)
    with pytest.raises(ValueError, match=r"w\.pt.*missing: net\.\d"):
        load_model(tmp_path / "w.pt", spec="mlp:8,6", in_shape=SHAPE, num_classes=CLASSES)


def test_adapter_model_saves_and_reloads_from_another_cwd(nets_file, tmp_path, monkeypatch):
    monkeypatch.chdir(nets_file.parent)
    model = build_model("py:nets.py:TupleNet,hidden=4", SHAPE, CLASSES)
    save_model(tmp_path / "m.safetensors", model, in_shape=list(SHAPE), num_classes=CLASSES)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    again = load_model(tmp_path / "m.safetensors", trust_code=True)  # the file's py: spec runs code: opted in
    x = torch.randn(2, *SHAPE)
    assert torch.equal(again.eval()(x), model.eval()(x))


def test_custom_module_model_reloads_via_describe_model(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "kd_user_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(src))
    import kd_user_nets  # the user's own module, imported normally

    model = kd_user_nets.Net(SHAPE, CLASSES)
    assert describe_model(model) == f"py:{(src / 'kd_user_nets.py').resolve()}:Net"
    save_model(tmp_path / "m.safetensors", model, in_shape=list(SHAPE), num_classes=CLASSES)
    monkeypatch.delitem(sys.modules, "kd_user_nets")
    monkeypatch.chdir(tmp_path)
    again = load_model(tmp_path / "m.safetensors", trust_code=True)
    assert _same(again.state_dict(), model.state_dict())

    class Local(nn.Module):  # not at module level: cannot be rebuilt by name
        def __init__(self, in_shape, num_classes):
            super().__init__()
            self.fc = nn.Linear(16, num_classes)

    local = Local(SHAPE, CLASSES)
    assert describe_model(local) is None and describe_model(nn.Linear(2, 2)) is None
    save_model(tmp_path / "local.safetensors", local, in_shape=list(SHAPE), num_classes=CLASSES)
    assert read_model_meta(tmp_path / "local.safetensors")["class"].endswith("Local")
    with pytest.raises(ValueError, match=r"Local.*pass a spec.*--model py:FILE\.py:FACTORY"):
        load_model(tmp_path / "local.safetensors")
