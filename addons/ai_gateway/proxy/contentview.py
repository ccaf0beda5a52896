"""The mitmweb content view "OpenAI Realtime": Realtime events and OpenAI SSE streams made readable.

A voice session is mostly base64 audio (about 64 KB per second of speech), which buries the few
events a developer debugs. The view shows each event as JSON with its type first, each audio
payload as a one-line size, and under the events that carry usage the counts the gateway meters,
and under a response.done its turn's tokens, cost and latency. The placeholder is the one
proxy/history.py puts into the messages mitmproxy keeps.

The view "Gemini Live" does the same for Gemini Live messages (in text or binary frames): inline
audio as a one-line size, a `usageMetadata` tabled as the gateway meters it, and under a message
that ends a turn (`turnComplete`, or `interrupted`) that turn's tokens, cost and latency.

The view "Realtime conversation", on the handshake's response (the Response tab), shows a whole
Realtime, Gemini Live or GPT-Live session as turns: who spoke, what was said, tool calls,
interruptions, what each answer cost and how long it took (proxy/conversation.py keeps them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from mitmproxy import http
from mitmproxy.contentviews import Contentview, Metadata, SyntaxHighlight
from mitmproxy.utils import strutils

from ai_gateway.accounting.items import Malformed, ResponseDone, SessionTime, UsageItem
from ai_gateway.accounting.redaction import Redactor
from ai_gateway.accounting.usage import MODALITIES, DurationUsage, InvalidUsage, TokenUsage
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols.conversation import ASSISTANT, TOOL, USER, Conversation, Turn
from ai_gateway.protocols.gemini_live import INPUT_RATE, OUTPUT_RATE, audio_slots, describe_audio, parse_usage_metadata
from ai_gateway.protocols.json_events import decode_json, event_type
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS, read_completions_chunk, read_responses_event
from ai_gateway.protocols.openai_live import RESPONSE_EVENT, SESSION_CLOSED, USAGE_UPDATED, read_event
from ai_gateway.protocols.openai_realtime import (
    RESPONSE_DONE,
    TRANSCRIPTION_COMPLETED,
    InvalidEvent,
    read_response_done,
)
from ai_gateway.protocols.usage_fields import parse_realtime_usage, parse_transcription_usage
from ai_gateway.proxy.conversation import KIND_METADATA, KINDS, Conversations, kind_of, replay
from ai_gateway.proxy.history import COMPLETIONS_CHUNK, replace_audio
from ai_gateway.proxy.state import GatewayState

# Above JSON (1) and Raw (0.1): WebSocket messages have no content type for other views to claim them by.
PRIORITY = 2.0
HEXDUMP_BYTES = 4096

# Event type namespaces of the Realtime API and of the Responses API's stream and WebSocket mode.
_OPENAI_NAMESPACES = frozenset(
    {
        "conversation",
        "decision",  # GPT-Live's, as its session, response and transport events
        "error",
        "input_audio_buffer",
        "mcp_list_tools",
        "output_audio_buffer",
        "rate_limits",
        "response",
        "session",
        "transcription_session",
        "transport",
    }
)
# An OpenAI stream shows itself in its first data line: a Chat Completions chunk or a Responses event.
_OPENAI_SSE = re.compile(
    rb'^data: ?\{[^\n]*?(?:"object"\s*:\s*"chat\.completion\.chunk"|"type"\s*:\s*"response\.)', re.MULTILINE
)
_SSE_SNIFF_BYTES = 4096
_LIVE_SIDEBAND = re.compile(r"/live/sessions/[^/]+/attach\Z")


class RealtimeView(Contentview):
    """OpenAI Realtime WebSocket events and OpenAI SSE streams, with audio elided and usage tabled."""

    name = "OpenAI Realtime"
    syntax_highlight: SyntaxHighlight = "yaml"  # what mitmproxy's JSON view highlights with
    conversations: Conversations | None = None  # the gateway's, once loaded: each response.done's turn
    state: GatewayState | None = None  # the gateway's, once loaded: the policy's redaction

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
            flow = metadata.flow
            conversations = self.conversations
            redactor = self.state.redactor if self.state is not None else None
            return _render_frame(data, conversations.get(flow.id) if conversations and flow else None, redactor)
        except RecursionError:  # decoded, but nested too deeply to encode again
            return _unreadable(data, "nested too deeply")


def _websocket_flow(metadata: Metadata) -> http.HTTPFlow | None:
    """The flow, when the data is one of its WebSocket messages."""
    flow = metadata.flow
    if metadata.websocket_message is None or not isinstance(flow, http.HTTPFlow) or flow.websocket is None:
        return None
    return flow


def _is_openai_event(data: bytes) -> bool:
    kind = event_type(data)
    return kind is not None and kind.split(".", 1)[0] in _OPENAI_NAMESPACES


def _is_realtime_path(flow: http.HTTPFlow) -> bool:
    """A Realtime (or GPT-Live) socket's frames are all ours, including client events that put their type last."""
    path = flow.request.path.split("?", 1)[0].rstrip("/")
    return path.endswith(("/realtime", "/live/sessions")) or _LIVE_SIDEBAND.search(path) is not None


def _render_frame(data: bytes, conversation: Conversation | None = None, redactor: Redactor | None = None) -> str:
    """An event as shown: also a message not yet redacted in the history (the one being relayed) is
    shown redacted."""
    event = decode_json(data)
    if isinstance(event, Malformed):
        shown = data if redactor is None else redactor.redact(data.decode("utf-8", "replace")).encode()
        return _unreadable(shown, event.detail)
    replace_audio(event)
    text = _render_event(redactor.redact_value(event) if redactor is not None else event)
    turn = _answer(event, conversation) if conversation is not None else None
    return f"{text}\n{_banner('turn', [turn_summary(turn)])}" if turn is not None else text


def _render_event(event: dict[str, Any]) -> str:
    replace_audio(event)
    kind = event.get("type")
    shown = {"type": kind, **event} if "type" in event else event
    text = json.dumps(shown, indent=2, ensure_ascii=False)
    usage = _usage_block(event)
    return f"{text}\n\n{usage}" if usage else text


def _answer(event: dict[str, Any], conversation: Conversation) -> Turn | None:
    """The turn a response.done ends, or a GPT-Live delegation's final Responses event."""
    if event.get("type") == RESPONSE_EVENT and isinstance(event.get("event"), dict):
        event = event["event"]
        if event.get("type") not in RESPONSES_FINAL_EVENTS:
            return None
    elif event.get("type") != RESPONSE_DONE:
        return None
    response = event.get("response")
    if not isinstance(response, dict):
        return None
    response_id = response.get("id")
    return conversation.find(ASSISTANT, "response_id", response_id if isinstance(response_id, str) else None)


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
            if done.usage is None:  # counted as a response, billed nothing: say why
                return _banner(f"{RESPONSE_DONE}, {done.status}, not metered", [_unread_usage(event)])
            return _banner(f"{RESPONSE_DONE}, {done.status}", _usage_table(done.usage))
        if kind == TRANSCRIPTION_COMPLETED:
            return _banner("transcription", _transcription_lines(parse_transcription_usage(event.get("usage"))))
        if kind in (USAGE_UPDATED, SESSION_CLOSED):
            return _session_time(kind, read_event(event))
    except (InvalidEvent, InvalidUsage) as e:
        return _banner(f"{kind}, not metered", [str(e)])
    if kind == RESPONSE_EVENT and isinstance(event.get("event"), dict):
        event = event["event"]  # a Responses event GPT-Live delegated: billed as any
    billed = read_completions_chunk(event) if event.get("object") == COMPLETIONS_CHUNK else read_responses_event(event)
    if isinstance(billed, ResponseDone):
        title = f"{billed.response_model or 'model unknown'}, {billed.status}"
        if billed.usage is None:
            return _banner(f"{title}, not metered", [billed.unread or ""])
        return _banner(title, _usage_table(billed.usage))
    if isinstance(billed, Malformed):
        return _banner("not metered", [f"{billed.reason}: {billed.detail}"])
    return None


def _session_time(kind: str, item: UsageItem | None) -> str:
    """GPT-Live's cumulative session time: the gateway bills what it adds to the report before."""
    if not isinstance(item, SessionTime):
        return _banner(f"{kind}, not metered", [item.detail if isinstance(item, Malformed) else "no usage"])
    usage = item.usage
    title = "session time so far" if item.closed is None else f"session time, final ({item.closed})"
    return _banner(title, [f"{usage.seconds:g} s: {usage.active:g} active, {usage.paused:g} paused (cumulative)"])


def _unread_usage(event: dict[str, Any]) -> str:
    try:
        parse_realtime_usage(event["response"].get("usage"))
    except InvalidUsage as e:
        return str(e)
    return "no usage"


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


class ConversationView(Contentview):
    """A voice session as its turns, on the handshake's response: read before any event is opened."""

    name = "Realtime conversation"
    syntax_highlight: SyntaxHighlight = "none"
    conversations: Conversations | None = None  # the live sessions' turns; a flow read from a file is replayed
    state: GatewayState | None = None  # the gateway's, once loaded: the policy's redaction

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = metadata.flow
        if not isinstance(flow, http.HTTPFlow) or flow.websocket is None or metadata.websocket_message is not None:
            return 0
        return PRIORITY if metadata.http_message is flow.response and is_realtime_session(flow) else 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        flow = metadata.flow
        assert isinstance(flow, http.HTTPFlow) and flow.websocket is not None  # claimed by render_priority
        live = self.conversations.get(flow.id) if self.conversations is not None else None
        redactor = self.state.redactor if self.state is not None else None
        return render_conversation(live or replay(flow), live is not None, redactor)


class GeminiLiveView(Contentview):
    """Gemini Live messages with inline audio elided, usage tabled, and each turn's end summarised."""

    name = "Gemini Live"
    syntax_highlight: SyntaxHighlight = "yaml"
    conversations: Conversations | None = None
    state: GatewayState | None = None  # the policy's redaction in force

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = _websocket_flow(metadata)
        return PRIORITY if flow is not None and kind_of(flow) == WireProtocol.GEMINI_LIVE else 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        message = decode_json(data)
        if isinstance(message, Malformed):
            return _unreadable(data, message.detail)
        try:
            return self.render(message, metadata)
        except RecursionError:  # decoded, but nested too deeply to encode again
            return _unreadable(data, "nested too deeply")

    def render(self, message: dict[str, Any], metadata: Metadata) -> str:
        """The message as JSON, its audio as sizes; its usage tabled; the turn it ends, summarised."""
        from_client = metadata.websocket_message is not None and metadata.websocket_message.from_client
        for slot in audio_slots(message):
            slot["data"] = describe_audio(slot, INPUT_RATE if from_client else OUTPUT_RATE)
        if self.state is not None and self.state.redactor is not None:
            message = self.state.redactor.redact_value(message)
        blocks = [json.dumps(message, indent=2, ensure_ascii=False)]
        if "usageMetadata" in message:
            try:
                blocks.append(_banner("usageMetadata", _usage_table(parse_usage_metadata(message["usageMetadata"]))))
            except InvalidUsage as e:
                blocks.append(_banner("usageMetadata, not metered", [str(e)]))
        flow, at = metadata.flow, metadata.websocket_message.timestamp if metadata.websocket_message else None
        conversation = self.conversations.get(flow.id) if self.conversations is not None and flow else None
        if conversation is not None and (turn := conversation.find(ASSISTANT, "ended_at", at)) is not None:
            blocks.append(_banner("turn", [turn_summary(turn)]))
        return "\n\n".join(blocks)


def is_realtime_session(flow: http.HTTPFlow) -> bool:
    """A voice session the gateway reads as a conversation (what the conversation view and the export
    take): recorded as a Realtime, Gemini Live or GPT-Live one, or, saved before the gateway named
    its kind, a WebSocket flow on one of their paths."""
    if flow.websocket is None:
        return False
    if KIND_METADATA in flow.metadata:
        return flow.metadata[KIND_METADATA] in KINDS
    return kind_of(flow) != WireProtocol.OPENAI or _is_realtime_path(flow)


def render_conversation(conversation: Conversation, recorded: bool = True, redactor: Redactor | None = None) -> str:
    """The turns, one block each: when, who, what was said or called, what happened to it, its cost."""
    turns = conversation.turns
    header = [f"══ conversation: {len(turns):,} turn{'' if len(turns) == 1 else 's'} ══"]
    if conversation.dropped:
        header.append(f"(the {conversation.dropped:,} oldest turns dropped to stay within the caps)")
    if not recorded:
        header.append("(read from the kept messages: cost and timing were not recorded)")
    if not turns:
        return "\n".join([*header, "nobody has spoken yet and no response has started"])
    start = turns[0].at
    scrub = redactor.redact if redactor is not None else str
    blocks = []
    for turn in turns:
        lines = [f"[{clock(turn.at - start)}] {speaker(turn)}: {scrub(said(turn))}"]
        lines += [f"    → calls {c.name or '?'}({scrub(c.arguments)}) {c.call_id or ''}".rstrip() for c in turn.calls]
        lines += [f"    ! {scrub(note)}" for note in turn.notes]
        if turn.role == ASSISTANT and (turn.status is not None or turn.usage is not None):
            lines.append(f"    {turn_summary(turn)}")  # GPT-Live's speech has neither: it bills the session's time
        blocks.append("\n".join(lines))
    return "\n".join(header) + "\n\n" + "\n\n".join(blocks)


def turn_summary(turn: Turn) -> str:
    """An answer's status, tokens, cost and latency, as the meters measured them."""
    parts = [turn.status or "in_progress"]
    if (usage := turn.usage) is not None:
        output = usage.output or 0
        parts.append(
            f"{usage.input + output:,} tokens ({usage.input:,} in, {usage.cache_read or 0:,} cached, {output:,} out)"
        )
    if turn.cost is not None:
        parts.append(f"${turn.cost:,.4f}")
    if turn.ttft is not None:
        parts.append(f"TTFT {turn.ttft * 1000:,.0f} ms")
    if turn.turn_latency is not None:
        parts.append(f"voice turn {turn.turn_latency * 1000:,.0f} ms")
    if turn.duration is not None:
        parts.append(f"{turn.duration * 1000:,.0f} ms in all")
    return " · ".join(parts)


def speaker(turn: Turn) -> str:
    if turn.role == USER:
        return "user (voice)" if turn.voice else "user"
    if turn.role == TOOL:
        return f"tool result {turn.call_id or ''}".rstrip()
    return turn.role


def said(turn: Turn) -> str:
    if turn.text:
        return turn.text + (" …(cut)" if turn.clipped else "")
    if turn.role == USER:
        return "(speech, no transcript)"
    if turn.calls:
        return "(a tool call)"
    return "(cut before any transcript)" if turn.status == "cancelled" else "(nothing said)"


def clock(seconds: float) -> str:
    minutes, seconds = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


realtime_view = RealtimeView()
gemini_view = GeminiLiveView()
conversation_view = ConversationView()
