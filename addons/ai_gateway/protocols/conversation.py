"""A voice session as a conversation: the bounded turn list every protocol's reading fills.

A voice session is hundreds of events per turn, mostly audio and word-sized deltas; a person
debugging it wants the turns: who spoke, what was said, tool calls and their results, barge-ins,
errors, and what each answer cost. Each protocol reads its own events into this list
(realtime_conversation.py, gemini_conversation.py, live_conversation.py); each finished
response's usage, cost and timing come from the meter's `ResponseRecord` (`priced`), so that
nothing the meters measure is measured twice. The list is bounded whatever the session's length:
at most MAX_TURNS turns and MAX_CHARS characters of text, the oldest turns dropped first, each
text cut at MAX_TURN_CHARS, and ids, notes and tool calls each capped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ai_gateway.accounting.observer import ResponseRecord
from ai_gateway.accounting.usage import TokenUsage

MAX_TURNS = 200
MAX_TURN_CHARS = 2_000
MAX_CHARS = 100_000
MAX_CALLS = 16  # per answer
MAX_NOTES = 8  # per turn: a client cancelling one response a thousand times adds one note, not a thousand
MAX_ID_CHARS = 128  # of an id or a tool's name, as hostile upstreams may send any length
# A frame whose kind cannot be told from its first or last bytes is decoded only up to this size:
# an audio chunk in an odd key order is not worth decoding to find out.
MAX_UNTYPED_BYTES = 64 * 1024

USER, ASSISTANT, TOOL, ERROR = "user", "assistant", "tool", "error"
IN_PROGRESS = "in_progress"


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
    item_id: str | None = None  # the user's audio item, the answer's output item, a GPT-Live delegation
    response_id: str | None = None
    call_id: str | None = None  # a tool result's call
    status: str | None = None  # an answer's: in_progress until it ends; None where nothing ends it (GPT-Live speech)
    calls: list[ToolCall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # interruptions, cancels, truncations
    usage: TokenUsage | None = None
    cost: float | None = None
    ttft: float | None = None
    turn_latency: float | None = None
    duration: float | None = None
    ended_at: float | None = None  # the timestamp of the frame that ended it, where no id names it (Gemini Live)
    clipped: bool = False  # its text was cut at MAX_TURN_CHARS

    @property
    def chars(self) -> int:
        return len(self.text) + sum(len(call.arguments) for call in self.calls)


class Conversation:
    """The turn list of one session, fed its frames in the order they passed the gateway.

    Each protocol's subclass reads its frames (`frame`); this class keeps the list within its caps."""

    def __init__(self) -> None:
        self.turns: deque[Turn] = deque()
        self.dropped = 0  # turns dropped to stay within MAX_TURNS and MAX_CHARS
        self.chars = 0

    def frame(self, content: bytes, is_text: bool, from_client: bool, at: float) -> None:
        """One relayed frame; what no turn is made of is left undecoded."""
        raise NotImplementedError

    def priced(self, record: ResponseRecord) -> None:
        """What the meter made of a finished response: its usage, cost and timing. A record without
        a response id (Gemini Live's) is the oldest unpriced answer's that holds the same usage."""
        if record.response_id is not None or record.usage is None:
            turn = self.find(ASSISTANT, "response_id", record.response_id)
        else:
            turn = next(
                (t for t in self.turns if t.role == ASSISTANT and t.cost is None and t.usage == record.usage), None
            )
        if turn is None:
            return
        turn.usage, turn.cost = record.usage or turn.usage, record.cost
        if turn.status in (None, IN_PROGRESS):
            turn.status = record.status
        for name in ("ttft", "turn_latency", "duration"):
            if (value := getattr(record, name)) is not None:
                setattr(turn, name, value)

    def find(self, role: str, key: str, value: str | float | None) -> Turn | None:
        """The latest turn of this role whose `key` is `value` (the list is short: MAX_TURNS)."""
        if value is None:
            return None
        return next((t for t in reversed(self.turns) if t.role == role and getattr(t, key) == value), None)

    def latest(self, role: str) -> Turn | None:
        """The last turn, if it is of this role."""
        return self.turns[-1] if self.turns and self.turns[-1].role == role else None

    def append(self, turn: Turn) -> Turn:
        self.turns.append(turn)
        self.evict()
        return turn

    def call(self, turn: Turn, item: dict[str, Any]) -> ToolCall | None:
        """The answer's call with this call id or item id (added, up to MAX_CALLS); its arguments
        set when the item carries them whole."""
        call_id, item_id = identifier(item.get("call_id")), identifier(item.get("id"))
        call = next((c for c in turn.calls if c.call_id == call_id or (item_id and c.item_id == item_id)), None)
        if call is None and len(turn.calls) < MAX_CALLS:
            call = ToolCall(identifier(item.get("name")), call_id, item_id)
            turn.calls.append(call)
        if call is not None and isinstance(arguments := item.get("arguments"), str) and arguments:
            clipped = clip(arguments)
            self.grow(len(clipped) - len(call.arguments))
            call.arguments = clipped
        return call

    def add_arguments(self, call: ToolCall, delta: str) -> None:
        if delta and len(call.arguments) < MAX_TURN_CHARS:
            piece = delta[: MAX_TURN_CHARS - len(call.arguments)]
            call.arguments += piece
            self.grow(len(piece))

    def add_text(self, turn: Turn, text: str) -> None:
        room = max(0, MAX_TURN_CHARS - len(turn.text))
        if len(text) > room:
            turn.clipped = True
        turn.text += text[:room]
        self.grow(min(room, len(text)))

    def replace_text(self, turn: Turn, text: str) -> None:
        """The event that carries the whole text is the authority over the deltas joined."""
        before = len(turn.text)
        turn.text, turn.clipped = clip(text), len(text) > MAX_TURN_CHARS
        self.grow(len(turn.text) - before)

    def grow(self, chars: int) -> None:
        self.chars += chars
        self.evict()

    def evict(self) -> None:
        """Oldest turns first, never the newest, until both caps hold."""
        while len(self.turns) > 1 and (len(self.turns) > MAX_TURNS or self.chars > MAX_CHARS):
            self.chars -= self.turns.popleft().chars
            self.dropped += 1


def note(turn: Turn, text: str) -> None:
    """A note once, up to MAX_NOTES per turn; error texts in it are clipped already."""
    if text not in turn.notes and len(turn.notes) < MAX_NOTES:
        turn.notes.append(text[:MAX_TURN_CHARS])


def clip(text: str) -> str:
    return text if len(text) <= MAX_TURN_CHARS else text[:MAX_TURN_CHARS]


def member(event: dict[str, Any], key: str) -> dict[str, Any]:
    """The object at `key`, or an empty one."""
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def identifier(value: Any) -> str | None:
    """An id or a name, clipped: never the whole of a hostile upstream's megabyte string."""
    return value[:MAX_ID_CHARS] if isinstance(value, str) and value else None


def text_of(value: Any) -> str:
    """Words or arguments: whole here, clipped where they are kept."""
    return value if isinstance(value, str) else ""


def error_text(event: dict[str, Any]) -> str:
    """An `error` event's code and message, clipped."""
    error = member(event, "error")
    code, message = identifier(error.get("code")) or identifier(error.get("type")), text_of(error.get("message"))
    return clip(": ".join(part for part in (code, message) if part) or "error")
