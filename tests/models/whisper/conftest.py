"""Fixtures for the Whisper tests: a random tiny model pair (ours and transformers'), the shipped tiny.en, clips."""

from __future__ import annotations

import warnings

import pytest
import torch

from _whisper_helpers import TINY_DIMS, hf_model_from_ours

from dreidel.models.whisper import Whisper


@pytest.fixture(scope="session")
def random_whisper() -> Whisper:
    generator = torch.Generator().manual_seed(0)
    model = Whisper(TINY_DIMS).eval().requires_grad_(False)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_en():
    from dreidel.models.whisper import load

    return load("tiny.en")


@pytest.fixture(scope="session")
def tiny_en_hf(tiny_en):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_model_from_ours(tiny_en.model)

