"""A/B of kdistill.engine.heap: ``fit`` steps with glibc's default malloc vs freed memory kept for reuse.

Each measurement is a fresh process (the malloc setting is per process and cannot be undone), alternated
between the two settings; a process runs a warm-up fit, then times one fit of ``--steps`` steps and counts
its minor page faults. Workloads: W1's student (784-800-800-10 on cached teacher logits, batch 128), the
hinton-mnist teacher (cnn:16,32, jitter 2, batch 128), W5's student (resnet8 on 32x32x3, crop4+flip, trained alone)
and the one-off caching of W5's teacher views (resnet20, 8 crop4+flip views per image, batches of 128; a "step"
is one batch of 128 images, 8 forwards), which ``fit`` runs before its first training step.

    python benchmarks/heap_ab.py [--pairs 4] [--steps 60] [--only WORKLOAD] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "W1 student mlp:800,800": ("mlp:800,800", (1, 28, 28), "cached", ""),
    "hinton teacher cnn:16,32": ("cnn:16,32", (1, 28, 28), "none", "jitter"),
    "W5 student resnet8": ("resnet8", (3, 32, 32), "none", "crop4,flip"),
    "W5 caching resnet20, 8 views": ("resnet20", (3, 32, 32), "views", "crop4,flip"),
}


def child(name: str, steps: int) -> None:
    """Run in a fresh process: print one JSON line with seconds per step and minor faults per step."""
    import resource

    import torch

    from kdistill.data.dataset import TensorData
    from kdistill.models import build_model
    from kdistill.teachers.base import CachedTeacher
    from kdistill.engine import TrainConfig, fit

    torch.set_num_threads(int(os.environ.get("HEAP_AB_THREADS", "2")))
    spec, shape, teacher_kind, aug = WORKLOADS[name]
    n = 128 * steps
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g),
                      tuple(str(c) for c in range(10)))
    teacher = CachedTeacher(data.index, torch.randn(n, 10, generator=g) * 3) if teacher_kind == "cached" else None
    kw = {"jitter": 2} if aug == "jitter" else {"augment": aug} if aug else {}
    if teacher_kind == "views":
        from kdistill.engine.heap import retain_freed_memory
        from kdistill.teachers.views import compute_views
        from kdistill.teachers.base import ModuleTeacher

        retain_freed_memory()  # as fit does before it caches (a no-op under KDISTILL_RETAIN_HEAP=0)

        net = ModuleTeacher(build_model(spec, shape, 10, seed=0))
        augment, cpu = TrainConfig(**kw).augmentation(), torch.device("cpu")
        compute_views(net, data.subset(torch.arange(128 * 2)), augment, 8, 0, 0, cpu)  # warm-up
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        compute_views(net, data, augment, 8, 0, 0, cpu)
        dt = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        print(json.dumps({"s_per_step": dt / steps, "faults_per_step": faults / steps}))
        return
    cfg = dict(batch_size=128, lr=0.05, seed=0, checkpoint=False, **kw)
    method = {"name": "kd", "temperature": 4.0, "alpha": 0.9} if teacher is not None else None  # None: CE
    fit(build_model(spec, shape, 10, seed=0), data.subset(torch.arange(128 * 5)), TrainConfig(epochs=1, **cfg),
        teacher=teacher, method=method, progress=False)  # warm-up: kernels, thread pool, allocator
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fit(build_model(spec, shape, 10, seed=0), data, TrainConfig(epochs=1, **cfg), teacher=teacher, method=method,
        progress=False)
    dt = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"s_per_step": dt / steps, "faults_per_step": faults / steps}))


def measure(name: str, retain: bool, steps: int) -> dict[str, float]:
    env = {**os.environ, "KDISTILL_RETAIN_HEAP": "1" if retain else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4, help="alternated (default, retained) process pairs per workload")
    p.add_argument("--steps", type=int, default=60, help="timed steps per process")
    p.add_argument("--out", type=Path, help="write heap-ab.json and heap-ab.md here")
    p.add_argument("--only", choices=list(WORKLOADS), action="append", help="measure only this workload (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.steps)
        return 0
    t_start = time.time()
    rows = []
    for name in args.only or WORKLOADS:
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.pairs):
            for retain in (False, True):
                runs[retain].append(measure(name, retain, args.steps))
        med = {r: statistics.median(x["s_per_step"] for x in runs[r]) for r in runs}
        faults = {r: statistics.median(x["faults_per_step"] for x in runs[r]) for r in runs}
        rows.append({"workload": name, "default_ms": 1000 * med[False], "retained_ms": 1000 * med[True],
                     "speedup": med[False] / med[True], "default_faults": faults[False],
                     "retained_faults": faults[True], "runs": {str(k): v for k, v in runs.items()}})
        print(f"{name}: default {1000 * med[False]:.1f} ms/step ({faults[False]:.0f} faults/step), retained "
              f"{1000 * med[True]:.1f} ms/step ({faults[True]:.0f} faults/step): {med[False] / med[True]:.2f}x", flush=True)
    only = "".join(f' --only "{n}"' for n in args.only or [])
    head = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}; {time.time() - t_start:.0f} s. Command: "
            f"`python benchmarks/heap_ab.py --pairs {args.pairs} --steps {args.steps}{only}`. Medians over {args.pairs} fresh "
            "processes per setting, alternated.")
    table = ["| workload | default malloc ms/step | retained ms/step | speed-up | minor faults/step (default, retained) |",
             "|---|---|---|---|---|"]
    table += [f"| {r['workload']} | {r['default_ms']:.1f} | {r['retained_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['default_faults']:.0f}, {r['retained_faults']:.0f} |" for r in rows]
    print(head)
    print("\n".join(table))
    if args.out:
        from kdistill.io import write_json, write_text

        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "heap-ab.json", {"rows": rows, "pairs": args.pairs, "steps": args.steps})
        write_text(args.out / "heap-ab.md", "# Host allocator A/B (kdistill.engine.heap)\n\n" + head + "\n\n"
                   + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
