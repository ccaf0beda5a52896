"""The upstream key goes only into the bytes written to the upstream connection, never into a flow.

mitmproxy's HTTP layer hands the flow's own `Request` object to the connection that writes it
upstream (HTTP/1, HTTP/2 and HTTP/3 alike, WebSocket handshakes included). A key set on that object
in the `request` hook stays readable, by every addon, mitmweb's API and exports and a `-w` file
written at shutdown, for as long as the upstream takes to answer. So the gateway's HTTP layer hands
the connection a copy of the request that carries the key; the flow never holds it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpStream, RequestHeaders

from ai_gateway.config.policy import Auth

logger = logging.getLogger(__name__)


class UpstreamCredential:
    """Puts the gateway's HTTP layer into each connection's layer stack, as the last addon to decide it."""

    def __init__(self) -> None:
        self.auth: Auth | None = None
        self.warned = False

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        parent, child = None, nextlayer.layer
        while child is not None and not isinstance(child, HttpLayer):
            parent, child = child, getattr(child, "child_layer", None)
        if child is None or isinstance(child, CredentialHttpLayer):
            return
        if type(child) is not HttpLayer:  # another addon chose its own HTTP layer: leave it alone
            if not self.warned:
                logger.warning("ai-gateway: %s is not mitmproxy's HTTP layer: no upstream key is added", child)
                self.warned = True
            return
        ours = CredentialHttpLayer(child.context, child.mode, self)
        layers = child.context.layers  # each layer registers itself there on creation: take the old one's place
        layers.remove(ours)
        layers[layers.index(child)] = ours
        if parent is None:
            nextlayer.layer = ours
        else:
            parent.child_layer = ours


class CredentialHttpLayer(HttpLayer):
    """mitmproxy's HTTP layer, except that request heads sent upstream carry the gateway's key."""

    def __init__(self, context: Context, mode: HTTPMode, credential: UpstreamCredential) -> None:
        super().__init__(context, mode)
        self.credential = credential

    def event_to_child(self, child: layer.Layer | HttpStream, event: events.Event) -> Iterator[commands.Command]:
        # A RequestHeaders event goes to a connection layer (not a stream) only when the request is sent upstream.
        # Installed whether or not the policy has `auth`, so that a reload adding it applies to open connections.
        auth = self.credential.auth
        if isinstance(event, RequestHeaders) and auth is not None and not isinstance(child, HttpStream):
            event = dataclasses.replace(event, request=with_credential(event.request, auth))
        return super().event_to_child(child, event)


def with_credential(request: http.Request, auth: Auth) -> http.Request:
    """A copy of the request with the key; the body is shared, not copied (bytes are immutable)."""
    sent = request.copy()
    sent.headers[auth.header] = auth.header_value
    return sent
