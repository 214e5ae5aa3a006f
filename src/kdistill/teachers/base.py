"""Teachers: anything that yields logits for a batch.

A teacher is asked for ``logits(x, ids)`` where ``x`` is the (possibly augmented) batch and ``ids`` the
samples' stable ids. A module teacher runs its network on ``x``, frozen and in eval mode; a cached
teacher looks its outputs up by sample id, which is only valid when ``x`` is not augmented.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kdistill.data.dataset import TensorData
from kdistill.data.stream import Inputs, inputs_to
from kdistill.models.fold import fold_batchnorm, has_hooks
from kdistill.models.layout import as_layout, use_channels_last
from kdistill.models.outputs import forward_logits
from kdistill.data.stream import iterate


@runtime_checkable
class Teacher(Protocol):
    needs_inputs: bool
    """True when the logits depend on the batch's pixels (so augmentation changes them)."""

    def logits(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


def vocabulary_mismatch(teacher_classes: int, data) -> str:
    """The refusal of a teacher whose per-position classes (a language model's vocabulary) are not the data's:
    its distribution over one vocabulary cannot teach a student over another."""
    return (f"teacher: outputs {teacher_classes} classes (vocabulary) per position, the student/data "
            f"({data.name}) have {data.num_classes}; a teacher and a student must share a vocabulary: give a "
            f"teacher of {data.num_classes} (e.g. built with vocab_size={data.num_classes}) or the student and the "
            f"data {teacher_classes} classes")


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter's ``requires_grad`` off."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A teacher network's ``train()``: keeps eval mode and returns the module, as ``train`` does.

    Bound to the module itself (not a closure over it), so a deep copy's ``train``/``eval`` return the copy.
    """
    return module


class ModuleTeacher:
    """An ``nn.Module`` used as a teacher: eval mode, no grad, never updated.

    ``train()`` on the wrapped module is turned into a no-op so that a caller switching the whole model
    tree to training mode cannot silently re-enable the teacher's dropout.
    """

    needs_inputs = True

    def __init__(self, module: nn.Module, batch_size: int | None = None) -> None:
        # What the caller gave, so that :meth:`release` can hand the module back exactly as it was.
        self._given = (module.training, [p.requires_grad for p in module.parameters()], "train" in vars(module))
        self._modes = [m.training for m in module.modules()]  # each submodule's own mode (a frozen BN, say)
        self.module = freeze(module)
        self.module.train = types.MethodType(_stay_in_eval, self.module)  # type: ignore[method-assign]
        self.channels_last = use_channels_last(self.module)
        self.batch_size = batch_size or (256 if self.channels_last else 2048)
        self._folded: tuple[nn.Module | None] | None = None  # (BatchNorm-folded copy or None), built on first use
        self._compiled: nn.Module | None = None
        self.compile = False
        """Run the folded network through ``torch.compile`` (set by ``fit`` under ``train.compile``)."""
        self._key = getattr(module, "logits_key", None) or "logits"  # the folded copy or compiled wrapper may lack it

    def release(self) -> nn.Module:
        """Undo the freezing: the module's own ``train()``, training mode and ``requires_grad`` flags come back."""
        self._folded = self._compiled = None
        self.compile = False
        training, flags, had_train = self._given
        if not had_train and "train" in vars(self.module):
            del self.module.train
        for p, flag in zip(self.module.parameters(), flags):
            p.requires_grad_(flag)
        self.module.train(training)
        for m, mode in zip(self.module.modules(), self._modes):
            m.training = mode  # as given, also where submodules differ from their parent
        return self.module

    def weights_hash(self) -> str:
        """sha256 of the network's state (names, shapes, dtypes, values): what a cache of its outputs is keyed on."""
        import hashlib

        h = hashlib.sha256()
        for k, v in self.module.state_dict().items():
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def to(self, device: torch.device | str) -> "ModuleTeacher":
        """Move the network to ``device`` (where the student trains: a live teacher sees its batches)."""
        self.module.to(device)
        self._folded = self._compiled = None
        return self

    def _network(self, x: torch.Tensor) -> nn.Module:
        """The network to run on ``x``: a BatchNorm-folded copy (same logits, a cheaper forward) unless the
        module carries hooks (feature taps read its layers), or folding does not apply (see ``fold_batchnorm``)."""
        if has_hooks(self.module):
            return self.module
        if self._folded is not None and self._folded[0] is not None:
            if next(self._folded[0].parameters()).device != x.device:  # the module was moved: fold again
                self._folded = self._compiled = None
        if self._folded is None:
            folded = fold_batchnorm(self.module, x[:8])
            if folded is not None and self.channels_last:
                folded.to(memory_format=torch.channels_last)
            self._folded = (folded,)
        net = self._folded[0] or self.module
        if not self.compile:
            return net
        if self._compiled is None:  # the frozen forward is one graph with no backward: cheap to compile
            self._compiled = torch.compile(net)
        return self._compiled

    @torch.no_grad()
    def logits(self, x: Inputs, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The network's logits for the batch ``x`` (a tensor, or a dict of tensors passed as keywords),
        whatever its forward returns (:func:`~kdistill.models.outputs.forward_logits`)."""
        if isinstance(x, Mapping):
            return forward_logits(self.module, x).float()
        x = as_layout(x, self.channels_last)
        return forward_logits(self._network(x), x, self._key).float()

    @torch.no_grad()
    def predict(self, data) -> torch.Tensor:
        """Logits for every sample of ``data`` (in memory or streamed), in order."""

        device = next(self.module.parameters()).device
        return torch.cat([self.logits(inputs_to(x, device)).cpu() for x, _, _ in iterate(data, self.batch_size)])

    def cache(self, data: TensorData) -> "CachedTeacher":
        """Run once over ``data`` and return a teacher that looks the logits up by sample id."""
        return CachedTeacher(data.index, self.predict(data))


class CachedTeacher:
    """Teacher logits computed once (or loaded from a file), keyed by sample id.

    Ids that are dense (at most about twice as many slots as rows) are looked up through a direct table;
    sparse ones (a file whose ids run to 10**12, say) through the sorted ids and ``searchsorted``, so memory
    follows the number of rows, never the largest id.
    """

    needs_inputs = False

    def __init__(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if logits.dim() < 2 or len(ids) != len(logits):  # more than 2: per position, (N, L, C), (N, H, W, C)
            raise ValueError(f"cached logits: need one row per id, got {len(ids)} ids and shape {tuple(logits.shape)}")
        if len(ids) and ids.min() < 0:
            raise ValueError("cached logits: sample ids must be >= 0")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("cached logits: sample ids must be unique")
        finite = torch.isfinite(logits).flatten(1).all(dim=1) if len(logits) else torch.ones(0, dtype=torch.bool)
        if not bool(finite.all()):
            bad = ids[~finite.cpu()]
            raise ValueError(f"teacher: its logits are NaN or infinite for {len(bad)} of {len(ids)} samples "
                             f"(e.g. ids {bad[:5].tolist()}); the teacher diverged or its weights are broken")
        self.logits_table = logits.float()
        size = int(ids.max()) + 1 if len(ids) else 0
        if size <= 2 * len(ids) + 1024:
            self.row_of: torch.Tensor | None = torch.full((size,), -1, dtype=torch.long)
            self.row_of[ids] = torch.arange(len(ids))
            self.sorted_ids = self.sorted_rows = None
        else:
            self.row_of = None
            self.sorted_ids, self.sorted_rows = torch.sort(ids)

    @property
    def num_classes(self) -> int:
        return self.logits_table.shape[-1]

    def to(self, device: torch.device | str) -> "CachedTeacher":
        self.logits_table = self.logits_table.to(device)
        if self.row_of is not None:
            self.row_of = self.row_of.to(device)
        else:
            self.sorted_ids, self.sorted_rows = self.sorted_ids.to(device), self.sorted_rows.to(device)
        return self

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Table rows of ``ids`` (-1 where an id has none)."""
        if self.row_of is not None:
            if not len(self.row_of):
                return torch.full_like(ids, -1)
            inside = ids < len(self.row_of)
            return torch.where(inside, self.row_of[ids.clamp(0, len(self.row_of) - 1)], -1)
        if not len(self.sorted_ids):
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_max(len(self.sorted_ids) - 1)
        return torch.where(self.sorted_ids[pos] == ids, self.sorted_rows[pos], -1)

    def check_covers(self, data) -> None:
        """Raise unless every sample of ``data`` has a cached row."""
        device = self.logits_table.device
        ids = data.index.to(device)
        if len(ids) and bool((self.rows(ids) < 0).any()):
            raise ValueError(f"cached teacher logits do not cover every sample of {data.name}: ids missing")
        if data.num_classes != self.num_classes:
            if getattr(data, "per_position", False):
                raise ValueError(vocabulary_mismatch(self.num_classes, data))
            raise ValueError(f"cached teacher logits have {self.num_classes} classes, {data.name} has {data.num_classes}")

    def logits(self, x: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        if self.row_of is not None:
            return self.logits_table[self.row_of[ids]]
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_max(len(self.sorted_ids) - 1)
        return self.logits_table[self.sorted_rows[pos]]
