"""Per-session WebSocket accounting: which models a session uses, and what each usage item bills.

A protocol adapter turns each frame into usage items; the session's meter bills them, in order,
as the frames are relayed. Two protocols run over WebSockets so far: the Realtime API, and the
Responses API's WebSocket mode.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.items import (
    FirstDelta,
    Malformed,
    RateLimits,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    SessionModels,
    TranscriptionDone,
    UpstreamError,
    UsageItem,
)
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import UNKNOWN, ModelLabels, Series
from ai_gateway.accounting.usage import TokenUsage

REALTIME = "realtime"
TRANSCRIPTION = "transcription"
CHAT = "chat"
# response.create events waiting for their response.created; more than this is not a real client.
MAX_PENDING_CREATES = 64


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
    """What the addon needs of a WebSocket session's meter; each protocol's meter bills its items."""

    in_flight: bool  # a response was asked for or started and has not finished

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        self.accounting = accounting
        self.source = source
        self.system = system
        self.request_model = request_model
        self.totals = SessionTotals()

    def apply(self, item: UsageItem) -> Malformed | None:
        """Bill one usage item. Returns the problem when its frame could not be read."""
        raise NotImplementedError

    def problem(self, item: Malformed) -> Malformed:
        self.accounting.parse_error(self.source, item.reason)
        return item

    def finished(self, labels: ModelLabels, done: ResponseDone) -> Series:
        """A response ended: billed, and added to the totals people see."""
        series = self.accounting.bill(self.source, labels, done.usage, done.status, done.response_id)
        self.totals.responses += 1
        self.totals.add(done.usage)
        if done.status == "failed":
            self.totals.error()
        return series


class RealtimeMeter(SessionMeter):
    """Meters one Realtime session, each response as its response.done arrives."""

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

    def apply(self, item: UsageItem) -> Malformed | None:
        match item:
            case FirstDelta(response_id=response_id):
                created = self.awaiting_first_delta.pop(response_id, None) if response_id is not None else None
                if created is not None:
                    self.timings[response_id] = (created, time.monotonic())
            case ResponseRequested():
                self.pending_creates.append(time.monotonic())
            case ResponseStarted(response_id=response_id):
                if response_id is not None and self.pending_creates:
                    self.awaiting_first_delta[response_id] = self.pending_creates.popleft()
            case ResponseDone(response_id=response_id):
                series = self.finished(self.labels(REALTIME, self.response_model), item)
                self.latency(series, response_id, item.usage)
            case UpstreamError():
                self.totals.error()
            case SessionModels(model=model, transcription_model=transcription_model):
                self.response_model = self.totals.model = model or self.response_model
                self.transcription_model = transcription_model or self.transcription_model
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
                return self.problem(item)
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
    """Meters the Responses API's WebSocket mode: each final response event bills one response."""

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.in_flight = False

    def apply(self, item: UsageItem) -> Malformed | None:
        match item:
            case ResponseRequested(model=model):
                self.in_flight = True
                self.request_model = model or self.request_model
            case ResponseDone(response_model=response_model):
                self.in_flight = False
                self.finished(ModelLabels(CHAT, self.system, self.request_model, response_model), item)
                self.totals.model = response_model or self.totals.model
            case Malformed():
                return self.problem(item)
        return None


class GeminiLiveMeter(RealtimeMeter):
    """Meters a Gemini Live session: the client's setup message names the model, for request and response alike."""

    def apply(self, item: UsageItem) -> Malformed | None:
        if isinstance(item, SessionModels) and item.model:
            self.request_model = item.model
        return super().apply(item)
