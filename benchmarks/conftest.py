"""Benchmarks run with every plugin the environment has (not hermetic): time what users would run."""

from __future__ import annotations

import pytest
import torch


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=devices())
def device(request) -> str:
    return request.param
