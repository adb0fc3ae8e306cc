"""Shared fixtures of the test suite."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests on one intra-op thread.

    On a shared 2-core machine OpenMP's spinning made small float64 kernels (depthwise convs)
    up to 30x slower with two threads; the thread count is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
