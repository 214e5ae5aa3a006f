"""CNN distillation throughput on CIFAR-10-shaped data: kdistill against the mdistiller/RepDistiller loop.

    python benchmarks/cnn_throughput.py --data-path /work/shared/data --out benchmarks/results   # ~5-10 min, 2 cores
    python benchmarks/cnn_throughput.py --quick --out /tmp/cnn                                   # smoke test (seconds)

Without ``--data-path`` the images are seeded random uint8 tensors of CIFAR-10's shape (throughput does
not depend on the pixels). Teacher ``resnet20`` (``--teacher``: another) and student ``resnet8``, seeded random weights;
KD at T = 4, alpha = 0.9; random crop with padding 4 + horizontal flip; batch 128; SGD (momentum 0.9, Nesterov).

* W5 (a) baseline: the loop people write from mdistiller/RepDistiller: a per-sample ``Dataset`` over uint8
  HWC images doing pad 4 + random crop + random flip + to-float + normalise per image (plain torch ops, as
  torchvision's transforms would), ``DataLoader(shuffle=True, num_workers=2, pin_memory=False)``, the
  teacher's forward on every batch under ``no_grad``, student forward/backward/SGD step.
  (b) ``kdistill.fit`` with ``augment="crop4,flip"`` and the live teacher (batched augmentation, teacher on
  the same augmented batch). (c) ``fit`` with ``teacher_views=8``: the one-off caching (8 teacher forwards per
  sample) is timed on its own; samples/s are given per epoch and with the caching amortised over 30 epochs.
  Each measurement is one epoch over the same N-sample subset (``fit``'s ``wall_time_s``; the baseline from
  creating the loader's iterator to the last step), after one warm-up run of each; repetitions are
  interleaved between the methods and the median is reported.
* W5 breakdown: the live-teacher step of ``engine/step.py`` replicated with torch's own ops and a clock read
  around each phase (data: gather + augmentation + layout; teacher forward; student forward; loss; backward;
  optimiser incl. zero_grad) over ~30 steps; "other" = fit's measured step time minus their sum.
* W5 with ``train.compile: true`` (``--no-compile`` skips it): the student's and the frozen teacher's forwards
  through torch.compile; each measurement is the second epoch of a 2-epoch fit (the first compiles), the
  compilation reported beside it and amortised, with the caching, over 30 CIFAR-10 epochs.
* W6: the student alone (resnet8, crop4+flip, no teacher: the case where data loading weighs most) on
  ``folder:`` data written once as PNG files: streamed (``in_memory=False``: StreamData through the DataLoader,
  ``workers=0`` and ``workers=2``) against the same images decoded into memory (``in_memory=True``).

Results (JSON, markdown) go to ``--out`` with the machine's description, its load before and after and the
share of CPU time other processes used during the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import is_busy, machine, machine_busy_s, other_cpu_share  # noqa: E402  (same measurement rules)

from kdistill import TrainConfig, fit  # noqa: E402
from kdistill.data import TensorData, load  # noqa: E402
from kdistill.data.augment import parse_augment  # noqa: E402
from kdistill.io import write_json, write_text  # noqa: E402
from kdistill.losses import distillation_loss  # noqa: E402
from kdistill.methods import build_method  # noqa: E402
from kdistill.methods.base import StepIO  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.models.layout import as_layout, use_channels_last  # noqa: E402
from kdistill.teachers.base import ModuleTeacher  # noqa: E402

TEACHER, STUDENT = "resnet20", "resnet8"  # the teacher: --teacher (resnet20 or larger, e.g. resnet56)
BATCH, LR, T, ALPHA, VIEWS, AMORTISE_EPOCHS = 128, 0.05, 4.0, 0.9, 8, 30
METHOD = {"name": "kd", "temperature": T, "alpha": ALPHA}
AUGMENT = "crop4,flip"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the usual CIFAR-10 normalisation
TARGETS = {"W5 live vs baseline": 1.5, "W5 cached (30 epochs amortised) vs baseline": 3.0,
           "W5 live, train.compile vs baseline": 1.5,
           "W5 cached, train.compile (30 epochs amortised) vs baseline": 3.0, "W6 streamed vs in-memory": 0.5}
CLASSES = tuple(f"c{i}" for i in range(10))


# ----- data -------------------------------------------------------------------------------------------
def cifar_images(data_path: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 N x 32 x 32 x 3 images, labels, description): CIFAR-10 training images, or seeded random ones."""
    if data_path:
        from kdistill.data.cifar import load_cifar10

        train = load_cifar10(data_path, download_ok=False).train
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
        x = (train.x[order] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return x, train.y[order].clone(), f"CIFAR-10 training images ({data_path}), seeded random subset"
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g), "seeded random uint8 images of CIFAR-10's shape")


def as_tensor_data(images: torch.Tensor, labels: torch.Tensor) -> TensorData:
    """The uint8 HWC images as kdistill's in-memory split (float CHW in [0, 1], as load_cifar10 gives)."""
    return TensorData(x=images.permute(0, 3, 1, 2).float().div(255.0).contiguous(), y=labels.clone(),
                      classes=CLASSES, name="cifar-bench")


class PerSampleCIFAR(Dataset):
    """What mdistiller/RepDistiller hand a DataLoader: RandomCrop(32, 4), RandomHorizontalFlip, ToTensor,
    Normalize, one image at a time (plain torch ops, as torchvision's transforms do per sample)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels.tolist()
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].permute(2, 0, 1)  # HWC uint8 -> CHW
        img = F.pad(img, (4, 4, 4, 4))  # RandomCrop(32, padding=4): zero-pad, crop at a random offset
        r, c = torch.randint(0, 9, (2,)).tolist()
        img = img[:, r : r + 32, c : c + 32]
        if torch.rand(1).item() < 0.5:  # RandomHorizontalFlip
            img = img.flip(-1)
        img = img.float().div(255.0)  # ToTensor
        return (img - self.mean) / self.std, self.labels[i]  # Normalize


def baseline_epoch(ds: Dataset, teacher: torch.nn.Module, workers: int) -> float:
    """Seconds of one epoch of the textbook distillation loop (iterator creation to the last step)."""
    student = build_model(STUDENT, (3, 32, 32), 10, seed=0)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, pin_memory=False, drop_last=True)
    t0 = time.perf_counter()
    for xb, yb in loader:
        with torch.no_grad():
            t = teacher(xb)
        loss = distillation_loss(student(xb), t, yb, temperature=T, alpha=ALPHA)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def kd_config(**kw: Any) -> TrainConfig:
    return TrainConfig(epochs=kw.pop("epochs", 1), batch_size=BATCH, lr=LR, augment=AUGMENT, seed=0, device="cpu",
                       checkpoint=False, **kw)


def kd_fit(data, teacher, cfg: TrainConfig, method=METHOD) -> tuple[float, float]:
    """(training seconds as fit measures them, seconds of the whole call incl. set-up and teacher caching)."""
    student = build_model(STUDENT, (3, 32, 32), 10, seed=0)
    t0 = time.perf_counter()
    res = fit(student, data, cfg, teacher=teacher, method=method if teacher is not None else "ce", progress=False)
    return res.wall_time_s, time.perf_counter() - t0


def kd_fit_steady(data, teacher, cfg: TrainConfig) -> tuple[float, float]:
    """(seconds of the 2nd epoch, seconds the 1st took beyond it) of a 2-epoch fit: with ``train.compile`` the
    first epoch carries the one-off compilation (and any recompilation), the second is the steady state."""
    student = build_model(STUDENT, (3, 32, 32), 10, seed=0)
    cfg = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    res = fit(student, data, cfg, teacher=teacher, method=METHOD, progress=False)
    first, both = res.history[0]["time_s"], res.history[1]["time_s"]
    return both - first, first - (both - first)


COMPILED_LIVE = "kdistill live teacher, train.compile (steady epoch)"
COMPILED_CACHED = f"kdistill cached teaching ({VIEWS} views), train.compile, per epoch (steady)"
COMPILED_AMORT = (f"kdistill cached teaching ({VIEWS} views), train.compile, caching and compilation amortised over "
                  f"{AMORTISE_EPOCHS} CIFAR-10 epochs")


def w5_compiled(data, cache_data, teacher, live_cfg: TrainConfig, tmp: Path, setup_s: float, repeats: int,
                log) -> dict[str, Any]:
    """The W5 rows with ``train.compile: true`` (student and frozen teacher through torch.compile).

    Each measurement is the second epoch of a 2-epoch fit. The compilation is timed cold, in a fresh compile
    cache: the first compiled run (caching the views, then one epoch, so it compiles the teacher and the
    student) minus an identical second run, which finds both compiled. The amortised row spreads the caching
    (per sample) and that compilation (once per run) over AMORTISE_EPOCHS epochs of the 50,000 CIFAR-10
    training images."""
    n = len(data)
    # A fresh compile cache, so "cold" means cold: nothing from earlier processes on this machine.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-cache")
    comp_cfg = TrainConfig(**{**live_cfg.__dict__, "compile": True})

    def views_cfg(name: str) -> TrainConfig:
        return TrainConfig(**{**comp_cfg.__dict__, "teacher_views": VIEWS, "teacher_cache": str(tmp / name)})

    cold = kd_fit(cache_data, teacher, views_cfg("views-compiled-cold.safetensors"))
    warm = kd_fit(cache_data, teacher, views_cfg("views-compiled-warm.safetensors"))
    cache_s = warm[1] - warm[0] - setup_s
    compile_s = cold[1] - warm[1]  # the same fit twice: the first compiles teacher and student, cold
    log(f"W5 compiled: caching {VIEWS} views of {len(cache_data)} samples {cache_s:.2f} s; cold compilation "
        f"(teacher and student) {compile_s:.1f} s")
    cached_cfg = views_cfg("views-compiled.safetensors")
    kd_fit(data, teacher, cached_cfg)  # the views of the measured subset, cached once
    overheads: dict[str, list[float]] = {COMPILED_LIVE: [], COMPILED_CACHED: []}

    def steady(name: str, cfg: TrainConfig):
        def fn() -> float:
            epoch, extra = kd_fit_steady(data, teacher, cfg)
            overheads[name].append(extra)
            return epoch
        return fn

    fns = {COMPILED_LIVE: steady(COMPILED_LIVE, comp_cfg), COMPILED_CACHED: steady(COMPILED_CACHED, cached_cfg)}
    for fn in fns.values():  # warm-up: the cold compilations
        fn()
    for v in overheads.values():
        v.clear()
    times = interleaved(fns, repeats, log)
    amort = (statistics.median(times[COMPILED_CACHED]) + cache_s / len(cache_data) * n / AMORTISE_EPOCHS
             + compile_s * n / (AMORTISE_EPOCHS * 50000))
    rows = [row("W5", COMPILED_LIVE, n, times[COMPILED_LIVE], first_epoch_extra_s=overheads[COMPILED_LIVE]),
            row("W5", COMPILED_CACHED, n, times[COMPILED_CACHED], first_epoch_extra_s=overheads[COMPILED_CACHED]),
            row("W5", COMPILED_AMORT, n, [amort], caching_s_per_sample=cache_s / len(cache_data),
                compile_s=compile_s)]
    return {"rows": rows, "caching_s": cache_s, "caching_samples": len(cache_data),
            "compile_cold_s": compile_s}


# ----- W5 breakdown -----------------------------------------------------------------------------------
PHASES = ("data (gather + augment + layout)", "teacher forward", "student forward", "loss", "backward",
          "optimiser (zero_grad + step)")


def breakdown(data: TensorData, teacher_net: torch.nn.Module, steps: int, warmup: int = 3,
              teacher_first: bool = False) -> dict[str, float]:
    """Mean seconds per step of each phase of the live-teacher KD step (as engine/step.py runs it on CPU:
    student forward, then the teacher's; ``teacher_first`` swaps the two, the candidate optimisation)."""
    student = build_model(STUDENT, (3, 32, 32), 10, seed=0)
    cl = use_channels_last(student)
    teacher = ModuleTeacher(teacher_net)
    method = build_method("kd", temperature=T, alpha=ALPHA)
    aug = parse_augment(AUGMENT)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True, fused=True)
    gen = torch.Generator().manual_seed(0)
    x, y = data.x, data.y
    perm = torch.randperm(len(data), generator=gen)
    total = torch.zeros(())
    sums = dict.fromkeys(PHASES, 0.0)
    student.train()
    try:
        for i in range(warmup + steps):
            j = i % (len(data) // BATCH)
            d: dict[str, float] = {}
            c = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal c
                now = time.perf_counter()
                d[name] = now - c
                c = now

            rows = perm[j * BATCH : (j + 1) * BATCH]
            params = aug.draw(BATCH, gen)
            xb, yb = x.index_select(0, rows), y.index_select(0, rows)
            xb = as_layout(aug.apply(xb, params), cl)
            lap(PHASES[0])
            if teacher_first:
                t_logits = teacher.logits(xb)
                lap(PHASES[1])
                logits = student(xb)
                lap(PHASES[2])
            else:  # fit's order: the teacher runs while the student's saved activations are alive
                logits = student(xb)
                lap(PHASES[2])
                t_logits = teacher.logits(xb)
                lap(PHASES[1])
            terms = method.losses(StepIO(logits, yb, t_logits, {}, {}, 0.0))
            loss = sum(terms.values())
            lap(PHASES[3])
            loss.backward()
            lap(PHASES[4])
            opt.step()
            opt.zero_grad(set_to_none=True)
            lap(PHASES[5])
            total.add_(loss.detach())
            if i >= warmup:
                for name in PHASES:
                    sums[name] += d[name]
    finally:
        teacher.release()
    return {k: v / steps for k, v in sums.items()}


# ----- W6 ---------------------------------------------------------------------------------------------
def write_pngs(images: torch.Tensor, labels: torch.Tensor, root: Path, test: int = 50) -> None:
    """DIR/train/CLASS/NNNNN.png (and a small test/ split the folder layout requires)."""
    from PIL import Image

    arr = images.numpy()
    for i, (img, lab) in enumerate(zip(arr, labels.tolist())):
        split = "test" if i < test else "train"
        d = root / split / CLASSES[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    for c in CLASSES:  # every class in train/ (a random subset may miss one in test/: that is allowed)
        (root / "train" / c).mkdir(parents=True, exist_ok=True)


# ----- measurement ------------------------------------------------------------------------------------
from throughput import interleaved  # noqa: E402  the MLP benchmark's round-robin timing, beside this script


def row(workload: str, method: str, samples: int, seconds: list[float], **extra: Any) -> dict[str, Any]:
    med = statistics.median(seconds)
    return {"workload": workload, "method": method, "samples": samples, "seconds": seconds, "seconds_median": med,
            "samples_per_s": samples / med, **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="directory holding cifar-10-binary.tar.gz (default: random images)")
    p.add_argument("--teacher", default=TEACHER,
                   help=f"teacher model spec (default {TEACHER}; a larger one, e.g. resnet56, costs more per step)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--samples", type=int, default=8192, help="W5 samples per measured epoch (default 8192 = 64 steps)")
    p.add_argument("--cache-samples", type=int, default=4096,
                   help="W5 samples whose 8 views are cached for the one-off caching time (default 4096)")
    p.add_argument("--files", type=int, default=4096, help="W6 PNG files (default 4096)")
    p.add_argument("--w6-epochs", type=int, default=2)
    p.add_argument("--breakdown-steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="the baseline DataLoader's workers (default 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the train.compile rows (torch.compile)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, numbers are meaningless")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite OUT/cnn-throughput.md from OUT/cnn-throughput.json (no measurement)")
    args = p.parse_args(argv)
    if args.markdown_only:
        import json

        res = json.loads((Path(args.out) / "cnn-throughput.json").read_text())
        write_text(Path(args.out) / "cnn-throughput.md", markdown(res))
        return 0
    if args.quick:
        args.samples, args.cache_samples, args.files, args.w6_epochs = 512, 256, 512, 1
        args.breakdown_steps, args.repeats = 3, 1
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # kdistill's training keeps freed host memory (kdistill.engine.heap), process-wide once set; set it here
    # so every row, the baseline loop included, runs with the same allocator (the baseline gains too).
    from kdistill.engine.heap import retain_freed_memory

    info = {**machine(), "device": "cpu", "loadavg_before": os.getloadavg(), "heap_retained": retain_freed_memory()}
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    log(f"machine: {info}")
    n_all = max(args.samples, args.files, args.cache_samples)
    images, labels, source = cifar_images(args.data_path, n_all)
    log(f"data: {source}, {n_all} images")
    n = args.samples // BATCH * BATCH
    data = as_tensor_data(images[:n], labels[:n])
    ds = PerSampleCIFAR(images[:n], labels[:n])
    teacher = build_model(args.teacher, (3, 32, 32), 10, seed=0).eval()  # the baseline's (NCHW, as people write it)
    kd_teacher = build_model(args.teacher, (3, 32, 32), 10, seed=0).eval()  # fit's (it switches it to channels_last)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="kdistill-cnn-bench-"))
    try:
        # W5 ------------------------------------------------------------------------------------------
        views_file = tmp / "views.safetensors"
        live_cfg = kd_config()
        cached_cfg = kd_config(teacher_views=VIEWS, teacher_cache=str(views_file))
        # One-off caching: 8 teacher forwards per sample, on its own subset (a per-sample cost).
        cache_data = as_tensor_data(images[: args.cache_samples], labels[: args.cache_samples])
        c_file = tmp / "views-timing.safetensors"
        _, live_total = kd_fit(cache_data, kd_teacher, live_cfg)  # warm-up; also fit's set-up time without caching
        live_train, live_total = kd_fit(cache_data, kd_teacher, live_cfg)
        setup_s = live_total - live_train
        c_train, c_total = kd_fit(cache_data, kd_teacher, kd_config(teacher_views=VIEWS, teacher_cache=str(c_file)))
        cache_s = c_total - c_train - setup_s
        cache_per_sample = cache_s / len(cache_data)
        log(f"W5 caching {VIEWS} views of {len(cache_data)} samples: {cache_s:.2f} s "
            f"({len(cache_data) / cache_s:.0f} samples/s, {VIEWS * len(cache_data) / cache_s:.0f} teacher images/s; "
            f"fit set-up without caching {setup_s:.2f} s)")
        # The measured subset's views, cached once (not timed again), then loaded by every repetition.
        kd_fit(data, kd_teacher, cached_cfg)
        log(f"W5 warm-up of every method on {n} samples")
        baseline_epoch(ds, teacher, args.workers)
        kd_fit(data, kd_teacher, live_cfg)
        kd_fit(data, kd_teacher, cached_cfg)
        live_runs: list[float] = []

        def live() -> float:
            live_runs.append(kd_fit(data, kd_teacher, live_cfg)[0])
            return live_runs[-1]

        times = interleaved({
            "baseline (per-sample Dataset, DataLoader workers=2, teacher every batch)":
                lambda: baseline_epoch(ds, teacher, args.workers),
            "kdistill live teacher": live,
            f"kdistill cached teaching ({VIEWS} views), per epoch": lambda: kd_fit(data, kd_teacher, cached_cfg)[0],
        }, args.repeats, log)
        for method, secs in times.items():
            rows.append(row("W5", method, n, secs))
        cached_epoch = statistics.median(times[f"kdistill cached teaching ({VIEWS} views), per epoch"])
        amort = cached_epoch + cache_per_sample * n / AMORTISE_EPOCHS
        rows.append(row("W5", f"kdistill cached teaching ({VIEWS} views), caching amortised over "
                        f"{AMORTISE_EPOCHS} epochs", n, [amort], caching_s_per_sample=cache_per_sample))
        compiled: dict[str, Any] = {}
        if not args.no_compile:
            compiled = w5_compiled(data, cache_data, kd_teacher, live_cfg, tmp, setup_s, args.repeats, log)
            rows.extend(compiled.pop("rows"))

        # W5 breakdown ------------------------------------------------------------------------------
        log(f"W5 breakdown over {args.breakdown_steps} steps")
        phases = breakdown(data, build_model(args.teacher, (3, 32, 32), 10, seed=0).eval(), args.breakdown_steps)
        phases_tf = breakdown(data, build_model(args.teacher, (3, 32, 32), 10, seed=0).eval(), args.breakdown_steps,
                              teacher_first=True)
        log("  teacher first: " + ", ".join(f"{k}: {1000 * v:.1f} ms" for k, v in phases_tf.items()))
        probe = ModuleTeacher(build_model(args.teacher, (3, 32, 32), 10, seed=0).eval())
        teacher_ms_per_image = {}
        for b in (128, 512):  # compute_views (engine/views.py) caches the views at batch 128; 512 for comparison
            xb = as_layout(data.x[:b], True)
            probe.logits(xb)
            reps = max(2, 1024 // b)
            t0 = time.perf_counter()
            for _ in range(reps):
                probe.logits(xb)
            teacher_ms_per_image[b] = 1000 * (time.perf_counter() - t0) / (reps * b)
        probe.release()
        log(f"  teacher forward ms/image by batch size: {teacher_ms_per_image}")
        fit_step = statistics.median(live_runs) / (n // BATCH)
        phases["other (fit step time minus the phases)"] = fit_step - sum(phases.values())
        log("  " + ", ".join(f"{k}: {1000 * v:.1f} ms" for k, v in phases.items()) + f"; fit step {1000 * fit_step:.1f} ms")

        # W6 ------------------------------------------------------------------------------------------
        root = tmp / "folder"
        t0 = time.perf_counter()
        write_pngs(images[: args.files], labels[: args.files], root)
        log(f"W6: wrote {args.files} PNG files in {time.perf_counter() - t0:.1f} s (not counted)")
        streamed = load(f"folder:{root}", val_size=0, in_memory=False).train
        t0 = time.perf_counter()
        memory = load(f"folder:{root}", val_size=0, in_memory=True).train
        decode_s = time.perf_counter() - t0
        m6 = len(memory) // BATCH * BATCH * args.w6_epochs
        w6 = {
            "in memory (in_memory=True)": lambda: kd_fit(memory, None, kd_config(epochs=args.w6_epochs))[0],
            "streamed, workers=0": lambda: kd_fit(streamed, None, kd_config(epochs=args.w6_epochs, workers=0))[0],
            "streamed, workers=2": lambda: kd_fit(streamed, None, kd_config(epochs=args.w6_epochs, workers=2))[0],
        }
        for fn in w6.values():  # warm-up (and the page cache: every file read once)
            fn()
        log(f"W6: {len(memory)} images x {args.w6_epochs} epochs, student alone, {args.repeats} repetitions")
        times6 = interleaved(w6, args.repeats, log)
        for method, secs in times6.items():
            rows.append(row("W6", method, m6, secs, files=len(memory), epochs=args.w6_epochs,
                            **({"decode_into_memory_s": decode_s} if "memory" in method else {})))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info["loadavg_after"] = os.getloadavg()
    info["other_cpu_share"] = other_cpu_share(busy0, own0, wall0)
    info["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    sps = {(r["workload"], r["method"]): r["samples_per_s"] for r in rows}
    w5 = {r["method"]: r["samples_per_s"] for r in rows if r["workload"] == "W5"}
    base, live_k, cached_k, amort_k = list(w5)[:4]
    w6m = {r["method"]: r["samples_per_s"] for r in rows if r["workload"] == "W6"}
    best_stream = max(w6m["streamed, workers=0"], w6m["streamed, workers=2"])
    ratios = {
        "W5 live vs baseline": w5[live_k] / w5[base],
        "W5 live, bound": w5_bound(w5[base], w5[cached_k], teacher_ms_per_image[128], 1),
        "W5 cached (per epoch) vs baseline": w5[cached_k] / w5[base],
        "W5 cached (30 epochs amortised) vs baseline": w5[amort_k] / w5[base],
        "W5 cached (30 epochs amortised), bound": w5_bound(w5[base], w5[cached_k], teacher_ms_per_image[128],
                                                           VIEWS / AMORTISE_EPOCHS),
        **({"W5 live, train.compile vs baseline": w5[COMPILED_LIVE] / w5[base],
            "W5 cached, train.compile (per epoch) vs baseline": w5[COMPILED_CACHED] / w5[base],
            "W5 cached, train.compile (30 epochs amortised) vs baseline": w5[COMPILED_AMORT] / w5[base]}
           if COMPILED_LIVE in w5 else {}),
        "W6 streamed vs in-memory": best_stream / w6m["in memory (in_memory=True)"],
        "W6 streamed workers=0 vs in-memory": w6m["streamed, workers=0"] / w6m["in memory (in_memory=True)"],
        "W6 streamed workers=2 vs in-memory": w6m["streamed, workers=2"] / w6m["in memory (in_memory=True)"],
    }
    del sps
    results = {
        "machine": info, "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**vars(args), "teacher": f"{args.teacher} (seeded random weights)", "student": STUDENT, "batch": BATCH,
                     "lr": LR, "temperature": T, "alpha": ALPHA, "augment": AUGMENT, "teacher_views": VIEWS,
                     "amortise_epochs": AMORTISE_EPOCHS, "data": source, "w5_samples": n},
        "caching": {"samples": len(cache_data), "seconds": cache_s, "seconds_per_sample": cache_per_sample,
                    "fit_setup_s": setup_s},
        "compiled": compiled,
        "rows": rows, "breakdown_s_per_step": phases, "breakdown_teacher_first_s_per_step": phases_tf,
        "teacher_forward_ms_per_image_by_batch": teacher_ms_per_image, "fit_step_s": fit_step, "ratios": ratios, "targets": TARGETS,
    }
    out = Path(args.out)
    write_json(out / "cnn-throughput.json", results)
    write_text(out / "cnn-throughput.md", markdown(results))
    log(f"done: {out}/cnn-throughput.{{json,md}}")
    print(markdown(results))
    return 0


def w5_bound(baseline_sps: float, cached_epoch_sps: float, teacher_ms: float, forwards_per_sample: float) -> float:
    """The most a kdistill path can gain over the baseline with this run's kernels: the student's own epoch
    (the cached per-epoch row, whose teacher is a table lookup) plus ``forwards_per_sample`` bare teacher
    forwards (batch 128, no augmentation or storage) per sample and epoch: 1 live; ``VIEWS`` spread over
    ``AMORTISE_EPOCHS`` for cached views."""
    return 1 / (1 / cached_epoch_sps + forwards_per_sample * teacher_ms / 1000) / baseline_sps


def markdown(res: dict[str, Any]) -> str:
    m, s, c = res["machine"], res["settings"], res["caching"]
    share = m.get("other_cpu_share")
    lines = [
        "# CNN distillation throughput (CIFAR-10 shapes, CPU)", "",
        (f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads; "
         f"load average before {tuple(round(x, 2) for x in m['loadavg_before'])}, after "
         f"{tuple(round(x, 2) for x in m['loadavg_after'])}; other processes' share of the CPU time during the run: "
         f"{'unknown' if share is None else format(share, '.1%')}; {m['date']}; total {m['wall_time_s']} s."
         + (" Freed host memory kept for reuse (kdistill.engine.heap) for every row, the baseline's included."
            if m.get("heap_retained") else "")),
        f"Command: `{res['command']}`. Data: {s['data']}.", "",
        (f"Teacher {s['teacher']}, student {s['student']}, KD T = {s['temperature']:g}, alpha = {s['alpha']:g}, "
         f"{s['augment']}, batch {s['batch']}, SGD lr {s['lr']} (momentum 0.9, Nesterov). W5: one epoch over "
         f"{s['w5_samples']:,} samples per measurement, after a warm-up run of each method; medians of "
         f"{s['repeats']} interleaved repetitions (every repetition in the JSON)."), "",
        "| workload | method | samples/s | median s | repetitions (s) |", "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        reps = ", ".join(f"{x:.2f}" for x in r["seconds"])
        lines.append(f"| {r['workload']} | {r['method']} | {r['samples_per_s']:,.0f} | {r['seconds_median']:.2f} | {reps} |")
    lines += ["", (f"One-off caching of {s['teacher_views']} views ({s['teacher_views']} teacher forwards per sample), "
                   f"timed on {c['samples']:,} samples: {c['seconds']:.2f} s = {1000 * c['seconds_per_sample']:.2f} ms "
                   f"per sample (fit's set-up without caching, {c['fit_setup_s']:.2f} s, subtracted). For the 50,000 "
                   f"CIFAR-10 training images that is {50000 * c['seconds_per_sample']:.0f} s once per run; the "
                   f"amortised row adds 1/{s['amortise_epochs']} of it to each epoch.")]
    comp = res.get("compiled") or {}
    if comp:
        extra = {k: statistics.median(r.get("first_epoch_extra_s") or [0.0]) for k, r in
                 ((r["method"], r) for r in res["rows"]) if k in (COMPILED_LIVE, COMPILED_CACHED)}
        lines += ["", (f"`train.compile: true` rows: the second epoch of a 2-epoch fit. Cold compilation of teacher and "
                       f"student (a fresh compile cache; the first compiled run minus an identical second one): "
                       f"{comp['compile_cold_s']:.1f} s. In later runs of the same process the first epoch took "
                       f"{extra.get(COMPILED_LIVE, 0):.1f} s (live) and {extra.get(COMPILED_CACHED, 0):.1f} s (cached "
                       f"views) longer than a steady one. Caching the {s['teacher_views']} views with the compiled "
                       f"teacher: {comp['caching_s']:.2f} s for {comp['caching_samples']:,} samples. The amortised row "
                       f"spreads the caching (per sample) and the cold compilation (once per run) over "
                       f"{s['amortise_epochs']} epochs of the 50,000 CIFAR-10 training images.")]
    lines += ["", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for k, v in res["ratios"].items():
        t = res["targets"].get(k)
        if "W6" in k:
            lines.append(f"| {k} | {100 * v:.0f}% | {'>= %g%%' % (100 * t) if t else '-'} | "
                         f"{('yes' if v >= t else 'no') if t else '-'} |")
        else:
            lines.append(f"| {k} | {v:.2f}x | {'>= %gx' % t if t else '-'} | {('yes' if v >= t else 'no') if t else '-'} |")
    if "W5 live, bound" in res["ratios"]:
        r, t = res["ratios"], res["targets"]["W5 live vs baseline"]
        lines += ["", (f"Bound for the live teacher: the student's own epoch (the cached per-epoch row) plus one bare "
                       f"teacher forward per sample: at most **{r['W5 live, bound']:.2f}x** against the {t:g}x target"
                       + (" with this run's kernels" if r["W5 live, bound"] < t else "")
                       + f"; the measured {r['W5 live vs baseline']:.2f}x is "
                       f"{100 * r['W5 live vs baseline'] / r['W5 live, bound']:.0f}% of it"
                       + (" (over 100%: the spread between the rows' runs)." if r["W5 live vs baseline"] > r["W5 live, bound"]
                          else "."))]
    bound_k = "W5 cached (30 epochs amortised), bound"
    if bound_k in res["ratios"]:
        r, t = res["ratios"], res["targets"]["W5 cached (30 epochs amortised) vs baseline"]
        tb0 = {int(k): v for k, v in res["teacher_forward_ms_per_image_by_batch"].items()}[128]
        lines += ["", (f"Bound: the cached path's epoch cannot cost less than the student's own epoch (the per-epoch "
                       f"row) plus its share of the caching, which cannot cost less than {s['teacher_views']} bare "
                       f"teacher forwards per sample ({tb0:.3f} ms each at batch 128, measured below): with this run's "
                       f"kernels the amortised ratio is at most **{r[bound_k]:.2f}x** against the {t:g}x target"
                       + (", so with these views, epochs and kernels no caching pipeline reaches the target; "
                          if r[bound_k] < t else "; ")
                       + f"the measured {r['W5 cached (30 epochs amortised) vs baseline']:.2f}x is "
                       f"{100 * r['W5 cached (30 epochs amortised) vs baseline'] / r[bound_k]:.0f}% of the bound.")]
    ph = res["breakdown_s_per_step"]
    step = res["fit_step_s"]
    lines += ["", (f"W5 live-teacher step, per phase (engine/step.py's ops replicated with a clock read around each "
                   f"phase, mean over {s['breakdown_steps']} steps; fit's measured step: {1000 * step:.1f} ms):"), "",
              "| phase | ms/step | share of fit's step |", "|---|---|---|"]
    for k, v in ph.items():
        lines.append(f"| {k} | {1000 * v:.1f} | {100 * v / step:.0f}% |")
    tf = res["breakdown_teacher_first_s_per_step"]
    tb = res["teacher_forward_ms_per_image_by_batch"]
    tb = {int(k): v for k, v in tb.items()}
    lines += ["", (f"Same step with the teacher's forward moved before the student's (no other change): teacher forward "
                   f"{1000 * tf['teacher forward']:.1f} ms instead of {1000 * ph['teacher forward']:.1f} ms; sum of the "
                   f"phases {1000 * sum(tf.values()):.1f} ms instead of "
                   f"{1000 * sum(v for k, v in ph.items() if not k.startswith('other')):.1f} ms.")]
    lines += ["", (f"Teacher forward per image (channels_last, no_grad): {tb[128]:.3f} ms at batch 128, {tb[512]:.3f} ms "
                   "at batch 512; `compute_views` (engine/views.py) caches the views at batch 128.")]
    data_share = ph[PHASES[0]] / step
    fit_sum = sum(v for k, v in ph.items() if not k.startswith("other"))
    gain = 1 - sum(tf.values()) / fit_sum
    order = ("(1) in `StudentStep._forward_backward` (engine/step.py) run the teacher before the student's forward "
             f"(measured here: {100 * gain:.0f}% off the phases' sum); " if gain > 0.05 else
             "(1) the order of the two forwards makes no measurable difference in this run "
             f"({100 * gain:+.0f}%), so it is not the lever; ")
    lines += ["", (f"The teacher forward is {100 * ph['teacher forward'] / step:.0f}% of fit's live step and the "
                   f"student's forward + backward {100 * (ph['student forward'] + ph['backward']) / step:.0f}%; data "
                   f"(gather + batched augmentation) {100 * data_share:.0f}%, and {100 * ph['other (fit step time minus the phases)'] / step:.0f}% "
                   "of fit's step is outside the phases (per-step Python/dispatch overhead in the loop, plus run-to-run "
                   "noise: the breakdown and the fit repetitions are separate runs). Next optimisations: " + order +
                   f"(2) the views are already cached at batch 128 ({tb[512] / tb[128]:.1f}x cheaper per image here than "
                   "512) and the frozen teacher already runs with its BatchNorms folded (kdistill.models.fold), so what "
                   "is left is the convolutions themselves, forward and backward; the engine's lever for them on a CPU "
                   "is `train.compile: true` (torch.compile of the student and of the frozen teacher"
                   + (", measured in the rows above)." if res.get("compiled") else ", not measured in this run: --no-compile).")
                   )]
    lines += ["", ("W6: the student alone (resnet8, crop4+flip, no teacher) on PNG files written once (not timed); "
                   "streamed = `load('folder:DIR', in_memory=False)` (StreamData through the DataLoader), in memory = "
                   "`in_memory=True` on the same files (its one-off decoding is in the JSON).")]
    if is_busy(m):
        lines[2:2] = ["**Warning: other processes used over 10% of the CPUs' time during this run: the timings are "
                      "not representative; re-run on an idle machine.**", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
