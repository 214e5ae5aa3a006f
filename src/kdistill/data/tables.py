"""Tabular and array files as data sets: ``npz:PATH`` (numpy archives) and ``csv:PATH`` (one row per sample).

Both give in-memory splits: a file small enough to be a CSV or an ``.npz`` fits in memory. The numpy
archive is read with ``allow_pickle=False`` so a data file can never run code.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from kdistill.data.convert import check_classes, default_classes, to_inputs, to_labels, to_tensor_data
from kdistill.data.dataset import DataBundle, TensorData
from kdistill.data.splits import split_validation

NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL = ("x_val", "y_val", "classes")
SPLIT_NAMES = ("train", "val", "test")
MAX_UNUSED_IDS = 1000
"""How many class ids below the largest label may go unused before the ids are refused as gapped
(see :func:`check_label_ids`): a file's labels may miss a few classes, not most of them."""
_ARCHIVE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What numpy raises on a truncated or corrupted ``.npz`` (a bad CRC is a BadZipFile, bad data a zlib.error)."""


def existing_file(path: str | os.PathLike, source: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming it and the source that wanted it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{source}: no such file {str(p)!r}")
    return p


def _same_features(splits: dict[str, TensorData], origin: str) -> None:
    shapes = {name: d.input_shape for name, d in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{origin}: every split needs the same sample shape, got {shapes}")


def check_label_ids(labels: torch.Tensor, origin: str, fix: str) -> None:
    """Refuse class ids that leave most ids below the largest unused (``{0, 1, 100000}``): kdistill makes one
    class per id ``0..max``, so these would train a 100,001-class model. Runs before any class name is made,
    so a label of 10**9 costs nothing. ``fix`` says how this file could name its classes instead."""
    known = labels[labels >= 0]
    if not len(known):
        return
    top = int(known.max())
    used = len(torch.unique(known))
    if top + 1 - used > max(MAX_UNUSED_IDS, used):
        raise ValueError(
            f"{origin}: the labels use {used} distinct class ids but run up to {top}, and kdistill makes one class "
            f"per id 0..{top}; renumber them 0..{used - 1} (ids, y = np.unique(y, return_inverse=True)) or {fix}"
        )


def check_split_ids(labels: dict[str, torch.Tensor], origin: str, fix: str) -> None:
    """Refuse a val/test label that no training row has, for files whose classes are bare integer ids: the
    model would get an output no row teaches (a typo'd or shifted id, most likely). Files that declare class
    names may have classes without training rows; so may a training split with unlabelled rows."""
    train = labels["train"]
    if not len(train) or bool((train < 0).any()):
        return
    seen = set(torch.unique(train).tolist())
    for s in ("val", "test"):
        if s not in labels:
            continue
        extra = sorted(set(torch.unique(labels[s][labels[s] >= 0]).tolist()) - seen)
        if extra:
            shown = ", ".join(map(str, extra[:5])) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ValueError(f"{origin}: the {s} split has label(s) {shown} that no training row has (the model "
                             f"would have classes nothing teaches); fix those labels, add training rows of them, "
                             f"or {fix}")


def _memory_limit() -> int | None:
    """Bytes this process may still allocate: the smaller of the machine's available memory and the address-space
    limit (``ulimit -v``), or None when neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def _check_declared_sizes(archive: np.lib.npyio.NpzFile, keys: list[str], origin: str) -> None:
    """Refuse arrays whose headers declare more bytes than fit in memory, before any is decompressed: a few-MB
    compressed ``.npz`` of zeros can declare gigabytes (a decompression bomb)."""
    limit = _memory_limit()
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    declared = {}
    for key in keys:
        try:
            with archive.zip.open(f"{key}.npy") as f:
                reader = readers.get(np.lib.format.read_magic(f))
                if reader is None:
                    continue
                shape, _, dtype = reader(f)
        except (*_ARCHIVE_ERRORS, KeyError):
            continue  # read (and refused by name) below
        declared[key] = int(np.prod(shape, dtype=object)) * dtype.itemsize
    total = sum(declared.values())
    if limit is not None and total > limit:
        big = max(declared, key=declared.get)
        size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        raise ValueError(f"{origin}: its arrays declare {size(total)} ({big}: {size(declared[big])}), more than "
                         f"the {size(limit)} this process can hold (a decompression bomb?); use "
                         "a smaller file, or a folder: data set, which streams from disk")


def _npz_classes(archive: np.lib.npyio.NpzFile, origin: str) -> list[str] | None:
    if "classes" not in archive.files:
        return None
    try:
        names = archive["classes"]
    except ValueError as exc:  # an object array: would need pickle
        raise ValueError(
            f"{origin}: 'classes' is stored as Python objects; save it as a string array "
            "(np.savez(..., classes=np.array(names, dtype=str)))"
        ) from exc
    if names.ndim != 1:
        raise ValueError(f"{origin}: 'classes' must be a 1-D array of names, got shape {names.shape}")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in names.tolist()]


def load_npz(path: str | os.PathLike) -> DataBundle:
    """A numpy archive with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``x_val`` and
    ``y_val`` (then used as the validation split) and ``classes`` (names, one per class id).

    Inputs follow :func:`~kdistill.data.convert.to_tensor_data`: uint8 is scaled to [0, 1], other dtypes
    are kept as values; labels must be whole class ids.
    """
    p = existing_file(path, "npz")
    origin = str(p)
    try:
        archive = np.load(p, allow_pickle=False)
    except _ARCHIVE_ERRORS as exc:
        raise ValueError(f"{origin}: not a readable numpy .npz archive ({exc}); write it again with np.savez") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{origin}: holds a single array; save the splits with np.savez(path, x_train=..., ...)")
    with archive:
        present = set(archive.files)
        missing = [k for k in NPZ_REQUIRED if k not in present]
        if ("x_val" in present) != ("y_val" in present):
            missing.append("y_val" if "x_val" in present else "x_val")
        if missing:
            raise ValueError(
                f"{origin}: missing arrays {missing}; the file has {sorted(present)}. Expected "
                f"{list(NPZ_REQUIRED)}, optionally {list(NPZ_OPTIONAL)}"
            )
        names = _npz_classes(archive, origin)
        splits = [s for s in SPLIT_NAMES if f"x_{s}" in present]
        _check_declared_sizes(archive, [f"{a}_{s}" for s in splits for a in "xy"], origin)
        try:
            raw = {s: (archive[f"x_{s}"], archive[f"y_{s}"]) for s in splits}
        except MemoryError:
            raise ValueError(f"{origin}: its arrays do not fit in memory; use a smaller file, or a folder: data set, "
                             "which streams from disk") from None
        except _ARCHIVE_ERRORS as exc:
            if isinstance(exc, ValueError) and "pickle" in str(exc):
                raise ValueError(f"{origin}: arrays stored as Python objects cannot be read; save numeric arrays") from exc
            raise ValueError(f"{origin}: an array is corrupt or cut short ({exc}); write the file again with "
                             "np.savez") from exc
    labels = {}
    for s, (_, y) in raw.items():
        try:
            labels[s] = to_labels(y, f"y_{s}")
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from exc
    every = torch.cat(list(labels.values()))
    if names is None:
        check_label_ids(every, origin, "save the names as `classes` (one per id 0..max)")
        check_split_ids(labels, origin, "save the class names as `classes` to keep classes without training rows")
    classes = default_classes(every) if names is None else check_classes(every, names, f"{origin}: classes")
    out = {}
    for s, (x, _) in raw.items():
        try:
            inputs = to_inputs(x, f"x_{s}")
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from exc
        if len(inputs) != len(labels[s]):
            raise ValueError(f"{origin}: x_{s} has {len(inputs)} rows but y_{s} has {len(labels[s])} labels")
        out[s] = TensorData(x=inputs, y=labels[s], classes=classes, name=f"{p.stem}-{s}")
    _same_features(out, origin)
    return DataBundle(train=out["train"], test=out["test"], val=out.get("val"))


def _read_text(p: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark is fine); UTF-16 or other encodings are refused naming the fix."""
    raw = p.read_bytes()
    save = "save it as UTF-8 (Excel: 'CSV UTF-8'; pandas: df.to_csv(path, index=False), which writes UTF-8)"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:
        raise ValueError(f"{p}: the file is UTF-16 text (or binary), not a UTF-8 CSV; {save}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); {save}") from None


def _read_rows(p: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, cells)`` of every non-blank row."""
    reader = csv.reader(io.StringIO(_read_text(p), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{p}: the file is empty; expected a header row naming the columns")
        header = [h.strip() for h in header]
        rows = []
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{p}: line {reader.line_num} has {len(cells)} cells, the header has {len(header)} columns"
                )
            rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise ValueError(f"{p}: line {reader.line_num} is not readable CSV ({exc})") from None
    if not rows:
        raise ValueError(f"{p}: no data rows below the header")
    return header, rows


def _check_header(header: list[str], label_column: str, p: Path) -> None:
    """Refuse a repeated column name, and a copy of the label column (``label.1``, as pandas names a second
    ``label``): either would be read as a feature, and a copy of the label is a feature equal to the answer."""
    for i, name in enumerate(header):
        if name in header[:i]:
            leak = "; as a feature, the second label column would hand the model its answer" if name == label_column else ""
            raise ValueError(f"{p}: column {name!r} appears twice in the header (columns {header.index(name) + 1} "
                             f"and {i + 1}){leak}; drop or rename one")
    copies = [h for h in header if re.fullmatch(re.escape(label_column) + r"\.[0-9]+", h)]
    if copies:
        raise ValueError(f"{p}: column {copies[0]!r} looks like a second copy of the label column {label_column!r} "
                         "(pandas names a repeated header 'label.1'); as a feature it would hand the model its "
                         "answer: drop the column")


def _column(header: list[str], name: str, option: str, p: Path) -> int:
    if name not in header:
        raise ValueError(f"{p}: no column {name!r} (option {option}); the columns are {header}")
    return header.index(name)


def _parse_labels(values: list[str], lines: list[int], p: Path, column: str) -> tuple[list[int], tuple[str, ...]]:
    """Integer labels (whole numbers, '3' or '3.0') keep their ids; any other value makes them names."""
    for v, line in zip(values, lines):
        if not v:
            raise ValueError(f"{p}: empty {column!r} cell on line {line}; every row needs a label")
    ids: list[int] = []
    for v, line in zip(values, lines):
        try:
            f = float(v)
        except ValueError:
            break
        if not f.is_integer():
            raise ValueError(
                f"{p}: label {v!r} in column {column!r} is not a whole class id; use integer ids or class names"
            )
        if not -(2**63) <= int(f) < 2**63:  # int64 would wrap it negative
            raise ValueError(f"{p}: label {v!r} in column {column!r} (line {line}) is beyond int64's range, so it is "
                             "no class id; renumber the labels 0..K-1, or write class names instead")
        ids.append(int(f))
    else:
        try:
            labels = to_labels(ids, column)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
        check_label_ids(labels, f"{p}: column {column!r}", "write class names instead of ids in the column")
        return ids, default_classes(labels)
    names = tuple(sorted(set(values)))
    lookup = {n: i for i, n in enumerate(names)}
    return [lookup[v] for v in values], names


def _parse_features(rows: list[tuple[int, list[str]]], cols: list[int], header: list[str], p: Path) -> np.ndarray:
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    for r, (line, cells) in enumerate(rows):
        for j, c in enumerate(cols):
            try:
                out[r, j] = float(cells[c])
            except ValueError:
                raise ValueError(
                    f"{p}: column {header[c]!r}, line {line} (data row {r + 1}): {cells[c]!r} is not a number; "
                    "feature columns must be numeric (encode categories as numbers, or drop the column)"
                ) from None
    return out


def load_csv(
    path: str | os.PathLike,
    label_column: str = "label",
    split_column: str | None = None,
    test_size: int | float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """A CSV file with a header row: one numeric column per feature and a label column.

    Labels may be integer class ids (classes ``"0"..``) or names (classes = the sorted unique names).
    A split column (``split_column``, by default ``split`` when the file has one) assigns rows to
    ``train``/``val``/``test``; without one, a stratified ``test_size`` share (a fraction, or a count) of
    the rows, chosen with ``seed``, is the test split. Every other column is a feature.
    """
    p = existing_file(path, "csv")
    header, rows = _read_rows(p)
    _check_header(header, label_column, p)
    label_at = _column(header, label_column, "label_column", p)
    split_at = None
    if split_column is not None:
        split_at = _column(header, split_column, "split_column", p)
    elif "split" in header and label_column != "split":
        split_at = header.index("split")
    features = [i for i in range(len(header)) if i not in (label_at, split_at)]
    if not features:
        raise ValueError(f"{p}: no feature columns besides {header[label_at]!r}")
    lines = [line for line, _ in rows]
    y, classes = _parse_labels([cells[label_at].strip() for _, cells in rows], lines, p, header[label_at])
    x = _parse_features(rows, features, header, p)
    full = to_tensor_data(x, y, classes=classes, name=p.stem)
    if split_at is None:
        n = len(full)
        count = round(test_size * n) if isinstance(test_size, float) and test_size < 1 else int(test_size)
        if not 0 < count < n:
            raise ValueError(f"{p}: test_size must leave both splits non-empty for {n} rows, got {test_size}")
        train, test = split_validation(full, count, seed=seed)
        parts = {"train": train, "test": test}
    else:
        where = [cells[split_at].strip().lower() for _, cells in rows]
        for w, line in zip(where, lines):
            if w not in SPLIT_NAMES:
                raise ValueError(
                    f"{p}: column {header[split_at]!r}, line {line}: {w!r} is not one of {list(SPLIT_NAMES)}"
                )
        parts = {}
        for s in SPLIT_NAMES:
            rows_s = torch.tensor([i for i, w in enumerate(where) if w == s], dtype=torch.long)
            if len(rows_s):
                parts[s] = full.subset(rows_s)
        for s in ("train", "test"):
            if s not in parts:
                raise ValueError(f"{p}: column {header[split_at]!r} marks no row as {s!r}; need train and test rows")
        if classes == default_classes(full.y):  # integer ids, no class names
            check_split_ids({s: d.y for s, d in parts.items()}, f"{p}: column {header[label_at]!r}",
                            "write class names instead of ids to keep classes without training rows")
    # Sample ids count within each split, as for every other loader.
    out = {s: TensorData(d.x, d.y, classes, torch.arange(len(d)), f"{p.stem}-{s}") for s, d in parts.items()}
    return DataBundle(train=out["train"], test=out["test"], val=out.get("val"))
