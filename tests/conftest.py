import os

import pytest
import torch

# Two cores shared by the test processes: one torch thread each keeps runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_bundle():
    from models.registry import build_tiny

    return build_tiny()
