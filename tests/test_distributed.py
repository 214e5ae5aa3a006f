"""Data-parallel fit: two gloo processes on the CPU train the same student as one process with the same batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdistill import TrainConfig, data, fit
from kdistill.models import build_model
from kdistill.sweeps.multi import fit_many
from kdistill.teachers.base import ModuleTeacher

CFG = dict(epochs=2, batch_size=32, lr=0.05, jitter=1, max_norm=3.0, device="cpu")
KD = {"name": "kd", "temperature": 4.0, "alpha": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher(d):
    return build_model("mlp:48", d.input_shape, 10, seed=5)  # untrained: any fixed teacher will do


class _Counting(ModuleTeacher):
    """A live teacher that records the size of every training batch it is shown."""

    def __init__(self, module):
        super().__init__(module)
        self.sizes: list[int] = []

    def logits(self, x, ids=None):
        if ids is not None:  # a training step (predict() passes no ids)
            self.sizes.append(len(x))
        return super().logits(x, ids)


def _worker(rank: int, n: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        torch.set_num_threads(1)
        d = data.load("digits", seed=0)
        teacher = _Counting(_teacher(d))
        r = fit(build_model("mlp:32,16", d.input_shape, 10, seed=0), d.train, TrainConfig(**CFG),
                teacher=teacher, method=KD, val=d.val, out_dir=out, progress=False)
        torch.save({"params": [p.detach() for p in r.model.parameters()], "history": r.history,
                    "sizes": teacher.sizes},
                   os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done with every collective before either tears gloo down (else SIGABRT)
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_same_student_as_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    d = data.load("digits", seed=0)
    alone = fit(build_model("mlp:32,16", d.input_shape, 10, seed=0), d.train, TrainConfig(**CFG),
                teacher=_teacher(d), method=KD, val=d.val, progress=False)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    steps = 2 * (len(d.train) // 32)
    for run in runs:  # each process saw half of every batch (so identical full batches cannot pass) ...
        assert run["sizes"] == [16] * steps
    for run in runs:  # ... both hold the same model, and it is the single-process one
        for a, b in zip(run["params"], alone.model.parameters()):
            assert torch.allclose(a, b.detach(), atol=1e-5, rtol=0)
        assert [h["train_loss"] for h in run["history"]] == pytest.approx(
            [h["train_loss"] for h in alone.history], abs=1e-5)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def _odd_batch_worker(rank: int, n: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        d = data.load("digits", seed=0)
        with pytest.raises(ValueError, match="batch_size: 33 does not split evenly between 2 processes"):
            fit(build_model("mlp:8", d.input_shape, 10), d.train, TrainConfig(batch_size=33, device="cpu"),
                progress=False)
        with pytest.raises(ValueError, match="not data-parallel"):
            fit_many([build_model("mlp:8", d.input_shape, 10)], d.train, TrainConfig(device="cpu"), progress=False)
        open(os.path.join(out, f"ok{rank}"), "w").close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_an_uneven_batch_and_a_sweep_are_refused_in_a_process_group(tmp_path):
    mp.spawn(_odd_batch_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()


def test_cli_under_torchrun_matches_one_process(tmp_path):
    import json
    import subprocess
    import sys

    args = ["train", "--data", "digits", "--model", "mlp:16", "--epochs", "2", "--batch-size", "32", "--jitter", "1",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "kdistill.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "kdistill.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    lines = [json.loads(s) for s in two.stdout.splitlines() if s.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    assert lines[0]["test_errors"] == json.loads(one.stdout.splitlines()[-1])["test_errors"]
    from kdistill.io import load_model

    a, b = load_model(tmp_path / "two" / "model.safetensors"), load_model(tmp_path / "one" / "model.safetensors")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=0)
