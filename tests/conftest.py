"""Shared fixtures."""
import os

import pytest
import torch

# Triton's CPU interpreter, for the CPU tests of revnet_zero.kernels, must be on before Triton is first
# imported: Triton's own library functions (tl.sum, tl.max, ...) are made compiled or interpreted at that
# import, and test modules that import transformers import Triton. Only without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """The tests use tiny tensors: one thread is faster, and two threads spin badly on a busy 2-core
    machine (seen: a 6 s test taking 75-120 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
