import os

import pytest
import torch

from kdistill import data


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits (1x8x8) with a seeded validation split: small, real, no download."""
    return data.load("digits", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_asked():
    """``device: auto`` means the CPU in tests, as in CI, also on a GPU machine (before any fixture trains);
    tests/test_cuda.py asks for ``cuda`` explicitly."""
    before = os.environ.get("KDISTILL_DEVICE")
    os.environ["KDISTILL_DEVICE"] = "cpu"
    yield
    if before is None:
        del os.environ["KDISTILL_DEVICE"]
    else:
        os.environ["KDISTILL_DEVICE"] = before


@pytest.fixture(autouse=True)
def _ecosystem_node(request):
    """Lets ``ecosystem.need`` check that the test calling it is marked ``ecosystem``."""
    import ecosystem

    ecosystem.current[0] = request.node
    yield
    ecosystem.current[0] = None


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests never read the user's data cache (~/.cache/kdistill): a machine with real data cached must give
    the same results as a fresh one."""
    root = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    monkeypatch.setenv("KDISTILL_CACHE", str(root / "kdistill"))
