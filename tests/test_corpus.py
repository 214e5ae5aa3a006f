"""The King James corpus loader (kdistill.data.corpus) on small local files: no corpus, no network.

tests/data/verses.Z is synthetic verse-style text (121 lines) compressed by the real ``compress -b 16``
(ncompress): an independent encoder, whose codes grow from 9 to 12 bits.
"""

import io
import struct
import tarfile
from pathlib import Path

import pytest

from kdistill.data import corpus

DATA = Path(__file__).parent / "data"


def _z_stream() -> bytes:
    return (DATA / "verses.Z").read_bytes()[3:]  # without the .Z magic and flags, as bible.data stores it


def _brs(windows: list[bytes], window: int) -> bytes:
    """A Bible Retrieval System file: EC02 header, window size, count, offsets, then the LZW streams."""
    head = b"EC02Compressed Data File".ljust(0x54, b"\0") + struct.pack(">II", window, len(windows))
    start = len(head) + 4 * (len(windows) + 1)
    offsets = [start]
    for w in windows:
        offsets.append(offsets[-1] + len(w))
    return head + struct.pack(f">{len(offsets)}I", *offsets) + b"".join(windows)


def _deb(member: str, payload: bytes) -> bytes:
    """A minimal Debian package: an ar archive holding debian-binary and data.tar.xz with ``member``."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./" + member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def entry(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    return b"!<arch>\n" + entry("debian-binary", b"2.0\n") + entry("data.tar.xz", tar_bytes.getvalue())


def _pack(groups: list[list[int]], bits: int = 9) -> bytes:
    """Codes packed LSB-first; each list after the first starts a new group of 8 codes (as after a CLEAR)."""
    value, pos = 0, 0
    for i, codes in enumerate(groups):
        if i:
            pos = -(-pos // (8 * bits)) * (8 * bits)
        for c in codes:
            value |= c << pos
            pos += bits
    return value.to_bytes(-(-pos // 8), "little")


def test_lzw_matches_the_real_compress_tool():
    text = corpus.lzw_decompress(_z_stream())
    assert len(text) == 8824
    assert text.startswith(b"Holy Bible, Authorized (King James) Version.")
    assert text.count(b"\n") == 121


def test_lzw_clear_code_resets_the_table_and_skips_the_group_padding():
    data = _pack([[65, 66, 257, 256], [67, 67, 257]])
    assert corpus.lzw_decompress(data) == b"ABABCCCC"


def test_lzw_refuses_corrupt_codes():
    with pytest.raises(ValueError, match="corrupt LZW"):
        corpus.lzw_decompress(_pack([[65, 300]]))


def test_brs_file_and_deb_give_the_verses_without_references(tmp_path):
    text = corpus.lzw_decompress(_z_stream())
    brs = _brs([_z_stream()], window=len(text))
    verses = corpus.kjv_verses(corpus.read_brs(brs))
    lines = verses.splitlines()
    assert len(lines) == 120 and lines[0][0].isupper() and ":" not in lines[0].split()[0]
    (tmp_path / "bible.data").write_bytes(brs)
    (tmp_path / "pkg.deb").write_bytes(_deb(corpus.KJV_MEMBER, brs))
    for given in ("bible.data", "pkg.deb"):
        out = corpus.kjv_text_path(tmp_path / given, cache=tmp_path / given.replace(".", "_"), download=False)
        assert out.read_text() == verses and out.parent.parent == tmp_path / given.replace(".", "_")
        assert not list(out.parent.glob(".kjv*"))  # no temp file left behind


def test_plain_text_path_is_used_as_it_is_and_missing_paths_are_refused(tmp_path):
    plain = tmp_path / "mine.txt"
    plain.write_text("In the beginning was the word.\n")
    assert corpus.kjv_text_path(plain, cache=tmp_path / "c", download=False) == plain
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError, match="--data-path"):
        corpus.kjv_text_path(tmp_path / "nope.txt", cache=tmp_path / "c")


def test_cache_is_found_and_no_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "KJV_INSTALLED", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv-text"):
        corpus.kjv_text_path(cache=tmp_path / "c", download=False)
    cached = tmp_path / "c" / "kjv" / "kjv.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("verse\n")
    assert corpus.kjv_text_path(cache=tmp_path / "c", download=False) == cached


def test_a_truncated_brs_file_is_refused():
    brs = _brs([_z_stream()], window=8824)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        corpus.read_brs(brs[:-10])
    with pytest.raises(ValueError, match="EC02"):
        corpus.read_brs(b"not a bible file" * 10)
