"""Bad data files and splits, by family: CSV tables, npz archives, and splits or students that do not fit.

Each family is one parametrized test. CLI cases run ``kdistill train --data csv:FILE`` (or ``npz:FILE``) in
this process and expect exit code 2, one stderr line ``kdistill: error: ...`` naming the file and what is
wrong, and nothing written to ``--out``: every case is found when the data is loaded, before training.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import data
from kdistill.cli.app import main


def _rows(n: int = 30, labels=None, split=None) -> list[str]:
    labels = [i % 3 for i in range(n)] if labels is None else labels
    rows = [f"{i % 5},{(i * 7) % 11},{labels[i]}" for i in range(n)]
    return [f"{r},{split[i]}" for i, r in enumerate(rows)] if split is not None else rows


def _csv(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


SPLITS = ["test" if i % 5 == 0 else "train" for i in range(30)]
CSV_CASES = [
    # (id, file bytes, texts the error line must hold)
    ("label-twice", _csv("a,b,label,label", [f"{r},{r[-1]}" for r in _rows()]).encode(),
     ["column 'label' appears twice", "columns 3 and 4", "its answer"]),
    ("pandas-label-1", _csv("a,label,b,label.1", [f"{r.split(',')[0]},{r.split(',')[2]},{r.split(',')[1]},"
                                                  f"{r.split(',')[2]}" for r in _rows()]).encode(),
     ["'label.1'", "second copy of the label column"]),
    ("label-gap-100000", _csv("a,b,label", _rows(labels=[[0, 1, 100000][i % 3] for i in range(30)])).encode(),
     ["column 'label'", "3 distinct class ids but run up to 100000", "renumber them 0..2"]),
    ("utf16-bom", _csv("a,b,label", _rows()).encode("utf-16"), ["UTF-16", "save it as UTF-8"]),
    ("utf16le-no-bom", _csv("a,b,label", _rows()).encode("utf-16-le"), ["UTF-16", "save it as UTF-8"]),
    ("latin1", _csv("a,b,label", _rows(labels=["caf\xe9", "th\xe9", "eau"] * 10)).encode("latin-1"),
     ["not UTF-8 text", "save it as UTF-8"]),
    ("test-label-minus-1", _csv("a,b,label,split", _rows(labels=[-1 if i == 5 else i % 3 for i in range(30)],
                                                         split=SPLITS)).encode(),
     ["test split has 1 unlabelled row", "label -1"]),
    ("label-1e19", _csv("a,b,label", _rows(labels=["1e19" if i == 4 else i % 3 for i in range(30)])).encode(),
     ["label '1e19'", "line 6", "beyond int64's range"]),  # was "labels must be >= 0 ... found -9223372036854775808"
    ("test-label-unseen", _csv("a,b,label,split", _rows(labels=[7 if i == 5 else i % 3 for i in range(30)],
                                                        split=SPLITS)).encode(),
     ["the test split has label(s) 7 that no training row has", "write class names"]),
]


def _refused(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI; assert one short error line, exit code 2, nothing in ``out``; return the line."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        rc = main(argv + ["--out", str(out), "--no-progress"])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), err[-3000:]
    assert "Traceback" not in err and len(lines[0]) < 600
    assert time.perf_counter() - start < 10
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return lines[0]


@pytest.mark.parametrize("raw, needles", [c[1:] for c in CSV_CASES], ids=[c[0] for c in CSV_CASES])
def test_bad_csv_is_refused_naming_file_and_fix(raw, needles, tmp_path, capsys):
    """A copied label column (a leak), gapped ids (a 100,001-class model), a UTF-16 or Latin-1 file, an
    unlabelled test row: each refused at load, naming the file."""
    path = tmp_path / "table.csv"
    path.write_bytes(raw)
    line = _refused(["train", "--data", f"csv:{path}", "--model", "mlp:8", "--epochs", "1"], tmp_path / "out", capsys)
    assert "table.csv" in line, line
    for needle in needles:
        assert needle in line, (needle, line)


# ---------------------------------------------------------------------------------------------- npz

_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(60, 4)).astype(np.float32)
Y = np.arange(60) % 3


def _corrupt_member(path: Path, member: str) -> None:
    """Flip bytes inside one stored array of an .npz (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    raw[start:start + 4] = bytes(b ^ 0xFF for b in raw[start:start + 4])
    path.write_bytes(bytes(raw))


NPZ_CASES = [
    # (id, arrays, what to do to the written file, texts the error line must hold)
    ("labels-far-above", dict(y_train=np.where(Y == 2, 5000, Y)), None,
     ["4 distinct class ids but run up to 5000", "`classes`"]),
    ("label-1e9", dict(y_train=np.where(np.arange(60) == 7, 10**9, Y)), None, ["run up to 1000000000"]),
    ("test-label-minus-1", dict(y_test=np.array([0, 1, 2, -1, 0, 1])), None,
     ["test split has 1 unlabelled row"]),
    ("val-label-minus-1", dict(x_val=X[:6], y_val=np.array([0, -1, 2, 0, 1, 2])), None,
     ["val split has 1 unlabelled row"]),
    ("test-empty", dict(x_test=np.zeros((0, 4), np.float32), y_test=np.zeros(0, np.int64)), None,
     ["test split is empty"]),
    ("test-corrupt", {}, "x_test.npy", ["corrupt or cut short", "x_test.npy"]),
    ("uint64-2**63", dict(y_train=np.where(Y == 2, 2**63, Y).astype(np.uint64)), None,
     ["y_train: label 9223372036854775808 is beyond int64's range"]),
    ("float-1e19", dict(y_test=np.array([0, 1, 2, 1e19, 0, 1])), None, ["y_test: label 10000000000000000000 is beyond"]),
    ("classes-repeated", dict(classes=np.array(["a", "b", "a"])), None,
     ["class name 'a' is given twice (ids 0 and 2)"]),
    ("test-label-unseen", dict(y_test=np.array([0, 1, 7, 0, 1, 2])), None,
     ["the test split has label(s) 7 that no training row has", "save the class names as `classes`"]),
    ("val-label-unseen", dict(x_val=X[:6], y_val=np.array([0, 1, 2, 3, 4, 5])), None,
     ["the val split has label(s) 3, 4, 5 that no training row has"]),
    ("truncated", {}, "half", ["not a readable numpy .npz archive"]),
]


@pytest.mark.parametrize("arrays, damage, needles", [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES])
def test_bad_npz_is_refused_before_training(arrays, damage, needles, tmp_path, capsys):
    """Labels far above the others (one class per id up to the top one: a label of 10**9 would build a
    billion class names first), an unlabelled, empty or corrupt test or val split: refused at load, before
    any file of the run is written (they used to surface after training, leaving five files)."""
    path = tmp_path / "d.npz"
    np.savez(path, **{"x_train": X, "y_train": Y, "x_test": X[:6], "y_test": Y[:6], **arrays})
    if damage == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage:
        _corrupt_member(path, damage)
    line = _refused(["train", "--data", f"npz:{path}", "--model", "mlp:8", "--epochs", "1"], tmp_path / "out", capsys)
    assert "d.npz" in line, line
    for needle in needles:
        assert needle in line, (needle, line)


# -------------------------------------------------------------------------- splits and students that misfit


def _xy(n: int = 60, k: int = 3, classes=None):
    g = torch.Generator().manual_seed(0)
    return data.to_tensor_data(torch.randn(n, 4, generator=g), torch.arange(n) % k, classes=classes)


def _npz_split(tmp_path: Path, name: str, classes: list[str]):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x_train=X, y_train=Y, x_test=X[:6], y_test=Y[:6], classes=np.array(classes))
    return data.load(f"npz:{path}", val_size=0)


def _fit(tmp_path: Path, model=None, **kw):
    from kdistill.engine import TrainConfig, fit

    return fit(model if model is not None else nn.Linear(4, 3), kw.pop("train", _xy(classes=["a", "b", "c"])),
               TrainConfig(epochs=1, batch_size=20), progress=False, out_dir=tmp_path / "out", **kw)


FIT_CASES = [
    ("val-other-names", lambda t: _fit(t, val=_xy(classes=["x", "y", "z"])),
     ["val:", "['x', 'y', 'z']", "['a', 'b', 'c']", "classes=train.classes"]),
    ("val-default-names", lambda t: _fit(t, val=_xy()), ["val:", "['0', '1', '2']", "['a', 'b', 'c']"]),
    ("test-reordered-names", lambda t: _fit(t, test=_xy(classes=["b", "a", "c"])), ["test:", "['b', 'a', 'c']"]),
    ("npz-val-other-classes", lambda t: _fit(t, train=_npz_split(t, "tr", ["cat", "dog", "owl"]).train,
                                             val=_npz_split(t, "va", ["dog", "cat", "owl"]).test),
     ["val:", "tr-train", "va-test", "['dog', 'cat', 'owl']"]),
    ("api-classes-repeated", lambda t: data.to_tensor_data(X, Y, classes=["a", "b", "a"]),
     ["classes: class name 'a' is given twice (ids 0 and 2)"]),
    ("student-without-parameters", lambda t: _fit(t, model=nn.Sequential(nn.Flatten(), nn.Identity()),
                                                  train=data.to_tensor_data(X[:, :3], Y)),
     ["model: Sequential has no parameters", "nothing to train"]),
]


@pytest.mark.parametrize("call, needles", [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_refuses_splits_and_students_that_do_not_fit(call, needles, tmp_path):
    """A val/test split naming its classes otherwise than the training split (its ids would mean other
    classes) and a student with no parameters: one ValueError naming both sides, before any file."""
    with pytest.raises(ValueError) as info:
        call(tmp_path)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_what_the_checks_leave_alone(tmp_path):
    """Still accepted: a val split naming only the first classes, a few unused ids, unlabelled training rows
    (the carved validation split takes labelled rows only), and explicit npz class names for gapped ids."""
    from kdistill.engine.loop import preflight
    from kdistill.engine import TrainConfig

    train = _xy(classes=["a", "b", "c"])
    preflight(nn.Linear(4, 3), train, TrainConfig(epochs=1), val=_xy(k=2, classes=["a", "b"]))
    path = tmp_path / "gaps.csv"
    labels = [[0, 1, 7][i % 3] if i % 10 else -1 for i in range(60)]
    path.write_text(_csv("a,b,label", _rows(60, labels=labels)))
    bundle = data.load(f"csv:{path}", val_size=0.2)
    assert bundle.classes == tuple(str(i) for i in range(8))
    assert bool((bundle.train.y == -1).any()) and bool((bundle.val.y >= 0).all()) and len(bundle.val) == 10
    npz = tmp_path / "named.npz"
    np.savez(npz, x_train=X, y_train=np.where(Y == 2, 5000, Y), x_test=X[:6], y_test=Y[:6],
             classes=np.array([str(i) for i in range(5001)]))
    assert data.load(f"npz:{npz}").train.num_classes == 5001


def test_classes_without_training_rows_stay_allowed_where_the_data_declares_them(tmp_path):
    """A test label no training row has is refused only for bare integer ids: declared class names (npz
    ``classes``, names in a CSV) may have classes without training rows, and so may unlabelled training rows."""
    named = tmp_path / "named.npz"
    np.savez(named, x_train=X, y_train=Y, x_test=X[:6], y_test=np.array([0, 1, 3, 0, 1, 2]),
             classes=np.array(["a", "b", "c", "d"]))
    assert data.load(f"npz:{named}", val_size=0).classes == ("a", "b", "c", "d")
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=X, y_train=np.full(60, -1), x_test=X[:6], y_test=Y[:6])
    assert len(data.load(f"npz:{unlabelled}", val_size=0).test) == 6
    path = tmp_path / "names.csv"
    names = ["owl" if i == 5 else ["ant", "bee", "cat"][i % 3] for i in range(30)]
    path.write_text(_csv("a,b,label,split", _rows(labels=names, split=SPLITS)))
    assert data.load(f"csv:{path}", val_size=0).classes == ("ant", "bee", "cat", "owl")


def test_an_npz_declaring_more_memory_than_there_is_is_refused_before_decompressing(tmp_path, monkeypatch, capsys):
    """A few-kB compressed archive of zeros can declare gigabytes: its headers are read first and the file refused
    by name (it was numpy's raw _ArrayMemoryError traceback, or all of the machine's memory)."""
    from kdistill.data import tables

    y = np.arange(40) % 2
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x_train=np.zeros((40, 4), np.float32), y_train=y,
                        x_test=np.zeros((4_000, 1_000), np.float32), y_test=np.zeros(4_000, np.int64))
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(tables, "_memory_limit", lambda: 8 * 2**20, raising=False)  # this process may hold 8 MiB more
    read = []
    monkeypatch.setattr(tables.np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key))
    capsys.readouterr()
    assert main(["train", "--data", f"npz:{path}", "--model", "mlp:4", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bomb.npz" in err and "x_test: 15.3 MiB" in err, err
    assert "decompression bomb" in err and read == [] and not (tmp_path / "o").exists()
