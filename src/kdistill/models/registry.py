"""Model registry: a spec string such as ``mlp:1200,1200,dropout=0.5`` names a plain ``nn.Module``.

Grammar: ``NAME[:ARG,ARG,...]`` where each ARG is either a positional integer (layer widths or channel
counts) or ``key=value``. Builders receive ``in_shape``, ``num_classes``, the positional integers and
the keyword options, so a spec plus the data's shape fully determines the architecture.

Models from outside the registry go through adapters (see :mod:`kdistill.models.adapters`):
``tv:NAME[,key=value...]`` (torchvision), ``timm:NAME[,key=value...]``, ``hf:TYPE|CONFIG.json|./DIR[,task=...]``
(transformers, offline) and ``py:FILE.py:FACTORY[,...]`` / ``py:package.module:FACTORY[,...]`` (the user's code,
called as ``FACTORY(in_shape, num_classes, **options)``).
Their outputs are reduced to logits (option ``logits_key=NAME`` picks a dict entry / attribute).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.config.types import closest, coerce, short_repr, signature_fields
from kdistill.models import adapters
from kdistill.models.convnets import ConvNet, LeNet5
from kdistill.models.mlp import MLP
from kdistill.models.outputs import ensure_logits

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``f(in_shape, num_classes, *ints, **options) -> nn.Module``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. For adapter specs ``name`` is ``tv``/``timm``/``hf``/``py`` and ``target`` the model name
    or ``FILE.py:FACTORY`` / ``package.module:FACTORY``; ``options`` then may hold ``logits_key``."""

    name: str
    ints: tuple[int, ...]
    options: dict[str, Any]
    target: str = ""

    @property
    def is_adapter(self) -> bool:
        return self.name in adapters.ADAPTERS

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        name, _, rest = spec.strip().partition(":")
        if name in adapters.ADAPTERS:
            _, target, parts = adapters.split_adapter_spec(spec)
            options = {}
            for part in parts:
                key, _, val = part.partition("=")
                options[key.strip()] = _value(val.strip())
            return cls(name, (), options, target)
        if name not in _REGISTRY:

            raise ValueError(
                f"model: unknown model {short_repr(name, 60)} in spec {short_repr(spec)}{closest(name, _REGISTRY)}; "
                f"choose one of {available()}, "
                f"or tv:NAME (torchvision), timm:NAME, hf:TYPE (transformers), py:FILE.py:FACTORY"
            )
        ints: list[int] = []
        options: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            if "=" in part:
                key, _, val = part.partition("=")
                options[key.strip()] = _value(val.strip())
            elif part.isdigit():
                if options:
                    raise ValueError(f"model: in {spec!r}, widths must come before key=value options")
                ints.append(int(part))
            else:
                raise ValueError(f"model: cannot read {part!r} in {spec!r}; use integers or key=value")
        return cls(name, tuple(ints), options)


def build_model(spec: str, in_shape: Sequence[int], num_classes: int, seed: int | None = None, *,
                hf_config: dict[str, Any] | None = None) -> nn.Module:
    """Build the model ``spec`` for inputs shaped ``in_shape`` and ``num_classes`` outputs.

    With ``seed``, the initial weights depend on it alone (the global RNG is seeded first). ``hf_config``:
    the transformers config a saved ``hf:`` model recorded (it rebuilds from that, offline).
    """
    parsed = ModelSpec.parse(spec)
    if parsed.is_adapter:
        return _build_adapter(spec, parsed, in_shape, num_classes, seed, hf_config)
    builder = _REGISTRY[parsed.name]
    options = _typed_options(spec, parsed, builder)
    if seed is not None:
        torch.manual_seed(seed)
    model = _built(spec, in_shape, num_classes, lambda: builder(tuple(in_shape), num_classes, parsed.ints, **options))
    model.spec = spec  # type: ignore[attr-defined]
    return model


def _typed_options(spec: str, parsed: ModelSpec, builder: Builder) -> dict[str, Any]:
    """The spec's ``key=value`` options coerced to the builder's types (its defaults' or annotations');
    unknown ones refused naming the closest (see :mod:`kdistill.config.schema`)."""

    fields = signature_fields(builder, 3)  # after in_shape, num_classes, ints
    if fields is None:
        return dict(parsed.options)
    unknown = [k for k in parsed.options if k not in fields]
    if unknown:
        raise ValueError(f"model: {spec!r} has unknown option(s) {sorted(unknown)}{closest(unknown[0], fields)}; "
                         f"{parsed.name} takes {sorted(fields) or 'no options'}")
    return {k: coerce(v, fields[k].hint, f"model: {spec!r} option {k}") for k, v in parsed.options.items()}


def _built(spec: str, in_shape, num_classes: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, with any failure turned into one ValueError naming the spec and the input it was for."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = build()
    except ImportError:
        raise
    except ValueError as exc:
        if str(exc).startswith("model"):
            raise
        raise ValueError(f"model: {spec!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a builder's RuntimeError/TypeError is the spec's, named for the user
        raise ValueError(f"model: cannot build {spec!r} for inputs shaped {tuple(in_shape)} with {num_classes} "
                         f"classes: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ValueError(f"model: {spec!r} builds layers without weights ({', '.join(empty[:3])}) for inputs shaped "
                         f"{tuple(in_shape)}: a width, channel count or kernel of 0, or more downsampling than the "
                         "input's size allows")
    return model


def build_on_meta(spec: str, in_shape: Sequence[int], num_classes: int) -> nn.Module | None:
    """The model ``spec`` with its parameters on the meta device (nothing allocated), to compare shapes
    with a weights file before building it for real; None when the builder cannot build on meta (user code
    that computes with real tensors) or for adapter specs (their libraries may fetch weights)."""
    if ModelSpec.parse(spec).is_adapter:
        return None
    try:
        with torch.device("meta"):
            return build_model(spec, in_shape, num_classes)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001
        return None


def _build_adapter(spec: str, parsed: ModelSpec, in_shape: Sequence[int], num_classes: int,
                   seed: int | None, hf_config: dict[str, Any] | None = None) -> nn.Module:
    """tv:/timm:/hf:/py: models: built by their library or factory, outputs reduced to logits."""
    options = dict(parsed.options)
    logits_key = options.pop("logits_key", "logits")
    if not isinstance(logits_key, str) or not logits_key:
        raise ValueError(f"model: {spec!r}: logits_key must be a name, got {logits_key!r}")
    if seed is not None:
        torch.manual_seed(seed)
    model = _built(spec, in_shape, num_classes,
                   lambda: adapters.build_adapter(spec, in_shape, num_classes, options, hf_config))
    ensure_logits(model, logits_key)
    model.spec = adapters.canonical_spec(spec)  # type: ignore[attr-defined]
    return model


@register("mlp")
def _mlp(in_shape, num_classes, ints, activation: str = "relu", dropout: float = 0.0, input_dropout: float = 0.0,
         max_norm: float | None = None):
    if not ints:
        raise ValueError("model: mlp needs hidden widths, e.g. mlp:800,800 (or mlp:0 for a linear model)")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"model: mlp option max_norm must be > 0 (or left out), got {max_norm!r}")
    hidden = [w for w in ints if w > 0]
    return MLP(math.prod(in_shape), num_classes, hidden, activation, dropout, input_dropout, max_norm)


@register("linear")
def _linear(in_shape, num_classes, ints):
    return MLP(math.prod(in_shape), num_classes, [])


@register("cnn")
def _cnn(in_shape, num_classes, ints, kernel=5, hidden=256, dropout=0.3):
    return ConvNet(in_shape, num_classes, ints or (32, 64), kernel, hidden, dropout)


@register("lenet5")
def _lenet5(in_shape, num_classes, ints):
    return LeNet5(in_shape, num_classes)
