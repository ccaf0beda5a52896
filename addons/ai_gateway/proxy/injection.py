"""Messages the gateway injects into a relayed WebSocket (an error event to the client, a
response.cancel to the upstream), kept whole.

mitmproxy's `inject.websocket` appends the injected message to the message the layer is still
assembling from the same side: injected while an upstream audio delta is half received, an error
event would reach the client glued to the first half of that delta, and the delta's second half
would follow on its own (both unreadable). So each injected payload is remembered until its
message arrives; a message that ends with it but starts with something else is cut back to the
payload, and the part before it is put in front of the next message from that side, which is the
rest of the message it was cut from.

`Links` is how an addon (the session meter, the guardrails) reaches a session whatever its path:
through its `SessionLink` when the session is relayed as bytes (proxy/frame_relay.py), else by
injection and `closer` on mitmproxy's WebSocket layer.
"""

from __future__ import annotations

from typing import Protocol

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.proxy import closer

Side = tuple[str, bool]  # (flow id, towards the client)


class Injections:
    def __init__(self) -> None:
        self.pending: dict[Side, list[bytes]] = {}
        self.cut: dict[Side, bytes] = {}

    @property
    def active(self) -> bool:
        """Whether any flow has an injection on its way or a message cut short: else nothing to do per frame."""
        return bool(self.pending or self.cut)

    def send(self, flow: http.HTTPFlow, to_client: bool, payload: bytes) -> None:
        self.pending.setdefault((flow.id, to_client), []).append(payload)
        ctx.master.commands.call("inject.websocket", flow, to_client, payload)

    def arrived(self, flow: http.HTTPFlow, message: WebSocketMessage) -> bool:
        """Whether the message is one the gateway injected (then it is whole again, and not to be
        metered); a message from a peer gets back what an injection cut from it."""
        side = (flow.id, not message.from_client)
        if not message.injected:
            if (cut := self.cut.pop(side, None)) is not None:
                message.content = cut + message.content
            return False
        payloads = self.pending.get(side, [])
        for payload in payloads:
            if message.content.endswith(payload):
                payloads.remove(payload)
                if not payloads:
                    del self.pending[side]
                if len(message.content) > len(payload):
                    self.cut[side] = message.content[: -len(payload)]
                    message.content = payload
                return True
        return False

    def forget(self, flow_id: str) -> None:
        for to_client in (True, False):
            self.pending.pop((flow_id, to_client), None)
            self.cut.pop((flow_id, to_client), None)


class SessionLink(Protocol):
    """How the gateway reaches a session relayed as bytes rather than by mitmproxy's WebSocket layer."""

    @property
    def open(self) -> bool: ...

    def send(self, to_client: bool, payload: bytes) -> None: ...

    def close(self, code: int, reason: str) -> bool: ...


class Links:
    """The gateway's own messages and closes for a session, on whichever path it is relayed."""

    def __init__(self, injections: Injections | None = None) -> None:
        self.injections = injections or Injections()
        self.links: dict[str, SessionLink] = {}  # sessions relayed as bytes, by their handshake's flow id

    def add(self, flow_id: str, link: SessionLink) -> None:
        """A session relayed as bytes from now on: reached through its link."""
        self.links[flow_id] = link

    def send(self, flow: http.HTTPFlow, to_client: bool, payload: bytes) -> None:
        """A text message of the gateway's own into the session, kept whole."""
        link = self.links.get(flow.id)
        if link is not None:
            link.send(to_client, payload)
        else:
            self.injections.send(flow, to_client, payload)

    def open(self, flow: http.HTTPFlow) -> bool:
        """Whether the session is relayed and no close is under way."""
        link = self.links.get(flow.id)
        return link.open if link is not None else flow.live and closer.CLOSE_METADATA not in flow.metadata

    def close(self, flow: http.HTTPFlow, code: int, reason: str) -> bool:
        """Both legs closed with `code`: whether the session is closing now (False: it had ended)."""
        link = self.links.get(flow.id)
        return link.close(code, reason) if link is not None else closer.close_websocket(flow, code, reason)

    def forget(self, flow_id: str) -> None:
        self.links.pop(flow_id, None)
        self.injections.forget(flow_id)
