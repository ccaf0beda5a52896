"""Reading the Realtime server events that carry models and usage.

Most of a voice session is audio deltas of 6-100 KB of base64, and the relay hook runs
synchronously for every frame, so the event type is read from the first bytes of the frame
and only the few metered event types are ever JSON-decoded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ai_gateway.accounting.usage import (
    DurationUsage,
    InvalidUsage,
    TokenUsage,
    parse_realtime_usage,
    parse_transcription_usage,
)

ERROR = "error"
RESPONSE_CREATE = "response.create"
RESPONSE_CREATED = "response.created"
RESPONSE_DONE = "response.done"
SESSION_CREATED = "session.created"
SESSION_UPDATED = "session.updated"
TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
RATE_LIMITS_UPDATED = "rate_limits.updated"
RATE_LIMIT_NAMES = frozenset({"requests", "tokens"})
RESPONSE_STATUSES = frozenset({"completed", "cancelled", "failed", "incomplete", "in_progress"})
METERED_EVENTS = frozenset(
    {RESPONSE_CREATED, RESPONSE_DONE, SESSION_CREATED, SESSION_UPDATED, TRANSCRIPTION_COMPLETED, RATE_LIMITS_UPDATED}
)

# Every OpenAI server event starts with its type; this reads it without decoding the frame.
_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([a-z0-9_.]{1,128})"')
# Deltas name their response near the start; only searched while a response awaits its first delta.
_RESPONSE_ID = re.compile(rb'"response_id"\s*:\s*"([^"\\]{1,128})"')


@dataclass(frozen=True, slots=True)
class SessionModels:
    """Models announced by `session.created`/`session.updated`; None where the event had none."""

    model: str | None
    transcription_model: str | None


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str | None


@dataclass(frozen=True, slots=True)
class ResponseDone:
    usage: TokenUsage
    status: str
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class TranscriptionDone:
    usage: TokenUsage | DurationUsage


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The upstream's own limits: (name, limit, remaining) for `requests` and `tokens`."""

    limits: tuple[tuple[str, float, float], ...]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that looked metered but could not be read; reason is a short label value."""

    reason: str
    detail: str


class InvalidEvent(ValueError):
    """A metered event without the object that should carry its data."""


ServerEvent = SessionModels | ResponseCreated | ResponseDone | TranscriptionDone | RateLimits | Malformed


def leading_type(content: bytes) -> str | None:
    """The event type when the frame starts with it, as OpenAI's events do; read without decoding."""
    match = _LEADING_TYPE.match(content)
    return match.group(1).decode() if match else None


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


def read_server_event(content: bytes) -> ServerEvent | None:
    """Decode a server frame for which needs_decoding() was true. None: not metered after all."""
    try:
        event = json.loads(content)
    except (ValueError, RecursionError) as e:
        return Malformed("invalid_json", str(e)[:200])
    if not isinstance(event, dict):
        return Malformed("invalid_event", f"expected an event object, got {type(event).__name__}")
    kind = event.get("type")
    try:
        if kind == RESPONSE_DONE:
            return read_response_done(event)
        if kind == RESPONSE_CREATED:
            response = event.get("response")
            return ResponseCreated(_string(response.get("id")) if isinstance(response, dict) else None)
        if kind == TRANSCRIPTION_COMPLETED:
            return TranscriptionDone(parse_transcription_usage(event.get("usage")))
        if kind in (SESSION_CREATED, SESSION_UPDATED):
            return read_session(event)
        if kind == RATE_LIMITS_UPDATED:
            return read_rate_limits(event)
    except InvalidEvent as e:
        return Malformed("invalid_event", f"{kind}: {e}")
    except InvalidUsage as e:
        return Malformed("invalid_usage", f"{kind}: {e}")
    return None


def read_response_done(event: dict[str, Any]) -> ResponseDone:
    response = event.get("response")
    if not isinstance(response, dict):
        raise InvalidEvent("response is missing or not an object")
    status = response.get("status")
    return ResponseDone(
        usage=parse_realtime_usage(response.get("usage")),
        status=status if status in RESPONSE_STATUSES else "other",
        response_id=_string(response.get("id")),
    )


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
    if not isinstance(session, dict):
        raise InvalidEvent("session is missing or not an object")
    return SessionModels(model=_string(session.get("model")), transcription_model=_transcription_model(session))


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
