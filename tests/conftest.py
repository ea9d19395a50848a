"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test: the machine's 2 cores are shared, one thread avoids OpenMP spin contention, and
    the small networks and kernels here gain nothing from more. The previous thread count is restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
