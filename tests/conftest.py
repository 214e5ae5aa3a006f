import os

import pytest
import torch

from kdistill import data


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits (1x8x8) with a seeded validation split: small, real, no download."""
    return data.load("digits", seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
