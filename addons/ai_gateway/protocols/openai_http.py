"""OpenAI-style HTTP APIs: request bodies, JSON response bodies, and server-sent event streams
read as they pass, turned into usage items.

One reader per route type knows where that API puts usage and model: Chat Completions sends
usage in a final chunk with no choices, Responses in its `response.completed` event (on SSE and
on its WebSocket mode alike), Embeddings only as input tokens.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ai_gateway.accounting.items import FirstDelta, Malformed, ResponseDone
from ai_gateway.accounting.usage import (
    COMPLETIONS_USAGE,
    EMBEDDINGS_USAGE,
    RESPONSES_USAGE,
    InvalidUsage,
    UsageShape,
    parse_usage,
)
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.encoding import Decoder, stream_decoder
from ai_gateway.protocols.json_events import decode_json

USAGE_SHAPES: dict[RouteType, UsageShape] = {
    RouteType.COMPLETIONS: COMPLETIONS_USAGE,
    RouteType.RESPONSES: RESPONSES_USAGE,
    RouteType.EMBEDDINGS: EMBEDDINGS_USAGE,
}
OPERATIONS = {RouteType.COMPLETIONS: "chat", RouteType.RESPONSES: "chat", RouteType.EMBEDDINGS: "embeddings"}
METERED_HTTP = frozenset(OPERATIONS)
# Responses events that end a response and may carry its usage.
RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# No legitimate event comes near this; a stream without event boundaries must not grow memory.
MAX_EVENT_BYTES = 4 * 1024 * 1024

StreamItem = ResponseDone | FirstDelta | Malformed


def rewrite_request(route_type: RouteType, body: bytes, model: str | None) -> tuple[str | None, bytes | None]:
    """The request's model, and a new body when the policy changes it (else None: forward untouched).

    The model override replaces the body's `model`; a streaming Chat Completions request without
    `stream_options` gets `include_usage`, as agentgateway does, or its usage would never be sent.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    changed = False
    if model is not None and document.get("model") != model:
        document["model"] = model
        changed = True
    if route_type is RouteType.COMPLETIONS and document.get("stream") is True and "stream_options" not in document:
        document["stream_options"] = {"include_usage": True}
        changed = True
    requested = document.get("model")
    return requested if isinstance(requested, str) else None, json.dumps(document).encode() if changed else None


def read_body(route_type: RouteType, body: bytes) -> ResponseDone | Malformed:
    """A whole JSON response body (non-streaming)."""
    document = decode_json(body)
    if isinstance(document, Malformed):
        return document
    return _billed(document, USAGE_SHAPES[route_type], "completed")


def _billed(document: dict[str, Any], shape: UsageShape, status: str) -> ResponseDone | Malformed:
    if document.get("usage") is None:
        return Malformed("missing_usage", "no usage in the response")
    try:
        usage = parse_usage(document["usage"], shape)
    except InvalidUsage as e:
        return Malformed("invalid_usage", str(e))
    return ResponseDone(usage, status, response_model=_string(document.get("model")))


def _final_response(response: dict[str, Any], status: str) -> ResponseDone:
    """A Responses API response that ended: counted whatever its usage, billed when the usage is whole."""
    done = _billed(response, RESPONSES_USAGE, status)
    response_id = _string(response.get("id"))
    if isinstance(done, Malformed):
        return ResponseDone(None, status, response_id, _string(response.get("model")), unread=done.reason)
    return replace(done, response_id=response_id)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_completions_chunk(chunk: dict[str, Any]) -> StreamItem | None:
    """A `chat.completion.chunk`: content makes a first token; usage comes in a chunk with no choices."""
    if chunk.get("usage") is not None:
        return _billed(chunk, COMPLETIONS_USAGE, "completed")
    choices = chunk.get("choices")
    if isinstance(choices, list) and any(_has_content(choice) for choice in choices):
        return FirstDelta()
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
        return FirstDelta()
    if kind in RESPONSES_FINAL_EVENTS:
        response = event.get("response")
        if not isinstance(response, dict):
            return Malformed("invalid_event", f"{kind} without a response object")
        return _final_response(response, kind.removeprefix("response."))
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
        if isinstance(item, ResponseDone) or document.get("type") in RESPONSES_FINAL_EVENTS:
            self.finished = True
        return item


class StreamReader:
    """A streamed response body as it passes: decoded (gzip, br, zstd, ...) and read as SSE.

    The client gets the original bytes; a body that cannot be decoded is relayed and read no more.
    """

    def __init__(self, route_type: RouteType, content_encoding: str) -> None:
        self.sse = SseStream(route_type)
        self._decode: Decoder | None = stream_decoder(content_encoding)
        self.unsupported = Malformed("unsupported_encoding", content_encoding[:64]) if self._decode is None else None

    @property
    def finished(self) -> bool:
        return self.sse.finished

    def feed(self, chunk: bytes) -> list[StreamItem]:
        if self._decode is None:
            return []
        try:
            return self.sse.feed(self._decode(chunk))
        except Exception as e:  # a corrupt compressed stream: relay it, meter nothing more
            self._decode = None
            return [Malformed("invalid_encoding", str(e)[:200])]
