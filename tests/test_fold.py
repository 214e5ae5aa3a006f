"""BatchNorm folding of a frozen teacher: same logits, applied only where it is safe."""

import torch
from torch import nn

from kdistill.engine.features import FeatureTap
from kdistill.models import build_model
from kdistill.models.fold import fold_batchnorm
from kdistill.teachers.base import ModuleTeacher


def _trained_bn(spec="resnet8", seed=0):
    """A CIFAR net whose BatchNorms hold non-trivial running statistics and affine weights."""
    torch.manual_seed(seed)
    m = build_model(spec, (3, 32, 32), 10, seed=seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 2.0)
                mod.bias.uniform_(-0.5, 0.5)
        m.train()
        for _ in range(3):
            m(torch.randn(32, 3, 32, 32) * 2 + 0.5)
    return m.eval()


def _bns(m):
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_folded_copy_gives_the_same_logits_without_batchnorm():
    m = _trained_bn()
    x = torch.randn(16, 3, 32, 32)
    folded = fold_batchnorm(m, x[:4])
    assert folded is not None and _bns(m) > 0 and _bns(folded) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-4)
    assert _bns(m) > 0 and not any(p is q for p, q in zip(m.parameters(), folded.parameters()))  # original untouched


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))


def test_folding_is_skipped_where_it_does_not_apply():
    x = torch.randn(4, 3, 32, 32)
    assert fold_batchnorm(_trained_bn().train(), x) is None  # training mode: BatchNorm uses batch statistics
    assert fold_batchnorm(build_model("mlp:32", (3, 32, 32), 10).eval(), x) is None  # nothing to fold
    assert fold_batchnorm(_Branchy().eval(), x) is None  # not traceable
    m = _trained_bn()
    h = m.layer1.register_forward_hook(lambda *a: None)
    assert fold_batchnorm(m, x) is None  # a traced copy would drop the hook
    h.remove()
    assert fold_batchnorm(m, x) is not None


def test_teacher_runs_the_folded_copy_unless_its_features_are_read():
    m = _trained_bn("resnet20")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
    teacher = ModuleTeacher(m)
    torch.testing.assert_close(teacher.logits(x), want, rtol=1e-4, atol=1e-4)
    assert teacher._folded[0] is not None and _bns(teacher._folded[0]) == 0
    with FeatureTap(teacher.module, ["layer2"]) as tap:  # FitNets/AT read the teacher's layers: the original runs
        torch.testing.assert_close(teacher.logits(x), want, rtol=1e-4, atol=1e-4)
        assert tap.out["layer2"].shape[1] == 32
    assert teacher.release() is m and _bns(m) > 0
