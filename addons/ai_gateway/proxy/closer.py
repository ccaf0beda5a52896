"""Closing a relayed WebSocket from the gateway: a close frame with a code and reason to both peers.

mitmproxy 12 has no addon API for this (mitmproxy issue 4711), and the obvious ways around it
break the relay. Writing a close frame to a socket from a timer can land inside a frame the
layer is still sending, and tells the layer's wsproto connections nothing: a frame relayed
afterwards is sent on a connection the peer saw closed. Calling `send` on the layer's wsproto
connection from outside leaves it closing while the layer still relays on it: the next message
raises wsproto's LocalProtocolError inside mitmproxy ("mitmproxy has crashed").

So the close goes through the layer's own code path, in order with everything else:

1. `close_websocket` injects a marker message into the flow with the public `inject.websocket`
   command. mitmproxy queues it behind every event of the connection already received, also
   while the layer is paused waiting for an earlier message's hook.
2. When the layer reaches the marker it calls the `websocket_message` hook with the layer paused
   exactly there; the gateway's hook hands it to `intercept`, which drops the marker and appends
   a wsproto `CloseConnection(code, reason)` event to the layer's source connection, after the
   marker's own event in the same queue.
3. The layer resumes, takes that event as if the peer had sent a close frame, and runs its own
   close branch (`WebsocketLayer.relay_messages`): close_code and close_reason set on the flow,
   a close frame with the code and reason sent to the client and to the upstream (each encoded
   by its own wsproto connection, at a message boundary), both TCP connections closed, the
   `websocket_end` hook, and from then on every event of the flow is ignored (`done`): nothing
   is relayed after the close, and frames half-received from either peer are discarded unparsed.

The flow's `closed_by_client` is False (the marker comes from the server side), and
`flow.metadata[CLOSED_BY_GATEWAY]` holds the reason, so `websocket_end` can tell a gateway's
close from an upstream's. mitmproxy closes both sockets right after the close frames, as when a
peer closes; a peer still streaming then gets a TCP reset that can discard the close frame before
it is read (the upstream saw 1006 instead of 1008 in about one test run in eight). So `linger`
keeps a duplicate of each socket's descriptor: once mitmproxy has let go of its own, the duplicate
sends FIN and discards what the peer still sends until it closes, for at most LINGER_SECONDS.

A message half received from the upstream when the marker arrives is joined to the marker by the
layer (mitmproxy's `inject.websocket` appends to the message being assembled): it is dropped with
it, never relayed. What a peer half sent is discarded unparsed once the layer is done.

mitmproxy internals relied on (tests/e2e/test_closer.py checks each on the installed version):
`Proxyserver.connections` (client connection id -> connection handler) for liveness and the layer
tree, `ConnectionHandler.layer` and the `layer` / `child_layer` / `streams` attributes that lead
from it to the flow's `WebsocketLayer`, its `client_ws` / `server_ws` wsproto connections and
`relay_messages` state, wsproto's `Connection._events` queue, which `events()` drains before
parsing received bytes, and `ConnectionHandler.transports` (its `writer`, closed by
`handle_connection`) for the sockets to linger on. Tested on mitmproxy 12.3.1 and wsproto 1.3.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from mitmproxy.proxy.server import ConnectionIO
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

CLOSE_METADATA = "ai_gateway.close"
"""The pending close of a flow: (code, reason, marker content)."""
CLOSED_BY_GATEWAY = "ai_gateway.closed_by_gateway"
"""Set on a flow the gateway closed: the reason."""
MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, two of them the code
LINGER_SECONDS = 5.0
"""How long a closed connection waits for its peer's close; what the peer sends meanwhile is discarded."""
SENDABLE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011)) | frozenset(range(3000, 5000))

logger = logging.getLogger(__name__)
_lingering: set[asyncio.Task[None]] = set()  # tasks are only weakly referenced by the event loop


def close_websocket(flow: http.HTTPFlow, code: int, reason: str) -> bool:
    """Close a live WebSocket flow on both legs with `code` and `reason`, as soon as the layer
    reaches the point where this was called. False when the flow is not a live WebSocket."""
    if code not in SENDABLE_CODES:
        raise ValueError(f"close code {code} cannot be sent in a close frame")
    websocket = flow.websocket
    if websocket is None or not flow.live or websocket.close_code is not None or not is_connected(flow):
        return False
    if CLOSE_METADATA in flow.metadata:
        return True  # already closing
    reason = truncate(reason, MAX_REASON_BYTES)
    marker = f"ai-gateway: closing session {flow.id} ({code} {reason})".encode()
    flow.metadata[CLOSE_METADATA] = (code, reason, marker)
    ctx.master.commands.call("inject.websocket", flow, True, marker)
    return True


def intercept(flow: http.HTTPFlow) -> bool:
    """For the `websocket_message` hook, first: True when the current message is the gateway's
    close marker, which is then dropped (never relayed, never metered) and the close started."""
    pending = flow.metadata.get(CLOSE_METADATA)
    if pending is None or flow.websocket is None:
        return False
    message = flow.websocket.messages[-1]
    code, reason, marker = pending
    # What the upstream had half sent when the marker came is joined to it: dropped with it.
    if not message.injected or message.from_client or not message.content.endswith(marker):
        return False
    message.drop()
    layer = websocket_layer(flow)
    if layer is None or layer._handle_event != layer.relay_messages:
        logger.error("ai-gateway: cannot close the WebSocket of %s: mitmproxy's layers are not as expected", flow.id)
        return True
    if layer.client_ws.state is not ConnectionState.OPEN or layer.server_ws.state is not ConnectionState.OPEN:
        return True  # a peer's close is already under way
    # The marker came from the server side: the layer drains server_ws's event queue next.
    layer.server_ws._events.append(CloseConnection(code, reason))
    flow.metadata[CLOSED_BY_GATEWAY] = reason
    handler = proxyserver_connections()[flow.client_conn.id]
    for connection in (layer.context.client, layer.context.server):
        linger(handler.transports.get(connection))
    return True


def linger(io: ConnectionIO | None) -> None:
    """Keep the TCP connection open past mitmproxy's close until the peer has read the close frame
    (see the module's docstring): a duplicate descriptor, closed gracefully by `close_gracefully`."""
    writer = None if io is None else io.writer
    sock = None if writer is None else writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        duplicate = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return
    duplicate.setblocking(False)
    task = asyncio.get_running_loop().create_task(close_gracefully(writer, duplicate))
    _lingering.add(task)
    task.add_done_callback(_lingering.discard)


async def close_gracefully(writer: asyncio.StreamWriter | Any, duplicate: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            with contextlib.suppress(Exception):  # the connection's own error, already logged by mitmproxy
                await writer.wait_closed()
            duplicate.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(duplicate, 65536):
                pass
    except (TimeoutError, OSError):
        pass
    finally:
        duplicate.close()


def is_connected(flow: http.HTTPFlow) -> bool:
    return flow.client_conn.id in proxyserver_connections()


def proxyserver_connections() -> dict:
    proxyserver = ctx.master.addons.get("proxyserver")
    return {} if proxyserver is None else proxyserver.connections


def websocket_layer(flow: http.HTTPFlow) -> WebsocketLayer | None:
    """The layer relaying `flow`, found in its client connection's layer tree."""
    handler = proxyserver_connections().get(flow.client_conn.id)
    if handler is None:
        return None
    for layer in walk(handler.layer):
        if isinstance(layer, WebsocketLayer) and layer.flow is flow:
            return layer
    return None


def walk(root: Layer) -> Iterator[Layer]:
    """Every layer under `root`: NextLayer's `layer`, a mode, tunnel or stream layer's `child_layer`,
    the HTTP layer's `streams`."""
    stack = [root]
    while stack:
        layer = stack.pop()
        yield layer
        children = [getattr(layer, "layer", None), getattr(layer, "child_layer", None)]
        streams = getattr(layer, "streams", None)
        if isinstance(streams, dict):
            children.extend(streams.values())
        stack.extend(child for child in children if isinstance(child, Layer))


def truncate(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8, cut at a character boundary."""
    return text.encode()[:limit].decode(errors="ignore")
