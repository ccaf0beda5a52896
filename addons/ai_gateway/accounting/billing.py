"""What happens when usage is billed: metrics, and the durable ledger when one is configured.

Meters decide *what* was billed; this is the one place that decides *where* it goes, so every
route type is accounted for the same way.
"""

from __future__ import annotations

import time

from ai_gateway.accounting.ledger import USAGE_LOG, Source, UsageLedger
from ai_gateway.accounting.limits import Refusal, SpendControl, Ticket
from ai_gateway.accounting.metrics import UNKNOWN, GatewayMetrics, ModelLabels, Series
from ai_gateway.accounting.observer import NO_OBSERVER, Observer
from ai_gateway.accounting.pricing import PriceCatalog
from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, TokenUsage

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
    ) -> None:
        self.observer = observer  # the access log and traces, told by the meters
        self.last_cost: float | None = None  # of the usage billed last, for the observer's record
        self.rewire(metrics, ledger, catalog, control)

    def rewire(
        self,
        metrics: GatewayMetrics,
        ledger: UsageLedger | None,
        catalog: PriceCatalog | None,
        control: SpendControl | None,
    ) -> None:
        """Where billed usage goes from now on; meters keep this object, so open sessions follow."""
        self.metrics = metrics
        self.ledger = ledger
        self.catalog = catalog
        self.control = control
        if catalog is not None:
            metrics.price_catalog(catalog.sources)

    def bill(
        self,
        source: Source,
        labels: ModelLabels,
        usage: TokenUsage | DurationUsage | CharacterUsage,
        status: str | None = None,
        response_id: str | None = None,
        ticket: Ticket | None = None,
    ) -> Series:
        """Record one response's (or transcription's) usage; returns its series for latency figures."""
        series = self.metrics.series(labels)
        series.record(usage)
        if status is not None:
            series.response(status)
        cost = None
        if self.catalog is not None:
            cost, lookup = self.catalog.cost(pricing_model(labels, source.session), usage)
            series.priced(lookup, cost)
        self.last_cost = cost
        if self.ledger is not None and not self.ledger.append(source, labels, usage, status, response_id, cost):
            self.metrics.usage_log_errors.inc()
        if self.control is not None:
            tokens = usage.input + (usage.output or 0) if isinstance(usage, TokenUsage) else 0
            self.settle(source, ticket, tokens, cost or 0.0)
        return series

    def unbilled(
        self, source: Source, labels: ModelLabels, status: str, response_id: str | None, reason: str
    ) -> Series:
        """A response whose usage could not be read: it counts, with its status, and bills nothing."""
        series = self.metrics.series(labels)
        series.response(status)
        self.parse_error(source, reason)
        if self.ledger is not None:
            self.ledger.append(source, labels, None, status, response_id, None)
        return series

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
        self.control.settle(ticket, source.client_key, source.flow_id if source.session else None, now, tokens, usd)
        self.show_headroom(source.client_key, now)

    def release(self, ticket: Ticket) -> None:
        """An admitted response that will bill nothing (refused upstream, its session gone)."""
        if self.control is not None and ticket.open:
            now = time.monotonic()
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

    def refusal(self, source: Source) -> Refusal | None:
        """Why the source's next response would be refused now, without admitting one."""
        if self.ledger is not None and not self.ledger.admits():
            return LEDGER_REFUSAL
        if self.control is None:
            return None
        return self.control.refusal(source.client_key, source.flow_id if source.session else None, time.monotonic())

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
            self.show_headroom(source.client_key, time.monotonic())

    def show_headroom(self, client_key: str, now: float) -> None:
        assert self.control is not None
        key = self.metrics.client_keys(client_key)
        for unit, left in zip(("tokens", "usd"), self.control.remaining(client_key, now), strict=True):
            if left is not None:
                self.metrics.budget_remaining.labels(key, unit).set(left)
        for limit, left in self.control.headroom(client_key, now).items():
            self.metrics.limit_headroom.labels(key, limit).set(left)

    def enforced(self, refusal: Refusal, action: str) -> None:
        self.metrics.budget_enforcements.labels(refusal.scope, action, refusal.code).inc()

    def parse_error(self, source: Source, reason: str) -> None:
        self.metrics.parse_error(source.route_type, reason)

    def error(self, source: Source, error_type: str) -> None:
        self.metrics.upstream_errors.labels(source.route_type, error_type).inc()

    def rate_limits(self, limits: tuple[tuple[str, float, float], ...]) -> None:
        for name, limit, remaining in limits:
            self.metrics.rate_limit_limit.labels(name).set(limit)
            self.metrics.rate_limit_remaining.labels(name).set(remaining)
