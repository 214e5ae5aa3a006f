"""The kd method passes jsd's beta (TRL's convention) to the loss, refuses it with another kind, and records
it only for jsd (so the records and resumes of other kinds are unchanged)."""

import pytest
import torch

from kdistill import TrainConfig, fit
from kdistill.losses import soft_loss
from kdistill.methods import build_method
from kdistill.methods.base import StepIO


def _io(per_position: bool):
    g = torch.Generator().manual_seed(0)
    shape = (4, 5, 7) if per_position else (4, 7)
    s, t = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    y = torch.randint(0, 7, shape[:-1], generator=g)
    return StepIO(s, y, t), s, t, y


@pytest.mark.parametrize("per_position", [False, True])
def test_beta_reaches_the_jsd_loss(per_position):
    io, s, t, y = _io(per_position)
    labels = y if per_position else None
    for beta in (0.1, 0.9):
        m = build_method("kd", {"kind": "jsd", "beta": beta, "temperature": 2.0})
        want = soft_loss(s, t, temperature=2.0, kind="jsd", beta=beta, labels=labels)
        assert float(m.losses(io)["kd"]) == pytest.approx(float(want), rel=1e-6)
    assert float(soft_loss(s, t, temperature=2.0, kind="jsd", beta=0.1)) != pytest.approx(
        float(soft_loss(s, t, temperature=2.0, kind="jsd", beta=0.9)), rel=1e-3)


def test_beta_refused_where_it_means_nothing_or_is_out_of_range():
    with pytest.raises(ValueError, match="method.beta: is the jsd kind's teacher weight, but method.kind is 'kl'"):
        build_method("kd", {"beta": 0.5})
    with pytest.raises(ValueError, match=r"method.beta: the jsd interpolation weight must be a number in \[0, 1\]"):
        build_method("kd", {"kind": "jsd", "beta": 1.5})
    assert "beta" not in build_method("kd", {"kind": "kl"}).options()
    assert build_method("kd", {"kind": "jsd"}).options()["beta"] == 0.5


def test_fit_with_a_jsd_beta_dict():
    x = torch.randint(0, 6, (32, 4))
    y = torch.roll(x, -1, 1)
    teacher = torch.nn.Sequential(torch.nn.Embedding(6, 6))
    r = fit(torch.nn.Sequential(torch.nn.Embedding(6, 8), torch.nn.Linear(8, 6)), (x, y),
            TrainConfig(epochs=2, batch_size=16), teacher=teacher,
            method={"name": "kd", "kind": "jsd", "beta": 0.2}, progress=False)
    assert r.history[-1]["train_loss"] > 0
