import pytest
import torch
import torch.nn.functional as F

from kdistill.teachers.onnx_model import export_onnx
from kdistill.models import build_model
from kdistill.teachers.specialists import (
    DUSTBIN,
    Specialist,
    SpecialistModel,
    SpecialistSystem,
    _objective,
    active_specialists,
    collapse_labels,
    collapse_logits,
    combine_distributions,
    confusable_clusters,
    specialist_data,
    specialist_from_generalist,
    train_specialist,
)
from kdistill.teachers.base import CachedTeacher
from kdistill.engine import TrainConfig, fit


@pytest.mark.parametrize("T", [1.0, 5.0])
def test_collapsed_logits_give_the_collapsed_distribution_at_T(T):
    z = torch.randn(20, 6) * 3
    p = F.softmax(z / T, dim=1)
    got = F.softmax(collapse_logits(z, [4, 1], T) / T, dim=1)
    want = torch.stack([p[:, 4], p[:, 1], p[:, [0, 2, 3, 5]].sum(dim=1)], dim=1)
    assert torch.allclose(got, want, atol=1e-6)
    assert collapse_labels(torch.tensor([0, 1, 4, 5]), [4, 1]).tolist() == [2, 1, 0, 2]


def test_confusable_clusters_are_found_from_prediction_covariance():
    g = torch.Generator().manual_seed(0)
    n, groups = 3000, [(0, 1), (2, 3, 4)]
    labels = torch.randint(0, 7, (n,), generator=g)
    probs = torch.full((n, 7), 0.01)
    for i, y in enumerate(labels.tolist()):
        group = next((grp for grp in groups if y in grp), (y,))
        share = torch.rand(len(group), generator=g)
        probs[i, list(group)] += share / share.sum() * (1 - 0.07)
    probs /= probs.sum(dim=1, keepdim=True)
    clusters = confusable_clusters(probs, n_clusters=4, seed=0)
    assert clusters == [(0, 1), (2, 3, 4)]
    with pytest.raises(ValueError, match="n_clusters"):
        confusable_clusters(probs, n_clusters=9)


def test_specialist_data_is_half_special_with_dustbin_labels(digits):
    train = digits.train
    sub = specialist_data(train, [3, 8], seed=0)
    own = torch.isin(train.y, torch.tensor([3, 8])).sum().item()
    assert len(sub) == 2 * own and sub.classes[-1] == DUSTBIN and sub.num_classes == 3
    assert (sub.y == 2).sum().item() == own  # the dustbin half
    row_of = {int(i): r for r, i in enumerate(train.index)}  # ids still point at the original rows
    original = train.y[[row_of[int(i)] for i in sub.index]]
    assert torch.equal(collapse_labels(original, [3, 8]), sub.y)
    with pytest.raises(ValueError, match="classes"):
        specialist_data(train, [3, 11])


def test_specialist_starts_from_the_generalist(digits):
    gen = build_model("mlp:32", digits.input_shape, 10, seed=0)
    spec = specialist_from_generalist(gen, [2, 7, 5], 10)
    x = digits.train.x[:16]
    zg, zs = gen(x).detach(), spec(x)
    assert zs.shape == (16, 4)
    assert torch.allclose(zs[:, :3], zg[:, [2, 7, 5]], atol=1e-6)
    assert all(p.requires_grad for p in spec.parameters())
    zs.sum().backward()
    assert gen.net[-1].weight.grad is None  # a copy: the generalist is untouched
    with pytest.raises(ValueError, match="dustbin"):
        specialist_from_generalist(gen, list(range(10)), 10)


def test_combination_with_identity_collapse_is_the_arithmetic_mean():
    # A specialist over classes 0..3 of 5 with class 4 as its dustbin sees the full distribution:
    # argmin_q KL(p_g||q) + KL(p_s||q) is then (p_g + p_s) / 2.
    g = torch.Generator().manual_seed(1)
    p_g = F.log_softmax(torch.randn(30, 5, generator=g) * 2, dim=1)
    p_s = F.log_softmax(torch.randn(30, 5, generator=g) * 2, dim=1)
    active = torch.ones(30, 1, dtype=torch.bool)
    active[:5] = False
    q = combine_distributions(p_g, [p_s], [(0, 1, 2, 3)], active).exp()
    want = (p_g.exp() + p_s.exp()) / 2
    assert torch.allclose(q[5:], want[5:], atol=1e-4)
    assert torch.allclose(q[:5], p_g[:5].exp(), atol=1e-6)  # inactive rows keep the generalist's answer


def test_combination_is_a_minimum_of_the_kl_objective():
    g = torch.Generator().manual_seed(2)
    clusters = [(0, 1, 2), (5, 6)]
    p_g = F.log_softmax(torch.randn(40, 8, generator=g) * 2, dim=1)
    specs = [F.log_softmax(torch.randn(40, len(c) + 1, generator=g) * 2, dim=1) for c in clusters]
    active = active_specialists(p_g, clusters, top_k=3)
    log_q = combine_distributions(p_g, specs, clusters, active).double()
    rows = active.any(dim=1)
    args = (p_g[rows].double().exp(), [s[rows].double().exp() for s in specs],
            [active[rows, m].double() for m in range(2)], [list(c) for c in clusters],
            [[c for c in range(8) if c not in cl] for cl in clusters])
    z = log_q[rows].clone().requires_grad_(True)
    best = _objective(z, *args)
    (grad,) = torch.autograd.grad(best, z)
    assert grad.abs().max() < 1e-4  # the answer is returned in float32
    for _ in range(5):
        assert _objective(z.detach() + 0.05 * torch.randn_like(z), *args) > best
    assert _objective(p_g[rows].double(), *args) >= best


def test_confident_correct_specialists_fix_generalist_errors():
    # The generalist hesitates between 0 and 1 (and always picks the wrong one); an oracle specialist
    # over {0, 1} is sure. The combination must follow the specialist where it is active.
    n = 200
    labels = torch.arange(n) % 2
    gen = torch.full((n, 4), -4.0)
    gen[:, 0], gen[:, 1] = torch.where(labels == 0, 0.0, 0.2), torch.where(labels == 0, 0.2, 0.0)
    oracle = F.one_hot(labels, 3).float() * 8
    system_lp = combine_distributions(F.log_softmax(gen, 1), [F.log_softmax(oracle, 1)], [(0, 1)],
                                      active_specialists(gen, [(0, 1)], top_k=1))
    assert (gen.argmax(1) == labels).float().mean() == 0.0
    assert (system_lp.argmax(1) == labels).all()


def test_specialists_train_and_the_system_is_a_teacher(digits, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.1, seed=0, checkpoint=False)
    gen = fit(build_model("mlp:32", digits.input_shape, 10, seed=0), digits.train, cfg, progress=False).model
    spec_cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0, keep_best=True)
    spec, result = train_specialist(gen, digits.train, (3, 5, 8), spec_cfg, temperature=2.0, alpha=0.5, val=digits.val)
    assert isinstance(spec, Specialist) and spec.classes == (3, 5, 8)
    with pytest.raises(ValueError, match="method.alpha"):  # KD's options are the function's, checked by KD
        train_specialist(gen, digits.train, (3, 5, 8), spec_cfg, temperature=2.0, alpha=1.5)
    assert result.val["accuracy"] > 0.8  # on its own half-special validation data
    system = SpecialistSystem(gen, [spec], top_k=2)
    log_q = system.predict(digits.test)
    assert log_q.shape == (len(digits.test), 10)
    assert torch.allclose(log_q.exp().sum(dim=1), torch.ones(len(digits.test)), atol=1e-4)
    assert (log_q.argmax(1) == digits.test.y).float().mean() > 0.8
    # As one module (e.g. for a deployment table): the same log q, from both nets' weights; never traced.
    model = SpecialistModel(system)
    with torch.no_grad():
        assert torch.allclose(model(digits.test.x), log_q, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for net in (gen, spec.model) for p in net.parameters())
    with pytest.raises(RuntimeError, match="traced"):
        export_onnx(model, tmp_path / "system.onnx", digits.input_shape)
    cached = system.cache(digits.train)
    assert isinstance(cached, CachedTeacher)
    student = fit(build_model("mlp:32", digits.input_shape, 10, seed=1), digits.train,
                  TrainConfig(epochs=3, batch_size=64, lr=0.1, seed=1), teacher=cached,
                  method={"name": "kd", "temperature": 2.0}, test=digits.test, progress=False)
    assert student.test["accuracy"] > 0.8


def test_cli_specialists_then_distill_the_combination(tmp_path, capsys):
    import json

    from kdistill.cli.app import main

    common = ["--data", "digits", "--no-progress"]
    assert main(["train", "--model", "mlp:32", "--epochs", "4", "--lr", "0.1", "--out", str(tmp_path / "g"), *common,
                 "--set", "train.batch_size=64"]) == 0
    capsys.readouterr()
    logits = tmp_path / "combined.safetensors"
    assert main(["specialists", "--generalist", str(tmp_path / "g" / "model.safetensors"), "--classes", "3,5,8",
                 "--classes", "1,7", "--epochs", "2", "--out", str(tmp_path / "s"), "--save-logits", str(logits),
                 *common]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["clusters"] == [[3, 5, 8], [1, 7]]
    assert report["generalist+specialists"]["test_accuracy"] > 0.8
    assert (tmp_path / "s" / "specialist-3-5-8.safetensors").is_file()
    assert main(["distill", "--model", "mlp:32", "--teacher-logits", str(logits), "-T", "2", "--epochs", "5",
                 "--lr", "0.1", "--out", str(tmp_path / "d"), *common, "--set", "train.batch_size=64"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_accuracy"] > 0.8
    assert main(["specialists", "--generalist", str(tmp_path / "g" / "model.safetensors"), "--classes", "3,11",
                 "--out", str(tmp_path / "bad"), *common]) == 2
    assert "classes" in capsys.readouterr().err
    # The specialists' KD options are checked before any work, naming the flag.
    assert main(["specialists", "--generalist", str(tmp_path / "g" / "model.safetensors"), "--classes", "3,5",
                 "--alpha", "1.5", "--out", str(tmp_path / "bad-alpha"), *common]) == 2
    assert "--alpha" in capsys.readouterr().err and not (tmp_path / "bad-alpha").exists()
