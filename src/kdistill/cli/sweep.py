"""``kdistill sweep``: many students of one architecture trained together against one teacher.

The grid is the product of ``--temperatures``, ``--alphas``, ``--lrs``, ``--weight-decays`` and
``--seeds``; every other training setting is shared. All students go through
:func:`kdistill.sweeps.multi.fit_many` in one pass (stacked when the student is an MLP without dropout),
and each equals the same student trained alone by ``kdistill distill`` with the same settings.
``results.json`` has one role per student plus, under ``by_setting``, each setting's test and
validation errors over the seeds (mean ± std) and the setting with the fewest validation errors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any
from kdistill.losses import LOSS_KINDS
import kdistill.config.loader as config_mod
from kdistill.config.schema import build_method, method_section
from kdistill.engine import TrainConfig
from kdistill import data
from kdistill.io import load_model
from kdistill.models import build_model
from kdistill.sweeps.multi import check_configs, fit_many
from kdistill.outputs.results import fmt, summarize, write_results, write_run_files
from kdistill.cli._common import add_trust_code

GRID = (("temperature", "temperatures"), ("alpha", "alphas"), ("lr", "lrs"), ("weight_decay", "weight_decays"),
        ("seed", "seeds"))
METHOD_AXES = ("temperature", "alpha")
"""Grid axes that are KD's options rather than training settings."""
SHORT = {"temperature": "T", "alpha": "a", "lr": "lr", "weight_decay": "wd", "seed": "seed"}


def _resolve(args: argparse.Namespace) -> dict[str, Any]:

    cfg: dict[str, Any] = config_mod.load_yaml(args.config) if args.config else {}
    flags = {
        "data": {"name": args.data, "path": args.data_path, "val_size": args.val_size, "seed": args.data_seed},
        "student": args.student,
        "teacher": args.teacher,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
                  "jitter": args.jitter, "momentum": args.momentum, "schedule": args.schedule,
                  "device": args.device},
        "grid": {key: getattr(args, flag) for key, flag in GRID},
        "method": {"kind": args.loss},
    }
    defaults = {"data": {"name": "mnist", "path": None, "val_size": None, "seed": 0}, "train": {}, "grid": {}}
    cfg = config_mod.merge(defaults, cfg)
    for section, values in flags.items():
        if isinstance(values, dict):
            cfg = config_mod.merge(cfg, {section: {k: v for k, v in values.items() if v is not None}})
        elif values is not None:
            cfg[section] = values
    return config_mod.apply_overrides(cfg, args.set)


def build_grid(cfg: dict[str, Any]):
    """(role, TrainConfig, swept values, method) per student of the grid; raises ValueError on bad settings.
    Temperature and alpha are KD's options: each student's method gets them (``method.kind`` for all)."""

    grid = dict(cfg.get("grid") or {})
    unknown = set(grid) - {k for k, _ in GRID}
    if unknown:
        raise ValueError(f"grid: unknown key(s) {sorted(unknown)}; sweepable: {[k for k, _ in GRID]}")
    distill = bool(cfg.get("teacher"))
    if not distill and any(grid.get(k) for k in ("temperature", "alpha")):
        raise ValueError("--temperatures/--alphas: need a --teacher; without one the sweep is supervised training")
    shared = dict(cfg.get("train") or {})
    kd_options = {k: v for k, v in (cfg.get("method") or {}).items() if v is not None and k != "name"}
    for key, _ in GRID:
        if key in shared and grid.get(key):
            raise ValueError(f"train.{key}: set both as a shared value and as a sweep list; give it once")
    axes = {key: [shared.pop(key)] if key in shared else list(grid.get(key) or []) for key, _ in GRID}
    defaults = {"temperature": [1.0], "alpha": [1.0], "lr": [TrainConfig.lr], "weight_decay": [0.0], "seed": [0]}
    for key, values in axes.items():
        if not isinstance(values, list):
            raise ValueError(f"grid.{key}: must be a list of values, got {values!r}")  # noqa: TRY004
        if len(set(map(str, values))) != len(values):
            raise ValueError(f"grid.{key}: repeated values in {values}")
        axes[key] = values or defaults[key]
    if not distill:
        axes["temperature"], axes["alpha"] = [1.0], [1.0]
    swept = [k for k, _ in GRID if len(axes[k]) > 1] or ["seed"]
    students = []
    for combo in itertools.product(*(axes[k] for k, _ in GRID)):
        values = dict(zip((k for k, _ in GRID), combo))
        train = {k: v for k, v in values.items() if k not in METHOD_AXES}
        tcfg = TrainConfig.from_dict({**shared, **train})  # validates every value before any work
        method = build_method(method_section({"name": "kd", **kd_options, "temperature": values["temperature"],
                                               "alpha": values["alpha"]})) if distill else build_method("ce")
        role = "-".join(f"{SHORT[k]}{values[k]}" for k in swept)
        students.append((role, tcfg, values, method))
    return students, swept


def _sweep(args: argparse.Namespace) -> int:

    cfg = _resolve(args)
    if not cfg.get("student"):
        raise ValueError("student: give a model spec, e.g. --student mlp:800,800")
    students, swept = build_grid(cfg)
    check_configs([s[1] for s in students])
    teacher_path = cfg.get("teacher")
    if teacher_path and not Path(teacher_path).is_file():
        raise FileNotFoundError(f"--teacher: no file {teacher_path}")
    d = dict(cfg["data"])
    options = {"path": d["path"]} if d.get("path") else {}
    bundle = data.load(d["name"], val_size=d.get("val_size"), seed=d.get("seed", 0), **options)
    teacher = load_model(teacher_path, trust_code=args.trust_code) if teacher_path else None
    models = [build_model(cfg["student"], bundle.input_shape, bundle.train.num_classes, seed=s[1].seed) for s in students]
    out = Path(args.out)
    write_run_files(out, cfg, None)  # only once every input has been validated
    t0 = time.perf_counter()
    results = fit_many(models, bundle.train, [s[1] for s in students], teacher=teacher,
                       methods=[s[3] for s in students], val=bundle.val,
                       test=bundle.test, out_dir=out / "students" if args.save_models else None,
                       names=[s[0] for s in students], progress=not args.no_progress)
    wall = time.perf_counter() - t0

    roles: dict[str, dict[str, Any]] = {}
    settings: dict[str, list[tuple[dict, Any]]] = {}
    for (role, _, values, _), r in zip(students, results):
        roles[role] = {"test_errors": r.test["errors"], "test_accuracy": r.test["accuracy"], "test_nll": r.test["nll"],
                       "spec": cfg["student"], **values}
        if r.val is not None:
            roles[role].update({"val_errors": r.val["errors"], "val_accuracy": r.val["accuracy"]})
        setting = "-".join(f"{SHORT[k]}{values[k]}" for k in swept if k != "seed") or "all"
        settings.setdefault(setting, []).append((roles[role], values))
    by_setting = {
        name: {key: summarize([m[key] for m, _ in rows]) for key in ("test_errors", "val_errors") if key in rows[0][0]}
        for name, rows in settings.items()
    }
    have_val = bundle.val is not None
    best = min(by_setting, key=lambda k: by_setting[k]["val_errors"]["mean"]) if have_val else None
    lines = ["| setting | validation errors | test errors |", "|---|---|---|"]
    for name, m in by_setting.items():
        mark = " (best on validation)" if name == best else ""
        lines.append(f"| {name}{mark} | {fmt(m.get('val_errors', '-'))} | {fmt(m['test_errors'])} |")
    first = students[0][1]
    md = (
        f"Student `{cfg['student']}`, teacher `{teacher_path or 'none (supervised)'}`, data {d['name']}; "
        f"{len(students)} students trained in one pass ({wall:.1f} s), {first.epochs} epochs, batch {first.batch_size}, "
        f"{first.optimizer}, jitter {first.jitter}. Swept: {', '.join(swept)}.\n\n"
        "Per setting, over seeds (choose on validation, not test):\n\n" + "\n".join(lines)
    )
    write_results(out, "sweep", "cli", wall, roles, md,
                  extra={"swept": swept, "by_setting": by_setting, "best_by_validation": best})
    print(json.dumps({"students": len(students), "best_by_validation": best, "wall_time_s": round(wall, 2), "out": str(out)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train a grid of students (temperatures, alphas, lrs, seeds) in one pass")
    p.add_argument("--config", help="YAML with data/student/teacher/train/grid sections")
    p.add_argument("--data", help="data set name (mnist, fashion-mnist, digits, synthetic)")
    p.add_argument("--data-path", help="directory holding the data set's files")
    p.add_argument("--val-size", type=float, help="validation split size (default: the data set's own)")
    p.add_argument("--data-seed", type=int, help="seed of the validation split (default 0)")
    p.add_argument("--student", help="student model spec, e.g. mlp:800,800 (one architecture for all)")
    p.add_argument("--teacher", help="teacher weights (.safetensors written by `kdistill train`); omit for supervised")
    p.add_argument("--temperatures", "-T", type=float, nargs="+", help="softmax temperatures to sweep")
    p.add_argument("--alphas", type=float, nargs="+", help="soft-target weights in [0, 1] to sweep")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates to sweep")
    p.add_argument("--weight-decays", type=float, nargs="+", help="weight decays to sweep")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (initialisation and data order) to sweep")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "onecycle", "step"])
    p.add_argument("--jitter", type=int, help="random translation of up to this many pixels (shared per seed)")
    p.add_argument("--loss", choices=list(LOSS_KINDS), help="the soft term's kind (kdistill.losses.divergences)")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.warmup=0.2")
    p.add_argument("--save-models", action="store_true", help="write each student's weights and metrics under OUT/students/")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")

    add_trust_code(p)
    p.set_defaults(func=_sweep)
