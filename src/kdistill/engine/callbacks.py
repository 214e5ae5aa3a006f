"""Callbacks: code that runs at points of the loop without being part of it.

The built-in logging (``metrics.jsonl`` and ``metrics.csv``), the progress bar and early stopping are
callbacks too, and so is keep-best (:class:`KeepBest`); :func:`final_results` and :func:`save_models` finish
a run the same way for every backend (one student or a stacked sweep). A callback implements any of :meth:`Callback.on_step` (every ``every_steps`` steps),
:meth:`Callback.on_eval` (each evaluation row, also mid-epoch ones) and :meth:`Callback.on_epoch_end`;
setting ``state.stop = True`` ends training after the current epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.data.preprocess import model_record
from kdistill.data.stream import labels_of
from kdistill.engine.config import FitResult
from kdistill.engine.evaluate import classification_metrics
from kdistill.io import save_model, write_text


@dataclass
class LoopState:
    """What the loop knows between steps, as callbacks see it (one history per student)."""

    epochs: int
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    histories: list[list[dict[str, Any]]] = field(default_factory=list)
    stop: bool = False
    names: list[str] = field(default_factory=lambda: ["model"])

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class Callback:
    """Base class: every hook does nothing."""

    every_steps: int = 0

    def on_fit_start(self, state: LoopState) -> None: ...

    def on_step(self, state: LoopState) -> None: ...

    def on_eval(self, state: LoopState, student: int, row: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: LoopState, rows: list[dict[str, Any]]) -> None: ...

    def on_fit_end(self, state: LoopState) -> None: ...


class MetricsFiles(Callback):
    """``metrics.jsonl`` and ``metrics.csv`` in each student's directory, rewritten from the history each epoch
    (atomically, so a killed run never leaves a half row or a duplicated epoch)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def on_fit_start(self, state: LoopState) -> None:
        self._write(state)

    def on_epoch_end(self, state: LoopState, rows) -> None:
        self._write(state)

    def _write(self, state: LoopState) -> None:

        for d, history in zip(self.dirs, state.histories):
            write_text(d / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            keys: list[str] = []
            for r in history:
                keys += [k for k in r if k not in keys]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
            write_text(d / "metrics.csv", buf.getvalue() if history else "")


class ProgressBar(Callback):
    """A tqdm bar over epochs with the latest loss and validation errors."""

    def __init__(self, desc: str, start_epoch: int = 0) -> None:
        self.desc, self.start = desc, start_epoch
        self.bar = None

    def on_fit_start(self, state: LoopState) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.epochs, initial=self.start, desc=self.desc, leave=False)

    def on_epoch_end(self, state: LoopState, rows) -> None:
        self.bar.update(1)
        best = min(rows, key=lambda r: r.get("train_loss", math.inf))
        self.bar.set_postfix(loss=f"{best['train_loss']:.4f}", val_err=best.get("val_errors", "-"))

    def on_fit_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()


class EarlyStopping(Callback):
    """Stop when ``monitor`` (a validation metric in the epoch rows) has not improved for ``patience`` epochs.

    ``mode``: ``min`` (errors, loss) or ``max`` (accuracy). With several students, it watches the first.
    """

    def __init__(self, monitor: str = "val_errors", patience: int = 5, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"early stopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"early stopping: patience must be >= 1, got {patience}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best: float | None = None
        self.bad = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, state: LoopState, rows) -> None:
        if self.monitor not in rows[0]:
            raise ValueError(f"early stopping: no {self.monitor!r} in the epoch row (give val data); "
                             f"it has {sorted(rows[0])}")
        value = float(rows[0][self.monitor])
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                state.stop, self.stopped_epoch = True, state.epoch


class TensorBoard(Callback):
    """TensorBoard event files (one run per student directory): every number of each epoch row, by name.

    Needs the optional ``tensorboard`` package (``pip install 'kdistill[tensorboard]'``); checked when made.
    """

    def __init__(self, dirs: list[Path]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("train.tensorboard: needs the tensorboard package: pip install 'kdistill[tensorboard]'") from exc
        self.writers = [SummaryWriter(log_dir=str(d / "tensorboard")) for d in dirs]

    def on_epoch_end(self, state: LoopState, rows) -> None:
        for w, row in zip(self.writers, rows):
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    w.add_scalar(k, v, state.step)
            w.flush()

    def on_fit_end(self, state: LoopState) -> None:
        for w in self.writers:
            w.close()


class KeepBest(Callback):
    """Keep-best, per student: at the end of each epoch, a snapshot of every student whose ``val_errors``
    improved on its best so far (strictly fewer); :meth:`restore` puts each best snapshot back.

    The backend gives ``snapshot(s)`` and ``restore(s, snap)`` for student ``s``. ``enabled``: keep-best is
    on and there is validation data. Restoring is a call after the loop, not ``on_fit_end``: that also runs
    when training fails, and a failed run leaves the students as they were when it stopped.
    """

    def __init__(self, backend, n: int, enabled: bool) -> None:
        self.backend, self.enabled = backend, enabled
        self.errors: list[float] = [math.inf] * n
        self.epochs: list[int | None] = [None] * n
        self.states: list[Any] = [None] * n

    def set(self, s: int, errors: float, epoch: int, snap: Any) -> None:
        """Student ``s``'s best so far, as a checkpoint recorded it (resume)."""
        self.errors[s], self.epochs[s], self.states[s] = errors, epoch, snap

    def on_epoch_end(self, state: LoopState, rows) -> None:
        if not self.enabled:
            return
        for s, row in enumerate(rows):
            if row["val_errors"] < self.errors[s]:
                self.set(s, row["val_errors"], state.epoch, self.backend.snapshot(s))

    def restore(self) -> list[int | None]:
        """Every kept best state put back; each student's best epoch (None: nothing kept, the last state stays)."""
        for s, snap in enumerate(self.states):
            if snap is not None:
                self.backend.restore(s, snap)
        return [e if snap is not None else None for e, snap in zip(self.epochs, self.states)]


def final_results(backend, models: Sequence[nn.Module], state: LoopState, wall: float, best_epochs: list[int | None],
                  val, val_teacher, temperatures: Sequence[float], test) -> list[FitResult]:
    """Each student's result, after keep-best's restore: its model in eval mode, its history, and validation
    (against the teacher's ``val_teacher`` logits at its temperature) and test metrics from the backend's
    predictions of the final weights."""
    for m in models:
        m.eval()
    val_logits = backend.predict(val) if val is not None else None
    test_logits = backend.predict(test) if test is not None else None
    val_y = labels_of(val) if val is not None else None
    test_y = labels_of(test) if test is not None else None
    results = []
    for s, model in enumerate(models):
        r = FitResult(model=model, history=state.histories[s], wall_time_s=wall, best_epoch=best_epochs[s])
        if val_logits is not None:
            r.val = classification_metrics(val_logits[s], val_y, val_teacher, temperatures[s], detailed=False)
        if test_logits is not None:
            r.test = classification_metrics(test_logits[s], test_y)
        results.append(r)
    return results


def save_models(paths: Sequence[Path], models: Sequence[nn.Module], train, record: bool = True) -> None:
    """Each final model to its ``model.safetensors`` path, with the input shape and class count to rebuild
    it and (``record``) the class names and preprocessing ``kdistill predict`` reads."""
    extra = model_record(train) if record else {}
    for path, model in zip(paths, models):
        save_model(path, model, in_shape=list(train.input_shape), num_classes=train.num_classes, **extra)
