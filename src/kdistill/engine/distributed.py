"""Data-parallel training over several processes (``torchrun``): one GPU, or one CPU share, per process.

``fit`` needs no flag: when a process group of more than one process is initialised, every process keeps
the whole data set in memory, draws the same global batch from the same seeded permutation (and the same
jitter offsets), trains on its own contiguous slice of it, and ``DistributedDataParallel`` averages the
gradients. Since every loss is a mean over its batch, the averaged gradient is the gradient of the mean
over the global batch: N processes with ``batch_size`` B train the same model as one process with batch B
(up to float summation order; tested). Only rank 0 writes files and shows progress.

Launch, e.g. on 4 GPUs: ``torchrun --nproc-per-node 4 -m kdistill.cli distill ...``; the CLI calls
:func:`init_from_env`. From Python, call it before ``fit``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group of several processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(cuda: bool | None = None) -> int:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); return this
    process's rank (0 when not launched that way). NCCL for training on CUDA (``cuda``; default: whether a
    GPU is visible), gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0
    if not dist.is_initialized():
        if cuda is None:
            cuda = torch.cuda.is_available() and os.environ.get("KDISTILL_DEVICE", "cuda") != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def process_device(device: torch.device, n_processes: int) -> torch.device:
    """``cuda`` without an index means this process's GPU (``LOCAL_RANK``) when there are several processes."""
    if device.type == "cuda" and device.index is None and n_processes > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def shard(rows: torch.Tensor, offsets: torch.Tensor | None, rank: int, n_processes: int):
    """This process's contiguous slice of a global batch's row ids (and of its jitter offsets)."""
    if n_processes == 1:
        return rows, offsets
    b = len(rows) // n_processes
    part = slice(rank * b, (rank + 1) * b)
    return rows[part], None if offsets is None else offsets[:, part]


def mean_over_processes(t: torch.Tensor, n_processes: int) -> torch.Tensor:
    """``t`` averaged over every process (in place; a no-op for one process)."""
    if n_processes > 1:
        dist.all_reduce(t)
        t /= n_processes
    return t
