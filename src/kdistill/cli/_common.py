"""What the commands share: flags common to ``train`` and ``distill``, config resolution, run-directory checks,
and loading the run's data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kdistill.config.loader as config_mod
from kdistill import data
from kdistill.config.schema import normalize_sections
from kdistill.config.types import short_repr
from kdistill.engine.rundir import check_config_file, clear_run, no_checkpoint

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
