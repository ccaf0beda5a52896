"""A Realtime session as a conversation: who spoke, what was said, what each answer cost.

A voice session is hundreds of events per turn, mostly audio and word-sized deltas; a person
debugging it wants the turns. `Conversation` folds the few events that say what happened (the
user's transcript, the model's transcript or text joined from its deltas, tool calls and their
results, barge-ins, cancels, truncations, errors) into a turn list, and takes each finished
response's usage, cost and timing from the meter's `ResponseRecord`, so that nothing the meters
measure is measured twice. It is bounded whatever the session's length: at most MAX_TURNS turns
and MAX_CHARS characters of text, the oldest turns dropped first, each text cut at MAX_TURN_CHARS,
and ids, notes and tool calls each capped.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ai_gateway.accounting.observer import ResponseRecord
from ai_gateway.accounting.usage import InvalidUsage, TokenUsage
from ai_gateway.protocols.usage_fields import parse_realtime_usage

MAX_TURNS = 200
MAX_TURN_CHARS = 2_000
MAX_CHARS = 100_000
MAX_CALLS = 16  # per response
MAX_NOTES = 8  # per turn: a client cancelling one response a thousand times adds one note, not a thousand
MAX_ID_CHARS = 128  # of an id or a tool's name, as hostile upstreams may send any length
ELLIPSIS = " …"

USER, ASSISTANT, TOOL, ERROR = "user", "assistant", "tool", "error"

SPEECH_STARTED = "input_audio_buffer.speech_started"
COMMITTED = "input_audio_buffer.committed"
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
TRANSCRIPTION_FAILED = "conversation.item.input_audio_transcription.failed"
RESPONSE_CREATED = "response.created"
RESPONSE_DONE = "response.done"
ITEM_ADDED = "response.output_item.added"
ARGUMENTS_DELTA = "response.function_call_arguments.delta"
ARGUMENTS_DONE = "response.function_call_arguments.done"
TRUNCATED = "conversation.item.truncated"
ERROR_EVENT = "error"
CANCEL = "response.cancel"
ITEM_CREATE = "conversation.item.create"
# The model's words as they stream (GA and beta names), and the events that carry them whole.
TEXT_DELTAS = frozenset(
    {
        "response.output_audio_transcript.delta",
        "response.audio_transcript.delta",
        "response.output_text.delta",
        "response.text.delta",
    }
)
TEXT_DONE = {
    "response.output_audio_transcript.done": "transcript",
    "response.audio_transcript.done": "transcript",
    "response.output_text.done": "text",
    "response.text.done": "text",
}
SERVER_EVENTS = frozenset(
    {
        SPEECH_STARTED,
        COMMITTED,
        TRANSCRIBED,
        TRANSCRIPTION_FAILED,
        RESPONSE_CREATED,
        RESPONSE_DONE,
        ITEM_ADDED,
        ARGUMENTS_DELTA,
        ARGUMENTS_DONE,
        TRUNCATED,
        ERROR_EVENT,
        *TEXT_DELTAS,
        *TEXT_DONE,
    }
)
CLIENT_EVENTS = frozenset({CANCEL, ITEM_CREATE})


@dataclass(slots=True)
class ToolCall:
    name: str | None
    call_id: str | None
    item_id: str | None
    arguments: str = ""


@dataclass(slots=True)
class Turn:
    """One turn: the user's speech or text, an answer (with its tool calls), a tool's result, an error."""

    role: str
    at: float  # when its first event passed the gateway (time.time())
    text: str = ""
    voice: bool = False  # the user spoke (the text is the transcript), or the answer was audio
    item_id: str | None = None  # the user's audio item, the answer's output item
    response_id: str | None = None
    call_id: str | None = None  # a tool result's call
    status: str | None = None  # an answer's: in_progress until response.done
    calls: list[ToolCall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # interruptions, cancels, truncations
    usage: TokenUsage | None = None
    cost: float | None = None
    ttft: float | None = None
    turn_latency: float | None = None
    duration: float | None = None
    clipped: bool = False  # its text was cut at MAX_TURN_CHARS

    @property
    def chars(self) -> int:
        return len(self.text) + sum(len(call.arguments) for call in self.calls)


class Conversation:
    """The turn list of one session, fed its events in the order they passed the gateway."""

    def __init__(self) -> None:
        self.turns: deque[Turn] = deque()
        self.dropped = 0  # turns dropped to stay within MAX_TURNS and MAX_CHARS
        self.chars = 0

    def server_event(self, event: dict[str, Any], at: float) -> None:
        """An upstream event; types outside SERVER_EVENTS are ignored."""
        kind = event.get("type")
        response_id = _string(event.get("response_id"))
        if kind in TEXT_DELTAS or kind in TEXT_DONE:
            if turn := self.answer(response_id, at):
                turn.item_id = turn.item_id or _string(event.get("item_id"))  # the item a truncation names
                if kind in TEXT_DONE:
                    self.replace_text(turn, _text(event.get(TEXT_DONE[kind])))
                else:
                    self.add_text(turn, _text(event.get("delta")))
        elif kind == SPEECH_STARTED:
            self.interrupt()
            self.user(_string(event.get("item_id")), at)
        elif kind == COMMITTED:
            self.user(_string(event.get("item_id")), at)
        elif kind == TRANSCRIBED:
            self.replace_text(self.user(_string(event.get("item_id")), at), _text(event.get("transcript")))
        elif kind == TRANSCRIPTION_FAILED:
            _note(self.user(_string(event.get("item_id")), at), f"transcription failed: {_error(event)}")
        elif kind == RESPONSE_CREATED:
            self.answer(_string(_object(event, "response").get("id")), at)
        elif kind == RESPONSE_DONE:
            self.response_done(_object(event, "response"), at)
        elif kind == ITEM_ADDED:
            item = _object(event, "item")
            if (turn := self.answer(response_id, at)) is None:
                return
            if item.get("type") == "function_call":
                self.call(turn, item)
            elif item.get("type") == "message":
                turn.item_id = turn.item_id or _string(item.get("id"))
        elif kind in (ARGUMENTS_DELTA, ARGUMENTS_DONE):
            self.arguments(event, at)
        elif kind == TRUNCATED:
            self.truncated(event)
        elif kind == ERROR_EVENT:
            self.add_text(self.append(Turn(ERROR, at)), _error(event))

    def client_event(self, event: dict[str, Any], at: float) -> None:
        """A client event: a cancel (the barge-in a client makes itself), an item it adds."""
        kind = event.get("type")
        if kind == CANCEL:
            turn = self.find(ASSISTANT, "response_id", _string(event.get("response_id"))) or self.in_progress()
            if turn is not None:
                _note(turn, "cancelled by the client")
        elif kind == ITEM_CREATE:
            item = _object(event, "item")
            if item.get("type") == "function_call_output":
                turn = Turn(TOOL, at, call_id=_string(item.get("call_id")), item_id=_string(item.get("id")))
                self.add_text(self.append(turn), str(item.get("output", "")))
            elif item.get("type") == "message" and item.get("role") == "user":
                self.add_text(self.append(Turn(USER, at, item_id=_string(item.get("id")))), _message_text(item))

    def priced(self, record: ResponseRecord) -> None:
        """What the meter made of a finished response: its usage, cost and timing."""
        turn = self.find(ASSISTANT, "response_id", record.response_id)
        if turn is not None:
            turn.usage, turn.cost = record.usage or turn.usage, record.cost
            turn.ttft, turn.turn_latency, turn.duration = record.ttft, record.turn_latency, record.duration

    def response_done(self, response: dict[str, Any], at: float) -> None:
        turn = self.answer(_string(response.get("id")), at)
        if turn is None:
            return
        turn.status = _string(response.get("status")) or "other"
        with contextlib.suppress(InvalidUsage):  # counted as unread by the meter; the turn shows no tokens
            turn.usage = turn.usage or parse_realtime_usage(response.get("usage"))
        output = response.get("output")
        for item in output if isinstance(output, list) else ():
            if isinstance(item, dict) and item.get("type") == "function_call":
                self.call(turn, item)

    def user(self, item_id: str | None, at: float) -> Turn:
        """The user's turn of this audio item, begun when speech started or the audio was committed."""
        turn = self.find(USER, "item_id", item_id)
        return turn or self.append(Turn(USER, at, voice=True, item_id=item_id))

    def answer(self, response_id: str | None, at: float) -> Turn | None:
        """The model's turn of this response; None for events that name no response."""
        if response_id is None:
            return None
        turn = self.find(ASSISTANT, "response_id", response_id)
        return turn or self.append(Turn(ASSISTANT, at, response_id=response_id, status="in_progress"))

    def call(self, turn: Turn, item: dict[str, Any]) -> ToolCall | None:
        call_id, item_id = _string(item.get("call_id")), _string(item.get("id"))
        call = next((c for c in turn.calls if c.call_id == call_id or (item_id and c.item_id == item_id)), None)
        if call is None and len(turn.calls) < MAX_CALLS:
            call = ToolCall(_string(item.get("name")), call_id, item_id)
            turn.calls.append(call)
        if call is not None and isinstance(arguments := item.get("arguments"), str) and arguments:
            clipped = _clip(arguments)
            self.grow(len(clipped) - len(call.arguments))
            call.arguments = clipped
        return call

    def arguments(self, event: dict[str, Any], at: float) -> None:
        turn = self.answer(_string(event.get("response_id")), at)
        if turn is None:
            return
        fields = {"call_id": event.get("call_id"), "id": event.get("item_id"), "name": event.get("name")}
        call = self.call(turn, fields)
        if call is None:
            return
        if event.get("type") == ARGUMENTS_DONE:
            self.call(turn, {**fields, "arguments": event.get("arguments")})
            call.name = call.name or _string(event.get("name"))
        elif (delta := _text(event.get("delta"))) and len(call.arguments) < MAX_TURN_CHARS:
            piece = delta[: MAX_TURN_CHARS - len(call.arguments)]
            call.arguments += piece
            self.grow(len(piece))

    def interrupt(self) -> None:
        """The user spoke over an answer still streaming: a barge-in."""
        if (turn := self.in_progress()) is not None:
            _note(turn, "interrupted: the user spoke")

    def truncated(self, event: dict[str, Any]) -> None:
        """The client cut an answer's audio where its user stopped hearing it. An answer whose item
        was never named (cut before its first transcript delta, by an upstream that announces no
        output items) is taken to be the latest such answer."""
        turn = self.find(ASSISTANT, "item_id", _string(event.get("item_id")))
        turn = turn or next((t for t in reversed(self.turns) if t.role == ASSISTANT and t.item_id is None), None)
        if turn is not None and isinstance(end := event.get("audio_end_ms"), int):
            _note(turn, f"truncated at {end:,} ms of audio (what the user heard)")

    def in_progress(self) -> Turn | None:
        return next((t for t in reversed(self.turns) if t.role == ASSISTANT and t.status == "in_progress"), None)

    def find(self, role: str, key: str, value: str | None) -> Turn | None:
        """The latest turn of this role whose `key` is `value` (the list is short: MAX_TURNS)."""
        if value is None:
            return None
        return next((t for t in reversed(self.turns) if t.role == role and getattr(t, key) == value), None)

    def append(self, turn: Turn) -> Turn:
        self.turns.append(turn)
        self.evict()
        return turn

    def add_text(self, turn: Turn, text: str) -> None:
        room = max(0, MAX_TURN_CHARS - len(turn.text))
        if len(text) > room:
            turn.clipped = True
        turn.text += text[:room]
        self.grow(min(room, len(text)))

    def replace_text(self, turn: Turn, text: str) -> None:
        """The event that carries the whole text is the authority over the deltas joined."""
        before = len(turn.text)
        turn.text, turn.clipped = _clip(text), len(text) > MAX_TURN_CHARS
        self.grow(len(turn.text) - before)

    def grow(self, chars: int) -> None:
        self.chars += chars
        self.evict()

    def evict(self) -> None:
        """Oldest turns first, never the newest, until both caps hold."""
        while len(self.turns) > 1 and (len(self.turns) > MAX_TURNS or self.chars > MAX_CHARS):
            self.chars -= self.turns.popleft().chars
            self.dropped += 1


def _note(turn: Turn, note: str) -> None:
    """A note once, up to MAX_NOTES per turn; error texts in it are clipped already."""
    if note not in turn.notes and len(turn.notes) < MAX_NOTES:
        turn.notes.append(note[:MAX_TURN_CHARS])


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TURN_CHARS else text[:MAX_TURN_CHARS]


def _object(event: dict[str, Any], key: str) -> dict[str, Any]:
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def _string(value: Any) -> str | None:
    """An id or a name, clipped: never the whole of a hostile upstream's megabyte string."""
    return value[:MAX_ID_CHARS] if isinstance(value, str) and value else None


def _text(value: Any) -> str:
    """Words or arguments: whole here, clipped where they are kept."""
    return value if isinstance(value, str) else ""


def _error(event: dict[str, Any]) -> str:
    error = _object(event, "error")
    code, message = _string(error.get("code")) or _string(error.get("type")), _text(error.get("message"))
    return _clip(": ".join(part for part in (code, message) if part) or "error")


def _message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    parts = content if isinstance(content, list) else ()
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
