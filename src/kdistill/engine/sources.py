"""Batch sources: what the loop draws each step, from memory (the fast path) or streamed from disk.

Both kinds draw an epoch's order as ``randperm(n, generator=gen)`` and then, step by step, the batch's
augmentation parameters (and cached-view choices) from the same generator, so a streamed split yields the
same batches as the same data held in memory, and a checkpoint of the generator resumes either exactly.
Under data-parallel training every process draws the same global batch and keeps its own slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from kdistill.data.augment import AugParams, Augment
from kdistill.data.dataset import StreamData, TensorData
from kdistill.data.stream import EpochBatches, Inputs, inputs_to, loader
from kdistill.data.augment import to_device_async


class Batch(NamedTuple):
    """One step's inputs. In-memory sources give ``rows`` (gathered inside the step, so a CUDA graph can
    replay it); streamed ones give ``x`` (a tensor, or a dict of tensors for models taking keyword
    inputs), ``y``, ``ids`` already on the device. ``views``: which cached teacher view each sample shows
    (with ``train.teacher_views``)."""

    rows: torch.Tensor | None = None
    x: Inputs | None = None
    y: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    params: AugParams | None = None
    views: torch.Tensor | None = None


def _shard(t: torch.Tensor | None, part: slice, dim: int = 0) -> torch.Tensor | None:
    if t is None:
        return None
    return t[part] if dim == 0 else t[:, part]


class _Draws:
    """The per-step random draws shared by both sources."""

    def __init__(self, aug: Augment, views: int, view_seed: int, rank: int, n_proc: int) -> None:
        self.aug, self.views, self.view_seed, self.rank, self.n_proc = aug, views, view_seed, rank, n_proc

    def draw(self, b: int, gen: torch.Generator) -> tuple[AugParams | None, torch.Tensor | None]:
        """A global batch's random parameters, or (with cached views) which view each sample shows."""
        if self.views:
            return None, torch.randint(0, self.views, (b,), generator=gen)
        if self.aug.is_identity:
            return None, None
        return self.aug.draw(b, gen), None

    def local(self, part: slice, params, views, ids_cpu: torch.Tensor):
        """This process's slice; a view's parameters are a pure function of (sample id, view, seed)."""
        params, views = self.shard(part, params, views)
        if views is not None:
            params = self.aug.view_params(ids_cpu, views, self.view_seed)
        return params, views

    def part(self, b: int) -> slice:
        if self.n_proc == 1:
            return slice(None)
        k = b // self.n_proc
        return slice(self.rank * k, (self.rank + 1) * k)

    def shard(self, part: slice, params: AugParams | None, views: torch.Tensor | None):
        if params is not None:
            params = AugParams(_shard(params.offsets, part, 1), _shard(params.flip, part))
        return params, _shard(views, part)


class TensorSource:
    """An in-memory split on the training device: batches are rows picked by a seeded permutation."""

    streamed = False

    def __init__(self, data: TensorData, device: torch.device, batch_size: int, draws: _Draws) -> None:
        self.data, self.device, self.batch_size, self.draws = data, device, batch_size, draws
        self.x, self.y, self.ids = data.x.to(device), data.y.to(device), data.index.to(device)
        self.ids_cpu = data.index.cpu()
        self.steps_per_epoch = max(1, len(data) // batch_size)  # drop the ragged last batch: equal-sized steps

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's inputs, labels and sample ids: pure device work (index_select is ~4x cheaper than x[rows])."""
        return self.x.index_select(0, rows), self.y.index_select(0, rows), self.ids.index_select(0, rows)

    def epoch(self, gen: torch.Generator) -> Iterator[Batch]:

        n, bs = len(self.data), self.batch_size
        perm_cpu = torch.randperm(n, generator=gen)
        perm = perm_cpu.to(self.device)
        for i in range(self.steps_per_epoch):
            rows_cpu = perm_cpu[i * bs : (i + 1) * bs]
            params, views = self.draws.draw(len(rows_cpu), gen)
            part = self.draws.part(len(rows_cpu))
            ids_cpu = self.ids_cpu[rows_cpu[part]] if views is not None else None
            params, views = self.draws.local(part, params, views, ids_cpu)
            rows = perm[i * bs : (i + 1) * bs][part]
            yield Batch(rows=rows, params=None if params is None else params.to(self.device),
                        views=None if views is None else to_device_async(views, self.device))


class StreamSource:
    """A split read from disk through a ``DataLoader`` (workers, pinned memory), in the same seeded order."""

    streamed = True

    def __init__(self, data: StreamData, device: torch.device, batch_size: int, draws: _Draws, workers: int) -> None:
        self.data, self.device, self.batch_size, self.draws, self.workers = data, device, batch_size, draws, workers
        self.steps_per_epoch = max(1, len(data) // batch_size)
        self._batches = EpochBatches()
        self._loader = None  # built on the first epoch; its workers then serve every epoch

    def close(self) -> None:
        """Stop the persistent workers (they also stop when the source is garbage-collected)."""
        self._loader = None

    def epoch(self, gen: torch.Generator) -> Iterator[Batch]:
        n, bs = len(self.data), self.batch_size
        perm = torch.randperm(n, generator=gen)
        batches = [perm[i * bs : (i + 1) * bs] for i in range(self.steps_per_epoch)]
        part = self.draws.part(bs)
        pin = self.device.type == "cuda"
        self._batches.batches = [b[part].tolist() for b in batches]
        if self._loader is None:
            self._loader = loader(self.data, self._batches, self.workers, pin)
        it = iter(self._loader)
        for _ in batches:
            x, y, ids = next(it)
            params, views = self.draws.draw(bs, gen)
            params, views = self.draws.local(part, params, views, ids)
            nb = pin
            yield Batch(x=inputs_to(x, self.device, non_blocking=nb), y=y.to(self.device, non_blocking=nb),
                        ids=ids.to(self.device, non_blocking=nb),
                        params=None if params is None else params.to(self.device),
                        views=None if views is None else views.to(self.device))


def make_source(data, device: torch.device, batch_size: int, aug: Augment, views: int, view_seed: int,
                rank: int, n_proc: int, workers: int = 0):
    """The batch source for ``data``: in memory for a TensorData, streamed for a StreamData."""
    draws = _Draws(aug, views, view_seed, rank, n_proc)
    if isinstance(data, TensorData):
        return TensorSource(data, device, batch_size, draws)
    return StreamSource(data, device, batch_size, draws, workers)
