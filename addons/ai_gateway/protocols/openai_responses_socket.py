"""The Responses API's WebSocket mode: `response.create` from the client, Responses events back.

Its events are the ones Responses streams over SSE, so the same reader bills each final event.
A `response.create` is recognised in any key order and spelling (json_events.read_event).
"""

from __future__ import annotations

from ai_gateway.accounting.items import Malformed, ResponseRequested, UsageItem
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, event_type, read_event, too_large
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS, read_responses_event
from ai_gateway.protocols.openai_realtime import RESPONSE_CREATE

CLIENT_EVENTS = (RESPONSE_CREATE,)


class ResponsesSocketProtocol:
    """One Responses WebSocket session's frames as usage items."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes  # of a server frame; client frames read at most MAX_CLIENT_EVENT_BYTES

    def client_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        """The model of the next response comes with its response.create.

        A create too large to decode (its input carries images, say) still asks for a response: it
        is admitted or refused as one, with the model its head names, and counted as too_large."""
        if not is_text:
            return None
        limit = min(self.max_frame_bytes, MAX_CLIENT_EVENT_BYTES)
        event = read_event(content, CLIENT_EVENTS, limit)
        if event is None:
            return None
        if not event.may_be(RESPONSE_CREATE):
            return too_large(content, limit) if event.too_large else None
        model = event.members.get("model")
        return ResponseRequested(model if isinstance(model, str) and model else None, unread=event.unread)

    def server_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        if not is_text:
            return Malformed("binary", f"{len(content)} bytes")
        kind = event_type(content)
        if kind is not None and kind not in RESPONSES_FINAL_EVENTS:
            return None
        document = decode_json(content, limit=self.max_frame_bytes)
        return read_responses_event(document) if isinstance(document, dict) else document
