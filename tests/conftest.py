import os

import numpy as np
import pytest
import torch

# Tests are small: one thread keeps them deterministic and leaves the other core to the notebook kernels.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
