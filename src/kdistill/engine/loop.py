"""The training loop: one for supervised training, distillation with any method, and stacked sweeps.

:func:`run_epochs` is the loop itself: for each epoch, each step draws one batch per seed group from its
source, sets the schedule's learning rate and asks the backend to step; at the end of the epoch it reads
the loss terms, evaluates and calls the callbacks (keep-best and the checkpoint among them). :func:`fit` composes it for one
model: data, method and teacher checked before any work, then batches from memory or disk, the autograd
step, checkpoints and keep-best, and the result.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.config.schema import build_method as build_typed
from kdistill.data.convert import IGNORE_LABEL, as_split, labels_copy_inputs
from kdistill.data.splits import check_same_classes
from kdistill.data.stream import describe_inputs, inputs_to, integer_hint, labels_of
from kdistill.data.text import save_run_tokenizer
from kdistill.engine.callbacks import (
    Callback,
    KeepBest,
    LoopState,
    MetricsFiles,
    ProgressBar,
    final_results,
    save_models,
)
from kdistill.engine.config import FitResult, TrainConfig, check_device
from kdistill.engine.denormal import flushed_denormals
from kdistill.engine.distributed import process_device, world
from kdistill.engine.evaluate import classification_metrics
from kdistill.engine.heap import retain_freed_memory
from kdistill.engine.optim import lr_factor, resolve_device
from kdistill.engine.rundir import API, claim, no_checkpoint
from kdistill.engine.rundir import remove_stale_tmp as _remove_stale_tmp
from kdistill.engine.sources import make_source
from kdistill.engine.step import StudentStep, _first_inputs, _layout
from kdistill.io import (
    data_fingerprint,
    legacy_data_fingerprint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    teacher_fingerprint,
)
from kdistill.methods import Method, build_method
from kdistill.models.hf import lm_vocabulary
from kdistill.models.layout import use_channels_last
from kdistill.models.outputs import forward_logits
from kdistill.outputs.results import write_results, write_run_files
from kdistill.teachers.base import ModuleTeacher, vocabulary_mismatch
from kdistill.teachers.teaching import prepare_teaching, teacher_classes

RESUME_IGNORED = ("device", "amp", "compile", "cuda_graph", "flush_denormal", "workers", "checkpoint", "cache_teacher",
                  "eval_every_steps")
"""Config fields a resumed run may change: they decide where and how fast it runs, not what it computes."""


def run_epochs(backend, streams: Sequence[tuple[Any, torch.Generator]], cfg: TrainConfig, state: LoopState,
               evaluate: Callable[[float, list[dict[str, float]] | None], list[dict[str, Any]]],
               callbacks: Sequence[Callback]) -> None:
    """Train from ``state.epoch`` to ``cfg.epochs`` (or until a callback sets ``state.stop``); ``evaluate``
    gives one row per student, ``callbacks`` see them in order."""
    retain_freed_memory()  # each step reuses the last step's freed buffers instead of faulting in fresh pages
    with flushed_denormals(cfg.flush_denormal):  # subnormal gradients would slow the later epochs' steps
        _epochs(backend, streams, cfg, state, evaluate, callbacks)


def _epochs(backend, streams, cfg: TrainConfig, state: LoopState, evaluate, callbacks: Sequence[Callback]) -> None:
    steps = state.steps_per_epoch
    total = state.total_steps
    step_cbs = [c for c in callbacks if c.every_steps]
    for epoch in range(state.epoch, cfg.epochs):
        iters = [iter(source.epoch(gen)) for source, gen in streams]
        for i in range(steps):
            batches = [next(it) for it in iters]
            backend.step(batches, lr_factor(cfg.schedule, state.step, total, cfg.warmup, cfg.decay_points()), epoch + i / steps)
            state.step += 1
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                rows = evaluate(state.step / steps, None)
                for s, row in enumerate(rows):
                    for c in callbacks:
                        c.on_eval(state, s, row)
            for c in step_cbs:
                if state.step % c.every_steps == 0:
                    c.on_step(state)
        state.epoch = epoch + 1
        rows = evaluate(epoch + 1, backend.take_losses(steps))
        for h, row in zip(state.histories, rows):
            h.append(row)
        for s, row in enumerate(rows):
            for c in callbacks:
                c.on_eval(state, s, row)
        for c in callbacks:
            c.on_epoch_end(state, rows)
        if state.stop:
            break


class _OnEval(Callback):
    """The ``on_eval(row)`` function of :func:`fit`'s signature, as a callback."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_eval(self, state, student, row) -> None:
        self.fn(row)


def resolve_method(method, teacher, cfg: TrainConfig):
    """The method a run uses: the one given (a name, a ``{"name": ..., **options}`` dict or a Method), else KD
    with its defaults (T = 1, alpha = 1) with a teacher, else plain cross-entropy."""

    if method is None:
        if teacher is None:
            return build_method("ce")
        return build_method("kd")
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return build_method(method)
    if isinstance(method, dict):

        if not method.get("name"):
            raise ValueError("method.name: say which method, e.g. {'name': 'kd', 'temperature': 4}")
        return build_typed(method)  # options typed by the method's schema (kdistill.config.schema)
    raise ValueError(f"method: give a name, a dict with 'name' and options, or a Method, not {type(method).__name__}")


INPUT_LIMIT = 1e10
"""Largest input magnitude accepted: beyond it products and squares overflow float32 within a few layers."""


def check_data(train, name: str = "train", num_classes: int | None = None) -> None:
    """At least two classes, labels in range, and finite inputs of sane magnitude, before anything is trained
    (in-memory splits fully; streamed ones by their listed labels)."""
    labels = train.y if hasattr(train, "y") else train.labels
    classes = train.num_classes if num_classes is None else num_classes
    if train.num_classes < 2:
        raise ValueError(f"data: {train.name} has {train.num_classes} class(es); classification needs at least 2")
    if labels is not None and per_position(train):
        labels = labels[labels != IGNORE_LABEL]  # padding / unscored positions
    if labels is not None and len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= classes:
            raise ValueError(f"data: {name} labels must be in 0..{classes - 1} (or -1 for unlabelled), "
                             f"found {lo if lo < -1 else hi}")
    check_inputs(train, name)


def per_position(split) -> bool:
    """Whether ``split`` has per-position labels ((N, L), -100 = not scored): see :mod:`kdistill.losses`."""
    return bool(getattr(split, "per_position", False))


def position_shape(split) -> tuple[int, ...]:
    """One sample's positions ((L,), (H, W)) of per-position data; () for one label per sample."""
    return tuple(getattr(split, "positions", ()) or ()) if per_position(split) else ()


def _logits_fit(out, train) -> bool:
    """Whether a dry forward's ``out`` is one logit per class: (1, C), or (1, *positions, C) for per-position
    data ((1, L, C) for tokens, (1, H, W, C) for pixels)."""
    if not isinstance(out, torch.Tensor) or out.shape[-1:] != (train.num_classes,):
        return False
    positions = position_shape(train)
    return out.dim() == 2 + len(positions) and tuple(out.shape[1:-1]) == positions


def classes_first_hint(out, train) -> str:
    """The fix for a network that puts the classes second ((N, C, H, W), segmentation style), else ''."""
    positions = position_shape(train)
    if isinstance(out, torch.Tensor) and positions and out.dim() == 2 + len(positions) \
            and out.shape[1] == train.num_classes and tuple(out.shape[2:]) == positions:
        return ("; its classes come second (segmentation style): wrap it as kdistill.models.ClassesLast(model), "
                "which moves them last as kdistill's per-position logits have them")
    return ""


def check_inputs(split, name: str = "train") -> None:
    """Refuse NaN, infinite or absurdly large inputs (in-memory splits; one pass, no temporary copies)."""
    x = getattr(split, "x", None)
    if x is None or not x.numel() or not x.is_floating_point():
        return
    lo, hi = torch.aminmax(x)  # NaN propagates into both
    lo, hi = float(lo), float(hi)
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= INPUT_LIMIT:
        return
    flat = x.reshape(len(x), -1)
    bad = (~torch.isfinite(flat)).any(1)
    what = "NaN or infinite values"
    if not bool(bad.any()):
        bad, what = (flat.abs() > INPUT_LIMIT).any(1), f"values beyond {INPUT_LIMIT:g} in magnitude"
    rows = bad.nonzero().flatten()
    ids = split.index[rows.to(split.index.device)][:5].tolist()
    raise ValueError(f"data: {name} inputs (x) of {split.name} hold {what} in {len(rows)} of {len(x)} samples "
                     f"(e.g. ids {ids}); clean or standardise the data")


def check_teacher(teacher, train, dry_run: bool = True) -> None:
    """A dry forward of a teacher network on one training sample: one logit per class, finite, or a
    ValueError naming the teacher, before any file is written (files and ONNX models are checked on reading).
    ``dry_run=False`` checks only what is known without running it (its declared class count, a causal LM's
    vocabulary)."""

    if teacher is None:
        return
    members = getattr(teacher, "members", None)
    if members is not None:
        for m in members:
            check_teacher(m, train, dry_run)
        return
    net = teacher.module if isinstance(teacher, ModuleTeacher) else teacher
    if not isinstance(net, nn.Module) or not dry_run:
        n = getattr(teacher, "num_classes", None)
        if n is None and isinstance(net, nn.Module) and per_position(train):
            n = lm_vocabulary(net)  # a causal LM's vocabulary is known without running it
        if isinstance(n, int) and n != train.num_classes:
            if per_position(train):
                raise ValueError(vocabulary_mismatch(n, train))
            raise ValueError(f"teacher: outputs {n} classes but {train.name} has {train.num_classes}")
        return

    x = _first_inputs(type("S", (), {"data": train})(), 1)
    try:
        param = next(net.parameters())
        x = inputs_to(x, param.device)
    except StopIteration:
        pass
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = forward_logits(net, _layout(x, use_channels_last(net)))
    except Exception as exc:  # noqa: BLE001 - the teacher's failure, named for the user
        raise ValueError(f"teacher: {getattr(net, 'spec', type(net).__name__)} cannot run on {train.name}'s inputs "
                         f"shaped {describe_inputs(x)}: {type(exc).__name__}: {str(exc)[:200]}{integer_hint(x)}") from None
    finally:
        net.train(was)
    if not _logits_fit(out, train):
        vocab = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() > 2 else train.num_classes
        if per_position(train) and vocab != train.num_classes:
            raise ValueError(vocabulary_mismatch(vocab, train))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = classes_first_hint(out, train) or "; give a teacher trained on this data"
        raise ValueError(f"teacher: {getattr(net, 'spec', type(net).__name__)} outputs {shape} for one sample, but "
                         f"{train.name} has {train.num_classes} classes{hint}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"teacher: {getattr(net, 'spec', type(net).__name__)} outputs NaN or infinite logits; "
                         "its weights are broken (a diverged run?)")


def check_augmentation(cfg: TrainConfig, train) -> None:
    """Crops and flips need images, and a crop cannot translate by a whole image."""
    aug = cfg.augmentation()
    if aug.is_identity:
        return
    field = "train.jitter" if cfg.jitter else "train.augment"
    shape = tuple(train.input_shape)
    if len(shape) != 3:
        raise ValueError(f"{field}: {cfg.augment or f'jitter {cfg.jitter}'} needs images (C, H, W), but {train.name} "
                         f"has samples shaped {shape}; leave augmentation out for this data")
    pixels = int(getattr(aug, "crop", 0) or 0)
    if pixels and pixels >= min(shape[1:]):
        raise ValueError(f"{field}: a crop translating by up to {pixels} pixels would move {train.name}'s "
                         f"{shape[1]}x{shape[2]} images out of view; use fewer pixels than the image side")


def method_record(method) -> dict[str, Any]:
    """The method's name and options as a checkpoint stores them (JSON round trip)."""
    return json.loads(json.dumps({"name": method.name, **method.options()}, default=str))


def preflight(model: nn.Module, train, cfg: TrainConfig, *, teacher=None, method=None, val=None, test=None,
              resume_from: Path | None = None, dry_run_teacher: bool = True) -> None:
    """Everything checkable before any work or file: the device, every split's labels and inputs, a dry
    forward of the student and the teacher, and (``resume_from``) that the checkpoint is this run's.
    :func:`fit` runs it (without the teacher's dry forward: callers may count its calls); the CLI runs it
    before it writes the run's files."""
    device = resolve_device(cfg.device)
    check_device(device)
    check_data(train)
    for split, name in ((val, "val"), (test, "test")):
        if split is not None:
            check_data(split, name, num_classes=train.num_classes)
            check_same_classes(train, split, name)
    check_augmentation(cfg, train)
    if next(iter(model.parameters()), None) is None:  # else the optimizer's "empty parameter list", after files
        raise ValueError(f"model: {getattr(model, 'spec', type(model).__name__)} has no parameters, so there is "
                         "nothing to train; give the student layers with weights (e.g. nn.Linear, or mlp:64)")
    if not any(p.requires_grad for p in model.parameters()):  # else autograd's "does not require grad" mid-step
        raise ValueError(f"model: every parameter of {getattr(model, 'spec', type(model).__name__)} has "
                         "requires_grad=False, so there is nothing to train; unfreeze the layers to train "
                         "(p.requires_grad_(True))")
    _check_outputs(model, train, next(iter(model.parameters()), torch.empty(0)).device)
    check_teacher(teacher, train, dry_run=dry_run_teacher)
    check_shared_parameters(model, teacher)
    if resume_from is not None:
        check_resume(resume_from, cfg, method_record(method) if method is not None else None,
                     getattr(model, "spec", None), data_fingerprint(train), teacher_fingerprint(teacher), train)


def _networks(teacher) -> list[nn.Module]:
    """The networks inside a teacher (itself, a ModuleTeacher's module, an ensemble's members)."""

    if teacher is None:
        return []
    if isinstance(teacher, ModuleTeacher):
        return [teacher.module]
    if isinstance(teacher, nn.Module):
        return [teacher]
    return [net for m in getattr(teacher, "members", None) or [] for net in _networks(m)]


def check_shared_parameters(model: nn.Module, teacher) -> None:
    """Refuse a teacher that shares a parameter with the student (the teacher is frozen for the run, so the
    student's copy would never train) or a buffer (the student's training would rewrite the teacher's)."""
    for net in _networks(teacher):
        mine = {id(p): name for name, p in net.named_parameters(remove_duplicate=False)}
        shared = [(name, mine[id(p)]) for name, p in model.named_parameters(remove_duplicate=False) if id(p) in mine]
        buffers = {id(b): name for name, b in net.named_buffers(remove_duplicate=False)}
        tied = [(name, buffers[id(b)]) for name, b in model.named_buffers(remove_duplicate=False) if id(b) in buffers]
        if tied and not shared:  # a shared BatchNorm statistic: training the student would rewrite the teacher's
            raise ValueError(f"teacher: shares the buffer {tied[0][1]} with the student's {tied[0][0]}; training the "
                             "student would change the frozen teacher's statistics; give the teacher its own copy "
                             "(copy.deepcopy(teacher))")
        if shared:
            (s_name, t_name), more = shared[0], f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            module = s_name.rsplit(".", 1)[0] if "." in s_name else s_name
            raise ValueError(f"teacher: shares parameters with the student (the student's {s_name} is the teacher's "
                             f"{t_name}{more}, in module {module!r}); the teacher is frozen for the run, so the student's "
                             "shared layers would never train; give the teacher its own copy (copy.deepcopy(teacher))")


def remove_stale_tmp(out: Path) -> list[Path]:
    """Delete the temporary files a killed run left behind (:func:`kdistill.engine.rundir.remove_stale_tmp`)."""
    return _remove_stale_tmp(out)


def _check_outputs(model: nn.Module, train, device: torch.device) -> None:
    """A dry forward of one sample: catches a model whose outputs do not match the classes, or that cannot
    take these inputs, before any file is written."""

    x = inputs_to(_first_inputs(type("S", (), {"data": train})(), 1), device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward_logits(model, _layout(x, use_channels_last(model)))
    except Exception as exc:  # noqa: BLE001 - any failure here is the model's, named for the user
        raise ValueError(f"model: {getattr(model, 'spec', type(model).__name__)} cannot run on inputs shaped "
                         f"{describe_inputs(x)}: {type(exc).__name__}: {exc}{integer_hint(x)}") from None
    finally:
        model.train(was)
    if not _logits_fit(out, train):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = classes_first_hint(out, train) or "; build it with num_classes equal to the data's"
        positions = position_shape(train)
        where = f" at each of {positions} positions" if positions else ""
        raise ValueError(f"model: outputs {shape} for one sample, but {train.name} has {train.num_classes} "
                         f"classes{where}{hint}")


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _method_diffs(was: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The method's changed options, each named (``method.temperature``), or the method itself."""
    if was.get("name") != now.get("name"):
        return [("method", was.get("name"), now.get("name"))]
    return [(f"method.{k}", was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]


def _teacher_count(record: dict[str, Any] | None) -> int | None:
    """How many teachers a :func:`~kdistill.io.teacher_fingerprint` describes; None when it does not say (cached
    logits recorded before the count was)."""
    if record is None:
        return 0
    if "members" in record:
        return len(record["members"])
    return record.get("teachers", None if record.get("kind") == "logits" else 1)


def _check_teacher_count(was: dict[str, Any] | None, now: dict[str, Any] | None, ckpt: Path) -> None:
    """Refuse resuming with another number of teachers, saying both counts plainly."""
    n_was, n_now = _teacher_count(was), _teacher_count(now)
    if n_was is not None and n_now is not None and n_was != n_now and n_was and n_now:
        raise ValueError(f"--resume: {ckpt} was made with {n_was} teacher{'s' * (n_was != 1)}, this run gives "
                         f"{n_now}; resume with the same teachers, or start a new run (--overwrite)")


def _teacher_diffs(was: dict[str, Any] | None, now: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """How the teacher differs from the checkpoint's: another kind, spec or file, or other weights/logits."""
    if now is not None and was is not None and "teachers" not in was:  # recorded before the count was
        now = {k: v for k, v in now.items() if k != "teachers"}
    if was is None or was == now:
        return []
    if now is None:
        return [("teacher", was.get("spec") or was.get("kind"), "no teacher")]
    for key in ("kind", "spec", "file", "mean", "temperature"):
        if was.get(key) != now.get(key):
            return [(f"teacher ({key})", was.get(key), now.get(key))]
    what = {"network": "weights", "logits": "logits"}.get(str(was.get("kind")), "contents")
    return [(f"teacher ({what})", f"sha256 {str(was.get('sha256'))[:16]}", f"sha256 {str(now.get('sha256'))[:16]}")]


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, method_opts: dict[str, Any] | None, ckpt: Path,
                  spec: str | None = None, fingerprint: str | None = None, teacher: dict[str, Any] | None = None,
                  train=None) -> None:
    """Refuse to resume a checkpoint made with another config, method, model, data or teacher, naming what
    differs."""
    now = asdict(cfg)
    was_cfg = saved.get("config", {})
    diffs: list[tuple[str, Any, Any]] = [(f"train.{k}", was_cfg[k], now[k]) for k in now
                                         if k not in RESUME_IGNORED and k in was_cfg and was_cfg[k] != now[k]]
    if method_opts is not None and "method" in saved and saved["method"] != method_opts:
        diffs += _method_diffs(saved["method"], method_opts)
    saved_spec = saved.get("model") or saved.get("spec")
    if spec is not None and saved_spec is not None and saved_spec != spec:
        diffs.append(("model", saved_spec, spec))
    was_data = saved.get("data")
    if was_data is not None and len(str(was_data)) == 32 and train is not None:  # written before full hashing
        fingerprint = legacy_data_fingerprint(train)
    if fingerprint is not None and was_data is not None and was_data != fingerprint:
        diffs.append(("data", f"fingerprint {str(was_data)[:16]}", f"fingerprint {fingerprint[:16]} (other samples, "
                      "labels, input values or files)"))
    if "teacher" in saved:
        _check_teacher_count(saved["teacher"], teacher, ckpt)
        diffs += _teacher_diffs(saved["teacher"], teacher)
    if diffs:
        what, was, got = diffs[0]
        more = f" (also differs: {[d[0] for d in diffs[1:]]})" if len(diffs) > 1 else ""
        raise ValueError(f"--resume: {ckpt} was trained with another {what} ({was!r}, now {got!r}); resume with "
                         f"the same settings or start a new run{more}")


def check_resume(ckpt: Path, cfg: TrainConfig, method_opts: dict[str, Any] | None, spec: str | None,
                 fingerprint: str | None, teacher: dict[str, Any] | None = None, train=None) -> None:
    """:func:`_check_resume` against the state recorded in ``ckpt``'s header (no tensor is read)."""

    if not Path(ckpt).is_file():
        raise no_checkpoint(Path(ckpt).parent)
    _check_resume(read_checkpoint_state(ckpt), cfg, method_opts, Path(ckpt), spec, fingerprint, teacher, train)


def fit(
    model: nn.Module,
    train,
    config: TrainConfig | None = None,
    *,
    teacher=None,
    method=None,
    val=None,
    test=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
) -> FitResult:
    """Train ``model`` on ``train`` with ``method`` (distilling from ``teacher`` if given); return history and metrics.

    ``train``/``val``/``test``: a TensorData, ``(x, y)`` arrays or tensors, or any map-style ``Dataset``
    (streamed through a ``DataLoader``). ``method``: a name (``"kd"``), ``{"name": "dkd", "beta": 8}``, or a
    :class:`~kdistill.methods.Method`; default KD (T = 1, alpha = 1) with a teacher.
    With ``out_dir``, every epoch rewrites ``metrics.jsonl``/``metrics.csv`` and ``checkpoint.safetensors``
    (model, optimiser, method extras, keep-best state, RNG states); ``resume=True`` continues exactly, and
    refuses a checkpoint of other settings, data or teacher. ``out_dir`` is locked for the run (a second run
    into it is refused) and must be new, empty or a run killed before its first checkpoint; a finished or
    unfinished run, or files kdistill did not write, need ``overwrite=True`` (which deletes only kdistill's
    own files) or ``resume=True`` (:mod:`kdistill.engine.rundir`).
    Inside a process group the global batch is split between the processes (:mod:`kdistill.engine.distributed`).
    The teacher module passed in is handed back as it was given (mode and ``requires_grad``).
    """
    cfg = as_config(config)
    train, val, test = as_splits(train, val, test)
    method = resolve_method(method, teacher, cfg)
    check_positions(method, train, val, test)
    check_device(resolve_device(cfg.device))
    rank, n_proc = world()
    if cfg.batch_size % n_proc:
        raise ValueError(f"train.batch_size: {cfg.batch_size} does not split evenly between {n_proc} processes; "
                         f"use a multiple of {n_proc}")
    if len(train) == 0:
        raise ValueError(f"data: {train.name} is empty")
    device = process_device(resolve_device(cfg.device), n_proc)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    aug = cfg.augmentation()
    out = Path(out_dir) if out_dir else None
    write = out is not None and rank == 0  # every process reads a checkpoint; only rank 0 writes
    ckpt = out / "checkpoint.safetensors" if out else None
    check_resume_request(out, ckpt, resume, overwrite)
    # Before any work: data, model, teacher and (on resume) that the checkpoint is this run's.
    preflight(model, train, cfg, teacher=teacher, method=method, val=val, test=test,
              resume_from=ckpt if resume else None, dry_run_teacher=False)
    teacher_id = teacher_fingerprint(teacher) if write else None  # the checkpoint records it for --resume
    held = claim(out, resume, overwrite, API) if write else None  # one run at a time in out_dir
    teaching = backend = source = None
    try:
        if held is not None:
            held.prepare(resume, overwrite)  # stale temporary files gone; overwrite / a killed run's config cleared
        retain_freed_memory()  # from here, not only from the first step: caching the teacher's views reuses buffers
        cache_path = Path(cfg.teacher_cache) if cfg.teacher_cache else (out / "teacher_views.safetensors" if write else None)
        teaching = _make_teaching(teacher, train, cfg, method, aug, device, cache_path)
        _bind_method(method, model, teaching, train, cfg)
        val_teacher = teaching.teacher.predict(val) if val is not None and teaching.live else None
        source = make_source(train, device, cfg.batch_size, aug, cfg.teacher_views, cfg.seed, rank, n_proc, cfg.workers)
        backend = _single_backend(model, method, teaching, source, aug, cfg, device, n_proc)
        return _train(backend, model, method, train, val, test, val_teacher, source, gen, cfg, out, write, ckpt,
                      resume, progress, on_eval, callbacks, rank, teacher_id)
    finally:
        if backend is not None:
            backend.close()
        if source is not None and hasattr(source, "close"):
            source.close()  # a streamed source's persistent DataLoader workers
        if teaching is not None:
            teaching.release()
        if held is not None:
            held.release()


def _make_teaching(teacher, train, cfg: TrainConfig, method, aug, device: torch.device, cache_path: Path | None):
    """The teacher made ready (:func:`~kdistill.teachers.teaching.prepare_teaching`); a teacher that cannot run
    on the data is one clear error."""
    try:
        return prepare_teaching(teacher, train, cfg, method, aug, device, cache_path)
    except (RuntimeError, TypeError, IndexError) as exc:  # the teacher could not run on this data
        raise ValueError(f"teacher: cannot run on {train.name}'s inputs shaped {tuple(train.input_shape)}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _bind_method(method, model: nn.Module, teaching, train, cfg: TrainConfig) -> None:
    """The method checked against the teacher and data it will see, then bound to the student and teacher."""
    if teaching.live:  # one dry forward: a teacher with other classes fails here, not at the first step
        check_teacher(teaching.teacher, train)
    method.validate(num_classes=train.num_classes, teacher_classes=teacher_classes(teaching.teacher),
                    has_unlabelled=train.has_unlabelled)
    if method.needs_teacher and teaching.teacher is None:
        raise ValueError(f"method: {method.name} distils from a teacher; give one (--teacher ...) or use --method ce")
    method.bind(model, teaching.module)
    method.check_schedule(cfg.epochs)  # a warm-up as long as the run warns, naming the option


def as_config(config) -> TrainConfig:
    """``fit``'s config: a TrainConfig, a mapping of its fields (typed like a YAML ``train:`` section) or None."""
    cfg = config or TrainConfig()
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config: give a TrainConfig, a mapping of its fields, or None, not {type(cfg).__name__}")
    cfg.validate()
    return cfg


def as_splits(train, val, test):
    """The three splits as kdistill splits; validation and test must carry the training split's classes."""
    train = as_split(train, name="train")
    val = None if val is None else as_split(val, classes=train.classes, name="val")
    test = None if test is None else as_split(test, classes=train.classes, name="test")
    return train, val, test


def check_resume_request(out: Path | None, ckpt: Path | None, resume: bool, overwrite: bool) -> None:
    """``resume=True`` needs ``out_dir`` with a checkpoint, and excludes ``overwrite=True``."""
    if resume and not (ckpt and ckpt.is_file()):
        if out is None:
            raise ValueError("resume: resume=True continues the run in out_dir; give out_dir")
        raise no_checkpoint(out, API)
    if resume and overwrite:
        raise ValueError("overwrite: resume=True continues the run in out_dir, overwrite=True replaces it; give one")


def check_positions(method, train, val=None, test=None) -> None:
    """Per-position data (labels (N, L)) needs a method that averages over positions (``ce``, ``kd``), and
    every split per position or none. Labels that copy the input ids get a warning (unshifted LM labels)."""
    if per_position(train) and labels_copy_inputs(train):
        warnings.warn(f"train: {train.name}'s labels equal its input ids at every scored position. kdistill's "
                      "per-position labels are each position's own target (a causal LM's next token: labels[:, i] = "
                      "input_ids[:, i + 1], -100 at the end); Hugging Face models shift labels inside, kdistill "
                      "does not. Shift them, unless copying the input is the task.", UserWarning, stacklevel=3)
    if not per_position(train):
        for split, name in ((val, "val"), (test, "test")):
            if split is not None and per_position(split):
                raise ValueError(f"{name}: {split.name} has per-position labels but the training split {train.name} "
                                 "has one label per sample; give every split the same kind of labels")
        return
    for split, name in ((val, "val"), (test, "test")):
        if split is not None and not per_position(split):
            raise ValueError(f"{name}: {split.name} has one label per sample but the training split {train.name} "
                             "has per-position labels (N, L); give every split the same kind of labels")
    if not getattr(method, "per_position", False):
        raise ValueError(f"method: {method.name}: per-position targets are not supported; use kd or ce "
                         f"({train.name} has per-position labels, -100 = not scored)")


def _diverged(state, what: str, ckpt: Path | None) -> ValueError:
    steps = state.steps_per_epoch
    epoch = state.epoch
    first, last = (epoch - 1) * steps + 1, epoch * steps
    if ckpt is None or not ckpt.is_file():
        kept = "no checkpoint was written"
    else:
        kept = f"{ckpt} keeps epoch {epoch - 1}" if epoch > 1 else f"{ckpt} keeps the last good epoch"
    return ValueError(f"train: {what} in epoch {epoch} (steps {first}-{last}); training stopped and {kept}. Lower "
                      "train.lr, set train.clip_grad_norm, or check the data and the teacher")


def _check_finite_losses(losses: dict[str, float], state, ckpt: Path | None) -> None:
    """The epoch's loss sums (read once per epoch anyway) must be finite: a NaN/inf step makes them so."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        name, value = next(iter(bad.items()))
        raise _diverged(state, f"the loss became {value} ({name})", ckpt)


def _check_finite_weights(model: nn.Module, method, state, ckpt: Path | None) -> None:
    params = [p for p in list(model.parameters()) + list(method.parameters()) if p.is_floating_point()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise _diverged(state, "the weights became NaN or infinite", ckpt)


def _single_backend(model, method, teaching, source, aug, cfg, device, n_proc):

    return StudentStep(model, method, teaching, source, aug, cfg, device, n_proc)


def _train(backend, model, method, train, val, test, val_teacher, source, gen, cfg, out, write, ckpt, resume,
           progress, on_eval, callbacks, rank, teacher_id=None) -> FitResult:
    state = LoopState(epochs=cfg.epochs, steps_per_epoch=source.steps_per_epoch, histories=[[]])
    keep = KeepBest(backend, 1, cfg.keep_best and val is not None)
    method_opts = method_record(method)  # as stored
    fingerprint = data_fingerprint(train)
    spec = getattr(model, "spec", None)
    val_y = labels_of(val) if val is not None else None
    if resume:
        saved = load_checkpoint(ckpt, model, backend.optimizer)
        _check_resume(saved, cfg, method_opts, ckpt, spec, fingerprint, teacher_id if write else saved.get("teacher"),
                      train)
        _restore(saved, method, state, gen, keep)
    elif write:
        out.mkdir(parents=True, exist_ok=True)
    if write and not (out / "config.yaml").exists():  # an API run records what the CLI records
        write_run_files(out, {"model": getattr(model, "spec", None) or type(model).__name__, "train": asdict(cfg),
                              "method": method_opts}, cfg.seed)

    t0 = time.perf_counter()

    def evaluate(epoch: float, losses) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": backend.lrs()[0]}
        if losses is not None:
            _check_finite_losses(losses[0], state, ckpt if write and cfg.checkpoint else None)
            row.update(losses[0])
        if val is not None:
            logits = backend.predict(val)[0]
            m = classification_metrics(logits, val_y, val_teacher, method.temperature, detailed=False)
            row.update({f"val_{k}": v for k, v in m.items() if k != "count"})
        row["time_s"] = round(time.perf_counter() - t0, 3)
        model.train()
        return [row]

    cbs: list[Callback] = [keep]  # first: the checkpoint holds the best state so far, this epoch's included
    if out is not None and cfg.checkpoint:
        meta = {"config": asdict(cfg), "method": method_opts, "data": fingerprint, "model": spec, "teacher": teacher_id}
        cbs.append(_Checkpoint(model, method, backend.optimizer, keep, gen, ckpt, write, meta))
    if write:
        cbs.append(MetricsFiles([out]))
    if progress and rank == 0:
        cbs.append(ProgressBar(getattr(model, "spec", "train"), state.epoch))
    if on_eval is not None:
        cbs.append(_OnEval(on_eval))
    cbs += list(callbacks)
    for c in cbs:
        c.on_fit_start(state)
    model.train()
    try:
        run_epochs(backend, [(source, gen)], cfg, state, evaluate, cbs)
    finally:
        for c in cbs:
            c.on_fit_end(state)
    wall = time.perf_counter() - t0
    best_epochs = keep.restore()
    result = final_results(backend, [model], state, wall, best_epochs, val, val_teacher, [method.temperature], test)[0]
    if write:
        _save_outputs(out, model, train, method, result)
    return result


class _Checkpoint(Callback):
    """Each epoch's checkpoint (every process checks the weights are finite; the writing one saves): the
    model, optimiser, method state, RNG streams, history and keep-best's record, for an exact resume."""

    def __init__(self, model, method, optimizer, keep: KeepBest, gen: torch.Generator, ckpt: Path, write: bool,
                 meta: dict[str, Any]) -> None:
        self.model, self.method, self.optimizer, self.keep, self.gen = model, method, optimizer, keep, gen
        self.ckpt, self.write, self.meta = ckpt, write, meta

    def on_epoch_end(self, state: LoopState, rows) -> None:
        _check_finite_weights(self.model, self.method, state, self.ckpt)  # never checkpoint a diverged state
        if not self.write:
            return  # replicas are identical: none waits for another
        extra = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        best_state, best_epoch = self.keep.states[0], self.keep.epochs[0]
        if best_state is not None:
            extra.update({f"best.{k}": v for k, v in best_state.items()})
        meta = {"epoch": state.epoch, "step": state.step, "history": state.histories[0], "config": self.meta["config"],
                "method": self.meta["method"], "rng": _rng_state(self.gen),
                "best_errors": self.keep.errors[0] if best_epoch else None, "best_epoch": best_epoch,
                "data": self.meta["data"], "model": self.meta["model"], "teacher": self.meta["teacher"]}
        save_checkpoint(self.ckpt, self.model, self.optimizer, meta, extra)


def _restore(saved: dict[str, Any], method, state: LoopState, gen: torch.Generator, keep: KeepBest) -> None:
    """A checkpoint's state put back for an exact resume: the method's extras, epoch, step and history, the
    data and torch RNG streams, and the keep-best record."""
    method_state = {k[len("method."):]: v for k, v in saved["extra"].items() if k.startswith("method.")}
    if method_state:
        method.load_state_dict(method_state)
    state.epoch, state.step, state.histories = saved["epoch"], saved["step"], [saved["history"]]
    gen.set_state(saved["rng"]["data"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    if saved.get("best_epoch") is not None:
        best_state = {k[len("best."):]: v for k, v in saved["extra"].items() if k.startswith("best.")}
        keep.set(0, saved["best_errors"], saved["best_epoch"], best_state)


def _save_outputs(out: Path, model: nn.Module, train, method, result: FitResult) -> None:
    """The finished run's files: the model (with class names and preprocessing, for ``kdistill predict``), a
    text run's tokenizer, and ``results.json``/``results.md``."""
    save_models([out / "model.safetensors"], [model], train)
    save_run_tokenizer(out, train)  # text data: its tokenizer beside the model (kdistill.data.text)
    metrics = {f"test_{k}": result.test[k] for k in ("errors", "accuracy", "nll")} if result.test else {}
    write_results(out, "fit", "api", result.wall_time_s, {"model": {**metrics, "spec": getattr(model, "spec", None),
                                                                    "method": method.name,
                                                                    "best_epoch": result.best_epoch}})

