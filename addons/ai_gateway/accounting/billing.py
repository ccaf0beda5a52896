"""What happens when usage is billed: metrics, and the durable ledger when one is configured.

Meters decide *what* was billed; this is the one place that decides *where* it goes, so every
route type is accounted for the same way.
"""

from __future__ import annotations

import time

from ai_gateway.accounting.budget import Budgets
from ai_gateway.accounting.ledger import Source, UsageLedger
from ai_gateway.accounting.metrics import UNKNOWN, GatewayMetrics, ModelLabels, Series
from ai_gateway.accounting.observer import NO_OBSERVER, Observer
from ai_gateway.accounting.pricing import PriceCatalog
from ai_gateway.accounting.usage import DurationUsage, TokenUsage


def pricing_model(labels: ModelLabels) -> str:
    """The model a usage is priced as: the resolved response model, else the requested one.

    Transcription never falls back: its request model is the Realtime model, priced differently.
    """
    if labels.response_model and labels.response_model != UNKNOWN:
        return labels.response_model
    return labels.request_model or "" if labels.operation != "transcription" else ""


class Accounting:
    def __init__(
        self,
        metrics: GatewayMetrics,
        ledger: UsageLedger | None = None,
        catalog: PriceCatalog | None = None,
        budgets: Budgets | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self.metrics = metrics
        self.observer = observer  # the access log and traces, told by the meters
        self.last_cost: float | None = None  # of the usage billed last, for the observer's record
        self.ledger = ledger
        self.catalog = catalog
        self.budgets = budgets
        if catalog is not None:
            metrics.price_catalog(catalog.sources)

    def bill(
        self,
        source: Source,
        labels: ModelLabels,
        usage: TokenUsage | DurationUsage,
        status: str | None = None,
        response_id: str | None = None,
    ) -> Series:
        """Record one response's (or transcription's) usage; returns its series for latency figures."""
        series = self.metrics.series(labels)
        series.record(usage)
        if status is not None:
            series.response(status)
        cost = None
        if self.catalog is not None:
            cost, lookup = self.catalog.cost(pricing_model(labels), usage)
            series.priced(lookup, cost)
        self.last_cost = cost
        if self.ledger is not None:
            self.ledger.append(source, labels, usage, status, response_id, cost)
        if self.budgets is not None and isinstance(usage, TokenUsage):
            self.charge(source, usage.input + (usage.output or 0), cost or 0.0)
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

    def charge(self, source: Source, tokens: int, usd: float) -> None:
        assert self.budgets is not None
        now = time.monotonic()
        self.budgets.charge(source.flow_id, source.client_key, tokens, usd, now)
        if source.client_key is not None:
            key = self.metrics.client_keys(source.client_key)
            for unit, left in zip(("tokens", "usd"), self.budgets.remaining(source.client_key, now), strict=True):
                if left is not None:
                    self.metrics.budget_remaining.labels(key, unit).set(left)

    def exhausted(self, source: Source) -> str | None:
        """The budget scope that refuses more spend for this source, if any."""
        if self.budgets is None:
            return None
        return self.budgets.exhausted(source.flow_id, source.client_key, time.monotonic())

    def enforced(self, scope: str, action: str) -> None:
        self.metrics.budget_enforcements.labels(scope, action).inc()

    def parse_error(self, source: Source, reason: str) -> None:
        self.metrics.parse_error(source.route_type, reason)

    def error(self, source: Source, error_type: str) -> None:
        self.metrics.upstream_errors.labels(source.route_type, error_type).inc()

    def rate_limits(self, limits: tuple[tuple[str, float, float], ...]) -> None:
        for name, limit, remaining in limits:
            self.metrics.rate_limit_limit.labels(name).set(limit)
            self.metrics.rate_limit_remaining.labels(name).set(remaining)
