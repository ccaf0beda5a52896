"""Shared real parts: the simulated upstream, a running gateway in front of it, unique model names."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import pytest

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

LAUNCHERS = ("mitmdump", "serve")

_models = itertools.count()


@pytest.fixture(scope="session")
def simulators() -> Iterator[dict[str, Simulator]]:
    """One simulated upstream per launcher, so a test comparing a model's ledger to /metrics sees
    only what its own gateway relayed, even for a model name another launcher's run used too."""
    with contextlib.ExitStack() as stack:
        yield {launcher: stack.enter_context(SimulatorThread(seed=20261124)) for launcher in LAUNCHERS}


@pytest.fixture(scope="session", params=LAUNCHERS)
def gateway(request: pytest.FixtureRequest, simulators: dict[str, Simulator]) -> Iterator[GatewayProcess]:
    """The gateway with the default policy (extension header stripped) in front of the simulator,
    run by each launcher in turn: `mitmdump -s addons/gateway.py`, then `scripts/serve`."""
    with GatewayProcess(simulators[request.param].url, launcher=request.param) as gw:
        yield gw


@pytest.fixture
def simulator(request: pytest.FixtureRequest, simulators: dict[str, Simulator]) -> Simulator:
    """The upstream behind this test's `gateway`; mitmdump's for a test that starts its own gateway."""
    if "gateway" in request.fixturenames:
        return simulators[request.getfixturevalue("gateway").launcher]
    return simulators[LAUNCHERS[0]]


@pytest.fixture
def model() -> str:
    """A request model no other test uses, so each test reads only its own series from /metrics."""
    return f"gpt-realtime-t{next(_models)}"
