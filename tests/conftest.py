"""Shared fixtures for the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture
def locked_folder(tmp_path, monkeypatch):
    """An empty folder ``tmp_path / "locked"`` that may not be written in: mode 0555, and where the tests run as
    root (who may write anywhere) ``os.access`` also denies writing there, as it would for anyone else."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
            False if Path(path).resolve() == locked and mode & os.W_OK else real_access(path, mode, **kwargs)))
    yield locked
    locked.chmod(0o755)
