"""Default feature stages per model family, so feature methods (``fitnet``, ``at``) run without naming layers.

A *stage* is the module whose output ends one spatial resolution of the network (the place FitNets and
attention transfer read features). :func:`default_stages` asks each family detector in :data:`FAMILIES`
in turn and returns the first answer with the family's name, so a run can print what it picked:

============  ==================================================================================
family        stages
============  ==================================================================================
declared      the model's own ``feature_layers`` (kdistill's cifar nets, ``cnn:``, ``lenet5``)
timm          ``model.feature_info`` entries at stride >= 4 (timm ResNet: layer1..4, ConvNeXt:
              stages.0..3, MobileNetV3 / EfficientNet: the ``blocks.N`` ending each resolution)
resnet        ``layer1``..``layer4`` (torchvision ResNet / ResNeXt / Wide ResNet)
convnext      torchvision ConvNeXt: ``features.1,3,5,7`` (each stage before its downsampling layer)
mobilenet     torchvision MobileNetV2/V3: the last ``features.N`` block before each block that halves
              the spatial size, plus the last block; the deepest 4 (stride 4, 8, 16, 32)
sequential    any other model with a ``features`` / ``stages`` / ``blocks`` ``nn.Sequential`` trunk:
              the same rule as mobilenet, when it finds at least two stages
============  ==================================================================================

A new family is one function ``f(model) -> tuple[str, ...] | None`` added with :func:`family`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Detector = Callable[[nn.Module], "tuple[str, ...] | None"]
FAMILIES: dict[str, Detector] = {}
MAX_STAGES = 4
"""At most this many stages (the deepest) from the stride rule: the stem's stride-2 output is not a stage."""


def family(name: str) -> Callable[[Detector], Detector]:
    """Register ``fn`` as the detector of family ``name`` (asked in registration order)."""

    def deco(fn: Detector) -> Detector:
        FAMILIES[name] = fn
        return fn

    return deco


def default_stages(model: nn.Module) -> tuple[tuple[str, ...], str | None]:
    """``(module paths, family name)`` of ``model``'s default feature stages, shallow to deep; ``((), None)``
    when no family recognises it (the caller then asks the user to name the layers)."""
    for name, detect in FAMILIES.items():
        paths = detect(model)
        if paths:
            return tuple(paths), name
    return (), None


def _downsamples(module: nn.Module) -> bool:
    """Whether ``module`` contains a convolution or pooling layer with a stride above 1 (halves the size)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if any(s > 1 for s in stride):
                return True
    return False


def stage_ends(trunk: nn.Sequential, prefix: str, limit: int = MAX_STAGES) -> tuple[str, ...]:
    """The children of ``trunk`` that end a resolution: each one followed by a downsampling child, and the last.

    The first child is never an end on its own (it is the stem's input side); the deepest ``limit`` are kept.
    """
    names = [n for n, _ in trunk.named_children()]
    children = list(trunk.children())
    ends = [names[i] for i in range(1, len(children) - 1) if _downsamples(children[i + 1])]
    if len(children) > 1:
        ends.append(names[-1])
    return tuple(f"{prefix}.{n}" for n in ends[-limit:])


@family("declared")
def _declared(model: nn.Module) -> tuple[str, ...] | None:
    return tuple(getattr(model, "feature_layers", ()) or ()) or None


@family("timm")
def _timm(model: nn.Module) -> tuple[str, ...] | None:
    info = getattr(model, "feature_info", None)
    if info is None or not type(model).__module__.startswith("timm."):
        return None
    try:
        entries = [(str(e["module"]), int(e.get("reduction", 0))) for e in info]
    except (TypeError, KeyError, ValueError):
        return None
    return tuple(m for m, r in entries if r >= 4 and m) or None


@family("resnet")
def _resnet(model: nn.Module) -> tuple[str, ...] | None:
    names = {n for n, _ in model.named_children()}
    layers = tuple(f"layer{i}" for i in range(1, 5))
    return layers if set(layers) <= names else None


def _features_of(model: nn.Module, class_prefix: str) -> nn.Sequential | None:
    if not type(model).__name__.startswith(class_prefix):
        return None
    trunk = getattr(model, "features", None)
    return trunk if isinstance(trunk, nn.Sequential) else None


@family("convnext")
def _convnext(model: nn.Module) -> tuple[str, ...] | None:
    trunk = _features_of(model, "ConvNeXt")
    return stage_ends(trunk, "features") if trunk is not None else None


@family("mobilenet")
def _mobilenet(model: nn.Module) -> tuple[str, ...] | None:
    trunk = _features_of(model, "MobileNet")
    return stage_ends(trunk, "features") if trunk is not None else None


@family("sequential")
def _sequential(model: nn.Module) -> tuple[str, ...] | None:
    for attr in ("features", "stages", "blocks"):
        trunk = getattr(model, attr, None)
        if isinstance(trunk, nn.Sequential):
            ends = stage_ends(trunk, attr)
            if len(ends) >= 2:
                return ends
    return None
