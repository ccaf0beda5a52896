"""Issue 20 item 2 end to end: a Responses-over-WebSocket session's budget holds whatever the key
order or spelling of its `response.create` (before: `type` first was refused after 3 of 8, `type`
after `input` or spelled `"typ\\u0065"` served 8 of 8), on both launchers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import websockets

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import websocket_base
from ..conftest import LAUNCHERS
from .test_spend_controls import policy_file

ASKED = 8
# The input comes before the type in most spellings, and is longer than the head the type was read from.
SPELLINGS = {
    "type-first": '{{"type": "response.create", "model": "{model}", "input": "{text}"}}',
    "type-after-input": '{{"model": "{model}", "input": "{text}", "type": "response.create", "store": false}}',
    "escaped-type": '{{"model": "{model}", "input": "{text}", "typ\\u0065": "response.create"}}',
    "escaped-value": '{{"input": "{text}", "model": "{model}", "type": "respons\\u0065.create"}}',
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=20)) as simulator:
        yield simulator


@pytest.fixture(scope="module", params=LAUNCHERS)
def budgeted(request, upstream, tmp_path_factory) -> Iterator[GatewayProcess]:
    policy = policy_file(
        tmp_path_factory.mktemp(request.param),
        "budgets:\n  session: {tokens: 2000}\nroutes:\n  /responses: Responses\n",
    )
    with GatewayProcess(upstream.url, options={"gateway_policy": policy}, launcher=request.param) as gateway:
        yield gateway


async def served(gateway: GatewayProcess, create: str) -> int:
    """Asks for ASKED responses one after another in one session; how many were served."""
    count = 0
    async with websockets.connect(f"{websocket_base(gateway.url)}/v1/responses") as ws:
        for _ in range(ASKED):
            await ws.send(create)
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] != "response.completed":
                if event["type"] == "error":
                    assert event["error"]["code"] == "budget_exceeded"
                    break
            else:
                count += 1
    return count


def test_a_responses_socket_budget_holds_in_any_key_order_and_spelling(budgeted):
    counts = {
        name: asyncio.run(served(budgeted, create.format(model=f"gpt-4o-order-{name}", text="hello " * 200)))
        for name, create in SPELLINGS.items()
    }
    # Each response bills a random few hundred to a thousand tokens: every spelling is served at
    # least once and then refused, as type-first is.
    assert all(0 < count < ASKED for count in counts.values()), counts
