"""The issue-4 experiments end to end on scikit-learn digits with tiny settings (plumbing, contract, arithmetic)."""

import json

import pytest

from kdistill import experiments
from kdistill.cli.app import main
from deploy_checks import check_deployment, check_png

TINY = ["val_size=200", "batch_size=64"]


def _check_contract(out, experiment, roles):
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == experiment
    for role in roles:
        assert {"test_errors", "test_accuracy"} <= set(results["models"][role]), role
    assert (out / "results.md").is_file()
    return results



def test_experiments_are_discovered_with_quick_and_full_profiles():
    for name in ("ensemble", "specialists", "few-data"):
        module = experiments.get(name)
        assert {"quick", "full"} <= set(module.PROFILES) and module.DESCRIPTION


def test_ensemble_experiment(tmp_path):
    out = tmp_path / "ens"
    results = experiments.run_experiment(
        "ensemble", "quick", out, TINY + ["datasets=[digits]", "members=3", "model=mlp:24", "epochs=2", "reps=2",
                                          "lr=0.1", "temperatures=[3.0]", "alphas=[1.0]"], progress=False)
    _check_contract(out, "ensemble", ["digits:single", "digits:ensemble", "digits:distilled"])
    summary = results["per_dataset"]["digits"]
    assert results["models"]["digits:single"]["seeds"] == 6 and results["models"]["digits:distilled"]["seeds"] == 2
    # The retained share is the ratio of the mean gains, each measured against that repetition's members.
    gains = summary["ensemble_gain"]["mean"], summary["distilled_gain"]["mean"]
    if gains[0] > 0:
        assert summary["retained_share_of_gain"] == pytest.approx(gains[1] / gains[0])
    single_mean = results["models"]["digits:single"]["test_accuracy"]["mean"]
    ens_mean = results["models"]["digits:ensemble"]["test_accuracy"]["mean"]
    assert gains[0] == pytest.approx(ens_mean - single_mean, abs=1e-9)
    assert set(summary["validation_errors"]) == {"arithmetic, T=3.0, alpha=1.0", "geometric, T=3.0, alpha=1.0"}
    # Both means get their own distilled student every repetition; the other mean's is reported beside it.
    head = summary["chosen"]["mean"]
    other = ({"arithmetic", "geometric"} - {head}).pop()
    assert set(summary["by_mean"]) == {"arithmetic", "geometric"}
    assert results["models"][f"digits:distilled-{other}"]["seeds"] == 2
    assert summary["by_mean"][head]["retained_share_of_gain"] == summary["retained_share_of_gain"]
    check_png(out / "ensemble.png", (4.2, 3.4))  # one panel: one data set
    rows = check_deployment(results, out, [f"teacher ensemble 3 x mlp:24 ({head} mean)",
                                            f"distilled mlp:24 ({head}, T=3, alpha=1)",
                                            "student alone mlp:24 (one member)"])
    teacher, distilled, alone = rows.values()
    # The ensemble module is the first repetition's ensemble as scored above, with all its members' weights.
    assert teacher["accuracy"] == pytest.approx(results["models"]["digits:ensemble"]["test_accuracy"]["values"][0])
    assert teacher["params"] == 3 * alone["params"] == 3 * distilled["params"]
    assert alone["accuracy"] == pytest.approx(results["models"]["digits:single"]["test_accuracy"]["values"][0])


def test_few_data_experiment(tmp_path):
    out = tmp_path / "few"
    results = experiments.run_experiment(
        "few-data", "quick", out, TINY + ["dataset=digits", "student=mlp:24", "epochs=3", "min_epoch_samples=600",
                                          "seeds=2", "sweep_seeds=1", "fraction=0.1", "sweep=[0.1,1.0]", "lr=0.1",
                                          "temperatures=[3.0]", "alphas=[1.0]"], progress=False)
    m = _check_contract(out, "few-data", ["hard-10%", "soft-10%", "hard-all"])["models"]
    hard, soft, full = (m[r]["test_accuracy"]["mean"] for r in ("hard-10%", "soft-10%", "hard-all"))
    assert results["recovered_share_of_gap"] == pytest.approx((soft - hard) / (full - hard))
    assert results["sweep"]["1.0"]["hard"]["mean"] == pytest.approx(m["hard-all"]["test_accuracy"]["values"][0])
    check_png(out / "few_data.png", (5.6, 3.8))
    rows = check_deployment(results, out, ["teacher mlp:24 (hard-all)", "distilled mlp:24 (soft-10%, T=3, alpha=1)",
                                            "student alone mlp:24 (hard-10%)"])
    for name, role in zip(rows, ("hard-all", "soft-10%", "hard-10%")):  # the first seed's models
        assert rows[name]["accuracy"] == pytest.approx(m[role]["test_accuracy"]["values"][0]), name


def test_specialists_experiment_from_the_cli(tmp_path, capsys):
    out = tmp_path / "spec"
    args = ["run", "specialists", "--out", str(out), "--no-progress"]
    for kv in TINY + ["dataset=digits", "model=mlp:32", "epochs=4", "specialist_epochs=2", "seeds=1", "lr=0.1",
                      "n_clusters=3", "top_ks=[1,2]", "distill_temperatures=[2.0]", "distill_alphas=[0.7]"]:
        args += ["--set", kv]
    assert main(args) == 0
    results = _check_contract(out, "specialists", ["generalist", "generalist+specialists", "distilled-combination"])
    seed = results["per_seed"][0]
    assert seed["clusters"] and all(len(c) >= 2 for c in seed["clusters"])
    assert results["chosen"]["top_k"] in (1, 2)
    assert "test_accuracy_special" in results["models"]["generalist+specialists"]
    assert results["accuracy_change"]["mean"] == pytest.approx(
        seed["combined"]["accuracy"] - seed["generalist"]["accuracy"])
    check_png(out / "specialists.png", (8, 3.6))
    k, n = results["chosen"]["top_k"], len(seed["clusters"])
    rows = check_deployment(results, out, [f"teacher generalist mlp:32 + {n} specialist{'s' * (n > 1)} (top-{k})",
                                            "distilled mlp:32 (T=2, alpha=0.7)",
                                            "student alone mlp:32 (the generalist)"])
    teacher, distilled, alone = rows.values()
    # The teacher row is the whole combination: its accuracy as scored above, every specialist's weights.
    assert teacher["accuracy"] == pytest.approx(seed["combined"]["accuracy"])
    assert teacher["params"] > alone["params"] == distilled["params"]
    assert alone["accuracy"] == pytest.approx(seed["generalist"]["accuracy"])
    assert distilled["accuracy"] == pytest.approx(seed["distilled"]["accuracy"])


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="members"):
        experiments.run_experiment("ensemble", "quick", tmp_path / "a", ["members=1", "datasets=[digits]"])
    with pytest.raises(ValueError, match="fraction"):
        experiments.run_experiment("few-data", "quick", tmp_path / "b", ["fraction=1.5", "dataset=digits"])
