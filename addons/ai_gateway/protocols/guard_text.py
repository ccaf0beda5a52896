"""The text guardrails check, read from the wire: user text and transcribed speech, the model's
text and transcript deltas (cut into windows), and the size of the audio that went with them.

Streamed output is checked a window at a time, never per delta: a window closes at a sentence's
end, or once MAX_WINDOW characters are pending without one. Each window is checked together with
the (normalised) tail of the text before it, so a phrase cut in two by a window's edge is still
seen whole; a match that lies entirely in that tail was reported by the window before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ai_gateway.accounting.items import ResponseDone, ResponseStarted, UsageItem
from ai_gateway.config.guardrails import normalise
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.gemini_live import MEDIA_HEAD
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, event_type, read_event
from ai_gateway.protocols.openai_realtime import AUDIO_DELTAS, ITEM_CREATE

MAX_WINDOW = 160  # characters of streamed output checked at most at once
CARRY = 160  # characters of the checked text carried into the next window
PCM16_BYTES_PER_MS = 48  # 24 kHz mono 16-bit: the Realtime API's default audio
MS_PER_BASE64_CHAR = 3 / 4 / PCM16_BYTES_PER_MS  # four base64 characters carry three bytes
# The end of a sentence: its punctuation followed by a space, or at the end of what arrived so far.
_SENTENCE_END = re.compile(r"[.!?…。！？\n](?=\s|$)")

TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.output_audio_transcript.delta",
        "response.text.delta",  # beta
        "response.audio_transcript.delta",  # beta
    }
)
TEXT_DONES = frozenset(
    {
        "response.output_text.done",
        "response.output_audio_transcript.done",
        "response.text.done",
        "response.audio_transcript.done",
    }
)
RESPONSE_CREATED, RESPONSE_DONE = "response.created", "response.done"
_RESPONSE_ID = re.compile(rb'"response_id"\s*:\s*"([^"\\]{1,128})"')


class Window:
    """One response's streamed text, cut into the windows its guards check."""

    def __init__(self) -> None:
        self.pending = ""
        self.carry = ""

    def feed(self, text: str) -> list[tuple[str, int]]:
        """The windows `text` completes, each as (normalised text, where its new part starts)."""
        self.pending += text
        windows = []
        while (cut := cut_point(self.pending)) is not None:
            windows.append(self.close(self.pending[:cut]))
            self.pending = self.pending[cut:]
        return windows

    def flush(self) -> list[tuple[str, int]]:
        """What is pending, at the end of the text."""
        rest, self.pending = self.pending, ""
        return [self.close(rest)] if rest.strip() else []

    def close(self, chunk: str) -> tuple[str, int]:
        window = self.carry + normalise(chunk)
        start, self.carry = len(self.carry), window[-CARRY:]
        return window, start


def cut_point(text: str) -> int | None:
    """Where the next window ends: after the last sentence end within MAX_WINDOW characters, else
    at MAX_WINDOW once that much is pending; None while a sentence is still being spoken."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, MAX_WINDOW)]
    if ends:
        return ends[-1]
    return MAX_WINDOW if len(text) >= MAX_WINDOW else None


# Realtime events guardrails read.


@dataclass(frozen=True, slots=True)
class UserText:
    """A user message the client adds (conversation.item.create); text is "" when it has none."""

    text: str
    unread: bool = False  # too large to decode: relayed unchecked


@dataclass(frozen=True, slots=True)
class Transcript:
    item_id: str | None
    text: str


@dataclass(frozen=True, slots=True)
class OutputText:
    response_id: str | None
    item_id: str | None
    text: str


@dataclass(frozen=True, slots=True)
class OutputEnd:
    """A response's text is complete (a text or transcript .done, or response.done)."""

    response_id: str | None
    finished: bool  # response.done: the response is over


@dataclass(frozen=True, slots=True)
class OutputAudio:
    response_id: str | None
    milliseconds: float


@dataclass(frozen=True, slots=True)
class Started:
    response_id: str | None


GuardEvent = UserText | Transcript | OutputText | OutputEnd | OutputAudio | Started


def client_event(content: bytes) -> UserText | None:
    """A user message added by the client, with the text of its input_text (or text) parts."""
    event = read_event(content, (ITEM_CREATE,), MAX_CLIENT_EVENT_BYTES)
    if event is None or not event.may_be(ITEM_CREATE):
        return None
    if event.too_large:
        return UserText("", unread=True)
    item = event.members.get("item")
    if not isinstance(item, dict) or item.get("role", "user") != "user":
        return None
    return UserText(content_text(item.get("content")))


def content_text(parts: Any) -> str:
    """The text of a message's content: a string, or a list of parts with `text` (input_text,
    text, output_text) or a `transcript`."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        return ""
    texts = []
    for part in parts:
        if isinstance(part, dict):
            value = part.get("text", part.get("transcript"))
            if isinstance(value, str):
                texts.append(value)
    return "\n".join(texts)


def server_event(content: bytes, kind: str | None = None, item: UsageItem | None = None) -> GuardEvent | None:
    """What a server frame means to guardrails; audio deltas are measured, never decoded. `kind` and
    `item`: what metering read the frame as (RealtimeProtocol), so that a response's start and end,
    which metering decodes, are not decoded again."""
    kind = kind if kind is not None else event_type(content)
    if isinstance(item, ResponseStarted) and kind == RESPONSE_CREATED:
        return Started(item.response_id)
    if isinstance(item, ResponseDone) and kind == RESPONSE_DONE:
        return OutputEnd(item.response_id, finished=True)
    if kind in AUDIO_DELTAS:
        return OutputAudio(response_id(content), audio_milliseconds(content))
    if kind not in TEXT_DELTAS and kind not in TEXT_DONES and kind not in _DECODED:
        return None
    event = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
    if not isinstance(event, dict):
        return None
    if kind in TEXT_DELTAS:
        delta = event.get("delta")
        return OutputText(_string(event.get("response_id")), _string(event.get("item_id")), _text(delta))
    if kind in TEXT_DONES:
        return OutputEnd(_string(event.get("response_id")), finished=False)
    if kind == TRANSCRIPTION_COMPLETED:
        return Transcript(_string(event.get("item_id")), _text(event.get("transcript")))
    response = event.get("response")
    rid = _string(response.get("id")) if isinstance(response, dict) else None
    return Started(rid) if kind == RESPONSE_CREATED else OutputEnd(rid, finished=True)


_DECODED = frozenset({TRANSCRIPTION_COMPLETED, RESPONSE_CREATED, RESPONSE_DONE})


def response_id(content: bytes) -> str | None:
    """A delta's response id, read near its start (OpenAI puts it before the payload)."""
    match = _RESPONSE_ID.search(content, 0, 512)
    return match.group(1).decode(errors="replace") if match else None


def audio_milliseconds(content: bytes) -> float:
    """The audio an audio delta carries (24 kHz PCM16), from the length of its base64, never decoded."""
    return base64_length(content) * MS_PER_BASE64_CHAR


def base64_length(content: bytes) -> int:
    """The length of a delta's `delta` string, found without decoding the frame."""
    key = content.find(b'"delta"')
    opening = content.find(b'"', key + 7) if key >= 0 else -1
    closing = content.find(b'"', opening + 1) if opening >= 0 else -1
    return closing - opening - 1 if closing >= 0 else 0


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


# HTTP: the user's messages in a request, the model's text in a response and in its SSE stream.

GUARDED_HTTP = frozenset({RouteType.COMPLETIONS, RouteType.RESPONSES, RouteType.TEXT_COMPLETIONS})


def request_text(route_type: RouteType, body: bytes) -> str:
    """What the user asks: Chat's user messages, the Responses API's `input` (a string, or its user
    messages), legacy Completions' `prompt`. Other roles (system, assistant, tools) are the
    application's, not the user's."""
    document = decode_json(body)
    if not isinstance(document, dict):
        return ""
    if route_type is RouteType.TEXT_COMPLETIONS:
        prompt = document.get("prompt")
        return "\n".join(p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str))
    messages = document.get("messages" if route_type is RouteType.COMPLETIONS else "input")
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        return ""
    return "\n".join(
        content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role", "user") == "user"
    )


def response_text(route_type: RouteType, body: bytes) -> str:
    """The model's text in a whole response: Chat's message contents, the Responses API's
    output_text parts, legacy Completions' choices."""
    document = decode_json(body)
    if not isinstance(document, dict):
        return ""
    if route_type is RouteType.RESPONSES:
        output = document.get("output")
        items = output if isinstance(output, list) else []
        messages = [i for i in items if isinstance(i, dict) and i.get("type") == "message"]
        return "\n".join(content_text(m.get("content")) for m in messages)
    choices = document.get("choices")
    texts = []
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            texts.append(text if isinstance(text, str) else "")
    return "\n".join(texts)


class SseText:
    """The model's text deltas in an (uncompressed) SSE stream, as its chunks pass."""

    def __init__(self, route_type: RouteType) -> None:
        self.route_type = route_type
        self.buffer = b""

    def feed(self, chunk: bytes) -> str:
        self.buffer = (self.buffer + chunk).replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        return "".join(self.delta(event) for event in events)

    def delta(self, event: bytes) -> str:
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        document = decode_json(data) if data and data != b"[DONE]" else None
        if not isinstance(document, dict):
            return ""
        if self.route_type is RouteType.RESPONSES:
            return _text(document.get("delta")) if document.get("type") == "response.output_text.delta" else ""
        choices = document.get("choices")
        texts = []
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                texts.append(_text(delta.get("content") if isinstance(delta, dict) else choice.get("text")))
        return "".join(texts)


def sse_error(route_type: RouteType, code: str, message: str) -> bytes:
    """The event that ends a blocked stream, as each API reports an error mid-stream (the OpenAI
    SDKs raise it as an APIError)."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    if route_type is RouteType.RESPONSES:
        event = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


# Gemini Live: the user's text and speech transcript, the model's text parts and speech transcript.

LIVE_AUDIO_BYTES_PER_MS = 48  # the Live API's output audio: 24 kHz mono 16-bit PCM
_LIVE_CLIENT_KEYS = (b'"clientContent"', b'"client_content"', b'"realtimeInput"', b'"realtime_input"')
_LIVE_SERVER_KEYS = (b'"text"', b'"turnComplete"', b'"interrupted"', b'"generationComplete"')
_LIVE_TURN_ENDS = ("turnComplete", "interrupted", "generationComplete")


@dataclass(frozen=True, slots=True)
class LiveOutput:
    """What a Gemini Live server message holds for guards."""

    text: str = ""  # the model's text parts
    spoken: str = ""  # outputTranscription: the model's speech, transcribed
    heard: str = ""  # inputTranscription: the user's speech, transcribed
    audio_ms: float = 0.0  # the model's audio in this message
    turn_over: bool = False  # generationComplete, turnComplete or interrupted


def live_client_text(content: bytes) -> str:
    """The user's text in a Live client message: `clientContent.turns[].parts[].text` (user turns)
    and `realtimeInput.text`; "" for anything else (setup, audio, tool responses), read without
    decoding when no such key is in it."""
    if not any(key in content for key in _LIVE_CLIENT_KEYS):
        return ""
    message = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
    if not isinstance(message, dict):
        return ""
    texts = []
    client = _member(message, "clientContent")
    turns = _member(client, "turns") if isinstance(client, dict) else None
    for turn in turns if isinstance(turns, list) else [turns]:
        if isinstance(turn, dict) and turn.get("role", "user") == "user":
            texts.append(_parts_text(turn.get("parts"), "\n"))
    realtime = _member(message, "realtimeInput")
    if isinstance(realtime, dict):
        texts.append(_text(realtime.get("text")))
    return "\n".join(t for t in texts if t)


def live_server_event(content: bytes) -> LiveOutput | None:
    """What a Live server message means to guards; an audio message is measured without decoding
    it (MEDIA_HEAD), unless a key guards read follows its data."""
    head = MEDIA_HEAD.match(content)
    if head is not None:
        end = content.find(b'"', head.end())
        audio_ms = max(end - head.end(), 0) * 3 / 4 / LIVE_AUDIO_BYTES_PER_MS
        if end >= 0 and not any(key in content[end:] for key in _LIVE_SERVER_KEYS):
            return LiveOutput(audio_ms=audio_ms)
    elif not any(key in content for key in _LIVE_SERVER_KEYS):
        return None
    message = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES * 16)
    server = message.get("serverContent") if isinstance(message, dict) else None
    if not isinstance(server, dict):
        return None
    turn = server.get("modelTurn")
    parts = turn.get("parts") if isinstance(turn, dict) else None
    audio = 0
    for part in parts if isinstance(parts, list) else []:
        data = part.get("inlineData") if isinstance(part, dict) else None
        if isinstance(data, dict) and str(data.get("mimeType", "")).startswith("audio/"):
            audio += len(_text(data.get("data")))
    return LiveOutput(
        text=_parts_text(parts, "", thoughts=False),
        spoken=_transcription(server.get("outputTranscription")),
        heard=_transcription(server.get("inputTranscription")),
        audio_ms=audio * 3 / 4 / LIVE_AUDIO_BYTES_PER_MS,
        turn_over=any(server.get(key) is True for key in _LIVE_TURN_ENDS),
    )


def _member(message: Any, name: str) -> Any:
    """A member by its JSON name or its proto name (`clientContent`, `client_content`): Google accepts both."""
    if not isinstance(message, dict):
        return None
    return message.get(name, message.get(re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)))


def _parts_text(parts: Any, separator: str, thoughts: bool = True) -> str:
    """The text of a Content's parts (a model's thought summaries left out when `thoughts` is False)."""
    if not isinstance(parts, list):
        return ""
    return separator.join(
        _text(p.get("text")) for p in parts if isinstance(p, dict) and (thoughts or p.get("thought") is not True)
    )


def _transcription(value: Any) -> str:
    return _text(value.get("text")) if isinstance(value, dict) else ""
