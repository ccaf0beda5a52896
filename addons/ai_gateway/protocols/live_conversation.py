"""A GPT-Live session read as a conversation (protocols/conversation.py keeps the turns).

GPT-Live streams what was said as transcript fragments with no turn events
(`session.input_transcript.delta`, `session.output_transcript.delta`: "these events do not define
complete turns"), so a turn here is a run of one speaker's fragments: the user's fragments join
until the model's start, and the other way round. Those spoken turns have no status and no usage
of their own: GPT-Live bills the session's time, never a turn (the session's seconds and cost are
in the flow's comment). What the Live model hands to a Responses model is a turn of its own: it
begins at `session.delegation.created` (or its first wrapped event), gathers the wrapped
`response.event`s' text and function calls, ends with the wrapped final event
(`response.completed`, `.incomplete`, `.failed`), and gets the meter's record of that response
(its tokens, its model's cost). A delegation to the client is work the application does: nothing in the session ends it.
The client's `response.item.create` items are the user's typed messages and tool results, and
`error` events are turns of their own.

Audio never is decoded: a frame's type is read from its first or last bytes.
"""

from __future__ import annotations

from typing import Any

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
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS

INPUT_TRANSCRIPT = "session.input_transcript.delta"
OUTPUT_TRANSCRIPT = "session.output_transcript.delta"
DELEGATION_CREATED = "session.delegation.created"
RESPONSE_EVENT = "response.event"
ITEM_CREATE = "response.item.create"
SERVER_EVENTS = frozenset({INPUT_TRANSCRIPT, OUTPUT_TRANSCRIPT, DELEGATION_CREATED, RESPONSE_EVENT, "error"})
CLIENT_EVENTS = frozenset({ITEM_CREATE})
# Wrapped Responses events a delegated turn is made of.
TEXT_DELTA, TEXT_DONE = "response.output_text.delta", "response.output_text.done"
ITEM_ADDED, ITEM_DONE = "response.output_item.added", "response.output_item.done"
ARGUMENTS_DELTA, ARGUMENTS_DONE = "response.function_call_arguments.delta", "response.function_call_arguments.done"


class LiveConversation(Conversation):
    """The turn list of one GPT-Live session (or sideband)."""

    def __init__(self) -> None:
        super().__init__()
        self.latest_delegation: Turn | None = None

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
        kind = event.get("type")
        if kind in (INPUT_TRANSCRIPT, OUTPUT_TRANSCRIPT):
            role = USER if kind == INPUT_TRANSCRIPT else ASSISTANT
            last = self.latest(role)
            if last is None or not last.voice or last.item_id is not None:  # another speaker, or a delegation
                last = self.append(Turn(role, at, voice=True))
            self.add_text(last, text_of(event.get("delta")))
        elif kind == DELEGATION_CREATED:
            delegation = member(event, "delegation")
            turn = self.delegated(identifier(delegation.get("id")), identifier(delegation.get("response_id")), at)
            target = identifier(delegation.get("target")) or "?"
            note(turn, f"delegated to {target}")
            if target == "client":  # the application does the work: nothing here ends it
                turn.status = None
        elif kind == RESPONSE_EVENT:
            inner = member(event, "event")
            self.wrapped(identifier(event.get("delegation_id")), inner, at)
        elif kind == "error":
            self.add_text(self.append(Turn(ERROR, at)), error_text(event))

    def wrapped(self, delegation_id: str | None, inner: dict[str, Any], at: float) -> None:
        """A Responses event the delegated model streamed."""
        kind = inner.get("type")
        response = member(inner, "response")
        turn = self.delegated(delegation_id, identifier(response.get("id")), at)
        if kind == TEXT_DELTA:
            self.add_text(turn, text_of(inner.get("delta")))
        elif kind == TEXT_DONE:
            self.replace_text(turn, text_of(inner.get("text")))
        elif kind in (ITEM_ADDED, ITEM_DONE) and member(inner, "item").get("type") == "function_call":
            self.call(turn, member(inner, "item"))
        elif kind in (ARGUMENTS_DELTA, ARGUMENTS_DONE):
            fields = {"call_id": inner.get("call_id"), "id": inner.get("item_id"), "name": inner.get("name")}
            if (call := self.call(turn, fields)) is not None:
                if kind == ARGUMENTS_DONE:
                    self.call(turn, {**fields, "arguments": inner.get("arguments")})
                else:
                    self.add_arguments(call, text_of(inner.get("delta")))
        elif kind in RESPONSES_FINAL_EVENTS:
            turn.status = identifier(response.get("status")) or kind.rpartition(".")[2]

    def delegated(self, delegation_id: str | None, response_id: str | None, at: float) -> Turn:
        """The turn of this delegation (or response), begun by whichever event names it first; an
        event that names neither ("when the event cannot be correlated") is the latest delegation's."""
        turn = self.find(ASSISTANT, "item_id", delegation_id) or self.find(ASSISTANT, "response_id", response_id)
        if turn is None and delegation_id is None and response_id is None:
            turn = self.latest_delegation
        if turn is None:
            turn = self.append(Turn(ASSISTANT, at, item_id=delegation_id, status=IN_PROGRESS))
        turn.item_id = turn.item_id or delegation_id
        turn.response_id = turn.response_id or response_id
        self.latest_delegation = turn
        return turn

    def client_event(self, event: dict[str, Any], at: float) -> None:
        """`response.item.create`: a message the user typed, or a tool's result."""
        item = member(event, "item")
        if item.get("type") == "function_call_output":
            turn = Turn(TOOL, at, call_id=identifier(item.get("call_id")))
            self.add_text(self.append(turn), text_of(item.get("output")))
        elif item.get("type", "message") == "message" and item.get("role") == "user":
            content = item.get("content")
            parts = content if isinstance(content, list) else [{"text": content}]
            text = " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            self.add_text(self.append(Turn(USER, at)), text)
