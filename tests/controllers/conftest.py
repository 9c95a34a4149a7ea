"""Fixtures for the controller tests (test doubles in `tests.support.doubles`)."""
from __future__ import annotations

import pytest

from tests.support.doubles import AnalyticModel, limits4, plant_info4


@pytest.fixture
def model():
    return AnalyticModel()


@pytest.fixture
def limits():
    return limits4()


@pytest.fixture
def plant_info():
    return plant_info4()
