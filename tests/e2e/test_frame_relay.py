"""gateway_relay=frames end to end: sessions relayed as bytes by mitmproxy's TCP layer, frames read
on the side (issue #22). The Realtime scenarios of test_realtime_e2e run here again, on both
launchers, through a `gateway` fixture that sets the option; spend controls, closes and other
protocols through the existing tests' helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from mitmproxy import io

from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.realtime import Simulator

from ..clients import raw_session, respond, wait_until, websocket_base
from ..conftest import LAUNCHERS
from .test_gemini_live_e2e import (  # noqa: F401  (fixtures and tests, collected again against live_gateway below)
    LiveGateway,
    live_model,
    live_simulator,
    live_simulators,
    test_a_report_left_open_by_the_upstream_closing_is_billed_as_incomplete,
    test_ai_studio_text_session_is_metered_exactly,
    test_vertex_audio_session_is_metered_exactly,
)
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
from .test_spend_controls import (  # noqa: F401  (upstream: a fixture)
    LIMIT,
    RESERVE,
    TARGET,
    assert_cancelled_after_the_first_turn,
    assert_closed_by_the_limit,
    policy_file,
    respond_until_refused,
    spend_on,
    tokens,
    until_closed,
    upstream,
    vad_over_budget,
)

# Debug logging shows FrameRelay's line for each session it takes off the WebSocket layer: CHOSEN.
FRAMES = {"gateway_relay": "frames", "termlog_verbosity": "debug"}
CHOSEN = "as frames"
SOCKETS_CHOSEN = "over its sockets"  # proxy/socket_relay.py
# The enforcement scenarios run on both byte paths (sockets: tests/e2e/test_socket_relay.py has its own).
CHOSEN_BY = {"frames": CHOSEN, "sockets": SOCKETS_CHOSEN}
# The routes strip the permessage-deflate offer, as the default policy's Realtime routes do (the
# frames path drops it anyway: test_realtime_e2e.test_compressed_session_is_metered).
STRIPPED = "routes:\n  /realtime: {type: Realtime, request: {remove: [sec-websocket-extensions]}}\n"


def stripped_policy(tmp_path: Path, text: str) -> str:
    """A policy of `text` whose Realtime route strips the permessage-deflate offer (STRIPPED)."""
    return policy_file(tmp_path, text + STRIPPED)


@pytest.fixture(scope="module", params=LAUNCHERS)
def gateway(request: pytest.FixtureRequest, simulators: dict[str, Simulator]) -> Iterator[GatewayProcess]:
    """The gateway relaying sessions as frames, on each launcher, in front of that launcher's simulator."""
    with GatewayProcess(simulators[request.param].url, launcher=request.param, options=FRAMES) as gw:
        yield gw


def test_sessions_take_the_frames_path(gateway, simulator, model):
    test_ga_sdk_session_is_metered_exactly(gateway, simulator, model)
    assert CHOSEN in gateway.log()


@pytest.mark.parametrize("relay", CHOSEN_BY)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_refused_response_creates_are_cut_out_and_answered_with_an_error(tmp_path, upstream, launcher, relay):  # noqa: F811 (a fixture)
    model = f"gpt-realtime-{relay}-budget-{launcher}"
    text = f"budgets:\n  session: {{tokens: {LIMIT}}}\n  reserve: {{tokens: {RESERVE}}}\n"
    options = {**FRAMES, "gateway_relay": relay, "gateway_policy": stripped_policy(tmp_path, text)}
    with GatewayProcess(upstream.url, launcher=launcher, options=options) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        finished = asyncio.run(respond_until_refused(url, "sk-pipeliner", pipelined=10))
        samples = scrape(gateway.metrics_url)
    assert CHOSEN_BY[relay] in gateway.log()
    spent = tokens(upstream.usage_for(model))
    assert finished == sum(e.kind == "response" for e in upstream.usage_for(model))  # none refused went upstream
    assert LIMIT - RESERVE <= spent <= TARGET * LIMIT
    assert sum(select(samples, action="refused_response", reason="budget_exceeded").values()) >= 10


@pytest.mark.parametrize("relay", CHOSEN_BY)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_responses_the_upstream_starts_over_budget_are_cancelled(tmp_path, launcher, relay):
    text = "budgets:\n  session: {tokens: 1000}\n  reserve: {tokens: 1}\n"
    logs: list[str] = []
    seen, samples = vad_over_budget(stripped_policy(tmp_path, text), launcher, {**FRAMES, "gateway_relay": relay}, logs)
    assert_cancelled_after_the_first_turn(seen, samples, "session")
    assert CHOSEN_BY[relay] in logs[0]


@pytest.mark.parametrize("relay", CHOSEN_BY)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_session_past_max_session_seconds_is_closed_with_1008(tmp_path, upstream, launcher, relay):  # noqa: F811 (a fixture)
    limit = "limits:\n  client_key: {max_session_seconds: 2}\n"
    options = {**FRAMES, "gateway_relay": relay, "gateway_policy": stripped_policy(tmp_path, limit)}
    with GatewayProcess(upstream.url, launcher=launcher, options=options) as gateway:
        code, text, seconds = asyncio.run(until_closed(gateway, busy=True))
        wait_until(lambda: not open_sessions(gateway))
        samples = scrape(gateway.metrics_url)
    assert CHOSEN_BY[relay] in gateway.log()
    assert_closed_by_the_limit(code, text, seconds, samples, "session_too_long")


@pytest.mark.parametrize("relay", ["messages", "frames"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_response_create_over_the_body_cap_is_refused_from_its_head(tmp_path, upstream, launcher, relay):  # noqa: F811 (a fixture)
    """A `response.create` larger than gateway_max_body_bytes: read from its head on both paths
    (the frames path holds it only until its head is in), admitted while the budget lasts and
    relayed whole, refused once it is spent and never sent upstream."""
    model = f"gpt-realtime-frames-over-cap-{launcher}-{relay}"
    cap = 64 * 1024
    text = f"budgets:\n  session: {{tokens: {LIMIT}}}\n  reserve: {{tokens: {RESERVE}}}\n"
    options = {
        **FRAMES,
        "gateway_relay": relay,
        "gateway_max_body_bytes": str(cap),
        "gateway_policy": stripped_policy(tmp_path, text),
    }
    large = {"type": "response.create", "response": {"instructions": "Be brief. " * (cap // 5)}}

    async def answer(ws: websockets.ClientConnection) -> str:
        await ws.send(json.dumps(large))
        while (kind := json.loads(await ws.recv())["type"]) not in ("response.done", "error"):
            pass
        return kind

    async def session(url: str) -> tuple[list[str], int]:
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()
            first = await answer(ws)  # within the budget
            finished = await spend_on(ws, pipelined=1)  # until a response.create is refused
            return [first, await answer(ws)], finished

    with GatewayProcess(upstream.url, launcher=launcher, options=options) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        seen, finished = asyncio.run(session(url))
        samples = scrape(gateway.metrics_url)
    assert (CHOSEN in gateway.log()) == (relay == "frames")
    assert seen == ["response.done", "error"]
    assert sum(e.kind == "response" for e in upstream.usage_for(model)) == 1 + finished  # the refused one never went
    assert sum(select(samples, action="refused_response", reason="budget_exceeded").values()) >= 2


def open_sessions(gateway: GatewayProcess) -> float:
    samples = scrape(gateway.metrics_url)
    return sum(v for (name, _), v in samples.items() if name == "agentgateway_gateway_websocket_sessions")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_client_that_closes_without_a_code_ends_the_session_normally(upstream, launcher):  # noqa: F811 (a fixture)
    model = f"gpt-realtime-frames-bare-close-{launcher}"
    with GatewayProcess(upstream.url, launcher=launcher, options=FRAMES) as gateway:

        async def session() -> None:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}") as ws:
                await ws.recv()
                await respond(ws)
                await ws.close(code=None)  # type: ignore[arg-type]  # websockets then sends an empty close frame

        asyncio.run(session())
        wait_until(lambda: not open_sessions(gateway))
        samples = scrape(gateway.metrics_url)
        log = gateway.log()
    assert CHOSEN in log
    assert "close_code=1005 closed_by=client errors=0" in log
    assert not select(samples, route_type="Realtime", error_type="client_disconnected")
    assert sum(e.kind == "response" for e in upstream.usage_for(model)) == 1
    assert usage_only(select(samples, gen_ai_request_model=model)) == expected_samples(upstream.usage_for(model))


@pytest.fixture(scope="module", params=LAUNCHERS)
def live_gateway(request, live_simulators, tmp_path_factory) -> Iterator[LiveGateway]:  # noqa: F811 (a fixture)
    """Gemini Live over TLS, relayed as frames: its e2e tests run again here."""
    confdir = tmp_path_factory.mktemp(f"confdir-frames-{request.param}")
    with LiveGateway(live_simulators[request.param].url, confdir, launcher=request.param, options=FRAMES) as gw:
        yield gw


def test_gemini_live_sessions_take_the_frames_path(live_gateway, live_simulator, live_model):  # noqa: F811 (fixtures)
    test_ai_studio_text_session_is_metered_exactly(live_gateway, live_simulator, live_model)
    assert CHOSEN in live_gateway.log()


def test_auto_takes_the_sockets_unless_flows_are_saved(tmp_path, upstream):  # noqa: F811 (a fixture)
    """`auto` under mitmdump takes the byte path, between the sockets; saving flows keeps mitmproxy's
    WebSocket layer, so that the saved session is a WebSocket flow with its messages."""
    saved = tmp_path / "flows.mitm"
    chosen = {}
    for name, options in (("plain", {}), ("saving", {"save_stream_file": str(saved)})):
        settings = {"gateway_relay": "auto", "termlog_verbosity": "debug", **options}
        with GatewayProcess(upstream.url, options=settings) as gateway:
            url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime-frames-auto"
            asyncio.run(raw_session(url, [{"type": "response.create"}]))
        chosen[name] = (CHOSEN in gateway.log(), SOCKETS_CHOSEN in gateway.log())
    assert chosen == {"plain": (True, True), "saving": (False, False)}
    with saved.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert [type(flow).__name__ for flow in flows] == ["HTTPFlow"]
    assert (
        flows[0].websocket is not None and flows[0].websocket.messages
    )  # the last one, as gateway_websocket_history keeps
