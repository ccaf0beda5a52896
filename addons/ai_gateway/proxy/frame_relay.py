"""An admitted session relayed as bytes by mitmproxy's TCP layer, its frames read on the side
(issue #22, `gateway_relay=frames`).

mitmproxy upgrades a 101 to its WebSocket layer only when the flow has `websocket` data after the
`response` hook; without it (and with `rawtcp`, on by default) `HttpStream.flow_done` hands the
connection to its TCP layer, which calls `tcp_message` per chunk read and sends the message's
content afterwards, whatever the hook made of it. So for a metered session's handshake this addon
drops `flow.websocket`, and per chunk feeds `protocols/ws_frames.py`'s reader and hands each
complete message to `SessionMetering.frame`, the path `websocket_message` takes: same adapter,
meter and enforcement. What the enforcement does becomes edits of the byte stream: a refused
`response.create` is cut out of the chunk, the gateway's own frames (an error event to the client,
unmasked; a `response.cancel` upstream, masked as a client's) are spliced in at a frame boundary,
a close is a close frame each way, after which nothing more of either peer is forwarded.

A frame of the gateway's for the other direction is sent by injecting a chunk into it
(`inject.tcp`): mitmproxy queues it behind what that peer already sent, and the chunk comes back
through `tcp_message` where the stream may be mid-frame, so the injected chunk is only a wake-up,
known by identity, and replaced by what that direction's outbox holds at its next boundary.

The TCP layer has no close command for addons: after the close frames, the peers close (the
upstream first, RFC 6455 7.1.1; mitmproxy then half-closes towards the client); a peer that does
not is cut off after `closer.LINGER_SECONDS`, as the drain cuts idle connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from mitmproxy import connection, ctx, http, tcp
from mitmproxy.addonmanager import Loader, traverse

from ai_gateway.accounting.items import Malformed
from ai_gateway.protocols.json_events import HEAD_BYTES
from ai_gateway.protocols.ws_frames import (
    BINARY,
    CLOSE,
    DATA_OPCODES,
    TEXT,
    Edit,
    FrameReader,
    Message,
    Outbox,
    Oversize,
    Read,
    Violation,
    close_code,
    encode_close,
    encode_frame,
)
from ai_gateway.proxy import closer, drain
from ai_gateway.proxy.sessions import SESSION_OPEN_METADATA, Session, SessionMetering, session_kind
from ai_gateway.proxy.state import GatewayState

RELAYS = ("auto", "frames", "messages", "sockets")  # sockets: proxy/socket_relay.py
EXTENSIONS = "sec-websocket-extensions"
# mitmproxy's and the gateway's own addons: any other addon with a WebSocket hook wants messages.
OWN_MODULES = ("mitmproxy.", "ai_gateway.")
# The hooks a WebSocket flow gets and a session relayed as bytes does not (a script exporting on websocket_end).
WEBSOCKET_HOOKS = ("websocket_start", "websocket_message", "websocket_end")

logger = logging.getLogger(__name__)


class FrameRelay:
    """Chooses the path of each admitted session, and relays the ones it takes as bytes."""

    def __init__(self, state: GatewayState, metering: SessionMetering) -> None:
        self.state = state
        self.metering = metering
        self.relay = "auto"
        self.upgrading: dict[str, http.HTTPFlow] = {}  # client connection id -> its admitted handshake
        self.sessions: dict[str, ByteSession] = {}  # TCP flow id -> its session

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_relay",
            str,
            "auto",
            "How an admitted WebSocket session is relayed: 'messages' by mitmproxy's WebSocket layer, "
            "'frames' as bytes by its TCP layer with the frames read on the side (no WebSocket view, "
            "nothing saved per message); 'sockets' as 'frames', relayed between the two sockets by the "
            "event loop rather than mitmproxy's TCP layer; 'auto' takes sockets (frames where they cannot be "
            "taken over) unless under mitmweb, saving flows, or another addon has a WebSocket hook.",
            choices=RELAYS,
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_relay" in updated:
            self.relay = ctx.options.gateway_relay

    def frames(self) -> bool:
        if self.relay != "auto":
            return self.relay in ("frames", "sockets")
        options = ctx.options
        if "web_port" in options or getattr(options, "save_stream_file", None):
            return False
        return not any(
            any(callable(getattr(addon, hook, None)) for hook in WEBSOCKET_HOOKS)
            and not type(addon).__module__.startswith(OWN_MODULES)
            for addon in traverse(ctx.master.addons.chain)  # a script's addons too (-s)
        )

    def eligible(self, flow: http.HTTPFlow) -> bool:
        """Whether a session on this flow's route is relayed as frames once admitted."""
        route = self.state.route(flow)
        return route is not None and session_kind(route) is not None and ctx.options.rawtcp and self.frames()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A session bound for the frames path offers no compression upstream: the reader sees the
        frames as sent (a compressed session would stay on messages), as agentgateway strips the
        offer. Whatever the route's header policy says; a client must accept a declined offer
        (RFC 7692 5)."""
        try:
            headers = flow.request.headers
            if EXTENSIONS in headers and headers.get("upgrade", "").lower() == "websocket" and self.eligible(flow):
                del headers[EXTENSIONS]
        except Exception:
            logger.exception("ai-gateway: choosing the relay failed for %s", flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        """After SessionMetering's and Observability's: an admitted session's 101 goes to the TCP layer."""
        try:
            if (
                flow.websocket is not None
                and flow.metadata.get(SESSION_OPEN_METADATA)
                and flow.response is not None
                and flow.response.status_code == 101
                and EXTENSIONS not in flow.response.headers  # compressed frames: messages
                and self.eligible(flow)
            ):
                flow.websocket = None
                self.upgrading[flow.client_conn.id] = flow
                logger.debug("ai-gateway: relaying %s as frames", flow.id)
        except Exception:
            logger.exception("ai-gateway: choosing the relay failed for %s", flow.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self.upgrading.pop(client.id, None)  # a handshake whose TCP relay never started

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        handshake = self.upgrading.pop(flow.client_conn.id, None)
        if handshake is None:
            return
        try:
            self.metering.start_session(handshake)
            session = self.session(handshake, flow)
            self.sessions[flow.id] = session
            self.metering.links.add(handshake.id, session)
        except Exception:
            logger.exception("ai-gateway: tcp_start failed for %s", handshake.id)

    def session(self, handshake: http.HTTPFlow, flow: tcp.TCPFlow) -> ByteSession:
        """The relay of an admitted session (proxy/socket_relay.py's SocketRelay chooses its own)."""
        return ByteSession(handshake, flow, self.metering, self.state.max_body_bytes)

    def tcp_message(self, flow: tcp.TCPFlow) -> Awaitable[None] | None:
        session = self.sessions.get(flow.id)
        if session is None:
            return None
        message = flow.messages[-1]
        del flow.messages[:-1]  # the TCP layer keeps every chunk otherwise; the current one is sent after the hook
        return guarded(lambda: session.chunk(message), flow)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        session = self.sessions.pop(flow.id, None)
        if session is not None:
            guarded(session.ended, flow)

    tcp_error = tcp_end


def guarded(work: Callable[[], Awaitable[None] | None], flow: tcp.TCPFlow) -> Awaitable[None] | None:
    """Nothing in a hook raises: what fails is logged and the chunk goes on as it is."""

    async def awaited(pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            logger.exception("ai-gateway: relaying frames failed for %s", flow.id)

    try:
        pending = work()
    except Exception:
        logger.exception("ai-gateway: relaying frames failed for %s", flow.id)
        return None
    return None if pending is None else awaited(pending)


class ReadFrame:
    """A complete data message read from the stream, as `SessionMetering.frame` reads a message:
    dropping it cuts its frames out of what is forwarded; its content replaced (a guard editing a
    response.done) cuts them out and puts the edited message, one frame, where they were."""

    __slots__ = ("_content", "dropped", "edit", "from_client", "is_text", "outbox", "spans", "timestamp")

    def __init__(self, from_client: bool, message: Message | Oversize, outbox: Outbox) -> None:
        self.timestamp = time.time()  # when it was read, as WebSocketMessage.timestamp (the turns' clock)
        self.from_client = from_client
        self._content = message.payload or b""
        self.is_text = message.opcode == TEXT
        self.outbox = outbox
        self.spans = message.spans
        self.dropped = False
        self.edit: Edit | None = None  # the edited message put in place of this one

    @property
    def content(self) -> bytes:
        return self._content

    @content.setter
    def content(self, content: bytes) -> None:
        self._content = content
        if self.dropped:
            return
        frame = encode_frame(TEXT if self.is_text else BINARY, content, os.urandom(4) if self.from_client else None)
        self.edit = self.outbox.replace(self.spans, frame, self.edit)

    def drop(self) -> None:
        if self.dropped:
            return
        self.dropped = True
        if self.edit is None:
            self.outbox.cut(self.spans)
        else:
            self.outbox.unplace(self.edit)  # the spans were cut when it was edited


class ByteSession:
    """One session relayed as bytes: a reader and an outbox per direction (keyed by from_client),
    and the link `SessionMetering` sends and closes through."""

    def __init__(self, handshake: http.HTTPFlow, flow: tcp.TCPFlow, metering: SessionMetering, cap: int) -> None:
        self.handshake = handshake
        self.flow = flow
        self.metering = metering
        # A client message over the cap is held until its head is read: a response.create can still be refused.
        self.readers = {True: FrameReader(True, cap, HEAD_BYTES), False: FrameReader(False, cap)}
        self.headed = {True: False, False: False}  # an over-cap message whose head was metered is streaming
        self.outboxes = {True: Outbox(), False: Outbox()}
        self.wakes: dict[bool, list[bytes]] = {True: [], False: []}
        self.reading: bool | None = None  # the direction whose chunk is being read
        self.waiting: set[bool] = set()  # directions whose chunk waits (an admission, a guard's verdict)
        self.close_code: int | None = None
        self.closed_by_client: bool | None = None
        self.closing = False
        self.cap = cap

    @property
    def open(self) -> bool:
        return not self.closing and self.flow.live

    def chunk(self, message: tcp.TCPMessage) -> Awaitable[None] | None:
        side, content = message.from_client, message.content
        outbox = self.outboxes[side]
        wakes = self.wakes[side]
        if wakes and any(content is wake for wake in wakes):
            wakes[:] = [wake for wake in wakes if wake is not content]
            self.forward(message)
            return None
        if outbox.closed:
            message.content = b""
            return None
        outbox.add(content)
        events = self.readers[side].feed(content)
        if not events:
            self.forward(message)
            return None
        return self.read(message, events, 0)

    def forward(self, message: tcp.TCPMessage) -> None:
        """The chunk becomes what its direction forwards now: complete messages, edited."""
        reader, outbox = self.readers[message.from_client], self.outboxes[message.from_client]
        outbox.place(reader.boundary)
        message.content = outbox.take(reader.safe)

    def read(self, message: tcp.TCPMessage, events: list[Read], start: int) -> Awaitable[None] | None:
        side = message.from_client
        session = self.metering.sessions.get(self.handshake.id)
        self.reading = side
        try:
            for index in range(start, len(events)):
                event = events[index]
                if isinstance(event, Violation):
                    self.violated(side, event)
                    break
                if event.opcode == CLOSE:
                    self.closed_by(side, event)
                elif session is not None and event.opcode in DATA_OPCODES:
                    admission = self.metered(session, side, event)
                    if admission is not None:
                        return self.resume(admission, message, events, index + 1)
        finally:
            self.reading = None
        self.forward(message)
        return None

    async def resume(self, admission: Awaitable[None], message: tcp.TCPMessage, events: list[Read], rest: int) -> None:
        """A response's admission waited for the shared store, or user text for a guard's verdict;
        then the chunk's other messages. Meanwhile nothing of that direction is forwarded."""
        side = message.from_client
        self.waiting.add(side)
        try:
            await admission
        finally:
            self.waiting.discard(side)
        pending = self.read(message, events, rest)
        if pending is not None:
            await pending

    def metered(self, session: Session, side: bool, event: Message | Oversize) -> Awaitable[None] | None:
        if isinstance(event, Oversize):  # read from its head, as the adapters read a frame over their limit
            self.headed[side] = True
            return self.metering.frame(self.handshake, ReadFrame(side, event, self.outboxes[side]), session)
        if event.payload is None and self.headed[side]:  # its head was metered; cut out to its end if refused
            self.headed[side] = False
            self.outboxes[side].end_cut(event.spans[-1][1])
            return None
        if event.payload is None:  # over the cap: relayed unread, as the adapters count a frame too large to read
            session.meter.apply(Malformed("too_large", f"{event.size} bytes, more than {self.cap}"))
            return None
        return self.metering.frame(self.handshake, ReadFrame(side, event, self.outboxes[side]), session)

    def closed_by(self, side: bool, event: Message) -> None:
        """A peer's close frame, relayed: the first one says how the session ended."""
        if self.close_code is None:
            self.close_code = close_code(event.payload or b"")
            self.closed_by_client = side

    def violated(self, side: bool, violation: Violation) -> None:
        """A peer broke the protocol (a text message not UTF-8): both legs closed with the code,
        the offending message relayed to neither, as mitmproxy's WebSocket layer does."""
        logger.info("ai-gateway: closing %s with %d: %s", self.handshake.id, violation.code, violation.reason)
        if self.close_code is None:
            self.close_code, self.closed_by_client = violation.code, side
        self.shut(violation.code, "", cut_from=(side, violation.start))

    def send(self, to_client: bool, payload: bytes) -> None:
        """A text message of the gateway's: unmasked to the client, masked upstream."""
        side = not to_client
        self.outboxes[side].send(encode_frame(TEXT, payload, None if to_client else os.urandom(4)))
        self.wake(side)

    def close(self, code: int, reason: str) -> bool:
        if not self.open:
            return self.closing
        reason = closer.truncate(reason, closer.MAX_REASON_BYTES)
        self.handshake.metadata[closer.CLOSED_BY_GATEWAY] = reason
        self.close_code, self.closed_by_client = code, False
        self.shut(code, reason)
        return True

    def shut(self, code: int, reason: str, cut_from: tuple[bool, int] | None = None) -> None:
        """A close frame each way, nothing of either peer forwarded after it, the connection cut
        off if the peers have not closed it within closer.LINGER_SECONDS."""
        self.closing = True
        for side in (True, False):
            frame = encode_close(code, reason, os.urandom(4) if side else None)
            at = cut_from[1] if cut_from is not None and cut_from[0] == side else None
            self.outboxes[side].close(frame, at)
            self.wake(side)
        asyncio.get_running_loop().call_later(closer.LINGER_SECONDS, self.cut_off)

    def busy(self, side: bool) -> bool:
        """Whether the direction's chunk is being read or waits: its outbox is forwarded once it is done."""
        return self.reading is side or side in self.waiting

    def wake(self, side: bool) -> None:
        """Have the direction's outbox forwarded now, unless its chunk is being read (then it is)."""
        if self.busy(side):
            return
        token = os.urandom(8)  # a fresh object: known by identity when it comes back
        self.wakes[side].append(token)
        ctx.master.commands.call("inject.tcp", self.flow, not side, token)

    def cut_off(self) -> None:
        handler = closer.proxyserver_connections().get(self.flow.client_conn.id)
        if self.flow.live and handler is not None:
            drain.close(handler, "peers did not close after the gateway's close frames")

    def ended(self) -> None:
        code = self.close_code or 1006  # no close frame: the connection dropped, as mitmproxy reports it
        self.metering.finish_session(self.handshake, code, self.closed_by_client)
        self.metering.state.observability.websocket_end(self.handshake)  # the spans no record ended
