"""The packages practitioners bring (torchvision, timm, transformers, tokenizers), imported for a test.

A test that needs one calls :func:`need` and carries ``@pytest.mark.ecosystem``. Where the package is
missing the test is skipped, except under ``KDISTILL_REQUIRE_ECOSYSTEM=1`` (set by ``.ci/run`` in its
torch 2.14.1 + torchvision 0.29.1 + timm + transformers environment), where a missing or broken package
fails the test: there a skip would mean the test never ran.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("KDISTILL_REQUIRE_ECOSYSTEM") == "1"


def need(module: str) -> ModuleType:
    """``module`` imported; skipped when missing unless the ecosystem environment is required."""
    if REQUIRED:
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except Exception as err:  # torchvision built for another torch raises RuntimeError, not ImportError
        pytest.skip(f"{module} is not importable here ({type(err).__name__}); .ci/run runs this test in its "
                    "torch 2.14.1 + torchvision environment")
