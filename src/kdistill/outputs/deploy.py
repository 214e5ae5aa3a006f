"""What a distilled student buys at deployment: size, FLOPs, CPU latency and throughput next to accuracy.

:func:`deployment_table` measures every model the same way (a CPU copy in eval mode, the same test
split, the same thread count) and states each student relative to the teacher (``x_smaller``,
``x_fewer_flops``, ``x_faster_b*``, ``accuracy_kept``), so a report answers "how much cheaper, at what
cost in accuracy". Latency is measured in PyTorch and, when onnxruntime imports, in onnxruntime on a
model exported with :func:`kdistill.teachers.onnx_model.export_onnx`. Every measurement is bounded by a time
budget, so tiny models take milliseconds and big ones cannot stall a run.

:func:`deployment_markdown` renders the table; :func:`write_deployment` adds it to a run's
``results.json`` (key ``deployment``) and ``results.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.teachers.onnx_model import export_onnx
from kdistill.engine.evaluate import classification_metrics, predict_logits
from kdistill.io import save_model, write_json, write_text
from kdistill.models.counting import count_flops, count_parameters
from kdistill.models.layout import as_layout, use_channels_last
from kdistill.models.outputs import forward_logits

BACKENDS = ("torch", "onnx")
_MD_BEGIN, _MD_END = "<!-- kdistill:deployment -->", "<!-- /kdistill:deployment -->"


# ----------------------------------------------------------------------------------------------- timing


SPREAD_LIMIT = 0.25
"""A latency whose interquartile range exceeds this fraction of its median is unreliable (noisy)."""
MIN_SPREAD_REPEATS = 5
"""Fewer timed calls than this cannot show a spread: such a latency is judged by the machine's load only."""
LOAD_MARGIN = 0.5
"""Unreliable when other processes used more than ``cores - torch threads + LOAD_MARGIN`` cores while timing."""
RETRIES = 2
"""An unreliable latency is measured again up to this many times (each within the same budget)."""
LOAD_WINDOW_S = 0.25
"""Shortest span the machine's load is sampled over: ``/proc/stat`` and ``os.times`` count in clock ticks
(10 ms), so a fast model's sub-millisecond timing would otherwise always read as an idle machine."""


def time_calls(fn: Callable[[], Any], *, repeats: int, budget_s: float, warmup: int = 2) -> list[float]:
    """Wall times of ``fn()`` in ms over up to ``repeats`` timed calls.

    ``warmup`` untimed calls come first (allocator, oneDNN primitive caches, lazy init). Warm-up and
    timing together stop once ``budget_s`` is spent, after at least one warm-up and one timed call,
    so a slow model is measured fewer times instead of blowing the run's time.
    """
    deadline = time.perf_counter() + budget_s
    for i in range(max(1, warmup)):
        fn()
        if i and time.perf_counter() > deadline:
            break
    times: list[float] = []
    while len(times) < max(1, repeats) and (not times or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return times


def median_ms(fn: Callable[[], Any], *, repeats: int, budget_s: float, warmup: int = 2) -> tuple[float, int]:
    """Median wall time of ``fn()`` in ms over up to ``repeats`` timed calls, and how many were timed
    (:func:`time_calls`)."""
    times = time_calls(fn, repeats=repeats, budget_s=budget_s, warmup=warmup)
    return statistics.median(times), len(times)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation between order statistics."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def spread(times_ms: Sequence[float]) -> dict[str, Any]:
    """``median_ms``, ``p10_ms``, ``p25_ms``, ``p75_ms``, ``p90_ms`` and ``repeats`` of timed calls."""
    stats = {f"p{q}_ms": percentile(times_ms, q / 100) for q in (10, 25, 75, 90)}
    return {"median_ms": statistics.median(times_ms), **stats, "repeats": len(times_ms)}


def cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_sample() -> tuple[float, float, float] | None:
    """``(CPU seconds all processes used since boot, this process's CPU seconds, wall clock)``, or None
    where ``/proc/stat`` does not exist (then only the 1-minute load average is recorded)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    jiffies = [int(v) for v in fields[1:9]] + [0] * 8
    busy = sum(jiffies[i] for i in (0, 1, 2, 5, 6, 7))  # user nice system irq softirq steal (not idle, iowait)
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def other_load(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Cores that other processes (and the hypervisor's steal) kept busy on average between two samples."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def judge(stats: dict[str, Any], load: float | None, n_cores: int, threads: int) -> str | None:
    """Why a latency cannot be trusted (the machine was busy, or the repeats disagree), or None."""
    if load is not None and load > max(0, n_cores - threads) + LOAD_MARGIN:
        return f"load {load:.1f} on {n_cores} cores"
    if stats["repeats"] >= MIN_SPREAD_REPEATS and stats["median_ms"] > 0:
        rel = (stats["p75_ms"] - stats["p25_ms"]) / stats["median_ms"]
        if rel > SPREAD_LIMIT:
            return f"IQR {rel:.0%} of the median over {stats['repeats']} repeats"
    return None


def measure_latency(fn: Callable[[], Any], *, repeats: int, budget_s: float,
                    retries: int = RETRIES) -> dict[str, Any]:
    """:func:`spread` of ``fn``'s timed calls plus the load other processes put on the machine meanwhile.

    An unreliable attempt (:func:`judge`) is measured again, up to ``retries`` times; the most trustworthy
    attempt is kept (a reliable one, else the least loaded). Adds ``other_load`` (cores busy with other
    work, None where unknown), ``loadavg_1m``, ``attempts`` and ``unreliable`` (the reason, or None).
    """
    n_cores, threads = cores(), torch.get_num_threads()
    best: dict[str, Any] | None = None
    for attempt in range(1, max(0, retries) + 2):
        start = cpu_sample()
        stats = spread(time_calls(fn, repeats=repeats, budget_s=budget_s))
        if start is not None:  # widen the load's sample to a span clock ticks can resolve
            time.sleep(max(0.0, LOAD_WINDOW_S - (time.perf_counter() - start[2])))
        stats["other_load"] = other_load(start, cpu_sample())
        stats["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        stats["unreliable"] = judge(stats, stats["other_load"], n_cores, threads)
        if best is None or best["unreliable"] and (not stats["unreliable"]
                                                   or (stats["other_load"] or 0) < (best["other_load"] or 0)):
            best = stats
        best["attempts"] = attempt
        if not best["unreliable"]:
            break
    return best


def _batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` samples of ``x`` (cycled when ``x`` has fewer), contiguous on the CPU."""
    rows = torch.arange(size) % len(x)
    return x[rows].float().cpu().contiguous()


def torch_latency(net: nn.Module, x: torch.Tensor, batches: Sequence[int], *, repeats: int,
                  budget_s: float, retries: int = RETRIES) -> dict[int, dict[str, Any]]:
    """:func:`measure_latency` of a forward of the CPU module ``net`` at each batch size (``inference_mode``)."""
    nhwc = use_channels_last(net)
    out: dict[int, dict[str, Any]] = {}
    with torch.inference_mode():
        for b in batches:
            xb = as_layout(_batch(x, b), nhwc)
            out[b] = measure_latency(lambda: forward_logits(net, xb), repeats=repeats, budget_s=budget_s,
                                     retries=retries)
    return out


def _onnxruntime() -> Any | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def onnx_measure(net: nn.Module, x: torch.Tensor, in_shape: Sequence[int], batches: Sequence[int], *,
                 repeats: int, budget_s: float, reference: torch.Tensor | None = None,
                 retries: int = RETRIES) -> dict[str, Any]:
    """Export ``net`` to ONNX in a temporary directory and time it in onnxruntime (CPU, torch's threads).

    Returns ``{"latency": {batch: ms}, "stats": {batch: measure_latency(...)}, "max_abs_diff": float}`` (the
    largest logit difference from ``reference`` on the first batch, a check that the export computes the
    same function) or
    ``{"note": why}`` when the export or the session fails; the table then keeps the torch numbers only.
    """
    ort = _onnxruntime()
    if ort is None:
        return {"note": "onnxruntime not installed"}
    with tempfile.TemporaryDirectory(prefix="kdistill-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export_onnx(net, path, in_shape)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # the exporter and onnxruntime raise many exception types
            first = (str(exc).splitlines() or [""])[0][:200]
            return {"note": f"onnx export failed: {type(exc).__name__}: {first}"}
        name = session.get_inputs()[0].name
        result: dict[str, Any] = {"latency": {}, "stats": {}}
        for b in batches:
            feed = {name: _batch(x, b).numpy()}
            stats = measure_latency(lambda: session.run(None, feed), repeats=repeats, budget_s=budget_s,
                                    retries=retries)
            result["latency"][b], result["stats"][b] = stats["median_ms"], stats
        if reference is not None:
            n = min(len(reference), len(x), max(batches))
            got = torch.from_numpy(session.run(None, {name: _batch(x, n).numpy()})[0])
            result["max_abs_diff"] = float((got - reference[:n]).abs().max())
    return result


# ------------------------------------------------------------------------------------------ the table


def weights_size(model: nn.Module, path: str | os.PathLike | None = None) -> int:
    """Bytes on disk of the model's safetensors file: ``path`` when given, else a temporary ``save_model``."""
    if path is not None:
        return Path(path).stat().st_size
    with tempfile.TemporaryDirectory(prefix="kdistill-size-") as tmp:
        file = Path(tmp) / "model.safetensors"
        save_model(file, model)
        return file.stat().st_size


def machine_info(onnx_used: bool) -> dict[str, Any]:
    """Where the latencies were measured: CPU, core and thread counts, library versions."""
    ort = _onnxruntime() if onnx_used else None
    return {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": getattr(ort, "__version__", None),
    }


def _measure_model(net: nn.Module, test: TensorData, in_shape: Sequence[int], batches: Sequence[int], *,
                   repeats: int, budget_s: float, onnx: bool, teacher_logits: torch.Tensor | None,
                   weights_path: str | os.PathLike | None,
                   retries: int = RETRIES) -> tuple[dict[str, Any], torch.Tensor]:
    """One row (without the ratios to the teacher) and the model's test logits."""
    logits = predict_logits(net, test.x)
    m = classification_metrics(logits, test.y, teacher_logits)
    row: dict[str, Any] = {
        "spec": getattr(net, "spec", None) or type(net).__name__,
        "params": count_parameters(net),
        "size_bytes": weights_size(net, weights_path),
        "flops": count_flops(net, in_shape),
    }
    n_timings = len(batches) * (2 if onnx else 1)
    per = budget_s / max(1, n_timings)
    stats: dict[str, dict[str, Any]] = {}
    for b, st in torch_latency(net, test.x, batches, repeats=repeats, budget_s=per, retries=retries).items():
        row[f"latency_ms_torch_b{b}"], stats[f"torch_b{b}"] = st["median_ms"], st
    row["throughput_torch_sps"] = max(batches) / (row[f"latency_ms_torch_b{max(batches)}"] / 1000.0)
    if onnx:
        o = onnx_measure(net, test.x, in_shape, batches, repeats=repeats, budget_s=per,
                         reference=logits[: max(batches)], retries=retries)
        if "note" in o:
            row["onnx_note"] = o["note"]
        else:
            for b, ms in o["latency"].items():
                row[f"latency_ms_onnx_b{b}"] = ms
            row["throughput_onnx_sps"] = max(batches) / (o["latency"][max(batches)] / 1000.0)
            row["onnx_max_abs_diff"] = o.get("max_abs_diff")
            stats.update({f"onnx_b{b}": st for b, st in o["stats"].items()})
    row.update(reliability(stats))
    row.update({"accuracy": m["accuracy"], "errors": m["errors"], "nll": m["nll"], "ece": m["ece"]})
    if "teacher_agreement" in m:
        row["teacher_agreement"] = m["teacher_agreement"]
    return row, logits


def reliability(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A row's timing trust from its per-timing :func:`measure_latency` results (``{"torch_b1": ...}``).

    ``latency_stats``: each timing's median, p10/p25/p75/p90, repeats, attempts, other processes' load and
    verdict; ``latency_spread_pct``: the largest IQR as a percentage of its median; ``latency_repeats``:
    the fewest timed calls; ``latency_check``: ``"ok"`` or ``"unreliable: REASON (TIMING), ..."``.
    """
    bad = [f"{st['unreliable']} ({k.replace('_', ' ')})" for k, st in stats.items() if st.get("unreliable")]
    rel = [100.0 * (st["p75_ms"] - st["p25_ms"]) / st["median_ms"] for st in stats.values() if st["median_ms"] > 0]
    return {"latency_stats": stats, "latency_spread_pct": max(rel) if rel else None,
            "latency_repeats": min((st["repeats"] for st in stats.values()), default=0),
            "latency_check": "unreliable: " + "; ".join(bad) if bad else "ok"}


def _ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or the denominator is 0."""
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def add_ratios(rows: dict[str, dict[str, Any]], teacher: str, batches: Iterable[int]) -> None:
    """Each row relative to the teacher's: larger ``x_*`` is better for the row; ``accuracy_kept`` ~ 1."""
    t = rows[teacher]
    for row in rows.values():
        row["x_smaller"] = _ratio(t["params"], row["params"])
        row["x_fewer_flops"] = _ratio(t["flops"], row["flops"])
        for b in batches:
            key = f"latency_ms_torch_b{b}"
            row[f"x_faster_b{b}"] = _ratio(t[key], row[key])
        row["accuracy_kept"] = _ratio(row["accuracy"], t["accuracy"])


def deployment_table(
    models: dict[str, nn.Module],
    test: TensorData,
    *,
    teacher_name: str | None = "teacher",
    input_shape: Sequence[int] | None = None,
    latency_batches: Sequence[int] = (1, 256),
    repeats: int = 15,
    budget_s: float = 2.0,
    retries: int = RETRIES,
    onnx: bool | None = None,
    weights_paths: dict[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Measure ``models`` for deployment on ``test`` (a labelled split); a JSON-able dict.

    Per model (a CPU deep copy in eval mode; the originals are not touched): ``params``, ``size_bytes``
    (its safetensors file from ``weights_paths``, else a temporary :func:`~kdistill.io.save_model`),
    ``flops`` per sample (:func:`~kdistill.models.count_flops`: 2 per multiply-add), median
    ``latency_ms_{torch,onnx}_b{B}`` for each batch size B of ``latency_batches`` (at most
    ``repeats`` timed runs after warm-up; at most ``budget_s`` seconds per model for all its timings, times
    ``1 + retries`` when timings are unreliable and measured again),
    ``throughput_{torch,onnx}_sps`` (samples/s at the largest batch), test ``accuracy``, ``errors``,
    ``nll``, ``ece``, ``teacher_agreement`` and, relative to the ``teacher_name`` row, ``x_smaller``,
    ``x_fewer_flops``, ``x_faster_b{B}`` (torch latency) and ``accuracy_kept``. Whether the latencies can
    be trusted: ``latency_check`` (``"ok"`` or ``"unreliable: ..."``: other processes kept more than
    ``cores - torch threads + LOAD_MARGIN`` cores busy, or the IQR exceeded ``SPREAD_LIMIT`` of the median,
    in every one of ``1 + retries`` attempts), ``latency_spread_pct``, ``latency_repeats`` and per timing
    ``latency_stats`` (median, p10/p25/p75/p90, repeats, attempts, ``other_load``, ``loadavg_1m``).

    ``onnx``: None measures onnxruntime when it imports, True as well (a note says why when it cannot),
    False never. ``teacher_name=None`` leaves out the agreement and the ratios.
    """
    if not models:
        raise ValueError("deployment: no models to measure")
    if teacher_name is not None and teacher_name not in models:
        raise ValueError(f"deployment: teacher {teacher_name!r} is not one of the models {sorted(models)}; "
                         "pass teacher_name=None for a table without ratios")
    if len(test) == 0 or test.has_unlabelled:
        raise ValueError(f"deployment: {test.name} must be a non-empty, fully labelled split")
    batches = sorted({int(b) for b in latency_batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"deployment: latency_batches must be positive batch sizes, got {latency_batches}")
    in_shape = tuple(input_shape or test.input_shape)
    use_onnx = onnx is not False
    weights_paths = weights_paths or {}
    order = ([teacher_name] if teacher_name else []) + [n for n in models if n != teacher_name]
    rows: dict[str, dict[str, Any]] = {}
    teacher_logits = None
    for name in order:
        net = copy.deepcopy(models[name]).cpu().eval()
        rows[name], logits = _measure_model(
            net, test, in_shape, batches, repeats=repeats, budget_s=budget_s, onnx=use_onnx, retries=retries,
            teacher_logits=teacher_logits, weights_path=weights_paths.get(name))
        if name == teacher_name:
            teacher_logits = logits
            rows[name]["teacher_agreement"] = 1.0
    rows = {n: rows[n] for n in models}  # the caller's order
    if teacher_name is not None:
        add_ratios(rows, teacher_name, batches)
    return {
        "rows": rows,
        "teacher": teacher_name,
        "machine": machine_info(use_onnx),
        "settings": {"latency_batches": batches, "repeats": repeats, "budget_s": budget_s, "retries": retries,
                     "spread_limit": SPREAD_LIMIT, "load_margin": LOAD_MARGIN,
                     "input_shape": list(in_shape), "test": test.name, "test_count": len(test),
                     "onnx": use_onnx},
    }


# ------------------------------------------------------------------------------------------- rendering


def human(n: float | None, unit: str = "") -> str:
    """``1.28M``-style numbers (k, M, G) for parameter, FLOP and byte counts."""
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: "–" if v is None else f"{v:.{digits}f}"


def _times(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _check(v: Any) -> str:
    """``latency_check`` in a cell: ``ok`` or ``unreliable ⚠`` (the reason goes into the notes)."""
    return "–" if v is None else "ok" if v == "ok" else "unreliable ⚠"


def deployment_columns(table: dict[str, Any]) -> list[tuple[str, str, Callable[[Any], str]]]:
    """``(header, row key, formatter)`` of the columns present in ``table``; shared with the HTML report."""
    rows = table["rows"].values()
    present = {k for r in rows for k in r}
    batches = table.get("settings", {}).get("latency_batches") or sorted(
        int(k.rsplit("_b", 1)[1]) for k in present if k.startswith("latency_ms_torch_b"))
    cols: list[tuple[str, str, Callable[[Any], str]]] = [
        ("params", "params", human), ("size", "size_bytes", lambda v: human(v, "B")), ("FLOPs", "flops", human)]
    for backend in BACKENDS:
        cols += [(f"{backend} b{b} ms", f"latency_ms_{backend}_b{b}", _num(3)) for b in batches]
        cols.append((f"{backend} samples/s", f"throughput_{backend}_sps", lambda v: human(v)))
    cols += [("accuracy", "accuracy", _num(4)), ("NLL", "nll", _num(4)), ("ECE", "ece", _num(4)),
             ("agreement", "teacher_agreement", _num(4)), ("× smaller", "x_smaller", _times),
             ("× fewer FLOPs", "x_fewer_flops", _times)]
    cols += [(f"× faster b{b}", f"x_faster_b{b}", _times) for b in batches]
    cols.append(("accuracy kept", "accuracy_kept", _num(4)))
    cols += [("IQR %", "latency_spread_pct", _num(0)), ("repeats", "latency_repeats", lambda v: human(v)),
             ("timing", "latency_check", _check)]
    return [c for c in cols if c[1] in present]


def deployment_notes(table: dict[str, Any]) -> list[str]:
    """One line on where and how it was measured, plus the ONNX notes of rows without ONNX numbers."""
    m, s = table.get("machine", {}), table.get("settings", {})
    lines = [f"Measured on {m.get('processor', '?')} ({m.get('cpu_count', '?')} cores, "
             f"{m.get('torch_threads', '?')} torch threads), torch {m.get('torch', '?')}"
             + (f", onnxruntime {m['onnxruntime']}" if m.get("onnxruntime") else "")
             + f"; median of up to {s.get('repeats', '?')} runs after warm-up, at most "
             f"{s.get('budget_s', '?')} s per model; {s.get('test_count', '?')} test samples."]
    if "retries" in s:
        lines.append(f"IQR %: the widest interquartile range of a row's timings, as a percentage of its median. "
                     f"A timing is unreliable when other processes kept more than (cores - torch threads + "
                     f"{s.get('load_margin')}) cores busy, or its IQR exceeded {s.get('spread_limit', 0):.0%} of "
                     f"the median; it is measured again up to {s['retries']} times before it is marked.")
    if table.get("teacher"):
        lines.append(f"Ratios are relative to `{table['teacher']}` (× faster: torch latency).")
    lines += [f"`{n}`: {r['onnx_note']}" for n, r in table["rows"].items() if r.get("onnx_note")]
    lines += [f"`{n}`: latency {r['latency_check']}" for n, r in table["rows"].items()
              if str(r.get("latency_check", "ok")) != "ok"]
    return lines


def deployment_markdown(table: dict[str, Any]) -> str:
    """The table in Markdown: one row per model, one column per measured quantity, notes below."""
    cols = deployment_columns(table)
    lines = ["## Deployment (CPU)", "", "| model | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f(row.get(k)) for _, k, f in cols) + " |")
    lines += [""] + [f"- {n}" for n in deployment_notes(table)]
    return "\n".join(lines) + "\n"


def _replace_section(text: str, section: str) -> str:
    """``text`` with its deployment section (between the markers) replaced by ``section``, or appended."""
    block = f"{_MD_BEGIN}\n{section.rstrip()}\n{_MD_END}\n"
    start, end = text.find(_MD_BEGIN), text.find(_MD_END)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(_MD_END):].lstrip("\n")
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block


def write_deployment(out_dir: str | os.PathLike, table: dict[str, Any]) -> None:
    """Store ``table`` under ``deployment`` in ``results.json`` and its Markdown in ``results.md``.

    Both files are rewritten atomically; running it again replaces the earlier table instead of
    adding a second one. Missing files are created.
    """
    out = Path(out_dir)
    results_path, md_path = out / "results.json", out / "results.md"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["deployment"] = _jsonable(table)
    write_json(results_path, results)
    old = md_path.read_text() if md_path.is_file() else ""
    write_text(md_path, _replace_section(old, deployment_markdown(table)))


def _jsonable(obj: Any) -> Any:
    """``obj`` with int dict keys as strings and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
