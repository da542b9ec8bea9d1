import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (`make test`): each computes on one thread, and so do the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threading only adds wake-up latency (15 ms per op on small CI boxes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
