"""gateway_relay=frames and gateway_relay=sockets for Responses over WebSocket and GPT-Live: their
e2e tests run again here, on both launchers and both paths, through fixtures that set the option
(issue #22). Gemini Live and Realtime are in test_frame_relay.py and test_socket_relay.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ai_gateway_tools.harness import GatewayProcess

from ..conftest import LAUNCHERS
from .test_frame_relay import CHOSEN
from .test_key_order_e2e import (  # noqa: F401  (a fixture and a test, collected again against `budgeted` below)
    test_a_responses_socket_budget_holds_in_any_key_order_and_spelling,
    upstream,
)
from .test_openai_live_e2e import (  # noqa: F401  (fixtures and tests, collected again against `live_gateway` below)
    live_simulator,
    live_simulators,
    test_a_lower_report_is_not_billed_and_a_dropped_session_bills_its_last_report,
    test_a_sideband_is_metered_under_the_model_the_server_names,
    test_seconds_and_delegated_tokens_are_metered_exactly,
)
from .test_socket_relay import CHOSEN as SOCKETS_CHOSEN
from .test_spend_controls import policy_file

# Debug logging shows the relay's line for each session it takes: test_frame_relay.CHOSEN for frames
# (a session on the sockets path is chosen for frames first), test_socket_relay.CHOSEN for sockets.
RELAYS = {"frames": CHOSEN, "sockets": SOCKETS_CHOSEN}
PATHS = [(launcher, relay) for launcher in LAUNCHERS for relay in RELAYS]


def relay_options(relay: str) -> dict[str, str]:
    return {"gateway_relay": relay, "termlog_verbosity": "debug"}


@pytest.fixture(scope="module", params=PATHS, ids="-".join)
def budgeted(request, upstream, tmp_path_factory) -> Iterator[GatewayProcess]:  # noqa: F811 (a fixture)
    """Responses over WebSocket with a session budget, relayed as bytes: compression is not offered
    upstream (a session with permessage-deflate negotiated stays on messages)."""
    route = "/responses: {type: Responses, request: {remove: [sec-websocket-extensions]}}"
    policy = policy_file(
        tmp_path_factory.mktemp("-".join(request.param)),
        f"budgets:\n  session: {{tokens: 2000}}\nroutes:\n  {route}\n",
    )
    launcher, relay = request.param
    options = {"gateway_policy": policy, **relay_options(relay)}
    with GatewayProcess(upstream.url, options=options, launcher=launcher) as gateway:
        gateway.chosen = RELAYS[relay]  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture(scope="module", params=PATHS, ids="-".join)
def live_gateway(request, live_simulators, tmp_path_factory) -> Iterator[GatewayProcess]:  # noqa: F811 (a fixture)
    """GPT-Live relayed as bytes, its ledger kept for the tests that read it."""
    launcher, relay = request.param
    ledger = tmp_path_factory.mktemp(f"ledger-{launcher}-{relay}") / "usage.jsonl"
    options = {"gateway_usage_log": str(ledger), **relay_options(relay)}
    with GatewayProcess(live_simulators[launcher].url, options=options, launcher=launcher) as gw:
        gw.ledger = ledger  # type: ignore[attr-defined]
        gw.chosen = RELAYS[relay]  # type: ignore[attr-defined]
        yield gw


def test_responses_sessions_take_the_path_asked_for(budgeted):
    test_a_responses_socket_budget_holds_in_any_key_order_and_spelling(budgeted)
    assert budgeted.chosen in budgeted.log()


def test_gpt_live_sessions_take_the_path_asked_for(live_gateway, live_simulator):  # noqa: F811 (a fixture)
    test_seconds_and_delegated_tokens_are_metered_exactly(live_gateway, live_simulator)
    assert live_gateway.chosen in live_gateway.log()
