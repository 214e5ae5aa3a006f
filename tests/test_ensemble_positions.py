"""Ensembles of per-position models (B, L, V): combined at every position, as float64 formulas say."""

import torch

from kdistill.data.dataset import TensorData
from kdistill.models import build_model
from kdistill.teachers import ensemble as ens_mod
from kdistill.teachers.ensemble import EnsembleModel, EnsembleTeacher, combine_log_probs

V, L = 11, 6


def _members(k=3):
    return [build_model("lm:8,1,heads=2", (L,), V, seed=s) for s in range(k)]


def _tokens(n=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (n, L), generator=g)
    return TensorData(x, torch.randint(0, V, (n, L), generator=g), tuple(str(i) for i in range(V)))


def test_lm_members_give_per_position_logits():
    out = _members(1)[0](_tokens().x)
    assert out.shape == (5, L, V)


def test_arithmetic_and_geometric_means_per_position_match_float64_formulas():
    z = torch.randn(3, 4, L, V) * 6  # K x B x L x V, large logits
    p = torch.softmax(z.double() / 2.0, dim=-1)
    arith = p.mean(dim=0)
    geo = torch.exp(torch.log(p).mean(dim=0))
    geo = geo / geo.sum(dim=-1, keepdim=True)
    assert torch.allclose(combine_log_probs(z, "arithmetic", 2.0).double().exp(), arith, atol=1e-6)
    assert torch.allclose(combine_log_probs(z, "geometric", 2.0).double().exp(), geo, atol=1e-6)
    # each position is combined on its own: the same as combining position (b, t) alone
    one = combine_log_probs(z[:, 1:2, 3, :], "arithmetic", 2.0)
    assert torch.allclose(combine_log_probs(z, "arithmetic", 2.0)[1, 3], one[0], atol=1e-6)


def test_ensemble_teacher_and_model_on_token_windows(monkeypatch):
    members, data = _members(), _tokens(7)
    with torch.no_grad():
        z = torch.stack([m.eval()(data.x) for m in members])
    for mean in ("arithmetic", "geometric"):
        want = combine_log_probs(z, mean, 3.0)
        teacher = EnsembleTeacher(members, mean=mean, temperature=3.0)
        assert torch.allclose(torch.log_softmax(teacher.logits(data.x) / 3.0, -1), want, atol=1e-5)
        monkeypatch.setattr(ens_mod, "POSITION_CHUNK", 3)  # several chunks, and a short last one
        cached = teacher.cache(data)
        got = cached.logits(None, data.index)
        assert got.shape == (7, L, V)
        assert torch.allclose(torch.log_softmax(got / 3.0, -1), want, atol=1e-5)
        with torch.no_grad():
            model_out = EnsembleModel(members, mean)(data.x)
        assert torch.allclose(model_out, combine_log_probs(z, mean, 1.0), atol=1e-5)
