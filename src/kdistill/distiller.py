"""``Distiller``: a teacher, a student and a method as one object, for people who think in Keras's terms.

>>> d = Distiller(teacher, student, method="kd", temperature=4.0, alpha=0.9)
>>> d.fit(train, epochs=30, lr=0.1, augment="crop4,flip", val=val)
>>> d.evaluate(test)["accuracy"]; d.save("student.safetensors"); d.export_onnx("student.onnx")

Everything is :func:`kdistill.engine.fit` underneath: the same loop, checks, checkpoints and outputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.engine.config import FitResult, TrainConfig
from kdistill.engine.loop import fit
from kdistill.methods import Method, build_method
from kdistill.data.convert import as_split
from kdistill.data.stream import labels_of
from kdistill.engine.evaluate import classification_metrics, predict_split
from kdistill.teachers.base import ModuleTeacher
from kdistill.io import save_model
from kdistill.teachers.onnx_model import export_onnx


class Distiller:
    """Distil ``teacher`` into ``student`` with ``method`` (a name and its options, or a :class:`Method`)."""

    def __init__(self, teacher: nn.Module | Any, student: nn.Module, method: str | Method = "kd", **options: Any) -> None:
        self.teacher, self.student = teacher, student
        self.method = method if isinstance(method, Method) else build_method(method, options)
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        self.history: list[dict[str, Any]] = []

    def fit(self, train, config: TrainConfig | None = None, *, val=None, test=None, out_dir=None, resume: bool = False,
            callbacks=(), progress: bool = True, overwrite: bool = False, **train_options: Any) -> FitResult:
        """Train the student; ``train_options`` (``epochs=``, ``lr=``, ...) override fields of ``config``."""
        cfg = replace(config or TrainConfig(), **train_options) if train_options else (config or TrainConfig())
        result = fit(self.student, train, cfg, teacher=self.teacher, method=self.method, val=val, test=test,
                     out_dir=out_dir, resume=resume, callbacks=callbacks, progress=progress, overwrite=overwrite)

        split = as_split(train, name="train")
        self.input_shape, self.num_classes = tuple(split.input_shape), split.num_classes
        self.history = result.history
        return result

    def evaluate(self, data) -> dict[str, Any]:
        """Accuracy, NLL, ECE, confusion of the student on ``data``, with KL to and agreement with the teacher."""

        split = as_split(data, name="eval")
        t_logits = None
        net = self.teacher.module if isinstance(self.teacher, ModuleTeacher) else self.teacher
        if isinstance(net, nn.Module):
            t_logits = predict_split(net, split)
        return classification_metrics(predict_split(self.student, split), labels_of(split), t_logits,
                                      getattr(self.method, "temperature", 1.0))

    def save(self, path: str | Path) -> Path:
        """The student's weights and what reloads them (``kdistill.io.load_model``, ``--teacher``)."""

        if self.input_shape is None:
            raise ValueError("Distiller.save: fit first (the input shape and class count come from the data)")
        save_model(path, self.student, in_shape=list(self.input_shape), num_classes=self.num_classes,
                   method=self.method.name)
        return Path(path)

    def export_onnx(self, path: str | Path) -> Path:
        """The student as ONNX, for onnxruntime and other runtimes."""

        if self.input_shape is None:
            raise ValueError("Distiller.export_onnx: fit first (the input shape comes from the data)")
        export_onnx(self.student, path, self.input_shape)
        return Path(path)
