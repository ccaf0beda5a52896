"""Usage of OpenAI-style HTTP APIs: JSON bodies, and server-sent event streams read as they pass.

One reader per route type knows where that API puts usage and model: Chat Completions sends
usage in a final chunk with no choices, Responses in its `response.completed` event (on SSE and
on its WebSocket mode alike), Embeddings only as input tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ai_gateway.accounting.usage import (
    COMPLETIONS_USAGE,
    EMBEDDINGS_USAGE,
    RESPONSES_USAGE,
    InvalidUsage,
    TokenUsage,
    UsageShape,
    parse_usage,
)
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.openai_realtime import Malformed

USAGE_SHAPES: dict[RouteType, UsageShape] = {
    RouteType.COMPLETIONS: COMPLETIONS_USAGE,
    RouteType.RESPONSES: RESPONSES_USAGE,
    RouteType.EMBEDDINGS: EMBEDDINGS_USAGE,
}
# Responses events that end a response and may carry its usage.
RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# No legitimate event comes near this; a stream without event boundaries must not grow memory.
MAX_EVENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Billed:
    """What one HTTP exchange (or one Responses response) billed."""

    usage: TokenUsage
    response_model: str | None
    status: str = "completed"


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The stream carried its first generated content."""


StreamItem = Billed | FirstToken | Malformed


def decode_json(data: bytes) -> dict[str, Any] | Malformed:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        return Malformed("invalid_json", str(e)[:200])
    return (
        value
        if isinstance(value, dict)
        else Malformed("invalid_json", f"expected an object, got {type(value).__name__}")
    )


def read_body(route_type: RouteType, body: bytes) -> Billed | Malformed:
    """A whole JSON response body (non-streaming)."""
    document = decode_json(body)
    if isinstance(document, Malformed):
        return document
    return _billed(document, USAGE_SHAPES[route_type], "completed")


def _billed(document: dict[str, Any], shape: UsageShape, status: str) -> Billed | Malformed:
    if document.get("usage") is None:
        return Malformed("missing_usage", "no usage in the response")
    try:
        usage = parse_usage(document["usage"], shape)
    except InvalidUsage as e:
        return Malformed("invalid_usage", str(e))
    model = document.get("model")
    return Billed(usage, model if isinstance(model, str) and model else None, status)


def read_completions_chunk(chunk: dict[str, Any]) -> StreamItem | None:
    """A `chat.completion.chunk`: content makes a first token; usage comes in a chunk with no choices."""
    if chunk.get("usage") is not None:
        return _billed(chunk, COMPLETIONS_USAGE, "completed")
    choices = chunk.get("choices")
    if isinstance(choices, list) and any(_has_content(choice) for choice in choices):
        return FirstToken()
    return None


def _has_content(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return isinstance(delta, dict) and any(value for key, value in delta.items() if key != "role")


def read_responses_event(event: dict[str, Any]) -> StreamItem | None:
    """A Responses API event, from SSE or from its WebSocket mode."""
    kind = event.get("type")
    if not isinstance(kind, str):
        return None
    if kind.endswith(".delta"):
        return FirstToken()
    if kind in RESPONSES_FINAL_EVENTS:
        response = event.get("response")
        if not isinstance(response, dict):
            return Malformed("invalid_event", f"{kind} without a response object")
        return _billed(response, RESPONSES_USAGE, kind.removeprefix("response."))
    return None


class SseStream:
    """Incremental server-sent events: feed bytes as they arrive, get each complete event's items."""

    def __init__(self, route_type: RouteType) -> None:
        self._read = read_completions_chunk if route_type is RouteType.COMPLETIONS else read_responses_event
        self._buffer = b""
        self.finished = False  # saw `data: [DONE]` or a final Responses event

    def feed(self, data: bytes) -> list[StreamItem]:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        items: list[StreamItem] = []
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._buffer = b""
            items.append(Malformed("invalid_sse", f"an event exceeded {MAX_EVENT_BYTES} bytes"))
        for event in events:
            item = self._event(event)
            if item is not None:
                items.append(item)
        return items

    def _event(self, event: bytes) -> StreamItem | None:
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return None  # comments, retry hints, a lone `event:` line
        if data == b"[DONE]":
            self.finished = True
            return None
        document = decode_json(data)
        if isinstance(document, Malformed):
            return document
        item = self._read(document)
        if isinstance(item, Billed) or document.get("type") in RESPONSES_FINAL_EVENTS:
            self.finished = True
        return item
