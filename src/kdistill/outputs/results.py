"""Run outputs: resolved config, environment, ``results.json`` (a stable contract) and ``results.md``.

``results.json`` is ``{"experiment", "profile", "wall_time_s", "models": {ROLE: {METRIC: value}}}``;
a metric measured over several seeds is ``{"mean", "std", "values"}``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import kdistill.config.loader as config_mod
from kdistill.io import atomic_path, environment, write_json, write_text


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "values": vals,
    }


def role_metrics(runs: list[dict[str, Any]], keys: tuple[str, ...] = ("errors", "accuracy", "nll")) -> dict[str, Any]:
    """Per-role test metrics from one or more runs' test dicts, summarised when there are several."""
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[f"test_{k}"] = vals[0] if len(vals) == 1 else summarize(vals)
    out["seeds"] = len(runs)
    return out


def fmt(value: Any, digits: int = 2) -> str:
    """``mean ± std (n)`` for summaries, the plain value otherwise."""
    if isinstance(value, dict) and "mean" in value:
        d = digits if abs(value["mean"]) >= 1 else 4
        return f"{value['mean']:.{d}f} ± {value['std']:.{d}f} (n={len(value['values'])})"
    if isinstance(value, float):
        return f"{value:.{digits if abs(value) >= 1 else 4}f}"
    return str(value)


def write_run_files(out: Path, resolved: dict[str, Any], seed: int | None = None) -> None:
    """Resolved config and environment (versions, machine, seed) next to the run's outputs."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", config_mod.dump(resolved))
    write_json(out / "environment.json", {**environment(), "seed": seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it (works headless: Agg backend). matplotlib is
    imported here, not at the top: training imports this module, and matplotlib's import costs 0.7 s and
    unsettles glibc's heap enough to break the freed-memory reuse of :mod:`kdistill.engine.heap`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_results(
    out: Path,
    experiment: str,
    profile: str,
    wall_time_s: float,
    models: dict[str, dict[str, Any]],
    markdown: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``results.json`` and ``results.md``; return the JSON object."""
    results = {"experiment": experiment, "profile": profile, "wall_time_s": round(wall_time_s, 2), "models": models}
    if extra:
        results.update(extra)
    write_json(out / "results.json", results)
    metrics = sorted({k for m in models.values() for k in m if k.startswith("test_")})
    lines = [f"# {experiment} ({profile} profile)", "", f"Wall time: {wall_time_s:.1f} s", ""]
    lines += ["| role | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for role, m in models.items():
        lines.append(f"| {role} | " + " | ".join(fmt(m.get(k, "")) for k in metrics) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n\n" + markdown.strip() + "\n")
    return results
