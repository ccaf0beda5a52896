"""OpenAI's GPT-Live (`/v1/live/sessions`, its sideband `/v1/live/sessions/{id}/attach`): frames
turned into usage items.

GPT-Live bills session time by the second, not tokens. The model comes from the client's first
event, `session.start` (`session.model`), and again in the `session` the server returns
(`session.started`, `session.updated`, `session.closed`); a sideband sees only the latter.

Time comes in `session.usage.updated` and, final, in `session.closed`: `usage.seconds` is the
*cumulative* billable time (whole seconds typed as a number: `5.0` occurs), split into
`active_seconds` and `paused_seconds` where the session can pause (WebRTC standby). Reports are
passed on as they are; the meter bills what each adds to the one before.

Delegation: the Live model can hand work to a Responses model; its stream comes wrapped, one
`response.event {delegation_id, event}` per Responses event, and the wrapped final event
(`response.completed`, `.incomplete`, `.failed`) carries that model's token usage under its own
`response.model`. It is read as the Responses reader reads any final event.

Most frames are audio (`session.output_audio.delta`, `session.input_audio.append`): their type is
read from their first bytes and they are never decoded.
"""

from __future__ import annotations

from typing import Any

from ai_gateway.accounting.items import Malformed, SessionModels, SessionTime, UpstreamError, UsageItem
from ai_gateway.accounting.usage import InvalidUsage
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, event_type
from ai_gateway.protocols.json_events import read_event as read_client_event
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS, read_responses_event
from ai_gateway.protocols.usage_fields import parse_session_usage

SESSION_START = "session.start"
USAGE_UPDATED = "session.usage.updated"
SESSION_CLOSED = "session.closed"
RESPONSE_EVENT = "response.event"
# Server events whose `session` names the model and the session id.
SESSION_EVENTS = frozenset({"session.started", "session.updated"})
METERED_SERVER_EVENTS = SESSION_EVENTS | {USAGE_UPDATED, SESSION_CLOSED, RESPONSE_EVENT, "error"}
# What the gateway sends upstream to end a session it closes (a budget spent, a session limit).
CLOSE_EVENT = b'{"type":"session.close"}'
MAX_REASON = 64  # characters of a close reason kept (the ledger's status): the SDK knows five short ones
# A wrapped Responses event is decoded only if one of these could be its type.
_FINAL_TYPES = tuple(f'"{kind}"'.encode() for kind in RESPONSES_FINAL_EVENTS)


class LiveProtocol:
    """One GPT-Live session's (or sideband's) frames as usage items; it keeps no state."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes  # of a server frame; client frames read at most MAX_CLIENT_EVENT_BYTES

    def client_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        """The model of `session.start`, in any key order and spelling; None for anything else
        (an unreadable one the upstream refuses itself)."""
        if not is_text:
            return None
        event = read_client_event(content, (SESSION_START,), min(self.max_frame_bytes, MAX_CLIENT_EVENT_BYTES))
        if event is None or SESSION_START not in event.types:
            return None
        return session_models(event.members.get("session"))

    def server_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        if not is_text:
            return Malformed("binary", f"{len(content)} bytes")
        kind = event_type(content)
        if kind is not None and kind not in METERED_SERVER_EVENTS:
            return None
        if kind == RESPONSE_EVENT and not any(final in content for final in _FINAL_TYPES):
            return None
        document = decode_json(content, limit=self.max_frame_bytes)
        return document if isinstance(document, Malformed) else read_event(document)


def read_event(event: dict[str, Any]) -> UsageItem | None:
    """A decoded server event as a usage item (None: nothing metered)."""
    kind = event.get("type")
    if kind in SESSION_EVENTS:
        return session_models(event.get("session"))
    if kind in (USAGE_UPDATED, SESSION_CLOSED):
        try:
            usage = parse_session_usage(event.get("usage"))
        except InvalidUsage as e:
            return Malformed("invalid_usage", f"{kind}: {e}")
        if kind == USAGE_UPDATED:
            return SessionTime(usage)
        reason = event.get("reason")
        return SessionTime(usage, closed=reason[:MAX_REASON] if isinstance(reason, str) and reason else "unknown")
    if kind == RESPONSE_EVENT:
        inner = event.get("event")
        return read_responses_event(inner) if isinstance(inner, dict) else None
    if kind == "error":
        error = event.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        return UpstreamError(code=code if isinstance(code, str) else None)
    return None


def session_models(session: Any) -> SessionModels | None:
    """The model (and session id) a `session` object names; None when it names no model."""
    if not isinstance(session, dict):
        return None
    model, session_id = session.get("model"), session.get("id")
    if not isinstance(model, str) or not model:
        return None
    return SessionModels(model, None, session_id if isinstance(session_id, str) else None)
