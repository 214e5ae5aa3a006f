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

import yaml

import kdistill.config.loader as config_mod
from kdistill.experiments._progress import Progress
from kdistill.outputs.deploy import deployment_table, write_deployment
from kdistill.outputs.html import write_report
from kdistill.outputs.results import write_run_files


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
    resume: bool = False  # take units an earlier attempt in ``out`` finished (see :mod:`._progress`)
    _store: Progress | None = field(default=None, repr=False)

    @property
    def store(self) -> Progress:
        """Finished units of this run under ``out/progress`` (emptied at first use unless resuming)."""
        if self._store is None:
            self._store = Progress(self.out / "progress", resume=self.resume)
        return self._store

    def unit(self, key: str, record: dict[str, Any], model=None) -> None:
        """Keep one finished unit (its record, and ``model``'s weights when a later step needs them)."""
        self.store.save(key, record, model, elapsed_s=self.elapsed)

    def log(self, msg: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f}s] {msg}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deployment(self, models: dict[str, Any], test, results: dict[str, Any], budget_s: float = 2.0) -> dict[str, Any]:
        """Add the deployment table (teacher first: size, FLOPs, CPU latency, accuracy kept) to the run's
        results.json and results.md; return the updated results."""

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
    """The wall time of the committed record ``results/NAME/PROFILE`` (or of a GPU run of it), if any."""
    import json

    for suffix in ("", "-h100"):
        path = RESULTS_DIR / name / f"{profile}{suffix}" / "results.json"
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
    resume: bool = False,
) -> dict[str, Any]:
    """Resolve ``name``'s profile with ``overrides``, record it, run it and return its results.

    ``resume``: continue the run in ``out`` that stopped part-way, with the same settings; the units it
    finished are taken from ``out/progress`` (experiments that store units: see :mod:`._progress`)."""
    module = get(name)
    if profile not in module.PROFILES:
        raise ValueError(f"profile: {name} has profiles {sorted(module.PROFILES)}, not {profile!r}")
    settings = config_mod.apply_overrides(module.PROFILES[profile], overrides)
    unknown = set(settings) - set(module.PROFILES[profile])
    if unknown:
        raise ValueError(f"--set: {name} has no setting(s) {sorted(unknown)}; it has {sorted(module.PROFILES[profile])}")
    out_dir = Path(out or f"runs/{name}-{profile}")
    resolved = {"experiment": name, "profile": profile, "settings": settings}
    if resume:
        check_resumable(out_dir, resolved)
    ctx = RunContext(out=out_dir, profile=profile, data_path=data_path, progress=progress, resume=resume)
    if resume:
        ctx.started -= ctx.store.prior_s  # wall time counts the earlier attempt up to its last finished unit
    write_run_files(out_dir, resolved, settings.get("seed"))
    results = module.run(settings, ctx)

    write_report([out_dir])  # report.html beside results.json: tables, curves, plots, config, environment
    return results


def check_resumable(out_dir: Path, resolved: dict[str, Any]) -> None:
    """ValueError unless ``out_dir`` holds a run of the same experiment, profile and settings."""
    path = out_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--resume: {out_dir} holds no run to continue (no config.yaml); run without --resume")
    before = config_mod.load_yaml(path)
    if before != yaml.safe_load(config_mod.dump(resolved)):
        old, new = before.get("settings", {}), resolved["settings"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = f"settings {keys}" if keys else "experiment/profile"
        raise ValueError(f"--resume: the run in {out_dir} has different {what}; resume with the same --profile and "
                         "--set values, or choose a new --out")
