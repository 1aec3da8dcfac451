"""Shared fixtures for the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def num_threads(request):
    """Run a test at 1 and at 2 torch threads (dreidel's kernels follow torch.get_num_threads())."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
