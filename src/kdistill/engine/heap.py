"""Keep freed host memory in the process between training steps instead of returning it to the OS.

Every step allocates and frees the same buffers (activations, gradients of a few MB each). With glibc's
default settings, freed memory at the top of the heap is handed back to the kernel once it exceeds the
trim threshold, and blocks above the mmap threshold are unmapped on free, so the next step touches fresh
pages. On the 2-core reference VM, W5's student (resnet8, batch 128, crop4+flip) took 8,000-14,000 minor
page faults per step and ran 1.17x faster with the memory kept (120 vs 102 ms/step, medians of 4 fresh
processes each, ``benchmarks/heap_ab.py``); the MLP and MNIST-CNN steps, whose buffers glibc's own adaptive
thresholds already keep, show no difference beyond the run-to-run spread. Caching 8 views of a resnet20
teacher, which ``fit`` does before its first step and so also under the kept heap, ran 1.54x faster (368 vs
567 ms per batch of 128, 213 vs 201,930 faults per batch; ``benchmarks/heap_ab.py``, 2026-12-04).
PyTorch's CUDA allocator caches blocks for the same reason; on the host it relies on ``malloc``.

:func:`retain_freed_memory` raises glibc's trim and mmap thresholds once per process (``mallopt``), which
is what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` would do if set before start-up. The cost
is that memory a run frees stays in its resident set for reuse instead of going back to the OS. Set
``KDISTILL_RETAIN_HEAP=0`` to keep the C library's defaults. Elsewhere than glibc (macOS, musl, Windows)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 1 << 30
"""Free memory kept at the top of the heap before any is returned to the OS."""
MMAP_BYTES = (1 << 30, 32 << 20)
"""Allocations at or below this size come from the heap (reusable); tried in order, as older glibc caps it
at 32 MiB."""

_state: bool | None = None


def retain_freed_memory() -> bool:
    """Tune glibc's ``malloc`` once per process so per-step buffers are reused; True if it is in effect."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("KDISTILL_RETAIN_HEAP", "1").strip().lower() in ("0", "false", "no", "off"):
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's parameters above are glibc's
            return _state
    except (OSError, AttributeError):
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_BYTES)
    _state = bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1)
    return _state


def heap_retained() -> bool | None:
    """Whether :func:`retain_freed_memory` is in effect in this process (None: not tried yet)."""
    return _state
