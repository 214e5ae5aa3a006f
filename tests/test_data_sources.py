"""File-spec data sources (npz:, csv:, folder:), CIFAR-100, StreamData splits and user-data conversion."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdistill import data
from kdistill.data import cifar100
from kdistill.data.convert import as_split, to_tensor_data
from kdistill.data.dataset import StreamData, TensorData
from kdistill.data.folder import FolderDataset

# ---------------------------------------------------------------------------------------------- npz


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_with_val_classes_and_uint8_scaling(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    y_tr = np.arange(30) % 3
    x_te, y_te = rng.random((9, 1, 4, 4)), np.arange(9) % 3
    p = _npz(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             x_val=x_tr[:6], y_val=y_tr[:6].astype(np.float64), classes=np.array(["a", "b", "c"]))
    b = data.load(f"npz:{p}", seed=0)
    assert b.classes == ("a", "b", "c") and len(b.train) == 30 and len(b.val) == 6  # own val: nothing carved
    assert b.train.x.dtype == torch.float32 and torch.allclose(b.train.x, torch.from_numpy(x_tr).float() / 255)
    assert torch.allclose(b.test.x, torch.from_numpy(x_te).float())  # floats are kept as they are
    assert b.val.y.dtype == torch.long and b.val.y.tolist() == y_tr[:6].tolist()
    # Without val arrays the default 10% validation split is carved, seeded.
    p2 = _npz(tmp_path / "e.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    b2 = data.load(f"npz:{p2}", seed=1)
    assert len(b2.val) == 3 and len(b2.train) == 27 and b2.classes == ("0", "1", "2")
    assert torch.equal(data.load("npz", path=str(p2), seed=1).val.index, b2.val.index)


def test_npz_errors_name_what_is_wrong(tmp_path):
    p = _npz(tmp_path / "m.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(4), x_test=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"missing arrays \['y_test'\].*has \['x_test', 'x_train', 'y_train'\]"):
        data.load(f"npz:{p}")
    bad = _npz(tmp_path / "f.npz", x_train=np.zeros((4, 2)), y_train=np.array([0, 1.5, 0, 1]),
               x_test=np.zeros((2, 2)), y_test=np.zeros(2))
    with pytest.raises(ValueError, match="y_train.*whole class ids"):
        data.load(f"npz:{bad}")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(ValueError, match=r"no option 'colour'.*accepts"):
        data.load(f"npz:{p}", colour=1)


# ---------------------------------------------------------------------------------------------- csv


def _csv(path, text):
    path.write_text(text)
    return path


def test_csv_string_labels_and_seeded_stratified_split(tmp_path):
    rows = ["f1,f2,kind"] + [f"{i},{i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(40)]
    p = _csv(tmp_path / "t.csv", "\n".join(rows) + "\n")
    b = data.load(f"csv:{p}", label_column="kind", val_size=0, seed=3)
    assert b.classes == ("cat", "dog") and b.input_shape == (2,)
    assert len(b.test) == 8 and torch.bincount(b.test.y).tolist() == [4, 4]
    again = data.load(f"csv:{p}", label_column="kind", val_size=0, seed=3)
    other = data.load(f"csv:{p}", label_column="kind", val_size=0, seed=4)
    assert torch.equal(again.test.x, b.test.x) and not torch.equal(other.test.x, b.test.x)
    row = b.train.x[0]  # features parsed as numbers, label from the named column
    assert row[1] == row[0] * 0.5 and b.classes[int(b.train.y[0])] == ("cat" if int(row[0]) % 2 else "dog")
    b3 = data.load(f"csv:{p}", label_column="kind", test_size=10, seed=0)
    assert len(b3.test) == 10 and len(b3.val) == 3


def test_csv_split_column_and_integer_labels(tmp_path):
    lines = ["x,label,split"] + [f"{i},{i % 3},{'train' if i < 12 else 'val' if i < 15 else 'test'}" for i in range(20)]
    b = data.load(f"csv:{_csv(tmp_path / 's.csv', chr(10).join(lines))}")
    assert (len(b.train), len(b.val), len(b.test)) == (12, 3, 5) and b.classes == ("0", "1", "2")
    assert b.test.x[:, 0].tolist() == [15.0, 16.0, 17.0, 18.0, 19.0] and b.test.index.tolist() == [0, 1, 2, 3, 4]


def test_csv_errors(tmp_path):
    p = _csv(tmp_path / "b.csv", "a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(ValueError, match=r"column 'b', line 3.*'oops' is not a number"):
        data.load(f"csv:{p}")
    with pytest.raises(ValueError, match=r"no column 'y' \(option label_column\)"):
        data.load(f"csv:{p}", label_column="y")
    q = _csv(tmp_path / "q.csv", "a,label,split\n1,0,train\n2,1,tset\n")
    with pytest.raises(ValueError, match="'tset' is not one of"):
        data.load(f"csv:{q}")
    with pytest.raises(ValueError, match=r"no option 'label'.*label_column"):
        data.load(f"csv:{p}", label="x")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        data.load(f"csv:{tmp_path / 'missing.csv'}")


# ---------------------------------------------------------------------------------------------- folder


def _image_folder(root, sizes=None, splits=(("train", 4), ("test", 2))):
    """Class folders of small PNGs whose pixels encode (split, class, file) so every sample is checkable."""
    rng = np.random.default_rng(0)
    for s, per_class in splits:
        for c, cls in enumerate(("bird", "cat", "dog")):
            d = root / s / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = (sizes or {}).get((s, cls, i), (6, 5))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return root


def _all_items(split):
    if isinstance(split, TensorData):
        return {int(i): (x, int(y)) for x, y, i in zip(split.x, split.y, split.index)}
    loader = DataLoader(split.dataset, batch_size=4)
    out = {}
    for x, y, ids in loader:
        out.update({int(i): (xi, int(yi)) for xi, yi, i in zip(x, y, ids)})
    return out


def test_folder_in_memory_and_streamed_agree(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    mem = data.load(f"folder:{root}", in_memory=True, val_size=0)
    disk = data.load(f"folder:{root}", in_memory="false", val_size=0)
    assert isinstance(mem.train, TensorData) and isinstance(disk.train, StreamData)
    assert mem.classes == disk.classes == ("bird", "cat", "dog") and disk.input_shape == (3, 6, 5)
    assert mem.train.x.min() >= 0 and mem.train.x.max() <= 1
    for a, b in ((mem.train, disk.train), (mem.test, disk.test)):
        ma, mb = _all_items(a), _all_items(b)
        assert sorted(ma) == sorted(mb) == list(range(len(a)))
        for i in ma:
            assert torch.equal(ma[i][0], mb[i][0]) and ma[i][1] == mb[i][1]
    assert disk.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # from folder names, nothing decoded
    ds = pickle.loads(pickle.dumps(disk.train.dataset))  # DataLoader workers get a copy
    assert isinstance(ds, FolderDataset) and torch.equal(ds[5][0], mem.train.x[5])


def test_folder_auto_budget_resize_size_errors_and_val(tmp_path):
    root = _image_folder(tmp_path / "a", splits=(("train", 4), ("val", 1), ("test", 2)))
    auto = data.load(f"folder:{root}")
    assert isinstance(auto.train, TensorData) and len(auto.val) == 3 and len(auto.train) == 12  # val folder used
    streamed = data.load(f"folder:{root}", memory_budget_mb=0, channels=1, image_size=[8, 4])
    assert isinstance(streamed.train, StreamData) and streamed.input_shape == (1, 8, 4)
    assert streamed.train.dataset[0][0].shape == (1, 8, 4)
    small = data.load(f"folder:{root}", image_size=3, in_memory=True)
    assert small.input_shape == (3, 3, 3)
    odd = _image_folder(tmp_path / "b", sizes={("train", "cat", 1): (7, 5)})
    with pytest.raises(ValueError, match=r"img1.png is 7x5.*data.image_size"):
        data.load(f"folder:{odd}", in_memory=True)
    with pytest.raises(ValueError, match="data.image_size"):
        data.load(f"folder:{odd}", in_memory=False, val_size=0).train.dataset[5]  # cat/img1
    assert data.load(f"folder:{odd}", image_size=(6, 5), in_memory=True).input_shape == (3, 6, 5)
    (root / "test" / "eel").mkdir()
    with pytest.raises(ValueError, match=r"\['eel'\] that train/ does not have"):
        data.load(f"folder:{root}")
    with pytest.raises(ValueError, match=r"no option 'size'.*image_size"):
        data.load(f"folder:{odd}", size=3)
    with pytest.raises(ValueError, match="in_memory"):
        data.load(f"folder:{odd}", in_memory="maybe")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load(f"folder:{tmp_path / 'nowhere'}")


# ---------------------------------------------------------------------------------------------- splits


class _Items(Dataset):
    """A plain map-style data set of (x, y) items; optional ``targets`` and ``classes``."""

    def __init__(self, n=60, k=3, targets=True, classes=None):
        self.x, self.y = torch.randn(n, 2), torch.arange(n) % k
        if targets:
            self.targets = self.y.tolist()
        if classes:
            self.classes = classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_stream_validation_split_is_stratified_or_seeded_random():
    s = as_split(_Items(60))
    rest, val = data.split_validation(s, 15, seed=2)
    assert isinstance(val, StreamData) and len(val) == 15 and len(rest) == 45
    assert torch.bincount(val.labels).tolist() == [5, 5, 5]
    assert set(rest.index.tolist()).isdisjoint(val.index.tolist())
    assert [int(val.dataset[j][1]) for j in range(15)] == val.labels.tolist()  # Subset matches labels
    # The same labels give the same rows as the in-memory split.
    t = TensorData(x=torch.zeros(60, 1), y=torch.arange(60) % 3, classes=("0", "1", "2"))
    assert torch.equal(data.split_validation(t, 15, seed=2)[1].index, val.index)
    blind = StreamData(dataset=_Items(60, targets=False), classes=("0", "1", "2"), input_shape=(2,))
    r1, v1 = data.split_validation(blind, 0.25, seed=5)
    _, v2 = data.split_validation(blind, 0.25, seed=5)
    assert len(v1) == 15 and torch.equal(v1.index, v2.index) and v1.labels is None
    b = data.with_validation(data.DataBundle(train=blind, test=blind), 10, seed=0)
    assert len(b.val) == 10 and len(b.train) == 50


# ---------------------------------------------------------------------------------------------- as_split


def test_as_split_accepts_every_documented_kind():
    x, y = torch.randn(12, 3), torch.arange(12) % 4
    td = to_tensor_data(x, y)
    assert as_split(td) is td
    pair = as_split((x.numpy(), y.numpy()), name="p")
    assert isinstance(pair, TensorData) and pair.classes == ("0", "1", "2", "3") and pair.name == "p"
    tds = as_split(TensorDataset(x, y, torch.arange(100, 112)))
    assert isinstance(tds, TensorData) and tds.index.tolist() == list(range(100, 112))
    stream = as_split(_Items(12, 4))
    assert isinstance(stream, StreamData) and stream.input_shape == (2,) and stream.labels is not None
    assert as_split(stream) is stream
    named = as_split(_Items(12, 4, targets=False, classes=["a", "b", "c", "d"]))
    assert named.classes == ("a", "b", "c", "d") and named.labels is None
    scanned = as_split(_Items(12, 4, targets=False))  # labels read item by item
    assert scanned.classes == ("0", "1", "2", "3") and scanned.labels.tolist() == (torch.arange(12) % 4).tolist()
    given = as_split(_Items(12, 4, targets=False), classes=list("wxyz"))
    assert given.classes == tuple("wxyz") and given.labels is None
    via_loader = as_split(DataLoader(TensorDataset(x, y), batch_size=5))
    assert isinstance(via_loader, TensorData) and torch.equal(via_loader.x, x)
    with pytest.raises(ValueError, match=r"cannot use a builtins.dict.*TensorDataset"):
        as_split({"x": x})
    with pytest.raises(ValueError, match="TensorDataset needs tensors"):
        as_split(TensorDataset(x))


def test_to_tensor_data_conversions_and_label_errors():
    d = to_tensor_data(np.full((3, 2), 255, np.uint8), np.array([0.0, 2.0, 1.0]), name="u8")
    assert d.x.dtype == torch.float32 and torch.all(d.x == 1.0) and d.y.dtype == torch.long
    assert d.y.tolist() == [0, 2, 1] and d.classes == ("0", "1", "2")
    assert to_tensor_data(torch.ones(2, 2, dtype=torch.int16) * 7, [1, 0]).x.max() == 7.0  # only uint8 scales
    assert to_tensor_data(np.ones((2, 2), np.float64), torch.tensor([1, 0], dtype=torch.int32)).y.dtype == torch.long
    assert to_tensor_data([[1, 2], [3, 4]], [0, 1], classes=["n", "p"]).classes == ("n", "p")
    with pytest.raises(ValueError, match=r"y: labels must be whole.*argmax"):
        to_tensor_data(np.zeros((2, 2)), [0.5, 1])
    with pytest.raises(ValueError, match="y: labels contain NaN"):
        to_tensor_data(np.zeros((2, 2)), [np.nan, 1])
    with pytest.raises(ValueError, match=r"y: labels must be integer class ids.*classes=names"):
        to_tensor_data(np.zeros((2, 2)), ["cat", "dog"])
    with pytest.raises(ValueError, match="x: inputs must be numeric"):
        to_tensor_data(np.array([["a", "b"]], dtype=object), [0])
    with pytest.raises(ValueError, match="x has 2 rows but y has 3"):
        to_tensor_data(np.zeros((2, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match="label 2 has no name"):
        to_tensor_data(np.zeros((3, 1)), [0, 1, 2], classes=["a", "b"])


# ---------------------------------------------------------------------------------------------- CIFAR-100


def _records(n, seed):
    """CIFAR-100 records: coarse = fine // 5, pixels of each plane constant = (fine + plane) % 256."""
    fine = (np.arange(n) + seed) % 100
    out = bytearray()
    for f in fine:
        out += bytes([f // 5, f])
        for plane in range(3):
            out += bytes([(int(f) * 2 + plane) % 256]) * 1024
    return bytes(out), fine


def _cifar100_archive(path, train=200, test=100, drop=()):
    tr, fine_tr = _records(train, 0)
    te, _ = _records(test, 7)
    files = {"train.bin": tr, "test.bin": te,
             "fine_label_names.txt": "\n".join(f"fine{i}" for i in range(100)).encode() + b"\n",
             "coarse_label_names.txt": "\n".join(f"coarse{i}" for i in range(20)).encode() + b"\n\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, fine_tr


def test_cifar100_small_archive_fine_and_coarse(tmp_path, monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arch, fine_tr = _cifar100_archive(tmp_path / "cifar-100-binary.tar.gz")
    b = cifar100.load_cifar100(arch, download_ok=False, strict=False)
    assert b.train.x.shape == (200, 3, 32, 32) and b.test.x.shape == (100, 3, 32, 32)
    assert b.classes[:2] == ("fine0", "fine1") and len(b.classes) == 100
    assert b.train.y.tolist() == fine_tr.tolist() and b.test.y[0] == 7
    assert torch.allclose(b.train.x[3, :, 0, 0] * 255, torch.tensor([6.0, 7.0, 8.0]))  # R, G, B planes
    c = data.load("cifar100", path=str(tmp_path), label="coarse", strict=False, download_ok=False, val_size=20)
    assert len(c.classes) == 20 and c.classes[0] == "coarse0" and len(c.val) == 20
    assert (c.train.y < 20).all() and c.test.y[0] == 7 // 5
    assert data.DEFAULT_VAL_SIZE["cifar100"] == 5000
    with pytest.raises(FileNotFoundError, match="per class"):  # strict: the official counts
        cifar100.load_cifar100(arch, download_ok=False)
    with pytest.raises(ValueError, match="label"):
        cifar100.load_cifar100(arch, label="medium")
    missing, _ = _cifar100_archive(tmp_path / "m.tar.gz", drop=("coarse_label_names.txt",))
    with pytest.raises(FileNotFoundError, match="coarse_label_names.txt"):
        cifar100.load_cifar100(missing, download_ok=False, strict=False)
    with pytest.raises(ValueError, match="whole number of 3074-byte"):
        cifar100.parse_records(b"\x00" * 3073, "x.bin", 100, 20)


def test_uint8_items_are_scaled_streamed_as_in_memory():
    """8-bit pixels read the same whichever way they come (issue 26): a Dataset yielding uint8 tensors (as
    torchvision's PILToTensor does) reached the model as 0..255 floats, the same tensors in memory as 0..1."""
    from torch import nn

    from kdistill import TrainConfig, fit
    from kdistill.data.stream import as_input

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 1, 2, 2), dtype=torch.uint8, generator=g)
    y = torch.arange(16) % 2
    assert torch.equal(as_input(x[0]), x[0].float() / 255) and as_input(torch.tensor([3])).dtype == torch.long

    class Items(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    seen = {}
    for name, data_ in (("memory", TensorDataset(x, y)), ("streamed", Items())):
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        rows = []
        net.register_forward_hook(lambda m, i, o: rows.append(i[0].detach()))
        fit(net, data_, TrainConfig(epochs=1, batch_size=16, device="cpu"), progress=False)
        seen[name] = torch.cat(rows)
    assert seen["streamed"].max() <= 1.0 and seen["memory"].max() <= 1.0
    assert torch.equal(seen["streamed"].sort(0).values, seen["memory"].sort(0).values)
