"""The training engine: one loop (:mod:`.loop`), batch sources (:mod:`.sources`), the autograd step
(:mod:`.step`), feature hooks, callbacks, evaluation and data parallelism."""

from kdistill.engine.callbacks import Callback, EarlyStopping, LoopState
from kdistill.engine.config import OPTIMIZERS, SCHEDULES, FitResult, TrainConfig
from kdistill.engine.loop import fit, resolve_method, run_epochs
from kdistill.engine.optim import lr_factor, make_optimizer, resolve_device

__all__ = ["OPTIMIZERS", "SCHEDULES", "Callback", "EarlyStopping", "LoopState", "FitResult", "TrainConfig", "fit", "resolve_method",
           "run_epochs", "lr_factor", "make_optimizer", "resolve_device"]
