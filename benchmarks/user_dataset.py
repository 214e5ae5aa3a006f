"""A practitioner's own pipeline: a torchvision ``ImageFolder`` with its own random transforms and a live teacher,
through ``kdistill.fit``, against kdistill's in-memory batched path on the same images, with the arithmetic
bound of the streamed path printed beside it.

    /work/eco/bin/python benchmarks/user_dataset.py --out benchmarks/results/user-dataset      # ~3-5 min, 2 cores
    /work/eco/bin/python benchmarks/user_dataset.py --quick --out /tmp/ud                      # smoke test

Needs torchvision and timm (the torch 2.14.1 + torchvision 0.29.1 environment of ``.ci/run``). Teacher
``tv:resnet18``, student ``timm:resnet10t``, seeded random weights, 10 classes, 32x32 RGB PNG files (CIFAR-10
images with ``--data-path``, else seeded random pixels; throughput does not depend on them); KD at T = 4,
alpha = 0.9, batch 128, SGD.

* streamed: ``fit(student, ImageFolder(root, RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize),
  teacher=teacher, train.workers=W)``: kdistill's ``DataLoader`` (persistent workers, prefetch 4, pinned memory
  on CUDA); the teacher runs on the student's exact batch (the data changes between reads).
* in memory: the same images decoded once into a uint8 tensor, ``augment="crop4,flip"``, the live teacher.
* the bound of the streamed path, from three measurements in the same run: ``d`` = seconds per sample to read,
  decode and transform one item (one process, one thread, as a worker runs), ``s`` = wall seconds per sample of
  the in-memory step and ``c`` = its CPU seconds per sample (all threads). With ``W`` workers overlapping the
  step on ``K`` cores, no schedule beats ``max(s, d / W, (c + d) / K)`` seconds per sample.

Each measurement is the second epoch of a 2-epoch ``fit`` (the steady state a many-epoch run spends its time in:
the persistent workers are up), after one warm-up fit of each; repetitions alternate between the two paths and
the median is reported, with the machine's load and other processes' CPU share. ``whole_fits_s`` in the JSON
keeps each whole fit's time (worker start-up and the teacher's data check included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import is_busy, machine, machine_busy_s, other_cpu_share  # noqa: E402  (same measurement rules)

from kdistill import TrainConfig, fit  # noqa: E402
from kdistill.engine import Callback  # noqa: E402
from kdistill.data import TensorData  # noqa: E402
from kdistill.io import write_json, write_text  # noqa: E402

BATCH, T, ALPHA, LR = 128, 4.0, 0.9, 0.05
METHOD = {"name": "kd", "temperature": T, "alpha": ALPHA}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CLASSES = tuple(f"c{i}" for i in range(10))
TARGET = 0.9  # of the bound


def images(data_path: str | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 32 x 32 x 3, labels): CIFAR-10 training images or seeded random pixels."""
    if data_path:
        from kdistill.data.cifar import load_cifar10

        train = load_cifar10(data_path, download_ok=False).train
        x = (train.x[:n] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return x, train.y[:n].numpy()
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / CLASSES[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def models():
    import timm
    import torchvision

    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    return teacher, student


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=BATCH, lr=LR, seed=0, device="cpu", checkpoint=False, **kw)


class EpochClock(Callback):
    """Wall and CPU seconds (this process, all threads) of each epoch, read at its end."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_epoch_end(self, state, rows) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


def item_seconds(ds, n: int) -> float:
    """Seconds per item to read, decode and transform, in this process with one torch thread (as a worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds[0]
        t0 = time.perf_counter()
        for i in range(n):
            ds[i % len(ds)]
        return (time.perf_counter() - t0) / n
    finally:
        torch.set_num_threads(threads)


def epoch(make, train, c: TrainConfig, teacher) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process) of the second epoch of a 2-epoch ``fit`` (the steady state:
    the loader's workers are up, the teacher's data check done), and the whole fit's wall seconds."""
    _, student = make()
    clock = EpochClock()
    res = fit(student, train, c, teacher=teacher, method=METHOD, callbacks=[clock], progress=False)
    (w1, c1), (w2, c2) = clock.marks[-2], clock.marks[-1]
    return w2 - w1, c2 - c1, res.wall_time_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", help="folder with cifar-10-binary.tar.gz (else random pixels)")
    p.add_argument("--n", type=int, default=2048, help="images (one epoch each measurement)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="256 images, one repetition")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.reps = 256, 1
    import torchvision.transforms as T_

    out = Path(a.out)
    m0 = {**machine(), "loadavg_before": os.getloadavg()}
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    teacher, _ = models()
    x, y = images(a.data_path, a.n)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), x, y)
        tf = T_.Compose([T_.RandomCrop(32, padding=4), T_.RandomHorizontalFlip(), T_.ToTensor(), T_.Normalize(MEAN, STD)])
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(tmp, transform=tf)
        in_mem = TensorData(x=torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).contiguous(),
                            y=torch.as_tensor(y), classes=CLASSES, name="user-bench")
        runs = {"streamed": (folder, cfg(workers=a.workers)), "in memory": (in_mem, cfg(augment="crop4,flip"))}
        for data, c in runs.values():  # warm-up
            epoch(models, data, c, teacher)
        times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        for _ in range(a.reps):
            for k, (data, c) in runs.items():
                times[k].append(epoch(models, data, c, teacher))
        d = item_seconds(folder, min(512, a.n))
    n_used = (a.n // BATCH) * BATCH
    med = {k: statistics.median(w for w, _, _ in v) for k, v in times.items()}
    cpu = statistics.median(c for _, c, _ in times["in memory"]) / n_used
    s = med["in memory"] / n_used
    cores = os.cpu_count() or 1
    bound_s = max(s, d / max(1, a.workers), (cpu + d) / cores)
    res = {
        "machine": {**m0, "loadavg_after": os.getloadavg()}, "other_cpu_share": other_cpu_share(busy0, own0, wall0),
        "samples": n_used, "workers": a.workers, "reps": a.reps,
        "samples_per_s": {k: n_used / v for k, v in med.items()},
        "item_s": d, "step_s": s, "step_cpu_s": cpu, "bound_samples_per_s": 1 / bound_s,
        "streamed_of_bound": (n_used / med["streamed"]) * bound_s,
        "streamed_vs_in_memory": med["in memory"] / med["streamed"],
        "second_epochs_s": {k: [w for w, _, _ in v] for k, v in times.items()},
        "whole_fits_s": {k: [f for _, _, f in v] for k, v in times.items()},
    }
    res["busy"] = is_busy({**m0, "other_cpu_share": res["other_cpu_share"]})
    write_json(out / "user_dataset.json", res)
    write_text(out / "user_dataset.md", markdown(res))
    print(markdown(res))
    return 0


def markdown(r: dict[str, Any]) -> str:
    sps = r["samples_per_s"]
    ok = "met" if r["streamed_of_bound"] >= TARGET else "MISSED"
    return "\n".join([
        f"# A user's ImageFolder + torchvision transforms, live teacher (tv resnet18 -> timm resnet10t)",
        "",
        f"{r['samples']} samples per epoch; the second epoch of 2-epoch fits, median of {r['reps']}; {r['workers']} workers; "
        f"other processes' share of the CPU time {r['other_cpu_share']:.1%}; busy: {r['busy']}",
        "",
        "| path | samples/s |",
        "|---|---|",
        f"| streamed ImageFolder, torchvision transforms | {sps['streamed']:.1f} |",
        f"| in memory, batched crop4+flip | {sps['in memory']:.1f} |",
        f"| bound of the streamed path: max(s, d/W, (c+d)/K) | {r['bound_samples_per_s']:.1f} |",
        "",
        f"d = {r['item_s'] * 1e3:.2f} ms/item, s = {r['step_s'] * 1e3:.2f} ms/sample, "
        f"c = {r['step_cpu_s'] * 1e3:.2f} CPU ms/sample",
        f"streamed at {100 * r['streamed_of_bound']:.0f}% of its bound (target {100 * TARGET:.0f}%: {ok}); "
        f"the streamed path runs at {r['streamed_vs_in_memory']:.2f}x the in-memory path's speed",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
