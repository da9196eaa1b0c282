import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs torch on one thread: the models are tiny, so one thread is as fast, and far
    faster when other processes share the 2 cores (OpenMP threads spin-wait on each other). The
    torchrun workers run with OMP_NUM_THREADS=1 too, so in-process runs they are compared with
    differ from them only by the order of gradient sums across ranks (~1e-7), not by the
    matmul blocking that 2 threads change (~1e-6 after 3 Adam steps)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
