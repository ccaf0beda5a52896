"""A simulated OpenAI HTTP API upstream (Chat Completions, Responses, Embeddings, the legacy Completions,
audio transcriptions, translations and speech, image generation and edits, Realtime WebRTC calls and
client secrets), for tests and the demo.

A real aiohttp server on localhost that the gateway forwards to, answering enough of each API
(JSON bodies, server-sent event streams, the Responses API's WebSocket mode) for the official
`openai` SDK. Metering can only be checked against ground truth, so the simulator keeps an exact
ledger of every usage object it sent; tests compare the gateway's metrics with it. Misbehaviour
(compression, error statuses, malformed bodies, truncated or held-back streams, latency, a stream
left open after its last event) is requested per request through `x-sim-*` headers, which the SDK
sends as `extra_headers`; `x-sim-text` sets what the model answers.

Endpoints are matched by path suffix, whatever the prefix (/v1, Azure's /openai/deployments/<name>);
any other request gets a passthrough body that happens to carry usage, which must never be metered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import functools
import itertools
import json
import math
import operator
import random
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import brotli
from aiohttp import WSMsgType, web

from ai_gateway_tools.simulators.realtime import SentUsage, resolve_model
from ai_gateway_tools.simulators.served import command_line

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd  # what mitmproxy installs before 3.14

DEFAULT_MODEL = "gpt-4o-mini"  # for requests without a body model, as Azure's deployment URLs send them
EMBEDDING_DIMENSIONS = 16  # real models return 1536 or more; small keeps tests fast
MAX_DIMENSIONS = 4096
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb, for embeddings' token counts
CREATED = 1_756_339_200  # 2025-08-28: fixed so that replies are reproducible
TEXT = "Hello from the simulated upstream"
# Seconds stop() lets replies in flight finish before cancelling them (aiohttp waits twice over):
# a stream held at a gate nobody opens must not hold up the end of a test.
SHUTDOWN_GRACE = 0.1
MAX_REQUEST_BYTES = 64 * 2**20
MALFORMED_KINDS = ("json", "usage", "sse")

_DELTAS = [word if i == 0 else f" {word}" for i, word in enumerate(TEXT.split())]
_BROKEN_EVENT = '{"object": "broken", "choices": ['  # what the sse kind slips in before the usage


class RequestError(Exception):
    """A request the simulator refuses, answered the way OpenAI answers: a status and an error object."""

    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "message": message,
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": param,
            "code": code,
        }


@dataclass(frozen=True)
class SeenRequest:
    """A request as the upstream saw it, to check what the gateway forwarded (stream_options, model)."""

    method: str
    path: str  # with the query, as sent
    headers: list[tuple[str, str]]  # lower-cased names, every value, in arrival order
    body: bytes


@dataclass(frozen=True)
class Overrides:
    """What a request's x-sim-* headers ask of its reply; the defaults are a well-behaved upstream.

    A non-streaming body counts as a single message: truncate, gate and the sse kind of malformed
    only change streams. Content-Encoding does not apply to the WebSocket mode.
    """

    encoding: str = "identity"
    status: int | None = None
    malformed: str | None = None
    truncate: bool = False
    gate: str | None = None
    delay: float = 0.0  # seconds before each streamed message; before the body when not streaming
    linger: float = 0.0  # seconds a stream stays open after its last event, before its end
    text: str = TEXT  # x-sim-text: what the model answers (Chat, Responses, Completions), a word per delta

    @property
    def deltas(self) -> list[str]:
        return [word if i == 0 else f" {word}" for i, word in enumerate(self.text.split())]

    async def pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)


@dataclass(frozen=True)
class _Exchange:
    """One reply: to an HTTP request, or to one response.create of a WebSocket connection."""

    session_id: str  # the HTTP request's id; for WebSocket, the connection's
    serial: int  # numbers the reply's object ids
    kind: str
    request_model: str
    response_model: str
    stream: bool
    overrides: Overrides

    def sent(self, usage: dict[str, Any]) -> SentUsage:
        return SentUsage(self.session_id, self.kind, self.request_model, self.response_model, "completed", usage)


@dataclass(frozen=True)
class _Message:
    """One JSON body, SSE event or WebSocket frame of a reply."""

    body: dict[str, Any] | str | bytes  # a JSON document, raw text (SSE's [DONE], something malformed), or audio
    name: str | None = None  # the SSE `event:` field
    usage_at: tuple[str, ...] | None = None  # where the body carries usage that counts
    malformed: bool = False
    content_type: str = "application/json"  # of a whole body
    characters: SentUsage | None = None  # speech: the characters of its input, ledgered as this message goes

    @property
    def text(self) -> str:
        if isinstance(self.body, bytes):
            return self.body.decode("latin-1")
        return self.body if isinstance(self.body, str) else json.dumps(self.body)

    @property
    def payload(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else self.text.encode()

    @property
    def usage(self) -> dict[str, Any] | None:
        if self.usage_at is None or not isinstance(self.body, dict):
            return None
        return functools.reduce(operator.getitem, self.usage_at, self.body)

    @property
    def sse(self) -> bytes:
        event = f"event: {self.name}\n" if self.name else ""
        return f"{event}data: {self.text}\n\n".encode()


Send = Callable[[_Message], Awaitable[None]]


@dataclass(frozen=True)
class _Encoder:
    """A Content-Encoding applied incrementally: each chunk comes out flushed, decodable on arrival,
    so that a compressed event stream still reaches the client event by event."""

    chunk: Callable[[bytes], bytes]
    finish: Callable[[], bytes]

    def whole(self, data: bytes) -> bytes:
        return self.chunk(data) + self.finish()


def _zlib_encoder(wbits: int) -> _Encoder:
    compressor = zlib.compressobj(wbits=wbits)
    return _Encoder(lambda data: compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH), compressor.flush)


def _brotli_encoder() -> _Encoder:
    compressor = brotli.Compressor()
    return _Encoder(lambda data: compressor.process(data) + compressor.flush(), compressor.finish)


def _zstd_encoder() -> _Encoder:
    compressor = zstd.ZstdCompressor()
    return _Encoder(lambda data: compressor.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK), compressor.flush)


ENCODERS: dict[str, Callable[[], _Encoder]] = {
    "identity": lambda: _Encoder(lambda data: data, lambda: b""),
    "gzip": lambda: _zlib_encoder(16 + zlib.MAX_WBITS),
    "deflate": lambda: _zlib_encoder(zlib.MAX_WBITS),  # HTTP's deflate is zlib-wrapped
    "br": _brotli_encoder,
    "zstd": _zstd_encoder,
}


def _choice(headers: Mapping[str, str], name: str, choices: Sequence[str]) -> str | None:
    value = headers.get(name)
    if value is None or value in choices:
        return value
    raise RequestError(f"{name} must be one of {', '.join(choices)}", "invalid_sim_header", name)


def _number(headers: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    if value.isdigit() and low <= int(value) <= high:
        return int(value)
    raise RequestError(f"{name} must be an integer from {low} to {high}", "invalid_sim_header", name)


def read_overrides(headers: Mapping[str, str]) -> Overrides:
    """The x-sim-* headers; a value the simulator does not know is refused with 400, not ignored,
    so that a typo in a test fails loudly."""
    return Overrides(
        encoding=_choice(headers, "x-sim-encoding", list(ENCODERS)) or "identity",
        status=_number(headers, "x-sim-status", 400, 599),
        malformed=_choice(headers, "x-sim-malformed", MALFORMED_KINDS),
        truncate=_choice(headers, "x-sim-truncate", ("0", "1")) == "1",
        gate=headers.get("x-sim-gate") or None,
        delay=(_number(headers, "x-sim-delay-ms", 0, 60_000) or 0) / 1000,
        linger=(_number(headers, "x-sim-linger-ms", 0, 60_000) or 0) / 1000,
        text=headers.get("x-sim-text") or TEXT,
    )


def _simulated_error(status: int) -> RequestError:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = f"HTTP {status}"
    return RequestError(f"simulated {status} {phrase}", phrase.lower().replace(" ", "_"), status=status)


def _maybe(rng: random.Random, chance: float, high: int) -> int:
    """A count that is often zero, as audio or reasoning tokens are for most requests."""
    return rng.randint(1, high) if rng.random() < chance else 0


def _chat_usage(rng: random.Random) -> dict[str, Any]:
    """Chat Completions usage, internally consistent the way OpenAI's is (details within their totals)."""
    text_in, audio_in = rng.randint(1, 4000), _maybe(rng, 0.25, 500)
    text_out, reasoning, audio_out = rng.randint(1, 500), _maybe(rng, 0.5, 2000), _maybe(rng, 0.25, 1000)
    accepted = rng.randint(0, text_out) if rng.random() < 0.25 else 0
    rejected = _maybe(rng, 0.5, 100) if accepted else 0
    prompt, completion = text_in + audio_in, text_out + reasoning + audio_out + rejected
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": rng.randint(0, prompt), "audio_tokens": audio_in},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": audio_out,
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": rejected,
        },
    }


def _responses_usage(rng: random.Random) -> dict[str, Any]:
    input_tokens, reasoning = rng.randint(1, 4000), _maybe(rng, 0.5, 2000)
    output_tokens = rng.randint(1, 500) + reasoning
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": rng.randint(0, input_tokens)},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def _chat(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """A chat.completion, or its chunks; usage is streamed only when stream_options ask for it."""
    usage = _chat_usage(rng)
    base = {"id": f"chatcmpl-{exchange.serial}", "created": CREATED, "model": exchange.response_model}
    if not exchange.stream:
        message = {"role": "assistant", "content": exchange.overrides.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return [
            _Message({**base, "object": "chat.completion", "choices": [choice], "usage": usage}, usage_at=("usage",))
        ]
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    # With include_usage every chunk carries "usage": null, as OpenAI's do.
    chunk = {**base, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}
    words = exchange.overrides.deltas
    deltas = [{"role": "assistant", "content": words[0]}] + [{"content": d} for d in words[1:]] + [{}]
    finishes = [None] * len(words) + ["stop"]
    messages = [
        _Message({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
        for delta, finish in zip(deltas, finishes, strict=True)
    ]
    if include_usage:
        messages.append(_Message({**chunk, "choices": [], "usage": usage}, usage_at=("usage",)))
    return [*messages, _Message("[DONE]")]


def _responses(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """A response object, or its events (the same on SSE and on the WebSocket mode)."""
    usage = _responses_usage(rng)
    content = {"type": "output_text", "text": exchange.overrides.text, "annotations": []}
    item = {"id": f"msg_{exchange.serial}", "type": "message", "status": "completed", "role": "assistant"}
    response = {
        "id": f"resp_{exchange.serial}",
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "model": exchange.response_model,
        "output": [{**item, "content": [content]}],
        "usage": usage,
    }
    if not exchange.stream:
        return [_Message(response, usage_at=("usage",))]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        *(("response.output_text.delta", {**where, "delta": d, "logprobs": []}) for d in exchange.overrides.deltas),
        ("response.output_text.done", {**where, "text": exchange.overrides.text, "logprobs": []}),
    ]
    messages = [
        _Message({"type": name, "sequence_number": n, **fields}, name=name) for n, (name, fields) in enumerate(events)
    ]
    completed = {"type": "response.completed", "sequence_number": len(events), "response": response}
    return [*messages, _Message(completed, name="response.completed", usage_at=("response", "usage"))]


def _embeddings(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """One vector per input; tokens are counted from the input, as the real API does."""
    inputs = _embedding_inputs(request.get("input"))
    dimensions = request.get("dimensions", EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or not 0 < dimensions <= MAX_DIMENSIONS:
        raise RequestError(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", "invalid_value", "dimensions")
    encoding_format = request.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise RequestError("encoding_format must be float or base64", "invalid_value", "encoding_format")
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(item, dimensions, encoding_format == "base64")}
        for i, item in enumerate(inputs)
    ]
    tokens = sum(
        max(1, math.ceil(len(item) / CHARS_PER_TOKEN)) if isinstance(item, str) else len(item) for item in inputs
    )
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    document = {"object": "list", "data": data, "model": exchange.response_model, "usage": usage}
    return [_Message(document, usage_at=("usage",))]


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """`input` as the API takes it: a string, a token array, or a list of either."""

    def is_tokens(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(isinstance(token, int) for token in item)

    if isinstance(value, str) or is_tokens(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) or is_tokens(item) for item in value):
        return value
    raise RequestError("input must be a string, a token array, or a non-empty list of them", "invalid_value", "input")


def _embedding(item: str | list[int], dimensions: int, as_base64: bool) -> list[float] | str:
    """The same input always gets the same vector. The openai SDK asks for base64 (little-endian
    float32) unless told otherwise, and decodes it itself."""
    vector_rng = random.Random(repr(item))
    vector = [round(vector_rng.uniform(-1, 1), 6) for _ in range(dimensions)]
    return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector


def _text_completion(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """The legacy Completions API: a text_completion, or its chunks (usage as Chat Completions streams it)."""
    completion = rng.randint(1, 500)
    prompt = rng.randint(1, 4000)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    base = {"id": f"cmpl-{exchange.serial}", "object": "text_completion", "created": CREATED}
    base["model"] = exchange.response_model
    if not exchange.stream:
        choice = {"text": exchange.overrides.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        return [_Message({**base, "choices": [choice], "usage": usage}, usage_at=("usage",))]
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    finishes = [None] * (len(exchange.overrides.deltas) - 1) + ["stop"]
    messages = [
        _Message({**base, "choices": [{"text": delta, "index": 0, "logprobs": None, "finish_reason": finish}]})
        for delta, finish in zip(exchange.overrides.deltas, finishes, strict=True)
    ]
    if include_usage:
        messages.append(_Message({**base, "choices": [], "usage": usage}, usage_at=("usage",)))
    return [*messages, _Message("[DONE]")]


def _transcription_usage(model: str, rng: random.Random) -> dict[str, Any]:
    """whisper-1 bills by duration; the gpt-4o transcribe models by tokens (audio and text prompt in)."""
    if model.startswith("whisper"):
        return {"type": "duration", "seconds": rng.randint(1, 600) / 4}
    audio, text = rng.randint(1, 3000), _maybe(rng, 0.5, 200)
    output = rng.randint(1, 400)
    return {
        "type": "tokens",
        "input_tokens": audio + text,
        "input_token_details": {"text_tokens": text, "audio_tokens": audio},
        "output_tokens": output,
        "total_tokens": audio + text + output,
    }


def _transcription(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """A transcript (or translation) as json, verbose_json, plain text (no usage) or transcript.text.* events."""
    usage = _transcription_usage(exchange.request_model, rng)
    response_format = request.get("response_format", "json")
    if exchange.stream:
        deltas = [
            _Message({"type": "transcript.text.delta", "delta": delta, "logprobs": []}, name="transcript.text.delta")
            for delta in _DELTAS
        ]
        done = {"type": "transcript.text.done", "text": TEXT, "logprobs": [], "usage": usage}
        return [*deltas, _Message(done, name="transcript.text.done", usage_at=("usage",))]
    if response_format in ("text", "srt", "vtt"):
        return [_Message(TEXT, content_type="text/plain; charset=utf-8")]
    document: dict[str, Any] = {"text": TEXT, "usage": usage}
    if response_format == "verbose_json":
        task = "translate" if exchange.kind == "translation" else "transcribe"
        document = {"task": task, "language": "english", "duration": 2.5, **document, "segments": []}
    return [_Message(document, usage_at=("usage",))]


SPEECH_AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 4  # an MP3 head and some frames


def _speech(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """Audio bytes (no usage: the gateway counts the input's characters), or speech.audio.* events
    whose done event has token usage (stream_format: sse)."""
    text = request.get("input")
    if not isinstance(text, str) or not text:
        raise RequestError("input must be a non-empty string", "invalid_value", "input")
    characters = exchange.sent({"characters": len(text)})
    if not exchange.stream:  # the response is counted with its characters
        return [_Message(SPEECH_AUDIO, content_type="audio/mpeg", characters=replace(characters, kind="speech_audio"))]
    characters = replace(characters, kind="speech_characters")
    chunk = base64.b64encode(SPEECH_AUDIO).decode()
    deltas = [_Message({"type": "speech.audio.delta", "audio": chunk}, name="speech.audio.delta") for _ in range(3)]
    text_in, audio_out = max(1, len(text) // CHARS_PER_TOKEN), rng.randint(1, 2000)
    usage = {"input_tokens": text_in, "output_tokens": audio_out, "total_tokens": text_in + audio_out}
    done = {"type": "speech.audio.done", "usage": usage}
    return [*deltas, _Message(done, name="speech.audio.done", usage_at=("usage",), characters=characters)]


PNG_DATA = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()


def _images(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """Generated (or edited) images with gpt-image-1's token usage: text and image tokens in (an
    edit's input images), image tokens out; partial_image and completed events when streamed."""
    text_in, image_in = rng.randint(1, 200), rng.randint(1, 2000) if exchange.kind == "image_edit" else 0
    output = rng.randint(200, 6000)
    usage = {
        "input_tokens": text_in + image_in,
        "input_tokens_details": {"text_tokens": text_in, "image_tokens": image_in},
        "output_tokens": output,
        "total_tokens": text_in + image_in + output,
    }
    if not exchange.stream:
        document = {"created": CREATED, "data": [{"b64_json": PNG_DATA}], "usage": usage}
        return [_Message(document, usage_at=("usage",))]
    prefix = "image_edit" if exchange.kind == "image_edit" else "image_generation"
    partial = {"type": f"{prefix}.partial_image", "b64_json": PNG_DATA, "partial_image_index": 0}
    completed = {"type": f"{prefix}.completed", "b64_json": PNG_DATA, "created_at": CREATED, "usage": usage}
    return [
        _Message(partial, name=partial["type"]),
        _Message(completed, name=completed["type"], usage_at=("usage",)),
    ]


def _compact(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """POST /responses/compact: a compacted conversation, billed with Responses usage."""
    compacted = {"type": "compaction", "id": f"cmp_{exchange.serial}", "encrypted_content": "opaque"}
    document = {
        "id": f"resp_{exchange.serial}",
        "object": "response.compaction",
        "created_at": CREATED,
        "output": [compacted],
        "usage": _responses_usage(rng),
    }
    return [_Message(document, usage_at=("usage",))]


def _realtime_call(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """POST /realtime/calls: the SDP answer of a WebRTC call (its media then goes elsewhere)."""
    return [_Message(f"v=0\r\no=- {exchange.serial} 2 IN IP4 127.0.0.1\r\ns=-\r\n", content_type="application/sdp")]


def _client_secret(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """POST /realtime/client_secrets: an ephemeral key for a browser's Realtime session."""
    session = request.get("session") if isinstance(request.get("session"), dict) else {}
    model = session.get("model", "gpt-realtime")
    document = {
        "value": f"ek_{exchange.serial}",
        "expires_at": CREATED + 600,
        "session": {"type": "realtime", "model": model},
    }
    return [_Message(document)]


def _passthrough(exchange: _Exchange, request: dict[str, Any], rng: random.Random) -> list[_Message]:
    """Any other endpoint: a list (so that the SDK's list calls parse it) that happens to carry usage."""
    document = {"object": "list", "data": [], "model": exchange.response_model, "usage": _chat_usage(rng)}
    return [_Message(document, usage_at=("usage",))]


Build = Callable[[_Exchange, dict[str, Any], random.Random], list[_Message]]


@dataclass(frozen=True)
class _Route:
    kind: str  # the ledger's kind
    build: Build
    streams: bool  # whether `stream: true` turns the reply into server-sent events
    body: str = "json"  # the request: json, multipart (an upload: its form fields are the request) or sdp
    stream_when: tuple[str, Any] = ("stream", True)  # the request member that asks for a stream
    names_model: bool = True  # the reply names the model (else the ledger's response model is unknown)


# POST endpoints by path suffix (the longest that matches); anything else is passthrough.
ROUTES = {
    "/chat/completions": _Route("chat", _chat, streams=True),
    "/completions": _Route("text_completion", _text_completion, streams=True),
    "/responses": _Route("responses", _responses, streams=True),
    "/responses/compact": _Route("responses", _compact, streams=False, names_model=False),
    "/embeddings": _Route("embeddings", _embeddings, streams=False),
    "/audio/transcriptions": _Route("http_transcription", _transcription, True, body="multipart", names_model=False),
    "/audio/translations": _Route("translation", _transcription, streams=False, body="multipart", names_model=False),
    "/audio/speech": _Route("speech", _speech, True, names_model=False, stream_when=("stream_format", "sse")),
    "/images/generations": _Route("image_generation", _images, streams=True, names_model=False),
    "/images/edits": _Route("image_edit", _images, streams=True, body="multipart", names_model=False),
    "/realtime/calls": _Route("realtime_call", _realtime_call, streams=False, body="sdp", names_model=False),
    "/realtime/client_secrets": _Route("client_secret", _client_secret, streams=False, names_model=False),
}
PASSTHROUGH = _Route("passthrough", _passthrough, streams=False)


def _route(method: str, path: str) -> _Route:
    if method == "POST":
        for suffix in sorted(ROUTES, key=len, reverse=True):
            if path.endswith(suffix):
                return ROUTES[suffix]
    return PASSTHROUGH


def _form(content_type: str, body: bytes) -> dict[str, Any]:
    """A multipart upload's fields (`stream` as the SDK sends it, the string "true"); files are dropped."""
    if not content_type.startswith("multipart/form-data"):
        raise RequestError("The body must be multipart/form-data.", "invalid_request")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and part.get_filename() is None:
            fields[name] = part.get_content()
    if "stream" in fields:
        fields["stream"] = fields["stream"] == "true"
    return fields


def _json_object(data: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise RequestError("We could not parse the JSON body of your request.", "invalid_json") from None
    if not isinstance(value, dict):
        raise RequestError("The body must be a JSON object.", "invalid_json")
    return value


def _exchange(
    kind: str, serial: int, session_id: str, model: Any, stream: bool, overrides: Overrides, names_model: bool = True
) -> _Exchange:
    requested = model if isinstance(model, str) and model else None
    return _Exchange(
        session_id=session_id,
        serial=serial,
        kind=kind,
        request_model=requested or "unknown",
        response_model=resolve_model(requested or DEFAULT_MODEL) if names_model else "unknown",
        stream=stream,
        overrides=overrides,
    )


def _replaced(document: dict[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of the document with the value at path replaced."""
    head, *rest = path
    return {**document, head: _replaced(document[head], rest, value) if rest else value}


def _unparseable(message: _Message) -> _Message:
    """The usage-carrying message cut in half: a JSON object's proper prefix is never valid JSON."""
    return replace(message, body=message.text[: len(message.text) // 2], usage_at=None, malformed=True)


def _misshapen(message: _Message) -> _Message:
    """Valid JSON whose usage has the wrong shape: every count a string."""
    assert isinstance(message.body, dict) and message.usage_at is not None and message.usage is not None
    wrong = {key: str(value) if isinstance(value, int) else value for key, value in message.usage.items()}
    return replace(message, body=_replaced(message.body, message.usage_at, wrong), usage_at=None, malformed=True)


_SPOIL: dict[str, Callable[[_Message], _Message]] = {"json": _unparseable, "usage": _misshapen}


def _misbehave(messages: list[_Message], overrides: Overrides, stream: bool) -> list[_Message]:
    """What x-sim-truncate and x-sim-malformed make of a reply."""
    if stream and overrides.truncate:
        # Every stream has at least four messages, and its usage and end are in the second half.
        messages = messages[: len(messages) // 2]
    kind = overrides.malformed
    usage_index = next((i for i, m in enumerate(messages) if m.usage_at is not None), None)
    if kind == "sse" and stream:
        at = len(messages) - 1 if usage_index is None else usage_index
        broken = _Message(_BROKEN_EVENT, name=messages[at].name, malformed=True)
        return [*messages[:at], broken, *messages[at:]]
    if kind in _SPOIL and usage_index is not None:
        return [*messages[:usage_index], _SPOIL[kind](messages[usage_index]), *messages[usage_index + 1 :]]
    return messages


def _headers(session_id: str, content_type: str, encoding: str) -> dict[str, str]:
    headers = {"Content-Type": content_type, "x-request-id": session_id}
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    return headers


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


class HttpSimulator:
    """The simulated upstream. Start and stop it on an event loop, or run it with
    `SimulatorThread(server=HttpSimulator())` for synchronous callers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, seed: int = 0) -> None:
        self.host = host
        self.port = port
        self.ledger: list[SentUsage] = []
        self.requests: list[SeenRequest] = []
        self.malformed_sent = 0
        self._rng = random.Random(seed)
        self._serials = itertools.count(1)
        self._gates: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def usage_for(self, request_model: str) -> list[SentUsage]:
        return [u for u in self.ledger if u.request_model == request_model]

    def open_gate(self, name: str) -> None:
        """Lets the streams held at gate `name` go on; safe from any thread. An open gate stays open."""
        if self._loop is None:
            raise RuntimeError("the simulator is not running")
        self._loop.call_soon_threadsafe(lambda: self._gate(name).set())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in request.raw_headers]
        self.requests.append(SeenRequest(request.method, request.raw_path, headers, body))
        serial = next(self._serials)
        session_id = f"req_{serial}"
        overrides = Overrides()  # a refused x-sim-* header gets a plain error
        try:
            overrides = read_overrides(request.headers)
            if overrides.status is not None:
                raise _simulated_error(overrides.status)
            if _is_websocket(request):
                return await self._websocket(request, session_id, overrides)
            return await self._reply(request, serial, session_id, body, overrides)
        except RequestError as error:
            encoder = ENCODERS[overrides.encoding]()
            return web.Response(
                status=error.status,
                body=encoder.whole(json.dumps({"error": error.body}).encode()),
                headers=_headers(session_id, "application/json", overrides.encoding),
            )

    async def _reply(
        self, request: web.Request, serial: int, session_id: str, body: bytes, overrides: Overrides
    ) -> web.StreamResponse:
        route = _route(request.method, request.path)
        document: dict[str, Any] = {}
        if route.body == "multipart":
            document = _form(request.headers.get("content-type", ""), body)
        elif route is not PASSTHROUGH and route.body == "json":
            document = _json_object(body)
        else:
            with contextlib.suppress(RequestError):
                document = _json_object(body)  # a passthrough body need not be JSON
        key, value = route.stream_when
        stream = route.streams and document.get(key) == value and type(document.get(key)) is type(value)
        model = document.get("model")
        exchange = _exchange(route.kind, serial, session_id, model, stream, overrides, route.names_model)
        messages = route.build(exchange, document, self._rng)
        send_reply = self._send_events if stream else self._send_body
        return await send_reply(request, exchange, messages)

    async def _send_body(self, request: web.Request, exchange: _Exchange, messages: list[_Message]) -> web.Response:
        encoding = exchange.overrides.encoding
        encoder = ENCODERS[encoding]()
        response = web.Response(headers=_headers(exchange.session_id, messages[0].content_type, encoding))

        async def send(message: _Message) -> None:
            response.body = encoder.whole(message.payload)
            await response.prepare(request)
            await response.write_eof()

        with contextlib.suppress(ConnectionResetError):  # the client left
            await self._stream(exchange, messages, send)
        return response

    async def _send_events(
        self, request: web.Request, exchange: _Exchange, messages: list[_Message]
    ) -> web.StreamResponse:
        """Server-sent events, each written (and so handed to the socket) as soon as it is made."""
        encoding = exchange.overrides.encoding
        encoder = ENCODERS[encoding]()
        response = web.StreamResponse(headers=_headers(exchange.session_id, "text/event-stream", encoding))
        if exchange.overrides.truncate:
            response.force_close()  # the stream ends cleanly, and the connection with it
        await response.prepare(request)

        async def send(message: _Message) -> None:
            await response.write(encoder.chunk(message.sse))

        with contextlib.suppress(ConnectionResetError):  # the client left
            await self._stream(exchange, messages, send)
            await asyncio.sleep(exchange.overrides.linger)  # a client that stops at [DONE] has left by then
            await response.write(encoder.finish())
            await response.write_eof()
        return response

    async def _websocket(self, request: web.Request, session_id: str, overrides: Overrides) -> web.StreamResponse:
        """The Responses API's WebSocket mode: each response.create frame gets a response's events."""
        if not request.path.endswith("/responses"):
            raise RequestError("WebSocket mode is only served at .../responses", "not_found", status=404)
        ws = web.WebSocketResponse()
        ws.headers["x-request-id"] = session_id
        await ws.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client left
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._ws_respond(ws, request.query.get("model"), session_id, overrides, frame.data)
        return ws

    async def _ws_respond(
        self, ws: web.WebSocketResponse, query_model: str | None, session_id: str, overrides: Overrides, text: str
    ) -> None:
        try:
            event = _json_object(text)
        except RequestError as error:
            await ws.send_str(json.dumps({"type": "error", "status": error.status, "error": error.body}))
            return
        if event.get("type") != "response.create":
            return  # other client events are ignored, as a lenient upstream would
        serial = next(self._serials)
        exchange = _exchange("responses", serial, session_id, event.get("model") or query_model, True, overrides)
        await self._stream(exchange, _responses(exchange, event, self._rng), lambda message: ws.send_str(message.text))
        if overrides.truncate:
            await ws.close()

    async def _stream(self, exchange: _Exchange, messages: list[_Message], send: Send) -> None:
        """Sends a reply's messages, misbehaving as asked; a gate holds back all but the first."""
        overrides = exchange.overrides
        for i, message in enumerate(_misbehave(messages, overrides, exchange.stream)):
            if i == 1 and overrides.gate is not None:
                await self._gate(overrides.gate).wait()
            await overrides.pause()
            await self._send(exchange, message, send)

    async def _send(self, exchange: _Exchange, message: _Message, send: Send) -> None:
        """Ledgered and counted before sending, so that no reader sees usage the ledger lacks; taken
        back if the client had gone, so that the records hold only what went out."""
        usage = message.usage
        entries = [] if usage is None else [exchange.sent(usage)]
        entries += [message.characters] if message.characters is not None else []
        self.ledger += entries
        self.malformed_sent += message.malformed
        try:
            await send(message)
        except ConnectionResetError:
            for entry in entries:
                self.ledger.remove(entry)
            self.malformed_sent -= message.malformed
            raise


def main(argv: Sequence[str] | None = None) -> None:
    command_line("OpenAI HTTP", lambda args: HttpSimulator(host=args.host, port=args.port, seed=args.seed), argv)


if __name__ == "__main__":
    main()
