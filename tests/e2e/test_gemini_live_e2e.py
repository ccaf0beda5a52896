"""End to end: Gemini Live sessions from Google's google-genai SDK through the real gateway (both
launchers) to the simulated Live upstream; /metrics compared to exactly what the upstream sent.

The SDK's "API gateway proxy" mode (Vertex client, custom base_url, no key) uses the URL as given
and sends no credential, so the gateway's `auth` supplies it. The SDK always passes an SSL context
to websockets, so it connects with wss:// and trusts the gateway's own mitmproxy CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import websockets
from google import genai
from google.genai import types

from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.harness import assert_metered_exactly as metered_exactly
from ai_gateway_tools.simulators.gemini_live import AI_STUDIO_PATH, VERTEX_PATH, GeminiLiveSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import served_module
from ..conftest import LAUNCHERS

POLICY = Path(__file__).resolve().parents[2] / "policies" / "gemini.yaml"
UPSTREAM_KEY = "AIza-upstream-SECRET-4b1d"
AI_STUDIO = AI_STUDIO_PATH.format(version="v1beta", method="BidiGenerateContent")
CONSTRAINED = AI_STUDIO_PATH.format(version="v1alpha", method="BidiGenerateContentConstrained")
VERTEX = VERTEX_PATH.format(version="v1beta1")

_models = itertools.count()


class LiveGateway(GatewayProcess):
    """The gateway with policies/gemini.yaml, its CA in its own confdir for the SDK to trust."""

    def __init__(
        self,
        upstream: str,
        confdir: Path,
        launcher: str = "mitmdump",
        options: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> None:
        options = {"gateway_policy": str(POLICY), "confdir": str(confdir), **(options or {})}
        super().__init__(upstream, options=options, env={"GEMINI_API_KEY": UPSTREAM_KEY}, launcher=launcher, **kwargs)
        self.confdir = confdir

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.confdir / "mitmproxy-ca-cert.pem"))

    def wss(self, path: str) -> str:
        return self.url.replace("http://", "wss://", 1) + path


@pytest.fixture(scope="module")
def live_simulators() -> Iterator[dict[str, GeminiLiveSimulator]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(SimulatorThread(server=GeminiLiveSimulator(seed=7))) for name in LAUNCHERS}


@pytest.fixture(scope="module", params=LAUNCHERS)
def live_gateway(request, live_simulators, tmp_path_factory) -> Iterator[LiveGateway]:
    confdir = tmp_path_factory.mktemp(f"confdir-{request.param}")
    with LiveGateway(live_simulators[request.param].url, confdir, launcher=request.param) as gw:
        yield gw


@pytest.fixture
def live_simulator(live_gateway, live_simulators) -> GeminiLiveSimulator:
    return live_simulators[live_gateway.launcher]


@pytest.fixture
def live_model() -> str:
    return f"gemini-live-t{next(_models)}"


async def sdk_session(
    gateway: LiveGateway, path: str, model: str, *, texts: list[str] = (), audio_turns: int = 0, audio: bool = True
) -> list[types.LiveServerMessage]:
    """A session with google-genai: text turns (send_client_content), then audio turns
    (send_realtime_input, ended by audio_stream_end); returns every message received."""
    client = genai.Client(
        vertexai=True,
        http_options=types.HttpOptions(base_url=gateway.wss(path), async_client_args={"ssl": gateway.ssl_context()}),
    )
    modality = types.Modality.AUDIO if audio else types.Modality.TEXT
    received: list[types.LiveServerMessage] = []
    config = types.LiveConnectConfig(response_modalities=[modality])
    async with client.aio.live.connect(model=f"models/{model}", config=config) as session:
        for text in texts:
            turn = types.Content(role="user", parts=[types.Part(text=text)])
            await session.send_client_content(turns=turn, turn_complete=True)
            received += [message async for message in session.receive()]
        for _ in range(audio_turns):
            pcm = bytes(3200)  # 100 ms of 16 kHz PCM16
            await session.send_realtime_input(audio=types.Blob(data=pcm, mime_type="audio/pcm;rate=16000"))
            await session.send_realtime_input(audio_stream_end=True)
            received += [message async for message in session.receive()]
    return received


def assert_metered_exactly(gateway: GatewayProcess, simulator: GeminiLiveSimulator, model: str, system: str) -> None:
    sent = simulator.usage_for(model)
    assert sent, "the upstream sent no usage"
    metered_exactly(gateway.metrics_url, model, sent, system=system)


def test_ai_studio_text_session_is_metered_exactly(live_gateway, live_simulator, live_model):
    texts = ["Hello", "sim_usage=repeated", "sim_usage=late", "sim_interrupt=1"]
    received = asyncio.run(sdk_session(live_gateway, AI_STUDIO, live_model, texts=texts, audio=False))
    assert sum(bool(m.server_content and m.server_content.turn_complete) for m in received) == len(texts)
    assert any(m.text for m in received)
    sent = live_simulator.usage_for(live_model)
    assert [e.status for e in sent] == ["completed", "completed", "completed", "cancelled"]
    assert_metered_exactly(live_gateway, live_simulator, live_model, "gcp.gemini")
    handshake = live_simulator.handshakes[-1]
    assert handshake.path == AI_STUDIO
    assert ("x-goog-api-key", UPSTREAM_KEY) in handshake.headers


def test_vertex_audio_session_is_metered_exactly(live_gateway, live_simulator, live_model):
    received = asyncio.run(
        sdk_session(live_gateway, VERTEX, live_model, texts=["sim_usage=repeated"], audio_turns=2, audio=True)
    )
    assert sum(bool(m.data) for m in received) >= 3 * live_simulator.audio_messages
    # Vertex spells the output count candidatesTokenCount; the SDK reads it as response_token_count.
    reports = [m.usage_metadata for m in received if m.server_content and m.server_content.turn_complete]
    sent = live_simulator.usage_for(live_model)
    assert [r.response_token_count for r in reports] == [e.usage["candidatesTokenCount"] for e in sent]
    assert_metered_exactly(live_gateway, live_simulator, live_model, "gcp.vertex_ai")
    assert not select(scrape(live_gateway.metrics_url), gen_ai_request_model=live_model, gen_ai_system="gcp.gemini")


async def raw_session(
    url: str, model: str, text: str, setup: str = '{{"setup": {{"model": "models/{model}"}}}}', **connect: object
) -> list[str | bytes]:
    """A plain websockets client: setup (as spelled, the model put in), one text turn, frames until
    turnComplete (or the close)."""
    received: list[str | bytes] = []
    async with websockets.connect(url, max_size=None, **connect) as ws:
        await ws.send(setup.format(model=model))
        received.append(await asyncio.wait_for(ws.recv(), 20))
        turn = {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": True}
        await ws.send(json.dumps({"clientContent": turn}))
        with contextlib.suppress(websockets.ConnectionClosed):
            while b'"turnComplete"' not in (frame := await asyncio.wait_for(ws.recv(decode=False), 20)):
                received.append(frame)
    return received


CLIENT_KEY = "AIza-client-own-key-9e8d"


@pytest.mark.parametrize(
    ("path", "query", "headers"),
    [
        (AI_STUDIO, f"?key={CLIENT_KEY}", {}),
        (AI_STUDIO, "", {"x-goog-api-key": CLIENT_KEY}),
        (CONSTRAINED, f"?access_token={CLIENT_KEY}", {}),
        (CONSTRAINED, "", {"Authorization": f"Token {CLIENT_KEY}"}),
        (VERTEX, "", {"Authorization": f"Bearer {CLIENT_KEY}"}),
    ],
    ids=["query-key", "x-goog-api-key", "query-access-token", "authorization-token", "authorization-bearer"],
)
def test_client_credentials_are_stripped_and_the_gateway_key_injected(
    live_gateway, live_simulator, live_model, path, query, headers
):
    if live_gateway.launcher != "mitmdump":
        pytest.skip("credential handling is the same code under both launchers")
    url = live_gateway.wss(path) + query
    asyncio.run(raw_session(url, live_model, "Hello", additional_headers=headers, ssl=live_gateway.ssl_context()))
    (handshake,) = [h for h in live_simulator.handshakes if h.path == path][-1:]
    assert [v for n, v in handshake.headers if n == "x-goog-api-key"] == [UPSTREAM_KEY]
    assert not [v for n, v in handshake.headers if CLIENT_KEY in v]
    assert not [v for v in handshake.query.values() if CLIENT_KEY in v]
    assert "authorization" not in dict(handshake.headers)
    assert UPSTREAM_KEY not in live_gateway.log()
    assert_metered_exactly(
        live_gateway, live_simulator, live_model, "gcp.vertex_ai" if path == VERTEX else "gcp.gemini"
    )


@pytest.mark.parametrize(
    "setup",
    [
        '{{"s\\u0065tup": {{"model": "models/{model}"}}}}',
        '{{"setup": {{"generationConfig": {{"responseModalities": ["TEXT"]}}, "m\\u006fdel": "models/{model}"}}}}',
    ],
    ids=["escaped-setup", "escaped-model-last"],
)
def test_the_setup_is_read_in_any_spelling(live_gateway, live_simulator, live_model, setup):
    """Issue 20 item 2: a setup spelled with escapes names the model all the same (else the session
    would be priced as an unknown model, and a cost budget never spent)."""
    asyncio.run(raw_session(live_gateway.wss(AI_STUDIO), live_model, "Hello", setup, ssl=live_gateway.ssl_context()))
    assert_metered_exactly(live_gateway, live_simulator, live_model, "gcp.gemini")


def test_a_report_left_open_by_the_upstream_closing_is_billed_as_incomplete(live_gateway, live_simulator, live_model):
    url = live_gateway.wss(AI_STUDIO)
    asyncio.run(raw_session(url, live_model, "sim_close=1", ssl=live_gateway.ssl_context()))
    assert [e.status for e in live_simulator.usage_for(live_model)] == ["incomplete"]

    def billed() -> dict:
        return usage_only(select(scrape(live_gateway.metrics_url), gen_ai_request_model=live_model))

    expected = expected_samples(live_simulator.usage_for(live_model), system="gcp.gemini")
    deadline = asyncio.run(_poll(lambda: billed() == expected))
    assert deadline, billed()


async def _poll(probe, timeout: float = 10) -> bool:
    """websocket_end runs once the gateway has seen the close: poll, with a deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await asyncio.to_thread(probe):
        if loop.time() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def test_the_simulator_runs_as_a_module_until_interrupted():
    async def setup(url: str) -> dict:
        async with websockets.connect(url.replace("http://", "ws://") + AI_STUDIO) as ws:
            await ws.send(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}))
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

    with served_module("ai_gateway_tools.simulators.gemini_live") as url:
        assert "setupComplete" in asyncio.run(setup(url))
