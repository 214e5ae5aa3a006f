"""``kdistill train`` and ``kdistill distill``: a model trained on hard labels, or a student on a teacher's soft
targets; data, models, teacher and any checkpoint checked against each other before ``--out`` is written."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import kdistill.config.schema as schema
from kdistill.cli._common import _add_common, _check_out, _clear_run, _discard, _load_data, _resolve, add_trust_code
from kdistill.data import drop_labels, stratified_fraction
from kdistill.data.dataset import TensorData
from kdistill.data.stream import iterate
from kdistill.engine import fit, resolve_device
from kdistill.engine.callbacks import TensorBoard
from kdistill.engine.config import check_device
from kdistill.engine.distributed import init_from_env
from kdistill.engine.loop import preflight
from kdistill.engine.rundir import claim, remove_stale_tmp
from kdistill.io import load_model, read_model_meta
from kdistill.losses import LOSS_KINDS
from kdistill.models import build_model
from kdistill.models.registry import build_on_meta
from kdistill.outputs.deploy import deployment_markdown, deployment_table, write_deployment
from kdistill.outputs.results import write_results, write_run_files
from kdistill.teachers.base import ModuleTeacher
from kdistill.teachers.resolve import _check_class_names, check_teacher_files, resolve_teacher, teacher_data_options


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
    if distill:
        cfg["data"] = teacher_data_options(cfg)  # text data: the teacher's own tokenizer unless one is named
    bundle = _load_data(cfg)
    train = bundle.train
    teacher = None
    if distill:

        if cfg.get("fraction") is not None:

            train = stratified_fraction(train, cfg["fraction"], cfg["data"].get("seed", 0))
        augmented = int(not tcfg.augmentation().is_identity or tcfg.teacher_views > 0)

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

        parts = list(iterate(test, 512))
        test = TensorData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test.classes,
                          torch.cat([p[2] for p in parts]), name=test.name)
    models = {"teacher": net, "student": student} if isinstance(net, nn.Module) else {"student": student}
    table = deployment_table(models, test, teacher_name="teacher" if "teacher" in models else None, budget_s=1.0)
    write_deployment(out, table)

    print(deployment_markdown(table))


def register(sub: argparse._SubParsersAction) -> None:
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
