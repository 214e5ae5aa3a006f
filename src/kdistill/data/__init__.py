"""Data sets as in-memory tensors, validation splits, transfer-set filters and batched jitter.

:func:`load` takes a registered name (``mnist``, ``cifar10``, ...) or a file spec ``PREFIX:PATH``
(``npz:data.npz``, ``csv:table.csv``, ``folder:images/``); user data held in Python goes through
:func:`as_split`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdistill.config.types import Field, closest, coerce, finite_anything, short_repr, signature_fields

from kdistill.data.augment import jitter, jittered_copies
from kdistill.data.convert import as_split, to_tensor_data
from kdistill.data.dataset import UNLABELLED, DataBundle, Split, StreamData, TensorData
from kdistill.data.mnist import load_fashion_mnist, load_mnist
from kdistill.data.splits import check_eval_split, drop_labels, keep_classes, omit_classes, split_validation, stratified_fraction, with_validation
from kdistill.data.toy import load_digits, load_synthetic
from kdistill.data.preprocess import PIXEL_SCALE, parse_normalize, preprocess_bundle

LOADERS: dict[str, Callable[..., DataBundle]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "synthetic": load_synthetic,
}
DEFAULT_VAL_SIZE = {"mnist": 5000, "fashion-mnist": 5000, "digits": 0.15, "synthetic": 0.1}


def register_loader(name: str, loader: Callable[..., DataBundle], val_size: int | float = 0.1) -> None:
    """Make ``name`` loadable by :func:`load` (and so by the CLI and configs)."""
    LOADERS[name] = loader
    DEFAULT_VAL_SIZE[name] = val_size


SOURCES: dict[str, Callable[..., DataBundle]] = {}
"""File-spec prefixes: ``SOURCES["npz"](path, **options)`` loads ``npz:PATH``."""
SOURCE_VAL_SIZE: dict[str, int | float] = {}


def register_source(prefix: str, loader: Callable[..., DataBundle], val_size: int | float = 0.1) -> None:
    """Make ``PREFIX:PATH`` loadable by :func:`load`: ``loader(PATH, **options)``.

    The loader also gets ``seed=`` when it takes one (for its own seeded splits). When it returns a
    bundle with a ``val`` split (the file brings one), that is used and nothing is carved.
    """
    if not prefix or ":" in prefix:
        raise ValueError(f"register_source: prefix must be a non-empty name without ':', got {prefix!r}")
    SOURCES[prefix] = loader
    SOURCE_VAL_SIZE[prefix] = val_size


def data_loader(name: str):
    """``(loader, skip, label)`` for data set ``name`` (a registered name or a ``PREFIX:PATH`` file spec)."""
    prefix, sep, _ = name.partition(":")
    if sep and prefix in SOURCES:
        return SOURCES[prefix], 1, f"{prefix}:"
    if not sep and name in SOURCES:
        return SOURCES[name], 1, f"{name}:"
    if name in LOADERS:
        return LOADERS[name], 0, repr(name)
    raise ValueError(
        f"data.name: unknown data set {short_repr(name)}{closest(name, LOADERS)}; choose one of {sorted(LOADERS)} "
        f"or a file spec {', '.join(f'{p}:PATH' for p in sorted(SOURCES))}"
    )


def loader_fields(loader: Callable[..., Any], skip: int, keep_seed: bool = False) -> dict[str, Field] | None:
    """A data loader's keyword options (``seed`` excluded unless asked: :func:`kdistill.data.load` owns it)."""
    return signature_fields(loader, skip, exclude=() if keep_seed else ("seed",))


def coerce_loader_options(name: str, options: Mapping[str, Any], where: str = "data") -> dict[str, Any]:
    """Options for data set ``name``'s loader, typed by its signature; unknown ones refused."""
    loader, skip, label = data_loader(name)
    fields = loader_fields(loader, skip)
    if fields is None:
        return {k: finite_anything(v, f"{where}.{k}") for k, v in options.items()}
    if skip == 1:  # a file spec's loader takes the path first: `npz` with path=FILE
        fields = {"path": Field("path", str | None, None), **fields}
    for key in options:
        if key not in fields:
            raise ValueError(f"{where}.{key}: data set {label} has no option {short_repr(key)}{closest(key, fields)}; "
                             f"it accepts {sorted(fields) or 'no options'}")
    out = {}
    for k, v in options.items():
        hint = fields[k].hint
        if k == "path" and isinstance(v, (str, os.PathLike)):
            v = os.fspath(v)
        out[k] = coerce(v, hint, f"{where}.{k}")
    return out


def _typed_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The loader's options coerced to the types of its signature (see :mod:`kdistill.config.schema`); a ``path``
    that does not exist is an error rather than a silent fall-back to the cache or a download."""
    typed = coerce_loader_options(name, options)
    path = typed.get("path")
    if path is not None and name in LOADERS and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"data.path: no such file or directory {str(path)!r} (for data set {name!r})")
    return typed


def _split_spec(name: str, options: dict[str, Any]) -> tuple[str, str] | None:
    """``(prefix, path)`` when ``name`` is a file spec ``PREFIX:PATH`` (or a bare prefix with ``path=``)."""
    prefix, sep, path = name.partition(":")
    if sep and prefix in SOURCES:
        if not path:
            raise ValueError(f"data: {name!r} names no path; write {prefix}:PATH")
        if options.get("path") not in (None, path):
            raise ValueError(f"data: {name!r} already names a path; drop path={options['path']!r}")
        options.pop("path", None)
        return prefix, path
    if not sep and name in SOURCES:
        if options.get("path") is None:
            raise ValueError(f"data: {name!r} needs a file; write {name}:PATH (or pass path=PATH)")
        return name, str(options.pop("path"))
    return None


def load(name: str, *, val_size: int | float | None = None, seed: int = 0, normalize: Any = None,
         **options: Any) -> DataBundle:
    """Load data set ``name`` with a seeded validation split carved from its training set.

    ``name`` is a registered data set (:data:`LOADERS`) or a file spec ``PREFIX:PATH`` (:data:`SOURCES`:
    ``npz:``, ``csv:``, ``folder:``). ``options`` go to the loader (``path=`` for local files,
    ``class_sep=`` for synthetic, ``image_size=`` for folders, ...); an option it does not take is an error
    listing those it does. ``val_size=0`` keeps all training data and no validation split; a data set that
    brings its own validation split keeps it and nothing is carved. ``normalize`` (``none``, ``imagenet``,
    ``cifar10`` or ``{mean, std}``, see :mod:`kdistill.data.preprocess`) is applied to every split once, and
    recorded on each as ``preprocessing``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.name: give a data set name or file spec, got {name!r}")
    load_fields = signature_fields(load, 1, named_only=True)
    val_size = coerce(val_size, load_fields["val_size"].hint, "data.val_size")
    seed = coerce(seed, load_fields["seed"].hint, "data.seed")
    if val_size is not None and val_size < 0:
        raise ValueError(f"data.val_size: a count or a fraction >= 0, got {val_size!r}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"data.seed: must be in [0, 2**31), got {seed!r}")
    norm = parse_normalize(normalize)
    options = dict(options)
    if name in LOADERS or _split_spec(name, dict(options)) is not None:
        options = _typed_options(name, options)
    spec = _split_spec(name, options)
    if spec is not None:
        prefix, path = spec
        loader = SOURCES[prefix]
        if "seed" in (loader_fields(loader, 1, keep_seed=True) or ()):
            options["seed"] = seed
        bundle = loader(path, **options)
        default = SOURCE_VAL_SIZE.get(prefix, 0.1)
        scale = PIXEL_SCALE.get(prefix)
    elif name in LOADERS:
        bundle = LOADERS[name](**options)
        default = DEFAULT_VAL_SIZE.get(name, 0.1)
        scale = PIXEL_SCALE.get(name)
    else:
        raise ValueError(
            f"data: unknown data set {name!r}; choose one of {sorted(LOADERS)} or a file spec "
            f"{', '.join(f'{p}:PATH' for p in sorted(SOURCES))}"
        )
    bundle = preprocess_bundle(bundle, norm, scale)
    if bundle.val is None:
        size = default if val_size is None else val_size
        try:
            bundle = with_validation(bundle, size, seed) if size else bundle
        except ValueError as exc:
            if str(exc).startswith("val_size"):
                raise ValueError(f"data.{exc}") from None
            raise
    for role in ("val", "test"):  # found now, not after training: every row present and labelled
        check_eval_split(getattr(bundle, role), role, name)
    return bundle


from kdistill.data.cifar import load_cifar10  # noqa: E402
from kdistill.data.cifar100 import load_cifar100  # noqa: E402
from kdistill.data.folder import load_folder  # noqa: E402
from kdistill.data.tables import load_csv, load_npz  # noqa: E402

register_loader("cifar10", load_cifar10, 5000)
register_loader("cifar100", load_cifar100, 5000)
register_source("npz", load_npz)
register_source("csv", load_csv)
register_source("folder", load_folder)
from kdistill.data.text import load_text_source  # noqa: E402
register_source("text", load_text_source)


__all__ = [
    "UNLABELLED", "DataBundle", "TensorData", "StreamData", "Split", "LOADERS", "SOURCES", "load",
    "register_loader", "register_source", "as_split", "to_tensor_data", "jitter", "jittered_copies",
    "load_mnist", "load_fashion_mnist", "load_digits", "load_synthetic", "load_cifar10", "load_cifar100",
    "load_npz", "load_csv", "load_folder", "split_validation", "with_validation", "omit_classes",
    "keep_classes", "stratified_fraction", "drop_labels",
]
