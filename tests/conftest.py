"""Shared real parts: the simulated upstream, a running gateway in front of it, unique model names."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from ai_gateway.harness import GatewayProcess
from ai_gateway.simulator import Simulator, SimulatorThread

_models = itertools.count()


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    with SimulatorThread(seed=20261124) as sim:
        yield sim


@pytest.fixture(scope="session")
def gateway(simulator: Simulator) -> Iterator[GatewayProcess]:
    """mitmdump with the default policy (extension header stripped) in front of the simulator."""
    with GatewayProcess(simulator.url) as gw:
        yield gw


@pytest.fixture
def model() -> str:
    """A request model no other test uses, so each test reads only its own series from /metrics."""
    return f"gpt-realtime-t{next(_models)}"
