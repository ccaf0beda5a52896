"""What happens when usage is billed: metrics, and the durable ledger when one is configured.

Meters decide *what* was billed; this is the one place that decides *where* it goes, so every
route type is accounted for the same way.
"""

from __future__ import annotations

import time

from ai_gateway.accounting.ledger import USAGE_LOG, Source, UsageLedger
from ai_gateway.accounting.limits import (
    BUDGET_EXCEEDED,
    CLIENT_KEY,
    MINUTE,
    RATE_LIMITED,
    Refusal,
    SpendControl,
    Ticket,
)
from ai_gateway.accounting.metrics import UNKNOWN, GatewayMetrics, ModelLabels, Series
from ai_gateway.accounting.observer import NO_OBSERVER, Observer
from ai_gateway.accounting.pricing import PriceCatalog
from ai_gateway.accounting.shared_limits import KeyView, SharedLimits
from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, SessionSeconds, TokenUsage

# While the ledger cannot be written and `gateway_usage_log_on_error` is `refuse`: nothing new starts.
LEDGER_REFUSAL = Refusal(USAGE_LOG, "usage_log_unavailable", 1.0)


def pricing_model(labels: ModelLabels, session: bool = False) -> str:
    """The model a usage is priced as: the resolved response model, else the requested one.

    Transcription in a session never falls back: its request model is the Realtime model, priced
    differently (an HTTP transcription's request model is the transcription model).
    """
    if labels.response_model and labels.response_model != UNKNOWN:
        return labels.response_model
    return labels.request_model or "" if labels.operation != "transcription" or not session else ""


class Accounting:
    def __init__(
        self,
        metrics: GatewayMetrics,
        ledger: UsageLedger | None = None,
        catalog: PriceCatalog | None = None,
        control: SpendControl | None = None,
        observer: Observer = NO_OBSERVER,
        shared: SharedLimits | None = None,
    ) -> None:
        self.observer = observer  # the access log and traces, told by the meters
        self.rewire(metrics, ledger, catalog, control, shared)

    def rewire(
        self,
        metrics: GatewayMetrics,
        ledger: UsageLedger | None,
        catalog: PriceCatalog | None,
        control: SpendControl | None,
        shared: SharedLimits | None = None,
    ) -> None:
        """Where billed usage goes from now on; meters keep this object, so open sessions follow.
        `shared` (with a control whose limits name a Redis store) holds the client keys' state."""
        self.metrics = metrics
        self.recent: tuple[ModelLabels, Series] | None = None  # the label set billed last, and its series
        self.ledger = ledger
        self.catalog = catalog
        self.control = control
        self.shared = shared if control is not None and control.keys_shared else None
        if self.shared is not None:
            self.shared.metrics = metrics
        if catalog is not None:
            metrics.price_catalog(catalog.sources)

    def bill(
        self,
        source: Source,
        labels: ModelLabels,
        usage: TokenUsage | DurationUsage | CharacterUsage | SessionSeconds,
        status: str | None = None,
        response_id: str | None = None,
        ticket: Ticket | None = None,
        ledgered: bool = True,
    ) -> float | None:
        """Record one response's (or transcription's) usage; returns its cost at catalog prices (None: unpriced).
        Not `ledgered`: the meter writes the ledger line (`ledger_line`), as a GPT-Live session does once for all."""
        series = self.series(labels)
        series.record(usage)
        if status is not None:
            series.response(status)
        cost = None
        if self.catalog is not None:
            cost, lookup = self.catalog.cost(pricing_model(labels, source.session), usage)
            series.priced(lookup, cost)
        if ledgered:
            self.ledger_line(source, labels, usage, status, response_id, cost)
        if self.control is not None:
            tokens = usage.input + (usage.output or 0) if isinstance(usage, TokenUsage) else 0
            self.settle(source, ticket, tokens, cost or 0.0)
        return cost

    def ledger_line(
        self,
        source: Source,
        labels: ModelLabels,
        usage: TokenUsage | DurationUsage | CharacterUsage | SessionSeconds,
        status: str | None,
        response_id: str | None,
        cost: float | None,
    ) -> None:
        """One line in the usage ledger, when one is written; a line it could not write is counted."""
        if self.ledger is not None and not self.ledger.append(source, labels, usage, status, response_id, cost):
            self.metrics.usage_log_errors.inc()

    def unbilled(self, source: Source, labels: ModelLabels, status: str, response_id: str | None, reason: str) -> None:
        """A response whose usage could not be read: it counts, with its status, and bills nothing."""
        self.series(labels).response(status)
        self.parse_error(source, reason)
        if self.ledger is not None:
            self.ledger.append(source, labels, None, status, response_id, None)

    def series(self, labels: ModelLabels) -> Series:
        """The label set's metric children; the last set is kept, as a response's timing follows its bill."""
        if self.recent is None or self.recent[0] is not labels:
            self.recent = (labels, self.metrics.series(labels))
        return self.recent[1]

    def latency(self, labels: ModelLabels, first_token: float | None, done: float, output_tokens: int | None) -> None:
        self.series(labels).latency(first_token, done, output_tokens)

    def turn_latency(self, labels: ModelLabels, turn_end: str, seconds: float) -> None:
        self.series(labels).turn_latency(turn_end, seconds)

    def duration(self, labels: ModelLabels, seconds: float, error_type: str) -> None:
        self.series(labels).duration(seconds, error_type)

    def realtime_call(self, ticket: Ticket | None, kind: str) -> None:
        """A WebRTC or SIP call (or its ephemeral key) admitted: counted; it bills nothing here (its
        usage is seen only on a sideband connection through the gateway), so its reservation goes."""
        self.metrics.realtime_calls.labels(kind).inc()
        if ticket is not None:
            self.release(ticket)

    def settle(self, source: Source, ticket: Ticket | None, tokens: int, usd: float) -> None:
        """Spend arrived: it replaces the ticket's reservation, and the key's gauges follow."""
        assert self.control is not None
        now = time.monotonic()
        held = ticket if ticket is not None and ticket.open else None
        self.control.settle(ticket, source.client_key, source.flow_id if source.session else None, now, tokens, usd)
        if self.shared is not None:
            lease = held.lease if held is not None else None
            self.shared.settle(source.client_key, lease, tokens, usd, self.control.window, self.control.limits)
        self.show_headroom(source.client_key, now)

    def release(self, ticket: Ticket) -> None:
        """An admitted response that will bill nothing (refused upstream, its session gone)."""
        if self.control is not None and ticket.open:
            now = time.monotonic()
            if self.shared is not None:
                self.shared.settle(ticket.key, ticket.lease, 0, 0.0, self.control.window, self.control.limits)
            self.control.release(ticket, now)
            self.show_headroom(ticket.key, now)

    def admit(self, source: Source) -> Ticket | Refusal | None:
        """A new response or request on a metered route; None when no budgets or limits apply."""
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        if self.control is None:
            return None
        now = time.monotonic()
        verdict = self.control.admit(source.client_key, source.flow_id if source.session else None, now)
        self.show_headroom(source.client_key, now)
        return verdict

    async def admit_shared(self, source: Source) -> Ticket | Refusal | None:
        """`admit` against the shared store: the session's budget here, the key's in the store,
        which holds the reservation atomically for every process."""
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        control, shared = self.control, self.shared
        assert control is not None and shared is not None
        session_id = source.flow_id if source.session else None
        label = source.client_key
        if refusal := control.refusal(label, session_id, time.monotonic()):
            return refusal
        verdict = await shared.admit(
            label, control.limits, control.key_budget(label), control.window, control.rate_limits(label),
            control.reservation(session_id), key_largest=session_id is None,
        )  # fmt: skip
        self.show_headroom(label, time.monotonic())
        if isinstance(verdict, Refusal):
            return verdict
        return control.admitted_shared(label, session_id, verdict.lease, (verdict.tokens, verdict.usd))

    async def open_session_shared(self, source: Source) -> Refusal | None:
        """`open_session` against the shared store: concurrent sessions counted across processes."""
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        control, shared = self.control, self.shared
        assert control is not None and shared is not None
        label = source.client_key
        verdict = await shared.open_session(
            label, source.flow_id, control.limits, control.key_budget(label), control.window, control.rate_limits(label)
        )
        self.show_headroom(label, time.monotonic())
        return verdict if isinstance(verdict, Refusal) else None

    def refusal(self, source: Source) -> Refusal | None:
        """Why the source's next response would be refused now, without admitting one."""
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        if self.control is None:
            return None
        session_id = source.flow_id if source.session else None
        refusal = self.control.refusal(source.client_key, session_id, time.monotonic())
        if refusal is None and self.shared is not None:  # what the store said last about the key
            return self.viewed_refusal(source.client_key, self.shared.view(source.client_key))
        return refusal

    def viewed_refusal(self, label: str, view: KeyView) -> Refusal | None:
        assert self.control is not None
        budget, rates = self.control.key_budget(label), self.control.rate_limits(label)
        if budget is not None and (
            budget.tokens is not None
            and view.tokens >= budget.tokens
            or budget.usd is not None
            and view.usd >= budget.usd
        ):
            return Refusal(CLIENT_KEY, BUDGET_EXCEEDED, 1.0)
        if rates.tokens_per_minute is not None and view.minute_tokens >= rates.tokens_per_minute:
            return Refusal(CLIENT_KEY, RATE_LIMITED, MINUTE)
        return None

    def open_session(self, source: Source) -> Refusal | None:
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        if self.control is None:
            return None
        verdict = self.control.open_session(source.client_key, source.flow_id, time.monotonic())
        self.show_headroom(source.client_key, time.monotonic())
        return verdict

    def close_session(self, source: Source) -> None:
        if self.control is not None:
            self.control.close_session(source.client_key, source.flow_id)
            if self.shared is not None:
                self.shared.close_session(source.client_key, source.flow_id, self.control.window, self.control.limits)
            self.show_headroom(source.client_key, time.monotonic())

    def show_headroom(self, client_key: str, now: float) -> None:
        assert self.control is not None
        key = self.metrics.client_keys(client_key)
        if self.shared is not None:
            remaining, headroom = shared_headroom(self.control, client_key, self.shared.view(client_key))
        else:
            remaining, headroom = self.control.remaining(client_key, now), self.control.headroom(client_key, now)
        for unit, left in zip(("tokens", "usd"), remaining, strict=True):
            if left is not None:
                self.metrics.budget_remaining.labels(key, unit).set(left)
        for limit, left in headroom.items():
            self.metrics.limit_headroom.labels(key, limit).set(left)

    def enforced(self, refusal: Refusal, action: str) -> None:
        self.metrics.budget_enforcements.labels(refusal.scope, action, refusal.code).inc()

    def guardrail_checked(self, guard: str, phase: str, outcome: str, seconds: float) -> None:
        self.metrics.guardrail_checks.labels(guard, phase, outcome).inc()
        self.metrics.guardrail_duration.labels(guard).observe(seconds)

    def guardrail_audio(self, guard: str, seconds: float) -> None:
        """Audio of a blocked response that had reached the client before the block."""
        self.metrics.guardrail_audio_before_block.labels(guard).observe(seconds)

    def parse_error(self, source: Source, reason: str) -> None:
        self.metrics.parse_error(source.route_type, reason)

    def error(self, source: Source, error_type: str) -> None:
        self.metrics.upstream_errors.labels(source.route_type, error_type).inc()

    def spans_dropped(self, reason: str, count: int) -> None:
        self.metrics.trace_spans_dropped.labels(reason).inc(count)

    def relaying(self, source: Source, sessions: int) -> None:
        """A metered WebSocket session started (1) or ended (-1) being relayed."""
        self.metrics.websocket_sessions.labels(source.route_type).inc(sessions)

    def rate_limits(self, limits: tuple[tuple[str, float, float], ...]) -> None:
        for name, limit, remaining in limits:
            self.metrics.rate_limit_limit.labels(name).set(limit)
            self.metrics.rate_limit_remaining.labels(name).set(remaining)


def shared_headroom(
    control: SpendControl, label: str, view: KeyView
) -> tuple[tuple[float | None, float | None], dict[str, float]]:
    """The budget left and the rate limits' headroom of a key, from what the shared store said last."""
    budget, rates = control.key_budget(label), control.rate_limits(label)
    remaining = (
        None if budget is None or budget.tokens is None else max(budget.tokens - view.tokens, 0),
        None if budget is None or budget.usd is None else max(budget.usd - view.usd, 0.0),
    )
    used = {
        "requests_per_minute": (rates.requests_per_minute, view.requests),
        "tokens_per_minute": (rates.tokens_per_minute, view.minute_tokens),
        "concurrent_sessions": (rates.concurrent_sessions, view.sessions),
    }
    return remaining, {name: max(limit - n, 0) for name, (limit, n) in used.items() if limit is not None}
