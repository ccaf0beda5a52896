"""What the access log and the traces are told: one record per finished response, per session.

The meters know what a response billed and how long it took; the access log and the tracer
only report it. They meet here, at two moments (a response finished, a session closed; the
tracer opens its spans from the request headers), so that neither the meters nor the addon
know how a line or a span is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ai_gateway.accounting.usage import TokenUsage


@dataclass(frozen=True, slots=True)
class GuardrailBlock:
    """A guard's block on a response or session: its name, the phase (input, output) and the
    action (`block`, or `error` for a failed service whose on_error is closed)."""

    guard: str
    phase: str
    action: str


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """One finished response: a Realtime or Responses-WebSocket response, or one HTTP exchange.

    Times are seconds; `end` is the wall-clock time it finished (time.time()). `duration` runs
    from the request (response.create, the end of the user's turn for responses the upstream
    started itself, the HTTP request) to the end; `turn_latency` from the end of the user's turn
    to the first delta.
    """

    flow_id: str
    route_type: str
    client_key: str | None
    operation: str
    system: str
    request_model: str | None
    response_model: str | None
    response_id: str | None
    status: str
    usage: TokenUsage | None
    cost: float | None
    end: float
    duration: float | None = None
    ttft: float | None = None
    turn_latency: float | None = None
    error_type: str = ""
    http_status: int | None = None
    event: str = "response"  # "request" for an HTTP exchange
    guardrail: GuardrailBlock | None = None  # the guard that blocked it


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A WebSocket session that closed, with its totals; `closed_by` is "client" or "server"."""

    flow_id: str
    route_type: str
    client_key: str | None
    operation: str
    system: str
    conversation_id: str | None  # the upstream's session id
    request_model: str | None
    response_model: str | None
    responses: int
    input: int
    cached: int
    output: int
    cost: float
    errors: int
    end: float
    duration: float
    close_code: int | None
    closed_by: str
    error_type: str = ""
    session_seconds: float | None = None  # billed by the second (GPT-Live)
    close_reason: str | None = None  # GPT-Live: session.closed's reason, or `unclosed` without one
    guardrail: GuardrailBlock | None = None  # the last guard block in the session


class Observer:
    """Told about sessions and responses; does nothing unless a subclass cares."""

    active = False  # whether building records for it is worth anything

    def response_finished(self, record: ResponseRecord) -> None:
        pass

    def session_ended(self, record: SessionRecord) -> None:
        pass


class Observers(Observer):
    """Several observers told in turn; the gateway keeps one instance and swaps what it holds."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: tuple[Observer, ...] = ()
        self.replace(observers)

    def replace(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)
        self.active = bool(self.observers)

    def response_finished(self, record: ResponseRecord) -> None:
        for observer in self.observers:
            observer.response_finished(record)

    def session_ended(self, record: SessionRecord) -> None:
        for observer in self.observers:
            observer.session_ended(record)


NO_OBSERVER = Observer()
