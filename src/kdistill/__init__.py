"""kdistill: knowledge distillation for PyTorch (Hinton, Vinyals & Dean 2015)."""

from kdistill._version import __version__  # noqa: E402

from kdistill.losses import distillation_loss, soft_loss, soft_targets  # noqa: E402
from kdistill.teachers.base import CachedTeacher, ModuleTeacher  # noqa: E402
from kdistill.engine import FitResult, TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__", "distillation_loss", "soft_loss", "soft_targets", "CachedTeacher", "ModuleTeacher",
    "TrainConfig", "FitResult", "fit",
]
