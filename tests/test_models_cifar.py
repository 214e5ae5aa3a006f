"""The CRD / mdistiller CIFAR zoo: shapes, parameter counts against the CRD table, hookable stages."""

import pytest
import torch

from kdistill.models import build_model, count_parameters

# Parameter counts (millions) at 100 classes, from the CRD paper's table.
CRD_PARAMS_M = {
    "resnet8": 0.08, "resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn:16,2": 0.70, "wrn:40,2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
}
ALL = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
       "resnet32x4", "wrn:16,2", "wrn:40,2", "wrn_16_1", "vgg8", "vgg11", "vgg13"]
SMALL = ["resnet8", "resnet20", "resnet8x4", "wrn:16,1", "wrn:16,2", "vgg8", "vgg11"]


@pytest.mark.parametrize("spec", list(CRD_PARAMS_M))
def test_parameter_counts_match_crd_table(spec):
    """Within 2%, or within the table's rounding to 0.01M for the smallest (resnet8: 0.0839M -> "0.08")."""
    got, want = count_parameters(build_model(spec, (3, 32, 32), 100)) / 1e6, CRD_PARAMS_M[spec]
    assert abs(got - want) <= max(0.02 * want, 0.005), f"{spec}: {got:.4f}M"


@pytest.mark.parametrize("spec", SMALL)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_gives_logits_and_stages_hook(spec, num_classes):
    model = build_model(spec, (3, 32, 32), num_classes, seed=0).eval()
    assert model.spec == spec
    seen: dict[str, tuple[int, ...]] = {}
    for path in type(model).feature_layers:
        model.get_submodule(path).register_forward_hook(lambda m, a, out, p=path: seen.__setitem__(p, out.shape))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert list(seen) == list(model.feature_layers) and all(s[0] == 2 and len(s) == 4 for s in seen.values())


def _expected_stages(spec: str) -> dict[str, tuple[int, int, int]]:
    """The CIFAR layout of each family at 32x32: (channels, height, width) of every named stage.

    ResNets and WRNs: three stages at strides 1, 2, 4 with 16, 32, 64 channels (x4 for resnet8x4/32x4, xk for
    WRN-d-k); VGG (mdistiller): five blocks of 64..512 channels at strides 1, 2, 4, 8, 8 (pool3 runs only at 64x64).
    """
    if spec.startswith("vgg"):
        return {f"block{i}": (c, 32 // s, 32 // s) for i, (c, s) in enumerate(zip((64, 128, 256, 512, 512),
                                                                                    (1, 2, 4, 8, 8)))}
    if spec.startswith("wrn"):
        k = int(spec.replace("_", ",").split(",")[-1])
        return {f"block{i + 1}": (c * k, 32 // s, 32 // s) for i, (c, s) in enumerate(zip((16, 32, 64), (1, 2, 4)))}
    k = 4 if spec.endswith("x4") else 1
    return {f"layer{i + 1}": (c * k, 32 // s, 32 // s) for i, (c, s) in enumerate(zip((16, 32, 64), (1, 2, 4)))}


@pytest.mark.parametrize("spec", ALL)
def test_every_model_builds_and_resolves_feature_layers(spec):
    """Each named feature layer resolves to a module whose output has its family's channels and stride."""
    model = build_model(spec, (3, 32, 32), 10, seed=0).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    for p in model.feature_layers:
        model.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: shapes.__setitem__(p, tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert list(model.feature_layers) == list(_expected_stages(spec))
    assert shapes == _expected_stages(spec)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 12, 20), (3, 64, 64)])
def test_other_input_sizes(shape):
    for spec in ("resnet8", "wrn:16,1", "vgg8"):
        model = build_model(spec, shape, 5).eval()
        with torch.no_grad():
            assert model(torch.randn(1, *shape)).shape == (1, 5)


def test_resnet_stage_shapes_follow_cifar_layout():
    model = build_model("resnet8x4", (3, 32, 32), 10).eval()
    shapes = {}
    for p in model.feature_layers:
        model.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: shapes.__setitem__(p, tuple(out.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (1, 64, 32, 32), "layer2": (1, 128, 16, 16), "layer3": (1, 256, 8, 8)}


def test_state_dict_keys_follow_mdistiller():
    """Parameter names match mdistiller's, so its (and CRD's) teacher weights load unchanged."""
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "fc.weight"} <= set(build_model("resnet8x4", (3, 32, 32), 10).state_dict())
    assert {"block2.layer.0.convShortcut.weight", "block1.layer.0.bn1.weight", "bn1.weight", "fc.bias"} <= set(
        build_model("wrn:16,2", (3, 32, 32), 10).state_dict())
    assert {"block0.0.weight", "block0.1.running_mean", "block4.0.weight", "classifier.weight"} <= set(
        build_model("vgg8", (3, 32, 32), 10).state_dict())


@pytest.mark.parametrize("bad, match", [
    ("wrn:15,2", r"wrn:15,2.*6n\+4"),
    ("wrn:16,0", r"wrn:16,0.*width"),
    ("wrn", r"DEPTH"),
    ("wrn:16,2,dropout=2", r"dropout"),
    ("resnet20:3", r"resnet20 takes no positional"),
    ("vgg8,color=red", r"unknown"),
])
def test_bad_specs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model(bad, (3, 32, 32), 10)


@pytest.mark.parametrize("shape, match", [((3 * 32 * 32,), "image input"), ((3, 4, 4), "at least 8x8")])
def test_bad_input_shapes_are_clear_errors(shape, match):
    for spec in ("resnet20", "wrn:16,2", "vgg8"):
        with pytest.raises(ValueError, match=match):
            build_model(spec, shape, 10)
