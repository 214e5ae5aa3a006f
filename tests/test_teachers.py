import pytest
import torch

from kdistill import data
from kdistill.models import build_model
from kdistill.teachers.base import CachedTeacher, ModuleTeacher


def test_module_teacher_is_frozen_and_stays_in_eval(digits):
    net = build_model("mlp:32,dropout=0.5", digits.input_shape, 10, seed=0)
    teacher = ModuleTeacher(net)
    net.train()  # a caller switching modes must not re-enable dropout
    assert not net.training
    x = digits.train.x[:16]
    a, b = teacher.logits(x), teacher.logits(x)
    assert torch.equal(a, b) and not a.requires_grad
    assert all(not p.requires_grad for p in net.parameters())


def test_a_copy_of_a_teacher_network_is_its_own_module():
    # export_onnx deep-copies the network and calls .cpu().eval() on the copy: that must be the copy,
    # not the original (which may sit on a GPU).
    import copy

    m = build_model("mlp:8", (1, 8, 8), 10)
    ModuleTeacher(m)
    c = copy.deepcopy(m)
    assert c.eval() is c and c.train() is c and m.train() is m
    assert not c.training and not m.training


def test_cached_teacher_is_keyed_by_sample_id_not_position(digits):
    net = build_model("mlp:32", digits.input_shape, 10, seed=0)
    mt = ModuleTeacher(net)
    cached = mt.cache(digits.train)
    sub = data.omit_classes(digits.train, [3])
    rows = torch.randperm(len(sub))[:20]
    ids = sub.index[rows]
    assert torch.allclose(cached.logits(None, ids), mt.logits(sub.x[rows]), atol=1e-6)
    with pytest.raises(ValueError, match="cover"):
        cached.check_covers(digits.val)  # validation ids were never cached


def test_cached_teacher_rejects_bad_tables():
    with pytest.raises(ValueError, match="one row per id"):
        CachedTeacher(torch.arange(3), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="unique"):
        CachedTeacher(torch.tensor([0, 0]), torch.zeros(2, 10))
