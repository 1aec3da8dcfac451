"""Optimizer tests run in float64 (oracles are float64 solves) on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def float64_single_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
