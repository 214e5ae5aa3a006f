"""One resolver from a spec: the teacher a ``distill`` config names (``teacher``, ``teacher_logits``,
``teacher_onnx``, ``teacher_model`` + ``teacher_weights``, several of them as an ensemble) built and checked
against the run's data (class names, preprocessing, fingerprints) before any training."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.data.dataset import Split, TensorData
from kdistill.data.preprocess import check_teacher_preprocessing
from kdistill.data.text import evaluate_options
from kdistill.io import load_model, read_model_meta
from kdistill.teachers.ensemble import EnsembleTeacher
from kdistill.teachers.logits_files import logits_teacher
from kdistill.teachers.sparse import SparseCachedTeacher, load_sparse_cache, read_manifest
from kdistill.teachers.onnx_model import OnnxTeacher, read_onnx_metadata


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _check_class_names(path: str, recorded: Any, train) -> None:
    """Refuse a teacher trained on classes of other names, or of the same names in another order, than ``train``
    (its logit i would be taught as class i of the data). Names ``0..C-1`` (data without names) say nothing."""
    ours = [str(c) for c in getattr(train, "classes", None) or ()]
    if not isinstance(recorded, (list, tuple)) or not ours or len(recorded) != len(ours):
        return
    theirs = [str(c) for c in recorded]
    default = [str(i) for i in range(len(ours))]
    if theirs != ours and default not in (theirs, ours):
        how = "in another order" if sorted(theirs) == sorted(ours) else "other names"
        raise ValueError(f"teacher: {path} was trained on classes {theirs}, but {train.name} has {ours} ({how}: its "
                         "outputs would teach the wrong classes); give a teacher trained on this data's classes")


def _weights_teacher(path: str, train, trust_code: bool = False) -> nn.Module:
    """A teacher network from a kdistill weights file, refused when it was made for other inputs or classes;
    a ``py:`` spec recorded in the file runs only with ``trust_code``."""
    shape = classes = None
    if Path(path).suffix.lower() == ".safetensors" and Path(path).is_file():
        meta = read_model_meta(path)
        shape, classes = meta.get("in_shape"), meta.get("num_classes")
        _check_class_names(path, meta.get("class_names"), train)
        if isinstance(shape, (list, tuple)) and tuple(shape) != tuple(train.input_shape):
            raise ValueError(f"teacher: {path} was trained on inputs shaped {list(shape)}, but {train.name} has "
                             f"{list(train.input_shape)}; give a teacher trained on this data")
        if isinstance(classes, int) and classes != train.num_classes:
            raise ValueError(f"teacher: {path} predicts {classes} classes, but {train.name} has {train.num_classes}; "
                             "give a teacher trained on this data")
    # A checkpoint records its spec but not the data's shape: the transfer set's is the only one it can fit.
    return load_model(path, in_shape=None if shape else list(train.input_shape),
                      num_classes=None if classes else train.num_classes, trust_code=trust_code)


def resolve_teacher(cfg: dict[str, Any], train: TensorData, jitter: int = 0, temperature: float = 1.0, *,
                    trust_code: bool = False) -> Any:
    """The teacher named by a distill config, its files read and checked against ``train`` before training.

    ``teacher`` (weights), ``teacher_logits`` and ``teacher_onnx`` may each be one path or a list; one
    teacher in all is used as is, several become an :class:`~kdistill.teachers.ensemble.EnsembleTeacher` with
    ``ensemble_mean`` (default arithmetic) combined at ``temperature`` (the training temperature), cached
    when the inputs are not augmented. ``trust_code``: build ``py:`` specs recorded in weights files
    (``--trust-code``).
    """

    weights, logits, onnx = (_as_list(cfg.get(k)) for k in ("teacher", "teacher_logits", "teacher_onnx"))
    if not (weights or logits or onnx):
        raise ValueError("teacher: give --teacher WEIGHTS.safetensors, --teacher-logits FILE or --teacher-onnx FILE")
    if logits and jitter:
        raise ValueError("train.augment: saved teacher logits were computed on un-augmented inputs and cannot "
                         "follow augmented ones; drop train.augment / train.jitter / train.teacher_views, or give a "
                         "teacher network")
    members: list[Any] = [_weights_teacher(w, train, trust_code) for w in weights]
    members += [load_sparse_cache(f, train) if read_manifest(f) else logits_teacher(f, train) for f in logits]
    if len(members) > 1 and any(isinstance(m, SparseCachedTeacher) for m in members):
        raise ValueError("teacher_logits: a sparse (top-k) cache is one teacher; it cannot join an ensemble")
    for f in onnx:
        teacher = OnnxTeacher(f)
        teacher.check(train)
        members.append(teacher if jitter else teacher.cache(train))
    mean = cfg.get("ensemble_mean") or "arithmetic"
    if len(members) == 1:
        if cfg.get("ensemble_mean"):
            raise ValueError("ensemble_mean: needs two or more teachers")
        return members[0]
    ensemble = EnsembleTeacher(members, mean=mean, temperature=temperature)
    return ensemble if jitter else ensemble.cache(train)


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _model_files(cfg: Mapping[str, Any]) -> list[str]:
    """The kdistill ``.safetensors`` teacher files of a distill config that exist."""
    return [p for key in ("teacher", "teacher_weights") for p in _paths(cfg.get(key))
            if p.lower().endswith(".safetensors") and Path(p).is_file()]


def teacher_data_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section for a distill run: on ``text:`` data that names no tokenizer, the BPE the (first)
    teacher file was trained with, so teacher and student see the teacher's token ids (a new BPE trained on
    the text would give other ids for the same text)."""
    d = dict(cfg.get("data") or {})
    if not str(d.get("name", "")).startswith("text:") or d.get("tokenizer") or d.get("tokenizer_file"):
        return d
    files = _model_files(cfg)
    if not files or _tokenizer_record(files[0]) is None:  # read through the checked reader: a broken file is named
        return d
    return evaluate_options(d["name"], d, files[0])


def _tokenizer_record(path: str) -> dict[str, Any] | None:
    """The tokenizer a kdistill model file records (None if none), read through :func:`read_model_meta`, which
    refuses an empty, truncated or crafted file naming it."""
    record = (read_model_meta(path).get("preprocessing") or {}).get("tokenizer")
    return record if isinstance(record, dict) else None


def _check_tokenizer(path: str, split: Split) -> None:
    """Refuse a teacher trained on other token ids than the run's text data, naming both tokenizers."""
    theirs = _tokenizer_record(path)
    ours = (getattr(split, "preprocessing", None) or {}).get("tokenizer")
    if not theirs or not isinstance(ours, dict):
        return
    key = lambda r: (r.get("kind"), r.get("sha256"))  # noqa: E731
    if key(theirs) != key(ours):
        name = lambda r: "UTF-8 bytes" if r.get("kind") != "bpe" else f"a BPE of {r.get('vocab_size')} tokens (sha256 {str(r.get('sha256'))[:12]})"  # noqa: E731
        raise ValueError(f"teacher: {path} was trained on {name(theirs)}, but this run tokenises {split.name} as "
                         f"{name(ours)}: the teacher would read other token ids. Drop data.tokenizer to reuse the "
                         f"teacher's, or set data.tokenizer_file to {path}")


def check_teacher_files(cfg: Mapping[str, Any], split: Split) -> None:
    """Every teacher of a distill config that records its preprocessing (``--teacher``/``--teacher-weights``
    kdistill ``.safetensors``, ``--teacher-onnx`` exported by kdistill) checked against the run's data."""
    for key in ("teacher", "teacher_weights"):
        for path in _paths(cfg.get(key)):
            if path.lower().endswith(".safetensors") and Path(path).is_file():
                check_teacher_preprocessing(path, read_model_meta(path).get("preprocessing"), split)
                _check_tokenizer(path, split)
    for path in _paths(cfg.get("teacher_onnx")):
        if Path(path).is_file():
            check_teacher_preprocessing(path, read_onnx_metadata(path).get("preprocessing"), split, "teacher_onnx")
