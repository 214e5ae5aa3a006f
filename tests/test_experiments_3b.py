"""Plumbing of the synthetic-grid, lambda-sweep, nnfwp and cifar10-mini experiments on tiny data (seconds each)."""

import json
import time

import numpy as np
import pytest
import torch

from kdistill import data
import kdistill.sweeps.grid as sweeps
from kdistill.cli.app import main
from kdistill.data import DataBundle, TensorData
from kdistill.experiments import cifar10_mini, synthetic_grid
from deploy_checks import check_deployment, check_png, check_wall_time


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """These nets are tiny: one intra-op thread is faster, and does not spin against other processes."""
    torch.set_num_threads(1)


@pytest.fixture
def small_mnist(monkeypatch):
    """`mnist` resolves to scikit-learn digits (1x8x8), so the MNIST experiments run offline in seconds."""
    monkeypatch.setitem(data.LOADERS, "mnist", lambda path=None: data.load_digits())


def _tiny_cifar(path=None):
    """200 + 60 random 3x32x32 images whose class sets the mean colour: learnable in a couple of epochs."""
    g = torch.Generator().manual_seed(0)

    def split(n, name):
        y = torch.arange(n) % 10
        x = torch.rand(n, 3, 32, 32, generator=g) * 0.5 + (y.float() / 20).view(-1, 1, 1, 1)
        return TensorData(x, y, tuple(str(i) for i in range(10)), name=name)

    return DataBundle(train=split(200, "tiny-train"), test=split(60, "tiny-test"))


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    argv = ["run", name, "--profile", "quick", "--out", str(out), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    started = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - started
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == name and res["profile"] == "quick"
    check_wall_time(res, elapsed)
    assert (out / "results.md").read_text().startswith(f"# {name}")
    return out, res



def test_synthetic_data_has_redundant_features_and_is_standardised():
    s = dict(synthetic_grid.PROFILES["quick"], samples=1200, features=12, classes=4, val_size=200)
    b = synthetic_grid.make_data(s, 1.0, 0.5)
    assert (len(b.train), len(b.val), len(b.test)) == (760, 200, 240)
    # 6 informative features; the other 6 are linear combinations of them, as in the tutorial.
    assert np.linalg.matrix_rank(b.train.x.double().numpy(), tol=1e-4) == 6
    assert torch.allclose(b.train.x.mean(0), torch.zeros(12), atol=1e-4)
    assert torch.allclose(b.train.x.std(0), torch.ones(12), atol=1e-3)
    with pytest.raises(ValueError, match="informative"):
        synthetic_grid.make_data(dict(s, classes=10, features=4), 1.0, 0.5)


def test_synthetic_grid(tmp_path):
    out, res = _run(
        tmp_path,
        "synthetic-grid",
        "samples=1500",
        "features=10",
        "classes=4",
        "val_size=200",
        "class_seps=[1.0]",
        "informative=[0.5, 1.0]",
        "temperatures=[2, 8]",
        "widths=[8]",
        "student_width=16",
        "width_class_sep=1.0",
        "width_informative=0.5",
        "seeds=2",
        "teacher=mlp:32,dropout=0.2",
        "teacher_epochs=3",
        "student_epochs=2",
        "batch_size=100",
    )
    recs = res["records"]
    # 2 data sets x (baseline + 2 T) x 2 seeds for the 2x16 student, plus the same for 2x8 on one data set.
    assert len(recs) == 2 * 3 * 2 + 3 * 2
    assert set(res["best_T"]) == {"sep1.0-inf0.5", "sep1.0-inf1.0"}
    for key, T in res["best_T"].items():
        inf = float(key.split("inf")[1])
        mine = [r for r in recs if r["informative"] == inf and r["width"] == 16 and r["role"] == "distilled"]
        means = {t: np.mean([r["val_accuracy"] for r in mine if r["T"] == t]) for t in (2.0, 8.0)}
        assert T == max(sorted(means), key=lambda t: means[t])  # chosen on validation, ties to the smaller T
        d = res["models"][f"{key}/distilled"]
        assert d["temperature"] == T and len(d["test_accuracy"]["values"]) == 2
    assert set(res["best_T_by_width"]) == {"8", "16"}
    assert -1.0 <= res["width_best_T_spearman"] <= 1.0 or np.isnan(res["width_best_T_spearman"])
    check_png(out / "accuracy_vs_T.png", (4.2 * 2, 3.4))  # a panel per informative share (2) and class sep (1)
    check_png(out / "best_T_vs_width.png", (12, 4.3))
    # The width study's data set: its teacher, the first seed's 2x16 student at the best T and its baseline.
    T = res["best_T"]["sep1.0-inf0.5"]
    rows = check_deployment(res, out, ["teacher mlp:32,dropout=0.2", f"distilled mlp:16,16 (T={T:g})",
                                        "student alone mlp:16,16"])
    first = [r for r in recs if r["informative"] == 0.5 and r["width"] == 16 and r["seed"] == 0]
    distilled = next(r for r in first if r["role"] == "distilled" and r["T"] == T)
    baseline = next(r for r in first if r["role"] == "baseline")
    assert rows[f"distilled mlp:16,16 (T={T:g})"]["accuracy"] == pytest.approx(distilled["test_accuracy"], abs=1e-3)
    assert rows["student alone mlp:16,16"]["accuracy"] == pytest.approx(baseline["test_accuracy"], abs=1e-3)


def test_synthetic_grid_rejects_a_width_setting_outside_the_grid(tmp_path, capsys):
    argv = ["run", "synthetic-grid", "--out", str(tmp_path / "x"), "--no-progress", "--set", "class_seps=[1.0]"]
    assert main(argv) == 2
    assert "width_class_sep" in capsys.readouterr().err


def test_lambda_sweep(tmp_path, small_mnist):
    out, res = _run(
        tmp_path,
        "lambda-sweep",
        "teacher=mlp:48",
        "student=mlp:48",
        "teacher_epochs=2",
        "student_epochs=2",
        "train_size=null",
        "test_size=null",
        "val_size=200",
        "curve_val_size=100",
        "eval_every=5",
        "lambdas=[0, 0.5, 1]",
        "seeds=2",
        "high_temperature=4",
        "batch_size=64",
    )
    curves = res["curves"]
    assert set(curves) == {"T1", "T4"} and set(curves["T1"]) == {"0", "0.5", "1"}
    run0 = curves["T1"]["0"][0]
    steps = [p["step"] for p in run0]
    assert steps[0] == 0 and steps[1] == 5 and steps == sorted(set(steps))
    assert steps[-1] == res["iterations"]
    # lambda = 0 has no teacher signal: one run per seed, shared by both families.
    assert curves["T1"]["0"] == curves["T4"]["0"] and len(curves["T1"]["0"]) == 2
    # Same spec and epochs as the teacher, but its own seed: the lambda = 0 student is not the teacher.
    assert run0[-1]["kl_T2"] > 1e-4
    for fam in ("T1", "T4"):
        assert res["verdicts"][fam]["verdict"] in ("holds", "holds partly", "does not hold")
        assert res["verdicts"][fam]["best_lambda_on_validation"] in (0.0, 0.5, 1.0)
    assert {"teacher", "baseline", "T1-lambda0.5", "T4-lambda1"} <= set(res["models"])
    assert len(res["models"]["T4-lambda1"]["test_accuracy"]["values"]) == 2
    for png in ("accuracy_first_1000.png", "accuracy_whole_run.png"):  # two families, a zoomed second row
        check_png(out / png, (6.2 * 2, 4.0 * 2))
    check_png(out / "teacher_student_loss.png", (6.2 * 2, 4.0))
    # The KL·T² student at the lambda > 0 best on validation (first seed), beside its lambda = 0 run.
    val = {lam: res["summary"]["T4"][lam]["val_accuracy"]["mean"] for lam in ("0.5", "1")}
    lam = max(val, key=lambda k: (val[k], -float(k)))  # ties: the smaller lambda
    rows = check_deployment(res, out, ["teacher mlp:48", f"distilled mlp:48 (lambda={lam}, T=4)",
                                        "student alone mlp:48 (lambda=0)"])
    assert rows[f"distilled mlp:48 (lambda={lam}, T=4)"]["accuracy"] == pytest.approx(
        res["models"][f"T4-lambda{lam}"]["test_accuracy"]["values"][0])
    assert rows["student alone mlp:48 (lambda=0)"]["accuracy"] == pytest.approx(
        res["models"]["baseline"]["test_accuracy"]["values"][0])


def test_lambda_sweep_needs_lambda_zero(tmp_path, small_mnist, capsys):
    assert (
        main(["run", "lambda-sweep", "--out", str(tmp_path / "x"), "--no-progress", "--set", "lambdas=[0.5, 1]"]) == 2
    )
    assert "lambdas" in capsys.readouterr().err


NNFWP_TINY = ("train_size=null", "val_size=200", "seeds=2", "batch_size=16")


def test_nnfwp(tmp_path, small_mnist):
    out, res = _run(
        tmp_path,
        "nnfwp",
        *NNFWP_TINY,
        "search_benchmark_lrs=[0.01, 0.1]",
        "search_student_lrs=[0.1]",
        "search_temperatures=[2, 4]",
        "search_alphas=[0.5]",
    )
    models = res["models"]
    assert {"teacher", "benchmark", "tuned-benchmark", "distilled"} <= set(models)
    assert {f"mse-student-lr{lr:g}" for lr in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)} <= set(models)
    assert len(models["distilled"]["test_accuracy"]["values"]) == 2
    assert res["chosen_benchmark_lr"] in (0.01, 0.1)
    chosen = res["chosen_student"]
    assert chosen["T"] in (2.0, 4.0) and chosen["alpha"] == 0.5 and chosen["lr"] == 0.1
    search = [r for r in res["records"] if r["role"] == "student-search"]
    best = max(search, key=lambda r: r["val_accuracy"])
    assert best["T"] == chosen["T"]
    diff = np.mean(models["distilled"]["test_accuracy"]["values"]) - np.mean(
        models["tuned-benchmark"]["test_accuracy"]["values"]
    )
    assert res["student_minus_benchmark_points"] == pytest.approx(100 * diff)
    assert res["beats_benchmark"] == (diff > 0)
    check_png(out / "nnfwp.png", (12, 4.3))
    # The part-2 teacher and the search's chosen nets (first seed): the distilled 784-10 and the benchmark.
    rows = check_deployment(res, out, ["teacher mlp:16,16,activation=leaky_relu (part 2, converged)",
                                        f"distilled linear ({sweeps.label(chosen)})",
                                        f"student alone linear (tuned benchmark, lr={res['chosen_benchmark_lr']:g})"])
    _, distilled, alone = rows.values()
    assert distilled["params"] == alone["params"] == 8 * 8 * 10 + 10  # 784-10 on 8x8 digits
    assert distilled["accuracy"] == pytest.approx(models["distilled"]["test_accuracy"]["values"][0], abs=1e-3)
    assert alone["accuracy"] == pytest.approx(models["tuned-benchmark"]["test_accuracy"]["values"][0], abs=1e-3)


def test_nnfwp_search_runs_one_pass_per_loss_kind(tmp_path, small_mnist, capsys):
    _, res = _run(
        tmp_path,
        "nnfwp",
        *NNFWP_TINY,
        "part2_teacher_epochs=0",
        "search_benchmark_lrs=[0.01, 0.1]",
        "search_student_lrs=[0.05, 0.1]",
        "search_temperatures=[2]",
        "search_alphas=[1, 0.5]",
        'search_losses=["kl", "logit_mse"]',
    )
    log = capsys.readouterr().out
    assert "search, loss kl, with the benchmark's rates: 6 net(s)" in log and "search, loss logit_mse: 4 net(s)" in log
    search = [r for r in res["records"] if r["role"] == "student-search"]
    assert [(r["loss"], r["alpha"], r["lr"]) for r in search] == [
        (k, a, lr) for k in ("kl", "logit_mse") for a in (1.0, 0.5) for lr in (0.05, 0.1)
    ]
    assert [r["lr"] for r in res["records"] if r["role"] == "benchmark-search"] == [0.01, 0.1]
    best = max(search, key=lambda r: r["val_accuracy"])
    assert all(res["chosen_student"][k] == best[k] for k in ("loss", "T", "alpha", "lr"))
    for role in ("benchmark", "student"):
        assert sorted(r["seed"] for r in res["records"] if r["part"] == 2 and r["role"] == role) == [0, 1]


def test_cifar10_mini(tmp_path, monkeypatch):
    monkeypatch.setitem(data.LOADERS, "cifar10", _tiny_cifar)
    sets = ["val_size=40", "train_size=null", "test_size=null", "teacher_epochs=2", "student_epochs=2",
            "lambdas=[0.1, 0.5]", "temperatures=[1, 4]", "batch_size=40", "seeds=2",
            "teacher=cifar_quick:8,8,16,16", "student=cifar_mini:4,4,16"]
    out, res = _run(tmp_path, "cifar10-mini", *sets)
    models = res["models"]
    assert {"teacher", "mini-alone", "mini-distilled", "mini-lambda0.1-T1", "mini-lambda0.5-T4"} <= set(models)
    assert models["mini-alone"]["params"] < models["teacher"]["params"]
    recs = [r for r in res["records"] if r["role"] == "distilled"]
    assert len(recs) == 2 * 2 * 2 and len(recs[0]["history"]) == 2
    means = sweeps.aggregate(recs, ["lam", "T"], ["val_accuracy"])
    best = max(means, key=lambda r: r["val_accuracy"]["mean"])
    assert res["chosen"] == {"lambda": best["lam"], "temperature": best["T"]}
    check_png(out / "cifar10_mini.png", (13, 4.5))
    # The deployment table: the teacher, the mini model alone and the chosen distilled one (first seed each).
    rows = res["deployment"]["rows"]
    chosen = f"cifar_mini:4,4,16 distilled (λ={best['lam']:g}, T={best['T']:g})"
    assert list(rows) == ["teacher cifar_quick:8,8,16,16", "cifar_mini:4,4,16 alone", chosen]
    assert rows[chosen]["params"] < rows["teacher cifar_quick:8,8,16,16"]["params"]
    first = [r for r in res["records"] if r["seed"] == 0 and r["role"] == "distilled"
             and (r["lam"], r["T"]) == (best["lam"], best["T"])]
    assert rows[chosen]["accuracy"] == pytest.approx(first[0]["test_accuracy"])
    assert "<!-- kdistill:deployment -->" in (out / "results.md").read_text()
    # Every finished model is a stored unit; --resume of the finished run trains nothing and agrees.
    calls = []
    monkeypatch.setattr(cifar10_mini, "fit", lambda *a, **k: calls.append(1))
    argv = [a for s in sets for a in ("--set", s)]
    assert main(["run", "cifar10-mini", "--out", str(out), "--no-progress", "--resume", *argv]) == 0
    again = json.loads((out / "results.json").read_text())
    assert calls == [] and len(again["resumed_units"]) == 1 + 2 * 5
    assert again["records"] == res["records"] and again["deployment"]["rows"].keys() == rows.keys()
