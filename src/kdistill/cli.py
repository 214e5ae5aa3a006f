"""The ``kdistill`` command: train, distill, evaluate and run experiments.

``train`` and ``distill`` read an optional YAML config (sections ``data``, ``model``/``student``,
``teacher``, ``train``), then command-line flags, then ``--set section.key=value`` overrides; the
resolved config is written to ``--out`` before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from . import config as config_mod

DEFAULTS: dict[str, Any] = {
    "data": {"name": "mnist", "path": None, "val_size": None, "seed": 0},
    "train": {},
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with data/model/teacher/train sections")
    p.add_argument("--data", help="data set name (mnist, fashion-mnist, digits, synthetic)")
    p.add_argument("--data-path", help="directory holding the data set's files (tried before any download)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--jitter", type=int, help="random translation of up to this many pixels")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.weight_decay=5e-4")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--no-progress", action="store_true")


def _resolve(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    cfg = config_mod.merge(DEFAULTS, config_mod.load_yaml(args.config) if args.config else {})
    flags = {"data": {"name": args.data, "path": args.data_path}, "train": {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "optimizer": args.optimizer,
        "jitter": args.jitter, "seed": args.seed, "device": args.device}}
    flags = {sec: {k: v for k, v in vals.items() if v is not None} for sec, vals in flags.items()}
    cfg = config_mod.merge(cfg, flags)
    cfg = config_mod.merge(cfg, {k: v for k, v in extra.items() if v is not None})
    return config_mod.apply_overrides(cfg, args.set)


def _load_data(cfg: dict[str, Any]):
    from . import data

    d = dict(cfg["data"])
    name, path, val_size, seed = d.pop("name"), d.pop("path", None), d.pop("val_size", None), d.pop("seed", 0)
    if path is not None:
        d["path"] = path
    return data.load(name, val_size=val_size, seed=seed, **d)


def _train_like(args: argparse.Namespace, distill: bool) -> int:
    from .distributed import init_from_env
    from .report import write_run_files
    from .train import TrainConfig, fit, resolve_device
    from .models import build_model

    extra: dict[str, Any] = {"model": args.model}
    if distill:
        extra.update({"teacher": args.teacher, "teacher_logits": args.teacher_logits, "teacher_onnx": args.teacher_onnx,
                      "ensemble_mean": args.ensemble_mean, "unlabelled": args.unlabelled or None,
                      "fraction": args.fraction, "train": {k: v for k, v in {
                          "temperature": args.temperature, "alpha": args.alpha, "loss": args.loss}.items() if v is not None}})
    cfg = _resolve(args, extra)
    if not cfg.get("model"):
        raise ValueError("model: give a model spec, e.g. --model mlp:800,800 (or `model:` in the config)")
    if distill and not any(cfg.get(k) for k in ("teacher", "teacher_logits", "teacher_onnx")):
        raise ValueError("teacher: give --teacher WEIGHTS.safetensors (a model saved by `kdistill train`), "
                         "--teacher-logits FILE or --teacher-onnx FILE; several make an ensemble")
    tcfg = TrainConfig.from_dict(cfg.get("train", {}))  # validates before any work
    # Launched by torchrun with several processes: data-parallel training, NCCL on GPUs, gloo on CPUs.
    rank = init_from_env(cuda=resolve_device(tcfg.device).type == "cuda")
    if distill and cfg.get("unlabelled") and tcfg.alpha < 1:
        raise ValueError(f"alpha: --unlabelled drops the labels, so alpha must be 1 (soft targets only), got {tcfg.alpha}")
    if distill and cfg.get("fraction") is not None and not 0 < cfg["fraction"] <= 1:
        raise ValueError(f"fraction: the share of the transfer set to keep must be in (0, 1], got {cfg['fraction']}")
    out = Path(args.out)
    if args.resume and not (out / "checkpoint.safetensors").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    bundle = _load_data(cfg)
    train = bundle.train
    teacher = None
    if distill:
        from .blackbox import resolve_teacher
        from .data import drop_labels

        if cfg.get("fraction") is not None:
            from .data import stratified_fraction

            train = stratified_fraction(train, cfg["fraction"], cfg["data"].get("seed", 0))
        teacher = resolve_teacher(cfg, train, tcfg.jitter, tcfg.temperature)  # files checked against the data here
        train = drop_labels(train) if cfg.get("unlabelled") else train
    model = build_model(cfg["model"], bundle.input_shape, bundle.train.num_classes, seed=tcfg.seed)
    if rank == 0:
        write_run_files(out, cfg, tcfg.seed)  # only once every input has been validated
    t0 = time.perf_counter()
    result = fit(model, train, tcfg, teacher=teacher, val=bundle.val, test=bundle.test, out_dir=out,
                 resume=args.resume, progress=not args.no_progress)
    from .report import write_results

    if rank != 0:
        return 0
    role = "distilled" if distill else "model"
    write_results(out, "distill" if distill else "train", "cli", time.perf_counter() - t0,
                  {role: {"test_errors": result.test["errors"], "test_accuracy": result.test["accuracy"],
                          "test_nll": result.test["nll"], "spec": cfg["model"]}})
    print(json.dumps({"test_errors": result.test["errors"], "test_accuracy": result.test["accuracy"], "out": str(out)}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import data
    from .evaluate import evaluate_model, predict_logits
    from .io import load_model

    bundle = data.load(args.data, val_size=args.val_size, seed=args.seed, **({"path": args.data_path} if args.data_path else {}))
    split = {"test": bundle.test, "val": bundle.val, "train": bundle.train}[args.split]
    if split is None:
        raise ValueError("--split val: this data set was loaded without a validation split")
    model = load_model(args.model)
    teacher_logits = predict_logits(load_model(args.teacher), split.x) if args.teacher else None
    metrics = evaluate_model(model, split, teacher_logits, args.temperature)
    print(json.dumps(metrics if args.full else {k: v for k, v in metrics.items() if k != "confusion"}, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import experiments

    if args.list or not args.experiment:
        for name, desc in experiments.describe():
            print(f"{name:18s} {desc}")
        return 0
    results = experiments.run_experiment(args.experiment, args.profile, args.out, args.set, args.data_path,
                                         progress=not args.no_progress)
    out = Path(args.out or f"runs/{args.experiment}-{args.profile}")
    print((out / "results.md").read_text())
    print(f"wall time: {results['wall_time_s']:.1f} s; results in {out}/results.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on hard labels")
    p.add_argument("--model", help="model spec, e.g. mlp:1200,1200,dropout=0.5 or cnn:32,64")
    _add_common(p)
    p.set_defaults(func=lambda a: _train_like(a, distill=False))

    p = sub.add_parser("distill", help="train a student on a teacher's soft targets")
    p.add_argument("--model", "--student", dest="model", help="student model spec, e.g. mlp:800,800")
    p.add_argument("--teacher", action="append", help="teacher weights (.safetensors written by `kdistill train`)")
    p.add_argument("--teacher-logits", action="append", help="black-box teacher: logits file from `kdistill predict`")
    p.add_argument("--teacher-onnx", action="append", help="black-box teacher: an ONNX model run with onnxruntime")
    p.add_argument("--ensemble-mean", choices=["arithmetic", "geometric"],
                   help="with several teachers (any of the three flags, repeated): how to average their distributions")
    p.add_argument("--unlabelled", action="store_true", help="drop the transfer set's labels (needs alpha = 1)")
    p.add_argument("--fraction", type=float, help="keep a stratified share of the transfer set (seeded by data.seed)")
    p.add_argument("--temperature", "-T", type=float)
    p.add_argument("--alpha", type=float, help="soft-target weight in [0, 1]; 1 - alpha goes to the hard labels")
    p.add_argument("--loss", choices=["kl", "soft_ce", "logit_mse", "prob_mse"])
    _add_common(p)
    p.set_defaults(func=lambda a: _train_like(a, distill=True))

    p = sub.add_parser("evaluate", help="metrics of a saved model on a split")
    p.add_argument("--model", required=True, help="weights (.safetensors)")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-path")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--val-size", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", help="teacher weights, for KL and agreement")
    p.add_argument("--temperature", "-T", type=float, default=1.0)
    p.add_argument("--full", action="store_true", help="include the confusion matrix")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("run", help="run a named experiment (see --list)")
    p.add_argument("experiment", nargs="?")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--profile", default="quick")
    p.add_argument("--out")
    p.add_argument("--data-path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)

    # Further commands live in kdistill/commands/*.py, each with `register(subparsers)`.
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kdistill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
