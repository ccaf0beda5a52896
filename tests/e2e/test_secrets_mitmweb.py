"""The injected upstream key never reaches mitmweb (flow list, dumps, exports, live updates) or a
saved flow, at any moment: after the exchange, and while a request is held by a stalled upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
from pathlib import Path

import pytest
import websockets
from mitmproxy import io

from ai_gateway_tools.debug import mitmweb, web_url
from ai_gateway_tools.harness import GatewayProcess, free_port
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import sdk_session

SECRET = "sk-upstream-MITMWEB-0c1d2e"
CLIENT_KEY = "sk-client-HELD-9a8b7c"
EXPORTS = ("curl", "httpie", "raw", "raw_request")


class StalledUpstream:
    """An upstream that reads a request head, keeps it, and never answers."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.received = threading.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            self.received.set()
            await reader.read()  # until the gateway goes away


def web_base(gateway: GatewayProcess) -> str:
    return f"http://127.0.0.1:{gateway.args[gateway.args.index('--web-port') + 1]}"


def fetch(base: str, path: str, token: str, command: list[str] | None = None) -> bytes:
    """GET a mitmweb API path, or POST a command to it (with the XSRF cookie and header mitmweb wants)."""
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if command is not None:
        headers |= {"Cookie": "_mitmproxy_xsrf=t", "X-XSRFToken": "t", "Content-Type": "application/json"}
        data = json.dumps({"arguments": command}).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_mitmweb_never_sees_the_upstream_key(tmp_path):
    policy = tmp_path / "auth.yaml"
    policy.write_text("auth:\n  env: GATEWAY_WEB_KEY\nroutes:\n  /realtime: Realtime\n")
    with SimulatorThread() as simulator:
        gateway = mitmweb(simulator.url, web_port=free_port())
        gateway.options["gateway_policy"] = str(policy)
        gateway.env["GATEWAY_WEB_KEY"] = SECRET
        with gateway:
            token = web_url(gateway).split("token=", 1)[1]
            base = web_base(gateway)
            asyncio.run(sdk_session(gateway.url, "gpt-realtime-web", metadata=[{}]))
            flows = fetch(base, "/flows", token)
            dump = fetch(base, "/flows/dump", token)
            assert b"gpt-realtime-web" in flows
            for channel in (flows, dump, gateway.log().encode()):
                assert SECRET.encode() not in channel
    assert ("authorization", f"Bearer {SECRET}") in simulator.handshakes[-1].headers


# What the held requests look like: a metered HTTP request, and a Realtime WebSocket handshake.
HELD = {
    "http": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer %s\r\nContent-Length: 2\r\n\r\n{}" % CLIENT_KEY.encode(),
    "websocket": b"GET /v1/realtime?model=gpt-held HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.%s\r\n\r\n" % CLIENT_KEY.encode(),
}


async def hold_a_request(
    gateway: GatewayProcess, upstream: StalledUpstream, request: bytes, har: Path
) -> dict[str, bytes]:
    """Sends a request the upstream holds; meanwhile reads every mitmweb channel, then stops mitmweb
    (its `-w` file is written at shutdown, with the request still held). Returns what each channel showed."""
    token = web_url(gateway).split("token=", 1)[1]
    base = web_base(gateway)
    seen: dict[str, bytes] = {}
    pushes: list[bytes] = []
    updates_url = base.replace("http://", "ws://") + "/updates"
    async with websockets.connect(updates_url, additional_headers={"Authorization": f"Bearer {token}"}) as updates:

        async def collect() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for message in updates:
                    pushes.append(message if isinstance(message, bytes) else message.encode())

        collector = asyncio.create_task(collect())
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(request)
        await writer.drain()
        assert await asyncio.to_thread(upstream.received.wait, 15), "the upstream never got the request"
        seen["/flows"] = await asyncio.to_thread(fetch, base, "/flows", token)
        seen["/flows/dump"] = await asyncio.to_thread(fetch, base, "/flows/dump", token)
        (flow,) = json.loads(seen["/flows"])
        assert "response" not in flow, "the request is still held"
        for export in EXPORTS:
            seen[export] = await asyncio.to_thread(fetch, base, "/commands/export", token, [export, f"@{flow['id']}"])
        await asyncio.to_thread(fetch, base, "/commands/save.har", token, ["@all", str(har)])
        seen["har"] = har.read_bytes()
        await asyncio.to_thread(gateway.stop)
        seen["/updates"] = b"\n".join(pushes)
        collector.cancel()
        writer.close()
    return seen


@pytest.mark.parametrize("kind", HELD)
def test_a_held_request_never_shows_the_key(tmp_path, kind):
    """Row 4 of issue 13: the key used to sit on the flow until the response began."""
    policy = tmp_path / "auth.yaml"
    policy.write_text(
        "auth:\n  env: GATEWAY_WEB_KEY\nroutes:\n  /chat/completions: Completions\n  /realtime: Realtime\n"
    )
    saved = tmp_path / "flows.mitm"
    with SimulatorThread(server=StalledUpstream()) as upstream:
        gateway = mitmweb(upstream.url, web_port=free_port())
        # the held request would hold a graceful drain to its end: the shutdown cuts it at once
        gateway.options |= {"gateway_policy": str(policy), "save_stream_file": str(saved)}
        gateway.options["gateway_drain_seconds"] = "0"
        gateway.env["GATEWAY_WEB_KEY"] = SECRET
        with gateway:
            seen = asyncio.run(hold_a_request(gateway, upstream, HELD[kind], tmp_path / "flows.har"))
    (head,) = upstream.heads
    fields = [line.partition(b":") for line in head.split(b"\r\n")[1:] if line]
    assert [value.strip() for name, _, value in fields if name.lower() == b"authorization"] == [
        b"Bearer " + SECRET.encode()
    ]
    assert CLIENT_KEY.encode() not in head
    with saved.open("rb") as f:
        (held,) = io.FlowReader(f).stream()
    path = HELD[kind].split(b" ")[1].decode()
    assert held.response is None and held.request.path == path
    seen["-w file"] = saved.read_bytes()
    seen["log"] = gateway.log().encode()
    for channel in ("/flows", "/flows/dump", *EXPORTS, "har", "/updates", "-w file"):
        assert path.split("?")[0].encode() in seen[channel], f"{channel} does not show the held request"
    leaks = [channel for channel, shown in seen.items() if SECRET.encode() in shown]
    assert not leaks, f"the upstream key is visible in {leaks}"


def test_the_client_s_own_key_is_relayed_whole_and_shown_masked():
    """Without `auth` the client's key is passed through: the upstream gets it byte for byte, mitmweb's
    flow list, dump and exports show its last four characters only (masked once the upstream answered)."""
    own_key = "sk-client-OWN-KEY-7f3e2d1c"
    with SimulatorThread() as simulator, mitmweb(simulator.url, web_port=free_port()) as gateway:
        token = web_url(gateway).split("token=", 1)[1]
        base = web_base(gateway)
        asyncio.run(sdk_session(gateway.url, "gpt-realtime-own", metadata=[{}], api_key=own_key))
        flows = fetch(base, "/flows", token)
        (flow,) = json.loads(flows)
        seen = {"/flows": flows, "/flows/dump": fetch(base, "/flows/dump", token)}
        for export in EXPORTS:
            seen[export] = fetch(base, "/commands/export", token, [export, f"@{flow['id']}"])
    assert ("authorization", f"Bearer {own_key}") in simulator.handshakes[-1].headers
    assert [value for name, value in flow["request"]["headers"] if name.lower() == "authorization"] == ["Bearer …2d1c"]
    leaks = [channel for channel, shown in seen.items() if own_key.encode() in shown]
    assert not leaks, f"the client's key is visible in {leaks}"
