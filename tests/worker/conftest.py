"""Fixtures for the worker's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test's torch ops on one thread.

    These models are tiny, and the test machine's cores are shared: a second
    thread buys nothing, and when the cores are busy its barrier waits make
    small ops ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
