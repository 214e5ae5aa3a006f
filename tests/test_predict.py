"""``kdistill predict`` (issue 26 item 7): image files classified by name with the model's recorded
preprocessing (safetensors and ONNX), and the split mode defaulting to the run's own data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill import data
from kdistill.cli.app import main
from kdistill.io import load_model, read_model_meta, save_model

CLASSES = ("cat", "dog", "emu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A cnn trained by the CLI on a 10x10 image folder with data.normalize=imagenet, and some new images."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 3)):
        for c, name in enumerate(CLASSES):
            d = root / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(count):
                a = (rng.random((10, 10, 3)) * 80).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    new = root / "new"
    (new / "sub").mkdir(parents=True)
    big = np.zeros((30, 20, 3), np.uint8)
    big[..., 1] = 220
    Image.fromarray(big).save(new / "green_30x20.png")
    Image.fromarray((np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)).save(new / "sub" / "grey16.png")
    (new / "notes.txt").write_text("not an image")
    assert main(["train", "--data", f"folder:{root / 'imgs'}", "--model", "cnn:4,8", "--epochs", "2", "--batch-size",
                 "12", "--set", "data.normalize=imagenet", "--out", str(root / "run"), "--no-progress"]) == 0
    return root


def _json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0, argv
    return json.loads(capsys.readouterr().out)


def _expected(run, split="test"):
    """The model's probabilities on the data as training loaded it (normalised by data.load)."""
    test = getattr(data.load(f"folder:{run / 'imgs'}", normalize="imagenet", val_size=0), split)
    model = load_model(run / "run" / "model.safetensors").eval()
    with torch.no_grad():
        return torch.softmax(model(test.x), dim=1), test


def test_predict_files_by_name_with_the_recorded_preprocessing(run, capsys):
    model = str(run / "run" / "model.safetensors")
    out = _json(capsys, ["predict", "--model", model, "--json", "--top", "2", str(run / "imgs" / "test")])
    probs, test = _expected(run)
    assert [p["file"] for p in out["predictions"]] == [str(run / "imgs" / "test" / c / f"{i}.png")
                                                       for c in CLASSES for i in range(3)]
    for row, want in zip(out["predictions"], probs):
        assert len(row["top"]) == 2 and "resized_from" not in row
        top = want.topk(2)
        assert [t["class"] for t in row["top"]] == [CLASSES[i] for i in top.indices]
        assert [t["probability"] for t in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out["normalize"]["name"] == "imagenet" and out["input_shape"] == [3, 10, 10] and out["notes"] == []
    capsys.readouterr()
    assert main(["predict", "--model", model, str(run / "imgs" / "test" / "emu" / "0.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2", "top-3"]
    assert lines[1].split()[0].endswith("emu/0.png") and lines[1].split()[1] in CLASSES
    assert sorted(lines[1].split()[1::2][1:]) == sorted(set(CLASSES) - {lines[1].split()[1]})


def test_other_sizes_are_resized_with_a_note_and_16_bit_is_read(run, capsys):
    model = str(run / "run" / "model.safetensors")
    out = _json(capsys, ["predict", "--model", model, "--json", str(run / "new")])  # notes.txt is skipped in a folder
    rows = {r["file"].rsplit("/", 1)[1]: r for r in out["predictions"]}
    assert sorted(rows) == ["green_30x20.png", "grey16.png"] and rows["green_30x20.png"]["resized_from"] == [30, 20]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    green = Image.open(run / "new" / "green_30x20.png").convert("RGB").resize((10, 10), Image.Resampling.BILINEAR)
    grey = np.asarray(Image.open(run / "new" / "sub" / "grey16.png"), dtype=np.float32) / 65535  # not clipped to 1
    x = torch.stack([torch.from_numpy(np.asarray(green, np.float32) / 255).permute(2, 0, 1),
                     torch.from_numpy(grey).expand(3, 10, 10)])
    net = load_model(run / "run" / "model.safetensors").eval()
    with torch.no_grad():
        want = torch.softmax(net((x - mean) / std), 1)
    for row, p in zip((rows["green_30x20.png"], rows["grey16.png"]), want):
        assert [t["index"] for t in row["top"]] == p.topk(3).indices.tolist()
        assert [t["probability"] for t in row["top"]] == pytest.approx(p.topk(3).values.tolist(), abs=1e-5)
    assert "1 image(s) marked * were resized to 10x10 (HxW)" in out["notes"][0]
    assert main(["predict", "--model", model, str(run / "new")]) == 0
    captured = capsys.readouterr()
    assert "green_30x20.png *" in captured.out and "note: 1 image(s) marked * were resized" in captured.err


def test_onnx_model_predicts_from_its_own_metadata(run, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = run / "run" / "model.safetensors"
    onnx_file = tmp_path / "alone" / "m.onnx"  # no config.yaml beside it: the file alone must say everything
    assert main(["export-onnx", "--model", str(model), "--onnx", str(onnx_file)]) == 0
    a = _json(capsys, ["predict", "--model", str(model), "--json", str(run / "imgs" / "test")])
    b = _json(capsys, ["predict", "--model", str(onnx_file), "--json", str(run / "imgs" / "test")])
    assert b["normalize"] == a["normalize"] and b["notes"] == []
    for ra, rb in zip(a["predictions"], b["predictions"]):
        assert [t["class"] for t in ra["top"]] == [t["class"] for t in rb["top"]]
        assert [t["probability"] for t in ra["top"]] == pytest.approx([t["probability"] for t in rb["top"]], abs=1e-4)


def test_split_mode_defaults_to_the_runs_data(run, tmp_path, capsys):
    model = str(run / "run" / "model.safetensors")
    out = _json(capsys, ["predict", "--model", model, "--split", "test", "--save-logits", str(tmp_path / "t.npy")])
    probs, test = _expected(run)
    assert out["data"] == "imgs-test" and out["count"] == len(test) == 9
    assert torch.allclose(torch.softmax(torch.from_numpy(np.load(tmp_path / "t.npy")), 1), probs, atol=1e-5)


def test_model_without_a_record_uses_its_runs_config_with_a_note(run, tmp_path, capsys):
    meta = read_model_meta(run / "run" / "model.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text((run / "run" / "config.yaml").read_text())
    save_model(old / "model.safetensors", load_model(run / "run" / "model.safetensors"), in_shape=meta["in_shape"],
               num_classes=3)
    out = _json(capsys, ["predict", "--model", str(old / "model.safetensors"), "--json", str(run / "imgs" / "test")])
    probs, _ = _expected(run)
    assert [r["top"][0]["index"] for r in out["predictions"]] == probs.argmax(1).tolist()
    assert out["predictions"][0]["top"][0]["class"] in ("0", "1", "2")
    assert any("records no preprocessing; used pixels/255 with normalize imagenet" in n and "config.yaml" in n
               for n in out["notes"])
    assert any("records no class names" in n for n in out["notes"])


@pytest.mark.parametrize("args, match", [
    (["--data", "digits", "--save-logits", "{tmp}/t.npy"],
     r"model.safetensors takes inputs shaped \[3, 10, 10\], but digits-train has \[1, 8, 8\]; give the --data"),
    ([], r"predict: give image files or folders to classify .* or --save-logits FILE"),
    (["{root}/new/notes.txt"], r"notes.txt is not a .png/.jpg/.jpeg/.bmp/.ppm/.pgm/.tif/.tiff/.webp image"),
    (["{root}/nothing_here"], r"predict: no such file or folder .*nothing_here"),
    (["--top", "0", "{root}/new"], r"--top: at least 1"),
    (["{tmp}/bomb.png"], r"bomb.png declares more pixels than Pillow decodes safely"),
    (["--max-pixels", "100", "{root}/new"], r"green_30x20.png declares 30x20 \(HxW\) = 600 pixels, more than the 100 "
                                            r"allowed.*raise --max-pixels"),
])
def test_predict_refusals_are_one_line(run, tmp_path, capsys, args, match):
    import re
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8,
                                        0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    argv = [a.format(tmp=tmp_path, root=run) for a in args]
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "run" / "model.safetensors"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdistill: error: ") and err.count("\n") == 1 and re.search(match, err), err
