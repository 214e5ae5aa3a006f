"""Vectorised multi-student training: every student must equal the same student trained alone."""

import json

import pytest
import torch

import kdistill.sweeps.multi
from kdistill import TrainConfig, fit
from kdistill.cli.app import main
from kdistill.losses import distillation_loss, stacked_distillation_loss, stacked_distillation_loss_and_grad
from kdistill.methods import build_method
from kdistill.models import build_model
from kdistill.sweeps.multi import fit_many
from kdistill.sweeps.stacked import StackedMLP, mlp_signature
from kdistill.teachers.base import ModuleTeacher

SPEC = "mlp:24,16"


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.fixture(scope="module")
def teacher(digits):
    t = build_model("mlp:48", digits.input_shape, 10, seed=0)
    fit(t, digits.train, TrainConfig(epochs=4, lr=0.1, batch_size=64), progress=False)
    return t


def _kd(temperature=1.0, alpha=1.0, kind="kl"):
    return {"name": "kd", "temperature": temperature, "alpha": alpha, "kind": kind}


DKD = {"name": "dkd", "warmup": 0}


def _check_equivalent(digits, teacher, configs, init_seeds=None, spec=SPEC, methods=None):
    """fit_many of ``configs`` and ``methods`` (one per student; None: fit's default) equals one fit per student."""
    init_seeds = init_seeds or [c.seed for c in configs]
    methods = methods or [None] * len(configs)
    together = fit_many([build_model(spec, digits.input_shape, 10, seed=s) for s in init_seeds], digits.train, configs,
                        teacher=teacher, methods=methods, val=digits.val, test=digits.test, progress=False)
    for cfg, method, seed, r in zip(configs, methods, init_seeds, together):
        alone = fit(build_model(spec, digits.input_shape, 10, seed=seed), digits.train, cfg, teacher=teacher,
                    method=method, val=digits.val, test=digits.test, progress=False)
        assert torch.allclose(_params(r.model), _params(alone.model), atol=1e-4, rtol=0), (cfg, method)
        assert abs(r.history[-1]["train_loss"] - alone.history[-1]["train_loss"]) < 1e-4
        assert abs(r.test["errors"] - alone.test["errors"]) <= 1 and abs(r.val["errors"] - alone.val["errors"]) <= 1
        assert [h["epoch"] for h in r.history] == [h["epoch"] for h in alone.history]
        assert r.best_epoch == alone.best_epoch
    return together


def test_each_student_equals_its_solo_run_sgd_jitter_live_teacher(digits, teacher):
    # Different temperatures, alphas, learning rates, momenta, weight decays and seeds; jitter means the
    # module teacher runs live, once per step for all groups; seeds 0, 0, 1 make two batch-sharing groups.
    grid = [(2.0, 1.0, 0.1, 0.9, 0.0, 0), (5.0, 0.6, 0.05, 0.5, 1e-3, 0), (1.0, 0.0, 0.2, 0.0, 0.0, 1)]
    configs = [TrainConfig(epochs=3, batch_size=32, lr=lr, momentum=m, weight_decay=wd, seed=s, jitter=1)
               for t, a, lr, m, wd, s in grid]
    _check_equivalent(digits, teacher, configs, methods=[_kd(t, a) for t, a, *_ in grid])


def test_each_student_equals_its_solo_run_adam_cached_teacher(digits, teacher):
    # Shared lr/momentum/decay: the fused optimiser path; cached teacher; one group with distinct inits.
    grid = [(1.0, 1.0), (4.0, 0.5), (20.0, 0.9)]
    configs = [TrainConfig(epochs=3, batch_size=48, optimizer="adam", lr=3e-3, weight_decay=1e-4, seed=7,
                           schedule="cosine") for _ in grid]
    _check_equivalent(digits, teacher, configs, init_seeds=[1, 2, 3], spec="mlp:20,activation=tanh",
                      methods=[_kd(t, a) for t, a in grid])


def test_supervised_and_max_norm_students_equal_solo_runs(digits):
    configs = [TrainConfig(epochs=2, batch_size=32, lr=lr, seed=s, max_norm=1.5) for lr, s in [(0.1, 0), (0.05, 3)]]
    _check_equivalent(digits, None, configs, spec="mlp:16,16,activation=leaky_relu")
    # The spec's own max-norm constraint (MLP.constrain), without the config's.
    configs = [TrainConfig(epochs=2, batch_size=32, lr=0.2, seed=s) for s in (0, 1)]
    _check_equivalent(digits, None, configs, spec="mlp:16,max_norm=0.5")


def test_linear_one_sample_plain_sgd_students_equal_solo_runs(digits, teacher):
    # nnfwp's setting: a linear model (an MLP without hidden layer), one sample per plain SGD step, one pass;
    # logit MSE with constant rates, then KL mixed with the labels under a cosine schedule.
    common = {"epochs": 1, "batch_size": 1, "momentum": 0.0, "nesterov": False, "checkpoint": False}
    grid = [(0.01, 1.0, 0), (0.002, 1.0, 0), (0.01, 0.0, 0), (0.005, 0.5, 2)]
    mse = [TrainConfig(lr=lr, schedule="constant", seed=s, **common) for lr, a, s in grid]
    _check_equivalent(digits, teacher, mse, spec="linear", methods=[_kd(alpha=a, kind="logit_mse") for _, a, _ in grid])
    grid = [(0.05, 1.0, 1.0), (0.02, 4.0, 0.5)]
    kl = [TrainConfig(lr=lr, schedule="cosine", seed=3, **common) for lr, t, a in grid]
    _check_equivalent(digits, teacher, kl, spec="linear", methods=[_kd(t, a) for _, t, a in grid])


def test_alpha_zero_student_equals_supervised_fit(digits, teacher):
    # A student with soft weight 0 learns from the labels alone: it equals fit without a teacher, so a
    # directly trained baseline can share its seed's distillation pass.
    configs = [TrainConfig(epochs=1, batch_size=1, lr=lr, momentum=0.0, nesterov=False, schedule="cosine", seed=4)
               for lr in (0.02, 0.05)] + [TrainConfig(epochs=2, batch_size=16, lr=0.1, seed=4)]
    methods = [_kd(2.0, 0.0, "kl"), _kd(2.0, 1.0, "kl"), _kd(2.0, 0.0, "logit_mse")]
    for cfgs, mets in ((configs[:2], methods[:2]), (configs[2:], methods[2:])):
        together = fit_many([build_model("linear", digits.input_shape, 10, seed=4) for _ in cfgs], digits.train, cfgs,
                            teacher=teacher, methods=mets, val=digits.val, test=digits.test, progress=False)
        alone = fit(build_model("linear", digits.input_shape, 10, seed=4), digits.train, cfgs[0], val=digits.val,
                    test=digits.test, progress=False)
        assert torch.allclose(_params(together[0].model), _params(alone.model), atol=1e-4, rtol=0)
        assert abs(together[0].history[-1]["train_loss"] - alone.history[-1]["train_loss"]) < 1e-4
        assert abs(together[0].test["errors"] - alone.test["errors"]) <= 1


def test_keep_best_restores_each_students_best_epoch(digits, teacher):
    # Constant schedule, so the first b epochs of a 4-epoch run are a b-epoch run; high learning rates
    # make validation errors go up and down, so some student's best epoch comes before the last.
    def run(epochs, keep_best):
        configs = [TrainConfig(epochs=epochs, batch_size=32, lr=lr, momentum=0.5, schedule="constant", seed=s,
                               keep_best=keep_best) for lr, s in [(0.3, 0), (0.3, 1), (0.5, 1), (0.05, 2)]]
        models = [build_model(SPEC, digits.input_shape, 10, seed=c.seed) for c in configs]
        return fit_many(models, digits.train, configs, teacher=teacher, methods=_kd(3.0), val=digits.val,
                        progress=False)

    best = run(4, True)
    assert any(r.best_epoch < 4 for r in best)
    for i, r in enumerate(best):
        errs = [h["val_errors"] for h in r.history]
        assert r.best_epoch == errs.index(min(errs)) + 1 and r.val["errors"] == min(errs)
        shorter = run(r.best_epoch, False)[i]
        assert torch.equal(_params(r.model), _params(shorter.model))


def test_students_with_one_seed_share_batches_and_teacher_forward(digits, teacher):
    class Counting(ModuleTeacher):
        def __init__(self, module):
            super().__init__(module)
            self.calls: list[int] = []

        def logits(self, x, ids=None):
            self.calls.append(len(x))
            return super().logits(x, ids)

    counting = Counting(teacher)
    grid = [(1.0, 0), (2.0, 0), (4.0, 0), (8.0, 5)]
    configs = [TrainConfig(epochs=1, batch_size=64, lr=0.1, seed=s, jitter=1) for _, s in grid]
    fit_many([build_model(SPEC, digits.input_shape, 10, seed=0) for _ in configs], digits.train, configs,
             teacher=counting, methods=[_kd(t) for t, _ in grid], progress=False)
    steps = len(digits.train) // 64
    assert counting.calls == [2 * 64] * steps  # one forward per step for both seed groups, none per student


def test_unstackable_students_fall_back_to_fit(digits, teacher):
    spec = "mlp:16,dropout=0.2"
    assert mlp_signature(build_model(spec, digits.input_shape, 10)) is None
    configs = [TrainConfig(epochs=1, batch_size=64, lr=0.1, seed=1) for _ in range(2)]
    methods = [_kd(t) for t in (2.0, 4.0)]
    together = fit_many([build_model(spec, digits.input_shape, 10, seed=1) for _ in configs], digits.train, configs,
                        teacher=teacher, methods=methods, progress=False)
    for cfg, method, r in zip(configs, methods, together):
        alone = fit(build_model(spec, digits.input_shape, 10, seed=1), digits.train, cfg, teacher=teacher,
                    method=method, progress=False)
        assert torch.equal(_params(r.model), _params(alone.model))


@pytest.mark.parametrize("methods, stacked", [
    ([_kd(2.0, 0.5), _kd(4.0, 1.0)], True),                        # KD, one kind: per-student T and alpha
    (["ce", _kd(3.0, 0.7, "logit_mse")], True),                    # CE is KD with alpha 0 in the stacked pass
    ([_kd(2.0), _kd(2.0, kind="logit_mse")], False),               # two soft kinds cannot share one pass
    ([DKD, DKD], False),                                           # DKD declares itself not stackable
    ([_kd(2.0), DKD], False),                                      # one unstackable method sends all to fit
], ids=["kd-kl", "ce-and-kd", "two-kinds", "dkd", "kd-and-dkd"])
def test_fit_many_picks_the_backend_from_what_the_methods_declare(digits, teacher, monkeypatch, methods, stacked):
    """Stacked when every method is ``stackable`` with one soft kind, else one fit per student (same MLPs)."""
    assert build_method("kd").stackable and build_method("ce").stackable and not build_method("dkd").stackable
    calls = {"stacked": 0, "fit": 0}
    real_stacked, real_fit = kdistill.sweeps.multi._fit_stacked, kdistill.sweeps.multi.fit

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kdistill.sweeps.multi, "_fit_stacked", counted("stacked", real_stacked))
    monkeypatch.setattr(kdistill.sweeps.multi, "fit", counted("fit", real_fit))
    train = digits.train.subset(torch.arange(128))
    results = fit_many([build_model("mlp:8", digits.input_shape, 10, seed=s) for s in range(2)], train,
                       TrainConfig(epochs=1, batch_size=64, lr=0.1), teacher=teacher, methods=methods, progress=False)
    assert calls == ({"stacked": 1, "fit": 0} if stacked else {"stacked": 0, "fit": 2})
    assert len(results) == 2 and all(r.history for r in results)


def test_configs_that_cannot_share_a_pass_are_rejected(digits):
    models = [build_model(SPEC, digits.input_shape, 10, seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match="train.epochs"):
        fit_many(models, digits.train, [TrainConfig(epochs=1), TrainConfig(epochs=2)], progress=False)
    with pytest.raises(ValueError, match="configs: need one per model"):
        fit_many(models, digits.train, [TrainConfig()] * 3, progress=False)
    with pytest.raises(ValueError, match="eval_every_steps"):
        fit_many(models, digits.train, [TrainConfig(eval_every_steps=5)] * 2, progress=False)


def test_stacked_forward_matches_each_model_and_writes_back(digits):
    models = [build_model("mlp:12,8,activation=gelu", digits.input_shape, 10, seed=s) for s in range(3)]
    net = StackedMLP(models, [2, 1])
    x = digits.test.x[:50]
    stacked = net.predict(x)
    for i, m in enumerate(models):
        assert torch.allclose(stacked[i], m(x), atol=1e-5)
    with torch.no_grad():
        net.params[0].add_(1.0)
    net.write_to(models)
    assert torch.allclose(net.predict(x)[1], models[1](x), atol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "soft_ce", "logit_mse", "prob_mse"])
@pytest.mark.parametrize("shared_teacher", [True, False])
def test_stacked_loss_and_gradient_equal_distillation_loss(kind, shared_teacher):
    g = torch.Generator().manual_seed(0)
    n, b, c = 4, 16, 10
    s = torch.randn(n, b, c, generator=g) * 5
    t = torch.randn(b, c, generator=g) * 5 if shared_teacher else torch.randn(n, b, c, generator=g) * 5
    y = torch.randint(0, c, (n, b), generator=g)
    temps, alphas = [1.0, 3.0, 20.0, 0.5], [1.0, 0.5, 0.0, 0.9]
    losses = stacked_distillation_loss(s, t, y, temperature=temps, alpha=alphas, kind=kind)
    fused, grad = stacked_distillation_loss_and_grad(s, t, y, temperature=temps, alpha=alphas, kind=kind)
    for i in range(n):
        si = s[i].clone().requires_grad_(True)
        ref = distillation_loss(si, t if shared_teacher else t[i], y[i], temperature=temps[i], alpha=alphas[i], kind=kind)
        ref.backward()
        assert torch.allclose(losses[i], ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(fused[i], ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad[i], si.grad, rtol=1e-4, atol=1e-7)


def test_stacked_loss_validates_its_arguments():
    s = torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match="temperature"):
        stacked_distillation_loss(s, torch.zeros(3, 10), temperature=[1.0, 0.0], alpha=1.0)
    with pytest.raises(ValueError, match="labels"):
        stacked_distillation_loss_and_grad(s, torch.zeros(3, 10), temperature=2.0, alpha=[1.0, 0.5])
    with pytest.raises(ValueError, match="teacher_logits"):
        stacked_distillation_loss(s, torch.zeros(4, 10), temperature=2.0, alpha=1.0)


def test_sweep_cli_matches_distill_cli(digits, tmp_path, capsys):
    t_out = tmp_path / "teacher"
    assert main(["train", "--data", "digits", "--model", "mlp:32", "--epochs", "4", "--lr", "0.1", "--out", str(t_out),
                 "--no-progress"]) == 0
    weights = str(t_out / "model.safetensors")
    common = ["--data", "digits", "--teacher", weights, "--epochs", "3", "--no-progress"]
    assert main(["sweep", "--student", "mlp:16", "-T", "2", "5", "--alphas", "1", "0.7", "--seeds", "0", "1",
                 "--lrs", "0.1", "--out", str(tmp_path / "sweep"), *common]) == 0
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(res["models"]) == 8 and res["swept"] == ["temperature", "alpha", "seed"]
    assert res["best_by_validation"] in res["by_setting"] and len(res["by_setting"]) == 4
    assert res["by_setting"]["T5.0-a0.7"]["test_errors"]["values"] == [
        res["models"]["T5.0-a0.7-seed0"]["test_errors"], res["models"]["T5.0-a0.7-seed1"]["test_errors"]]
    capsys.readouterr()
    assert main(["distill", "--student", "mlp:16", "-T", "5", "--alpha", "0.7", "--seed", "1", "--lr", "0.1",
                 "--out", str(tmp_path / "solo"), *common]) == 0
    solo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(solo["test_errors"] - res["models"]["T5.0-a0.7-seed1"]["test_errors"]) <= 1


def test_sweep_cli_rejects_bad_input_before_work(tmp_path):
    out = tmp_path / "x"
    assert main(["sweep", "--data", "digits", "--student", "mlp:8", "-T", "2", "--out", str(out)]) == 2  # no teacher
    assert main(["sweep", "--data", "digits", "--student", "mlp:8", "--lrs", "-1", "--out", str(out)]) == 2
    assert main(["sweep", "--data", "digits", "--student", "mlp:8", "--teacher", "nope.safetensors", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "tv"])
def test_kinds_the_stacked_pass_lacks_train_each_student_alone(digits, teacher, kind):
    """A loss kind of the registry that the stacked losses do not implement trains the sweep one student at a
    time (the same weights as fit), instead of failing at the stacked pass's first step."""
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64, seed=1)
    [r] = fit_many([build_model(SPEC, digits.input_shape, 10, seed=1)], digits.train, cfg, teacher=teacher,
                   methods=_kd(2.0, 0.5, kind), progress=False)
    alone = fit(build_model(SPEC, digits.input_shape, 10, seed=1), digits.train, cfg, teacher=teacher,
                method=_kd(2.0, 0.5, kind), progress=False)
    assert torch.equal(_params(r.model), _params(alone.model))
    assert r.history[-1]["loss_kd"] > 0


@pytest.mark.parametrize("command", ["distill", "sweep"])
def test_the_cli_offers_every_registered_loss_kind(capsys, command):
    """`--loss` lists the registry's kinds, so a new divergence is reachable from the command line."""
    from kdistill.losses import LOSS_KINDS

    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    choices = "{" + ",".join(LOSS_KINDS) + "}"
    assert choices in capsys.readouterr().out and "reverse_kl" in choices


class _Items(torch.utils.data.Dataset):
    """A user's own map-style Dataset (streamed by the engine, not held as .x/.y)."""

    def __init__(self, split):
        self.x, self.y, self.classes = split.x, split.y, split.classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_fit_many_takes_a_streamed_dataset_and_trains_each_student_like_fit(digits, teacher):
    """fit_many accepts what fit accepts: a map-style Dataset goes through fit student by student (the stacked
    backend needs tensors in memory), each student equal to its own fit on the same Dataset."""
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=2, checkpoint=False)
    methods = [{"name": "kd", "temperature": t, "alpha": 0.5} for t in (2.0, 4.0)]
    train, test = _Items(digits.train), _Items(digits.test)
    many = fit_many([build_model(SPEC, digits.input_shape, 10, seed=s) for s in (0, 1)], train, cfg,
                    teacher=teacher, methods=methods, test=test, progress=False)
    for s, (r, m) in enumerate(zip(many, methods)):
        solo = fit(build_model(SPEC, digits.input_shape, 10, seed=s), train, cfg, teacher=teacher, method=m,
                   test=test, progress=False)
        assert r.test["errors"] == solo.test["errors"]
        for a, b in zip(r.model.state_dict().values(), solo.model.state_dict().values()):
            assert torch.equal(a, b)
