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


@pytest.fixture(params=["kernels", "torch"])
def cpu_path(request):
    """Runs a test on the compiled CPU kernels (the default on a CPU) and again on the torch code they replace,
    which every other device runs."""
    from gmmseg_core import cpu_kernels

    if request.param == "kernels":
        assert cpu_kernels.available(torch.zeros(1)), "numba, a dependency, could not be imported"
        yield request.param
    else:
        with cpu_kernels.disabled():
            yield request.param
