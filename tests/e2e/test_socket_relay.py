"""gateway_relay=sockets end to end: an admitted session relayed between its two sockets by the
event loop (proxy/socket_relay.py, issue #22). It is what `auto`, the default, takes, so every
Realtime and Gemini Live e2e test runs on it; here each launcher's default gateway is shown to take
it, and then what only this path has: a shared store's admission pausing the client's socket, the
drain, TLS on both legs and a TLS peer's close. (The enforcement scenarios, refusals, cancels and
the 1008 close run in test_frame_relay.py on both byte paths.)"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from ai_gateway_tools.harness import GatewayProcess, assert_metered_exactly, scrape
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

from ..clients import respond, wait_until, websocket_base
from ..conftest import LAUNCHERS
from . import test_gemini_live_e2e, test_realtime_e2e
from .test_drain import drain_sessions
from .test_faults import self_signed
from .test_frame_relay import STRIPPED, open_sessions, stripped_policy
from .test_gemini_live_e2e import (  # noqa: F401  (fixtures)
    LiveGateway,
    live_model,
    live_simulator,
    live_simulators,
)
from .test_shared_limits import key_budget, redis_server  # noqa: F401  (redis_server: a fixture)
from .test_spend_controls import (  # noqa: F401  (upstream: a fixture)
    LIMIT,
    RESERVE,
    TARGET,
    assert_cancelled_after_the_first_turn,
    assert_closed_by_the_limit,
    respond_until_refused,
    tokens,
    until_closed,
    upstream,
    vad_over_budget,
)

# Debug logging shows SocketRelay's line for each session it relays by its sockets: CHOSEN.
SOCKETS = {"gateway_relay": "sockets", "termlog_verbosity": "debug"}
DEFAULT = {"termlog_verbosity": "debug"}  # gateway_relay=auto
CHOSEN = "over its sockets"
BOTH_TLS = "over its sockets (client TLS, upstream TLS)"


@pytest.fixture(scope="module", params=LAUNCHERS)
def gateway(request: pytest.FixtureRequest, simulators: dict[str, Simulator]) -> Iterator[GatewayProcess]:
    """The gateway with its default relay (auto), on each launcher, in front of its simulator."""
    with GatewayProcess(simulators[request.param].url, launcher=request.param, options=DEFAULT) as gw:
        yield gw


def test_sessions_take_the_sockets_path(gateway, simulator, model):
    """By default: the path every Realtime e2e test's sessions take."""
    test_realtime_e2e.test_ga_sdk_session_is_metered_exactly(gateway, simulator, model)
    wait_until(lambda: not open_sessions(gateway))  # the session's end reached the meters
    assert CHOSEN in gateway.log()


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_response_creates_wait_for_the_shared_store_and_are_refused_past_its_budget(
    tmp_path,
    redis_server,  # noqa: F811 (a fixture)
    upstream,  # noqa: F811 (a fixture)
    launcher,
):
    """Each response.create waits for the store's admission while the client's socket is paused;
    what the client sent meanwhile is relayed after it, in order."""
    model = f"gpt-realtime-sockets-shared-{launcher}"
    policy = Path(key_budget(tmp_path, redis_server.url))
    policy.write_text(policy.read_text().replace("  /realtime: Realtime\n", STRIPPED.removeprefix("routes:\n")))
    with GatewayProcess(upstream.url, launcher=launcher, options={**SOCKETS, "gateway_policy": str(policy)}) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        finished = asyncio.run(respond_until_refused(url, f"sk-sockets-shared-{launcher}", pipelined=10))
    assert CHOSEN in gateway.log()
    spent = tokens(upstream.usage_for(model))
    assert finished == sum(e.kind == "response" for e in upstream.usage_for(model))  # none refused went upstream
    assert LIMIT - RESERVE <= spent <= TARGET * LIMIT


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigterm_drains_sessions_relayed_by_their_sockets(tmp_path, launcher):
    log = drain_sessions(tmp_path, launcher, [arg for k, v in SOCKETS.items() for arg in ("--set", f"{k}={v}")])
    assert CHOSEN in log


@pytest.fixture(scope="module", params=LAUNCHERS)
def live_gateway(request, live_simulators, tmp_path_factory) -> Iterator[LiveGateway]:  # noqa: F811 (a fixture)
    """Gemini Live, the client over TLS (wss://), with the default relay (auto)."""
    confdir = tmp_path_factory.mktemp(f"confdir-sockets-{request.param}")
    with LiveGateway(live_simulators[request.param].url, confdir, launcher=request.param, options=DEFAULT) as gw:
        yield gw


def test_gemini_live_sessions_take_the_sockets_path(live_gateway, live_simulator, live_model):  # noqa: F811 (fixtures)
    """By default: the path every Gemini Live e2e test's sessions take."""
    test_gemini_live_e2e.test_ai_studio_text_session_is_metered_exactly(live_gateway, live_simulator, live_model)
    assert "over its sockets (client TLS," in live_gateway.log()


async def tls_session(url: str, context: ssl.SSLContext, responses: int | None) -> tuple[int, int | None, str, float]:
    """`responses` responses one after another and a close by the client, or (None) responses until
    the gateway closes the session: how many finished, the close code and reason, how long it was open."""
    finished = 0
    async with websockets.connect(url, ssl=context) as ws:
        opened = asyncio.get_running_loop().time()
        await ws.recv()
        try:
            while responses is None or finished < responses:
                await respond(ws, timeout=10)
                finished += 1
        except websockets.ConnectionClosed:
            assert responses is None, "only the gateway's limit closes the session"
    return finished, ws.close_code, ws.close_reason or "", asyncio.get_running_loop().time() - opened


# A client's close completes once the gateway closes the connection after the upstream's close
# frame; websockets gives up waiting after 10 s (its close_timeout), which is what a lost close costs.
CLOSED_WITHIN = 5.0


@contextlib.contextmanager
def tls_upstream_and_gateway(tmp_path: Path, launcher: str, policy: str) -> Iterator[tuple[Simulator, GatewayProcess]]:
    """An https upstream, and the gateway in front of it relaying by sockets; the client dials wss://
    (the gateway's CA in its confdir)."""
    options = {**SOCKETS, "gateway_policy": stripped_policy(tmp_path, policy), "confdir": str(tmp_path / "confdir")}
    with (
        SimulatorThread(ssl_context=self_signed(tmp_path), audio_deltas=13) as https_upstream,
        GatewayProcess(https_upstream.url, launcher=launcher, options={**options, "ssl_insecure": "true"}) as gateway,
    ):
        yield https_upstream, gateway


def run_tls_session(gateway: GatewayProcess, model: str, responses: int | None) -> tuple[int, int | None, str, float]:
    context = ssl.create_default_context(cafile=str(Path(gateway.options["confdir"]) / "mitmproxy-ca-cert.pem"))
    url = gateway.url.replace("http://", "wss://", 1) + f"/v1/realtime?model={model}"
    return asyncio.run(tls_session(url, context, responses))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_tls_on_both_legs_is_relayed_and_metered_exactly(tmp_path, launcher):
    """The client dials wss:// and the upstream is https: both legs' TLS carried on by the relay."""
    model = f"gpt-realtime-sockets-tls-{launcher}"
    with tls_upstream_and_gateway(tmp_path, launcher, "") as (https_upstream, gateway):
        finished, code, _, seconds = run_tls_session(gateway, model, 5)
        wait_until(lambda: not open_sessions(gateway))
        assert_metered_exactly(gateway.metrics_url, model, https_upstream.usage_for(model))
        assert sum(e.kind == "response" for e in https_upstream.usage_for(model)) == finished == 5
        assert code == 1000 and BOTH_TLS in gateway.log()
        assert seconds < CLOSED_WITHIN  # the close too (10 s when the upstream's close_notify was lost)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_client_s_close_behind_an_https_upstream_completes_at_once(tmp_path, launcher):
    """As in production (`reverse:https://api.openai.com`, clients on ws:// inside): the client closes,
    the upstream answers with its close frame and its TLS close_notify, which the relay reads in place
    of mitmproxy's TLS layer; mitmproxy must still learn the upstream closed and close the client's
    connection (it did not: every client's close waited 10 s, its own timeout)."""
    model = f"gpt-realtime-sockets-https-close-{launcher}"
    with (
        SimulatorThread(ssl_context=self_signed(tmp_path), audio_deltas=3) as https_upstream,
        GatewayProcess(https_upstream.url, launcher=launcher, options={**SOCKETS, "ssl_insecure": "true"}) as gateway,
    ):

        async def session() -> float:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}") as ws:
                await ws.recv()
                await respond(ws)
                began = asyncio.get_running_loop().time()
                await ws.close()
                assert ws.close_code == 1000
                return asyncio.get_running_loop().time() - began

        assert asyncio.run(session()) < CLOSED_WITHIN
        wait_until(lambda: not open_sessions(gateway))
        assert "upstream TLS)" in gateway.log()
        assert_metered_exactly(gateway.metrics_url, model, https_upstream.usage_for(model))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_tls_on_both_legs_is_closed_with_1008_past_max_session_seconds(tmp_path, launcher):
    """Frames the upstream sends after the gateway's close are neither relayed nor metered, on every
    path: this session is not compared with the upstream's ledger."""
    limit = "limits:\n  client_key: {max_session_seconds: 2}\n"
    with tls_upstream_and_gateway(tmp_path, launcher, limit) as (_, gateway):
        finished, code, text, seconds = run_tls_session(gateway, f"gpt-realtime-sockets-tls-limit-{launcher}", None)
        wait_until(lambda: not open_sessions(gateway))
        samples = scrape(gateway.metrics_url)
        assert finished >= 1 and BOTH_TLS in gateway.log()
    assert_closed_by_the_limit(code, text, seconds, samples, "session_too_long")
