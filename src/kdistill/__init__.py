"""kdistill: knowledge distillation for PyTorch (Hinton, Vinyals & Dean 2015)."""

__version__ = "0.1.0"

from .losses import distillation_loss, soft_loss, soft_targets  # noqa: E402
from .teachers import CachedTeacher, ModuleTeacher  # noqa: E402
from .train import FitResult, TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__", "distillation_loss", "soft_loss", "soft_targets", "CachedTeacher", "ModuleTeacher",
    "TrainConfig", "FitResult", "fit",
]
