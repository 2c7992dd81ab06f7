"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: more threads only add synchronisation, and on a busy machine they wait on
    each other (a 10x slowdown on 2 shared cores). Modules opt in with pytestmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
