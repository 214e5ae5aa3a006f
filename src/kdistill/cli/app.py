"""The ``kdistill`` command: train, distill, evaluate and run experiments.

``train`` and ``distill`` read an optional YAML config (sections ``data``, ``model``/``student``,
``teacher``, ``method``, ``train``), then command-line flags, then ``--set section.key=value`` overrides.
Every section is typed by :mod:`kdistill.config.schema` (values coerced or refused by type, unknown keys refused
naming the closest); the data, the model, the teacher and any checkpoint to resume are checked against each
other (:func:`kdistill.engine.loop.preflight`) before the resolved config is written to ``--out``, so a
refused run leaves nothing there. A new run refuses the directory of another run unless ``--overwrite``.
Every refusal is one line, ``kdistill: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kdistill import __version__
import kdistill.config.loader as config_mod
from kdistill.losses import LOSS_KINDS
from kdistill.config.types import short_repr
from kdistill.config.schema import normalize_sections
from kdistill.engine.rundir import check_config_file, no_checkpoint
from kdistill.engine.rundir import clear_run
from kdistill import data
from kdistill.data.text import evaluate_options
from kdistill.models.registry import build_on_meta
from kdistill.io import load_model
import kdistill.config.schema as schema
from kdistill.engine.config import check_device
from kdistill.engine.rundir import claim
from kdistill.engine import resolve_device
from kdistill.engine.distributed import init_from_env
from kdistill.engine.loop import preflight
from kdistill.engine.rundir import remove_stale_tmp
from kdistill.models import build_model
from kdistill.outputs.results import write_run_files
from kdistill.engine import fit
from kdistill.outputs.results import write_results
from kdistill.data.dataset import TensorData
from kdistill.outputs.deploy import deployment_table, write_deployment
from kdistill.teachers.base import ModuleTeacher
from kdistill.outputs.deploy import deployment_markdown
from kdistill.engine.evaluate import evaluate_model, predict_split
from kdistill.engine.loop import _check_outputs, check_inputs, check_teacher
from kdistill.config.types import check_number
from kdistill import experiments
import kdistill.cli as commands
from kdistill.engine.config import TrainConfig

DEFAULTS: dict[str, Any] = {
    "data": {"name": "mnist", "path": None, "val_size": None, "seed": 0},
    "train": {},
}
DATA_HELP = ("data set: mnist, fashion-mnist, cifar10, cifar100, digits, synthetic, or a file/folder: npz:FILE.npz "
             "(x_train, y_train, x_test, y_test[, x_val, y_val, classes]), csv:FILE.csv (feature columns + label), "
             "folder:DIR (DIR/train/CLASS/*.png, DIR/test/..., optional DIR/val/...)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with data/model/teacher/train sections")
    p.add_argument("--data", help=DATA_HELP + " (default: mnist)")
    p.add_argument("--data-path", help="directory holding the data set's files (tried before any download)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--jitter", type=int, help="random translation of up to this many pixels")
    p.add_argument("--augment", help="batched augmentation on the device, e.g. crop4,flip (teacher and student see the same view)")
    p.add_argument("--method", help="training method: ce (hard labels), kd, dkd, fitnet, at (default: ce for train, kd for "
                   "distill); its options with -T, --alpha or --set method.NAME=VALUE")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.weight_decay=5e-4")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are deleted)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard (pip install 'kdistill[tensorboard]')")
    p.add_argument("--no-progress", action="store_true")


def add_trust_code(p: argparse.ArgumentParser) -> None:
    """``--trust-code``: build a ``py:`` model spec recorded in a weights file (it imports and runs that code)."""
    p.add_argument("--trust-code", action="store_true",
                   help="run the Python code a weights file names (its py:FILE.py:FACTORY spec); without it such a "
                        "file is refused, as a weights file must not run code you did not choose")


def _resolve(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:

    loaded = normalize_sections(config_mod.load_yaml(args.config)) if args.config else {}
    for key in ("data", "method", "train"):  # a section that is not a mapping would be replaced by the flags'
        if loaded.get(key) is not None and not isinstance(loaded[key], dict):
            raise ValueError(f"{key}: must be a mapping of settings in {args.config}, got "
                             f"{type(loaded[key]).__name__} {short_repr(loaded[key])}")
    cfg = config_mod.merge(DEFAULTS, loaded)
    flags = {"data": {"name": args.data, "path": args.data_path}, "train": {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "optimizer": args.optimizer,
        "jitter": args.jitter, "augment": args.augment, "seed": args.seed, "device": args.device},
        "method": {"name": args.method}}
    flags = {sec: {k: v for k, v in vals.items() if v is not None} for sec, vals in flags.items()}
    cfg = config_mod.merge(cfg, {sec: vals for sec, vals in flags.items() if vals})
    cfg = config_mod.merge(cfg, {k: v for k, v in extra.items() if v is not None and v != {}})
    return config_mod.apply_overrides(cfg, args.set)


def _check_out(out: Path, resume: bool, overwrite: bool, config: str | None = None) -> None:
    """Refuse an ``--out`` that cannot hold this run, before any work: a file, a place we cannot write, nothing
    to resume, or ``--config`` pointing at the config.yaml the run would replace. What the directory holds is
    checked under its lock (:func:`kdistill.engine.rundir.claim`)."""
    import os

    if resume and overwrite:
        raise ValueError("--overwrite: --resume continues the run in --out, --overwrite replaces it; give one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a directory; give a directory for the run's files")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--out: {base} is a file, so {out} cannot be made a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot write to {base} (permission denied)")
    if resume and not (out / "checkpoint.safetensors").is_file():
        raise no_checkpoint(out)
    check_config_file(config, out)


def _clear_run(out: Path) -> None:
    """Delete a previous run's files (``--overwrite``); anything else in the directory stays."""

    clear_run(out)


def _discard(out: Path, existed: bool) -> None:
    """Undo a refused run: the directory if this run made it, else the files it wrote."""
    import shutil

    if not existed:
        shutil.rmtree(out, ignore_errors=True)
    else:
        _clear_run(out)


def _load_data(cfg: dict[str, Any]):

    d = dict(cfg["data"])
    name, path, val_size, seed = d.pop("name"), d.pop("path", None), d.pop("val_size", None), d.pop("seed", 0)
    if path is not None:
        d["path"] = path
    return data.load(name, val_size=val_size, seed=seed, **d)


def _check_size(spec: str, in_shape, num_classes: int) -> None:
    """Refuse a model this machine's memory cannot train (weights, gradients, optimiser state), counted on the
    meta device before anything is allocated."""
    import os

    skeleton = build_on_meta(spec, in_shape, num_classes)
    if skeleton is None:
        return
    n = sum(p.numel() for p in skeleton.parameters())
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    if 3 * 4 * n > ram:
        raise ValueError(f"model: {spec!r} has {n:,} parameters ({4 * n / 1e9:.1f} GB of float32 weights); training it "
                         f"needs about three times that, more than this machine's {ram / 1e9:.0f} GB of memory")


def _method_section(cfg: dict[str, Any], distill: bool) -> dict[str, Any]:
    """The ``method`` section with its name defaulted (KD with a teacher, else CE)."""
    m = cfg.get("method") or {}
    if isinstance(m, str):
        m = {"name": m}
    if not isinstance(m, dict):
        raise ValueError(f"method: a name or a mapping with name and options, not {type(m).__name__}")
    m = dict(m)
    m["name"] = m.get("name") or ("kd" if distill else "ce")
    return m


def _teacher_model(cfg: dict[str, Any], bundle):
    """``--teacher-model SPEC --teacher-weights FILE``: any registry/adapter model with weights from a file."""

    spec, weights = cfg.get("teacher_model"), cfg.get("teacher_weights")
    if bool(spec) != bool(weights):
        raise ValueError("--teacher-model and --teacher-weights go together: the spec builds the network, the file "
                         "fills it (kdistill or plain safetensors, or a torch.save state dict read with weights_only)")
    if str(weights).lower().endswith(".safetensors") and Path(weights).is_file():  # names it recorded: checked too
        from kdistill.teachers.resolve import _check_class_names
        from kdistill.io import read_model_meta

        _check_class_names(weights, read_model_meta(weights).get("class_names"), bundle.train)
    return load_model(weights, spec=spec, in_shape=bundle.input_shape, num_classes=bundle.train.num_classes)


def _train_like(args: argparse.Namespace, distill: bool) -> int:
    import os

    extra: dict[str, Any] = {"model": args.model}
    if distill:
        extra.update({"teacher": args.teacher, "teacher_logits": args.teacher_logits, "teacher_onnx": args.teacher_onnx,
                      "teacher_model": args.teacher_model, "teacher_weights": args.teacher_weights,
                      "ensemble_mean": args.ensemble_mean, "unlabelled": args.unlabelled or None,
                      "fraction": args.fraction, "method": {k: v for k, v in {
                          "temperature": args.temperature, "alpha": args.alpha, "kind": args.loss}.items() if v is not None}})
    # Every section typed by its schema (kdistill.config.schema) before any work: unknown keys, wrong types and
    # non-finite numbers are refused naming the field.
    cfg = schema.check_config(_resolve(args, extra), distill)
    cfg["method"] = schema.method_section(_method_section(cfg, distill))
    method = schema.build_method(cfg["method"])  # validates its options before any work
    if not cfg.get("model"):
        raise ValueError("model: give a model spec, e.g. --model mlp:800,800 (or `model:` in the config)")
    if distill and not any(cfg.get(k) for k in ("teacher", "teacher_logits", "teacher_onnx", "teacher_model")):
        raise ValueError("teacher: give --teacher WEIGHTS.safetensors (a model saved by `kdistill train`), "
                         "--teacher-model SPEC --teacher-weights FILE, --teacher-logits FILE or --teacher-onnx FILE; "
                         "several make an ensemble")
    if method.needs_teacher and not distill:
        raise ValueError(f"method: {method.name} distils from a teacher; use `kdistill distill` (train uses --method ce)")
    tcfg = schema.train_section(cfg.get("train", {}))  # validates before any work
    device = resolve_device(tcfg.device)
    check_device(device)
    if distill and cfg.get("unlabelled") and method.needs_labels:
        raise ValueError(f"method.alpha: --unlabelled drops the labels, so {method.name} must train on soft targets only "
                         f"(kd with alpha 1), got {method.extra_repr()}")
    out = Path(args.out)
    _check_out(out, args.resume, args.overwrite, args.config)
    existed = out.exists()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 writes, so only rank 0 holds the lock
        return _train_run(args, cfg, method, tcfg, device, distill, out, existed, None)
    # One run at a time in --out, from here to its end; what the directory holds is checked under the lock.
    with claim(out, args.resume, args.overwrite) as held:
        return _train_run(args, cfg, method, tcfg, device, distill, out, existed, held)


def _train_run(args: argparse.Namespace, cfg: dict[str, Any], method, tcfg, device, distill: bool, out: Path,
               existed: bool, held) -> int:
    """The run itself, once its settings are typed and ``out`` is locked: data, models and teacher checked
    against each other, then the files written and the model trained."""
    from dataclasses import asdict

    # Launched by torchrun with several processes: data-parallel training, NCCL on GPUs, gloo on CPUs.
    rank = init_from_env(cuda=device.type == "cuda")
    bundle = _load_data(cfg)
    train = bundle.train
    teacher = None
    if distill:
        from kdistill.teachers.resolve import resolve_teacher
        from kdistill.data import drop_labels

        if cfg.get("fraction") is not None:
            from kdistill.data import stratified_fraction

            train = stratified_fraction(train, cfg["fraction"], cfg["data"].get("seed", 0))
        augmented = int(not tcfg.augmentation().is_identity or tcfg.teacher_views > 0)
        from kdistill.teachers.resolve import check_teacher_files

        check_teacher_files(cfg, train)  # a teacher trained on other normalisation is refused, naming the fix
        if cfg.get("teacher_model"):
            if any(cfg.get(k) for k in ("teacher", "teacher_logits", "teacher_onnx")):
                raise ValueError("--teacher-model: give one teacher network this way, or several with --teacher")
            teacher = _teacher_model(cfg, bundle)
        else:
            teacher = resolve_teacher(cfg, train, augmented, getattr(method, "temperature", 1.0),  # checked against the data
                                      trust_code=args.trust_code)
        train = drop_labels(train) if cfg.get("unlabelled") else train
    _check_size(cfg["model"], bundle.input_shape, bundle.train.num_classes)
    model = build_model(cfg["model"], bundle.input_shape, bundle.train.num_classes, seed=tcfg.seed)
    # Data, student, teacher and (with --resume) the checkpoint checked against each other: nothing is written
    # for a run that cannot start.
    preflight(model, train, tcfg, teacher=teacher, method=method, val=bundle.val, test=bundle.test,
              resume_from=out / "checkpoint.safetensors" if args.resume else None)

    cfg["train"] = asdict(tcfg)  # the resolved config: every default written out
    cfg["method"] = {"name": method.name, **method.options()}
    t0 = time.perf_counter()
    try:
        if rank == 0:
            if held is not None:
                held.record()  # the lock file names this run from now on
            if args.overwrite:
                _clear_run(out)
            remove_stale_tmp(out)
            try:
                write_run_files(out, cfg, tcfg.seed)  # only once every input has been validated
            except OSError as exc:
                raise ValueError(f"--out: cannot write the run's files to {out} ({exc.strerror or exc})") from None
        callbacks = []
        if args.tensorboard and rank == 0:
            from kdistill.engine.callbacks import TensorBoard

            callbacks.append(TensorBoard([out]))
        result = fit(model, train, tcfg, teacher=teacher, method=method, val=bundle.val, test=bundle.test, out_dir=out,
                     resume=args.resume, progress=not args.no_progress, callbacks=callbacks)
    except Exception:
        if rank == 0 and not args.resume and not (out / "checkpoint.safetensors").exists():
            _discard(out, existed)  # refused before training: leave nothing half written
        raise

    if rank != 0:
        return 0
    role = "distilled" if distill else "model"
    write_results(out, "distill" if distill else "train", "cli", time.perf_counter() - t0,
                  {role: {"test_errors": result.test["errors"], "test_accuracy": result.test["accuracy"],
                          "test_nll": result.test["nll"], "spec": cfg["model"], "method": method.name}})
    if distill:
        _deployment(out, teacher, model, bundle.test)
    print(json.dumps({"test_errors": result.test["errors"], "test_accuracy": result.test["accuracy"], "out": str(out)}))
    return 0


def _deployment(out: Path, teacher, student, test) -> None:
    """Teacher and student side by side (size, FLOPs, latency, accuracy kept) in results.json / results.md."""
    from torch import nn

    net = teacher.module if isinstance(teacher, ModuleTeacher) else teacher
    if not isinstance(test, TensorData):  # streamed: the table reads the test split once, into memory
        import torch

        from kdistill.data.stream import iterate

        parts = list(iterate(test, 512))
        test = TensorData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test.classes,
                          torch.cat([p[2] for p in parts]), name=test.name)
    models = {"teacher": net, "student": student} if isinstance(net, nn.Module) else {"student": student}
    table = deployment_table(models, test, teacher_name="teacher" if "teacher" in models else None, budget_s=1.0)
    write_deployment(out, table)

    print(deployment_markdown(table))


def _evaluate(args: argparse.Namespace) -> int:

    if not Path(args.model).is_file():
        raise FileNotFoundError(f"--model: no file {args.model}")
    d = _run_data(args)
    options = {k: v for k, v in d.items() if k not in ("name", "val_size", "seed") and v is not None}
    options = evaluate_options(d["name"], options, args.model)  # a text model keeps its own tokenizer
    bundle = data.load(d["name"], val_size=d.get("val_size"), seed=d.get("seed") or 0, **options)
    split = {"test": bundle.test, "val": bundle.val, "train": bundle.train}[args.split]
    if split is None:
        raise ValueError("--split val: this data set was loaded without a validation split")
    import torch

    if not 0 < check_number(args.temperature, "--temperature") <= 1e4:
        raise ValueError(f"--temperature: must be in (0, 1e4], got {args.temperature}")
    check_inputs(split, args.split)
    model = load_model(args.model, trust_code=args.trust_code)
    _check_outputs(model, split, next(iter(model.parameters()), torch.empty(0)).device)
    teacher = None
    if args.teacher:
        if not Path(args.teacher).is_file():
            raise FileNotFoundError(f"--teacher: no file {args.teacher}")
        teacher = load_model(args.teacher, trust_code=args.trust_code)
        check_teacher(teacher, split)
    teacher_logits = predict_split(teacher, split) if teacher is not None else None
    metrics = evaluate_model(model, split, teacher_logits, args.temperature)
    print(json.dumps(metrics if args.full else {k: v for k, v in metrics.items() if k != "confusion"}, indent=2))
    return 0


def _run_data(args: argparse.Namespace) -> dict[str, Any]:
    """The data section ``evaluate`` uses: the flags, else the run's own (``config.yaml`` beside the model)."""
    run_cfg = Path(args.model).parent / "config.yaml"
    d: dict[str, Any] = {}
    if run_cfg.is_file():
        d = dict((config_mod.load_yaml(run_cfg).get("data") or {}))
    if args.data:  # other data, fed as the model was trained: its run's data.normalize stays
        d = {"name": args.data, **{k: d[k] for k in ("normalize",) if d.get(k) is not None}}
    elif not d:
        why = "its config.yaml names no data (a run of fit() on your own Dataset)" if run_cfg.is_file() \
            else "it has no config.yaml beside it to say its data"
        raise ValueError(f"--data: {args.model}: {why}; give --data NAME")
    if args.data_path:
        d["path"] = args.data_path
    if args.val_size is not None:
        d["val_size"] = args.val_size
    if args.seed is not None:
        d["seed"] = args.seed
    return d


def _run(args: argparse.Namespace) -> int:

    if args.list or not args.experiment:
        for name, desc in experiments.describe():
            print(f"{name:18s} {desc}")
        return 0
    results = experiments.run_experiment(args.experiment, args.profile, args.out, args.set, args.data_path,
                                         progress=not args.no_progress, resume=args.resume)
    out = Path(args.out or f"runs/{args.experiment}-{args.profile}")
    print((out / "results.md").read_text())
    print(f"wall time: {results['wall_time_s']:.1f} s; results in {out}/results.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdistill", description="Knowledge distillation for PyTorch.")
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
    p.add_argument("--teacher-model", help="teacher network spec (cnn:32,64, resnet56, tv:resnet18, timm:NAME, "
                   "py:FILE.py:FACTORY), filled from --teacher-weights")
    p.add_argument("--teacher-weights", help="weights for --teacher-model: kdistill or plain safetensors, or a torch.save "
                   "state dict (read with weights_only=True)")
    p.add_argument("--ensemble-mean", choices=["arithmetic", "geometric"],
                   help="with several teachers (any of the three flags, repeated): how to average their distributions")
    p.add_argument("--unlabelled", action="store_true", help="drop the transfer set's labels (needs alpha = 1)")
    p.add_argument("--fraction", type=float, help="keep a stratified share of the transfer set (seeded by data.seed)")
    p.add_argument("--temperature", "-T", type=float)
    p.add_argument("--alpha", type=float, help="soft-target weight in [0, 1]; 1 - alpha goes to the hard labels")
    p.add_argument("--loss", choices=list(LOSS_KINDS), help="the soft term's kind (kdistill.losses.divergences)")
    add_trust_code(p)
    _add_common(p)
    p.set_defaults(func=lambda a: _train_like(a, distill=True))

    p = sub.add_parser("evaluate", help="metrics of a saved model on a split")
    p.add_argument("--model", required=True, help="weights (.safetensors) saved by train/distill or the API")
    p.add_argument("--data", help=DATA_HELP + " (default: the data of the run that wrote --model, from its config.yaml)")
    p.add_argument("--data-path")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--val-size", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the validation split (default: the run's, else 0)")
    p.add_argument("--teacher", help="teacher weights, for KL and agreement")
    p.add_argument("--temperature", "-T", type=float, default=1.0)
    p.add_argument("--full", action="store_true", help="include the confusion matrix")
    add_trust_code(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("run", help="run a named experiment (see --list)")
    p.add_argument("experiment", nargs="?")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--profile", default="quick")
    p.add_argument("--out")
    p.add_argument("--data-path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out that stopped part-way (same profile and --set values); models "
                        "it finished are kept (cifar10-kd, cifar100-kd, cifar10-mini)")
    p.set_defaults(func=_run)

    # Further commands live in kdistill/cli/*.py, each with `register(subparsers)`.
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_") and info.name != "app":
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    _document(sub)
    return parser


# Help for flags whose meaning is a config field: (text, where the default lives).
FLAG_HELP: dict[str, str] = {
    "epochs": "training epochs", "lr": "base learning rate (the schedule multiplies it)",
    "batch_size": "global batch size (split across torchrun processes)", "optimizer": "optimiser",
    "seed": "seed of initialisation, batch order and augmentation", "temperature": "softmax temperature T of the method",
    "loss": "KD's soft term (method.kind)", "data_path": "directory holding the data set's files (tried before any download)",
    "split": "which split to use", "val_size": "validation split carved from train (count, or fraction below 1)",
    "profile": "the experiment's profile (see run --list)", "out": "output directory",
    "set": "override, e.g. train.weight_decay=5e-4 or method.beta=8 (repeatable)", "experiment": "experiment name (see --list)",
    "data_seed": "seed of the validation split, as distill's data.seed", "momentum": "SGD momentum",
    "schedule": "learning-rate schedule", "data": "data set name or npz:/csv:/folder: source",
    "no_progress": "no progress bar",
}
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("Train a model on the hard labels (a teacher, or a baseline student).",
              "kdistill train --data folder:my_images --model resnet20 --augment crop4,flip --epochs 30 --out runs/teacher"),
    "distill": ("Train a student from a teacher: KD, DKD, FitNets or AT, on any data; writes the deployment table.",
                "kdistill distill --data folder:my_images --teacher runs/teacher/model.safetensors --student resnet8 "
                "--method kd -T 4 --alpha 0.9 --augment crop4,flip --epochs 30 --out runs/student"),
    "evaluate": ("Metrics of a saved model on a split (its run's data by default).",
                 "kdistill evaluate --model runs/student/model.safetensors --teacher runs/teacher/model.safetensors"),
    "run": ("Run one of the paper experiments with a profile; writes results.json, results.md and report.html.",
            "kdistill run hinton-mnist --profile quick --out runs/hinton-mnist-quick"),
}


def _train_default(dest: str):

    return getattr(TrainConfig(), dest, None)


def _document(sub: argparse._SubParsersAction) -> None:
    """Every flag gets a help text that shows its default; every subcommand a description and an example."""
    for name, p in sub.choices.items():
        desc, example = SUBCOMMANDS.get(name, (None, None))
        if desc:
            p.description = desc
        if example:
            p.epilog = f"example: {example}"
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = action.help or FLAG_HELP.get(action.dest) or action.dest.replace("_", " ")
            if "default" not in text:
                if isinstance(action, argparse._StoreTrueAction):
                    default = "off"
                elif action.required:
                    default = "required"
                elif action.default not in (None, [], argparse.SUPPRESS):
                    default = action.default
                elif name in ("train", "distill") and _train_default(action.dest) is not None:
                    default = _train_default(action.dest)
                else:
                    default = "none"
                text = f"{text} (default: {default})"
            action.help = text.replace("%", "%%") if "%(" not in text else text


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other refusal: ``kdistill: error: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"kdistill: error: {message} (see {self.prog} --help)\n")


def error_line(exc: BaseException) -> str:
    """An exception as the one line the CLI prints (multi-line messages joined)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _interrupted(args: argparse.Namespace) -> str:
    """The one line for Ctrl-C: how to go on from what the run kept (checkpoints are written atomically, so
    the last one is whole)."""
    out = getattr(args, "out", None)
    if out and getattr(args, "resume", None) is not None:
        if args.command in ("train", "distill") and not (Path(out) / "checkpoint.safetensors").is_file():
            return f"interrupted before the first checkpoint; run the same command again to start over in {out}"
        return f"interrupted; resume with --resume (the same command with --resume continues {out})"
    return "interrupted"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line shows it: one line, ``kdistill: warning: ...``, no source path."""
    return f"kdistill: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    args = build_parser().parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("KDISTILL_DEBUG"):
            raise
        print(f"kdistill: {_interrupted(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
    except (ValueError, OSError, ImportError) as exc:
        if os.environ.get("KDISTILL_DEBUG"):
            raise
        print(f"kdistill: error: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
