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


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The tests' tiny space (cli_helpers.TINY) as a file; modules with a space of their own define
    their own `space` fixture."""
    from cli_helpers import TINY

    path = tmp_path_factory.mktemp("space") / "tiny.space"
    path.write_text(TINY)
    return path
