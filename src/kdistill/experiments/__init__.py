"""Experiments: each is one module composing the library the way its paper paragraph describes.

An experiment module in this package defines ``NAME``, ``DESCRIPTION`` (one line), ``PROFILES``
(profile name -> settings dict) and ``run(settings, ctx) -> dict`` returning the ``results.json``
object. Modules are discovered by scanning the package, so adding an experiment is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import config as config_mod
from ..report import write_run_files



def _discover() -> dict[str, str]:
    """Experiment name -> module path, for every module of this package that defines ``NAME``."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found[module.NAME] = module.__name__
    return found


EXPERIMENTS: dict[str, str] = {}


@dataclass
class RunContext:
    """What an experiment needs besides its settings: where to write, and where data lives."""

    out: Path
    profile: str
    data_path: str | None = None
    progress: bool = True
    started: float = field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f}s] {msg}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deployment(self, models: dict[str, Any], test, results: dict[str, Any], budget_s: float = 2.0) -> dict[str, Any]:
        """Add the deployment table (teacher first: size, FLOPs, CPU latency, accuracy kept) to the run's
        results.json and results.md; return the updated results."""
        from ..deploy import deployment_table, write_deployment

        table = deployment_table(models, test, teacher_name=next(iter(models)), budget_s=budget_s)
        write_deployment(self.out, table)
        return {**results, "deployment": table}


def get(name: str) -> ModuleType:
    if not EXPERIMENTS:
        EXPERIMENTS.update(_discover())
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown {name!r}; `kdistill run --list` shows {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


RESULTS_DIR = Path(__file__).resolve().parents[3] / "results"
"""The repository's committed records (absent in an installed wheel): where measured wall times come from."""


def measured_time(name: str, profile: str) -> str:
    """The wall time of the committed record ``results/NAME-PROFILE`` (or of a GPU run of it), if any."""
    import json

    for suffix in ("", "-h100"):
        path = RESULTS_DIR / f"{name}-{profile}{suffix}" / "results.json"
        if path.is_file():
            try:
                wall = json.loads(path.read_text()).get("wall_time_s")
            except ValueError:
                continue
            if isinstance(wall, (int, float)):
                where = "H100" if suffix else "2-core CPU"
                return f"{wall / 60:.1f} min ({where})" if wall >= 90 else f"{wall:.0f} s ({where})"
    return "not run yet"


def describe() -> list[tuple[str, str]]:
    """(name, description with each profile and its measured wall time on the reference machine)."""
    if not EXPERIMENTS:
        EXPERIMENTS.update(_discover())
    out = []
    for name in EXPERIMENTS:
        module = get(name)
        profiles = ", ".join(f"{p}: {measured_time(name, p)}" for p in module.PROFILES)
        out.append((name, f"{module.DESCRIPTION}\n{'':19s}profiles: {profiles}"))
    return out


def run_experiment(
    name: str,
    profile: str = "quick",
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    data_path: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Resolve ``name``'s profile with ``overrides``, record it, run it and return its results."""
    module = get(name)
    if profile not in module.PROFILES:
        raise ValueError(f"profile: {name} has profiles {sorted(module.PROFILES)}, not {profile!r}")
    settings = config_mod.apply_overrides(module.PROFILES[profile], overrides)
    unknown = set(settings) - set(module.PROFILES[profile])
    if unknown:
        raise ValueError(f"--set: {name} has no setting(s) {sorted(unknown)}; it has {sorted(module.PROFILES[profile])}")
    out_dir = Path(out or f"runs/{name}-{profile}")
    ctx = RunContext(out=out_dir, profile=profile, data_path=data_path, progress=progress)
    write_run_files(out_dir, {"experiment": name, "profile": profile, "settings": settings}, settings.get("seed"))
    results = module.run(settings, ctx)
    from ..html_report import write_report

    write_report([out_dir])  # report.html beside results.json: tables, curves, plots, config, environment
    return results
