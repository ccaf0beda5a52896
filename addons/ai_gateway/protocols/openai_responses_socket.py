"""The Responses API's WebSocket mode: `response.create` from the client, Responses events back.

Its events are the ones Responses streams over SSE, so the same reader bills each final event.
"""

from __future__ import annotations

from ai_gateway.accounting.items import Malformed, ResponseRequested, UsageItem
from ai_gateway.protocols.json_events import decode_json, event_type
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS, read_responses_event
from ai_gateway.protocols.openai_realtime import RESPONSE_CREATE


class ResponsesSocketProtocol:
    """One Responses WebSocket session's frames as usage items."""

    def client_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        """The model of the next response comes with its response.create."""
        if not is_text or event_type(content) != RESPONSE_CREATE:
            return None
        document = decode_json(content)
        model = document.get("model") if isinstance(document, dict) else None
        return ResponseRequested(model if isinstance(model, str) and model else None)

    def server_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        if not is_text:
            return Malformed("binary", f"{len(content)} bytes")
        kind = event_type(content)
        if kind is not None and kind not in RESPONSES_FINAL_EVENTS:
            return None
        document = decode_json(content)
        return read_responses_event(document) if isinstance(document, dict) else document
