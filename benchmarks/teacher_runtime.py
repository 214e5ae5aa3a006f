"""A frozen CIFAR teacher's forward in torch (as kdistill runs it) against onnxruntime, on the CPU.

    python benchmarks/teacher_runtime.py --out benchmarks/results/teacher-runtime    # ~1 min, 2 cores

Why: with cached teaching (``train.teacher_views``) the one-off caching is K teacher forwards per sample,
and on 2 cores it bounds W5's amortised ratio (benchmarks/cnn_throughput.py). This measures how much a
different inference runtime would save before the engine grows one. torch: the teacher as the engine
prepares it (eval, BatchNorms folded by ``kdistill.models.fold``, channels_last, ``inference_mode``);
onnxruntime: the same weights exported by ``kdistill.teachers.onnx_model.export_onnx`` (onnxruntime folds the
BatchNorms itself), torch's thread count; TorchScript: ``torch.jit.freeze`` + ``optimize_for_inference`` of a
trace of the same weights (oneDNN's fused convolutions; deprecated in favour of ``torch.compile``, so measured
as a candidate, not used by the engine). All timed by ``kdistill.outputs.deploy``'s median-of-repeats clock on
the same seeded random batch, with the largest logit difference as a check that they compute the same function.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine  # noqa: E402  (same machine description as the other benchmarks)

from kdistill.outputs.deploy import median_ms, onnx_measure, torch_latency  # noqa: E402
from kdistill.io import write_json, write_text  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.models.fold import fold_batchnorm  # noqa: E402
from kdistill.models.layout import as_layout, use_channels_last  # noqa: E402

SHAPE = (3, 32, 32)


def torchscript_latency(net: torch.nn.Module, x: torch.Tensor, batches: list[int], *, repeats: int,
                        budget_s: float) -> tuple[dict[int, float], torch.Tensor]:
    """Median ms per forward of a frozen, inference-optimised TorchScript trace of ``net``, and its logits on ``x``."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.freeze / optimize_for_inference
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, x[:8])))
        out = {b: median_ms(lambda: scripted(x[:b]), repeats=repeats, budget_s=budget_s)[0] for b in batches}
        return out, scripted(x)


def measure(spec: str, batches: list[int], repeats: int, budget_s: float) -> dict[str, Any]:
    """ms per image at each batch size in torch (engine-prepared) and onnxruntime, and their ratio."""
    net = build_model(spec, SHAPE, 10, seed=0).eval()
    x = torch.randn(max(batches), *SHAPE, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm(net, x[:8]) or net
    nhwc = use_channels_last(folded)
    if nhwc:
        folded = folded.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = net(x)
        ours = folded(as_layout(x, nhwc))
    t = torch_latency(folded, x, batches, repeats=repeats, budget_s=budget_s)
    j, jit_logits = torchscript_latency(net, x, batches, repeats=repeats, budget_s=budget_s)
    o = onnx_measure(net, x, SHAPE, batches, repeats=repeats, budget_s=budget_s, reference=reference)
    row: dict[str, Any] = {"teacher": spec, "folded": folded is not net, "channels_last": nhwc,
                           "torch_ms_per_image": {b: t[b] / b for b in batches},
                           "folded_max_abs_diff": float((ours - reference).abs().max()),
                           "torchscript_ms_per_image": {b: j[b] / b for b in batches},
                           "torchscript_max_abs_diff": float((jit_logits - reference).abs().max()),
                           "torch_over_torchscript": {b: t[b] / j[b] for b in batches}}
    if "latency" in o:
        row["onnx_ms_per_image"] = {b: o["latency"][b] / b for b in batches}
        row["onnx_max_abs_diff"] = o["max_abs_diff"]
        row["torch_over_onnx"] = {b: t[b] / o["latency"][b] for b in batches}
    else:
        row["note"] = o["note"]
    return row


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = ["# Teacher forward: torch (as the engine runs it) vs onnxruntime (CPU)", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} "
             f"threads; {m['date']}; freed host memory kept for reuse (kdistill.engine.heap): "
             f"{m.get('heap_retained')}. Command: `{res['command']}`. Medians of up to {s['repeats']} repeats, at most "
             f"{s['budget_s']} s per measurement, on one seeded random batch.", "",
             "| teacher | batch | torch ms/image | onnxruntime ms/image | torch / onnxruntime | max logit diff "
             "| TorchScript ms/image | torch / TorchScript | max logit diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for b in s["batches"]:
            jit = (f" {r['torchscript_ms_per_image'][b]:.3f} | {r['torch_over_torchscript'][b]:.2f}x "
                   f"| {r['torchscript_max_abs_diff']:.1e} |")
            if "note" in r:
                lines.append(f"| {r['teacher']} | {b} | {r['torch_ms_per_image'][b]:.3f} | {r['note']} | - | - |{jit}")
                continue
            lines.append(f"| {r['teacher']} | {b} | {r['torch_ms_per_image'][b]:.3f} | {r['onnx_ms_per_image'][b]:.3f} "
                         f"| {r['torch_over_onnx'][b]:.2f}x | {r['onnx_max_abs_diff']:.1e} |{jit}")
    lines += ["", "torch: eval, BatchNorms folded (`kdistill.models.fold`), channels_last, `inference_mode`; "
              "onnxruntime: the unfolded model exported by `kdistill.teachers.onnx_model.export_onnx`; TorchScript: "
              "`torch.jit.freeze` + `optimize_for_inference` of a trace of the unfolded model (deprecated APIs, "
              "a candidate only)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="resnet20,resnet56", help="comma-separated model specs")
    p.add_argument("--batches", default="128,512", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget-s", type=float, default=5.0, help="most seconds per measurement")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "teacher-runtime"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kdistill.engine.heap import retain_freed_memory

    heap = retain_freed_memory()  # as fit does before it caches views: without it torch's forward faults in fresh pages
    batches = [int(b) for b in args.batches.split(",")]
    rows = [measure(spec.strip(), batches, args.repeats, args.budget_s) for spec in args.teachers.split(",")]
    res = {"machine": {**machine(), "heap_retained": heap}, "command": "python benchmarks/teacher_runtime.py " + " ".join(sys.argv[1:]),
           "settings": {"batches": batches, "repeats": args.repeats, "budget_s": args.budget_s}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "teacher-runtime.json", res)
    md = markdown(res)
    write_text(out / "teacher-runtime.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
