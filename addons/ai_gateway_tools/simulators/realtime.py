"""A simulated OpenAI Realtime API upstream, for tests and the demo.

A real WebSocket server on localhost that speaks enough of the Realtime protocol (GA and beta
event names, OpenAI and Azure URLs, transcription sessions) for the official `openai` SDK to
drive sessions through the gateway. Metering can only be checked against ground truth, so the
simulator keeps an exact ledger of every usage object it sent; tests compare the gateway's
metrics with it. Per-response misbehaviour (statuses, fragmented frames, malformed frames) is
requested through `response.create`'s `response.metadata`, which the SDK passes through. With
server VAD (`turn_detection` set by session.update) appended audio makes voice turns: speech
starts, stops after `vad_speech_bytes`, and the upstream starts a response by itself.

For guardrail tests: every client event received is kept in `received` (an audio append without
its audio); `sim_transcript` in `response.metadata` makes a response say that text, a word per
transcript delta, each after an audio delta of its own (as speech streams); `user_transcript`
is what the transcription of the user's speech says. A `conversation.item.delete` is answered
with `conversation.item.deleted`.

What a voice agent's debugging depends on behaves as OpenAI's does: `response.cancel` stops the
response's deltas at once and ends it `cancelled`, billed for what it produced; a response asked
for with `sim_function_call` calls that tool (a `function_call` output item, its arguments
streamed), whose result the client adds with `conversation.item.create`; and
`conversation.item.truncate` is acknowledged with `conversation.item.truncated`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import random
import re
import ssl
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol, overload
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ai_gateway_tools.simulators.served import Served, command_line

SNAPSHOT_DATE = "2025-08-28"
DEFAULT_MODEL = "gpt-realtime"
TRANSCRIPTION_MODEL = "gpt-4o-transcribe"
RESPONSE_STATUSES = ("completed", "cancelled", "failed", "incomplete")
PCM16_BYTES_PER_SECOND = 24_000 * 2  # the Realtime API's default audio: 24 kHz mono PCM16
MAX_CLIENT_FRAME = 15 * 2**20  # OpenAI accepts audio appends up to 15 MiB

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_TRANSCRIPT = ["Hello", "from", "the", "simulated", "upstream"]
DEFAULT_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'  # a function call's arguments unless sim_arguments says
ITEM_TYPES = ("message", "function_call", "function_call_output")
MAX_OUTPUT_ITEMS = 1024  # assistant items a session remembers for conversation.item.truncate
# Session keys a session.update cannot change.
_FIXED_SESSION_KEYS = frozenset({"type", "object", "id", "model"})
_RATE_LIMITS = [
    {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
    {"name": "tokens", "limit": 40000, "remaining": 36000, "reset_seconds": 6.0},
]
# The reference's response.done usage, the base of the malformed variants in junk_frames().
EXAMPLE_USAGE: dict[str, Any] = {
    "total_tokens": 253,
    "input_tokens": 132,
    "output_tokens": 121,
    "input_token_details": {
        "text_tokens": 119,
        "audio_tokens": 13,
        "image_tokens": 0,
        "cached_tokens": 64,
        "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 30, "audio_tokens": 91},
}


@dataclass(frozen=True)
class SentUsage:
    """One usage object as it went out on the wire: the ground truth for the gateway's metrics."""

    session_id: str
    kind: str  # "response", "transcription", or "unbilled_response" (a response.done whose usage is unusable)
    request_model: str  # the model/deployment query value, or "unknown" when absent
    response_model: str  # resolved snapshot for responses; transcription model for transcriptions
    status: str  # response status; "completed" for transcriptions
    usage: dict[str, Any]


@dataclass(frozen=True)
class Handshake:
    """An opening handshake as the upstream saw it, to check what the gateway forwarded."""

    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]  # lower-cased names, every value, in arrival order
    session_id: str | None  # None when the handshake was rejected


KEY_ORDERS = ("openai", "sorted", "event_id_first")


@dataclass(frozen=True)
class Dialect:
    """Where the GA and beta protocols differ: event names and the session's layout."""

    audio_delta: str
    transcript_delta: str
    text_delta: str
    modalities_key: str
    default_modalities: tuple[str, ...]
    transcription_path: tuple[str, ...]  # where the session keeps its transcription config
    typed_sessions: bool  # GA sessions carry session.type
    turn_detection_path: tuple[str, ...] = ("audio", "input", "turn_detection")
    item_added: tuple[str, ...] = ("conversation.item.added", "conversation.item.done")  # a client's item, acknowledged


GA = Dialect(
    audio_delta="response.output_audio.delta",
    transcript_delta="response.output_audio_transcript.delta",
    text_delta="response.output_text.delta",
    modalities_key="output_modalities",
    default_modalities=("audio",),
    transcription_path=("audio", "input", "transcription"),
    typed_sessions=True,
)
BETA = Dialect(
    audio_delta="response.audio.delta",
    transcript_delta="response.audio_transcript.delta",
    text_delta="response.text.delta",
    modalities_key="modalities",
    default_modalities=("audio", "text"),
    transcription_path=("input_audio_transcription",),
    typed_sessions=False,
    turn_detection_path=("turn_detection",),
    item_added=("conversation.item.created",),
)


class ClientError(Exception):
    """A client event the simulator refuses; it becomes an `error` event and the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass
class _Session:
    """One connection's protocol state."""

    id: str
    ws: ServerConnection
    tasks: asyncio.TaskGroup  # the responses in flight
    dialect: Dialect
    request_model: str
    model: str | None  # None in a transcription session
    config: dict[str, Any]
    buffered_audio: int = 0  # bytes appended since the last commit
    speech_item: str | None = None  # the item of the speech server VAD heard start and not yet stop
    # The responses in progress, each with the event response.cancel sets to stop it.
    active_responses: dict[str, asyncio.Event] = field(default_factory=dict)
    output_items: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_OUTPUT_ITEMS))
    last_item: str | None = None  # the conversation's last item, the previous_item_id of the next
    transcriptions: int = 0
    responses: int = 0  # responses created so far

    @property
    def transcription_model(self) -> str | None:
        model = _get_path(self.config, (*self.dialect.transcription_path, "model"))
        return model if isinstance(model, str) else None

    @property
    def server_vad(self) -> dict[str, Any] | None:
        """The turn detection config when it is server VAD (set by session.update), else None."""
        detection = _get_path(self.config, self.dialect.turn_detection_path)
        return detection if isinstance(detection, dict) and detection.get("type") == "server_vad" else None


@dataclass(frozen=True)
class _Plan:
    """What one response.create asked for, with its sim_* overrides applied."""

    status: str
    fragment: bool
    junk: int  # times junk_frames() goes out before response.done
    fault: str | None
    audio: bool
    audio_deltas: int
    metadata: dict[str, Any] | None
    usage_null: bool  # response.done says `usage: null`, as the SDK's types allow
    repeat_done: bool  # response.done goes out twice, as a faulty upstream might send it
    delta_interval: float  # seconds from one delta to the next (0: back to back)
    transcript: str | None = None  # sim_transcript: what the response says, a word per delta
    function_call: str | None = None  # the tool the response calls instead of speaking
    arguments: str = DEFAULT_ARGUMENTS


def resolve_model(model: str | None) -> str:
    """The snapshot a request model resolves to, as session.created reports it."""
    if not model:
        model = DEFAULT_MODEL
    return model if _DATE_SUFFIX.search(model) else f"{model}-{SNAPSHOT_DATE}"


def junk_frames() -> list[str | bytes]:
    """Malformed frames a broken or hostile upstream might send; none of them is billable usage."""
    return [
        b'\x00\xff{"type":"response.done"\x80',  # binary: the Realtime API only sends text
        "this is not JSON",
        _junk_done(EXAMPLE_USAGE)[:80],  # truncated
        _junk_done(None),
        _junk_done("253 tokens"),
        _junk_done({**EXAMPLE_USAGE, "output_tokens": -121}),
        _junk_done({**EXAMPLE_USAGE, "input_tokens": 132.0}),
        _junk_done({**EXAMPLE_USAGE, "input_tokens": True}),
        _junk_done({**EXAMPLE_USAGE, "input_tokens": 1e30}),
        _junk_done({**EXAMPLE_USAGE, "input_tokens": 10**20}),
        "[]",
        '"response.done"',
        _junk_done("x" * 65_536),  # huge
        '{"type":"response.done","response":' + "[" * 50_000 + "]" * 50_000 + "}",  # deeply nested
    ]


def is_unbilled_response(frame: str | bytes) -> bool:
    """A `response.done` text event whose response object is readable but whose usage is not: the
    response happened (it counts, with its status), its tokens cannot be known."""
    try:
        event = json.loads(frame) if isinstance(frame, str) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(event, dict) and event.get("type") == "response.done" and isinstance(event.get("response"), dict)


def _junk_done(usage: Any) -> str:
    response = {"object": "realtime.response", "id": "resp_junk", "status": "completed", "usage": usage}
    return json.dumps({"type": "response.done", "event_id": "event_junk", "response": response})


def _response_usage(rng: random.Random) -> dict[str, Any]:
    """A response.done usage, internally consistent the way OpenAI's is (cached within input)."""
    text_in, audio_in = rng.randint(1, 4000), rng.randint(0, 4000)
    image_in = rng.randint(1, 1500) if rng.random() < 0.25 else 0
    cached = {m: rng.randint(0, n) for m, n in (("text", text_in), ("audio", audio_in), ("image", image_in))}
    text_out, audio_out = rng.randint(0, 400), rng.randint(1, 4000)
    input_tokens, output_tokens = text_in + audio_in + image_in, text_out + audio_out
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": image_in,
            "cached_tokens": sum(cached.values()),
            "cached_tokens_details": {f"{m}_tokens": n for m, n in cached.items()},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


def _transcription_usage(rng: random.Random, nth: int, audio_bytes: int) -> dict[str, Any]:
    """Alternates token and duration billing so that a session exercises both."""
    if nth % 2:
        return {"type": "duration", "seconds": round(audio_bytes / PCM16_BYTES_PER_SECOND, 3)}
    audio_in, text_out = rng.randint(1, 600), rng.randint(1, 200)
    return {
        "type": "tokens",
        "input_tokens": audio_in,
        "output_tokens": text_out,
        "total_tokens": audio_in + text_out,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_in},
    }


def _initial_session(dialect: Dialect, session_id: str, model: str | None) -> dict[str, Any]:
    """session.created's session; model None makes a transcription session."""
    transcription_only = model is None
    session: dict[str, Any] = {}
    if dialect.typed_sessions:
        session["type"] = "transcription" if transcription_only else "realtime"
    session["object"] = "realtime.transcription_session" if transcription_only else "realtime.session"
    session["id"] = session_id
    if not transcription_only:
        session["model"] = model
        session[dialect.modalities_key] = list(dialect.default_modalities)
    transcription = {"model": TRANSCRIPTION_MODEL} if transcription_only else None
    _set_path(session, dialect.transcription_path, transcription)
    return session


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """session.update semantics: nested objects merge, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        old = base.get(key)
        merged[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _get_path(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _set_path(obj: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = value


def _fragments(text: str, count: int = 4) -> list[str]:
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _is_beta(headers: Headers) -> bool:
    """Beta is asked for by header from servers, by subprotocol from browsers."""
    beta_header = any("realtime=v1" in v for v in headers.get_all("openai-beta"))
    offered = ",".join(headers.get_all("sec-websocket-protocol")).split(",")
    return beta_header or "openai-beta.realtime-v1" in (p.strip() for p in offered)


def _select_subprotocol(_: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Browsers offer `realtime` (with the key as a second subprotocol) and need it echoed."""
    return Subprotocol("realtime") if "realtime" in offered else None


def _client_event(message: str | bytes) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise ClientError("invalid_frame", "binary frames are not accepted; send JSON text")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError) as e:
        raise ClientError("invalid_json", f"the frame is not JSON: {e}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ClientError("invalid_event", "expected a JSON object with a string type")
    return event


def _object_field(event: dict[str, Any], key: str, param: str) -> dict[str, Any]:
    """An optional object-valued field; absent or null means empty."""
    value = event.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"{param} must be an object", param)
    return value


def _count(value: Any, param: str) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ClientError("invalid_value", f"{param} must be an integer", param) from None
    if count < 0:
        raise ClientError("invalid_value", f"{param} must not be negative", param)
    return count


def _audio_length(audio: Any) -> int:
    """Bytes of PCM in an input_audio_buffer.append's base64 audio."""
    if isinstance(audio, str):
        try:
            return len(base64.b64decode(audio, validate=True))
        except binascii.Error:
            pass
    raise ClientError("invalid_value", "audio must be a base64 string", "audio")


FAULTS = ("reset", "close", "stall")


def _fault(value: Any) -> str | None:
    """sim_fault: instead of response.done, reset the TCP connection, close with 1011, or go silent."""
    if value is not None and value not in FAULTS:
        raise ClientError("invalid_value", f"sim_fault must be one of {', '.join(FAULTS)}", "response.metadata")
    return value


def _interval(value: Any) -> float:
    """sim_delta_ms: milliseconds from one delta to the next, as an upstream speaking in real time."""
    try:
        milliseconds = float(value)
    except (TypeError, ValueError):
        milliseconds = -1.0
    if not 0 <= milliseconds <= 60_000:
        raise ClientError("invalid_value", "sim_delta_ms must be a number of milliseconds", "response.metadata")
    return milliseconds / 1000


def _plan(response: dict[str, Any], session: _Session, default_deltas: int, default_interval: float) -> _Plan:
    metadata = _object_field(response, "metadata", "response.metadata")
    status = metadata.get("sim_status", "completed")
    if status not in RESPONSE_STATUSES:
        choices = ", ".join(RESPONSE_STATUSES)
        raise ClientError("invalid_value", f"sim_status must be one of {choices}", "response.metadata")
    deltas = metadata.get("sim_deltas")
    key = session.dialect.modalities_key
    modalities = response.get(key) or session.config.get(key)
    return _Plan(
        status=status,
        fragment=metadata.get("sim_fragment") == "1",
        junk=_count(metadata.get("sim_junk", "0"), "response.metadata.sim_junk"),
        fault=_fault(metadata.get("sim_fault")),
        audio=not isinstance(modalities, list) or "audio" in modalities,
        audio_deltas=default_deltas if deltas is None else _count(deltas, "response.metadata.sim_deltas"),
        metadata=response.get("metadata"),
        usage_null=metadata.get("sim_usage") == "null",
        repeat_done=metadata.get("sim_repeat_done") == "1",
        delta_interval=default_interval if "sim_delta_ms" not in metadata else _interval(metadata["sim_delta_ms"]),
        transcript=metadata.get("sim_transcript") if isinstance(metadata.get("sim_transcript"), str) else None,
        function_call=_tool_name(metadata.get("sim_function_call")),
        arguments=str(metadata.get("sim_arguments", DEFAULT_ARGUMENTS)),
    )


def _tool_name(value: Any) -> str | None:
    """sim_function_call: the response calls this tool (its arguments from sim_arguments)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ClientError("invalid_value", "sim_function_call must be a tool's name", "response.metadata")
    return value


def _cancelled_usage(usage: dict[str, Any], produced: int, planned: int) -> dict[str, Any]:
    """A cancelled response bills its whole input and the share of its output it produced."""
    details = {m: n * produced // planned if planned else 0 for m, n in usage["output_token_details"].items()}
    output = sum(details.values())
    return {
        **usage,
        "output_tokens": output,
        "total_tokens": usage["input_tokens"] + output,
        "output_token_details": details,
    }


async def _cancelled_within(cancel: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`, returning early (True) as soon as the response is cancelled."""
    if seconds > 0 and not cancel.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await cancel.wait()
    return cancel.is_set()


class Simulator(Served):
    """The simulated upstream; `async with Simulator() as sim` starts and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        audio_deltas: int = 5,
        transcript_deltas: int = 5,
        audio_bytes: int = 4800,
        ssl_context: ssl.SSLContext | None = None,
        key_order: str = "openai",
        exclusive_responses: bool = False,
        vad_speech_bytes: int = PCM16_BYTES_PER_SECOND // 2,
        vad_response_delay: float = 0.0,
        delta_interval: float = 0.0,
        compression: str | None = "deflate",
        greeting_delay: float = 0.0,
        renamed_model: str | None = None,
        user_transcript: str = " ".join(_TRANSCRIPT),
    ) -> None:
        if key_order not in KEY_ORDERS:
            raise ValueError(f"key_order must be one of {', '.join(KEY_ORDERS)}")
        self.host = host
        self.key_order = key_order
        # OpenAI refuses a response.create while a response is in progress; by default the simulator
        # runs them concurrently, which the gateway must meter too.
        self.exclusive_responses = exclusive_responses
        self.ssl_context = ssl_context
        self.port = port
        self.audio_deltas = audio_deltas
        # Server VAD turns: speech stops once this much audio was appended; the response the
        # upstream then starts by itself begins this many seconds later (its thinking time).
        self.vad_speech_bytes = vad_speech_bytes
        self.vad_response_delay = vad_response_delay
        self.transcript_deltas = transcript_deltas
        # Seconds between a response's deltas (a response's `sim_delta_ms` overrides it): 0 sends them
        # back to back; 0.1 with 100 ms of audio per delta streams audio at the speed of speech.
        self.delta_interval = delta_interval
        self.compression = compression  # None: permessage-deflate is never negotiated, whatever the client offers
        # Seconds before session.created, as a real upstream takes to set a session up. Over loopback a relay
        # that forwards only once its own client leg is open (Portkey's) loses a session.created sent at once.
        self.greeting_delay = greeting_delay
        # An upstream that renames its model before each response (a session.updated whose model is this
        # template, formatted with the session's `model` and the response's number `n`, from 1): every
        # response makes a new request x response model pair, which the gateway's series bound must hold.
        self.renamed_model = renamed_model
        self.user_transcript = user_transcript  # what transcribed user speech says
        self.received: list[dict[str, Any]] = []  # client events, audio appends without their audio
        self.ledger: list[SentUsage] = []
        self.handshakes: list[Handshake] = []
        self.junk_sent = 0
        self._rng = random.Random(seed)
        # Noise rather than silence so that compression sees realistic audio; its own generator
        # keeps the usage sequence independent of audio_bytes.
        self._audio_delta = base64.b64encode(random.Random(seed).randbytes(audio_bytes)).decode()
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._handlers = {
            "session.update": self._update_session,
            "response.create": self._create_response,
            "input_audio_buffer.append": self._append_audio,
            "input_audio_buffer.commit": self._commit_audio,
            "response.cancel": self._cancel_response,
            "conversation.item.create": self._create_item,
            "conversation.item.truncate": self._truncate_item,
            "conversation.item.delete": self._delete_item,
        }

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    def usage_for(self, request_model: str) -> list[SentUsage]:
        return [u for u in self.ledger if u.request_model == request_model]

    async def start(self) -> None:
        self.listening(
            await serve(
                self._serve,
                self.host,
                self.port,
                process_request=self._check_handshake,
                select_subprotocol=_select_subprotocol,
                compression=self.compression,
                max_size=MAX_CLIENT_FRAME,
                ssl=self.ssl_context,
            )
        )

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Records every handshake and turns away anything but a Realtime path with 404."""
        url = urlsplit(request.path)
        accepted = url.path.endswith("/realtime")
        self.handshakes.append(
            Handshake(
                path=url.path,
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers=[(name.lower(), value) for name, value in request.headers.raw_items()],
                session_id=_session_id(connection) if accepted else None,
            )
        )
        return None if accepted else connection.respond(HTTPStatus.NOT_FOUND, "not a Realtime path\n")

    async def _serve(self, ws: ServerConnection) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                session = self._open_session(ws, tasks)
                if self.greeting_delay:
                    await asyncio.sleep(self.greeting_delay)
                await self._send_event(session, self._event("session.created", session=session.config))
                async for message in ws:
                    await self._receive(session, message)
        except* ConnectionClosed:
            pass  # the client left; responses still in flight have nowhere to go

    def _open_session(self, ws: ServerConnection, tasks: asyncio.TaskGroup) -> _Session:
        assert ws.request is not None  # the handler only runs after a handshake
        query = dict(parse_qsl(urlsplit(ws.request.path).query))
        dialect = BETA if _is_beta(ws.request.headers) else GA
        requested = query.get("model") or query.get("deployment")  # OpenAI, Azure
        model = None if query.get("intent") == "transcription" else resolve_model(requested)
        session_id = _session_id(ws)
        return _Session(
            id=session_id,
            ws=ws,
            tasks=tasks,
            dialect=dialect,
            request_model=requested or "unknown",
            model=model,
            config=_initial_session(dialect, session_id, model),
        )

    async def _receive(self, session: _Session, message: str | bytes) -> None:
        event: dict[str, Any] = {}
        try:
            event = _client_event(message)
            self.received.append({k: v for k, v in event.items() if k != "audio"})
            handler = self._handlers.get(event["type"])
            if handler is not None:  # unknown events are ignored, as a lenient upstream would
                await handler(session, event)
        except ClientError as error:
            details = {
                "type": "invalid_request_error",
                "code": error.code,
                "message": str(error),
                "param": error.param,
                "event_id": event.get("event_id"),
            }
            await self._send_event(session, self._event("error", error=details))

    async def _update_session(self, session: _Session, event: dict[str, Any]) -> None:
        update = _object_field(event, "session", "session")
        changes = {k: v for k, v in update.items() if k not in _FIXED_SESSION_KEYS}
        session.config = _merge(session.config, changes)
        await self._send_event(session, self._event("session.updated", session=session.config))

    async def _create_response(self, session: _Session, event: dict[str, Any]) -> None:
        model = session.model
        if model is None:
            raise ClientError("invalid_request", "transcription sessions do not create responses")
        plan = _plan(_object_field(event, "response", "response"), session, self.audio_deltas, self.delta_interval)
        if self.exclusive_responses and session.active_responses:
            raise ClientError(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress. Wait until the response is finished.",
            )
        response_id = self._id("resp")
        session.active_responses[response_id] = asyncio.Event()  # before the task runs: the next frame may be a create
        session.tasks.create_task(self._respond(session, model, plan, response_id))

    async def _cancel_response(self, session: _Session, event: dict[str, Any]) -> None:
        """Stops the named response, or the latest in progress; its task ends it `cancelled`."""
        response_id = event.get("response_id") or next(reversed(session.active_responses), None)
        cancel = session.active_responses.get(response_id) if isinstance(response_id, str) else None
        if cancel is None:
            raise ClientError("response_cancel_not_active", "Cancellation failed: no active response found.")
        cancel.set()

    async def _create_item(self, session: _Session, event: dict[str, Any]) -> None:
        """A client's item (a message, or a function call's output) added to the conversation."""
        item = _object_field(event, "item", "item")
        if item.get("type") not in ITEM_TYPES:
            raise ClientError("invalid_value", f"item.type must be one of {', '.join(ITEM_TYPES)}", "item.type")
        if item["type"] == "function_call_output" and not isinstance(item.get("call_id"), str):
            raise ClientError("missing_required_parameter", "a function_call_output needs its call_id", "item.call_id")
        added = {**item, "id": item.get("id") or self._id("item"), "object": "realtime.item", "status": "completed"}
        previous, session.last_item = session.last_item, added["id"]
        for kind in session.dialect.item_added:
            await self._send_event(session, self._event(kind, previous_item_id=previous, item=added))

    async def _truncate_item(self, session: _Session, event: dict[str, Any]) -> None:
        """The client stopped playing an answer's audio (a barge-in): acknowledged, as OpenAI does."""
        item_id = event.get("item_id")
        if item_id not in session.output_items:
            raise ClientError("invalid_value", f"no assistant audio item {item_id!r} to truncate", "item_id")
        content_index = _count(event.get("content_index", 0), "content_index")
        audio_end_ms = _count(event.get("audio_end_ms"), "audio_end_ms")
        truncated = self._event(
            "conversation.item.truncated", item_id=item_id, content_index=content_index, audio_end_ms=audio_end_ms
        )
        await self._send_event(session, truncated)

    async def _delete_item(self, session: _Session, event: dict[str, Any]) -> None:
        await self._send_event(session, self._event("conversation.item.deleted", item_id=event.get("item_id")))

    async def _append_audio(self, session: _Session, event: dict[str, Any]) -> None:
        session.buffered_audio += _audio_length(event.get("audio"))
        vad = session.server_vad
        if vad is not None:
            await self._detect_speech(session, vad)

    async def _detect_speech(self, session: _Session, vad: dict[str, Any]) -> None:
        """Server VAD: speech starts with the first audio and stops after vad_speech_bytes; the
        buffer is committed and, unless create_response is false, a response starts by itself."""
        if session.speech_item is None:
            session.speech_item = self._id("item")
            started = self._event("input_audio_buffer.speech_started", audio_start_ms=0, item_id=session.speech_item)
            await self._send_event(session, started)
        if session.buffered_audio < self.vad_speech_bytes:
            return
        item_id, session.speech_item = session.speech_item, None
        end_ms = session.buffered_audio * 1000 // PCM16_BYTES_PER_SECOND
        stopped = self._event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)
        await self._send_event(session, stopped)
        await self._commit(session, item_id)
        if session.model is not None and vad.get("create_response", True) is not False:
            plan = _plan({}, session, self.audio_deltas, self.delta_interval)
            response_id = self._id("resp")
            session.active_responses[response_id] = asyncio.Event()
            session.tasks.create_task(self._respond(session, session.model, plan, response_id, self.vad_response_delay))

    async def _commit_audio(self, session: _Session, event: dict[str, Any]) -> None:
        await self._commit(session, self._id("item"))

    async def _commit(self, session: _Session, item_id: str) -> None:
        audio_bytes, session.buffered_audio = session.buffered_audio, 0
        committed = self._event("input_audio_buffer.committed", previous_item_id=None, item_id=item_id)
        await self._send_event(session, committed)
        model = session.transcription_model
        if model is None:
            return
        usage = _transcription_usage(self._rng, session.transcriptions, audio_bytes)
        session.transcriptions += 1
        completed = self._event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=self.user_transcript,
            usage=usage,
        )
        entry = SentUsage(session.id, "transcription", session.request_model, model, "completed", usage)
        await self._send_usage(session, entry, self._dumps(completed))

    async def _respond(self, session: _Session, model: str, plan: _Plan, response_id: str, delay: float = 0.0) -> None:
        """One response, start to response.done; runs as its own task so responses interleave."""
        try:
            cancel = session.active_responses[response_id]
            await _cancelled_within(cancel, delay)
            await self._run_response(session, model, plan, response_id, cancel)
        finally:
            session.active_responses.pop(response_id, None)

    async def _run_response(
        self, session: _Session, model: str, plan: _Plan, response_id: str, cancel: asyncio.Event
    ) -> None:
        if self.renamed_model is not None:
            model = await self._rename_model(session, model)
        item_id = self._id("item")
        response = _response(response_id, "in_progress", plan.metadata, None)
        await self._send_event(session, self._event("response.created", response=response))
        await self._send_event(session, self._event("rate_limits.updated", rate_limits=_RATE_LIMITS))
        session.last_item = item_id
        if plan.function_call is None:
            session.output_items.append(item_id)
        deltas = self._deltas(session.dialect, plan, response_id, item_id)
        produced = await self._stream(session, deltas, plan.delta_interval, cancel)
        if cancel.is_set():  # as OpenAI: no more deltas, response.done at once, what was produced billed
            await self._finish(session, model, plan, response_id, item_id, "cancelled", (produced, len(deltas)))
            return
        # Each kind read once, not per repeat: parsing the deeply nested one takes over a millisecond.
        junk = [(frame, is_unbilled_response(frame)) for frame in junk_frames()] if plan.junk else []
        for frame, unbilled in junk * plan.junk:
            if unbilled:  # a response all the same: counted with its status, no tokens
                entry = SentUsage(session.id, "unbilled_response", session.request_model, model, "completed", {})
                await self._send_usage(session, entry, frame)
            else:
                await self._send_frame(session, frame)
            self.junk_sent += 1
        if plan.fault is not None:
            await self._fail(session, plan.fault)
            return
        await self._finish(session, model, plan, response_id, item_id, plan.status)

    async def _stream(
        self, session: _Session, deltas: list[dict[str, Any]], interval: float, cancel: asyncio.Event
    ) -> int:
        """Sends the deltas on their clock until the response is cancelled; returns how many went out."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, delta in enumerate(deltas):
            # On the clock: a late delta does not delay the ones after it.
            pause = start + n * interval - loop.time() if interval and n else 0.0
            if await _cancelled_within(cancel, pause):
                return n
            await self._send_event(session, delta)
        return len(deltas)

    async def _finish(
        self,
        session: _Session,
        model: str,
        plan: _Plan,
        response_id: str,
        item_id: str,
        status: str,
        produced: tuple[int, int] | None = None,
    ) -> None:
        """response.done, its usage ledgered first; a cancelled response bills the share of its
        deltas it produced (`produced`: sent, planned)."""
        usage = None if plan.usage_null else _response_usage(self._rng)
        if usage is not None and produced is not None:
            usage = _cancelled_usage(usage, *produced)
        kind = "unbilled_response" if usage is None else "response"
        entry = SentUsage(session.id, kind, session.request_model, model, status, usage or {})
        output = [] if plan.function_call is None else [_call_item(plan, response_id, item_id, "completed")]
        response = _response(response_id, status, plan.metadata, usage, output)
        done = self._dumps(self._event("response.done", response=response))
        session.active_responses.pop(response_id, None)  # as OpenAI: once response.done is out, a create is accepted
        await self._send_usage(session, entry, _fragments(done) if plan.fragment else done)
        if plan.repeat_done:  # the same response, billed once: the ledger has it once
            await self._send_frame(session, done)

    async def _rename_model(self, session: _Session, model: str) -> str:
        """The session's model renamed from `renamed_model`, announced in a session.updated."""
        assert self.renamed_model is not None
        session.responses += 1
        session.config["model"] = renamed = self.renamed_model.format(model=model, n=session.responses)
        await self._send_event(session, self._event("session.updated", session=session.config))
        return renamed

    async def _fail(self, session: _Session, fault: str) -> None:
        """A response that never finishes: no usage is sent, so none is ledgered."""
        if fault == "reset":
            session.ws.transport.abort()
        elif fault == "close":
            await session.ws.close(1011, "simulated upstream failure")
        else:
            await session.ws.wait_closed()

    def _deltas(self, dialect: Dialect, plan: _Plan, response_id: str, item_id: str) -> list[dict[str, Any]]:
        """Audio then its transcript; a text-only response has text deltas instead; a function call
        its item and its arguments."""
        if plan.function_call is not None:
            return self._call_events(plan, response_id, item_id)
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        text_delta = dialect.transcript_delta if plan.audio else dialect.text_delta
        if plan.transcript is not None:  # spoken as it streams: each word's audio, then its transcript
            deltas = []
            for i, word in enumerate(plan.transcript.split(" ")):
                if plan.audio:
                    deltas.append(self._event(dialect.audio_delta, **where, delta=self._audio_delta))
                deltas.append(self._event(text_delta, **where, delta=word if i == 0 else f" {word}"))
            return deltas
        audio = plan.audio_deltas if plan.audio else 0
        deltas = [self._event(dialect.audio_delta, **where, delta=self._audio_delta) for _ in range(audio)]
        for i in range(self.transcript_deltas):
            word = _TRANSCRIPT[i % len(_TRANSCRIPT)]
            deltas.append(self._event(text_delta, **where, delta=word if i == 0 else f" {word}"))
        return deltas

    def _call_events(self, plan: _Plan, response_id: str, item_id: str) -> list[dict[str, Any]]:
        """A function call as OpenAI streams it: its item, the arguments in pieces, then both done."""
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "call_id": _call_id(response_id)}
        return [
            self._event("response.output_item.added", response_id=response_id, output_index=0,
                        item=_call_item(plan, response_id, item_id, "in_progress", "")),
            *(self._event("response.function_call_arguments.delta", **where, delta=piece)
              for piece in _fragments(plan.arguments)),
            self._event("response.function_call_arguments.done", **where, name=plan.function_call,
                        arguments=plan.arguments),
            self._event("response.output_item.done", response_id=response_id, output_index=0,
                        item=_call_item(plan, response_id, item_id, "completed")),
        ]  # fmt: skip

    async def _send_usage(self, session: _Session, entry: SentUsage, frame: str | list[str]) -> None:
        """Ledgered before sending, so that no reader sees usage the ledger lacks; taken back if
        the connection had closed, so that the ledger holds only what went out."""
        self.ledger.append(entry)
        try:
            await self._send_frame(session, frame)
        except ConnectionClosed:
            self.ledger.remove(entry)
            raise

    async def _send_event(self, session: _Session, event: dict[str, Any]) -> None:
        await self._send_frame(session, self._dumps(event))

    def _dumps(self, event: dict[str, Any]) -> str:
        """An event as servers serialise it: OpenAI type first, DashScope and pipecat event_id first,
        servers that dump openai-python models with sorted keys (type last)."""
        if self.key_order == "sorted":
            return json.dumps(event, sort_keys=True)
        if self.key_order == "event_id_first":
            return json.dumps({"event_id": event.get("event_id"), **event})
        return json.dumps(event)

    async def _send_frame(self, session: _Session, frame: str | bytes | list[str]) -> None:
        """A list of strings goes out as one fragmented message. Yields after every frame so
        that concurrent responses interleave on the wire."""
        await session.ws.send(frame)
        await asyncio.sleep(0)

    def _event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        return {"type": event_type, "event_id": self._id("event"), **fields}

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"


def _response(
    response_id: str, status: str, metadata: Any, usage: dict[str, Any] | None, output: list[Any] | None = None
) -> dict[str, Any]:
    """The response object of response.created/done; metadata is echoed, as OpenAI does."""
    return {
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        # As OpenAI's; empty but for function calls: peers that read it, such as Portkey's event parser, expect a list.
        "output": output or [],
        "metadata": metadata,
        "usage": usage,
    }


def _call_id(response_id: str) -> str:
    return f"call_{response_id.removeprefix('resp_')}"


def _call_item(
    plan: _Plan, response_id: str, item_id: str, status: str, arguments: str | None = None
) -> dict[str, Any]:
    """A function_call item as output_item.added/done and response.done's output carry it."""
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "name": plan.function_call,
        "call_id": _call_id(response_id),
        "arguments": plan.arguments if arguments is None else arguments,
    }


def _session_id(connection: ServerConnection) -> str:
    """Derived from the connection so that the handshake record and the session agree."""
    return f"sess_{connection.id.hex[:24]}"


class Upstream(Protocol):
    """What SimulatorThread can run: a server that starts and stops on the thread's event loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class SimulatorThread[U: Upstream]:
    """Runs a simulated upstream on its own event loop in a daemon thread, for synchronous tests and the demo.

    `SimulatorThread(**kwargs)` runs a Realtime `Simulator(**kwargs)`; `SimulatorThread(server=...)` runs
    any other upstream, such as the HTTP simulator, without this module having to know it.
    """

    @overload
    def __init__(self: SimulatorThread[Simulator], **simulator_kwargs: Any) -> None: ...

    @overload
    def __init__(self, *, server: U) -> None: ...

    def __init__(self, *, server: Any = None, **simulator_kwargs: Any) -> None:
        if server is not None and simulator_kwargs:
            raise TypeError("pass either server or Simulator arguments, not both")
        self.simulator: U = Simulator(**simulator_kwargs) if server is None else server
        self._thread = threading.Thread(target=self._main, name=type(self.simulator).__name__, daemon=True)
        self._ready = threading.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> U:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.simulator

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None  # set before _ready
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.simulator.start()
        except Exception as e:  # e.g. the port is taken: __enter__ raises it in the caller's thread
            self._error = e
            return
        finally:
            self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.simulator.stop()


def main(argv: Sequence[str] | None = None) -> None:
    command_line("OpenAI Realtime", lambda args: Simulator(host=args.host, port=args.port, seed=args.seed), argv)


if __name__ == "__main__":
    main()
