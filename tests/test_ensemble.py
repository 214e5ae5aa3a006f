import pytest
import torch
import torch.nn.functional as F

from kdistill.teachers.ensemble import EnsembleModel, EnsembleTeacher, combine_log_probs, combine_logits
from kdistill.models import build_model
from kdistill.teachers.base import CachedTeacher, ModuleTeacher
from kdistill.engine import TrainConfig, fit


def _members(digits, k=3):
    return [build_model("mlp:16", digits.input_shape, 10, seed=s) for s in range(k)]


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_arithmetic_mean_matches_direct_formula_at_its_temperature(digits, T):
    members = _members(digits)
    x = digits.train.x[:32]
    ens = EnsembleTeacher(members, mean="arithmetic", temperature=T)
    direct = torch.stack([F.softmax(m(x) / T, dim=1) for m in members]).mean(dim=0)
    got = F.softmax(ens.logits(x) / T, dim=1)
    assert torch.allclose(got, direct, atol=1e-6)
    assert torch.allclose(ens.probs(x), direct, atol=1e-6)


def test_arithmetic_logits_are_tied_to_the_stored_temperature(digits):
    members = _members(digits)
    x = digits.train.x[:32] * 5  # larger logits make the mixtures at T=1 and T=4 clearly different
    ens = EnsembleTeacher(members, mean="arithmetic", temperature=1.0)
    at4 = torch.stack([F.softmax(m(x) / 4, dim=1) for m in members]).mean(dim=0)
    assert not torch.allclose(F.softmax(ens.logits(x) / 4, dim=1), at4, atol=1e-4)
    # ... but the probability API and a re-tempered copy give the mixture at any T.
    assert torch.allclose(ens.probs(x, temperature=4.0), at4, atol=1e-6)
    assert torch.allclose(F.softmax(ens.at_temperature(4.0).logits(x) / 4, dim=1), at4, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0, 20.0])
def test_geometric_mean_is_renormalised_product_and_valid_at_every_temperature(digits, T):
    members = _members(digits)
    x = digits.train.x[:32]
    ens = EnsembleTeacher(members, mean="geometric", temperature=1.0)  # stored T is irrelevant here
    probs = torch.stack([F.softmax(m(x).double() / T, dim=1) for m in members])
    direct = probs.prod(dim=0) ** (1 / len(members))
    direct = direct / direct.sum(dim=1, keepdim=True)
    assert torch.allclose(F.softmax(ens.logits(x).double() / T, dim=1), direct, atol=1e-6)


def test_one_member_ensemble_is_the_member():
    z = torch.randn(1, 5, 7) * 3
    for mean in ("arithmetic", "geometric"):
        assert torch.allclose(F.softmax(combine_logits(z, mean, 2.0) / 2.0, dim=1), F.softmax(z[0] / 2.0, dim=1), atol=1e-6)
    assert torch.allclose(combine_log_probs(z, "geometric", 1.0).exp().sum(dim=1), torch.ones(5), atol=1e-6)


def test_ensemble_model_is_the_ensemble_as_a_classifier(digits):
    nets = [build_model("mlp:16", digits.input_shape, 10, seed=i) for i in range(3)]
    x = digits.test.x[:40]
    for mean in ("arithmetic", "geometric"):
        model = EnsembleModel(nets, mean)
        with torch.no_grad():
            expected = combine_log_probs(torch.stack([m(x) for m in nets]), mean, 1.0)
            assert torch.allclose(model(x), expected)
        assert sum(p.numel() for p in model.parameters()) == 3 * sum(p.numel() for p in nets[0].parameters())
        assert model.spec == f"ensemble of 3 x mlp:16 ({mean} mean)"
    with pytest.raises(ValueError, match="mean"):
        EnsembleModel(nets, "median")


def test_cached_ensemble_equals_live_and_mixes_member_kinds(digits):
    nets = _members(digits)
    cached_member = ModuleTeacher(nets[2]).cache(digits.train)  # a member that only knows sample ids
    live = EnsembleTeacher([nets[0], ModuleTeacher(nets[1]), cached_member], mean="arithmetic", temperature=2.0)
    assert live.needs_inputs
    cached = live.cache(digits.train)
    assert isinstance(cached, CachedTeacher) and not cached.needs_inputs
    rows = torch.randperm(len(digits.train))[:40]
    x, ids = digits.train.x[rows], digits.train.index[rows]
    assert torch.allclose(cached.logits(None, ids), live.logits(x, ids), atol=1e-5)
    reference = EnsembleTeacher(nets, mean="arithmetic", temperature=2.0)
    assert torch.allclose(reference.logits(x), live.logits(x, ids), atol=1e-5)


def test_bad_ensembles_are_clear_errors(digits):
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleTeacher([])
    with pytest.raises(ValueError, match="mean"):
        EnsembleTeacher(_members(digits, 1), mean="median")
    with pytest.raises(ValueError, match="members\\[1\\]"):
        EnsembleTeacher([_members(digits, 1)[0], object()])
    odd = [build_model("mlp:8", digits.input_shape, 10, seed=0), build_model("mlp:8", digits.input_shape, 9, seed=0)]
    with pytest.raises(ValueError, match="number of classes"):
        EnsembleTeacher(odd).logits(digits.train.x[:4])


def test_student_distilled_from_ensemble_learns(digits):
    members = [fit(build_model("mlp:48", digits.input_shape, 10, seed=s), digits.train,
                   TrainConfig(epochs=6, batch_size=64, lr=0.1, seed=s), progress=False).model for s in range(3)]
    ens = EnsembleTeacher(members, mean="geometric", temperature=4.0)
    cfg_d = TrainConfig(epochs=6, batch_size=64, lr=0.1, seed=0)
    kd = {"name": "kd", "temperature": 4.0, "alpha": 1.0}
    # jitter > 0 keeps the ensemble live (it needs inputs); here jitter 0 and an explicit cache.
    student = fit(build_model("mlp:32", digits.input_shape, 10, seed=0), digits.train, cfg_d,
                  teacher=ens.cache(digits.train), method=kd, test=digits.test, progress=False)
    assert student.test["accuracy"] > 0.85
    live = fit(build_model("mlp:32", digits.input_shape, 10, seed=0), digits.train,
               TrainConfig(**{**cfg_d.__dict__, "jitter": 1}), teacher=ens, method=kd, test=digits.test,
               progress=False)
    assert live.test["accuracy"] > 0.8
