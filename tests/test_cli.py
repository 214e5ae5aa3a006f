import json
import time

import pytest

from kdistill import data
from kdistill.cli.app import main
from deploy_checks import check_wall_time


@pytest.fixture
def small_mnist(monkeypatch):
    """Make `mnist` resolve to scikit-learn digits so CLI and experiment plumbing run in seconds, offline."""
    monkeypatch.setitem(data.LOADERS, "mnist", lambda path=None: data.load_digits())
    monkeypatch.setitem(data.DEFAULT_VAL_SIZE, "mnist", 200)


def test_train_distill_evaluate_roundtrip(tmp_path, capsys):
    t_out, s_out = tmp_path / "teacher", tmp_path / "student"
    assert main(["train", "--data", "digits", "--model", "mlp:64", "--epochs", "8", "--lr", "0.1", "--out", str(t_out),
                 "--no-progress", "--set", "train.batch_size=64"]) == 0
    teacher = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert teacher["test_accuracy"] > 0.85
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "model.safetensors", "checkpoint.safetensors",
                 "results.json", "results.md"):
        assert (t_out / name).is_file(), name
    assert main(["distill", "--data", "digits", "--student", "mlp:32", "--teacher", str(t_out / "model.safetensors"),
                 "-T", "4", "--alpha", "0.9", "--epochs", "8", "--lr", "0.1", "--out", str(s_out), "--no-progress"]) == 0
    student = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert student["test_accuracy"] > 0.8
    results = json.loads((s_out / "results.json").read_text())
    assert set(results) >= {"experiment", "profile", "wall_time_s", "models"}
    assert "test_errors" in results["models"]["distilled"]
    assert main(["evaluate", "--data", "digits", "--model", str(s_out / "model.safetensors"),
                 "--teacher", str(t_out / "model.safetensors"), "-T", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["errors"] == student["test_errors"]
    assert 0 <= metrics["teacher_agreement"] <= 1 and "per_class_accuracy" in metrics and "ece" in metrics


def test_resume_via_cli(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--data", "digits", "--model", "mlp:16", "--epochs", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(args[:-1] + ["--resume", "--no-progress"]) == 0  # a finished run resumes to itself
    assert len((out / "metrics.jsonl").read_text().strip().splitlines()) == 2
    # Another schedule would mix two runs into one: refused, naming the field.
    assert main(args[:-1] + ["--resume", "--set", "train.epochs=3", "--no-progress"]) == 2
    assert "train.epochs" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "digits", "--model", "mlp:8", "--lr", "-1", "--out", "X"], "train.lr"),
    (["train", "--data", "digits", "--model", "nope", "--out", "X"], "unknown model"),
    (["train", "--data", "digits", "--out", "X"], "model"),
    (["distill", "--data", "digits", "--model", "mlp:8", "--out", "X"], "teacher"),
    (["distill", "--data", "digits", "--model", "mlp:8", "--teacher", "missing.safetensors", "--out", "X"], "missing"),
    (["train", "--data", "digits", "--model", "mlp:8", "--set", "train.bogus=1", "--out", "X"], "unknown option"),
    (["train", "--data", "digits", "--model", "mlp:8", "--resume", "--out", "X"], "resume"),
    (["run", "no-such-experiment"], "unknown"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_run_list(capsys):
    assert main(["run", "--list"]) == 0
    assert "hinton-mnist" in capsys.readouterr().out


@pytest.mark.parametrize("copies, jitter, plain, roles, headline", [
    (0, 0, True, {"teacher", "baseline", "distilled"}, "plain"),
    (2, 0, True, {"teacher", "baseline", "distilled", "distilled_plain", "baseline_augmented"}, "augmented"),
    (0, 1, False, {"teacher", "baseline", "distilled"}, "jittered"),
    (0, 1, True, {"teacher", "baseline", "distilled", "distilled_plain", "baseline_jittered"}, "jittered"),
])
def test_hinton_mnist_plumbing_on_small_data(tmp_path, small_mnist, capsys, copies, jitter, plain, roles, headline):
    out = tmp_path / "h"
    argv = ["run", "hinton-mnist", "--profile", "quick", "--out", str(out), "--no-progress",
            "--set", "teacher=mlp:64,dropout=0.2", "--set", "teacher_epochs=3", "--set", "student=mlp:32",
            "--set", "student_epochs=3", "--set", "val_size=200", "--set", "alphas=[1.0, 0.5]", "--set", "seeds=2",
            "--set", f"augmented_copies={copies}", "--set", "augmented_passes=1",
            "--set", f"student_jitter={jitter}", "--set", f"plain_protocol={str(plain).lower()}"]
    started = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - started
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "hinton-mnist" and res["profile"] == "quick"
    check_wall_time(res, elapsed)
    assert set(res["models"]) == roles
    assert res["headline_protocol"] == headline
    md = (out / "results.md").read_text()
    assert all(f"- `{r}`:" in md for r in roles - {"teacher"})  # every role says what it was trained on
    d = res["models"]["distilled"]["test_errors"]
    assert set(d) == {"mean", "std", "values"} and len(d["values"]) == 2
    assert all(len(res["models"][r]["test_errors"]["values"]) == 2 for r in roles - {"teacher"})
    assert res["chosen_alpha"] in (1.0, 0.5)
    assert (out / "results.md").read_text().startswith("# hinton-mnist")
    assert (out / "config.yaml").is_file() and (out / "environment.json").is_file()
    rows = res["deployment"]["rows"]  # the point of distilling: student vs teacher, size, speed, accuracy kept
    assert set(rows) == {"teacher", "distilled"} and rows["distilled"]["x_smaller"] > 1
    assert "Deployment" in (out / "results.md").read_text() and (out / "report.html").is_file()


@pytest.mark.parametrize("sets, match", [
    (["student_jitter=-1"], "student_jitter"),
    (["student_jitter=1.5"], "student_jitter"),
    (["plain_protocol=false", "student_jitter=0"], "no protocol"),
])
def test_hinton_mnist_refuses_bad_protocol_settings_before_training(tmp_path, small_mnist, capsys, sets, match):
    argv = ["run", "hinton-mnist", "--profile", "quick", "--out", str(tmp_path / "h"), "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "h" / "teacher").exists()  # refused before the teacher trained


def test_runs_record_the_source_revision_they_ran_from():
    """A record names its code: the commit (and whether src/ had uncommitted changes) of a git checkout."""
    import shutil
    import subprocess
    from pathlib import Path

    from kdistill.io import environment

    here = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(here), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout (an unpacked source tree): no revision to record")
    import kdistill

    if Path(kdistill.__file__).resolve().parents[2] != here:
        pytest.skip("kdistill is imported from an installed copy, not this checkout")
    env = environment()
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)


def test_hinton_quick_plain_profile_is_the_settings_of_its_record():
    """``--profile quick-plain`` reruns the committed plain-protocol quick record: the same settings, and the
    settings added since (the protocol switches) at values that leave that run unchanged."""
    from pathlib import Path

    import yaml

    from kdistill.experiments import hinton_mnist

    record = Path(__file__).resolve().parents[1] / "results" / "hinton-mnist" / "quick-plain" / "config.yaml"
    if not record.is_file():
        pytest.skip("the results/ records are not in this checkout")
    settings = yaml.safe_load(record.read_text())["settings"]
    profile = hinton_mnist.PROFILES["quick-plain"]
    assert {k: profile[k] for k in settings} == settings
    assert {k: v for k, v in profile.items() if k not in settings} == {"plain_protocol": True, "student_jitter": 0}


def test_evaluate_and_predict_say_why_a_run_of_fit_needs_data(tmp_path, capsys):
    """A run of fit() on the user's own Dataset has a config.yaml without data (issue 26): the error says so
    instead of claiming no config.yaml is there."""
    import torch

    from kdistill import TrainConfig, fit
    from kdistill.models import build_model

    x, y = torch.randn(24, 4), torch.arange(24) % 2
    run = tmp_path / "run"
    fit(build_model("mlp:8", (4,), 2), torch.utils.data.TensorDataset(x, y), TrainConfig(epochs=1, batch_size=8),
        out_dir=run, progress=False)
    assert (run / "config.yaml").is_file()
    for argv in (["evaluate"], ["predict", "--save-logits", str(tmp_path / "l.npy")]):
        assert main([*argv, "--model", str(run / "model.safetensors")]) == 2
        err = capsys.readouterr().err
        assert "its config.yaml names no data" in err and "give --data NAME" in err, err
