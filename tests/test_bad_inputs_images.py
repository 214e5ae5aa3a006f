"""Image folders that are wrong or hostile: refused by name before decoding, or read as torchvision reads them.

Issue 27: empty or image-less class folders, dangling symlinks, symlinked class folders, 16-bit PNGs and
images whose header declares a huge size (a decompression bomb) - each a clear ValueError naming the file
or folder and the fix, never a silent drop, a white image or a raw Pillow exception.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill import data
from kdistill.cli.app import main
from kdistill.data.folder import MAX_PIXELS


def _folder(root, classes=("ant", "bee"), n=2, size=(6, 5)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _png_header(path, width, height):
    """A PNG of a few bytes whose header declares ``width`` x ``height`` greyscale pixels (nothing to decode)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_empty_class_folder_is_refused_by_name(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "train" / "cow").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/cow is empty; put its images in it, or remove"):
        data.load(f"folder:{root}")


def test_class_of_unsupported_files_is_refused_naming_them(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "train" / "cow").mkdir()
    Image.new("RGB", (6, 5)).save(root / "train" / "cow" / "a.gif")
    (root / "train" / "cow" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"train/cow holds no .png/.jpg/.jpeg/.bmp/.ppm/.pgm/.tif/.tiff/.webp images, "
                                         r"only a.gif, notes.txt; convert them"):
        data.load(f"folder:{root}")


def test_dangling_symlinks_are_refused_not_dropped(tmp_path):
    root = _folder(tmp_path / "d")
    os.symlink(tmp_path / "gone.png", root / "train" / "ant" / "9.png")
    with pytest.raises(ValueError, match=r"train/ant/9.png is a dangling symlink \(its target .*gone.png"):
        data.load(f"folder:{root}")
    os.unlink(root / "train" / "ant" / "9.png")
    os.symlink(tmp_path / "nowhere", root / "test" / "bee2")
    with pytest.raises(ValueError, match=r"test/bee2 is a dangling symlink"):
        data.load(f"folder:{root}")


def test_symlinked_class_folders_and_subfolders_are_followed_like_imagefolder(tmp_path):
    root = _folder(tmp_path / "d")
    elsewhere = _folder(tmp_path / "other", classes=("cow",))
    os.symlink(elsewhere / "train" / "cow", root / "train" / "cow")
    (root / "train" / "ant" / "more").mkdir()
    Image.new("RGB", (5, 6), (255, 0, 0)).save(root / "train" / "ant" / "more" / "red.png")
    bundle = data.load(f"folder:{root}", val_size=0, in_memory=True)
    assert bundle.classes == ("ant", "bee", "cow")
    assert bundle.train.y.tolist() == [0, 0, 0, 1, 1, 2, 2]  # the nested image is ant's third, cow's are followed
    assert torch.equal(bundle.train.x[2, 0], torch.ones(6, 5)) and bundle.train.x[2, 1:].abs().sum() == 0


@pytest.mark.ecosystem
def test_folder_lists_the_same_files_as_torchvision_imagefolder(tmp_path):
    from ecosystem import need

    tv = need("torchvision")
    from kdistill.data.folder import list_split

    root = _folder(tmp_path / "d", n=3)
    elsewhere = _folder(tmp_path / "other", classes=("cow",))
    os.symlink(elsewhere / "train" / "cow", root / "train" / "cow")
    (root / "train" / "ant" / "sub").mkdir()
    Image.new("RGB", (6, 5)).save(root / "train" / "ant" / "sub" / "0.png")
    Image.new("RGB", (6, 5)).save(root / "train" / "ant" / "z.jpg")
    for name in ("w.webp", "t.tif", "p.PPM", "g.pgm"):
        Image.new("L" if name.endswith("pgm") else "RGB", (6, 5)).save(root / "train" / "bee" / name)
    ours, classes = list_split(root / "train", None)
    theirs = tv.datasets.ImageFolder(str(root / "train"))
    assert list(classes) == theirs.classes
    assert [(f, y) for f, y in zip(ours.files, ours.labels)] == theirs.samples


def test_16_bit_pngs_are_scaled_by_65535_not_clipped(tmp_path):
    root = _folder(tmp_path / "d", size=(4, 4))
    grey = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    for split in ("train", "test"):
        Image.fromarray(grey).save(root / split / "ant" / "0.png")  # mode I;16
    assert Image.open(root / "train" / "ant" / "0.png").mode == "I;16"
    expected = torch.from_numpy(grey.astype(np.float32) / 65535)
    for memory in (True, False):
        b = data.load(f"folder:{root}", val_size=0, in_memory=memory)
        x = b.train.x[0] if memory else b.train.dataset[0][0]
        assert x.shape == (3, 4, 4) and torch.allclose(x, expected.expand(3, 4, 4), atol=1e-6)
    resized = data.load(f"folder:{root}", val_size=0, image_size=2, channels=1, in_memory=True).train.x[0, 0]
    assert 0 < resized.min() and resized.max() < 1  # resized in float, not clipped to white


@pytest.mark.parametrize("memory", [True, False])
def test_huge_declared_sizes_are_refused_before_decoding(tmp_path, memory):
    root = _folder(tmp_path / "d")
    _png_header(root / "train" / "bee" / "big.png", 6000, 6000)  # 36 million pixels in 80 bytes
    with pytest.raises(ValueError, match=r"bee/big.png declares 6000x6000 \(HxW\) = 36,000,000 pixels, more than the "
                                         r"33,554,432 allowed.*raise data.max_pixels"):
        b = data.load(f"folder:{root}", image_size=6, val_size=0, in_memory=memory)
        b.train.dataset[4]  # streamed: refused when read (bee/big.png sorts after 0.png and 1.png)
    with pytest.raises(ValueError, match=r"bee/big.png is 6000x6000 \(HxW\) but the first training image is 6x5"):
        b = data.load(f"folder:{root}", val_size=0, in_memory=memory, max_pixels=10**8)
        b.train.dataset[4]  # the header's size is refused: its 80 bytes were never decoded
    allowed = data.load(f"folder:{root}", image_size=6, max_pixels=6000 * 6000, val_size=0, in_memory=False)
    assert len(allowed.train) == 5  # streamed: listed, not decoded


def test_decompression_bomb_never_escapes_raw(tmp_path, capsys):
    root = _folder(tmp_path / "d")
    _png_header(root / "train" / "ant" / "0.png", 30000, 30000)  # the first image: its size would be the set's
    bomb = r"ant/0.png declares more pixels than Pillow decodes safely \(Image size \(900000000 pixels\).*\); shrink"
    for max_pixels in (MAX_PIXELS, 10**12):  # Pillow's own bound (2 x Image.MAX_IMAGE_PIXELS) holds above ours
        with pytest.raises(ValueError, match=bomb):
            data.load(f"folder:{root}", max_pixels=max_pixels)
    assert main(["train", "--data", f"folder:{root}", "--model", "mlp:8", "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    assert "declares more pixels than Pillow" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert MAX_PIXELS < 6000 * 6000


IMAGEFOLDER_FORMATS = [(".webp", "WEBP"), (".tif", "TIFF"), (".tiff", "TIFF"), (".ppm", "PPM"), (".pgm", "PPM"),
                       (".bmp", "BMP"), (".jpeg", "JPEG")]


@pytest.mark.parametrize("memory", [True, False])
def test_every_extension_imagefolder_reads_is_read_not_dropped(tmp_path, memory):
    """torchvision's ImageFolder reads .webp, .tif(f), .ppm, .pgm, .bmp, .jpeg; they were silently dropped here
    (a class of .tif scans vanished from the data set). Lossless ones decode to the pixels written."""
    root = _folder(tmp_path / "d", n=1, size=(5, 6))
    rng = np.random.default_rng(1)
    written = {}
    for suffix, fmt in IMAGEFOLDER_FORMATS:
        a = rng.integers(0, 256, (5, 6) if suffix == ".pgm" else (5, 6, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / "train" / "bee" / f"x{suffix}", format=fmt,
                                **({"lossless": True} if fmt == "WEBP" else {}))
        written[f"x{suffix}"] = a
    bundle = data.load(f"folder:{root}", val_size=0, in_memory=memory)
    files = [Path(f).name for f in bundle.train.dataset.files] if not memory else None
    assert len(bundle.train) == 1 + 1 + len(IMAGEFOLDER_FORMATS), files
    if not memory:
        for name, a in written.items():
            if name.endswith(".jpeg"):
                continue  # lossy
            x = bundle.train.dataset[files.index(name)][0]
            want = torch.from_numpy(a.astype(np.float32) / 255)
            want = want.expand(3, 5, 6) if a.ndim == 2 else want.permute(2, 0, 1)
            assert torch.allclose(x, want), name


def test_an_image_extension_that_does_not_decode_is_refused_naming_the_file(tmp_path, monkeypatch):
    """A .tiff that is no image (a text file renamed) is refused naming it and the fix; a format this Pillow was
    built without (WebP without libwebp) is refused when listed, before any image is decoded."""
    from kdistill.data import folder

    root = _folder(tmp_path / "d")
    (root / "train" / "ant" / "scan.tiff").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode .*train/ant/scan.tiff .*save it again \(e.g. as .png\), or "
                                         r"remove it"):
        data.load(f"folder:{root}", val_size=0, in_memory=True)
    (root / "train" / "ant" / "scan.tiff").unlink()
    Image.new("RGB", (6, 5)).save(root / "test" / "bee" / "z.webp")
    monkeypatch.setattr(folder, "pillow_reads", lambda suffix: suffix != ".webp")  # a Pillow without WebP
    with pytest.raises(ValueError, match=r"test/bee/z.webp is a .webp image, which this Pillow cannot decode.*convert"):
        data.load(f"folder:{root}", val_size=0, in_memory=False)
