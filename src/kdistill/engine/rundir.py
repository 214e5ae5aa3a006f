"""Run directories: one run at a time in each, and only kdistill's own files ever replaced.

A train/distill run (the CLI's ``--out``, ``fit(out_dir=...)``) holds an exclusive ``flock`` on
``OUT/.kdistill.lock`` for as long as it runs. A second run into the same directory is refused, naming
the holder's pid; the lock dies with its process, so a killed run never blocks the next one. The lock
file stays beside the run's files afterwards and marks the directory as a kdistill run.

What a new run may write into (:func:`check_contents`): a new or empty directory; a kdistill run killed
before its first checkpoint (only files that are rewritten from scratch); anything else only with
``--overwrite`` / ``overwrite=True``, which deletes kdistill's own files (:data:`RUN_FILES`) and keeps every
other file. A finished run asks for ``--overwrite``, an unfinished one for ``--resume`` or ``--overwrite``,
and a directory kdistill did not make is refused as not empty.

Temporary files of an interrupted write (kdistill's ``.NAME.XXXX.tmp``, safetensors' ``.tmpXXXXXX``) are
ignored by these checks and deleted by the next run that holds the lock (:func:`remove_stale_tmp`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".kdistill.lock"
RUN_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "metrics.csv", "checkpoint.safetensors",
             "model.safetensors", "results.json", "results.md", "teacher_views.safetensors",
             "teacher_topk.safetensors")
"""The files a train/distill run writes into its directory (``--overwrite`` deletes these and no other)."""
RESTARTABLE = frozenset({"config.yaml", "environment.json", "metrics.jsonl", "metrics.csv",
                         "teacher_views.safetensors", "teacher_topk.safetensors"})
"""Files of a run killed before its first checkpoint: a restart rewrites them, so nothing is lost."""
_TMP = re.compile(r"^\.(?:.+\.[A-Za-z0-9_]+\.tmp|tmp[A-Za-z0-9]{6})$")
"""kdistill's atomic writes (``.NAME.XXXXXXXX.tmp``, see :func:`kdistill.io.atomic_path`) and safetensors'
own temporary file (``.tmpXXXXXX``, written beside its target and renamed onto it)."""


@dataclass(frozen=True)
class Names:
    """How the directory and the two ways out are spelled for the caller (CLI flags or ``fit`` arguments)."""

    out: str = "--out"
    resume: str = "--resume"
    overwrite: str = "--overwrite"


CLI = Names()
API = Names("out_dir", "resume=True", "overwrite=True")


def is_stale_tmp(name: str) -> bool:
    """Whether ``name`` is a temporary file of an interrupted kdistill or safetensors write."""
    return bool(_TMP.match(name))


def remove_stale_tmp(out: Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``out`` (only names :func:`is_stale_tmp` accepts).

    Call it only while holding ``out``'s lock: a running run's temporary files look the same."""
    removed = []
    if Path(out).is_dir():
        for p in Path(out).iterdir():
            if is_stale_tmp(p.name) and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _kdistill_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose header carries kdistill's metadata (model or checkpoint)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(n, 100_000_000)) if 2 <= n else b""
    except OSError:
        return False
    return b'"__metadata__"' in head and (b'"kdistill_checkpoint"' in head or b'"kdistill"' in head)


def is_kdistill_run(out: Path) -> bool:
    """Whether ``out`` holds a run kdistill made: its lock file, an ``environment.json`` naming kdistill, or
    a checkpoint or model file with kdistill's metadata."""
    if (out / LOCK_NAME).is_file():
        return True
    try:
        env = json.loads((out / "environment.json").read_text())
        if isinstance(env, dict) and "kdistill" in env:
            return True
    except (OSError, ValueError):
        pass
    return any(_kdistill_safetensors(out / name) for name in ("checkpoint.safetensors", "model.safetensors"))


def _contents(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not is_stale_tmp(p.name))


def check_contents(out: Path, resume: bool, overwrite: bool, names: Names = CLI, mine: bool | None = None) -> None:
    """Refuse a directory this run may not write into (see the module docstring), naming the way out.
    ``mine``: whether it is a kdistill run (default: :func:`is_kdistill_run`)."""
    if resume or overwrite or not out.is_dir():
        return
    held = _contents(out)
    if not held:
        return
    mine = is_kdistill_run(out) if mine is None else mine
    if mine and set(held) <= RESTARTABLE:
        return  # a run killed before its first checkpoint: nothing would be lost
    if mine and ("model.safetensors" in held or "results.json" in held):
        raise ValueError(f"{names.out}: {out} holds a finished run (model.safetensors, results.json); choose another "
                         f"directory, or {names.overwrite} to replace it")
    if mine and "checkpoint.safetensors" in held:
        raise ValueError(f"{names.out}: {out} holds an unfinished run (checkpoint.safetensors); {names.resume} to "
                         f"continue it, or {names.overwrite} to start over")
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    whose = "" if mine else ", files kdistill did not write"
    raise ValueError(f"{names.out}: {out} is not empty (holds {shown}{whose}); choose a new or empty directory, or "
                     f"{names.overwrite} to write the run there (it replaces only kdistill's own files: "
                     f"{', '.join(RUN_FILES)})")


def no_checkpoint(out: Path, names: Names = CLI) -> FileNotFoundError:
    """The error for resuming a directory without ``checkpoint.safetensors``, saying why it may have none and
    the way out: a run killed before its first checkpoint restarts without resume (its files are rewritten)."""
    held = _contents(out) if out.is_dir() else []
    if not held:
        return FileNotFoundError(f"{names.resume}: {out} holds no run to continue (no checkpoint.safetensors); "
                                 f"run without {names.resume}")
    extra = "" if set(held) <= RESTARTABLE and is_kdistill_run(out) else f", adding {names.overwrite} to replace the run's files there"
    return FileNotFoundError(f"{names.resume}: no checkpoint in {out} (the run stopped before its first checkpoint); "
                             f"run again without {names.resume}{extra}")


def check_config_file(config: str | os.PathLike | None, out: Path) -> None:
    """Refuse ``--config OUT/config.yaml`` when that file is the user's: the run would replace it with its
    resolved config. (In a kdistill run the file is the run's own record, and reading it back is fine.)"""
    if not config:
        return
    target = out / "config.yaml"
    try:
        same = target.exists() and Path(config).resolve() == target.resolve()
    except OSError:
        return
    if same and not is_kdistill_run(out):
        raise ValueError(f"--config: {config} is the config.yaml the run writes into --out {out} (its resolved config "
                         f"replaces it); keep your file elsewhere (e.g. mv {target} {out.parent / (out.name + '.yaml')})"
                         " and pass that path, or choose another --out")


def clear_run(out: Path) -> None:
    """Delete a previous run's files (``--overwrite``) and stale temporary files; anything else stays."""
    if out.is_dir():
        for p in out.iterdir():
            if (p.name in RUN_FILES or is_stale_tmp(p.name)) and p.is_file():
                p.unlink()


_HELD: dict[str, "RunLock"] = {}
"""Locks this process holds, by directory: ``fit`` inside a CLI run finds the CLI's lock and shares it."""


def _holder_from_proc_locks(inode: int) -> str | None:
    """The pid holding a flock on ``inode``, from Linux's ``/proc/locks``."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
            return f"pid {parts[4]}"
    return None


class RunLock:
    """An exclusive ``flock`` on ``OUT/.kdistill.lock`` (see the module docstring)."""

    def __init__(self, out: Path, names: Names = CLI) -> None:
        self.out, self.names = Path(out), names
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None
        self.made_dir = self.made_file = False
        self.depth = 0

    def acquire(self) -> "RunLock":
        """Take the lock (making the directory if needed), or a ValueError naming the run that holds it."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.names.out}: {self.out} is a file, not a directory; give a directory for the run")
        self.made_dir = not self.out.exists()
        for _ in range(5):  # the file may be removed by its last holder between our open and our flock
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self.made_file = not self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ValueError(f"{self.names.out}: cannot write the run's files to {self.out} "
                                 f"({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"{self.names.out}: {self.out} is in use by another kdistill run ({self._holder()}); "
                                 f"wait for it to end, or choose another directory") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)
        raise ValueError(f"{self.names.out}: could not lock {self.path} (it keeps being replaced)")

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("pid"):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
            return f"pid {info['pid']} on {info.get('host', '?')} since {since}: {info.get('command', '?')}"
        try:
            found = _holder_from_proc_locks(os.stat(self.path).st_ino)
        except OSError:
            found = None
        return found or "its process holds the lock"

    def record(self) -> None:
        """Write who holds the lock into the lock file (once the run starts writing its files)."""
        if self.fd is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        """Unlock. A lock file left alone in its directory goes (and the directory, if this lock made it);
        one this lock created for a run that was refused goes too."""
        if self.fd is None:
            return
        try:
            alone = self.path.is_file() and not _contents(self.out)
            if alone or (self.made_file and not self._recorded()):
                self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees another inode
            if alone and self.made_dir:
                try:
                    self.out.rmdir()
                except OSError:
                    pass
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def _recorded(self) -> bool:
        return self.fd is not None and os.fstat(self.fd).st_size > 0


class Claim:
    """This process's hold on a run directory for one run: ``fresh`` when this call took the lock and checked
    the directory, False when an outer caller (the CLI around ``fit``) already holds it."""

    def __init__(self, lock: RunLock | None, fresh: bool) -> None:
        self.lock, self.fresh = lock, fresh

    def record(self) -> None:
        if self.lock is not None:
            self.lock.record()

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Ready the directory for a run started from Python (a CLI run has done this before calling ``fit``):
        name the holder, delete kdistill's files (``overwrite``) or a killed run's config.yaml (a new run writes
        its own), and the temporary files of interrupted writes."""
        if self.lock is None:
            return
        if self.fresh:
            self.record()
            if overwrite:
                clear_run(self.lock.out)
            if not resume:
                (self.lock.out / "config.yaml").unlink(missing_ok=True)
        remove_stale_tmp(self.lock.out)

    def release(self) -> None:
        if self.lock is None:
            return
        self.lock.depth -= 1
        if self.lock.depth <= 0:
            _HELD.pop(str(self.lock.out.resolve()), None)
            self.lock.release()
        self.lock = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(out: Path, resume: bool, overwrite: bool, names: Names = CLI) -> Claim:
    """Lock ``out`` for one run and check what it holds (:func:`check_contents`); the lock is shared with an
    outer claim of this process on the same directory (then nothing is checked again)."""
    out = Path(out)
    key = str(out.resolve())
    held = _HELD.get(key)
    if held is not None:
        held.depth += 1
        return Claim(held, fresh=False)
    mine = out.is_dir() and is_kdistill_run(out)  # before the lock file exists for certain
    lock = RunLock(out, names).acquire()
    try:
        check_contents(out, resume, overwrite, names, mine=mine)
    except BaseException:
        lock.release()
        raise
    lock.depth = 1
    _HELD[key] = lock
    return Claim(lock, fresh=True)
