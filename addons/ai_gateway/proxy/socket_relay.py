"""An admitted session relayed between its two sockets by the event loop's transports, mitmproxy
keeping the connection handling, TLS handshakes, HTTP routes and the handshake (issue #22,
`gateway_relay=sockets`, and what `auto` takes: the issue's third design).

On the frames path (proxy/frame_relay.py) every chunk of an admitted session still takes a trip
through mitmproxy's connection handler, layer stack and `tcp_message` dispatch. Here, when the TCP
layer starts (`tcp_start`), the session's two transports are given a protocol of the gateway's
(`transport.set_protocol`): what a peer sends is read by the same `ByteSession` (its readers,
outboxes, `SessionMetering.frame`, refusals, injected frames, closes), and what is to be forwarded
is written straight to the other transport. mitmproxy's read loops are parked: their
StreamReaders are fed nothing more until the end, when each is told its connection was lost
(`StreamReaderProtocol.connection_lost`), so mitmproxy's own close path runs as on the TCP path
(its TCP layer's `tcp_end`, the handler's hooks, the connection counts).

Order across the hand-over: bytes mitmproxy had already read are still in its layers, and reach
`tcp_message` after the hook; so each direction's first bytes read here are held until a marker
chunk injected into the TCP flow (`inject.tcp`, queued behind what mitmproxy has read) comes back
through `tcp_message`. Chunks before it are relayed here too (blanked for mitmproxy).

A TLS leg (the upstream over https, a client dialling wss://) carries on with the pyOpenSSL
connection mitmproxy's TLS layer handshook: ciphertext in through `bio_write`/`recv`, plaintext
out through `sendall`/`bio_read`, as that layer does.

mitmproxy internals relied on (tests/unit/test_socket_relay.py checks each on the installed
version, so an upgrade fails loudly): `Proxyserver.connections` (client id -> handler), the
handler's `transports` (connection -> ConnectionIO with an asyncio `reader`/`writer`) and
`timeout_watchdog.register_activity`, `TLSLayer.tls`/`.conn` found in its layer tree
(closer.walk), and asyncio's `StreamReader._buffer` (what the parked loop has yet to read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import ctx, http, tcp
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from OpenSSL import SSL

from ai_gateway.proxy import closer
from ai_gateway.proxy.frame_relay import ByteSession, FrameRelay
from ai_gateway.proxy.sessions import SessionMetering

HTTP1 = (None, b"", b"http/1.1")  # an HTTP/2 connection carries other streams: never taken over
PRIMING_SECONDS = 1.0  # at most, for mitmproxy's parked read loops to hand on what they had read
CHOSEN = "relaying %s over its sockets (client %s, upstream %s)"

logger = logging.getLogger(__name__)


class SocketRelay(FrameRelay):
    """FrameRelay whose sessions, under `gateway_relay=sockets` or `auto`, are relayed by their sockets
    (on `frames` by mitmproxy's TCP layer; a session whose sockets cannot be taken over stays there)."""

    def session(self, handshake: http.HTTPFlow, flow: tcp.TCPFlow) -> ByteSession:
        if self.relay != "frames":
            legs = take_legs(flow)
            if legs is not None:
                session = SocketSession(handshake, flow, self.metering, self.state.max_body_bytes, legs)
                kinds = ("TLS" if legs[side].tls is not None else "plain" for side in (True, False))
                logger.debug("ai-gateway: " + CHOSEN, handshake.id, *kinds)
                return session
        return super().session(handshake, flow)


class Chunk:
    """Bytes read from one peer, as ByteSession reads a `tcp_message`'s."""

    __slots__ = ("content", "from_client")

    def __init__(self, from_client: bool, content: bytes) -> None:
        self.from_client = from_client
        self.content = content


class Leg(asyncio.Protocol):
    """One peer's socket, taken from mitmproxy: reads go to the session, writes come from it."""

    def __init__(self, handler: Any, io: Any, tls: SSL.Connection | None) -> None:
        self.watchdog = handler.timeout_watchdog
        self.reader = io.reader  # mitmproxy's, parked
        self.transport: asyncio.Transport = io.writer.transport
        self.parked: asyncio.BaseProtocol = self.transport.get_protocol()
        self.tls = tls
        self.session: SocketSession | None = None
        self.side = True
        self.paused: set[str] = set()

    def take(self, session: SocketSession, side: bool) -> None:
        self.session, self.side = session, side
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.watchdog.register_activity()  # mitmproxy's tcp_timeout counts what is relayed here
        if self.session is None:
            return
        try:
            self.session.received(self.side, data)
        except Exception:  # as in a hook: logged, the session goes on
            logger.exception("ai-gateway: relaying frames failed for %s", self.session.flow.id)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.lost(self.side, exc)
        else:  # the session has ended (mitmproxy closed the socket): its parked protocol is told at once
            self.parked.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:  # the other peer waits while this one cannot take more
            self.session.legs[not self.side].pause("backpressure")

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.legs[not self.side].resume("backpressure")

    def pause(self, reason: str) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.tls is None:
            self.transport.write(data)
            return
        # A peer that closed its TLS: what is still sent to it is discarded, as mitmproxy's TLS layer does.
        with contextlib.suppress(SSL.ZeroReturnError, SSL.SysCallError):
            self.tls.sendall(data)
        self.flush_tls()

    def plaintext(self, data: bytes) -> bytes:
        """What the peer sent: on a TLS leg decrypted (a close_notify or a TLS error closes the leg)."""
        tls = self.tls
        if tls is None:
            return data
        tls.bio_write(data)
        plaintext = bytearray()
        close = False
        while True:
            try:
                plaintext += tls.recv(65535)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The peer's close_notify, read here rather than by mitmproxy's TLS layer, which takes
                # RECEIVED_SHUTDOWN to mean it already told the layers above (TLSLayer.receive_close):
                # cleared, so the parked loop's end tells them and mitmproxy closes the other leg,
                # as when a peer closes on the TCP path (else the other peer waited for its own
                # timeout: a client's close 10 s behind an https upstream).
                tls.set_shutdown(tls.get_shutdown() & ~SSL.RECEIVED_SHUTDOWN)
                close = True
                break
            except SSL.Error as e:
                logger.warning("ai-gateway: TLS error on a relayed session: %s", e)
                close = True
                break
        self.flush_tls()  # recv may have advanced the state machine (a key update, a ticket)
        if close:
            self.transport.close()
        return bytes(plaintext)

    def flush_tls(self) -> None:
        tls = self.tls
        assert tls is not None
        while True:
            try:
                data = tls.bio_read(65535)
            except SSL.WantReadError:
                return
            if not self.transport.is_closing():
                self.transport.write(data)


class SocketSession(ByteSession):
    """A ByteSession whose chunks come from its legs' transports and are written to them."""

    def __init__(
        self, handshake: http.HTTPFlow, flow: tcp.TCPFlow, metering: SessionMetering, cap: int, legs: dict[bool, Leg]
    ) -> None:
        super().__init__(handshake, flow, metering, cap)
        self.legs = legs
        self.held: dict[bool, list[bytes] | None] = {True: [], False: []}  # None: read now
        self.lost_with: dict[bool, tuple[Exception | None] | None] = {True: None, False: None}
        self.markers = {True: os.urandom(8), False: os.urandom(8)}  # fresh objects, known by identity
        self.tasks: set[asyncio.Task[None]] = set()
        for side, leg in legs.items():
            leg.take(self, side)
        self.spawn(self.prime())

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def prime(self) -> None:
        """Once mitmproxy's parked loops handed on what they had read, a marker each way."""
        deadline = time.monotonic() + PRIMING_SECONDS
        while any(leg.reader._buffer for leg in self.legs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        for side in (True, False):
            ctx.master.commands.call("inject.tcp", self.flow, not side, self.markers[side])

    def chunk(self, message: Any) -> Awaitable[None] | None:
        """A `tcp_message`: bytes mitmproxy read before the hand-over, or a direction's marker."""
        side, content = message.from_client, message.content
        message.content = b""  # whatever it was, it is relayed here, not by mitmproxy
        if content is self.markers[side]:
            self.release(side)
            return None
        if self.held[side] is None:  # mitmproxy read it after the marker: PRIMING_SECONDS were not enough
            logger.warning("ai-gateway: %d bytes of %s relayed out of order", len(content), self.flow.id)
        return super().chunk(Chunk(side, content))

    def received(self, side: bool, data: bytes) -> None:
        """Bytes from a peer's socket; held as they came (ciphertext on a TLS leg, which mitmproxy
        may still be reading records of) while earlier bytes are in mitmproxy's hands."""
        held = self.held[side]
        if held is not None:
            held.append(data)
            return
        data = self.legs[side].plaintext(data)
        if not data:
            return
        pending = super().chunk(Chunk(side, data))
        if pending is not None:  # a response.create waits for the shared store: this peer waits too
            self.held[side] = []
            self.legs[side].pause("admission")
            self.spawn(self.admitted(side, pending))

    async def admitted(self, side: bool, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            logger.exception("ai-gateway: relaying frames failed for %s", self.flow.id)
        self.legs[side].resume("admission")
        self.release(side)

    def release(self, side: bool) -> None:
        """What a direction held is read now, in order, unless a message in it waits again."""
        held = self.held[side] or []
        self.held[side] = None
        while held:
            self.received(side, held.pop(0))
            if self.held[side] is not None:
                self.held[side][:0] = held  # type: ignore[index]
                return
        if (lost := self.lost_with[side]) is not None:
            self.lost_with[side] = None
            self.legs[side].parked.connection_lost(lost[0])

    def forward(self, message: Any) -> None:
        super().forward(message)
        if message.content:
            self.legs[not message.from_client].write(message.content)

    def wake(self, side: bool) -> None:
        if not self.busy(side):
            self.forward(Chunk(side, b""))

    def lost(self, side: bool, exc: Exception | None) -> None:
        """A socket closed: mitmproxy's parked loop is told, once what it sent was read, and
        closes the other leg and ends the flow as when a peer closes on the TCP path."""
        if self.held[side] is None:
            self.legs[side].parked.connection_lost(exc)
        else:
            self.lost_with[side] = (exc,)

    def ended(self) -> None:
        for task in self.tasks:
            task.cancel()
        for leg in self.legs.values():
            leg.session = None
        super().ended()


def take_legs(flow: tcp.TCPFlow) -> dict[bool, Leg] | None:
    """Both peers' sockets, when mitmproxy relays them on asyncio transports over HTTP/1."""
    handler = closer.proxyserver_connections().get(flow.client_conn.id)
    if handler is None:
        return None
    legs: dict[bool, Leg] = {}
    for side, conn, layer_type in ((True, flow.client_conn, ClientTLSLayer), (False, flow.server_conn, ServerTLSLayer)):
        io = handler.transports.get(conn)
        if (
            io is None
            or not isinstance(io.reader, asyncio.StreamReader)
            or not isinstance(io.writer, asyncio.StreamWriter)
            or conn.alpn not in HTTP1
        ):
            return None
        tls = None
        if conn.tls:
            layers = closer.walk(handler.layer)
            tls = next((layer.tls for layer in layers if isinstance(layer, layer_type) and layer.conn is conn), None)
            if tls is None:
                return None
        legs[side] = Leg(handler, io, tls)
    return legs
