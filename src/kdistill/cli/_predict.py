"""``kdistill predict``'s work: classify image files with a saved model, or find a split's data for it.

A model saved by ``kdistill train``/``distill`` records its input shape, class names and preprocessing
(``data.normalize`` and the pixel scale, :mod:`kdistill.data.preprocess`); an ONNX model exported by
``kdistill export-onnx`` carries the same in its ``metadata_props``. Image files are decoded as the
``folder:`` loader decodes them (8-bit / 255, 16-bit / 65535, headers checked before decoding), resized to
the model's input size when they differ (as ``data.image_size`` resizes training images; each such file is
noted), normalised as the model's data was, and their top classes printed with probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kdistill.config.loader as config_mod
from kdistill.data.folder import IMAGE_SUFFIXES, _pixels, open_image
from kdistill.data.preprocess import (
    Normalization,
    channel_view,
    check_teacher_preprocessing,
    normalize_split,
    parse_normalize,
    recorded_normalization,
)
from kdistill.engine.evaluate import predict_logits
from kdistill.io import load_model, read_model_meta
from kdistill.teachers.onnx_model import OnnxTeacher, read_onnx_metadata

BATCH = 64


@dataclass
class Predictor:
    """A saved model of either kind, with what its file records about its inputs and outputs."""

    path: str
    logits: Callable[[torch.Tensor], torch.Tensor]
    in_shape: tuple[int, ...] | None
    class_names: list[str] | None
    preprocessing: dict[str, Any] | None
    module: Any = None  # the torch module (None for ONNX)


def _run_config(model_path: str) -> dict[str, Any]:
    """The ``config.yaml`` of the run that wrote ``model_path`` (beside it), or ``{}``."""
    cfg = Path(model_path).parent / "config.yaml"
    return config_mod.load_yaml(cfg) if cfg.is_file() else {}


def load_predictor(path: str, trust_code: bool = False) -> Predictor:
    """A ``.safetensors`` model (kdistill's, read with :func:`~kdistill.io.load_model`) or an ``.onnx`` one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--model: no file {path}")
    if path.lower().endswith(".onnx"):

        teacher, meta = OnnxTeacher(path), read_onnx_metadata(path)
        shape = meta.get("input_shape") or teacher.input_shape[1:]
        fixed = tuple(shape) if all(isinstance(d, int) for d in shape) else None
        return Predictor(path, teacher.logits, fixed, meta.get("class_names"), meta.get("preprocessing"))

    model = load_model(path, trust_code=trust_code)  # --trust-code: may build the py: spec the file names
    meta = read_model_meta(path)
    shape = meta.get("in_shape")

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict_logits(model, x)

    return Predictor(path, logits, tuple(shape) if shape else None, meta.get("class_names"), meta.get("preprocessing"),
                     model)


def image_files(inputs: Sequence[str]) -> list[str]:
    """The image files named by ``inputs``: files as given, folders walked (sorted, hidden names skipped)."""
    files: list[str] = []
    kinds = "/".join(IMAGE_SUFFIXES)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [os.path.join(root, f) for root, dirs, names in sorted(os.walk(p)) for f in sorted(names)
                     if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
                     and not any(part.startswith(".") for part in Path(root).relative_to(p).parts)]
            if not found:
                raise ValueError(f"predict: no {kinds} images under {item}")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"predict: {item} is not a {kinds} image")
            files.append(str(p))
        else:
            raise FileNotFoundError(f"predict: no such file or folder {item}")
    return files


def _image_setup(pred: Predictor, notes: list[str]) -> tuple[tuple[int, int, int], Normalization]:
    """The model's image input (C, H, W) and normalisation, or a ValueError saying why files cannot be fed."""
    shape = pred.in_shape
    if not shape:
        raise ValueError(f"--model: {pred.path} records no input shape; save it with `kdistill train` (or export it "
                         "with `kdistill export-onnx`)")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"--model: {pred.path} takes inputs shaped {list(shape)}, not images (C, H, W) with 1 or 3 "
                         "channels; classify its data with --save-logits and --data instead")
    norm = recorded_normalization(pred.preprocessing)
    if norm is None:
        setting = (_run_config(pred.path).get("data") or {}).get("normalize")
        norm = parse_normalize(setting)
        notes.append(f"{pred.path} records no preprocessing; used pixels/255 with normalize {norm.describe()}"
                     + (" (from its run's config.yaml)" if setting is not None else ""))
    elif pred.preprocessing.get("scale") is None:
        notes.append(f"{pred.path} was trained on data of unknown pixel scale; images were fed as pixels/255")
    return (int(shape[0]), int(shape[1]), int(shape[2])), norm


def _decode(files: Sequence[str], shape: tuple[int, int, int], norm: Normalization, max_pixels: int,
            resized: dict[str, list[int]]) -> torch.Tensor:
    """``files`` as one normalised float32 batch (C, H, W each); ``resized`` gets each file whose size differed."""
    c, h, w = shape
    x = torch.empty(len(files), c, h, w)
    for i, f in enumerate(files):
        with open_image(f, "predict", max_pixels, "shrink the image, or raise --max-pixels if it is genuine") as img:
            if img.size != (w, h):
                resized[f] = [img.size[1], img.size[0]]
            try:
                x[i] = _pixels(img, (h, w), c)
            except (OSError, ValueError) as exc:
                raise ValueError(f"predict: cannot decode {f} ({exc})") from exc
    if not norm.is_identity:
        x = (x - channel_view(norm.mean, c, 3)) / channel_view(norm.std, c, 3)  # (C, 1, 1) over (B, C, H, W)
    return x


def _rows(files: Sequence[str], probs: torch.Tensor, names: Sequence[str], top: int,
          resized: dict[str, list[int]]) -> list[dict[str, Any]]:
    p, idx = probs.topk(top, dim=1)
    out = []
    for f, pr, ix in zip(files, p.tolist(), idx.tolist()):
        row: dict[str, Any] = {"file": f, "top": [{"class": names[i], "index": i, "probability": round(q, 6)}
                                                  for q, i in zip(pr, ix)]}
        if f in resized:
            row["resized_from"] = resized[f]
        out.append(row)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per file: its top classes with probabilities, in aligned columns."""
    top = len(rows[0]["top"]) if rows else 0
    header = ["file"] + [f"top-{k + 1}" for k in range(top)]
    body = [[r["file"] + (" *" if "resized_from" in r else "")]
            + [f"{t['class']} {t['probability']:.3f}" for t in r["top"]] for r in rows]
    widths = [max(len(line[k]) for line in [header, *body]) for k in range(len(header))]
    return "\n".join("  ".join(cell.ljust(wd) for cell, wd in zip(line, widths)).rstrip() for line in [header, *body])


def classify_files(args: argparse.Namespace) -> int:
    """``kdistill predict --model M FILE_OR_DIR...``: each image's top classes (a table, or ``--json``)."""
    if args.save_logits:
        raise ValueError("--save-logits: saves a data split's logits; give it without image files (and --data)")
    if args.top < 1:
        raise ValueError(f"--top: at least 1 class per image, got {args.top}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels: a positive number of pixels, got {args.max_pixels}")
    files = image_files(args.inputs)
    pred = load_predictor(args.onnx or args.model, args.trust_code)
    notes: list[str] = []
    shape, norm = _image_setup(pred, notes)
    for f in files:  # every header checked before anything is decoded or run
        open_image(f, "predict", args.max_pixels, "shrink the image, or raise --max-pixels if it is genuine").close()
    resized: dict[str, list[int]] = {}
    rows: list[dict[str, Any]] = []
    names: list[str] | None = None
    for i in range(0, len(files), BATCH):
        part = files[i:i + BATCH]
        logits = pred.logits(_decode(part, shape, norm, args.max_pixels, resized))
        if names is None:
            k = logits.shape[1]
            names = [str(n) for n in pred.class_names] if pred.class_names and len(pred.class_names) == k else None
            if names is None:
                notes.append(f"{pred.path} records no class names; classes are shown by index")
                names = [str(j) for j in range(k)]
        rows += _rows(part, torch.softmax(logits.float(), dim=1), names, min(args.top, len(names)), resized)
    if resized:
        notes.append(f"{len(resized)} image(s) marked * were resized to {shape[1]}x{shape[2]} (HxW), the model's "
                     "input, "
                     "as data.image_size resizes training images")
    if args.json:
        print(json.dumps({"model": pred.path, "input_shape": list(shape), "normalize": norm.record(),
                          "notes": notes, "predictions": rows}, indent=2))
    else:
        print(format_table(rows))
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
    return 0


def split_data(args: argparse.Namespace, record: dict[str, Any] | None) -> dict[str, Any]:
    """The data section ``predict --save-logits`` loads: the run's own (``config.yaml`` beside the model) unless
    ``--data`` names another; the model's recorded normalisation is kept either way."""
    d: dict[str, Any] = {}
    model = args.model or args.onnx
    run = _run_config(model).get("data") or {}
    if isinstance(run, str):
        run = {"name": run}
    if args.data:
        d = {"name": args.data}
    elif run:
        d = dict(run)
    else:
        why = "its config.yaml names no data (a run of fit() on your own Dataset)" \
            if (Path(model).parent / "config.yaml").is_file() else "it has no config.yaml beside it to say its data"
        raise ValueError(f"--data: {model}: {why}; give --data NAME")
    norm = recorded_normalization(record)
    if norm is not None:
        d["normalize"] = norm.setting()
    elif args.data and "normalize" in run:
        d["normalize"] = run["normalize"]
    for key, value in (("path", args.data_path), ("val_size", args.val_size), ("seed", args.data_seed)):
        if value is not None:
            d[key] = value
    return d


def fit_split(pred: Predictor, split: Any, norm: Normalization) -> Any:
    """``split`` normalised by ``norm`` (the model's recorded normalisation, or its run's), after a one-line
    refusal of a model whose recorded input shape or preprocessing does not fit it."""

    if pred.in_shape and tuple(pred.in_shape) != tuple(split.input_shape):
        raise ValueError(f"--model: {pred.path} takes inputs shaped {list(pred.in_shape)}, but {split.name} has "
                         f"{list(split.input_shape)}; give the --data it was trained on (default: its run's, from the "
                         "config.yaml beside it)")
    split = normalize_split(split, norm, (split.preprocessing or {}).get("scale"))
    check_teacher_preprocessing(pred.path, pred.preprocessing, split, "--model")
    return split
