"""A real public-domain English corpus that installs from a package registry: the King James Bible.

The text is the Authorized (King James) Version of 1611, as shipped by Debian's ``bible-kjv-text`` package
(``/usr/lib/bible.data``, 4.4 MB of text, 31,102 verses). The translation is in the public domain everywhere
except the United Kingdom, where the Crown's perpetual rights in it are administered by letters patent;
the Debian package (section main, DFSG-free) says "the copyright for the King James Version text of the
Bible is expired". The file is not plain text: it is the "Bible Retrieval System" format (magic ``EC02``),
a header of 64 KiB window offsets followed by one ``compress(1)`` LZW stream per window, without the ``.Z``
magic bytes. :func:`lzw_decompress` and :func:`read_brs` decode it in pure Python, so nothing but the
package file is needed.

:func:`kjv_text_path` finds the text, in this order, and returns the path of a UTF-8 file with one verse
per line (the ``Ge1:1`` references removed):

1. ``path`` (``--data-path``): a plain text file (used as it is), a ``bible.data`` file or the ``.deb``;
2. the installed package's ``/usr/lib/bible.data`` (``apt-get install bible-kjv-text``);
3. the cache, ``~/.cache/kdistill/kjv/kjv.txt`` (``$KDISTILL_CACHE`` overrides ``~/.cache/kdistill``);
4. a download of the package with the system's own ``apt-get download bible-kjv-text`` (whatever mirror
   apt is configured for), unpacked with Python's ``tarfile``/``lzma``; the text is written to the cache
   through a temporary file and a rename, so no half-written cache is ever read.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

KJV_PACKAGE = "bible-kjv-text"
KJV_INSTALLED = Path("/usr/lib/bible.data")
KJV_MEMBER = "usr/lib/bible.data"
_BRS_MAGIC = b"EC02"
_LZW_CLEAR = 256
_VERSE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ")


def cache_dir() -> Path:
    """Where downloaded corpora are kept: ``$KDISTILL_CACHE`` or ``~/.cache/kdistill``."""
    return Path(os.environ.get("KDISTILL_CACHE") or Path.home() / ".cache" / "kdistill")


def lzw_decompress(data: bytes, max_bits: int = 16) -> bytes:
    """Decode one ``compress(1)`` LZW stream in block mode (the bytes after a ``.Z`` file's 3-byte header).

    Codes start 9 bits wide, least significant bit first; they are written in groups of 8 codes, and when
    the width grows or a CLEAR (256) resets the table the rest of the current group is padding.
    """
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b""]
    out = bytearray()
    bits, pos, base, total = 9, 0, 0, len(data) * 8  # groups are counted from ``base``, the last reset
    prev: bytes | None = None
    padded = data + b"\0\0\0"
    while pos + bits <= total:
        if len(table) > (1 << bits) - 1 and bits < max_bits:  # the table outgrew the width: next group, wider
            pos = base = _next_group(pos, base, bits)
            bits += 1
            continue
        byte = pos >> 3
        code = (int.from_bytes(padded[byte:byte + 3], "little") >> (pos & 7)) & ((1 << bits) - 1)
        pos += bits
        if code == _LZW_CLEAR:
            pos = base = _next_group(pos, base, bits)
            table, bits, prev = table[:257], 9, None
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev is not None:  # the code being defined: prev + its first byte
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corpus: corrupt LZW data (code {code} with {len(table)} table entries)")
        out += entry
        if prev is not None and len(table) < (1 << max_bits):
            table.append(prev + entry[:1])
        prev = entry
    return bytes(out)


def _next_group(pos: int, base: int, bits: int) -> int:
    """The bit position of the next group of 8 codes of ``bits`` bits counted from ``base`` (``pos`` itself if
    at a boundary)."""
    group = bits * 8
    return base + -(-(pos - base) // group) * group


def read_brs(data: bytes) -> bytes:
    """The text of a Bible Retrieval System data file (``bible.data``): its LZW windows decoded in order."""
    if data[:4] != _BRS_MAGIC or len(data) < 0x5C:
        raise ValueError("corpus: not a Bible Retrieval System data file (no EC02 header); give bible.data "
                         f"from the {KJV_PACKAGE} package, its .deb, or a plain text file")
    window, count = struct.unpack(">II", data[0x54:0x5C])
    offsets = struct.unpack(f">{count + 1}I", data[0x5C:0x5C + 4 * (count + 1)])
    if offsets[-1] != len(data) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"corpus: bible.data is truncated or corrupt ({len(data)} bytes, the index says "
                         f"{offsets[-1]}); download it again")
    parts = [lzw_decompress(data[a:b]) for a, b in zip(offsets, offsets[1:])]
    if any(len(p) != window for p in parts[:-1]):
        raise ValueError(f"corpus: bible.data decoded to windows of the wrong size (not {window} bytes)")
    return b"".join(parts)


def deb_member(deb: bytes, member: str) -> bytes:
    """The file ``member`` of a Debian package: found in its ``ar`` archive's ``data.tar.*``."""
    if deb[:8] != b"!<arch>\n":
        raise ValueError("corpus: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode("ascii").strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode("ascii").strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for info in tar.getmembers():
                    if info.isfile() and info.name.lstrip("./") == member:
                        return tar.extractfile(info).read()
            raise ValueError(f"corpus: the package holds no {member}")
        pos += 60 + size + (size & 1)
    raise ValueError("corpus: the Debian package has no data.tar member")


def kjv_verses(raw: bytes) -> str:
    """One verse per line, the ``Ge1:1``-style references and the title line removed."""
    lines = raw.decode("ascii").splitlines()
    verses = [_VERSE.sub("", line, count=1) for line in lines if _VERSE.match(line)]
    if not verses:
        raise ValueError("corpus: no 'Book1:1 text' verse lines found; this is not the King James text file")
    return "\n".join(verses) + "\n"


def _write_atomic(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _from_file(path: Path) -> str | None:
    """The verses of a ``bible.data`` or ``.deb`` file; None for anything else (taken as plain text)."""
    head = path.open("rb").read(8)
    if head.startswith(_BRS_MAGIC):
        return kjv_verses(read_brs(path.read_bytes()))
    if head == b"!<arch>\n":
        return kjv_verses(read_brs(deb_member(path.read_bytes(), KJV_MEMBER)))
    return None


def download_deb(folder: Path) -> Path:
    """``apt-get download bible-kjv-text`` into ``folder``: the package file from the configured mirror."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise FileNotFoundError(f"corpus: no King James text here and no apt-get to download {KJV_PACKAGE}; "
                                f"give --data-path with a plain text file, bible.data or the .deb")
    done = subprocess.run([apt, "download", KJV_PACKAGE], cwd=folder, capture_output=True, text=True)
    debs = sorted(folder.glob(f"{KJV_PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no package file"]
        raise FileNotFoundError(f"corpus: `apt-get download {KJV_PACKAGE}` failed ({why[0]}); run `apt-get update` "
                                f"first, or give --data-path with a plain text file, bible.data or the .deb")
    return debs[-1]


def kjv_text_path(path: str | os.PathLike | None = None, cache: Path | None = None, download: bool = True) -> Path:
    """A UTF-8 file of the King James text, one verse per line (see the module doc for the search order)."""
    target = (cache or cache_dir()) / "kjv" / "kjv.txt"
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"--data-path: no such file {str(given)!r}")
        text = _from_file(given)
        return given if text is None else _write_atomic(text, target)
    if target.is_file():
        return target
    if KJV_INSTALLED.is_file():
        return _write_atomic(kjv_verses(read_brs(KJV_INSTALLED.read_bytes())), target)
    if not download:
        raise FileNotFoundError(f"corpus: no King James text in {target} or {KJV_INSTALLED}; "
                                f"apt-get install {KJV_PACKAGE}, or give --data-path")
    with tempfile.TemporaryDirectory() as tmp:
        deb = download_deb(Path(tmp))
        return _write_atomic(kjv_verses(read_brs(deb_member(deb.read_bytes(), KJV_MEMBER))), target)
