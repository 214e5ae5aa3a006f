"""``kill -9`` at random (seeded) points, then ``--resume`` to the end: the same weights and metrics, bit for bit.

Each run is the real command (``python -m kdistill.cli``) on digits with batched augmentation, on one thread.
A run killed before its first checkpoint is simply started again (its directory holds nothing to lose);
one killed later is resumed. The result is compared with an uninterrupted run: every tensor of
``model.safetensors`` and every ``metrics.jsonl`` field but the wall time, and no stale ``.*.tmp`` file
of the atomic writes is left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.io import read_checkpoint_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KDISTILL_DEVICE": "cpu"}
TRAIN = ["train", "--data", "digits", "--model", "mlp:32", "--epochs", "24", "--batch-size", "64",
         "--augment", "crop2,flip", "--no-progress"]


def _cmd(args: list[str], out: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "kdistill.cli", *args, "--out", str(out), *(["--resume"] if resume else [])]


def _umask():
    os.umask(0o022)


def _run(args: list[str], out: Path, resume: bool = False) -> None:
    r = subprocess.run(_cmd(args, out, resume), env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_umask)
    assert r.returncode == 0, r.stderr


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")  # wall time: the one field that differs between runs
    return rows


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _training_time(run: Path) -> float:
    """Seconds the training loop of a finished run took (its last metrics row)."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["time_s"]


def _killed_then_resumed(args: list[str], out: Path, kills: int, seed: int, span: float) -> list[int]:
    """Run ``args`` into ``out``, SIGKILL it ``kills`` times at seeded random points within its first ``span``
    seconds of training, then run it to the end; return the checkpointed epoch after each kill."""
    rng = random.Random(seed)
    epochs = []
    for _ in range(kills):
        resume = (out / "checkpoint.safetensors").is_file()
        before = _stamp(out / "metrics.jsonl")
        proc = subprocess.Popen(_cmd(args, out, resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_umask)
        t0 = time.monotonic()
        # Training has started once this process rewrote metrics.jsonl (fit's first act); imports and data
        # loading take most of a run, and a kill there would test nothing.
        while proc.poll() is None and _stamp(out / "metrics.jsonl") in (None, before) and time.monotonic() - t0 < 120:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, span))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = out / "checkpoint.safetensors"
        epochs.append(read_checkpoint_state(state)["epoch"] if state.is_file() else 0)  # always whole: atomic
        if proc.returncode == 0:
            break
    _run(args, out, resume=(out / "checkpoint.safetensors").is_file())
    return epochs


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _metrics(a) == _metrics(b)
    assert not list(b.glob(".*.tmp")), list(b.glob(".*.tmp"))
    for name in ("model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "config.yaml"):
        assert (b / name).stat().st_mode & 0o777 == 0o644, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "train"
    _run(TRAIN, out)
    return out


def test_train_killed_and_resumed_is_bit_identical(reference, tmp_path):
    out = tmp_path / "train"
    span = _training_time(reference) / 3  # three kills, each within a third of the run: they land in training
    epochs = _killed_then_resumed(TRAIN, out, kills=3, seed=1, span=span)
    assert any(0 < e < 24 for e in epochs), epochs  # killed mid-run, after checkpoints, then resumed
    _same_run(reference, out)


def test_distill_killed_and_resumed_is_bit_identical(reference, tmp_path):
    args = ["distill", "--data", "digits", "--student", "mlp:16", "--teacher", str(reference / "model.safetensors"),
            "-T", "4", "--alpha", "0.5", "--epochs", "20", "--batch-size", "64", "--augment", "crop2,flip",
            "--no-progress"]
    ref = tmp_path / "ref"
    _run(args, ref)
    out = tmp_path / "distill"
    epochs = _killed_then_resumed(args, out, kills=2, seed=2, span=_training_time(ref) / 2)
    assert any(0 < e < 20 for e in epochs), epochs
    _same_run(ref, out)


def test_a_resumed_run_removes_stale_temporary_files(reference, tmp_path):
    """A kill during an atomic write leaves ``.NAME.XXXX.tmp`` beside the target; the next run deletes it."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.safetensors").unlink()
    (out / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"half a file")
    _run(TRAIN, out, resume=True)
    assert not list(out.glob(".*.tmp"))
    _same_run(reference, out)
