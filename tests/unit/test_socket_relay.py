"""What proxy/socket_relay.py relies on of mitmproxy and of the event loops, checked on the
installed versions so that an upgrade that moves any of it fails here, loudly."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
from collections.abc import Callable

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import context, mode_specs
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer, TLSLayer
from mitmproxy.proxy.server import SimpleConnectionHandler
from mitmproxy.test import tflow
from OpenSSL import SSL

from ai_gateway.protocols.ws_frames import TEXT, FrameReader, Outbox, encode_frame
from ai_gateway.proxy.frame_relay import ReadFrame
from ai_gateway.proxy.socket_relay import Leg

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def test_proxyserver_keeps_its_connection_handlers_by_client_id():
    assert Proxyserver().connections == {}


def test_tls_layers_keep_their_connection_and_its_pyopenssl_object():
    ctx = context.Context(tflow.tclient_conn(), options.Options())
    ctx.server = tflow.tserver_conn()
    server = ServerTLSLayer(ctx)
    client = ClientTLSLayer(ctx)
    assert client.conn is ctx.client and server.conn is ctx.server
    assert client.tls is None and server.tls is None  # set by the handshake: an SSL.Connection


class Session:
    """What a Leg reports to: the bytes read, and the socket's close, passed on to mitmproxy."""

    def __init__(self, leg: Leg) -> None:
        self.leg = leg
        self.legs = {True: leg, False: leg}
        self.chunks: list[bytes] = []
        self.closed = asyncio.Event()

    def received(self, side: bool, data: bytes) -> None:
        self.chunks.append(data)

    def lost(self, side: bool, exc: Exception | None) -> None:
        self.leg.parked.connection_lost(exc)
        self.closed.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handlers_socket_is_taken_over_and_its_parked_reader_told_of_the_close(loop):
    """A mitmproxy connection handler's client socket: `set_protocol` on its transport sends what
    the peer writes to the Leg (not to the handler's StreamReader, whose `_buffer` stays empty),
    writes reach the peer, and the parked StreamReaderProtocol's `connection_lost` ends the
    handler's `reader.read` with EOF, as mitmproxy's read loop needs to see it."""

    async def run() -> tuple[list[bytes], bytes, bytes, int]:
        accepted: asyncio.Future[SimpleConnectionHandler] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:1/")
            accepted.set_result(SimpleConnectionHandler(reader, writer, options.Options(), mode, {}))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", port)
        handler = await accepted
        io = handler.transports[handler.client]
        leg = Leg(handler, io, None)
        session = Session(leg)
        leg.take(session, True)  # type: ignore[arg-type]
        received = session.chunks
        before = handler.timeout_watchdog.last_activity
        peer_writer.write(b"hello")
        await peer_writer.drain()
        while not received:
            await asyncio.sleep(0.01)
        leg.write(b"world")
        answer = await peer_reader.readexactly(5)
        buffered = len(io.reader._buffer)
        peer_writer.close()
        await session.closed.wait()
        eof = await asyncio.wait_for(io.reader.read(65535), 5)
        activity = handler.timeout_watchdog.last_activity >= before
        leg.transport.close()
        server.close()
        await server.wait_closed()
        return received, answer, eof, buffered + (0 if activity else 1)

    received, answer, eof, problems = asyncio.run(run(), loop_factory=LOOPS[loop])
    assert received == [b"hello"] and answer == b"world" and eof == b"" and problems == 0


def test_a_read_frame_edited_then_dropped_is_gone_and_dropped_says_so():
    """ReadFrame as the guards use a message: content replaced in place (a blocked response's
    response.done), drop() after it takes the edit back too, `dropped` set."""
    stream = b"".join(encode_frame(TEXT, payload) for payload in (b"one", b"two", b"three"))
    reader, outbox = FrameReader(False, max_message=1 << 20), Outbox()
    outbox.add(stream)
    one, two, three = (ReadFrame(False, message, outbox) for message in reader.feed(stream))
    two.content = b"edited"
    assert two.content == b"edited" and not two.dropped
    three.content = b"3"
    three.drop()
    three.content = b"after the drop"  # nothing: it is gone
    assert three.dropped
    again = FrameReader(False, max_message=1 << 20)
    assert [m.payload for m in again.feed(outbox.take(reader.safe))] == [b"one", b"edited"]


class Transport:
    """The socket under a TLS leg: what the leg writes, and whether it closed it."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def tls_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A client and a server pyOpenSSL connection, handshaken in memory (as mitmproxy's TLS layer leaves them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    server_context = SSL.Context(SSL.TLS_METHOD)
    server_context.use_certificate(cert)
    server_context.use_privatekey(key)
    server, client = SSL.Connection(server_context), SSL.Connection(SSL.Context(SSL.TLS_METHOD))
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):  # the handshake's flights, back and forth
        for one, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                one.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(one.bio_read(65535))
    return client, server


def test_a_peers_close_notify_read_by_a_leg_is_left_for_mitmproxy_to_tell_its_layers():
    """The relay reads the peer's close_notify in place of mitmproxy's TLS layer, which dispatches
    the close to the layers above only when RECEIVED_SHUTDOWN is not set (it takes the flag to mean
    it did so itself): the leg clears it, and closes its socket. Without that, mitmproxy never
    closed the other peer's connection (tests/e2e/test_socket_relay.py, the https upstream)."""
    assert "SSL.RECEIVED_SHUTDOWN" in inspect.getsource(TLSLayer.receive_close)
    client, server = tls_pair()
    server.sendall(b"last words")
    with contextlib.suppress(SSL.WantReadError):
        server.shutdown()
    leg = Leg.__new__(Leg)  # its TLS connection and socket only: what plaintext() reads and writes
    leg.tls, leg.transport = client, Transport()  # type: ignore[assignment]
    assert leg.plaintext(server.bio_read(65535)) == b"last words"
    assert leg.transport.closed  # type: ignore[attr-defined]
    assert not client.get_shutdown() & SSL.RECEIVED_SHUTDOWN
