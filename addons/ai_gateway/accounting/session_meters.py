"""Per-session WebSocket accounting: which models a session uses, and what each usage item bills.

A protocol adapter turns each frame into usage items; the session's meter bills them, in order,
as the frames are relayed: the Realtime API, the Responses API's WebSocket mode, Gemini Live,
and GPT-Live (billed by the second).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.items import (
    FirstDelta,
    Malformed,
    RateLimits,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    SessionModels,
    SessionTime,
    TranscriptionDone,
    TurnEnded,
    UpstreamError,
    UsageItem,
)
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.limits import Refusal, Ticket
from ai_gateway.accounting.metrics import UNKNOWN, ModelLabels
from ai_gateway.accounting.observer import GuardrailBlock, ResponseRecord, SessionRecord
from ai_gateway.accounting.turns import NO_TIMING, ResponseClock, ResponseTiming
from ai_gateway.accounting.usage import SessionSeconds, TokenUsage

REALTIME = "realtime"
TRANSCRIPTION = "transcription"
CHAT = "chat"
# response.create events waiting for their response.created; more than this is not a real client.
MAX_PENDING_CREATES = 64
# Response ids remembered per session so that none is billed twice; the oldest are forgotten first.
MAX_BILLED_IDS = 1024
MAX_BLOCKED_RESPONSES = 64  # guard blocks awaiting their response's end, per session
NOT_DECIDED = object()  # no admission was decided before the item was applied


@dataclass
class SessionTotals:
    """Running totals of one session, for people looking at the flow (mitmweb shows its comment)."""

    responses: int = 0
    input: int = 0
    cached: int = 0
    output: int = 0
    transcription_seconds: float = 0.0
    session_seconds: float = 0.0  # billed by the second (GPT-Live)
    errors: int = 0
    model: str = UNKNOWN
    cost: float = 0.0
    ttft: float | None = None  # of the last response that streamed
    turn_latency: float | None = None  # of the last voice turn answered
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
        if self.session_seconds:
            parts.append(f"{self.session_seconds:,.0f} s of session")
        if self.cost:
            parts.append(f"${self.cost:,.4f}")
        if self.ttft is not None:
            parts.append(f"TTFT {self.ttft * 1000:,.0f} ms")
        if self.turn_latency is not None:
            parts.append(f"turn {self.turn_latency * 1000:,.0f} ms")
        if self.errors:
            parts.append(_count(self.errors, "error"))
        return " · ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class SessionMeter:
    """What the addon needs of a WebSocket session's meter; each protocol's meter bills its items."""

    in_flight: bool  # a response was asked for or started and has not finished
    operation = REALTIME  # what the session's traces are named after

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        self.accounting = accounting
        self.source = source
        self.system = system
        self.request_model = request_model
        self.totals = SessionTotals()
        self.opened = time.time()
        self.session_id: str | None = None  # the upstream's, where its protocol names one
        self.billed_ids: set[str] = set()
        self.billed_order: deque[str] = deque(maxlen=MAX_BILLED_IDS)
        self.verdict: object = NOT_DECIDED
        self.guardrail: GuardrailBlock | None = None  # the session's last guard block
        self.blocked: dict[str, GuardrailBlock] = {}  # responses blocked and not yet finished, by id

    def guardrail_blocked(self, block: GuardrailBlock, response_id: str | None) -> None:
        """A guard blocked the session (response_id None) or a response ("" for one the protocol
        does not name): their records say so."""
        self.guardrail = block
        if response_id is not None and len(self.blocked) < MAX_BLOCKED_RESPONSES:
            self.blocked[response_id] = block

    def apply(self, item: UsageItem) -> Malformed | Refusal | None:
        """Bill one usage item. Returns the problem when its frame could not be read, or the refusal
        when the item starts a response the budgets and limits do not allow."""
        raise NotImplementedError

    def admission_needed(self, item: UsageItem) -> bool:
        """Whether applying `item` admits a response, so a shared limits store is asked first."""
        return isinstance(item, ResponseRequested)

    def apply_admitted(self, item: UsageItem, verdict: Ticket | Refusal | None) -> Malformed | Refusal | None:
        """`apply` with the admission already decided (by the shared store, awaited by the addon)."""
        self.verdict = verdict
        try:
            return self.apply(item)
        finally:
            if isinstance(self.verdict, Ticket):  # not taken after all: nothing holds it
                self.accounting.release(self.verdict)
            self.verdict = NOT_DECIDED

    def admit(self) -> Ticket | Refusal | None:
        """The admission of the response being applied: decided already, or asked of the accounting now."""
        verdict, self.verdict = self.verdict, NOT_DECIDED
        if verdict is NOT_DECIDED:
            return self.accounting.admit(self.source)
        assert verdict is None or isinstance(verdict, (Ticket, Refusal))
        return verdict

    def close(self) -> None:
        """The session ended: what its unfinished responses reserved is freed."""
        raise NotImplementedError

    def problem(self, item: Malformed) -> Malformed:
        self.accounting.parse_error(self.source, item.reason)
        return item

    def request_unread(self, item: ResponseRequested) -> None:
        """A request too large to read is still admitted as one; what went unread is counted."""
        if item.unread is not None:
            self.problem(Malformed(item.unread, "response.create"))

    def finished(self, labels: ModelLabels, done: ResponseDone, ticket: Ticket | None) -> bool:
        """A response ended: billed once (False when its id was billed already), added to the totals."""
        if done.response_id is not None:
            if done.response_id in self.billed_ids:
                self.problem(Malformed("duplicate_usage", f"{done.response_id} was billed already"))
                return False
            if done.usage is not None:
                self.remember_billed(done.response_id)
        cost = None
        if done.usage is None:
            self.accounting.unbilled(self.source, labels, done.status, done.response_id, done.unread or "")
            if ticket is not None:
                self.accounting.release(ticket)
        else:
            cost = self.accounting.bill(self.source, labels, done.usage, done.status, done.response_id, ticket)
            self.totals.add(done.usage)
        self.totals.responses += 1
        self.totals.changed = True
        if done.status == "failed":
            self.totals.error()
        self.observe(labels, done, cost)
        return True

    def observe(self, labels: ModelLabels, done: ResponseDone, cost: float | None) -> None:
        """A finished response's cost and timing: in the totals, the turn latency metric, the observer."""
        timing = self.timing(done.response_id)
        self.totals.cost += cost or 0.0
        self.totals.ttft = timing.ttft if timing.ttft is not None else self.totals.ttft
        if timing.turn is not None and timing.turn_latency is not None:
            self.accounting.turn_latency(labels, timing.turn, timing.turn_latency)
            self.totals.turn_latency = timing.turn_latency
        guardrail = self.blocked.pop(done.response_id or "", None) if self.blocked else None
        observer = self.accounting.observer
        if observer.active:
            source = self.source
            observer.response_finished(
                ResponseRecord(
                    source.flow_id, source.route_type, source.client_key, labels.operation, labels.system,
                    labels.request_model, labels.response_model or self.totals.model, done.response_id,
                    done.status, done.usage, cost, time.time(), timing.duration, timing.ttft, timing.turn_latency,
                    guardrail=guardrail,
                )
            )  # fmt: skip

    def timing(self, response_id: str | None) -> ResponseTiming:
        """How long the response took, where the protocol tells."""
        return NO_TIMING

    def ended(self, close_code: int | None, closed_by_client: bool, error_type: str) -> SessionRecord:
        """The session closed: its totals, for the access log and its trace."""
        source, totals, now = self.source, self.totals, time.time()
        return SessionRecord(
            source.flow_id, source.route_type, source.client_key, self.operation, self.system, self.session_id,
            self.request_model, totals.model, totals.responses, totals.input, totals.cached, totals.output,
            totals.cost, totals.errors, now, now - self.opened, close_code,
            "client" if closed_by_client else "server", error_type, guardrail=self.guardrail,
        )  # fmt: skip

    def remember_billed(self, response_id: str) -> None:
        if len(self.billed_order) == MAX_BILLED_IDS:
            self.billed_ids.discard(self.billed_order[0])
        self.billed_order.append(response_id)
        self.billed_ids.add(response_id)


class RealtimeMeter(SessionMeter):
    """Meters one Realtime session, each response as its response.done arrives."""

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.response_model = UNKNOWN
        self.transcription_model = UNKNOWN
        # response.create (event id, time, admission ticket), paired in order with response.created,
        # then the first delta; a create the upstream refuses (an error naming its event id) is dropped.
        self.pending_creates: deque[tuple[str | None, float, Ticket | None]] = deque()
        self.tickets: dict[str, Ticket] = {}  # started responses' admissions, until their response.done
        self.awaiting_first_delta: dict[str, float] = {}
        self.timings: dict[str, tuple[float, float]] = {}
        self.clock = ResponseClock()

    @property
    def in_flight(self) -> bool:
        """A response was asked for or started and has not finished."""
        return bool(self.pending_creates or self.awaiting_first_delta or self.timings)

    def admission_needed(self, item: UsageItem) -> bool:
        """A response.create, or a response the upstream started by itself (no create waits for it)."""
        return isinstance(item, ResponseRequested) or isinstance(item, ResponseStarted) and not self.pending_creates

    def apply(self, item: UsageItem) -> Malformed | Refusal | None:
        match item:
            case FirstDelta(response_id=response_id):
                created = self.awaiting_first_delta.pop(response_id, None) if response_id is not None else None
                if created is not None:
                    self.timings[response_id] = (created, time.monotonic())
            case ResponseRequested(event_id=event_id):
                self.request_unread(item)
                return self.requested(event_id)
            case ResponseStarted(response_id=response_id):
                refusal = self.started(response_id)
                if refusal is None:
                    self.response_began(response_id)
                return refusal
            case TurnEnded(kind=kind):
                self.clock.turn_ended(kind, time.monotonic())
            case ResponseDone(response_id=response_id):
                ticket = self.tickets.pop(response_id, None) if response_id is not None else None
                labels = self.labels(REALTIME, self.response_model)
                if self.finished(labels, item, ticket) and item.usage is not None:
                    self.latency(labels, response_id, item.usage)
            case UpstreamError(event_id=event_id):
                self.totals.error()
                self.accounting.error(self.source, "error_event")
                self.refused(event_id)
            case SessionModels(model=model, transcription_model=transcription_model):
                self.response_model = self.totals.model = model or self.response_model
                if self.request_model == UNKNOWN:  # a WebRTC/SIP sideband (`?call_id=`): the call chose it
                    self.request_model = self.response_model
                self.transcription_model = transcription_model or self.transcription_model
                self.session_id = item.session_id or self.session_id
            case TranscriptionDone(usage=usage):
                cost = self.accounting.bill(self.source, self.labels(TRANSCRIPTION, self.transcription_model), usage)
                self.totals.cost += cost or 0.0
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

    def requested(self, event_id: str | None) -> Refusal | None:
        """The client asks for a response: admitted (and its reservation held) or refused."""
        verdict = self.admit()
        if isinstance(verdict, Refusal):
            return verdict
        if len(self.pending_creates) == MAX_PENDING_CREATES:  # not a real client: forget the oldest
            self.release(self.pending_creates.popleft()[2])
        self.pending_creates.append((event_id, time.monotonic(), verdict))
        return None

    def started(self, response_id: str | None) -> Refusal | None:
        """A response started: the client's oldest waiting request, or the upstream's own (server
        VAD), which must pass the same checks; refused, the addon cancels it."""
        created: float | None = None
        if self.pending_creates:
            _, created, ticket = self.pending_creates.popleft()
        else:
            verdict = self.admit()
            if isinstance(verdict, Refusal):
                return verdict
            ticket = verdict
        if response_id is None:  # no response.done can be matched to it: hold nothing for it
            self.release(ticket)
            return None
        if created is not None:
            self.awaiting_first_delta[response_id] = created
        if ticket is not None:
            self.tickets[response_id] = ticket
        return None

    def refused(self, event_id: str | None) -> None:
        """The upstream refused a client event: if it was a response.create, no response follows it."""
        if event_id is None:
            return
        for pending in self.pending_creates:
            if pending[0] == event_id:
                self.pending_creates.remove(pending)
                self.release(pending[2])
                return

    def release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            self.accounting.release(ticket)

    def close(self) -> None:
        for _, _, ticket in self.pending_creates:
            self.release(ticket)
        for ticket in self.tickets.values():
            self.release(ticket)
        self.pending_creates.clear()
        self.tickets.clear()

    def response_began(self, response_id: str | None) -> None:
        """A response the upstream started by itself to answer a turn (server VAD) has its time
        to first token from the turn's end."""
        requested = self.awaiting_first_delta.get(response_id) if response_id is not None else None
        turn_end = self.clock.started(response_id, requested, time.monotonic())
        if turn_end is not None and response_id is not None:
            self.awaiting_first_delta[response_id] = turn_end

    def timing(self, response_id: str | None) -> ResponseTiming:
        first_delta = self.timings.get(response_id) if response_id is not None else None
        return self.clock.finished(response_id, first_delta, time.monotonic())

    def latency(self, labels: ModelLabels, response_id: str | None, usage: TokenUsage) -> None:
        if response_id is None:
            return
        self.awaiting_first_delta.pop(response_id, None)
        timing = self.timings.pop(response_id, None)
        if timing is not None:
            created, first = timing
            self.accounting.latency(labels, first - created, time.monotonic() - created, usage.output)

    def labels(self, operation: str, response_model: str) -> ModelLabels:
        return ModelLabels(operation, self.system, self.request_model, response_model)


class ResponsesSocketMeter(SessionMeter):
    """Meters the Responses API's WebSocket mode: each final response event bills one response.

    Its responses run one after another, so each final event settles the oldest admission."""

    operation = CHAT

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.admitted: deque[Ticket | None] = deque()
        self.requested: float | None = None  # when the response in flight was asked for

    @property
    def in_flight(self) -> bool:
        return bool(self.admitted)

    def apply(self, item: UsageItem) -> Malformed | Refusal | None:
        match item:
            case ResponseRequested(model=model):
                self.request_unread(item)
                verdict = self.admit()
                if isinstance(verdict, Refusal):
                    return verdict
                self.admitted.append(verdict)
                self.requested = time.monotonic()
                self.request_model = model or self.request_model
            case ResponseDone(response_model=response_model):
                ticket = self.admitted.popleft() if self.admitted else None
                self.finished(ModelLabels(CHAT, self.system, self.request_model, response_model), item, ticket)
                self.totals.model = response_model or self.totals.model
            case Malformed():
                return self.problem(item)
        return None

    def timing(self, response_id: str | None) -> ResponseTiming:
        """One response at a time: from its request (response.create) to its final event."""
        requested, self.requested = self.requested, None
        return NO_TIMING if requested is None else ResponseTiming(duration=time.monotonic() - requested)

    def close(self) -> None:
        for ticket in self.admitted:
            if ticket is not None:
                self.accounting.release(ticket)
        self.admitted.clear()


class GeminiLiveMeter(RealtimeMeter):
    """Meters a Gemini Live session: the client's setup message names the model, for request and response alike.

    Gemini Live has no request per response to refuse, nor a way to cancel one: the model answers
    each turn by itself. So after the turn that leaves the session or its key without budget (or
    over a limit), the refusal is returned, and the addon closes the session."""

    def apply(self, item: UsageItem) -> Malformed | Refusal | None:
        if isinstance(item, SessionModels) and item.model:
            self.request_model = item.model
        outcome = super().apply(item)
        if outcome is None and isinstance(item, ResponseDone):
            return self.accounting.refusal(self.source)
        return outcome


UNCLOSED = "unclosed"  # the ledger status of a GPT-Live session that ended without session.closed


class LiveMeter(SessionMeter):
    """Meters a GPT-Live session: its time by the second, and the Responses calls it delegates.

    The upstream reports time cumulatively, so each report bills what it adds to the last one
    (never the sum of reports); a report lower than the last is not billed and counts as a parse
    error. Metrics, cost and budgets follow every report; the ledger gets one line for the whole
    session when it ends, its status the reason of `session.closed`, or `unclosed` when the session
    ended without one (its last report is what was billed). Delegated responses are billed as they
    finish, under their own model, one ledger line each.

    Like Gemini Live, GPT-Live has no request per response to refuse: the report (or delegated
    response) that leaves the session or its key without budget returns the refusal, and the addon
    closes the session."""

    in_flight = False  # a client hanging up is how a live session ends

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str) -> None:
        super().__init__(accounting, source, system, request_model)
        self.reported = SessionSeconds(0.0)  # the last cumulative report, all billed
        self.reports = 0
        self.cost: float | None = 0.0  # of the time billed so far; None once a part of it was unpriced
        self.closed: str | None = None  # the reason of session.closed
        self.ledgered = False

    def apply(self, item: UsageItem) -> Malformed | Refusal | None:
        match item:
            case SessionModels(model=model) if model:
                if self.request_model == UNKNOWN:  # the client's session.start, or a sideband's first event
                    self.request_model = model
                self.totals.model = model
                self.session_id = item.session_id or self.session_id
                self.totals.changed = True
            case SessionTime(usage=usage, closed=closed):
                if self.closed is not None:
                    return None  # nothing is billed after the final report
                problem = self.report(usage)
                self.closed = closed
                return problem or self.accounting.refusal(self.source)
            case ResponseDone(response_model=response_model):
                labels = ModelLabels(CHAT, self.system, response_model, response_model)
                if self.finished(labels, item, None):
                    return self.accounting.refusal(self.source)
            case UpstreamError():
                self.totals.error()
                self.accounting.error(self.source, "error_event")
            case Malformed():
                return self.problem(item)
        return None

    def report(self, usage: SessionSeconds) -> Malformed | None:
        """A cumulative report: what it adds to the last one is billed now."""
        added = increase(self.reported, usage)
        if added is None:
            return self.problem(
                Malformed("usage_decreased", f"{usage.seconds:g} s reported after {self.reported.seconds:g} s")
            )
        self.reports += 1
        self.reported = SessionSeconds(self.reported.active + added.active, self.reported.paused + added.paused)
        if added.seconds:
            labels = self.labels()
            cost = self.accounting.bill(self.source, labels, added, ledgered=False)
            self.cost = None if cost is None or self.cost is None else self.cost + cost
            self.totals.cost += cost or 0.0
            self.totals.session_seconds = self.reported.seconds
            self.totals.changed = True
        return None

    def labels(self) -> ModelLabels:
        return ModelLabels(REALTIME, self.system, self.request_model, self.totals.model)

    def close(self) -> None:
        """The session ended: its ledger line, once, if the upstream ever reported its time."""
        if self.reports and not self.ledgered:
            status = self.closed or UNCLOSED
            self.accounting.ledger_line(self.source, self.labels(), self.reported, status, self.session_id, self.cost)
            self.ledgered = True

    def ended(self, close_code: int | None, closed_by_client: bool, error_type: str) -> SessionRecord:
        """The session's totals with its billed seconds and how it ended (`unclosed`: no session.closed)."""
        record = super().ended(close_code, closed_by_client, error_type)
        return replace(record, session_seconds=self.reported.seconds, close_reason=self.closed or UNCLOSED)


def increase(last: SessionSeconds, report: SessionSeconds) -> SessionSeconds | None:
    """What a cumulative report adds to the last one; None when it is lower (nothing to bill).

    A report without a breakdown (all active) after one with paused time keeps that paused time:
    its growth is active time."""
    if not report.paused and last.paused:
        report = SessionSeconds(report.seconds - last.paused, last.paused)
    added = SessionSeconds(report.active - last.active, report.paused - last.paused)
    return None if added.active < 0 or added.paused < 0 else added
