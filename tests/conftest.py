"""Test-session settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tests use tiny tensors: one intra-op thread is faster, and on a busy 2-core machine
    far more so (two OpenMP threads fighting other processes stall for seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
