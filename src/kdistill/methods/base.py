"""The method protocol and its registry."""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, type["Method"]] = {}


class ScheduleWarning(UserWarning):
    """A method's own schedule (a warm-up) does not fit in the run's epochs."""


@dataclass
class StepIO:
    """What one training step hands a method: everything it may need, nothing it has to fetch itself.

    ``progress`` is the number of epochs done so far (a float; a device tensor inside a CUDA graph), for
    schedules such as DKD's warm-up. Feature dicts map the module paths the method asked for to their outputs.
    """

    student_logits: torch.Tensor
    labels: torch.Tensor | None
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    progress: float | torch.Tensor = 0.0
    normalizer: torch.Tensor | None = None
    """Per-position data: the whole batch's valid-position count (over micro-batches and processes, / the
    process count under DDP) that each term divides by, so micro-batch losses add up to the batch's; None:
    the (micro-)batch's own count."""


class Method(nn.Module):
    """A distillation method: named loss terms from a step's :class:`StepIO`.

    Subclasses set the class attributes below to declare their needs and implement :meth:`losses`.
    Trainable extras are ordinary submodules: the optimiser and the checkpoint include them. Options are the
    ``__init__`` keyword arguments, so ``--set method.NAME=VALUE`` and YAML ``method:`` reach them by name.
    """

    name: str = "method"
    needs_teacher: bool = True
    teacher_features: tuple[str, ...] = ()
    student_features: tuple[str, ...] = ()
    temperature: float = 1.0
    """The temperature at which validation reports KL to the teacher (1 for methods without one)."""
    stackable: bool = False
    per_position: bool = False
    """Whether the method trains on per-position labels ((N, L), -100 = not scored), averaging each term over
    the valid positions of the whole batch (:attr:`StepIO.normalizer`); ``fit`` refuses the others there."""
    """Whether the stacked multi-student backend can run it (it then reads ``stacked_options``)."""
    schedule_options: tuple[str, ...] = ()
    """Options that are a length in epochs over which the method ramps a term in (DKD's ``warmup``):
    :meth:`check_schedule` warns when a run is not longer than one of them."""

    @property
    def needs_labels(self) -> bool:
        """Whether the loss uses the hard labels (unlabelled transfer sets need a method without them)."""
        return True

    @property
    def needs_teacher_features(self) -> bool:
        return bool(self.teacher_features)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve what to read from the models (module paths into ``student_features`` / ``teacher_features``).

        Called once before training; raise ValueError naming ``method.FIELD`` for a path the model lacks.
        ``teacher`` is the teacher network, or None for a teacher without one (cached logits, ONNX).
        """
        if self.teacher_features and teacher is None:
            raise ValueError(f"method: {self.name} reads the teacher's features, so it needs a live teacher network")

    def setup(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor],
              student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
        """Build trainable extras from the outputs of one dry forward of a few training samples.

        Called once before the optimiser is made; the default has nothing to build.
        """

    def validate(self, *, num_classes: int, teacher_classes: int | None, has_unlabelled: bool) -> None:
        """Raise ValueError (naming ``method.FIELD`` and the fix) when this method cannot train on this setup.

        ``teacher_classes``: the teacher's output count where known without running it (None otherwise).
        """
        if teacher_classes is not None and teacher_classes != num_classes:
            raise ValueError(f"teacher: outputs {teacher_classes} classes but the data has {num_classes}")
        if has_unlabelled and self.needs_labels:
            raise ValueError(f"method: {self.name} with these options needs labels, but the transfer set has "
                             "unlabelled samples; use soft targets only (e.g. --method kd --alpha 1)")

    def check_schedule(self, epochs: int) -> list[str]:
        """Warn (:class:`ScheduleWarning`) for each of :attr:`schedule_options` at least as long as the run.

        A linear ramp over ``w`` epochs in a run of ``E <= w`` epochs never reaches full weight (at most E/w,
        E/2w on average): DKD's default 20-epoch warm-up in a 4-epoch run keeps its term under 20%. The
        warm-up is not rescaled silently (a run's options mean what they say, and a resumed run keeps them);
        the warning names the option and a value for this run. Called by ``fit`` before training; returns
        the messages.
        """
        messages = []
        for key in self.schedule_options:
            ramp = float(getattr(self, key, 0) or 0)
            if ramp > 0 and epochs > 0 and ramp >= epochs:
                suggest = max(1, epochs // 10) if epochs > 1 else 0
                messages.append(
                    f"method.{key}: {self.name} ramps its loss in over {ramp:g} epochs but the run trains {epochs} "
                    f"(train.epochs), so that term never reaches full weight (at most {epochs / ramp:.0%}, "
                    f"{epochs / (2 * ramp):.0%} on average); set --set method.{key}={suggest} (0 turns it off) "
                    f"or train for more than {ramp:g} epochs")
        for message in messages:
            warnings.warn(message, ScheduleWarning, stacklevel=2)
        return messages

    def losses(self, io: StepIO) -> dict[str, torch.Tensor]:
        """Named scalar loss terms, already weighted: the loop minimises their sum and logs each by name."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options this method was built with (for the resolved config and the run's records)."""
        return {k: getattr(self, k) for k in method_options(type(self)) if hasattr(self, k)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method under ``name`` (selectable as ``--method name``)."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register({name!r}): {cls!r} is not a Method subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def methods() -> list[str]:
    return sorted(_REGISTRY)


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}{_closest(name, _REGISTRY)}; choose one of {methods()}")
    return _REGISTRY[name]


def method_options(cls: type[Method]) -> dict[str, inspect.Parameter]:
    """The keyword options of a method class (its ``__init__`` parameters)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _coerce(name: str, key: str, value: Any, param: inspect.Parameter) -> Any:
    """``value`` as the type of the option's default (YAML 1.1 reads ``5e-4`` as a string, say)."""
    default = param.default
    if default is inspect.Parameter.empty or default is None or value is None:
        return value
    kind = type(default)
    where = f"method.{key}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where}: {name} wants true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: {name} wants a number, got {value!r}")
        try:
            out = float(value) if kind is float else value if isinstance(value, int) else None
            if out is None:
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                out = int(f)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} wants {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"{where}: must be finite, got {value!r}")
        return out
    if kind is tuple or kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return kind(value)
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where}: {name} wants a string, got {value!r}")
    return value


def build_method(name: str | Method, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Method:
    """The method ``name`` with ``options``; unknown or ill-typed options are refused, naming the closest one."""
    if isinstance(name, Method):
        if options or kwargs:
            raise ValueError("method: options go to the method's constructor, not to an already built method")
        return name
    cls = get_method(name)
    opts = {**(options or {}), **kwargs}
    accepted = method_options(cls)
    for key in opts:
        if key not in accepted:
            raise ValueError(f"method.{key}: {name} has no option {key!r}{_closest(key, accepted)}; "
                             f"it takes {sorted(accepted) or 'no options'}")
    coerced = {k: _coerce(name, k, v, accepted[k]) for k, v in opts.items()}
    return cls(**coerced)
