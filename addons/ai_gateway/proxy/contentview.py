"""The mitmweb content view "OpenAI Realtime": Realtime events and OpenAI SSE streams made readable.

A voice session is mostly base64 audio (about 64 KB per second of speech), which buries the few
events a developer debugs. The view shows each event as JSON with its type first, each audio
payload as a one-line size, and under the events that carry usage the counts the gateway meters.
`strip_audio` puts the same placeholder into the raw frame, so the addon can shrink the messages
mitmproxy keeps once they were forwarded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from mitmproxy import http
from mitmproxy.contentviews import Contentview, Metadata, SyntaxHighlight
from mitmproxy.utils import strutils

from ai_gateway.accounting.usage import (
    MODALITIES,
    DurationUsage,
    InvalidUsage,
    TokenUsage,
    parse_transcription_usage,
)
from ai_gateway.protocols.openai_http import Billed, decode_json, read_completions_chunk, read_responses_event
from ai_gateway.protocols.openai_realtime import (
    RESPONSE_DONE,
    TRANSCRIPTION_COMPLETED,
    InvalidEvent,
    Malformed,
    leading_type,
    read_response_done,
)

# The field holding base64 PCM16 audio, per event type (beta and GA names; the client's append).
AUDIO_FIELDS: dict[str, str] = {
    "response.output_audio.delta": "delta",
    "response.audio.delta": "delta",
    "input_audio_buffer.append": "audio",
}
PLACEHOLDER_PREFIX = "<audio "
# The Realtime default format: 24 kHz mono 16-bit PCM, 48 bytes per millisecond.
BYTES_PER_MS = 48
# Above JSON (1) and Raw (0.1): WebSocket messages have no content type for other views to claim them by.
PRIORITY = 2.0
COMPLETIONS_CHUNK = "chat.completion.chunk"
HEXDUMP_BYTES = 4096

# Event type namespaces of the Realtime API and of the Responses API's stream and WebSocket mode.
_OPENAI_NAMESPACES = frozenset(
    {
        "conversation",
        "error",
        "input_audio_buffer",
        "mcp_list_tools",
        "output_audio_buffer",
        "rate_limits",
        "response",
        "session",
        "transcription_session",
    }
)
# A top-level key, recognisable without decoding: inside a JSON string `"` is always escaped, so
# `{` or `,` then `"key"` can only open a member name.
_AUDIO_KEYS = {field: re.compile(rb'[{,]\s*"' + field.encode() + rb'"\s*:\s*"') for field in set(AUDIO_FIELDS.values())}
# For frames that do not start with their type: only these can be audio events worth decoding.
_AUDIO_TYPE_MARKERS = tuple(f'"{kind}"'.encode() for kind in AUDIO_FIELDS)
# An OpenAI stream shows itself in its first data line: a Chat Completions chunk or a Responses event.
_OPENAI_SSE = re.compile(
    rb'^data: ?\{[^\n]*?(?:"object"\s*:\s*"chat\.completion\.chunk"|"type"\s*:\s*"response\.)', re.MULTILINE
)
_SSE_SNIFF_BYTES = 4096


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
    kind = leading_type(content)
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
    if isinstance(event, Malformed) or not _replace_audio(event):
        return None
    try:
        return json.dumps(event, separators=(",", ":")).encode()
    except RecursionError:
        return None


def _replace_audio(event: dict[str, Any]) -> bool:
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


class RealtimeView(Contentview):
    """OpenAI Realtime WebSocket events and OpenAI SSE streams, with audio elided and usage tabled."""

    name = "OpenAI Realtime"
    syntax_highlight: SyntaxHighlight = "yaml"  # what mitmproxy's JSON view highlights with

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """Claim OpenAI events on WebSockets and OpenAI streams, read from the first bytes only."""
        if metadata.content_type == "text/event-stream":
            return PRIORITY if _OPENAI_SSE.search(data, 0, _SSE_SNIFF_BYTES) else 0
        flow = _websocket_flow(metadata)
        return PRIORITY if flow is not None and (_is_openai_event(data) or _is_realtime_path(flow)) else 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        try:
            if metadata.content_type == "text/event-stream":
                return _render_stream(data)
            return _render_frame(data)
        except RecursionError:  # decoded, but nested too deeply to encode again
            return _unreadable(data, "nested too deeply")


def _websocket_flow(metadata: Metadata) -> http.HTTPFlow | None:
    """The flow, when the data is one of its WebSocket messages."""
    flow = metadata.flow
    if metadata.websocket_message is None or not isinstance(flow, http.HTTPFlow) or flow.websocket is None:
        return None
    return flow


def _is_openai_event(data: bytes) -> bool:
    kind = leading_type(data)
    return kind is not None and kind.split(".", 1)[0] in _OPENAI_NAMESPACES


def _is_realtime_path(flow: http.HTTPFlow) -> bool:
    """A Realtime socket's frames are all ours, including client events that put their type last."""
    return flow.request.path.split("?", 1)[0].rstrip("/").endswith("/realtime")


def _render_frame(data: bytes) -> str:
    event = decode_json(data)
    return _unreadable(data, event.detail) if isinstance(event, Malformed) else _render_event(event)


def _render_event(event: dict[str, Any]) -> str:
    _replace_audio(event)
    kind = event.get("type")
    shown = {"type": kind, **event} if "type" in event else event
    text = json.dumps(shown, indent=2, ensure_ascii=False)
    usage = _usage_block(event)
    return f"{text}\n\n{usage}" if usage else text


def _render_stream(data: bytes) -> str:
    blocks = [_render_sse_event(name, payload) for name, payload in _sse_events(data)]
    return "\n\n".join(blocks) if blocks else _unreadable(data, "no server-sent events")


def _sse_events(data: bytes) -> Iterator[tuple[str | None, bytes]]:
    """(event name, data) of each event with data; comments and retry hints carry nothing to show."""
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.split(b"\n")
        payload = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
        names = [line[6:].strip().decode("utf-8", "replace") for line in lines if line.startswith(b"event:")]
        if payload:
            yield (names[-1] if names else None), payload


def _render_sse_event(name: str | None, payload: bytes) -> str:
    if payload == b"[DONE]":
        return "── [DONE] ──"
    event = decode_json(payload)
    if isinstance(event, Malformed):
        return f"── {name or 'event'} ──\n{_unreadable(payload, event.detail)}"
    label = name or event.get("type") or event.get("object") or "event"
    return f"── {label} ──\n{_render_event(event)}"


def _unreadable(data: bytes, reason: str) -> str:
    """Not an event: say why, then show what it is, as text when it reads as text."""
    if not strutils.is_mostly_bin(data):
        return f"(not an OpenAI event: {reason})\n{data.decode('utf-8', 'backslashreplace')}"
    shown = data[:HEXDUMP_BYTES]
    rows = "\n".join(f"{offset} {hexes} {text}" for offset, hexes, text in strutils.hexdump(shown))
    more = f", first {len(shown):,} of {len(data):,} bytes" if len(shown) < len(data) else ""
    return f"(not an OpenAI event: {reason}; binary{more})\n{rows}"


def _usage_block(event: dict[str, Any]) -> str | None:
    """The usage this event bills, as the gateway reads it: strictly, so a rejected object says why."""
    kind = event.get("type")
    try:
        if kind == RESPONSE_DONE:
            done = read_response_done(event)
            return _banner(f"{RESPONSE_DONE}, {done.status}", _usage_table(done.usage))
        if kind == TRANSCRIPTION_COMPLETED:
            return _banner("transcription", _transcription_lines(parse_transcription_usage(event.get("usage"))))
    except (InvalidEvent, InvalidUsage) as e:
        return _banner(f"{kind}, not metered", [str(e)])
    billed = read_completions_chunk(event) if event.get("object") == COMPLETIONS_CHUNK else read_responses_event(event)
    if isinstance(billed, Billed):
        return _banner(f"{billed.response_model or 'model unknown'}, {billed.status}", _usage_table(billed.usage))
    if isinstance(billed, Malformed):
        return _banner("not metered", [f"{billed.reason}: {billed.detail}"])
    return None


def _transcription_lines(usage: TokenUsage | DurationUsage) -> list[str]:
    if isinstance(usage, DurationUsage):
        return [f"{usage.seconds:g} s of audio, billed by duration"]
    return _usage_table(usage)


def _banner(title: str, lines: list[str]) -> str:
    return "\n".join([f"══ usage: {title} ══", *lines])


def _usage_table(usage: TokenUsage) -> list[str]:
    """Token counts with their modality splits; only the modalities the upstream reported get a column."""
    rows = [
        ("input", usage.input, dict(usage.input_by_modality)),
        ("  cached", usage.cache_read, dict(usage.cache_read_by_modality)),
        ("output", usage.output, dict(usage.output_by_modality)),
        ("  reasoning", usage.reasoning, {}),
    ]
    rows = [row for row in rows if row[1] is not None or row[2]]
    modalities = [m for m in MODALITIES if any(m in split for _, _, split in rows)]
    cells = [["", "total", *modalities]]
    cells += [[label, _count(total), *(_count(split.get(m)) for m in modalities)] for label, total, split in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


realtime_view = RealtimeView()
