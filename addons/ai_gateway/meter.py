"""Per-session Realtime accounting: which models a session uses, and what each server event bills."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .metrics import UNKNOWN, GatewayMetrics, ModelLabels
from .policy import RouteType
from .realtime import Malformed, ResponseDone, SessionModels, TranscriptionDone, needs_decoding, read_server_event
from .usage import TokenUsage

REALTIME = "realtime"
TRANSCRIPTION = "transcription"


def requested_model(url: str) -> str:
    """The model a Realtime client asked for: `model` (OpenAI, Azure v1) or `deployment` (Azure)."""
    query = parse_qs(urlsplit(url).query)
    for name in ("model", "deployment"):
        if values := query.get(name):
            return values[0]
    return UNKNOWN


@dataclass
class SessionTotals:
    """Running totals of one session, for people looking at the flow."""

    responses: int = 0
    input: int = 0
    cached: int = 0
    output: int = 0
    transcription_seconds: float = 0.0


class RealtimeMeter:
    """Meters one Realtime WebSocket session from its server frames, as each event arrives."""

    def __init__(self, metrics: GatewayMetrics, system: str, request_model: str) -> None:
        self.metrics = metrics
        self.system = system
        self.request_model = request_model
        self.response_model = UNKNOWN
        self.transcription_model = UNKNOWN
        self.totals = SessionTotals()

    def server_frame(self, content: bytes, is_text: bool) -> Malformed | None:
        """Meter one server frame. Returns the problem when the frame could not be read."""
        if not is_text:
            problem = Malformed("binary", f"{len(content)} bytes")
        elif not needs_decoding(content):
            return None
        else:
            problem = self.apply(read_server_event(content))
        if problem is not None:
            self.metrics.parse_error(RouteType.REALTIME.value, problem.reason)
        return problem

    def apply(self, event: SessionModels | ResponseDone | TranscriptionDone | Malformed | None) -> Malformed | None:
        match event:
            case SessionModels(model=model, transcription_model=transcription_model):
                self.response_model = model or self.response_model
                self.transcription_model = transcription_model or self.transcription_model
            case ResponseDone(usage=usage, status=status):
                series = self.metrics.series(self.labels(REALTIME, self.response_model))
                series.record(usage)
                series.response(status)
                self.totals.responses += 1
                self.add_to_totals(usage)
            case TranscriptionDone(usage=usage):
                self.metrics.series(self.labels(TRANSCRIPTION, self.transcription_model)).record(usage)
                if isinstance(usage, TokenUsage):
                    self.add_to_totals(usage)
                else:
                    self.totals.transcription_seconds += usage.seconds
            case Malformed():
                return event
        return None

    def labels(self, operation: str, response_model: str) -> ModelLabels:
        return ModelLabels(operation, self.system, self.request_model, response_model)

    def add_to_totals(self, usage: TokenUsage) -> None:
        totals = self.totals
        totals.input += usage.input
        totals.cached += usage.cache_read or 0
        totals.output += usage.output
