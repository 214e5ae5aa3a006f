"""Files: atomic writes, model weights and training checkpoints in safetensors, run metadata.

Nothing is ever loaded with pickle: weights and optimiser tensors go through safetensors, the rest of
the state through JSON in the safetensors metadata. Weights from elsewhere (``.pt``/``.pth``/``.bin``
state dicts) are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill._version import __version__
from kdistill.engine.heap import retain_freed_memory
from kdistill.models import build_model
from kdistill.models.adapters import describe_model, runs_code
from kdistill.models.hf import config_of
from kdistill.models.registry import build_on_meta
from kdistill.teachers.base import CachedTeacher, ModuleTeacher


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should read like any other file
    try:
        yield Path(tmp)
        if os.path.exists(tmp):  # writers that replace the file (safetensors) make it 0600 again: set it last
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each one whose storage an earlier one uses copied: safetensors refuses shared memory,
    and tied weights (a language model's embedding and output head) are one tensor under two names; loading
    both names into the tied parameter restores it."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if t.numel() and ptr in seen else t
        seen.add(ptr)
    return out


def save_model(path: str | os.PathLike, model: nn.Module, **meta: Any) -> None:
    """Weights plus the metadata needed to rebuild the model (``spec``, ``in_shape``, ``num_classes``, and
    whatever else ``meta`` holds, e.g. ``class_names``).

    A model without a ``.spec`` (built by ``timm.create_model``, a torchvision builder, transformers or the
    user's own class) is described as ``timm:``/``tv:``/``hf:``/``py:`` when possible
    (:func:`~kdistill.models.adapters.describe_model`); otherwise its class path is kept under ``class`` and
    :func:`load_model` asks for a spec. A transformers model's config is kept under ``hf_config``, so it
    rebuilds offline.
    """
    tensors = _unshared({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    spec = getattr(model, "spec", None) or describe_model(model, meta.get("in_shape"), meta.get("num_classes"))
    info: dict[str, Any] = {"spec": spec}
    if spec is None:
        info["class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    elif spec.startswith("hf:") and config_of(model) is not None:
        info["hf_config"] = config_of(model)
    metadata = {"kdistill": json.dumps({**info, **meta}, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The kdistill metadata of a model file (``{}`` for a plain safetensors file), read from its header."""
    _, raw = safetensors_header(path, "weights")
    return _json_meta(raw, "kdistill", Path(path), "weights")


# ------------------------------------------------------------------------------------ safetensors headers

_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                   "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_header(path: str | os.PathLike, what: str = "weights",
                       fix: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(tensors, metadata)`` declared by a safetensors file's header, checked against the file's size.

    Nothing but the header is read, so a file that is empty, truncated, a pickle, a ``torch.save`` archive or
    crafted (offsets past its end, shapes that do not match their bytes) is refused with one ValueError
    naming it, before any tensor is allocated. ``tensors`` maps names to ``{"dtype", "shape"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file {path}")
    size = path.stat().st_size
    fix = fix or "expected a safetensors file (written by kdistill or safetensors.torch.save_file)"
    if size == 0:
        raise ValueError(f"{what}: {path} is empty (0 bytes); {fix}")
    with open(path, "rb") as fh:
        head = fh.read(9)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not (2 <= n <= _ST_MAX_HEADER and 8 + n <= size and head[8:9] == b"{"):
            if head[:4] == b"PK\x03\x04":
                raise ValueError(f"{what}: {path} is a torch.save (zip) archive, not a readable safetensors file; give "
                                 f"it a .pt suffix to read it as a state dict (weights_only); {fix}")
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise ValueError(f"{what}: {path} is a Python pickle, not a readable safetensors file; pickles are "
                                 f"never loaded (they can run code); {fix}")
            if len(head) < 8:
                raise ValueError(f"{what}: {path} has {size} bytes, too short for a safetensors header "
                                 f"(truncated?); {fix}")
            if 2 <= n <= _ST_MAX_HEADER and head[8:9] == b"{":
                raise ValueError(f"{what}: {path} is truncated: its header declares {n} bytes but the file has {size}")
            raise ValueError(f"{what}: {path} is not a readable safetensors file (its first bytes are no safetensors "
                             f"header: truncated, or another format); {fix}")
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{what}: {path} is not a readable safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what}: {path} is not a readable safetensors file (its header is not a mapping); {fix}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{what}: {path}: the safetensors metadata must map names to strings")
    body = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        bad = f"{what}: {path}: tensor {name!r} has a malformed header entry"
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPE_BYTES:
            raise ValueError(f"{bad} (dtype {info.get('dtype') if isinstance(info, dict) else info!r})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        sizes_ok = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape)
        if not sizes_ok:
            raise ValueError(f"{bad} (shape {shape!r})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):
            raise ValueError(f"{what}: {path}: tensor {name!r} lies outside the file (offsets {offsets!r}, "
                             f"{body} data bytes): truncated or corrupt")
        count = 1
        for d in shape:
            count *= d
        if count * _ST_DTYPE_BYTES[info["dtype"]] != offsets[1] - offsets[0]:
            raise ValueError(f"{what}: {path}: tensor {name!r} declares shape {shape} ({info['dtype']}) but holds "
                             f"{offsets[1] - offsets[0]} bytes: corrupt")
        tensors[name] = {"dtype": info["dtype"], "shape": tuple(shape)}
    return tensors, metadata


def _json_meta(raw: dict[str, str], key: str, path: Path, what: str) -> dict[str, Any]:
    if key not in raw:
        return {}
    try:
        meta = json.loads(raw[key])
    except json.JSONDecodeError:
        raise ValueError(f"{what}: {path}: its {key!r} metadata is not valid JSON (corrupt file)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: {path}: its {key!r} metadata is not a mapping (corrupt file)")
    return meta


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file whose header :func:`safetensors_header` accepted."""
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: one message naming the file
        reason = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"{what}: {path} is not a readable safetensors file "
                         f"({type(err).__name__}: {reason})") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's dtype, shape and every byte of its values (what two equal tensors share, nothing else)."""
    t = torch.as_tensor(t).detach().cpu().contiguous()
    head = f"{t.dtype}:{tuple(t.shape)};".encode()
    return head + (t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _files_of(dataset: Any) -> list[str] | None:
    """The file behind each item of a streamed dataset, where it says (kdistill's folder data: ``files``;
    torchvision's ``ImageFolder``/``DatasetFolder``: ``samples``), through ``Subset``s; else None."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = _files_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    files = getattr(dataset, "files", None)
    if files is None and isinstance(getattr(dataset, "samples", None), (list, tuple)):
        files = [s[0] if isinstance(s, (tuple, list)) else s for s in dataset.samples]
    if not isinstance(files, (list, tuple)) or len(files) != len(dataset):
        return None
    return [str(f) for f in files] if all(isinstance(f, (str, os.PathLike)) for f in files) else None


def _hash_files(h, files: list[str]) -> None:
    """Each file's path, size and modification time (ns): a replaced or edited image changes them, and no
    pixel needs decoding."""
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{f}:missing;".encode())


def data_fingerprint(split) -> str:
    """sha256 (64 hex digits) of what a run trains on: input shape, class count, sample ids, labels (when
    known), and every input of an in-memory split (all bytes: one edited value changes it); for a streamed
    split, the path, size and modification time of every file behind it (folder data, torchvision
    ``ImageFolder``), or, for a dataset that names no files, its type and length only. Checkpoints record it
    (``--resume`` refuses other data) and so do logits files."""
    h = _split_hash(split)
    x = getattr(split, "x", None)
    if x is not None:
        h.update(b";x:")
        h.update(_tensor_bytes(x))
        return h.hexdigest()
    dataset = getattr(split, "dataset", None)
    files = _files_of(dataset) if dataset is not None else None
    if files is not None:
        h.update(b";files:")
        _hash_files(h, files)
    else:
        h.update(f";{type(dataset).__name__}:{len(split)}".encode())
    return h.hexdigest()


def _split_hash(split):
    """A sha256 over a split's input shape, class count, sample ids and labels: what every fingerprint covers."""
    h = hashlib.sha256(f"{tuple(split.input_shape)}:{split.num_classes};".encode())
    h.update(torch.as_tensor(split.index).detach().cpu().long().contiguous().numpy().tobytes())
    labels = split.y if hasattr(split, "y") else getattr(split, "labels", None)
    if labels is not None:
        h.update(b";y:")
        h.update(torch.as_tensor(labels).detach().cpu().long().contiguous().numpy().tobytes())
    return h


def legacy_data_fingerprint(split) -> str:
    """The 32-digit fingerprint of checkpoints written before every input was hashed (256 rows sampled), so
    such a checkpoint can still be resumed with the same data."""
    h = _split_hash(split)
    x = getattr(split, "x", None)
    if x is not None and len(x):
        rows = torch.linspace(0, len(x) - 1, min(256, len(x))).long().to(x.device)
        h.update(b";x:")
        h.update(x[rows].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def teacher_fingerprint(teacher: Any) -> dict[str, Any] | None:
    """What identifies a teacher, for ``--resume`` to refuse another one: its kind, spec and a sha256 of its
    weights (a network), of its logits and their ids (a logits file, or a teacher cached over the data), of
    the file (ONNX), or of its members, mean and temperature (an ensemble). None without a teacher."""
    if teacher is None:
        return None
    if isinstance(teacher, ModuleTeacher):
        teacher = teacher.module
    h = hashlib.sha256()
    if isinstance(teacher, nn.Module):
        for k, v in teacher.state_dict().items():
            h.update(k.encode() + b"=" + _tensor_bytes(v))
        spec = getattr(teacher, "spec", None) or f"{type(teacher).__module__}.{type(teacher).__qualname__}"
        return {"kind": "network", "spec": spec, "sha256": h.hexdigest()}
    if isinstance(teacher, CachedTeacher):
        ids = teacher.sorted_ids if teacher.row_of is None else teacher.row_of
        h.update(_tensor_bytes(ids) + _tensor_bytes(teacher.logits_table))
        return {"kind": "logits", "sha256": h.hexdigest(), "teachers": int(getattr(teacher, "teachers", 1))}
    path = getattr(teacher, "path", None)
    if path is not None and Path(path).is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"kind": type(teacher).__name__, "file": Path(path).name, "sha256": h.hexdigest()}
    members = getattr(teacher, "members", None)
    if members is not None:
        parts = [teacher_fingerprint(m) for m in members]
        return {"kind": "ensemble", "mean": getattr(teacher, "mean", None),
                "temperature": getattr(teacher, "temperature", None), "members": parts}
    return {"kind": type(teacher).__name__}


WEIGHT_FORMATS = (
    "kdistill model .safetensors (save_model), plain .safetensors state dict, kdistill checkpoint.safetensors, "
    ".pt/.pth/.bin state dict (torch.save; plain, or under 'state_dict'/'model')"
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel saves, torch.compile saves


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every key."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _safetensors_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _, raw = safetensors_header(path, "weights", f"Accepted: {WEIGHT_FORMATS}")
    if "kdistill_checkpoint" in raw:
        ckpt = _json_meta(raw, "kdistill_checkpoint", path, "weights")
        tensors = _load_tensors(path, "weights")
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return state, ({"spec": ckpt["spec"]} if ckpt.get("spec") else {})
    meta = _json_meta(raw, "kdistill", path, "weights")
    return _load_tensors(path, "weights"), meta


def _torch_weights(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch.save zip archive, or a (legacy) pickle
        raise ValueError(f"weights: {path} is not a torch.save file (neither a zip archive nor a pickle stream). "
                         f"Accepted: {WEIGHT_FORMATS}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols while refusing a file
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"weights: {path} holds pickled Python objects besides tensors (a whole model, custom classes), "
            f"which are never loaded; save model.state_dict() instead. Accepted: {WEIGHT_FORMATS}"
        ) from err
    except Exception as err:  # RuntimeError/EOFError/... for files that are not torch.save archives
        reason = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(
            f"weights: {path} is not a readable torch.save file ({type(err).__name__}: {reason}). "
            f"Accepted: {WEIGHT_FORMATS}"
        ) from err
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"weights: {path} holds {what}, not a state dict of tensors. Accepted: {WEIGHT_FORMATS}")
    return dict(obj)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, kdistill metadata or {})`` of a weights file, without building a model.

    Reads a kdistill model file, a plain safetensors state dict, a kdistill ``checkpoint.safetensors``
    (the ``model.`` tensors; optimiser and RNG state dropped; metadata holds its ``spec``) and
    ``.pt``/``.pth``/``.bin`` state dicts via ``torch.load(weights_only=True)`` (also nested under
    ``state_dict``/``model``). A ``module.`` prefix on every key (DDP) is removed. Nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, meta = _safetensors_weights(path)
    elif suffix in _TORCH_SUFFIXES:
        state, meta = _torch_weights(path), {}
    else:
        raise ValueError(f"weights: {path}: unknown weights format {suffix or '(no suffix)'!r}. Accepted: {WEIGHT_FORMATS}")
    return _strip_wrapper_prefix(state), meta


def _check_state(path: Path, model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> None:
    """ValueError naming the first offending keys when ``state`` does not fit ``model``."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and state[k].shape != want[k].shape]
    # load_state_dict would cast silently: an integer or bool tensor (a step count, a mask) read into a float
    # one, or float values truncated into an integer buffer. Only a float precision change is a plain cast.
    dtypes = [f"{k} {str(state[k].dtype).removeprefix('torch.')} vs {str(want[k].dtype).removeprefix('torch.')}"
              for k in want if k in state and state[k].dtype != want[k].dtype
              and not (state[k].is_floating_point() and want[k].is_floating_point())]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes),
                        ("dtype mismatch (file vs model)", dtypes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ValueError(f"weights: {path} does not fit model {spec!r}: " + "; ".join(problems)
                         + "; check --model / in_shape / num_classes")


def _refuse_code(path: Path, spec: str) -> None:
    """A file's own ``py:`` spec would import and run Python code the file names: refused unless trusted."""
    raise ValueError(f"weights: {path} records the model spec {spec!r}, which imports and runs that Python code; "
                     "a weights file never runs code unless you trust it: pass --trust-code (command line) or "
                     "trust_code=True (kdistill.io.load_model / the Python API), or give the spec yourself "
                     "(--teacher-model SPEC --teacher-weights FILE)")


def load_model(path: str | os.PathLike, spec: str | None = None, in_shape=None, num_classes=None, *,
               trust_code: bool = False) -> nn.Module:
    """Rebuild and load a model from any file :func:`load_weights` reads (arguments override the stored
    metadata; a plain state dict needs all three).

    A ``py:`` spec read from the file is built (its code imported and run) only with ``trust_code=True``;
    one passed as ``spec`` is the caller's choice. ``tv:``/``timm:``/``hf:`` specs call library builders (never
    with remote code). Tensors must keep their kind: an integer or bool tensor is never read into a float one
    (or the reverse); only float precision may change.
    """
    path = Path(path)
    state, meta = load_weights(path)
    from_file = not spec
    spec = spec or meta.get("spec")
    in_shape = in_shape or meta.get("in_shape")
    num_classes = num_classes or meta.get("num_classes")
    if not spec and meta.get("class"):
        raise ValueError(
            f"{path}: saved from class {meta['class']}, which kdistill cannot rebuild by itself; pass a spec "
            f"(--model py:FILE.py:FACTORY, with FACTORY(in_shape, num_classes) building that model)"
        )
    if not (spec and in_shape and num_classes):
        missing = [n for n, v in (("spec", spec), ("in_shape", in_shape), ("num_classes", num_classes)) if not v]
        raise ValueError(f"weights: {path}: no model {'/'.join(missing)} stored; pass them explicitly")
    if not isinstance(spec, str):
        raise ValueError(f"weights: {path}: the stored model spec {spec!r} is not a string (corrupt metadata)")
    if from_file and runs_code(spec) and not trust_code:
        _refuse_code(path, spec)
    hf_config = meta.get("hf_config") if from_file and spec.strip().startswith("hf:") else None
    if hf_config is not None and not isinstance(hf_config, dict):
        raise ValueError(f"weights: {path}: its hf_config {type(hf_config).__name__} is not a mapping (corrupt metadata)")
    if not (isinstance(in_shape, (list, tuple)) and 1 <= len(in_shape) <= 5
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000 for d in in_shape)):
        raise ValueError(f"weights: {path}: in_shape {in_shape!r} is not a sample shape (1 to 5 positive sizes)")
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and 1 <= num_classes <= 10_000_000):
        raise ValueError(f"weights: {path}: num_classes {num_classes!r} is not a positive class count")
    skeleton = build_on_meta(spec, in_shape, num_classes)  # shapes first: nothing allocated for a file that
    if skeleton is not None:  # does not fit (a small file whose metadata claims a huge model, say)
        _check_state(path, skeleton, state, spec)
    model = build_model(spec, in_shape, num_classes, hf_config=hf_config)
    _check_state(path, model, state, spec)
    bad = [k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())]
    if bad:
        raise ValueError(f"weights: {path} holds NaN values (in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                         "it was saved from a run that diverged")
    model.load_state_dict(state)
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model, optimiser tensors and (as JSON) the loop state, RNG states included, in one safetensors file.

    ``extra``: further named tensors (a method's trainable extras, the keep-best weights) restored by
    :func:`load_checkpoint` into ``state["extra"]``.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    for name, rng in state.pop("rng", {}).items():
        tensors[f"rng.{name}"] = rng
    meta = {"state": state, "param_groups": opt["param_groups"], "opt_scalars": opt_scalars, "spec": getattr(model, "spec", None)}
    try:
        with atomic_path(path) as tmp:
            save_file(_unshared(tensors), str(tmp), metadata={"kdistill_checkpoint": json.dumps(meta, default=_jsonable)})
    except Exception as exc:  # noqa: BLE001 - OSError or safetensors' own error (a Rust io error, e.g. ENOSPC)
        if not isinstance(exc, (OSError, SafetensorError)):
            raise
        raise OSError(write_failure(path, exc, "the previous checkpoint, if any, is kept")) from None


def write_failure(path: str | os.PathLike, exc: BaseException, kept: str) -> str:
    """One line for a file that could not be written: the file, "disk full" when it was, and what survives."""
    text = f"{getattr(exc, 'strerror', None) or ''} {exc}"
    full = getattr(exc, "errno", None) == errno.ENOSPC or any(
        s in text for s in ("No space left", "StorageFull", "os error 28", "code: 28"))
    reason = "disk full" if full else (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return f"cannot write {path}: {reason}; {kept}; free space (or fix the cause) and run again with --resume"


CHECKPOINT_FIX = ("the checkpoint cannot be read, so the run cannot continue: start it again with --overwrite "
                  "(overwrite=True in fit) instead of --resume")


def _checkpoint_meta(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    try:
        tensors, raw = safetensors_header(path, "checkpoint")
    except ValueError as exc:  # truncated (killed mid-copy, disk full) or not a safetensors file
        raise ValueError(f"{exc}; {CHECKPOINT_FIX}") from None
    if "kdistill_checkpoint" not in raw:
        raise ValueError(f"checkpoint: {path} is a safetensors file but not a kdistill checkpoint "
                         "(no training state in it); start a new run without --resume")
    meta = _json_meta(raw, "kdistill_checkpoint", path, "checkpoint")
    for key in ("state", "param_groups", "opt_scalars"):
        if key not in meta:
            raise ValueError(f"checkpoint: {path} lacks its {key!r} record (corrupt); start a new run")
    return tensors, meta


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The loop state a checkpoint records (epoch, history, config, method, data, model), from its header only."""
    _, meta = _checkpoint_meta(Path(path))
    return {**meta["state"], "spec": meta.get("spec")}


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimiser buffer its parameter's memory layout.

    Checkpoints store contiguous (NCHW) tensors; a channels_last parameter's momentum buffer loaded as NCHW
    has other strides, and the fused update kernels pair elements by memory position, so the resumed
    run diverged from the uninterrupted one. Copying into ``empty_like(param)`` restores the layout.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``model`` and ``optimizer`` in place; return the loop state (with ``rng`` tensors)."""
    path = Path(path)
    declared, meta = _checkpoint_meta(path)
    want = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: v["shape"] for k, v in declared.items() if k.startswith("model.")}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        name = getattr(model, "spec", type(model).__name__)
        raise ValueError(f"checkpoint: {path} holds another model than {name!r} "
                         f"(first difference: {diff[0]}); resume with the same --model")
    try:
        tensors = _load_tensors(path, "checkpoint")
    except ValueError as exc:
        raise ValueError(f"{exc}; {CHECKPOINT_FIX}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta["opt_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"checkpoint: {path}: its optimiser state does not fit this run's optimiser "
                         f"({type(exc).__name__}: {str(exc)[:160]}); resume with the same train.optimizer "
                         "and model") from None
    _match_param_layouts(optimizer)
    state = meta["state"]
    state["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    state["extra"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every run's outputs."""
    import numpy

    info = {
        "kdistill": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Training keeps freed host memory for reuse (kdistill.engine.heap); a run's record says whether
        # that was in effect, so it is switched on here, as the run starts, if it was not already.
        "heap_retained": retain_freed_memory(),
        **source_revision(),
    }
    return info


def source_revision() -> dict[str, Any]:
    """``git_commit`` (and ``git_dirty``: uncommitted changes) of the checkout kdistill runs from, so a record
    names the code that made it; ``{}`` for an installed wheel or where git is missing."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel"))
        if here.parents[1] != top.resolve():  # this package is not the checkout's src/kdistill (e.g. a venv in a repo)
            return {}
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
