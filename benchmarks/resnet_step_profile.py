"""Where a CIFAR ResNet training step's time goes on the CPU, by operator (torch.profiler).

    python benchmarks/resnet_step_profile.py [--model resnet8] [--steps 10]     # ~15 s, 2 cores

The step is W5's student step without the teacher (channels_last, batch 128, cross-entropy, fused
Nesterov SGD), run as the engine runs it (freed host memory kept). The table groups the profiler's
self-CPU time into convolution, BatchNorm and ReLU forward and backward and the rest, the shares that say
whether a change to the step's elementwise work (what ``torch.compile`` fuses) can matter.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kdistill.engine.heap import retain_freed_memory
from kdistill.models import build_model

GROUPS = {
    "aten::convolution_backward": "convolution backward",
    "aten::mkldnn_convolution": "convolution forward",
    "aten::native_batch_norm_backward": "BatchNorm backward",
    "aten::native_batch_norm": "BatchNorm forward",
    "aten::threshold_backward": "ReLU backward",
    "aten::clamp_min": "ReLU forward",
    "aten::relu": "ReLU forward",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(0)
    net = build_model(args.model, (3, 32, 32), 10, seed=0).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    shares: dict[str, float] = {}
    for ev in prof.key_averages():
        group = GROUPS.get(ev.key, "other")
        shares[group] = shares.get(group, 0.0) + ev.self_cpu_time_total
    total = sum(shares.values())
    print(f"{args.model}, batch 128, channels_last, {args.threads} threads: {ms:.1f} ms per step unprofiled "
          f"(mean of {args.steps}); self-CPU time under the profiler by operator group:")
    print("| operators | share |\n|---|---|")
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {100 * t / total:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
