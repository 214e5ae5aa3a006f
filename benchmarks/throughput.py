"""Training throughput of kdistill against the usual PyTorch distillation loops, measured in one run.

    python benchmarks/throughput.py                 # the full benchmark (a few minutes on 2 cores)
    python benchmarks/throughput.py --quick         # a smoke test of the script (seconds, numbers meaningless)
    python benchmarks/throughput.py --device cuda   # the same on a GPU (results: throughput-cuda.*)

Everything is measured in one process, on the same MNIST training split, the same models and the same
KL·T² loss, so the ratios compare like with like. Each measurement runs a bounded number of training
steps after warm-up, repeated (interleaved between the methods, so slow drift of the machine's load hits
all of them alike); the median is reported and every repetition is kept in the JSON.

Workloads (teacher 784-1200-1200-10 with seeded random weights: throughput does not depend on them):

* peak: the best fp32 rate of a large square matrix product (``torch.mm``), the ceiling for efficiency.
* W1: student 784-800-800-10, T = 20, batch 128, no augmentation.
  (a) tutorial loop: ``DataLoader(shuffle=True)`` over a per-sample ``Dataset`` (uint8 images turned
  into [0, 1] floats one sample at a time, as ``ToTensor`` does), teacher forward under ``no_grad`` every
  batch; (b) the same with the teacher forward recorded by autograd and, as in reference 003 whose loss
  does not detach the teacher's outputs, back-propagated through (its gradients are computed and never
  used); (c) ``kdistill.fit``: the teacher's logits are cached once (timed separately: it is a one-off
  cost per run, also shown amortised over 10 epochs) and batches are slices of in-memory tensors.
* W2: W1 with ±2 px random translation: the baseline translates one sample at a time inside the
  ``Dataset`` (zero padding 2, random crop); ``fit`` translates whole batches and runs the teacher live.
* W3: 8 students 784-20-20-10 at 8 temperatures, cached teacher: 8 sequential ``fit`` runs vs one
  ``fit_many`` pass.
* W4: 8 students 784-800-800-10 at 8 temperatures with jitter: 8 sequential ``fit`` runs (each with its
  own teacher forward) vs one ``fit_many`` pass sharing batches and the teacher's forward.
* scaling: ``fit`` samples/s against batch size and student width; ``fit_many`` time against the
  number of students.

FLOP/s count only the necessary arithmetic: the student's forward, its weight gradients and the input
gradients of every layer but the first (nobody needs the gradient of the images), i.e. 3 x its forward
FLOPs less 2 x the first layer's, per sample and student; plus one teacher forward per sample where the
inputs are augmented (without augmentation the teacher's outputs are computed once per run, so they are
not counted per epoch).

* GEMM ceiling: the W1 student step's matrix products alone (forward, weight gradients, hidden input
  gradients) at batch 128, in a loop with preallocated outputs and nothing else: the share of the peak
  that this BLAS reaches on these shapes, a reference for what batch-128 steps can get out of the machine.
On a GPU (``--device cuda``) the data, models and teacher live on the device; the tutorial loops copy
each batch there as tutorials do; every timed region ends with a device synchronisation. kdistill runs
with its CUDA defaults (bf16 autocast, each step replayed as one CUDA graph) and, as extra rows, in float32,
without the graph and with ``torch.compile``; a whole W1 epoch (60,000 images, batch 128) is timed on its own. Peaks are measured for fp32 (TF32 off) and bf16;
the bf16 peak is the reference for AMP rows.
Results (JSON, markdown, PNG) go to ``--out`` (default ``benchmarks/results``) with the machine's
description and its load average before and after: on a shared machine, re-run it when it is idle.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdistill import TrainConfig, fit
from kdistill.data import TensorData, load
from kdistill.io import write_json, write_text
from kdistill.losses import distillation_loss
from kdistill.models import build_model, count_flops
from kdistill.sweeps.multi import fit_many
from kdistill.outputs.results import save_figure
from kdistill.teachers.base import ModuleTeacher

TEACHER, STUDENT, TINY = "mlp:1200,1200", "mlp:800,800", "mlp:20,20"
TEMPERATURES = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0]
LR, BATCH = 0.05, 128
TARGETS = {  # the performance issue's: the W1 step against the GEMM ceiling measured in the same run, and
    # the sweeps' speed-ups. The earlier W1 >= 6x / W2 >= 3x ratio targets were above the arithmetic bounds
    # printed below and were withdrawn; those ratios are shown without a target (W1-W4: no slower than the
    # committed record).
    "W1 % of GEMM ceiling": 90.0, "W3 vectorised vs sequential": 4.0, "W4 vectorised vs sequential": 1.5,
}


# ----- machine ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(), "python": sys.version.split()[0], "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "gpu_sms": p.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gflops(size: int, reps: int, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    """Best rate of ``size`` x ``size`` matrix products (random data; on CUDA 10 back-to-back per timing)."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    inner = 10 if device.type == "cuda" else 1
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = max(best, inner * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_ceiling_gflops(dims: list[int], batch: int, steps: int, reps: int,
                        device: torch.device = torch.device("cpu")) -> float:
    """Best rate of the matrix products of one MLP training step (``dims`` = widths incl. input/output).

    Forward ``x_i W_i^T``, weight gradients ``g_i^T x_i`` and input gradients ``g_i W_i`` for every layer
    but the first, with preallocated outputs: only the BLAS calls, no framework.
    """
    ws = [torch.randn(o, i, device=device) * 0.01 for i, o in zip(dims[:-1], dims[1:])]
    xs = [torch.randn(batch, d, device=device) for d in dims[:-1]]
    hs = [torch.empty(batch, o, device=device) for o in dims[1:]]
    gws = [torch.empty_like(w) for w in ws]
    gxs = [torch.empty(batch, d, device=device) for d in dims[:-1]]
    flops = sum(2 * batch * i * o for i, o in zip(dims[:-1], dims[1:])) * 2 + sum(
        2 * batch * i * o for i, o in zip(dims[1:-1], dims[2:]))

    def step() -> None:
        for x, w, h in zip(xs, ws, hs):
            torch.mm(x, w.t(), out=h)
        for k in reversed(range(len(ws))):
            torch.mm(hs[k].t(), xs[k], out=gws[k])
            if k:
                torch.mm(hs[k], ws[k], out=gxs[k])

    for _ in range(2):
        step()
    return flops / best_seconds(step, steps, reps, device) / 1e9


def best_seconds(fn: Callable[[], Any], steps: int, reps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (after one warm-up call): the best of ``reps`` timings of ``steps`` calls."""
    fn()
    out = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        out = min(out, (time.perf_counter() - t0) / steps)
    return out


def optimizer_update_s(dims: list[int], steps: int, reps: int,
                       device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Best seconds of one bare SGD update (fused, momentum 0.9, Nesterov, as fit's default) of an MLP with
    widths ``dims``, gradients already in place: the memory-bound work every step adds to its matrix products.
    ``step``: ``optimizer.step()``; ``kernel``: the fused kernel alone (torch's private ``_fused_sgd_``,
    when this torch has it), without the optimiser's Python bookkeeping."""
    params = []
    for i, o in zip(dims[:-1], dims[1:]):
        params += [torch.nn.Parameter(torch.randn(o, i, device=device) * 0.01),
                   torch.nn.Parameter(torch.zeros(o, device=device))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, nesterov=True, fused=True)
    for _ in range(2):
        opt.step()
    res = {"step": best_seconds(opt.step, steps, reps, device)}
    kernel = getattr(torch, "_fused_sgd_", None)
    if kernel is not None:
        ps, gs = [p.detach() for p in params], [p.grad for p in params]
        ms = [opt.state[p]["momentum_buffer"] for p in params]
        res["kernel"] = best_seconds(lambda: kernel(ps, gs, ms, weight_decay=0.0, momentum=0.9, lr=1e-6,
                                                    dampening=0.0, nesterov=True, maximize=False,
                                                    is_first_step=False), steps, reps, device)
    return res


def train_flops(spec: str, shape, classes) -> float:
    """Necessary FLOPs of one training sample: forward, weight gradients, input gradients but the first layer's."""
    model = build_model(spec, shape, classes)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 3 * count_flops(model, shape) - 2 * first.in_features * first.out_features


# ----- W1 breakdown ------------------------------------------------------------------------------------
W1_PHASES = ("data (gather rows + cached teacher logits)", "student forward", "loss", "backward",
             "optimiser (fused SGD step + zero_grad)")


def w1_breakdown(data: TensorData, teacher_logits: torch.Tensor, steps: int, warmup: int = 5) -> dict[str, float]:
    """Mean seconds per step of each phase of kdistill's W1 step on a CPU (in-memory rows gathered with
    index_select, the teacher's cached logits looked up the same way, KL·T², fused SGD with momentum 0.9 and
    Nesterov, as fit's defaults), with a clock read between phases."""
    student = build_model(STUDENT, data.input_shape, data.num_classes, seed=0)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True, fused=True)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    sums = dict.fromkeys(W1_PHASES, 0.0)
    total = torch.zeros(())
    per_epoch = len(data) // BATCH
    student.train()
    for i in range(warmup + steps):
        j = i % per_epoch
        times = [time.perf_counter()]
        rows = perm[j * BATCH : (j + 1) * BATCH]
        xb, yb, tb = data.x.index_select(0, rows), data.y.index_select(0, rows), teacher_logits.index_select(0, rows)
        times.append(time.perf_counter())
        logits = student(xb)
        times.append(time.perf_counter())
        loss = distillation_loss(logits, tb, yb, temperature=20.0, alpha=1.0)
        times.append(time.perf_counter())
        loss.backward()
        times.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
        total.add_(loss.detach())
        if i >= warmup:
            for k, name in enumerate(W1_PHASES):
                sums[name] += times[k + 1] - times[k]
    return {k: v / steps for k, v in sums.items()}


# ----- the baselines ----------------------------------------------------------------------------------
class PerSampleMNIST(Dataset):
    """What tutorials hand a DataLoader: uint8 images made into [0, 1] floats (and translated) one by one."""

    def __init__(self, data: TensorData, pad: int = 0) -> None:
        self.images = (data.x * 255).round().to(torch.uint8)  # the same values as data.x after / 255
        self.labels = data.y.tolist()
        self.pad = pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div(255.0)
        if self.pad:  # RandomCrop(28, padding=pad): zero-pad, then crop at a random offset
            h, w = img.shape[-2:]
            r, c = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = F.pad(img, (self.pad,) * 4)[:, r : r + h, c : c + w]
        return img, self.labels[i]


def tutorial_loop(student, teacher, dataset: Dataset, steps: int, warmup: int, temperature: float,
                  autograd_teacher: bool = False, device: torch.device = torch.device("cpu")) -> float:
    """Seconds for ``steps`` steps (after ``warmup``) of the textbook loop (batches copied to ``device``)."""
    student.to(device)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True)
    t0 = None
    for i, (xb, yb) in enumerate(loader):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        xb, yb = xb.to(device), yb.to(device)
        if autograd_teacher:
            # Reference 003's pattern: the teacher's outputs keep their graph, so backward runs through it.
            t = teacher(xb)
            s = student(xb)
            loss = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                            reduction="batchmean", log_target=True) * temperature**2
        else:
            with torch.no_grad():
                t = teacher(xb)
            loss = distillation_loss(student(xb), t, temperature=temperature, alpha=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def _tutorial(make_student, teacher, dataset, steps, warmup, autograd_teacher, device) -> float:
    return tutorial_loop(make_student(), teacher, dataset, steps, warmup, 20.0, autograd_teacher=autograd_teacher,
                         device=device)


# ----- kdistill ---------------------------------------------------------------------------------------
DEVICE = "cpu"  # set by main(): every kdistill config below trains there


Run = tuple[TrainConfig, dict[str, Any]]
"""A student's training config and its method (KD at temperature T, soft targets only)."""


def config(temperature: float = 20.0, jitter: int = 0, batch: int = BATCH, **kw: Any) -> Run:
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=LR, jitter=jitter, seed=0, device=DEVICE, **kw)
    return cfg, {"name": "kd", "temperature": temperature, "alpha": 1.0}


def kd_fit(spec: str, train: TensorData, teacher, run: Run) -> float:
    """Seconds of ``fit``'s training loop (one epoch over ``train``; teacher caching excluded)."""
    model = build_model(spec, train.input_shape, train.num_classes, seed=0)
    cfg, method = run
    return fit(model, train, cfg, teacher=teacher, method=method, progress=False).wall_time_s


def kd_sequential(spec: str, train: TensorData, teacher, runs: list[Run]) -> float:
    return sum(kd_fit(spec, train, teacher, r) for r in runs)


def kd_many(spec: str, train: TensorData, teacher, runs: list[Run]) -> float:
    cfgs, methods = [c for c, _ in runs], [m for _, m in runs]
    models = [build_model(spec, train.input_shape, train.num_classes, seed=c.seed) for c in cfgs]
    return fit_many(models, train, cfgs, teacher=teacher, methods=methods, progress=False)[0].wall_time_s


# ----- measurement ------------------------------------------------------------------------------------
def interleaved(methods: dict[str, Callable[[], float]], repeats: int, log) -> dict[str, list[float]]:
    """Run each method ``repeats`` times, round-robin; return the seconds of every run."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            times[name].append(fn())
            log(f"  {name} rep {r + 1}: {times[name][-1]:.3f} s")
    return times


def row(workload: str, method: str, samples: int, seconds: list[float], flops_per_sample: float, peak: float,
        **extra: Any) -> dict[str, Any]:
    med = statistics.median(seconds)
    sps = samples / med
    gflops = sps * flops_per_sample / 1e9
    return {"workload": workload, "method": method, "samples": samples, "seconds": seconds, "seconds_median": med,
            "samples_per_s": sps, "gflop_per_s": gflops, "pct_of_peak": 100 * gflops / peak, **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--steps", type=int, help="measured steps per W1/W2/W3 run (default: 60 on CPU, 400 on CUDA)")
    p.add_argument("--steps-w4", type=int, help="measured steps per W4 run (default: 20 on CPU, 100 on CUDA)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, numbers are meaningless")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    global DEVICE
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch; run on a GPU machine or use --device cpu")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: {args.device!r} is not cpu or cuda")
    DEVICE = str(device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (400 if gpu else 60)
    args.steps_w4 = args.steps_w4 or (100 if gpu else 20)
    if args.quick:
        args.steps, args.steps_w4, args.warmup, args.repeats = 4, 2, 1, 1
    torch.set_num_threads(args.threads)
    if gpu:  # fp32 means fp32: no TF32 in the baselines' or kdistill's float32 products
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # kdistill's training keeps freed host memory (kdistill.engine.heap), process-wide once set; set it here
    # so every row, the baselines included, runs with the same allocator.
    from kdistill.engine.heap import retain_freed_memory

    info = {**machine(), **gpu_info(device), "device": str(device), "loadavg_before": os.getloadavg(),
            "heap_retained": retain_freed_memory()}
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    log(f"machine: {info}")

    size = 1024 if args.quick else (8192 if gpu else 4096)
    peak = peak_gflops(size, 2 if args.quick else 4, device)
    log(f"peak fp32 matmul: {peak:.1f} GFLOP/s")
    peak_bf16 = peak_gflops(size, 2 if args.quick else 4, device, torch.bfloat16) if gpu else None
    if peak_bf16:
        log(f"peak bf16 matmul: {peak_bf16:.1f} GFLOP/s")
    ceiling = gemm_ceiling_gflops([784, 800, 800, 10], BATCH, 20 if args.quick else 200, 2 if args.quick else 5, device)
    log(f"W1 GEMM ceiling at batch {BATCH}: {ceiling:.1f} GFLOP/s ({100 * ceiling / peak:.0f}% of peak)")
    update = optimizer_update_s([784, 800, 800, 10], 20 if args.quick else 200, 2 if args.quick else 5, device)
    log("W1 bare SGD update: " + ", ".join(f"{k} {1000 * v:.3f} ms" for k, v in update.items()))

    bundle = load("mnist", val_size=0)
    train = bundle.train
    if args.quick:
        train = train.subset(torch.arange(8192))
    shape, classes = train.input_shape, train.num_classes
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=gen)

    def subset(steps: int, batch: int = BATCH) -> TensorData:
        return train.subset(order[: steps * batch])

    teacher = build_model(TEACHER, shape, classes, seed=0).eval().to(device)
    module_teacher = ModuleTeacher(teacher)
    f_teacher = count_flops(teacher, shape)
    f_student = train_flops(STUDENT, shape, classes)  # necessary FLOPs of one training sample
    f_tiny = train_flops(TINY, shape, classes)
    rows: list[dict[str, Any]] = []
    S, W = args.steps, args.warmup
    bounds = arithmetic_bounds(shape, classes)
    n_meas = S * BATCH

    # One-off teacher cache over the whole training split (what fit does once per run without jitter).
    t0 = time.perf_counter()
    module_teacher.cache(train)
    cache_s = time.perf_counter() - t0
    log(f"teacher cache over {len(train)} samples: {cache_s:.2f} s")

    # Warm-up of every path (allocator, MKL/cuBLAS, first-call costs).
    warm = subset(max(W, 2))
    kd_fit(STUDENT, warm, module_teacher, config())
    kd_fit(STUDENT, warm, module_teacher, config(jitter=2))
    if gpu:
        kd_fit(STUDENT, warm, module_teacher, config(amp=False))

    # W1 / W2 -----------------------------------------------------------------------------------------
    for name, pad in (("W1", 0), ("W2", 2)):
        ds = PerSampleMNIST(train, pad)
        t_auto = build_model(TEACHER, shape, classes, seed=0).to(device)  # not frozen: autograd records its forward
        student = functools.partial(build_model, STUDENT, shape, classes, seed=0)
        methods = {
            "tutorial": functools.partial(_tutorial, student, teacher, ds, S, W, False, device),
            "kdistill": functools.partial(kd_fit, STUDENT, subset(S), module_teacher, config(jitter=pad)),
        }
        if name == "W1":
            methods["autograd teacher"] = functools.partial(_tutorial, student, t_auto, ds, S, W, True, device)
        if gpu:
            methods["kdistill fp32"] = functools.partial(kd_fit, STUDENT, subset(S), module_teacher,
                                                         config(jitter=pad, amp=False))
        log(f"{name}: {S} steps x {args.repeats}")
        times = interleaved(methods, args.repeats, log)
        need = f_student + (f_teacher if pad else 0)
        for method, secs in times.items():
            amp = gpu and method == "kdistill"
            rows.append(row(name, f"{method} (AMP bf16)" if amp else method, n_meas, secs, need,
                            peak_bf16 if amp else peak, peak_kind="bf16" if amp else "fp32"))
        if name == "W1":
            kd = statistics.median(times["kdistill"])
            amort = n_meas / (kd + cache_s * n_meas / (10 * len(train)))
            rows.append(row(name, "kdistill incl. teacher cache (10-epoch run)", n_meas, [n_meas / amort], need,
                            peak_bf16 if gpu else peak, cache_s=cache_s, peak_kind="bf16" if gpu else "fp32"))

    # One whole W1 epoch (every training image, batch 128), the unit users wait for ---------------------
    epoch: dict[str, list[float]] = {}
    variants = {"kdistill": config()}
    if gpu:
        variants = {"kdistill (AMP bf16)": config(), "kdistill fp32": config(amp=False),
                    "kdistill (AMP bf16, no CUDA graph)": config(cuda_graph=False),
                    "kdistill fp32, no CUDA graph": config(amp=False, cuda_graph=False),
                    "kdistill (AMP bf16, torch.compile)": config(compile=True)}
    steps_epoch = len(train) // BATCH
    for method, cfg in variants.items():
        try:
            kd_fit(STUDENT, subset(4), module_teacher, cfg)  # warm-up (and compilation, when asked for)
            epoch[method] = [kd_fit(STUDENT, train, module_teacher, cfg) for _ in range(args.repeats)]
        except Exception as exc:  # torch.compile needs a working compiler tool chain; report, don't abort
            log(f"W1 epoch, {method}: failed ({type(exc).__name__}: {exc})")
            continue
        amp = gpu and "AMP" in method
        rows.append(row("W1 epoch", method, steps_epoch * BATCH, epoch[method], f_student,
                        peak_bf16 if amp else peak, peak_kind="bf16" if amp else "fp32"))
        log(f"W1 epoch, {method}: {statistics.median(epoch[method]):.3f} s (median of {args.repeats})")

    # W3 / W4 -----------------------------------------------------------------------------------------
    for name, spec, jitter, steps, f_s in (("W3", TINY, 0, S, f_tiny), ("W4", STUDENT, 2, args.steps_w4, f_student)):
        data = subset(steps)
        cfgs = [config(t, jitter, amp=False) for t in TEMPERATURES]  # fit_many trains in fp32: so does fit here
        tch = module_teacher if jitter else module_teacher.cache(data)
        log(f"{name}: {len(cfgs)} students of {spec}, {steps} steps x {args.repeats}")
        times = interleaved({
            "sequential": functools.partial(kd_sequential, spec, data, tch, cfgs),
            "vectorised": functools.partial(kd_many, spec, data, tch, cfgs),
        }, args.repeats, log)
        need = len(cfgs) * f_s + (f_teacher if jitter else 0)
        for method, secs in times.items():
            rows.append(row(name, method, steps * BATCH, secs, need, peak, students=len(cfgs), peak_kind="fp32"))

    # Scaling -----------------------------------------------------------------------------------------
    scaling: dict[str, list[dict[str, Any]]] = {"batch": [], "width": [], "students": []}
    cached_all = module_teacher.cache(train)
    # Samples per batch-size point; on a GPU enough steps that the graph capture's warm-up steps do not count.
    budget = 2048 if args.quick else (131072 if gpu else 16384)
    for batch in ([32, 128] if args.quick else [32, 64, 128, 256, 512, 1024]):
        steps = max(2, min(budget, len(train)) // batch)  # never more samples than the split has
        data = subset(steps, batch)
        secs = [kd_fit(STUDENT, data, cached_all, config(batch=batch, amp=False)) for _ in range(2)]
        scaling["batch"].append(row("scaling", f"batch {batch}", steps * batch, secs, f_student, peak, batch=batch))
        log(f"batch {batch}: {scaling['batch'][-1]['samples_per_s']:.0f} samples/s")
    for width in ([20, 200] if args.quick else [20, 50, 100, 200, 400, 800, 1600]):
        spec = f"mlp:{width},{width}"
        f_w = train_flops(spec, shape, classes)
        data = subset(4 if args.quick else (400 if gpu else 64))
        secs = [kd_fit(spec, data, cached_all, config(amp=False)) for _ in range(2)]
        scaling["width"].append(row("scaling", f"width {width}", len(data), secs, f_w, peak, width=width))
        log(f"width {width}: {scaling['width'][-1]['samples_per_s']:.0f} samples/s")
    data = subset(4 if args.quick else (400 if gpu else 40))
    one = min(kd_fit(TINY, data, cached_all, config(amp=False)) for _ in range(2))
    for n in ([1, 4] if args.quick else [1, 2, 4, 8, 16, 32]):
        cfgs = [config(1.0 + i, amp=False) for i in range(n)]
        secs = [kd_many(TINY, data, cached_all, cfgs) for _ in range(2)]
        scaling["students"].append(row("scaling", f"{n} students", len(data), secs, n * f_tiny, peak, students=n,
                                       sequential_estimate_s=n * one))
        log(f"{n} students: {min(secs):.3f} s (sequential estimate {n * one:.3f} s)")

    info["loadavg_after"] = os.getloadavg()
    info["other_cpu_share"] = other_cpu_share(busy0, own0, wall0)
    info["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    w1_phases = None
    if not gpu:  # on a GPU the phases would need a synchronisation each (and the step is one CUDA graph)
        w1_data = subset(S)
        w1_phases = w1_breakdown(w1_data, module_teacher.predict(w1_data), max(S, 20))
        w1_sps = next(r["samples_per_s"] for r in rows if r["workload"] == "W1" and r["method"] == "kdistill")
        w1_phases["other (fit step time minus the phases)"] = BATCH / w1_sps - sum(w1_phases.values())
        log("W1 breakdown: " + ", ".join(f"{k}: {1000 * v:.2f} ms" for k, v in w1_phases.items()))
    ratios = summary_ratios(rows, ceiling)
    gemm_s = f_student * BATCH / (ceiling * 1e9)
    ratios["W1 % of GEMM ceiling, bound"] = 100 * gemm_s / (gemm_s + update.get("kernel", update["step"]))
    out = Path(args.out)
    results = {"machine": info, "settings": {**vars(args), "teacher": f"{TEACHER} (seeded random weights)",
                                             "student": STUDENT, "tiny_student": TINY, "batch": BATCH, "lr": LR,
                                             "temperatures": TEMPERATURES},
               "peak_gflop_per_s": peak, "peak_bf16_gflop_per_s": peak_bf16, "gemm_ceiling_gflop_per_s": ceiling,
               "sgd_update_s": update, "teacher_cache_s": cache_s, "train_size": len(train),
               "flops_per_sample": {"teacher_fwd": f_teacher, "student_train": f_student, "tiny_train": f_tiny},
               "rows": rows, "scaling": scaling, "ratios": ratios, "targets": TARGETS,
               "w1_breakdown_s_per_step": w1_phases,
               "arithmetic_bounds": bounds}
    stem = "throughput" if not gpu else "throughput-cuda"
    write_json(out / f"{stem}.json", results)
    write_text(out / f"{stem}.md", markdown(results))
    plot(scaling, peak, out / f"{stem}.png", busy=is_busy(info), title=info.get("gpu"))
    log(f"done: {out}/{stem}.{{json,md,png}}")
    print(markdown(results))
    return 0


def arithmetic_bounds(shape, classes) -> dict[str, float]:
    """Per-sample FLOPs each baseline executes, over what kdistill's step executes (same workload).

    A backward pass costs two forwards (weight and input gradients) except that nobody needs the input
    gradient of the first layer; kdistill's W1 step runs no teacher at all (its outputs are cached).
    """
    t_fwd = count_flops(build_model(TEACHER, shape, classes), shape)
    t_train, s_train = train_flops(TEACHER, shape, classes), train_flops(STUDENT, shape, classes)
    return {
        "W1 vs tutorial": (t_fwd + s_train) / s_train,
        "W1 vs autograd teacher": (t_train + s_train) / s_train,
        "W2 vs tutorial": (t_fwd + s_train) / (t_fwd + s_train),
    }


def summary_ratios(rows: list[dict[str, Any]], ceiling: float) -> dict[str, float]:
    """The issue's ratios, for kdistill's default path (on CUDA: bf16 autocast); the GEMM-ceiling share in fp32."""
    sps = {(r["workload"], r["method"]): r["samples_per_s"] for r in rows}
    pct = {(r["workload"], r["method"]): r["pct_of_peak"] for r in rows}
    gflops = {(r["workload"], r["method"]): r["gflop_per_s"] for r in rows}
    kd = "kdistill (AMP bf16)" if ("W1", "kdistill (AMP bf16)") in sps else "kdistill"
    fp32 = "kdistill fp32" if ("W1", "kdistill fp32") in sps else "kdistill"
    return {
        "W1 vs tutorial": sps["W1", kd] / sps["W1", "tutorial"],
        "W1 vs autograd teacher": sps["W1", kd] / sps["W1", "autograd teacher"],
        "W1 % of peak": pct["W1", kd],
        "W1 % of GEMM ceiling": 100 * gflops["W1", fp32] / ceiling,
        "W2 vs tutorial": sps["W2", kd] / sps["W2", "tutorial"],
        "W3 vectorised vs sequential": sps["W3", "vectorised"] / sps["W3", "sequential"],
        "W4 vectorised vs sequential": sps["W4", "vectorised"] / sps["W4", "sequential"],
    }


def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_cpu_share(busy0: float | None, own0: float, wall0: float) -> float | None:
    """Share of the machine's CPU time that *other* processes used since ``busy0`` (this process excluded).

    The load average cannot tell: it lags by a minute and counts this benchmark's own threads.
    """
    busy1 = machine_busy_s()
    if busy0 is None or busy1 is None:
        return None
    other = (busy1 - busy0) - (time.process_time() - own0)
    return max(0.0, other) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))


def is_busy(m: dict[str, Any]) -> bool:
    """Whether other work ran during the benchmark: other processes used over 10% of the CPUs' time.

    Without ``/proc/stat``, falls back to the 1-minute load average before the run (over half the CPUs).
    """
    share = m.get("other_cpu_share")
    if share is not None:
        return share > 0.10
    return m["loadavg_before"][0] > 0.5 * m["logical_cpus"]


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    gpu = f"**{m['gpu']}** ({m['gpu_sms']} SMs, {m['gpu_memory_gib']} GiB, CUDA {m['cuda']}) with host " if m.get("gpu") else ""
    bf16 = res.get("peak_bf16_gflop_per_s")
    lines = [
        "# Throughput benchmark" + (" (GPU)" if gpu else ""),
        "",
        (f"Machine: {gpu}{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} "
         f"threads; load average before {tuple(round(x, 2) for x in m['loadavg_before'])}, after "
         f"{tuple(round(x, 2) for x in m['loadavg_after'])}; other processes' share of the CPU time during the run: "
         f"{'unknown' if m.get('other_cpu_share') is None else format(m['other_cpu_share'], '.1%')}; {m['date']}; "
         f"total {m['wall_time_s']} s."
         + (" Freed host memory kept for reuse (kdistill.engine.heap) for every row." if m.get("heap_retained") else "")),
        (f"Measured fp32 matmul peak: **{res['peak_gflop_per_s']:.1f} GFLOP/s**"
         + (f" (TF32 off); bf16: **{bf16:,.0f} GFLOP/s**, the reference for the AMP rows. " if bf16 else ". ") +
         f"Teacher: {res['settings']['teacher']}; one-off teacher cache over the {res['train_size']:,}-image "
         f"training split: {res['teacher_cache_s']:.2f} s."),
        "",
        "Samples/s: training samples per second (W3/W4: samples per second through all 8 students). GFLOP/s counts",
        "the necessary arithmetic only: per student, its forward, weight gradients and the input gradients of all but",
        "the first layer (3 x forward less 2 x the first layer); + 1 teacher forward per sample when jittered.",
        "Medians of interleaved repetitions; " + (
            "`python benchmarks/throughput.py --device cuda`; W3/W4 and the scaling runs are fp32 on both sides."
            if gpu else "`python benchmarks/throughput.py`."),
        "",
        "| workload | method | samples/s | GFLOP/s | % of peak |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        kind = f" ({r.get('peak_kind', 'fp32')})" if gpu else ""
        lines.append(f"| {r['workload']} | {r['method']} | {r['samples_per_s']:,.0f} | {r['gflop_per_s']:.1f} | "
                     f"{r['pct_of_peak']:.{1 if gpu else 0}f}%{kind} |")
    lines += ["", "| ratio | measured | target (2-core CPU) | met |", "|---|---|---|---|"]
    for k, v in res["ratios"].items():
        target = res["targets"].get(k)
        unit = "%" if "%" in k else "x"
        lines.append(f"| {k} | {v:.2f}{unit} | " + (f">= {target:g}{unit} | {'yes' if v >= target else 'no'} |"
                                                     if target is not None else "- | - |"))
    epoch = {r["method"]: r for r in res["rows"] if r["workload"] == "W1 epoch"}
    if gpu and epoch:
        lines += ["", f"One W1 epoch ({next(iter(epoch.values()))['samples']:,} images, batch 128; target on an H100/H200: "
                  "< 1 s): " + "; ".join(f"{k}: **{r['seconds_median']:.3f} s**" for k, r in epoch.items()) + "."]
    if is_busy(m):
        lines[2:2] = [("**Warning: other processes were using the CPUs during this run (see their share below), so "
                       "these timings are not representative; re-run on an idle machine.**"), ""]
    c = res["gemm_ceiling_gflop_per_s"]
    w1_fp32 = next(r for r in res["rows"] if r["workload"] == "W1" and r["method"] in ("kdistill", "kdistill fp32"))
    lines += ["", (f"GEMM ceiling: the W1 student step's matrix products alone at batch {res['settings']['batch']} "
                   f"(preallocated, no framework) run at {c:.1f} GFLOP/s = **{100 * c / res['peak_gflop_per_s']:.0f}% "
                   "of the peak**: what this BLAS reaches on these shapes with no framework around it, a reference for "
                   "how close to the large-matrix peak a batch-128 step can get. kdistill's W1 runs at "
                   f"{100 * w1_fp32['gflop_per_s'] / c:.0f}% of that rate" + (" in fp32." if gpu else "."))]
    bound = res["ratios"].get("W1 % of GEMM ceiling, bound")
    upd = res.get("sgd_update_s")
    if bound is not None and isinstance(upd, dict):
        gemm_t = res["flops_per_sample"]["student_train"] * res["settings"]["batch"] / (c * 1e9)
        kern = upd.get("kernel", upd["step"])
        lines += ["", (f"Bound: a step also updates the weights. The fused SGD update of the same parameters "
                       "(momentum, "
                       f"Nesterov; gradients in place, nothing else) takes {1000 * kern:.2f} ms as a bare kernel"
                       + (f" ({1000 * upd['step']:.2f} ms through `optimizer.step()`)" if "kernel" in upd else "")
                       + f", against {1000 * gemm_t:.2f} ms of matrix products at the ceiling's rate: a step that ran "
                       f"its products at the ceiling and then only this update would reach **{bound:.0f}% of the GEMM "
                       "ceiling**, with nothing left for biases, activations, the loss, the data or autograd. "
                       f"kdistill's W1 is at {100 * res['ratios']['W1 % of GEMM ceiling'] / bound:.0f}% of that "
                       "bound.")]
    ph = res.get("w1_breakdown_s_per_step")
    if ph:
        other_key = "other (fit step time minus the phases)"
        phases = {k: v for k, v in ph.items() if k != other_key}
        total = sum(phases.values())
        fit_step = total + ph[other_key]
        gemm = res["flops_per_sample"]["student_train"] * res["settings"]["batch"] / (c * 1e9)
        lines += ["", (f"W1 step per phase (kdistill's step replicated with a clock read between phases, mean of "
                       f"{1000 * total:.2f} ms per step; fit's own step measured {1000 * fit_step:.2f} ms; the "
                       f"step's matrix products alone at the GEMM ceiling's rate would take {1000 * gemm:.2f} ms):"),
                  "", "| phase | ms/step | share of the replicated step |", "|---|---|---|"]
        for k, v in phases.items():
            lines.append(f"| {k} | {1000 * v:.2f} | {100 * v / total:.0f}% |")
        fb = phases["student forward"] + phases["backward"]
        lines += ["", (f"Forward + backward take {1000 * fb:.2f} ms here, {100 * gemm / fb:.0f}% of it the matrix "
                       f"products' ceiling time; the optimiser's update ({100 * phases[W1_PHASES[4]] / total:.0f}% of "
                       "the step) is memory-bound work outside the ceiling (it reads and writes every weight, gradient "
                       "and momentum buffer once per step). "
                       + ("The replicated step is slower than fit's own (the phases are measured in a separate, "
                          "shorter run), so read the shares, not the milliseconds." if ph[other_key] < 0 else
                          f"{1000 * ph[other_key]:.2f} ms of fit's step lie outside these phases (the loop's "
                          "per-step overhead)."))]
    b = res["arithmetic_bounds"]
    lines += ["", ("Arithmetic bounds: per sample, the tutorial loop executes "
                   f"{b['W1 vs tutorial']:.2f}x and the autograd-teacher loop {b['W1 vs autograd teacher']:.2f}x the "
                   "floating-point work of kdistill's W1 step (which skips the teacher, cached once, and the "
                   "input gradient); in W2 both must run the teacher on every jittered batch, so the work is the "
                   f"same ({b['W2 vs tutorial']:.2f}x). At equal matmul efficiency these are the ratios to expect; "
                   "anything above them comes from the per-sample Dataset/DataLoader overhead.")]
    lines += ["", "Scaling (`fit`, student 784-800-800-10 unless stated, cached teacher):", "",
              "| setting | samples/s | GFLOP/s | % of peak | seconds |", "|---|---|---|---|---|"]
    for key in ("batch", "width"):
        for r in res["scaling"][key]:
            lines.append(f"| {r['method']} | {r['samples_per_s']:,.0f} | {r['gflop_per_s']:.1f} | "
                         f"{r['pct_of_peak']:.0f}% | {r['seconds_median']:.3f} |")
    lines += ["", ("Sweep of 784-20-20-10 students (`fit_many`) against the number of students; sequential = N x "
                   "one `fit` run of the same steps:"), "",
              "| students | vectorised s | sequential estimate s | speed-up | GFLOP/s |", "|---|---|---|---|---|"]
    for r in res["scaling"]["students"]:
        lines.append(f"| {r['students']} | {r['seconds_median']:.3f} | {r['sequential_estimate_s']:.3f} | "
                     f"{r['sequential_estimate_s'] / r['seconds_median']:.1f}x | {r['gflop_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(scaling: dict[str, list[dict[str, Any]]], peak: float, path: Path, busy: bool = False,
         title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    def log_x(ax, values):
        ax.set_xscale("log")
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())

    def efficiency(ax, xs, rows):
        ax2 = ax.twinx()
        ax2.plot(xs, [r["pct_of_peak"] for r in rows], "s--", color="tab:orange")
        ax2.set_ylabel("% of measured matmul peak", color="tab:orange")
        ax2.set_ylim(0, max(100, *(r["pct_of_peak"] for r in rows)) * 1.05)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    b = scaling["batch"]
    xs = [r["batch"] for r in b]
    ax = axes[0]
    ax.plot(xs, [r["samples_per_s"] for r in b], "o-")
    log_x(ax, xs)
    ax.set(xlabel="batch size", ylabel="samples/s", title="fit, student 784-800-800-10: batch size")
    ax.set_ylim(0, None)
    efficiency(ax, xs, b)
    w = scaling["width"]
    xs = [r["width"] for r in w]
    ax = axes[1]
    ax.plot(xs, [r["samples_per_s"] for r in w], "o-")
    log_x(ax, xs)
    ax.set(yscale="log", xlabel="hidden width w (student 784-w-w-10)", ylabel="samples/s", title="fit, batch 128: width")
    efficiency(ax, xs, w)
    s = scaling["students"]
    xs = [r["students"] for r in s]
    ax = axes[2]
    ax.plot(xs, [r["seconds_median"] for r in s], "o-", label="fit_many: one vectorised pass")
    ax.plot(xs, [r["sequential_estimate_s"] for r in s], "s--", label="N x fit, one after another")
    log_x(ax, xs)
    ax.set(xlabel="students (784-20-20-10)", ylabel="seconds for the same steps",
           title="sweep time vs number of students")
    ax.set_ylim(0, None)
    ax.legend()
    note = " - BUSY MACHINE, NOT REPRESENTATIVE" if busy else ""
    where = f"{title}, " if title else ""
    fig.suptitle(f"kdistill training throughput ({where}measured fp32 matmul peak {peak:.0f} GFLOP/s){note}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
