import pytest
import torch
from torch import nn

from kdistill.models import MLP, build_model, count_flops, count_parameters, ModelSpec


def test_spec_parsing_and_options():
    spec = ModelSpec.parse("mlp:1200,1200,dropout=0.5,input_dropout=0.2,activation=leaky_relu,max_norm=15")
    assert spec.ints == (1200, 1200) and spec.options["dropout"] == 0.5 and spec.options["activation"] == "leaky_relu"
    m = build_model("mlp:30,20,dropout=0.5,input_dropout=0.2,max_norm=2.0", (1, 8, 8), 10)
    assert isinstance(m, MLP) and m.hidden == (30, 20) and m.spec.startswith("mlp:")
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 3
    assert m(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("bad, match", [
    ("resnet9000", "unknown model"),
    ("mlp:10,bogus", "cannot read"),
    ("mlp:10,dropout=0.5,20", "widths must come before"),
    ("mlp:10,color=red", "unknown option"),
    ("mlp:10,activation=swishy", "activation"),
    ("mlp:10,dropout=1.5", "dropout"),
])
def test_bad_specs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model(bad, (1, 8, 8), 10)


def test_parameter_and_flop_counts_match_hand_counts():
    m = build_model("mlp:1200,1200", (1, 28, 28), 10)
    assert count_parameters(m) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert count_flops(m, (1, 28, 28)) == 2 * (784 * 1200 + 1200 * 1200 + 1200 * 10)
    c = build_model("cnn:4,8,hidden=16", (1, 8, 8), 10)
    # conv1: 4 maps of 8x8, 1*5*5 MACs each; conv2: 8 maps of 4x4, 4*5*5; fc 8*2*2 -> 16 -> 10
    want = 2 * (4 * 64 * 25 + 8 * 16 * 4 * 25 + 32 * 16 + 16 * 10)
    assert count_flops(c, (1, 8, 8)) == want


def test_seeded_build_is_reproducible_and_lenet_runs():
    a = build_model("mlp:16", (1, 8, 8), 10, seed=5)
    b = build_model("mlp:16", (1, 8, 8), 10, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    lenet = build_model("lenet5", (1, 28, 28), 10)
    assert lenet(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_max_norm_constraint():
    m = build_model("mlp:32,max_norm=0.5", (1, 8, 8), 10)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(100)
    m.constrain()
    for layer in m.modules():
        if isinstance(layer, nn.Linear):
            assert layer.weight.norm(dim=1).max() <= 0.5 + 1e-5


def test_max_norm_on_a_channels_last_conv():
    """The constraint works in place on conv weights in any layout (channels_last weights cannot be viewed flat)."""
    from kdistill.models.mlp import apply_max_norm

    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(100)
        conv.weight[0].zero_().add_(0.01)  # a unit already inside the ball stays as it is
    keep = conv.weight[0].clone()
    apply_max_norm(conv, 0.5)
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-5 and torch.equal(conv.weight[0], keep)
    assert float(norms[1:].min()) == pytest.approx(0.5, rel=1e-5)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("spec", ["cnn:8,16", "lenet5"])
def test_pooling_before_relu_is_the_same_function_and_gradient(spec):
    """The conv nets pool before their ReLU (cheaper); a ReLU-then-pool copy of the same weights must give
    bitwise the same logits and weight gradients, ties included (MNIST's flat background makes many)."""
    net = build_model(spec, (1, 28, 28), 10, seed=0)
    with torch.no_grad():  # a positive bias on the first conv: the flat background gives tied positive maxima
        net.features[0].bias.add_(0.5)
    relu_first = nn.Sequential(*[
        m for pair in zip(net.features[0::3], net.features[2::3], net.features[1::3]) for m in pair
    ])
    assert [type(m) for m in relu_first[1:3]] == [nn.ReLU, nn.MaxPool2d]
    x = torch.randn(16, 1, 28, 28)
    x[:, :, :8] = 0.0  # blank rows, as in a digit's margin
    y = torch.randint(0, 10, (16,))
    net.eval()  # dropout off, so both passes see the same function

    def grads(features):
        net.zero_grad()
        logits = net.head(features(x))
        nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad.clone() for p in net.parameters()]

    fast, slow = grads(net.features), grads(relu_first)
    assert torch.equal(fast[0], slow[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))
