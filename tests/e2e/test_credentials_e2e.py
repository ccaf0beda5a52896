"""With `auth` set, no credential the client presents reaches the upstream, wherever it is, and the
gateway's key does, over HTTP/1.1, HTTP/2 and WebSocket, under both launchers (issue 13 rows 4-5)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import certs

from ai_gateway.accounting.limits import client_key_digest
from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import raw_session, websocket_base
from ..conftest import LAUNCHERS

SECRET = "sk-upstream-CRED-5e6f7a"
POLICY = "auth:\n  env: GATEWAY_CRED_KEY\nroutes:\n  /realtime: Realtime\n  /chat/completions: Completions\n  '*': Passthrough\n"

# Every place OpenAI or Azure OpenAI accepts a key: (name, where, how the client sends key K).
PLACES = {
    "authorization": [("Authorization", "Bearer {key}")],
    "authorization-lowercase-duplicated": [("authorization", "Bearer {key}"), ("AUTHORIZATION", "Bearer {key}-2")],
    "api-key": [("api-key", "{key}")],
    "x-api-key": [("X-Api-Key", "{key}")],
    "openai-api-key": [("OpenAI-Api-Key", "{key}")],
    "proxy-authorization": [("Proxy-Authorization", "Bearer {key}")],
    "query api-key": "api-key={key}",
    "query api_key": "api_key={key}",
    "query key": "key={key}",
}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "auth.yaml"
    path.write_text(POLICY)
    return path


def gateway_for(upstream: str, policy: Path, launcher: str, **options: str) -> GatewayProcess:
    return GatewayProcess(
        upstream,
        options={"gateway_policy": str(policy), **options},
        env={"GATEWAY_CRED_KEY": SECRET},
        launcher=launcher,
    )


def upstream_authorization(headers: list[tuple[str, str]]) -> list[str]:
    return [value for name, value in headers if name == "authorization"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_no_client_credential_reaches_the_upstream(launcher, policy, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    with SimulatorThread(server=HttpSimulator()) as upstream:
        with gateway_for(upstream.url, policy, launcher, gateway_usage_log=str(ledger)) as gateway:
            for i, (place, how) in enumerate(PLACES.items()):
                key = f"sk-client-{i}-own"
                query = f"&{how.format(key=key)}" if isinstance(how, str) else ""
                headers = [] if isinstance(how, str) else [(name, value.format(key=key)) for name, value in how]
                connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
                connection.putrequest("POST", f"/v1/chat/completions?a=1%2B1{query}&z=%7E")
                for name, value in [*headers, ("Content-Type", "application/json")]:
                    connection.putheader(name, value)
                body = json.dumps({"model": f"gpt-place-{i}", "messages": [{"role": "user", "content": place}]})
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body.encode())
                assert connection.getresponse().status == 200, place
                connection.close()
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(upstream.requests) == len(PLACES) == len(lines)
    for i, (place, seen) in enumerate(zip(PLACES, upstream.requests, strict=True)):
        leaked = [field for field in [seen.path, *map(str, seen.headers)] if f"sk-client-{i}-own" in field]
        assert not leaked, f"{place} reached the upstream: {leaked}"
        assert upstream_authorization(seen.headers) == [f"Bearer {SECRET}"], place
        assert seen.path == "/v1/chat/completions?a=1%2B1&z=%7E", place  # other parameters byte for byte
        (line,) = [line for line in lines if line["request_model"] == f"gpt-place-{i}"]
        assert line["client_key"] == client_key_digest(f"sk-client-{i}-own"), f"budget key not read from {place}"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_websocket_keys_in_subprotocol_and_query_are_stripped(launcher, policy):
    with SimulatorThread() as simulator:
        with gateway_for(simulator.url, policy, launcher) as gateway:
            url = f"{websocket_base(gateway.url)}/openai/realtime?api-key=sk-client-query&model=gpt-realtime-cred"
            asyncio.run(
                raw_session(
                    url,
                    [{"type": "response.create"}],
                    subprotocols=["realtime", "OpenAI-Insecure-API-Key.sk-client-protocol"],
                )
            )
    (handshake,) = simulator.handshakes
    assert upstream_authorization(handshake.headers) == [f"Bearer {SECRET}"]
    assert handshake.query == {"model": "gpt-realtime-cred"}
    assert not [field for field in handshake.headers if "sk-client" in field[1]]
    assert dict(handshake.headers)["sec-websocket-protocol"] == "realtime"


class H2Upstream:
    """A TLS upstream that speaks only HTTP/2: records each request's headers, answers `{}`."""

    def __init__(self, certificate: Path) -> None:
        self.certificate = certificate
        self.requests: list[list[tuple[bytes, bytes]]] = []
        self.protocols: list[str | None] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certificate)
        context.set_alpn_protocols(["h2"])
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.protocols.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requests.append(list(event.headers))
                    if isinstance(event, h2.events.StreamEnded):
                        connection.send_headers(event.stream_id, [(":status", "200"), ("content-type", "text/plain")])
                        connection.send_data(event.stream_id, b"{}", end_stream=True)
                writer.write(connection.data_to_send())
                await writer.drain()
        writer.close()


async def h2_get(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[str | None, int]:
    """One HTTP/2 request over TLS (the gateway's certificate is not checked): the ALPN and the status."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    protocol = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
    connection.send_headers(1, [*pseudo, *headers], end_stream=True)
    writer.write(connection.data_to_send())
    status = 0
    while data := await asyncio.wait_for(reader.read(65536), timeout=10):
        events = connection.receive_data(data)
        writer.write(connection.data_to_send())
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.StreamEnded):
                writer.close()
                return protocol, status
    raise ConnectionError("the gateway closed the connection before the response ended")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_http2_upstream_gets_the_key(launcher, policy, tmp_path):
    certs.CertStore.from_store(tmp_path / "ca", "upstream", 2048)
    with SimulatorThread(server=H2Upstream(tmp_path / "ca" / "upstream-ca.pem")) as upstream:
        with gateway_for(upstream.url, policy, launcher, ssl_insecure="true") as gateway:
            client_headers = [("authorization", "Bearer sk-client-h2"), ("x-api-key", "sk-client-h2")]
            protocol, status = asyncio.run(h2_get(gateway.port, "/v1/models?key=sk-client-h2", client_headers))
    assert (protocol, status) == ("h2", 200)
    assert upstream.protocols == ["h2"]
    (headers,) = upstream.requests
    assert (b":path", b"/v1/models") in headers
    assert [value for name, value in headers if name == b"authorization"] == [f"Bearer {SECRET}".encode()]
    assert not [field for field in headers if b"sk-client" in field[1]]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_streamed_request_body_goes_with_the_key(launcher, policy):
    """Past `stream_large_bodies`, mitmproxy sends the head before the `request` hook runs."""
    body = b"x" * 20_000
    with SimulatorThread(server=HttpSimulator()) as upstream:
        with gateway_for(upstream.url, policy, launcher, stream_large_bodies="1k") as gateway:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
            connection.request("POST", "/v1/files", body, {"Authorization": "Bearer sk-client-streamed"})
            assert connection.getresponse().status == 200
            connection.close()
    (seen,) = upstream.requests
    assert seen.body == body
    assert upstream_authorization(seen.headers) == [f"Bearer {SECRET}"]
