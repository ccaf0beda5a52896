"""gateway_relay=frames end to end: sessions relayed as bytes by mitmproxy's TCP layer, frames read
on the side (issue #22). The Realtime scenarios of test_realtime_e2e run here again, on both
launchers, through a `gateway` fixture that sets the option; spend controls, closes and other
protocols through the existing tests' helpers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.realtime import Simulator

from ..conftest import LAUNCHERS
from .test_realtime_e2e import (  # noqa: F401  (collected again here, against the fixture below)
    test_beta_sdk_session_is_metered_exactly,
    test_cancelled_failed_and_incomplete_responses_are_counted,
    test_concurrent_responses_are_all_counted,
    test_each_response_is_metered_while_the_session_is_open,
    test_extension_header_is_stripped_before_the_upstream,
    test_fragmented_response_done_is_metered,
    test_ga_sdk_session_is_metered_exactly,
    test_malformed_frames_are_relayed_unchanged_and_counted,
    test_realtime_latency_from_response_create_to_first_delta_and_done,
    test_transcription_only_session,
    test_transcription_usage_is_metered_under_the_transcription_model,
)

FRAMES = {"gateway_relay": "frames"}
CHOSEN = "as frames"  # FrameRelay's debug line for each session it takes off the WebSocket layer


@pytest.fixture(scope="module", params=LAUNCHERS)
def gateway(request: pytest.FixtureRequest, simulators: dict[str, Simulator]) -> Iterator[GatewayProcess]:
    """The gateway relaying sessions as frames, on each launcher, in front of that launcher's simulator."""
    options = {**FRAMES, "termlog_verbosity": "debug"}
    with GatewayProcess(simulators[request.param].url, launcher=request.param, options=options) as gw:
        yield gw


def test_sessions_take_the_frames_path(gateway, simulator, model):
    test_ga_sdk_session_is_metered_exactly(gateway, simulator, model)
    assert CHOSEN in gateway.log()
