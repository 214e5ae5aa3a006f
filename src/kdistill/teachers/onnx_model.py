"""ONNX teachers: a model run through onnxruntime (:class:`OnnxTeacher`), and :func:`export_onnx`, which writes one
from a module with the run's metadata (used by ``kdistill export-onnx``, the deployment table and the tests)."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.io import atomic_path
from kdistill.models.outputs import LogitsOnly
from kdistill.teachers.base import CachedTeacher


class OnnxTeacher:
    """An ONNX model, run by onnxruntime on the CPU, used as a teacher (inputs in, logits out).

    It sees the (possibly augmented) batch, like a module teacher; :meth:`cache` turns it into a
    :class:`CachedTeacher` when the transfer set is not augmented.
    """

    needs_inputs = True

    def __init__(self, path: str | os.PathLike, batch_size: int = 1024, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("teacher_onnx: onnxruntime is not installed; `pip install kdistill[onnx]`") from exc
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher_onnx: no file {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"teacher_onnx: {path} is not a loadable ONNX model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"teacher_onnx: {path} must take exactly one input, it takes {len(inputs)}")
        self.path = path
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.batch_size = batch_size

    def check(self, data: TensorData) -> None:
        """Raise unless the model accepts ``data``'s inputs and returns one logit per class."""
        fixed = self.input_shape[1:]
        if len(fixed) != len(data.input_shape) or any(
            isinstance(a, int) and a != b for a, b in zip(fixed, data.input_shape)
        ):
            raise ValueError(
                f"teacher_onnx: {self.path} expects inputs of shape {fixed}, {data.name} has {list(data.input_shape)}"
            )
        out = self.logits(data.x[:2])
        if out.dim() != 2 or out.shape[1] != data.num_classes:
            raise ValueError(
                f"teacher_onnx: {self.path} returns shape {tuple(out.shape)}; {data.name} needs {data.num_classes} classes"
            )

    @torch.no_grad()
    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size].detach().float().cpu().numpy()
            parts.append(torch.from_numpy(self.session.run(None, {self.input_name: batch})[0]))
        return torch.cat(parts).float().to(x.device)

    def predict(self, data: TensorData) -> torch.Tensor:
        return self.logits(data.x)

    def cache(self, data: TensorData) -> CachedTeacher:
        return CachedTeacher(data.index, self.predict(data))


def export_onnx(model: nn.Module, path: str | os.PathLike, in_shape: Sequence[int], opset: int = 17,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a CPU copy, eval mode) as ONNX with a dynamic batch dimension, atomically.

    ``metadata`` (e.g. ``class_names``, ``preprocessing``, ``input_shape`` from ``model.safetensors``) goes
    into the model's ``metadata_props``, each value as JSON, so the file alone says how to feed it and what its
    outputs mean (:func:`read_onnx_metadata`; ``kdistill predict --model M.onnx`` uses it).
    """
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"onnx: output file {path} must end in .onnx")
    net = LogitsOnly(copy.deepcopy(model).cpu()).eval()  # a dict/tuple/ModelOutput forward exports its logits
    example = torch.zeros(2, *in_shape)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(tmp), input_names=["x"], output_names=["logits"], opset_version=opset,
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), json.dumps(value)
            onnx.save(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON ``metadata_props`` of an ONNX model written by :func:`export_onnx` (``{}`` when it has none;
    a value that is not JSON is kept as its string)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("onnx: onnxruntime is not installed; `pip install kdistill[onnx]`") from exc
    try:
        props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"onnx: {path} is not a loadable ONNX model ({str(exc)[:200]})") from None
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


