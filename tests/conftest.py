"""Shared test configuration: a small, deterministic hypothesis profile and seeded RNG."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gald",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("gald")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
