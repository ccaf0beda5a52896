"""What proxy/socket_relay.py relies on of mitmproxy and of the event loops, checked on the
installed versions so that an upgrade that moves any of it fails here, loudly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop
from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import context, mode_specs
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from mitmproxy.proxy.server import SimpleConnectionHandler
from mitmproxy.test import tflow

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
