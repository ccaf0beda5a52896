"""OpenAI's Realtime API over WebSocket: client and server events turned into usage items.

Most of a voice session is audio deltas of 6-100 KB of base64, and the relay hook runs
synchronously for every frame, so the event type is read without decoding (near the start, or
at the very end for servers that sort keys) and only the few metered event types are decoded.
Client events are read by json_events.read_event: whatever the key order or escaping, a
`response.create` is recognised, and a client frame that cannot be one (an audio append, a
conversation item) is never decoded. Frames are decoded up to gateway_max_body_bytes (server)
and MAX_CLIENT_EVENT_BYTES (client); a larger one is relayed unread and counted as too_large.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ai_gateway.accounting.items import (
    FirstDelta,
    Malformed,
    RateLimits,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    SessionModels,
    TranscriptionDone,
    TurnEnded,
    UpstreamError,
    UsageItem,
)
from ai_gateway.accounting.usage import InvalidUsage
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.json_events import (
    MAX_CLIENT_EVENT_BYTES,
    decode_json,
    event_type,
    may_name,
    quoted,
    read_event,
    too_large,
)
from ai_gateway.protocols.usage_fields import (
    COMPLETIONS_USAGE,
    parse_realtime_usage,
    parse_transcription_usage,
    parse_usage,
)

ERROR = "error"
AUDIO_COMMIT = "input_audio_buffer.commit"
SPEECH_STOPPED = "input_audio_buffer.speech_stopped"
RESPONSE_CREATE = "response.create"
CLIENT_EVENTS = (RESPONSE_CREATE, AUDIO_COMMIT)  # the client events that are decoded
ITEM_CREATE = "conversation.item.create"  # what guardrails read of the client (user text)
AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})  # GA, beta
RESPONSE_CREATED = "response.created"
RESPONSE_DONE = "response.done"
SESSION_CREATED = "session.created"
SESSION_UPDATED = "session.updated"
# The beta API's transcription-only sessions announce their model in these.
SESSION_EVENTS = frozenset(
    {SESSION_CREATED, SESSION_UPDATED, "transcription_session.created", "transcription_session.updated"}
)
TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
RATE_LIMITS_UPDATED = "rate_limits.updated"
VLLM_TRANSCRIPTION_DONE = "transcription.done"  # vLLM's /v1/realtime
RATE_LIMIT_NAMES = frozenset({"requests", "tokens"})
RESPONSE_STATUSES = frozenset({"completed", "cancelled", "failed", "incomplete", "in_progress"})
METERED_EVENTS = frozenset(
    {
        ERROR,
        RESPONSE_CREATED,
        RESPONSE_DONE,
        TRANSCRIPTION_COMPLETED,
        RATE_LIMITS_UPDATED,
        VLLM_TRANSCRIPTION_DONE,
        SPEECH_STOPPED,
        *SESSION_EVENTS,
    }
)
# Started responses whose first delta is still awaited; more than this is not a real upstream.
MAX_AWAITED_RESPONSES = 64
UNKNOWN_MODEL = "unknown"

# Deltas name their response near the start; only searched while a response awaits its first delta.
_RESPONSE_ID = re.compile(rb'"response_id"\s*:\s*"([^"\\]{1,128})"')


class InvalidEvent(ValueError):
    """A metered event without the object that should carry its data."""


class RealtimeProtocol:
    """One Realtime session's frames as usage items.

    It remembers which started responses have not streamed yet, so that only then are deltas
    searched for their response id (time to first token), and never after.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.awaiting_first_delta: set[str] = set()
        self.max_frame_bytes = max_frame_bytes  # of a server frame; client frames read at most MAX_CLIENT_EVENT_BYTES
        self.kind: str | None = None  # the last text server frame's type: guardrails read it from here, not again
        self.item: UsageItem | None = None  # and what it was read as, when it was decoded (a response's id)
        # Whether the last client frame names none of the client events metering or guardrails
        # read (an audio append): one scan of it for both, and guardrails leave it unread.
        self.plain = False
        # Whether the frame just read is an output audio delta, and the size and number of those so
        # far: guardrails measure a response's audio from these without being handed each one.
        self.audio = False
        self.audio_bytes = 0
        self.audio_deltas = 0

    def client_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        """A `response.create` or an audio commit, recognised in any key order and spelling."""
        self.plain = is_text and not may_name(content, _READ_BY_NAME)
        self.audio = False
        if not is_text or self.plain:
            return None
        return read_client_event(content, min(self.max_frame_bytes, MAX_CLIENT_EVENT_BYTES))

    def server_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        if not is_text:
            self.audio = False
            return Malformed("binary", f"{len(content)} bytes")
        kind = self.kind = event_type(content)
        self.item = None
        self.audio = kind in AUDIO_DELTAS
        if self.audio:
            self.audio_bytes += len(content)
            self.audio_deltas += 1
        if needs_decoding(kind):
            item = self.item = read_server_event(content, self.max_frame_bytes)
            if isinstance(item, ResponseStarted) and item.response_id is not None:
                if len(self.awaiting_first_delta) < MAX_AWAITED_RESPONSES:
                    self.awaiting_first_delta.add(item.response_id)
            elif isinstance(item, ResponseDone) and item.response_id is not None:
                self.awaiting_first_delta.discard(item.response_id)
            return item
        if self.awaiting_first_delta:
            response_id = delta_response_id(content)
            if response_id in self.awaiting_first_delta:
                self.awaiting_first_delta.discard(response_id)
                return FirstDelta(response_id)
        return None


_READ_BY_NAME = quoted((*CLIENT_EVENTS, ITEM_CREATE))  # what a client frame is scanned for, once


def requested_model(url: str) -> str:
    """The model a client asked for in the URL: `model` (OpenAI, Azure v1) or `deployment` (Azure)."""
    query = parse_qs(urlsplit(url).query)
    for name in ("model", "deployment"):
        if values := query.get(name):
            return values[0]
    return UNKNOWN_MODEL


def delta_response_id(content: bytes) -> str | None:
    match = _RESPONSE_ID.search(content, 0, 512)
    return match.group(1).decode(errors="replace") if match else None


def needs_decoding(kind: str | None) -> bool:
    """Whether a server frame with this leading type must be decoded: a metered event, or a frame
    not shaped like an event (no leading type).

    OpenAI always sends the type first, so deltas are skipped unread; a frame that does not start
    with its type is rare and is decoded in full, to meter it or to count it as malformed.
    """
    return kind is None or kind in METERED_EVENTS


def read_client_event(
    content: bytes, limit: int = MAX_CLIENT_EVENT_BYTES
) -> ResponseRequested | TurnEnded | Malformed | None:
    """A response request, when any top-level `type` of the event asks for one, or the end of a turn
    (an audio commit).

    A frame naming its type twice is read as a request if either name asks for one: which of the
    two the upstream honours is its JSON parser's choice, and a budget must not depend on it. A
    frame over `limit` is taken for a request when its head or tail says so, when it spells
    `"response.create"` anywhere, or when its type cannot be read at all; it is relayed unread
    and counted as too_large (a type escaped beyond the head of such a frame goes unseen).
    """
    event = read_event(content, CLIENT_EVENTS, limit)
    if event is None:
        return None
    if event.may_be(RESPONSE_CREATE):
        response = event.members.get("response")
        model = response.get("model") if isinstance(response, dict) else None
        return ResponseRequested(_string(model), _string(event.members.get("event_id")), event.unread)
    if AUDIO_COMMIT in event.types:
        return TurnEnded("commit")
    return too_large(content, limit) if event.too_large else None


def read_server_event(content: bytes, limit: int = DEFAULT_MAX_BODY_BYTES) -> UsageItem | None:
    """Decode a server frame for which needs_decoding() was true. None: not metered after all."""
    event = decode_json(content, not_object="invalid_event", limit=limit)
    if isinstance(event, Malformed):
        return event
    kind = event.get("type")
    try:
        if kind == RESPONSE_DONE:
            return read_response_done(event)
        if kind == ERROR:
            return read_error(event)
        if kind == RESPONSE_CREATED:
            response = event.get("response")
            return ResponseStarted(_string(response.get("id")) if isinstance(response, dict) else None)
        if kind == SPEECH_STOPPED:
            return TurnEnded("speech_stopped")
        if kind == TRANSCRIPTION_COMPLETED:
            return TranscriptionDone(parse_transcription_usage(event.get("usage")))
        if kind in SESSION_EVENTS:
            return read_session(event)
        if kind == RATE_LIMITS_UPDATED:
            return read_rate_limits(event)
        if kind == VLLM_TRANSCRIPTION_DONE and event.get("usage") is not None:
            return TranscriptionDone(parse_usage(event["usage"], COMPLETIONS_USAGE))
    except InvalidEvent as e:
        return Malformed("invalid_event", f"{kind}: {e}")
    except InvalidUsage as e:
        return Malformed("invalid_usage", f"{kind}: {e}")
    return None


def read_response_done(event: dict[str, Any]) -> ResponseDone:
    """A finished response: counted whatever its usage, billed only when the usage is whole."""
    response = event.get("response")
    if not isinstance(response, dict):
        raise InvalidEvent("response is missing or not an object")
    status = response.get("status")
    done = ResponseDone(
        usage=None,
        status=status if status in RESPONSE_STATUSES else "other",
        response_id=_string(response.get("id")),
    )
    if response.get("usage") is None:
        return replace(done, unread="missing_usage")
    try:
        return replace(done, usage=parse_realtime_usage(response["usage"]))
    except InvalidUsage:
        return replace(done, unread="invalid_usage")


def read_error(event: dict[str, Any]) -> UpstreamError:
    error = event.get("error")
    if not isinstance(error, dict):
        return UpstreamError()
    return UpstreamError(_string(error.get("event_id")), _string(error.get("code")))


def read_rate_limits(event: dict[str, Any]) -> RateLimits:
    entries = event.get("rate_limits")
    if not isinstance(entries, list):
        raise InvalidEvent("rate_limits is missing or not a list")
    return RateLimits(
        tuple(
            (entry["name"], entry["limit"], entry["remaining"])
            for entry in entries
            if isinstance(entry, dict)
            and entry.get("name") in RATE_LIMIT_NAMES
            and all(_is_number(entry.get(k)) for k in ("limit", "remaining"))
        )
    )


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < float("inf")


def read_session(event: dict[str, Any]) -> SessionModels:
    session = event.get("session")
    if session is None:  # vLLM's session.created names no session
        return SessionModels(model=None, transcription_model=None)
    if not isinstance(session, dict):
        raise InvalidEvent("session is not an object")
    return SessionModels(
        model=_string(session.get("model")),
        transcription_model=_transcription_model(session),
        session_id=_string(session.get("id")),
    )


def _transcription_model(session: dict[str, Any]) -> str | None:
    """GA keeps it at session.audio.input.transcription.model, beta at session.input_audio_transcription.model."""
    ga = _path(session, "audio", "input", "transcription", "model")
    return _string(ga) or _string(_path(session, "input_audio_transcription", "model"))


def _path(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def cancel_event(response_id: str) -> bytes:
    """The client event that cancels a response in progress, as the gateway sends it upstream."""
    return json.dumps(
        {"type": "response.cancel", "event_id": f"event_gateway_{uuid.uuid4().hex[:12]}", "response_id": response_id}
    ).encode()


def error_event(code: str, message: str, refused_event: bytes, kind: str = "invalid_request_error") -> bytes:
    """A well-formed Realtime `error` event, naming the refused client event as OpenAI's errors do."""
    refused = decode_json(refused_event, limit=MAX_CLIENT_EVENT_BYTES) if refused_event else None
    event_id = refused.get("event_id") if isinstance(refused, dict) else None
    event = {
        "type": "error",
        "event_id": f"event_gateway_{uuid.uuid4().hex[:12]}",
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "param": None,
            "event_id": event_id,
        },
    }
    return json.dumps(event).encode()
