"""What happens when usage is billed: metrics, and the durable ledger when one is configured.

Meters decide *what* was billed; this is the one place that decides *where* it goes, so every
route type is accounted for the same way.
"""

from __future__ import annotations

from .ledger import Source, UsageLedger
from .metrics import GatewayMetrics, ModelLabels, Series
from .usage import DurationUsage, TokenUsage


class Accounting:
    def __init__(self, metrics: GatewayMetrics, ledger: UsageLedger | None = None) -> None:
        self.metrics = metrics
        self.ledger = ledger

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
        if self.ledger is not None:
            self.ledger.append(source, labels, usage, status, response_id)
        return series

    def parse_error(self, source: Source, reason: str) -> None:
        self.metrics.parse_error(source.route_type, reason)

    def error(self, source: Source, error_type: str) -> None:
        self.metrics.upstream_errors.labels(source.route_type, error_type).inc()
