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
current: list = [None]  # the running test's node, set by conftest's autouse fixture


def need(module: str) -> ModuleType:
    """``module`` imported; skipped when missing unless the ecosystem environment is required.

    A test calling it must carry ``@pytest.mark.ecosystem``: CI's ecosystem run selects tests by that mark,
    so an unmarked one would be skipped in one environment and never selected in the other."""
    node = current[0]
    if node is not None and node.get_closest_marker("ecosystem") is None:
        pytest.fail(f"{node.nodeid} needs {module}: mark it @pytest.mark.ecosystem so that .ci/run's ecosystem "
                    "environment runs it")
    if REQUIRED:
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except Exception as err:  # torchvision built for another torch raises RuntimeError, not ImportError
        pytest.skip(f"{module} is not importable here ({type(err).__name__}); .ci/run runs this test in its "
                    "torch 2.14.1 + torchvision environment")
