"""A text frame that is not UTF-8 (RFC 6455 5.6 forbids it): mitmproxy's wsproto ends the session
with 1007 on both legs, nothing of it is relayed, and the gateway keeps mitmproxy's behaviour
(issue 13 row 14). Binary frames and malformed JSON in valid UTF-8 are relayed byte for byte
(tests/e2e/test_realtime_e2e.py)."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import wait_until, websocket_base
from ..conftest import LAUNCHERS

INVALID = b'{"type": "conversation.item.create", "text": "caf\xe9"}'  # Latin-1, not UTF-8
SEND_INVALID = "send me an invalid frame"


class InvalidTextUpstream:
    """A Realtime-like upstream that sends a non-UTF-8 text frame when asked, and records what it got."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[str | bytes] = []
        self.close_codes: list[int | None] = []
        self._server: websockets.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await serve(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _session(self, ws: ServerConnection) -> None:
        await ws.send('{"type": "session.created", "session": {"model": "gpt-realtime-utf8"}}')
        try:
            async for message in ws:
                self.received.append(message)
                if message == SEND_INVALID:
                    await ws.send(INVALID, text=True)  # websockets sends the bytes as they are
        except websockets.ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)


async def session(url: str, first: str | bytes) -> tuple[int | None, list[str | bytes]]:
    """Sends `first` as a text frame; returns the close code the client saw and what it received."""
    received: list[str | bytes] = []
    async with websockets.connect(f"{url}/v1/realtime?model=gpt-realtime-utf8") as ws:
        received.append(await ws.recv())
        await ws.send(first, text=True)
        try:
            while True:
                received.append(await asyncio.wait_for(ws.recv(), timeout=10))
        except websockets.ConnectionClosed:
            return ws.close_code, received


def ended(gateway: GatewayProcess) -> tuple[dict[str, float]] | None:
    """The upstream errors counted, once the gateway has ended the session (None while it is open)."""
    samples = scrape(gateway.metrics_url)
    if any(value for (name, _), value in samples.items() if name == "agentgateway_gateway_websocket_sessions"):
        return None
    errors = select(samples, route_type="Realtime")
    name = "agentgateway_gateway_upstream_errors_total"
    return ({dict(labels)["error_type"]: value for (sample, labels), value in errors.items() if sample == name},)


@pytest.mark.parametrize("relay", ["messages", "frames", "sockets"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("sender", ["client", "upstream"])
def test_invalid_utf8_text_frame_closes_the_session_with_1007(launcher, sender, relay):
    """The same on the byte paths (gateway_relay=frames, sockets), where the gateway's reader finds it."""
    with SimulatorThread(server=InvalidTextUpstream()) as upstream:
        options = {"gateway_relay": relay, "termlog_verbosity": "debug"}
        with GatewayProcess(upstream.url, launcher=launcher, options=options) as gateway:
            first = INVALID if sender == "client" else SEND_INVALID
            close_code, received = asyncio.run(session(websocket_base(gateway.url), first))
            wait_until(lambda: upstream.close_codes)
            wait_until(lambda: ended(gateway))
            (errors,) = ended(gateway) or ({},)  # scraped again: websocket_end has certainly finished
    # Counted as the upstream's failure only when the upstream sent the frame.
    assert errors == ({"ws_close_1007": 1.0} if sender == "upstream" else {})
    assert close_code == 1007  # what the client sees, whichever side sent the frame
    assert ("as frames" in gateway.log()) == (relay != "messages")  # a sockets session is chosen for frames first
    assert ("over its sockets" in gateway.log()) == (relay == "sockets")
    assert upstream.close_codes == [1007]
    assert len(received) == 1, "nothing after session.created reached the client"
    assert upstream.received == ([] if sender == "client" else [SEND_INVALID])
