"""Subnormal floats flushed to zero while training on the CPU.

As a model grows confident, the softmax probabilities of the classes it rules out fall below float32's
smallest normal number (1.2e-38), and the gradients built from them carry those subnormal values into the
backward's matrix products. x86 cores handle subnormal operands in microcode, many times slower than
normal ones, so the step slows down as training goes on: fitting the 2x800 MNIST student (jitter 2, lr
0.2, 8 epochs, 2-core Intel Xeon VM) took 2.5 s for its first epoch and 2.9 s from the fourth on, 22.0 s
in all, against a flat 2.45 s and 19.5 s with subnormals flushed by ``fit`` (the same validation errors
every epoch). Values that small carry nothing a training step can use, which is why GPUs
flush them by default too.

``torch.set_flush_denormal`` sets the FTZ/DAZ flags of the calling thread only. Threads inherit them when
they are created, but PyTorch's OpenMP pool usually exists by the time ``fit`` runs, and then only the main
thread's share of each parallel kernel is flushed (half of a 2-thread product; in the run above that
recovered 0.7 s of the 2.5). So :func:`flushed_denormals` runs the flag change once on every thread of the
pool, through the OpenMP runtime torch loaded (``GOMP_parallel``, which GNU, LLVM and Intel runtimes all
export), and falls back to the calling thread alone where it cannot find one. PyTorch offers no getter, so
:func:`denormals_flushed` reads the state back from a multiplication of subnormal numbers.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

_SUBNORMAL = 1e-39  # below float32's smallest normal number, above its smallest subnormal


def denormals_flushed(threads: bool = False) -> bool:
    """Whether this thread (``threads``: every thread of torch's pool) treats subnormal float32 numbers as
    zero, read from products of them (0 where flushed)."""
    if not threads:
        return bool((torch.full((1,), _SUBNORMAL) * 1.0).item() == 0.0)
    n = (1 << 16) * max(1, torch.get_num_threads())  # above the parallel grain: each thread takes a share
    return bool(((torch.full((n,), _SUBNORMAL) * 1.0) == 0).all())


@lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded into this process (torch's own), or None (not Linux, or not found)."""
    if torch.__config__.parallel_info().find("parallel backend: OpenMP") < 0 or not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line})
    except OSError:
        return None
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libiomp", "libomp")):
            try:
                lib = ctypes.CDLL(path)  # the already loaded library: dlopen hands back the same handle
                lib.GOMP_parallel.argtypes = [_TEAM_FN, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                lib.GOMP_parallel.restype = None
                return lib
            except (OSError, AttributeError):
                continue
    return None


_TEAM_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _set_flush(on: bool) -> bool:
    """Set the flags on the calling thread and (where the OpenMP runtime is found) on every pool thread."""
    if not torch.set_flush_denormal(on):
        return False
    lib = _openmp_runtime()
    if lib is not None:
        def on_each_thread(_data) -> None:
            torch.set_flush_denormal(on)

        fn = _TEAM_FN(on_each_thread)  # kept referenced until the team has run it
        lib.GOMP_parallel(fn, None, max(1, torch.get_num_threads()), 0)
    return True


@contextmanager
def flushed_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormals to zero inside the block (when ``enabled`` and the CPU supports it), then put back
    the state found on entry. Yields whether they are flushed inside."""
    if not enabled:
        yield denormals_flushed()
        return
    before = denormals_flushed()
    if before or not _set_flush(True):  # already on, or a CPU without FTZ/DAZ
        yield before
        return
    try:
        yield True
    finally:
        _set_flush(before)
