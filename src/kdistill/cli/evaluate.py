"""``kdistill evaluate``: metrics of a saved model on a split (its run's data and tokenizer by default)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import kdistill.config.loader as config_mod
from kdistill import data
from kdistill.cli._common import DATA_HELP, add_trust_code
from kdistill.config.types import check_number
from kdistill.data.text import evaluate_options
from kdistill.engine.evaluate import evaluate_model, predict_split
from kdistill.engine.loop import _check_outputs, check_inputs, check_teacher
from kdistill.io import load_model


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


def register(sub: argparse._SubParsersAction) -> None:
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
