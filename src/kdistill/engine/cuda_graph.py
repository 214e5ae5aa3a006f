"""Replay a whole training step as one CUDA graph: one launch per step instead of dozens.

A small model's step on a GPU is bound by the host, not the GPU: each of its ~60 kernels (batch gather,
forward, loss, backward, optimiser update) costs the CPU tens of microseconds to dispatch and launch,
far more than the GPU needs to run it. Capturing the step once and replaying it removes that cost; the
GPU then runs the same kernels on the same buffers, so the numbers do not change. What varies from step
to step (the batch's row ids, jitter offsets, the learning rate) lives in static device buffers that the
caller refills before each call.

The first ``warmup`` calls run eagerly on a side stream (as the CUDA-graph recipe asks: lazy initialisation
such as the optimiser's momentum buffers must happen before capture); the next call captures the step and
replays it. If capture fails (code in the step that needs the host, e.g. ``.item()`` in a custom model),
the step falls back to eager execution with a warning instead of failing the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from kdistill.teachers.views import ViewTeacher
from kdistill.teachers.base import CachedTeacher, ModuleTeacher


class GraphedStep:
    """Call ``step()`` (a closure over static buffers) eagerly ``warmup`` times, then as a replayed graph."""

    def __init__(self, step: Callable[[], None], optimizer: torch.optim.Optimizer | None = None, warmup: int = 3) -> None:
        """``optimizer``: whose ``.grad`` tensors autograd allocates (None when ``step`` writes its own buffers)."""
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # capture failed: run eagerly from now on
        self.calls = 0
        self._side = torch.cuda.Stream()

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.eager:
            self.step()
        elif self.calls <= self.warmup:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self.step()
            torch.cuda.current_stream().wait_stream(self._side)
        else:
            self._capture()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients from the graph's pool
        try:
            with torch.cuda.graph(graph):
                self.step()
        except Exception as exc:  # noqa: BLE001 - anything that cannot be captured runs eagerly instead
            warnings.warn(f"CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); "
                          "continuing without graphs (set train.cuda_graph: false to skip the attempt)",
                          RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self.eager = True
            self.step()  # capture executes nothing: this step still has to run
            return
        self.graph = graph
        graph.replay()  # capture records without executing: run this step now


def graph_safe_teacher(teacher: object) -> bool:
    """Whether ``teacher.logits`` is pure device work (no host round trip), so it can be captured.

    Exact types only: a subclass may add host-side work (counting calls, logging) that a replayed graph
    would silently skip.
    """

    return teacher is None or type(teacher) in (CachedTeacher, ModuleTeacher, ViewTeacher)
