"""Run directories: one run at a time (a lock), only kdistill's own files replaced, interrupted writes cleaned.

The runs are the real command (in-process ``main`` or ``python -m kdistill.cli``) and the real ``fit`` on the
scikit-learn digits or a few random tensors, one epoch or a handful.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from kdistill import TrainConfig, fit
from kdistill.cli.app import main
from kdistill.io import read_checkpoint_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KDISTILL_DEVICE": "cpu"}
TRAIN = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "1", "--batch-size", "64", "--no-progress"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def _spawn(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdistill.cli", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_run_into_a_running_runs_directory_is_refused_naming_the_holder(tmp_path, capsys):
    """Two runs into one --out used to both exit 0, one's config.yaml beside the other's model."""
    out = tmp_path / "run"
    slow = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "400", "--batch-size", "16", "--no-progress"]
    proc = _spawn(slow, out)
    try:
        _wait_for(out / "config.yaml", proc)
        rc, err = _run(TRAIN + ["--out", str(out)], capsys)
        assert rc == 2 and err.startswith("kdistill: error: --out:") and len(err.splitlines()) == 1, err
        assert "in use by another kdistill run" in err and f"pid {proc.pid}" in err, err
        with pytest.raises(ValueError, match=f"in use by another kdistill run \\(pid {proc.pid}"):
            fit(nn.Linear(64, 10), (torch.randn(40, 64), torch.arange(40) % 10), TrainConfig(epochs=1),
                out_dir=out, overwrite=True, progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # The lock died with its process: its file stays, names the dead pid, and blocks nothing.
    assert (out / ".kdistill.lock").is_file()
    rc, err = _run(TRAIN + ["--out", str(out), "--overwrite"], capsys)
    assert rc == 0, err


def test_a_directory_holding_only_a_users_file_is_refused_and_overwrite_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("my,own,numbers\n1,2,3\n")  # a name kdistill writes, but not kdistill's file
    rc, err = _run(TRAIN + ["--out", str(out)], capsys)
    assert rc == 2 and "not empty" in err and "did not write" in err and "--overwrite" in err, err
    assert (out / "metrics.csv").read_text() == "my,own,numbers\n1,2,3\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]  # nothing added by the refused run
    (out / "notes.txt").write_text("kept")
    rc, err = _run(TRAIN + ["--out", str(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "kept" and (out / "model.safetensors").is_file()


def test_config_inside_out_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    text = "data: digits\nmodel: mlp:8\ntrain:\n  epochs: 1\n"
    (out / "config.yaml").write_text(text)
    for extra in ([], ["--overwrite"]):
        rc, err = _run(["train", "--config", str(out / "config.yaml"), "--out", str(out), "--no-progress", *extra], capsys)
        assert rc == 2 and "--config" in err and "choose another --out" in err, err
        assert (out / "config.yaml").read_text() == text
    rc, err = _run(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert rc == 0, err


def _xy(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.arange(n) % 3


def _lin():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_api_fit_refuses_a_finished_run_and_overwrite_replaces_every_file(tmp_path):
    import yaml

    out = tmp_path / "api"
    fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20, lr=0.1), out_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"finished run.*overwrite=True"):
        fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20, lr=0.2), out_dir=out, progress=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.1
    fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20, lr=0.2), out_dir=out, overwrite=True, progress=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.2  # not the first fit's config
    with pytest.raises(ValueError, match="not empty"):  # a directory of the user's files
        (tmp_path / "own").mkdir()
        (tmp_path / "own" / "metrics.csv").write_text("mine")
        fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20), out_dir=tmp_path / "own", progress=False)


def test_api_fit_after_one_killed_before_its_first_checkpoint_writes_its_own_config(tmp_path):
    import yaml

    from kdistill.engine import Callback

    class Stop(Callback):
        def on_fit_start(self, state):
            raise KeyboardInterrupt

    out = tmp_path / "api"
    with pytest.raises(KeyboardInterrupt):
        fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20, lr=0.1), out_dir=out, progress=False, callbacks=[Stop()])
    assert not (out / "checkpoint.safetensors").exists() and (out / "config.yaml").exists()
    fit(_lin(), _xy(), TrainConfig(epochs=1, batch_size=20, lr=0.3), out_dir=out, progress=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.3


def test_a_kill_during_the_first_checkpoint_write_does_not_block_a_restart(tmp_path, capsys):
    """safetensors writes ``.tmpXXXXXX`` beside its target; a kill mid-write left it, and only --overwrite
    (which kept it forever) could start the run again."""
    out = tmp_path / "run"
    rc, err = _run(TRAIN + ["--out", str(out)], capsys)
    assert rc == 0, err
    for name in ("checkpoint.safetensors", "model.safetensors", "results.json", "results.md"):
        (out / name).unlink()  # as a run killed while writing its first checkpoint leaves it
    (out / ".tmpAb3dE9").write_bytes(b"half a checkpoint")  # safetensors' own temporary file
    (out / ".checkpoint.safetensors.k2j4l5m6.tmp").write_bytes(b"")  # kdistill's atomic_path file
    rc, err = _run(TRAIN + ["--out", str(out)], capsys)
    assert rc == 0, err
    assert not (out / ".tmpAb3dE9").exists() and not list(out.glob(".*.tmp"))
    assert (out / "model.safetensors").is_file()


def test_disk_full_during_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(tmp_path, capsys, monkeypatch):
    import kdistill.io as kio

    real, calls = kio.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second epoch's checkpoint
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(kio, "save_file", full_disk)
    out = tmp_path / "run"
    rc, err = _run(TRAIN[:6] + ["3", "--batch-size", "64", "--no-progress", "--out", str(out)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoint.safetensors" in err and "disk full" in err, err
    assert read_checkpoint_state(out / "checkpoint.safetensors")["epoch"] == 1  # the previous one, whole
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".kdistill.lock"]
    monkeypatch.setattr(kio, "save_file", real)
    rc, err = _run(TRAIN[:6] + ["3", "--batch-size", "64", "--no-progress", "--out", str(out), "--resume"], capsys)
    assert rc == 0, err


def test_ctrl_c_ends_the_run_with_one_line_and_exit_130_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "mlp:8", "--epochs", "60", "--batch-size", "16", "--no-progress"]
    proc = _spawn(args, out)
    _wait_for(out / "checkpoint.safetensors", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert err.startswith("kdistill: interrupted; resume with --resume"), err
    epoch = read_checkpoint_state(out / "checkpoint.safetensors")["epoch"]
    assert 0 < epoch < 60
    r = subprocess.run([sys.executable, "-m", "kdistill.cli", *args, "--out", str(out), "--resume"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 60
    assert json.loads((out / "results.json").read_text())["models"]["model"]["spec"] == "mlp:8"
