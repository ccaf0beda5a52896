"""A Gemini Live session read as a conversation (protocols/conversation.py keeps the turns).

Gemini Live names no turn and no response: the model's turn is whatever it says between the
user's turn and `serverContent.turnComplete`. So an answer begins with the model's first output
(`modelTurn` text or audio parts, `outputTranscription`, a `toolCall`) and ends at `turnComplete`,
or at `interrupted` (a barge-in: the user spoke over it; it is then `cancelled`). The user's
turns are `clientContent` turns, `realtimeInput` text, and speech: a turn ended by
`audioStreamEnd` or `activityEnd`, heard over an answer (`interrupted`), or transcribed
(`inputTranscription`). Tool calls are the answer's `toolCall.functionCalls`, their results the
client's `toolResponse.functionResponses`, and `toolCallCancellation` notes what was called off.

Usage is each turn's `usageMetadata` (within a turn a report replaces the one before; one after
`turnComplete`, before anything new, is the ended turn's), as protocols/gemini_live.py bills it;
the meter's record of it, which names no response, gives the answer its cost (`priced` matches
it by its usage). Gemini's meter measures no latency, so an answer's timing is read here from the
frames' arrival: from the user's turn's end (turnComplete of `clientContent`, `audioStreamEnd`,
`activityEnd`) to the model's first output (TTFT; the voice-turn latency too when the user
spoke) and to `turnComplete`.

Messages are read in either spelling Google accepts (`serverContent`, `server_content`). Audio is
never decoded: a server frame that is audio and nothing else is told by its head and the bytes
after its data (gemini_live.media_tail), and a client frame is decoded only when it may hold
one of the keys a turn is made of (audio chunks hold none).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from typing import Any

from ai_gateway.accounting.usage import InvalidUsage
from ai_gateway.protocols.conversation import (
    ASSISTANT,
    ERROR,
    IN_PROGRESS,
    MAX_UNTYPED_BYTES,
    TOOL,
    USER,
    Conversation,
    Turn,
    identifier,
    note,
    text_of,
)
from ai_gateway.protocols.gemini_live import media_tail, parse_usage_metadata
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json

COMPLETED, CANCELLED, CALLED = "completed", "cancelled", "tool call"
# The only keys of a client message a turn is made of; an audio chunk holds none of them.
_CLIENT_KEYS = tuple(
    f'"{name}"'.encode()
    for name in (
        "clientContent",
        "client_content",
        "toolResponse",
        "tool_response",
        "text",
        "audioStreamEnd",
        "audio_stream_end",
        "activityEnd",
        "activity_end",
        "activityStart",
        "activity_start",
    )
)
_AUDIO_ONLY_TAIL = re.compile(rb'"\s*\}\s*\}\s*\]\s*\}\s*\}\s*\}\s*$')  # what ends a frame that is only audio


class GeminiConversation(Conversation):
    """The turn list of one Gemini Live session."""

    def __init__(self) -> None:
        super().__init__()
        self.open: Turn | None = None  # the answer streaming now
        self.cut: Turn | None = None  # an interrupted answer, until its turnComplete
        self.ended: Turn | None = None  # the last answer ended, until the model says something new
        self.user_end: float | None = None  # the user's turn ended then, and nothing answered it yet
        self.user_spoke = False  # that turn was speech
        self.since: float | None = None  # where the open answer's duration runs from

    def frame(self, content: bytes, is_text: bool, from_client: bool, at: float) -> None:
        """JSON in text or binary frames alike, as Google's SDK reads it."""
        if from_client:
            if len(content) <= MAX_CLIENT_EVENT_BYTES and any(key in content for key in _CLIENT_KEYS):
                message = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
                if isinstance(message, dict):
                    self.client_message(message, at)
            return
        tail = media_tail(content)
        if tail is not None and _AUDIO_ONLY_TAIL.match(tail):
            self.answering(at).voice = True
        elif tail is not None or len(content) <= MAX_UNTYPED_BYTES:
            message = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
            if isinstance(message, dict):
                self.server_message(message, at)

    def server_message(self, message: dict[str, Any], at: float) -> None:
        """A server message: the model's output first, then its usage, a barge-in, the turn's end."""
        content = _object(message, "serverContent")
        for part in _list(_object(content, "modelTurn").get("parts")):
            if isinstance(part, dict) and not part.get("thought"):
                if (text := _field(part, "text")) is not None:
                    self.add_text(self.answering(at), text_of(text))
                if isinstance(_field(part, "inlineData"), dict):
                    self.answering(at).voice = True
        if (said := _object(content, "outputTranscription")) and "text" in said:
            answer = self.answering(at)
            answer.voice = True
            self.add_text(answer, text_of(said.get("text")))
        if (heard := _object(content, "inputTranscription")) and "text" in heard:
            self.add_text(self.speech(at), text_of(heard.get("text")))
        if calls := _list(_field(_object(message, "toolCall"), "functionCalls")):
            answer = self.answering(at)
            for call in calls:
                if isinstance(call, dict):
                    arguments = json.dumps(call.get("args"), ensure_ascii=False) if "args" in call else ""
                    self.call(answer, {"call_id": call.get("id"), "name": call.get("name"), "arguments": arguments})
        for call_id in _list(_field(_object(message, "toolCallCancellation"), "ids")):
            if (called := self.called(identifier(call_id))) is not None:
                note(called, f"tool call {identifier(call_id)} cancelled")
        if (usage := _field(message, "usageMetadata")) is not None:
            self.usage(usage, at)
        if _field(content, "interrupted") is True:
            self.interrupted(at)
        if _field(content, "turnComplete") is True:
            self.completed(at)
        if (away := _field(message, "goAway")) is not None:
            left = _field(away, "timeLeft") if isinstance(away, dict) else None
            self.add_text(self.append(Turn(ERROR, at)), f"goAway: the server ends the session in {left or 'a moment'}")

    def client_message(self, message: dict[str, Any], at: float) -> None:
        """The user's text turns, the end of their speech, and the results of tool calls."""
        if content := _object(message, "clientContent"):
            for turn in _list(content.get("turns")):
                if isinstance(turn, dict):
                    role = ASSISTANT if turn.get("role") == "model" else USER
                    added = self.append(Turn(role, at, status="context" if role == ASSISTANT else None))
                    self.add_text(added, _parts_text(turn.get("parts")))
            if _field(content, "turnComplete") is True:
                self.user_ended(at, spoke=False)
        realtime = _object(message, "realtimeInput")
        if isinstance(text := realtime.get("text"), str):
            self.add_text(self.typed(at), text)
        if _field(realtime, "activityStart") is not None:
            self.speech(at)
        if _field(realtime, "audioStreamEnd") is True or _field(realtime, "activityEnd") is not None:
            self.speech(at)
            self.user_ended(at, spoke=True)
        for response in _list(_field(_object(message, "toolResponse"), "functionResponses")):
            if isinstance(response, dict):
                if self.open is not None and self.open.calls:  # the turn goes on after the results
                    self.open.status, self.open = CALLED, None
                self.user_ended(at, spoke=False)  # what the model says next answers the results
                result = Turn(TOOL, at, call_id=identifier(response.get("id")))
                self.add_text(self.append(result), json.dumps(response.get("response"), ensure_ascii=False))

    def answering(self, at: float) -> Turn:
        """The answer streaming now, begun by the model's first output after anything else."""
        if self.open is None:
            self.open = self.append(Turn(ASSISTANT, at, status=IN_PROGRESS))
            self.since = self.user_end if self.user_end is not None else at
            if self.user_end is not None:
                self.open.ttft = at - self.user_end
                if self.user_spoke:
                    self.open.turn_latency = self.open.ttft
            self.user_end, self.ended, self.cut = None, None, None
        return self.open

    def speech(self, at: float) -> Turn:
        """The user's speech now: the last turn when it is speech already, else a new one."""
        last = self.latest(USER)
        return last if last is not None and last.voice else self.append(Turn(USER, at, voice=True))

    def typed(self, at: float) -> Turn:
        last = self.latest(USER)
        if last is not None and not last.voice and last.text:
            self.add_text(last, " ")
            return last
        return self.append(Turn(USER, at))

    def user_ended(self, at: float, spoke: bool) -> None:
        self.user_end, self.user_spoke = at, spoke

    def called(self, call_id: str | None) -> Turn | None:
        return next((t for t in reversed(self.turns) if any(c.call_id == call_id for c in t.calls)), None)

    def usage(self, metadata: Any, at: float) -> None:
        """A report replaces the one before within a turn; after the turn's end, it is the ended turn's."""
        with contextlib.suppress(InvalidUsage):  # counted as unread by the meter; the turn shows no tokens
            usage = parse_usage_metadata(metadata)
            target = self.open or self.cut or self.ended or self.answering(at)
            target.usage = usage

    def interrupted(self, at: float) -> None:
        """A barge-in: the answer is cut off, and the user is speaking."""
        answer = self.open
        if answer is not None:
            note(answer, "interrupted: the user spoke")
            answer.status, answer.ended_at = CANCELLED, at
            self.cut, self.open = answer, None
            self.finish(answer, at)
        self.speech(at)

    def completed(self, at: float) -> None:
        """turnComplete: the answer streaming (or the one cut off) ends here."""
        answer = self.open or self.cut
        if answer is None:
            answer = self.answering(at)  # a turn with nothing said: its usage still has a place
        if answer.status == IN_PROGRESS:
            answer.status = COMPLETED
        answer.ended_at = at
        self.finish(answer, at)
        self.open = self.cut = None
        self.ended = answer

    def finish(self, answer: Turn, at: float) -> None:
        if self.since is not None:
            answer.duration = at - self.since


def _field(obj: Any, name: str) -> Any:
    """A member by its JSON name or its proto name (`turnComplete`, `turn_complete`): Google accepts both."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(name)
    return value if value is not None else obj.get(_snake(name))


@functools.cache
def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def _object(obj: Any, name: str) -> dict[str, Any]:
    value = _field(obj, name)
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _parts_text(parts: Any) -> str:
    return " ".join(p["text"] for p in _list(parts) if isinstance(p, dict) and isinstance(p.get("text"), str))
