"""Distillation methods as small modules in a registry: a new method is one new file.

A method owns its loss terms and any trainable extras (a FitNets regressor), says what it needs from the
teacher and the student (logits, labels, features at named module paths), checks itself against the models
and data before training starts, and returns a dict of named loss terms that the loop sums and logs.

>>> from kdistill.methods import build_method
>>> method = build_method("kd", temperature=4.0, alpha=0.9)

Register your own from any file (no library file to edit)::

    from kdistill.methods import Method, register

    @register("my_kd")
    class MyKD(Method):
        def __init__(self, temperature: float = 4.0):
            super().__init__()
            self.temperature = temperature
        def losses(self, io):
            ...
"""

from __future__ import annotations

from kdistill.methods.base import Method, StepIO, build_method, get_method, method_options, methods, register
from kdistill.methods import supervised, kd  # noqa: F401,E402  register the built-in methods
from kdistill.methods import dkd, fitnet, at  # noqa: F401,E402

__all__ = ["Method", "StepIO", "build_method", "get_method", "method_options", "methods", "register"]
