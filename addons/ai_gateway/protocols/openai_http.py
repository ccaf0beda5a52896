"""OpenAI-style HTTP APIs: request bodies, JSON response bodies, and server-sent event streams
read as they pass, turned into usage items.

One reader per route type knows where that API puts usage and model: Chat Completions (and the
legacy Completions) send usage in a final chunk with no choices, Responses in its
`response.completed` event (on SSE and on its WebSocket mode alike), Embeddings only as input
tokens, transcriptions and translations as tokens or seconds (JSON, or `transcript.text.done`),
images as tokens (JSON, or `image_generation.completed`), speech only on its SSE stream
(`speech.audio.done`): its audio body has none, so the characters of its `input` are counted.
Uploads (transcriptions, image edits) are multipart: only the head of the body is looked at,
for the `model` field, and never decoded.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from ai_gateway.accounting.items import FirstDelta, Malformed, ResponseDone, SpeechInput
from ai_gateway.accounting.usage import DurationUsage, InvalidUsage, TokenUsage
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.encoding import BodyDecoder, BodyTooLarge, UnsupportedEncoding, decode_body
from ai_gateway.protocols.json_events import decode_json
from ai_gateway.protocols.usage_fields import (
    COMPLETIONS_USAGE,
    EMBEDDINGS_USAGE,
    IMAGES_USAGE,
    RESPONSES_USAGE,
    SPEECH_USAGE,
    parse_transcription_usage,
    parse_usage,
)

Parse = Callable[[Any], TokenUsage | DurationUsage]
USAGE_PARSERS: dict[RouteType, Parse] = {
    RouteType.COMPLETIONS: functools.partial(parse_usage, shape=COMPLETIONS_USAGE),
    RouteType.TEXT_COMPLETIONS: functools.partial(parse_usage, shape=COMPLETIONS_USAGE),
    RouteType.RESPONSES: functools.partial(parse_usage, shape=RESPONSES_USAGE),
    RouteType.EMBEDDINGS: functools.partial(parse_usage, shape=EMBEDDINGS_USAGE),
    RouteType.TRANSCRIPTIONS: parse_transcription_usage,
    RouteType.TRANSLATIONS: parse_transcription_usage,
    RouteType.SPEECH: functools.partial(parse_usage, shape=SPEECH_USAGE),
    RouteType.IMAGES: functools.partial(parse_usage, shape=IMAGES_USAGE),
}
OPERATIONS = {
    RouteType.COMPLETIONS: "chat",
    RouteType.RESPONSES: "chat",
    RouteType.EMBEDDINGS: "embeddings",
    RouteType.TEXT_COMPLETIONS: "text_completion",
    RouteType.TRANSCRIPTIONS: "transcription",
    RouteType.TRANSLATIONS: "translation",
    RouteType.SPEECH: "speech",
    RouteType.IMAGES: "image_generation",
}
METERED_HTTP = frozenset(OPERATIONS)
# Routes whose request is a multipart upload (image edits may be either: told by the body).
MULTIPART = frozenset({RouteType.TRANSCRIPTIONS, RouteType.TRANSLATIONS})
# Routes whose streaming request the gateway makes ask for usage (`stream_options.include_usage`).
CHUNKED_USAGE = frozenset({RouteType.COMPLETIONS, RouteType.TEXT_COMPLETIONS})
# Events that end a response and may carry its usage: Responses, transcription, speech, images.
RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
FINAL_EVENTS = RESPONSES_FINAL_EVENTS | {
    "transcript.text.done",
    "speech.audio.done",
    "image_generation.completed",
    "image_edit.completed",
}
# How much of a multipart upload is searched for its `model` field: the SDKs send fields before files.
MULTIPART_HEAD_BYTES = 64 * 1024
# No legitimate event comes near this; a stream without event boundaries must not grow memory.
MAX_EVENT_BYTES = 4 * 1024 * 1024

StreamItem = ResponseDone | FirstDelta | Malformed


def _skipped(_: object) -> None:
    """Stands for a value the gateway does not need: parsed (so the body is checked), never kept."""
    return None


# The C scanner still checks every byte, but with these hooks a skipped `messages` array or
# embeddings `data` keeps no numbers or objects, only its strings until the array ends.
_SKIP = json.JSONDecoder(object_pairs_hook=_skipped, parse_float=_skipped, parse_int=_skipped)
_KEEP = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class Member(NamedTuple):
    """A member of a JSON object: its key, where its value is in the text, and the value if kept."""

    key: str
    start: int
    end: int
    value: Any


def object_members(text: str, start: int, keep: frozenset[str]) -> tuple[list[Member], int]:
    """The members of the object at `start` and the index after it; only `keep` values are decoded.

    Raises ValueError (json.JSONDecodeError) or RecursionError for text that is not a JSON object.
    """
    skip = _WHITESPACE.match
    if text[start : start + 1] != "{":
        raise ValueError("not a JSON object")
    members: list[Member] = []
    i = skip(text, start + 1).end()
    if text[i : i + 1] == "}":
        return members, i + 1
    while True:
        if text[i : i + 1] != '"':
            raise ValueError("expected a key")
        key, i = json.decoder.scanstring(text, i + 1)
        i = skip(text, i).end()
        if text[i : i + 1] != ":":
            raise ValueError("expected ':'")
        i = skip(text, i + 1).end()
        kept = key in keep
        value, end = (_KEEP if kept else _SKIP).raw_decode(text, i)
        members.append(Member(key, i, end, value if kept else None))
        i = skip(text, end).end()
        if text[i : i + 1] == "}":
            return members, i + 1
        if text[i : i + 1] != ",":
            raise ValueError("expected ',' or '}'")
        i = skip(text, i + 1).end()


def top_level(body: bytes, keep: frozenset[str]) -> tuple[str, int, list[Member]] | None:
    """A body that is one JSON object (UTF-8, as JSON on the wire must be): its text, where the
    object starts, and its members; None for anything else."""
    try:
        text = body.decode("utf-8")
        start = _WHITESPACE.match(text, 1 if text.startswith("\ufeff") else 0).end()
        members, end = object_members(text, start, keep)
    except (ValueError, RecursionError):
        return None
    return (text, start, members) if _WHITESPACE.match(text, end).end() == len(text) else None


def last(members: list[Member], key: str) -> Member | None:
    """The member JSON parsers (and so the upstream) read for a duplicated key: the last one."""
    return next((m for m in reversed(members) if m.key == key), None)


_REQUEST_KEYS = frozenset({"model", "stream", "stream_options"})
_INCLUDE_USAGE = frozenset({"include_usage"})
Edit = tuple[int, int, str]  # replace text[start:end] by the string


def rewrite_request(route_type: RouteType, body: bytes, model: str | None) -> tuple[str | None, bytes | None]:
    """The request's model, and a new body when the policy changes it (else None: forward untouched).

    The model override replaces the body's `model`; a streaming Chat Completions request gets
    `stream_options.include_usage: true` (added, or replacing false or null), as agentgateway
    does for a missing one, or its usage would never be sent. The new body is the original with
    only those values replaced (or inserted after the opening brace): never re-serialised, so
    numbers, duplicate keys, spacing and size stay what the client sent. A body that is not one
    JSON object is forwarded unchanged.
    """
    document = top_level(body, _REQUEST_KEYS)
    if document is None:
        return None, None
    text, start, members = document
    edits: list[Edit] = []
    inserted: list[str] = []
    found = last(members, "model")
    requested = found.value if found else None
    if model is not None and requested != model:
        replacement = json.dumps(model)
        edits += [(m.start, m.end, replacement) for m in members if m.key == "model"]
        inserted += [] if found else [f'"model":{replacement}']
        requested = model
    stream = last(members, "stream")
    if route_type in CHUNKED_USAGE and stream is not None and stream.value is True:
        options = [m for m in members if m.key == "stream_options"]
        if not options:
            inserted.append('"stream_options":{"include_usage":true}')
        elif _include_usage(text, options[-1]):  # the one parsers read does not ask for usage
            for option in options:
                edits += _include_usage(text, option)
    if inserted:
        edits.append((start + 1, start + 1, ",".join(inserted) + ("," if members else "")))
    model_name = requested if isinstance(requested, str) else None
    return model_name, _spliced(text, edits).encode() if edits else None


def _include_usage(text: str, options: Member) -> list[Edit]:
    """Edits that make a `stream_options` value ask for usage; an invalid one is left to the upstream to refuse."""
    if options.value is None:
        return [(options.start, options.end, '{"include_usage":true}')]
    if not isinstance(options.value, dict) or options.value.get("include_usage") is True:
        return []
    members, _ = object_members(text, options.start, _INCLUDE_USAGE)
    found = [(m.start, m.end, "true") for m in members if m.key == "include_usage"]
    brace = options.start + 1
    return found or [(brace, brace, '"include_usage":true' + ("," if members else ""))]


def _spliced(text: str, edits: list[Edit]) -> str:
    pieces, position = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [text[position:start], replacement]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def read_request(
    route_type: RouteType, raw: bytes, content_encoding: str, model: str | None, limit: int
) -> tuple[str | None, bytes | None, Malformed | SpeechInput | None]:
    """A request body as it arrived: its model, the new (decoded) body if the policy changes it,
    and why it was not read (or, for speech, the characters of its input). Bodies past `limit`
    decoded are not read (forwarded unchanged); multipart uploads are never decoded."""
    if route_type in MULTIPART or (route_type is RouteType.IMAGES and raw.startswith(b"--")):
        requested, rewritten = rewrite_multipart(raw, model) if not content_encoding else (None, None)
        return requested, rewritten, None
    body = decoded(raw, content_encoding, limit)
    if isinstance(body, Malformed):
        return None, None, body
    requested, rewritten = rewrite_request(route_type, body, model)
    return requested, rewritten, speech_input(body) if route_type is RouteType.SPEECH else None


_MODEL_FIELD = re.compile(
    rb'\r\ncontent-disposition: *form-data; *name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,256})\r\n', re.IGNORECASE
)


def rewrite_multipart(raw: bytes, model: str | None) -> tuple[str | None, bytes | None]:
    """A multipart upload's `model` field, found in the head of the body (where the SDKs put the
    fields, before the file), and the body with its value replaced when the policy overrides it.
    Not found: no model, and the body goes as it came."""
    found = _MODEL_FIELD.search(raw, 0, MULTIPART_HEAD_BYTES)
    if found is None:
        return None, None
    requested = found[1].decode("utf-8", "replace")
    if model is None or model == requested:
        return requested, None
    return model, raw[: found.start(1)] + model.encode() + raw[found.end(1) :]


_SPEECH_KEYS = frozenset({"input"})


def speech_input(body: bytes) -> SpeechInput | None:
    """The characters (code points) of a speech request's `input`, which tts-1 is billed by."""
    document = top_level(body, _SPEECH_KEYS)
    found = last(document[2], "input") if document is not None else None
    return SpeechInput(len(found.value)) if found is not None and isinstance(found.value, str) else None


def decoded(raw: bytes, content_encoding: str, limit: int) -> bytes | Malformed:
    """A whole body decoded, or why not; at most `limit` decoded bytes ever exist."""
    try:
        return decode_body(raw, content_encoding, limit)
    except BodyTooLarge as e:
        return Malformed("too_large", str(e))
    except UnsupportedEncoding as e:
        return Malformed("unsupported_encoding", str(e))
    except Exception as e:  # a corrupt body: zlib.error, brotli.error, ZstdError, EOFError
        return Malformed("invalid_encoding", str(e)[:200])


_RESPONSE_KEYS = frozenset({"model", "usage"})


def read_response(
    route_type: RouteType, raw: bytes, content_encoding: str, limit: int
) -> ResponseDone | Malformed | None:
    """A whole response body (non-streaming) as it arrived, decoded within `limit`; None for
    speech, whose body is the audio (its characters were counted from the request)."""
    if route_type is RouteType.SPEECH:
        return None
    body = decoded(raw, content_encoding, limit)
    return body if isinstance(body, Malformed) else read_body(route_type, body)


def read_body(route_type: RouteType, body: bytes) -> ResponseDone | Malformed:
    """A decoded JSON response body: only its `usage` and `model` are decoded."""
    document = top_level(body, _RESPONSE_KEYS)
    if document is None:
        if route_type in (RouteType.TRANSCRIPTIONS, RouteType.TRANSLATIONS):
            return Malformed("missing_usage", "a text, srt or vtt transcript carries no usage")
        return Malformed("invalid_json", "the body is not a JSON object")
    _, _, members = document
    return _billed({m.key: m.value for m in members if m.key in _RESPONSE_KEYS}, USAGE_PARSERS[route_type], "completed")


def _billed(document: dict[str, Any], parse: Parse, status: str) -> ResponseDone | Malformed:
    if document.get("usage") is None:
        return Malformed("missing_usage", "no usage in the response")
    try:
        usage = parse(document["usage"])
    except InvalidUsage as e:
        return Malformed("invalid_usage", str(e))
    return ResponseDone(usage, status, response_model=_string(document.get("model")))


def _final(document: dict[str, Any], parse: Parse, status: str) -> ResponseDone:
    """A response that ended (its final event): counted whatever its usage, billed when the usage is whole."""
    done = _billed(document, parse, status)
    response_id = _string(document.get("id"))
    if isinstance(done, Malformed):
        return ResponseDone(None, status, response_id, _string(document.get("model")), unread=done.reason)
    return replace(done, response_id=response_id)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_completions_chunk(chunk: dict[str, Any]) -> StreamItem | None:
    """A `chat.completion.chunk` (or legacy `text_completion` chunk): content makes a first token;
    usage comes in a chunk with no choices."""
    if chunk.get("usage") is not None:
        return _billed(chunk, USAGE_PARSERS[RouteType.COMPLETIONS], "completed")
    choices = chunk.get("choices")
    if isinstance(choices, list) and any(_has_content(choice) for choice in choices):
        return FirstDelta()
    return None


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    return bool(choice.get("text")) or isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role")


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
        return _final(response, USAGE_PARSERS[RouteType.RESPONSES], kind.removeprefix("response."))
    return None


def event_reader(route_type: RouteType, first: str, final: str) -> Callable[[dict[str, Any]], StreamItem | None]:
    """The reader of a stream whose content events end in `first` (a first token) and whose final
    event, ending in `final`, carries the usage at its top level."""
    parse = USAGE_PARSERS[route_type]

    def read(event: dict[str, Any]) -> StreamItem | None:
        kind = event.get("type")
        if not isinstance(kind, str):
            return None
        if kind in FINAL_EVENTS and kind.endswith(final):
            return _final(event, parse, "completed")
        return FirstDelta() if kind.endswith(first) else None

    return read


STREAM_READERS: dict[RouteType, Callable[[dict[str, Any]], StreamItem | None]] = {
    RouteType.COMPLETIONS: read_completions_chunk,
    RouteType.TEXT_COMPLETIONS: read_completions_chunk,
    RouteType.RESPONSES: read_responses_event,
    RouteType.TRANSCRIPTIONS: event_reader(RouteType.TRANSCRIPTIONS, ".delta", "text.done"),
    RouteType.TRANSLATIONS: event_reader(RouteType.TRANSLATIONS, ".delta", "text.done"),
    RouteType.SPEECH: event_reader(RouteType.SPEECH, ".delta", "audio.done"),
    RouteType.IMAGES: event_reader(RouteType.IMAGES, ".partial_image", ".completed"),
}


class SseStream:
    """Incremental server-sent events: feed bytes as they arrive, get each complete event's items."""

    def __init__(self, route_type: RouteType) -> None:
        self._read = STREAM_READERS.get(route_type, read_responses_event)
        self._buffer = b""
        self.finished = False  # saw `data: [DONE]` or a final event

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
        if isinstance(item, ResponseDone) or document.get("type") in FINAL_EVENTS:
            self.finished = True
        return item


class StreamReader:
    """A streamed response body as it passes: decoded (gzip, br, zstd, ...) and read as SSE.

    The client gets the original bytes. A body that cannot be decoded, or that passes `limit`
    decoded bytes, is relayed and read no more (`readable` turns False).
    """

    def __init__(self, route_type: RouteType, content_encoding: str, limit: int) -> None:
        self.sse = SseStream(route_type)
        self.unsupported: Malformed | None = None
        self._decoder: BodyDecoder | None = None
        try:
            self._decoder = BodyDecoder(content_encoding, limit)
        except UnsupportedEncoding as e:
            self.unsupported = Malformed("unsupported_encoding", str(e))

    @property
    def finished(self) -> bool:
        return self.sse.finished

    @property
    def readable(self) -> bool:
        return self._decoder is not None

    def feed(self, chunk: bytes) -> list[StreamItem]:
        if self._decoder is None:
            return []
        try:
            return self.sse.feed(self._decoder.feed(chunk))
        except BodyTooLarge as e:
            self._decoder = None
            return [Malformed("too_large", str(e))]
        except Exception as e:  # a corrupt compressed stream: relay it, meter nothing more
            self._decoder = None
            return [Malformed("invalid_encoding", str(e)[:200])]
