"""An OpenAI Realtime session read as a conversation (protocols/conversation.py keeps the turns).

The few events that say what happened are folded into turns: the user's transcript, the model's
transcript or text joined from its deltas, tool calls and their results, barge-ins, cancels,
truncations, errors; each finished response's usage, cost and timing come from the meter's
record. Only those event types are decoded, read from a frame's first or last bytes; audio never is.
"""

from __future__ import annotations

import contextlib
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
    error_text,
    identifier,
    member,
    note,
    text_of,
)
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, event_type
from ai_gateway.protocols.usage_fields import parse_realtime_usage

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


class RealtimeConversation(Conversation):
    """The turn list of one Realtime session."""

    def frame(self, content: bytes, is_text: bool, from_client: bool, at: float) -> None:
        if not is_text:
            return
        wanted = CLIENT_EVENTS if from_client else SERVER_EVENTS
        kind = event_type(content)
        if kind not in wanted and (kind is not None or len(content) > MAX_UNTYPED_BYTES):
            return
        event = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
        if isinstance(event, dict) and event.get("type") in wanted:
            (self.client_event if from_client else self.server_event)(event, at)

    def server_event(self, event: dict[str, Any], at: float) -> None:
        """An upstream event; types outside SERVER_EVENTS are ignored."""
        kind = event.get("type")
        response_id = identifier(event.get("response_id"))
        if kind in TEXT_DELTAS or kind in TEXT_DONE:
            if turn := self.answer(response_id, at):
                turn.item_id = turn.item_id or identifier(event.get("item_id"))  # the item a truncation names
                if kind in TEXT_DONE:
                    self.replace_text(turn, text_of(event.get(TEXT_DONE[kind])))
                else:
                    self.add_text(turn, text_of(event.get("delta")))
        elif kind == SPEECH_STARTED:
            self.interrupt()
            self.user(identifier(event.get("item_id")), at)
        elif kind == COMMITTED:
            self.user(identifier(event.get("item_id")), at)
        elif kind == TRANSCRIBED:
            self.replace_text(self.user(identifier(event.get("item_id")), at), text_of(event.get("transcript")))
        elif kind == TRANSCRIPTION_FAILED:
            note(self.user(identifier(event.get("item_id")), at), f"transcription failed: {error_text(event)}")
        elif kind == RESPONSE_CREATED:
            self.answer(identifier(member(event, "response").get("id")), at)
        elif kind == RESPONSE_DONE:
            self.response_done(member(event, "response"), at)
        elif kind == ITEM_ADDED:
            item = member(event, "item")
            if (turn := self.answer(response_id, at)) is None:
                return
            if item.get("type") == "function_call":
                self.call(turn, item)
            elif item.get("type") == "message":
                turn.item_id = turn.item_id or identifier(item.get("id"))
        elif kind in (ARGUMENTS_DELTA, ARGUMENTS_DONE):
            self.arguments(event, at)
        elif kind == TRUNCATED:
            self.truncated(event)
        elif kind == ERROR_EVENT:
            self.add_text(self.append(Turn(ERROR, at)), error_text(event))

    def client_event(self, event: dict[str, Any], at: float) -> None:
        """A client event: a cancel (the barge-in a client makes itself), an item it adds."""
        kind = event.get("type")
        if kind == CANCEL:
            turn = self.find(ASSISTANT, "response_id", identifier(event.get("response_id"))) or self.in_progress()
            if turn is not None:
                note(turn, "cancelled by the client")
        elif kind == ITEM_CREATE:
            item = member(event, "item")
            if item.get("type") == "function_call_output":
                turn = Turn(TOOL, at, call_id=identifier(item.get("call_id")), item_id=identifier(item.get("id")))
                self.add_text(self.append(turn), str(item.get("output", "")))
            elif item.get("type") == "message" and item.get("role") == "user":
                self.add_text(self.append(Turn(USER, at, item_id=identifier(item.get("id")))), _message_text(item))

    def response_done(self, response: dict[str, Any], at: float) -> None:
        turn = self.answer(identifier(response.get("id")), at)
        if turn is None:
            return
        turn.status = identifier(response.get("status")) or "other"
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
        return turn or self.append(Turn(ASSISTANT, at, response_id=response_id, status=IN_PROGRESS))

    def arguments(self, event: dict[str, Any], at: float) -> None:
        turn = self.answer(identifier(event.get("response_id")), at)
        if turn is None:
            return
        fields = {"call_id": event.get("call_id"), "id": event.get("item_id"), "name": event.get("name")}
        call = self.call(turn, fields)
        if call is None:
            return
        if event.get("type") == ARGUMENTS_DONE:
            self.call(turn, {**fields, "arguments": event.get("arguments")})
            call.name = call.name or identifier(event.get("name"))
        else:
            self.add_arguments(call, text_of(event.get("delta")))

    def interrupt(self) -> None:
        """The user spoke over an answer still streaming: a barge-in."""
        if (turn := self.in_progress()) is not None:
            note(turn, "interrupted: the user spoke")

    def truncated(self, event: dict[str, Any]) -> None:
        """The client cut an answer's audio where its user stopped hearing it. An answer whose item
        was never named (cut before its first transcript delta, by an upstream that announces no
        output items) is taken to be the latest such answer."""
        turn = self.find(ASSISTANT, "item_id", identifier(event.get("item_id")))
        turn = turn or next((t for t in reversed(self.turns) if t.role == ASSISTANT and t.item_id is None), None)
        if turn is not None and isinstance(end := event.get("audio_end_ms"), int):
            note(turn, f"truncated at {end:,} ms of audio (what the user heard)")

    def in_progress(self) -> Turn | None:
        return next((t for t in reversed(self.turns) if t.role == ASSISTANT and t.status == IN_PROGRESS), None)


def _message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    parts = content if isinstance(content, list) else ()
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
