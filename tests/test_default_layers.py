"""Feature methods without named layers: default stages per model family, paired deepest-first, one real step."""

import pytest
import torch

from ecosystem import need
from kdistill import TrainConfig, fit
from kdistill.methods.features import pair_defaults, resolve_pairs
from kdistill.models import build_model
from kdistill.models.stages import default_stages

FEATURE_TERM = {"fitnet": "loss_hint", "at": "loss_at"}


def _images(n=16, side=16, channels=1, classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, channels, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)


def _one_step(student, teacher, method, x, y):
    r = fit(student, (x, y), TrainConfig(epochs=1, batch_size=len(x)), teacher=teacher, method=method,
            progress=False)
    term = FEATURE_TERM[method]
    assert term in r.history[-1] and torch.isfinite(torch.tensor(r.history[-1][term]))
    return r


def test_cnn_declares_each_block_as_a_stage():
    net = build_model("cnn:4,8,16", (1, 16, 16), 3)
    stages, fam = default_stages(net)
    assert fam == "declared" and stages == ("features.2", "features.5", "features.8")
    assert all(isinstance(net.get_submodule(p), torch.nn.ReLU) for p in stages)
    assert default_stages(build_model("lenet5", (1, 28, 28), 3)) == (("features.2", "features.5"), "declared")
    assert default_stages(build_model("mlp:8", (1, 4, 4), 3)) == ((), None)


@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_cnn_to_cnn_without_layers_trains(method, capsys):
    x, y = _images()
    teacher = build_model("cnn:8,16,16", (1, 16, 16), 3, seed=1)
    student = build_model("cnn:4,8", (1, 16, 16), 3, seed=2)
    _one_step(student, teacher, method, x, y)
    said = capsys.readouterr().err
    if method == "at":  # the 2-stage student reads the 3-stage teacher's deepest 2 stages
        assert "student ['features.2', 'features.5'] (declared)" in said
        assert "teacher ['features.5', 'features.8'] (declared)" in said
    else:  # FitNets' hint: each network's middle stage
        assert "student ['features.5'] (declared)" in said and "teacher ['features.5'] (declared)" in said


def test_pairing_rules():
    s, t = ("a1", "a2", "a3"), ("b1", "b2", "b3", "b4")
    assert pair_defaults((), (), s, t, "all") == (s, ("b2", "b3", "b4"))
    assert pair_defaults((), (), s, t, "middle") == (("a2",), ("b3",))
    assert pair_defaults((), ("x", "y"), s, None, "all") == (("a2", "a3"), ("x", "y"))
    assert pair_defaults(("x",), (), None, t, "middle") == (("x",), ("b3",))
    assert pair_defaults(("x", "y"), (), None, t, "middle") == (("x", "y"), ("b3", "b4"))


def test_model_without_stages_is_one_clear_error():
    teacher = build_model("cnn:4", (1, 8, 8), 3)
    with pytest.raises(ValueError, match=r"method.student_layers: at found no default feature stages in the student "
                                         r"\(MLP"):
        resolve_pairs(build_model("mlp:8", (1, 8, 8), 3), teacher, (), (), "all", "at")


@pytest.mark.ecosystem
def test_torchvision_and_timm_families_pick_their_stages():
    need("torchvision")
    need("timm")
    want = {
        "tv:resnet18": (("layer1", "layer2", "layer3", "layer4"), "resnet"),
        "timm:resnet10t": (("layer1", "layer2", "layer3", "layer4"), "timm"),
        "tv:mobilenet_v2": (("features.3", "features.6", "features.13", "features.18"), "mobilenet"),
        "tv:mobilenet_v3_small": (("features.1", "features.3", "features.8", "features.12"), "mobilenet"),
        "tv:convnext_tiny": (("features.1", "features.3", "features.5", "features.7"), "convnext"),
        "timm:convnext_atto": (("stages.0", "stages.1", "stages.2", "stages.3"), "timm"),
        "timm:mobilenetv3_small_050": (("blocks.0", "blocks.1", "blocks.3", "blocks.5"), "timm"),
    }
    for spec, expected in want.items():
        net = build_model(spec, (3, 32, 32), 3, seed=0)
        assert default_stages(net) == expected, spec
    # The stride rule ends each resolution: every picked torchvision block halves nothing after itself.
    net = build_model("tv:mobilenet_v2", (3, 32, 32), 3, seed=0).eval()
    sizes = {}
    hooks = [net.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: sizes.__setitem__(p, o.shape[-1]))
             for p in default_stages(net)[0]]
    net(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert list(sizes.values()) == [8, 4, 2, 1]  # strides 4, 8, 16, 32


@pytest.mark.ecosystem
@pytest.mark.parametrize("method", ["fitnet", "at"])
@pytest.mark.parametrize("teacher_spec,student_spec", [("tv:resnet18", "timm:resnet10t"),
                                                       ("tv:convnext_tiny", "tv:mobilenet_v3_small")])
def test_library_models_without_layers_train_one_step(method, teacher_spec, student_spec, capsys):
    need("torchvision")
    need("timm")
    x, y = _images(n=8, side=32, channels=3)
    teacher = build_model(teacher_spec, (3, 32, 32), 3, seed=1)
    student = build_model(student_spec, (3, 32, 32), 3, seed=2)
    _one_step(student, teacher, method, x, y)
    assert f"kdistill: {method} pairs student" in capsys.readouterr().err
