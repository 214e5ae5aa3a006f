"""The training engine: one loop (:mod:`.loop`), batch sources (:mod:`.sources`), the autograd step
(:mod:`.step`), teachers made ready (:mod:`.teaching`, :mod:`.views`), feature hooks and callbacks."""

from .callbacks import Callback, EarlyStopping, LoopState
from .config import FitResult, TrainConfig
from .loop import fit, resolve_method, run_epochs
from .optim import lr_factor, make_optimizer, resolve_device

__all__ = ["Callback", "EarlyStopping", "LoopState", "FitResult", "TrainConfig", "fit", "resolve_method",
           "run_epochs", "lr_factor", "make_optimizer", "resolve_device"]
