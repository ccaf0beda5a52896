"""Messages the gateway injects into a relayed WebSocket (an error event to the client, a
response.cancel to the upstream), kept whole.

mitmproxy's `inject.websocket` appends the injected message to the message the layer is still
assembling from the same side: injected while an upstream audio delta is half received, an error
event would reach the client glued to the first half of that delta, and the delta's second half
would follow on its own (both unreadable). So each injected payload is remembered until its
message arrives; a message that ends with it but starts with something else is cut back to the
payload, and the part before it is put in front of the next message from that side, which is the
rest of the message it was cut from.
"""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

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
