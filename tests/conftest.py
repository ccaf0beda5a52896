"""Shared real parts: the simulated upstream, a running gateway in front of it, unique model names.

scripts/test runs the suite in a process per core and one more (pytest-xdist, `--dist worksteal`). Each
worker is a pytest session of its own: the session fixtures below (simulators, a gateway per
launcher) and `_models` exist once per worker, never shared, and every gateway, simulator and Redis
server listens on a free port of its own (`free_port`), with its files under the worker's tmp_path.
A worker that runs out of tests takes some of another's (worksteal: the last minutes are not one
worker finishing a long module alone), so a module's tests may run on several workers and its
module fixtures start on each: a forked gateway starts in a fraction of a second. The one thing
workers share is mitmproxy's default confdir (~/.mitmproxy, where most gateways keep their CA):
`pytest_configure` makes the CA there before any worker starts a gateway, because two mitmdumps
creating it at once on a fresh machine write the same files unsynchronised.

Each worker forks its gateways from a fork server that imported mitmproxy and the gateway once
(tests/forkserver.py says what that changes and what it does not); `AI_GATEWAY_TEST_EXEC=1` execs
every one instead.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from ai_gateway_tools.harness import GatewayProcess, popen
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread
from tests.forkserver import ForkServer

LAUNCHERS = ("mitmdump", "serve")

# Per process: with xdist each worker counts from 0, which is safe because a worker's model names
# only ever reach that worker's own gateways and simulators.
_models = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    """Make mitmproxy's CA in its default confdir once, in the controlling process (or the only one)."""
    if hasattr(config, "workerinput"):
        return
    from mitmproxy import certs, options

    certs.CertStore.from_store(Path(options.CONF_DIR).expanduser(), options.CONF_BASENAME, options.KEY_SIZE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` first, the rest in their order: the parallel run then ends on short
    tests that every worker shares, not on one worker running a long test while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def fork_server() -> Iterator[ForkServer]:
    """Gateways forked from the worker's fork server where it can start them, else run as commands."""
    server = ForkServer()

    def spawn(command: Sequence[str], env: Mapping[str, str], log: IO[bytes]) -> Any:
        return server.spawn(command, env, log) if server.forkable(command, env) else popen(command, env, log)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GatewayProcess, "spawn", staticmethod(spawn))
        yield server
    server.close()


@pytest.fixture
def executed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's gateways run their commands from nothing, never forked: for tests of what a
    process does while it starts, and of its memory against a fresh process's (pytestmark)."""
    monkeypatch.setattr(GatewayProcess, "spawn", staticmethod(popen))


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
