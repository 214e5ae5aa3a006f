"""The ``kdistill`` command: the parser, one line per error, and the commands found in :mod:`kdistill.cli`.

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
import importlib
import pkgutil
import sys
from pathlib import Path

import kdistill.cli as commands
from kdistill import __version__
from kdistill.engine.config import TrainConfig

CORE = ("train", "evaluate", "run")
"""Commands listed first in ``kdistill --help`` (``train`` registers ``train`` and ``distill``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdistill", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)


    # Every command is a module of kdistill/cli with `register(subparsers)`: the core ones first, then the rest.
    found = sorted(i.name for i in pkgutil.iter_modules(commands.__path__) if not i.name.startswith("_"))
    for name in [*CORE, *(n for n in found if n not in CORE and n != "app")]:
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
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
