"""The gateway closes a relayed WebSocket with a code and reason on both legs (proxy/closer.py).

Against the real gateway under both launchers, the simulated upstream and plain `websockets`
clients; the close is started from a timer by tests/e2e/close_trigger.py, as a session limit will.
The first tests pin the mitmproxy and wsproto internals the closer relies on.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import inspect
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
import wsproto
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import layer, server, tunnel
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import modes, tls
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from mitmproxy.test import tflow
from websockets.exceptions import ConnectionClosed

from ai_gateway.proxy.closer import close_websocket, truncate
from ai_gateway_tools.harness import GatewayProcess, scrape
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

from ..clients import wait_until, websocket_base

TRIGGER_SCRIPT = str(Path(__file__).resolve().parent / "close_trigger.py")
SESSIONS_GAUGE = "agentgateway_gateway_websocket_sessions"
CRASH = re.compile(r"has crashed|Traceback|LocalProtocolError|Error sending", re.IGNORECASE)
WAIT = 20


# The internals the closer depends on: if one of these fails, mitmproxy or wsproto changed under it.


def test_proxyserver_keeps_its_connection_handlers_by_client_id():
    assert Proxyserver().connections == {}
    source = inspect.getsource(Proxyserver.inject_event)
    assert "self.connections[connection_id]" in source and "client_conn.id" in source
    assert "self.layer" in inspect.getsource(server.ConnectionHandler.__init__)
    assert "transports" in server.ConnectionHandler.__annotations__
    assert {"reader", "writer"} <= set(server.ConnectionIO.__dataclass_fields__)
    # A closed connection's socket is closed through its writer: the closer's duplicate outlives it.
    assert "writer.close()" in inspect.getsource(server.ConnectionHandler.handle_connection)


def test_the_layer_tree_leads_to_the_websocket_layer_through_layer_child_layer_and_streams():
    assert "self.layer =" in inspect.getsource(layer.NextLayer)
    assert "child_layer" in inspect.getsource(modes.ReverseProxy.__mro__[1])
    assert issubclass(tls.ServerTLSLayer, tunnel.TunnelLayer) and "child_layer" in tunnel.TunnelLayer.__annotations__
    assert "self.streams" in inspect.getsource(http_layers.HttpLayer.__init__)
    assert "self.child_layer = websocket.WebsocketLayer(" in inspect.getsource(http_layers.HttpStream)


def test_the_websocket_layer_closes_both_legs_on_a_close_event_from_its_source_connection():
    relay = inspect.getsource(WebsocketLayer.relay_messages)
    for expected in (
        "src_ws._events.extend(",  # injected messages go through the source's event queue
        "for ws_event in src_ws.events():",
        "yield WebsocketMessageHook(self.flow)",
        "isinstance(ws_event, wsproto.events.CloseConnection)",
        "self.flow.websocket.close_code = ws_event.code",
        "for ws in [self.server_ws, self.client_ws]:",
        "yield ws.send2(ws_event)",
        "yield commands.CloseConnection(ws.conn)",
        "yield WebsocketEndHook(self.flow)",
        "self._handle_event = self.done",
    ):
        assert expected in relay, expected
    assert {"client_ws", "server_ws"} <= set(WebsocketLayer.__annotations__)


def test_wsproto_drains_its_event_queue_before_parsing_received_bytes():
    connection = wsproto.Connection(wsproto.ConnectionType.SERVER)
    connection.receive_data(b"\x81")  # half a frame's header
    close = wsproto.events.CloseConnection(1008, "limit")
    connection._events.append(close)
    assert list(connection.events()) == [close]
    assert connection.state is wsproto.ConnectionState.OPEN
    assert connection.send(close)[:4] == b"\x88\x07\x03\xf0"  # a close frame: 7 bytes, code 1008


def test_a_flow_that_is_not_live_is_not_closed():
    flow = tflow.twebsocketflow()
    flow.live = False
    assert close_websocket(flow, 1008, "idle") is False
    with pytest.raises(ValueError, match="1006"):
        close_websocket(flow, 1006, "abnormal")


def test_a_long_reason_is_cut_at_a_character_boundary():
    assert truncate("é" * 100, 123) == "é" * 61
    assert len(truncate("x" * 200, 123).encode()) == 123


# End to end.


class RecordingSimulator(Simulator):
    """The simulated upstream, also recording how each session was closed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.closes: list[tuple[int | None, str | None]] = []

    async def _serve(self, ws: Any) -> None:
        await super()._serve(ws)
        self.closes.append((ws.close_code, ws.close_reason))


class TriggeredGateway(GatewayProcess):
    """The gateway with tests/e2e/close_trigger.py: a second `-s` for mitmdump, the serve launcher run
    through the script for serve."""

    def command(self) -> list[str]:
        command = super().command()
        if self.launcher == "serve":
            return [sys.executable, TRIGGER_SCRIPT, *command[3:]]
        return [*command, "-s", TRIGGER_SCRIPT]


@pytest.fixture(scope="module", params=("mitmdump", "serve"))
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[TriggeredGateway, RecordingSimulator]]:
    with SimulatorThread(server=RecordingSimulator(seed=7)) as simulator:
        # proxy/closer.py closes sessions on mitmproxy's WebSocket layer: pinned there, whatever
        # gateway_relay=auto makes of the trigger script's WebSocket hook.
        options = {"gateway_relay": "messages"}
        with TriggeredGateway(simulator.url, launcher=request.param, options=options) as gateway:
            yield gateway, simulator


def trigger(delay: float, reason: str, code: int = 1008) -> str:
    return json.dumps({"type": "test.close_websocket", "delay": delay, "code": code, "reason": reason})


async def closed_by_gateway(ws: Any) -> tuple[ConnectionClosed, list[str | bytes]]:
    """Reads until the connection closes; the frames received before."""
    frames: list[str | bytes] = []
    try:
        while True:
            frames.append(await asyncio.wait_for(ws.recv(), WAIT))
    except ConnectionClosed as closed:
        return closed, frames


def types(frames: list[str | bytes]) -> collections.Counter[str]:
    return collections.Counter(json.loads(f)["type"] for f in frames if isinstance(f, str))


def end_lines(gateway: GatewayProcess) -> list[str]:
    return [line for line in gateway.log().splitlines() if "close-trigger: websocket_end" in line]


def assert_clean(gateway: GatewayProcess) -> None:
    assert not CRASH.search(gateway.log()), gateway.log()


def sessions_open(gateway: GatewayProcess) -> float:
    return sum(v for (name, _), v in scrape(gateway.metrics_url).items() if name == SESSIONS_GAUGE)


def session_url(gateway: GatewayProcess, model: str) -> str:
    return f"{websocket_base(gateway.url)}/v1/realtime?model={model}"


def test_an_idle_session_is_closed_with_1008_on_both_legs(setup):
    gateway, simulator = setup
    closes, ends = len(simulator.closes), len(end_lines(gateway))
    reason = "idle_session_seconds: no frame for 0.2s"

    async def run() -> tuple[ConnectionClosed, list[str | bytes]]:
        async with websockets.connect(session_url(gateway, "gpt-realtime-idle"), max_size=None) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "session.created"
            await ws.send(trigger(0.2, reason))
            return await closed_by_gateway(ws)

    closed, frames = asyncio.run(run())
    assert frames == []
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1008, reason)
    wait_until(lambda: len(simulator.closes) > closes)
    assert simulator.closes[-1] == (1008, reason)
    (end,) = wait_until(lambda: end_lines(gateway)[ends:])
    assert f"close_code=1008 reason={reason} by_client=False again=False" in end
    assert re.search(r"close_websocket \S+ -> True", gateway.log())
    wait_until(lambda: sessions_open(gateway) == 0)
    assert_clean(gateway)


@pytest.mark.slow
def test_a_session_streaming_audio_both_ways_is_closed_mid_stream_and_others_go_on(setup):
    gateway, simulator = setup
    closes, ends = len(simulator.closes), len(end_lines(gateway))
    reason = "max_session_seconds: 0.1s reached"
    deltas = 50_000
    audio = base64.b64encode(random.Random(1).randbytes(24_000)).decode()  # 0.5 s of 24 kHz PCM16: a 32 KB frame
    append = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
    create = json.dumps({"type": "response.create", "response": {"metadata": {"sim_deltas": str(deltas)}}})

    async def stream_audio(ws: Any) -> int:
        sent = 0
        try:
            while True:
                await ws.send(append)
                sent += 1
                await asyncio.sleep(0.01)  # faster than real time, slower than the relay
        except ConnectionClosed:
            return sent

    async def other_session(ws: Any) -> collections.Counter[str]:
        """A session open across the close: it still gets a whole response afterwards."""
        await ws.send(json.dumps({"type": "response.create"}))
        frames = []
        while not frames or json.loads(frames[-1])["type"] != "response.done":
            frames.append(await asyncio.wait_for(ws.recv(), WAIT))
        return types(frames)

    async def run() -> tuple[ConnectionClosed, list[str | bytes], int, collections.Counter[str]]:
        url = session_url(gateway, "gpt-realtime-streaming")
        async with (
            websockets.connect(url, max_size=None) as ws,
            websockets.connect(session_url(gateway, "gpt-realtime-other"), max_size=None) as other,
        ):
            assert json.loads(await asyncio.wait_for(other.recv(), WAIT))["type"] == "session.created"
            await ws.send(create)
            sender = asyncio.create_task(stream_audio(ws))
            frames = []
            while types(frames)["response.output_audio.delta"] < 20:
                frames.append(await asyncio.wait_for(ws.recv(), WAIT))
            await ws.send(trigger(0.1, reason))
            closed, rest = await closed_by_gateway(ws)
            appends = await asyncio.wait_for(sender, WAIT)
            after = await other_session(other)
        return closed, frames + rest, appends, after

    closed, frames, appends, after = asyncio.run(run())
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1008, reason)
    relayed = types(frames)["response.output_audio.delta"]
    assert 20 <= relayed < deltas, "the close came after the stream ended"
    assert "response.done" not in types(frames)
    assert appends > 3
    # This session's end and the other's, as the simulator records them: the streaming one's takes
    # about 10 s after the gateway's close (9.9 s on a quiet machine; why is not known yet, see the
    # closing note of issue 21), so the usual 15 s deadline failed under load.
    wait_until(lambda: len(simulator.closes) == closes + 2, timeout=30)
    assert sorted(simulator.closes[closes:]) == [(1000, ""), (1008, reason)]
    assert after["response.done"] == 1 and after["response.output_audio.delta"] > 0
    ended = wait_until(lambda: len(end_lines(gateway)) == ends + 2 and end_lines(gateway)[ends:])
    assert sum(f"close_code=1008 reason={reason} by_client=False again=False" in line for line in ended) == 1
    assert sum("close_code=1000 reason= by_client=True" in line for line in ended) == 1
    wait_until(lambda: sessions_open(gateway) == 0)
    assert_clean(gateway)

    async def fresh() -> collections.Counter[str]:  # a new session after the close is served as before
        async with websockets.connect(session_url(gateway, "gpt-realtime-fresh"), max_size=None) as ws:
            await asyncio.wait_for(ws.recv(), WAIT)
            return await other_session(ws)

    assert asyncio.run(fresh())["response.done"] == 1
    assert_clean(gateway)
