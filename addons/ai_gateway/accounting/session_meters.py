"""Per-session WebSocket accounting: which models a session uses, and what each server event bills.

Two protocols run over WebSockets: the Realtime API, and the Responses API's WebSocket mode.
Each session gets one meter; the addon hands it every frame, in order, as it is relayed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import UNKNOWN, ModelLabels, Series
from ai_gateway.accounting.usage import TokenUsage
from ai_gateway.protocols.openai_http import RESPONSES_FINAL_EVENTS, Billed, decode_json, read_responses_event
from ai_gateway.protocols.openai_realtime import (
    ERROR,
    RESPONSE_CREATE,
    Malformed,
    RateLimits,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
    SessionModels,
    TranscriptionDone,
    delta_response_id,
    leading_type,
    needs_decoding,
    read_server_event,
)

REALTIME = "realtime"
TRANSCRIPTION = "transcription"
CHAT = "chat"
# response.create events waiting for their response.created; more than this is not a real client.
MAX_PENDING_CREATES = 64


def requested_model(url: str) -> str:
    """The model a client asked for in the URL: `model` (OpenAI, Azure v1) or `deployment` (Azure)."""
    query = parse_qs(urlsplit(url).query)
    for name in ("model", "deployment"):
        if values := query.get(name):
            return values[0]
    return UNKNOWN


@dataclass
class SessionTotals:
    """Running totals of one session, for people looking at the flow (mitmweb shows its comment)."""

    responses: int = 0
    input: int = 0
    cached: int = 0
    output: int = 0
    transcription_seconds: float = 0.0
    errors: int = 0
    model: str = UNKNOWN
    changed: bool = False  # since the addon last showed the totals

    def add(self, usage: TokenUsage) -> None:
        self.input += usage.input
        self.cached += usage.cache_read or 0
        self.output += usage.output or 0
        self.changed = True

    def error(self) -> None:
        self.errors += 1
        self.changed = True

    def summary(self) -> str:
        parts = [
            _count(self.responses, "response"),
            f"input {self.input:,} (cached {self.cached:,})",
            f"output {self.output:,} tokens",
            self.model,
        ]
        if self.transcription_seconds:
            parts.append(f"{self.transcription_seconds:,.1f} s transcribed")
        if self.errors:
            parts.append(_count(self.errors, "error"))
        return " · ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class SessionMeter:
    """What the addon needs of a WebSocket session's meter; each protocol fills in the frames."""

    in_flight: bool  # a response was asked for or started and has not finished

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        self.accounting = accounting
        self.source = source
        self.system = system
        self.request_model = request_model
        self.totals = SessionTotals()

    def client_frame(self, kind: str | None, content: bytes) -> None:
        """A client frame, with its leading event type already read (None when it has none)."""
        raise NotImplementedError

    def server_frame(self, content: bytes, is_text: bool) -> Malformed | None:
        """Meter one server frame. Returns the problem when the frame could not be read."""
        raise NotImplementedError


class RealtimeMeter(SessionMeter):
    """Meters one Realtime session from its frames, each response as its response.done arrives."""

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.response_model = UNKNOWN
        self.transcription_model = UNKNOWN
        # Latency: response.create time, paired in order with response.created, then the first delta.
        self.pending_creates: deque[float] = deque(maxlen=MAX_PENDING_CREATES)
        self.awaiting_first_delta: dict[str, float] = {}
        self.timings: dict[str, tuple[float, float]] = {}

    @property
    def in_flight(self) -> bool:
        """A response was asked for or started and has not finished."""
        return bool(self.pending_creates or self.awaiting_first_delta or self.timings)

    def client_frame(self, kind: str | None, content: bytes) -> None:
        if kind == RESPONSE_CREATE:
            self.pending_creates.append(time.monotonic())

    def server_frame(self, content: bytes, is_text: bool) -> Malformed | None:
        kind = leading_type(content) if is_text else None
        if not is_text:
            problem: Malformed | None = Malformed("binary", f"{len(content)} bytes")
        elif needs_decoding(kind):
            problem = self.apply(read_server_event(content))
        else:
            if kind == ERROR:
                self.totals.error()
            elif self.awaiting_first_delta:
                self.first_delta(content)
            return None
        if problem is not None:
            self.accounting.parse_error(self.source, problem.reason)
        return problem

    def first_delta(self, content: bytes) -> None:
        response_id = delta_response_id(content)
        if response_id is not None and (created := self.awaiting_first_delta.pop(response_id, None)) is not None:
            self.timings[response_id] = (created, time.monotonic())

    def apply(self, event: ServerEvent | None) -> Malformed | None:
        match event:
            case SessionModels(model=model, transcription_model=transcription_model):
                self.response_model = self.totals.model = model or self.response_model
                self.transcription_model = transcription_model or self.transcription_model
            case ResponseCreated(response_id=response_id):
                if response_id is not None and self.pending_creates:
                    self.awaiting_first_delta[response_id] = self.pending_creates.popleft()
            case ResponseDone(usage=usage, status=status, response_id=response_id):
                labels = self.labels(REALTIME, self.response_model)
                series = self.accounting.bill(self.source, labels, usage, status, response_id)
                self.latency(series, response_id, usage)
                self.totals.responses += 1
                self.totals.add(usage)
                if status == "failed":
                    self.totals.error()
            case TranscriptionDone(usage=usage):
                self.accounting.bill(self.source, self.labels(TRANSCRIPTION, self.transcription_model), usage)
                if isinstance(usage, TokenUsage):
                    self.totals.add(usage)
                else:
                    self.totals.transcription_seconds += usage.seconds
                    self.totals.changed = True
            case RateLimits(limits=limits):
                self.accounting.rate_limits(limits)
            case Malformed():
                return event
        return None

    def latency(self, series: Series, response_id: str | None, usage: TokenUsage) -> None:
        if response_id is None:
            return
        self.awaiting_first_delta.pop(response_id, None)
        timing = self.timings.pop(response_id, None)
        if timing is not None:
            created, first = timing
            series.latency(first - created, time.monotonic() - created, usage.output)

    def labels(self, operation: str, response_model: str) -> ModelLabels:
        return ModelLabels(operation, self.system, self.request_model, response_model)


class ResponsesSocketMeter(SessionMeter):
    """Meters the Responses API's WebSocket mode: each response.completed frame bills one response."""

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.in_flight = False

    def client_frame(self, kind: str | None, content: bytes) -> None:
        """The model of the next response comes with its response.create."""
        if kind == RESPONSE_CREATE:
            self.in_flight = True
            document = decode_json(content)
            model = document.get("model") if isinstance(document, dict) else None
            if isinstance(model, str) and model:
                self.request_model = model

    def server_frame(self, content: bytes, is_text: bool) -> Malformed | None:
        kind = leading_type(content) if is_text else None
        if is_text and kind is not None and kind not in RESPONSES_FINAL_EVENTS:
            return None
        document = decode_json(content) if is_text else Malformed("binary", f"{len(content)} bytes")
        item = read_responses_event(document) if isinstance(document, dict) else document
        if isinstance(item, Billed):
            self.in_flight = False
            labels = ModelLabels(CHAT, self.system, self.request_model, item.response_model)
            self.accounting.bill(self.source, labels, item.usage, item.status)
            self.totals.responses += 1
            self.totals.model = item.response_model or self.totals.model
            self.totals.add(item.usage)
            if item.status == "failed":
                self.totals.error()
        elif isinstance(item, Malformed):
            self.accounting.parse_error(self.source, item.reason)
            return item
        return None
