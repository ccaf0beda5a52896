"""The WebSocket history mitmproxy keeps per flow: trimmed, and with relayed audio shrunk.

mitmproxy keeps every message of a flow until it closes: about 230 MB per hour of audio per
direction. Under mitmdump nobody reads them, so only the last is kept; under mitmweb all stay
listed, but once a message has been relayed its base64 audio is replaced by a one-line size
(the frame on the wire is never changed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.items import Malformed
from ai_gateway.protocols.json_events import decode_json, event_type

# The field holding base64 PCM16 audio, per event type (beta and GA names; the client's append).
AUDIO_FIELDS: dict[str, str] = {
    "response.output_audio.delta": "delta",
    "response.audio.delta": "delta",
    "input_audio_buffer.append": "audio",
    "session.output_audio.delta": "delta",  # GPT-Live
    "session.input_audio.append": "audio",
}
PLACEHOLDER_PREFIX = "<audio "
# The Realtime default format: 24 kHz mono 16-bit PCM, 48 bytes per millisecond.
BYTES_PER_MS = 48
COMPLETIONS_CHUNK = "chat.completion.chunk"
# A top-level key, recognisable without decoding: inside a JSON string `"` is always escaped, so
# `{` or `,` then `"key"` can only open a member name.
_AUDIO_KEYS = {field: re.compile(rb'[{,]\s*"' + field.encode() + rb'"\s*:\s*"') for field in set(AUDIO_FIELDS.values())}
# For frames that do not start with their type: only these can be audio events worth decoding.
_AUDIO_TYPE_MARKERS = tuple(f'"{kind}"'.encode() for kind in AUDIO_FIELDS)


def audio_placeholder(base64_text: str) -> str:
    """What the audio amounts to, from the base64 length alone: decoding 64 KB to measure it would be waste."""
    return _describe_audio(len(base64_text), _padding(base64_text[-2:]))


def _describe_audio(length: int, padding: int) -> str:
    size = (length - padding) * 3 // 4
    ms = f"{size / BYTES_PER_MS:,.1f}".removesuffix(".0")
    return f"{PLACEHOLDER_PREFIX}pcm16 24 kHz: {size:,} bytes, {ms} ms>"


def _padding(tail: str) -> int:
    """The `=` that end a base64 text, given its last two characters (valid base64 has at most two)."""
    return len(tail) - len(tail.rstrip("="))


def strip_audio(content: bytes) -> bytes | None:
    """The frame with its audio payload replaced by the placeholder; None when it carries none.

    Called for every frame of a session, so the type is read from the leading bytes and an audio
    string is cut out of the bytes; a frame is decoded only when its bytes are not plain enough.
    """
    kind = event_type(content)
    if kind is None:
        return _strip_decoded(content) if any(marker in content for marker in _AUDIO_TYPE_MARKERS) else None
    field = AUDIO_FIELDS.get(kind)
    if field is None:
        return None
    stripped = _strip_in_place(content, field)
    return stripped if stripped is not None else _strip_decoded(content)


def _strip_in_place(content: bytes, field: str) -> bytes | None:
    """Replace the audio string in the bytes; None unless the field is surely a top-level, unescaped string."""
    key = _AUDIO_KEYS[field].search(content)
    if key is None or content.count(b"{", 0, key.start() + 1) != 1 or content.find(b"[", 0, key.start()) >= 0:
        return None  # absent, or after a nested object or array: its key might not be the event's
    start = key.end()
    end = content.find(b'"', start)
    if end < 0 or content.find(b"\\", start, end) >= 0 or content.startswith(PLACEHOLDER_PREFIX.encode(), start):
        return None
    padding = _padding(content[max(start, end - 2) : end].decode("latin-1"))
    return b"".join((content[:start], _describe_audio(end - start, padding).encode(), content[end:]))


def _strip_decoded(content: bytes) -> bytes | None:
    event = decode_json(content)
    if isinstance(event, Malformed) or not replace_audio(event):
        return None
    try:
        return json.dumps(event, separators=(",", ":")).encode()
    except RecursionError:
        return None


def replace_audio(event: dict[str, Any]) -> bool:
    """Put a placeholder wherever the event carries audio; False when it carries none (or no longer)."""
    replaced = False
    for holder, key in _audio_slots(event):
        value = holder.get(key)
        if isinstance(value, str) and not value.startswith(PLACEHOLDER_PREFIX):
            holder[key] = audio_placeholder(value)
            replaced = True
    return replaced


def _audio_slots(event: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """Objects and keys that hold base64 audio: Realtime deltas and appends, Chat Completions audio chunks."""
    kind = event.get("type")
    if isinstance(kind, str) and kind in AUDIO_FIELDS:
        yield event, AUDIO_FIELDS[kind]
    choices = event.get("choices") if event.get("object") == COMPLETIONS_CHUNK else None
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        audio = delta.get("audio") if isinstance(delta, dict) else None
        if isinstance(audio, dict):
            yield audio, "data"


def shrink_audio(message: WebSocketMessage) -> None:
    if (stripped := strip_audio(message.content)) is not None:
        message.content = stripped


def parse_history(value: str, under_web: bool) -> int | None:
    """Messages to keep per WebSocket flow; None keeps all."""
    if value == "all" or (value == "auto" and under_web):
        return None
    if value == "auto":
        return 1
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"gateway_websocket_history: expected a positive number, 'all' or 'auto', got {value!r}")


def trim(messages: list[WebSocketMessage], keep: int | None) -> None:
    """Only the last `keep` messages stay (None: all)."""
    if keep is not None and len(messages) > keep:
        del messages[:-keep]
