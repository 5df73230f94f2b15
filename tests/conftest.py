"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tests use tiny tensors: one thread is faster, and two threads spin badly on a busy 2-core
    machine (seen: a 6 s test taking 75-120 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
