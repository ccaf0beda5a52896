"""The access log and the traces, as the gateway's options ask for them.

The meters tell `Observability` (the observer every `Accounting` holds) about each finished
response and session; the gateway hands it each metered request as it arrives, to open its
span and forward the trace upstream. As an addon after the gateway, it ends the spans of
requests that finished without a record: refused by a budget, failed before any response.
"""

from __future__ import annotations

import logging
import os

from mitmproxy import ctx, http

from ai_gateway.accounting.access_log import FORMATS, AccessLog
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.observer import Observers
from ai_gateway.accounting.tracing import Tracing, queue_size, traces_endpoint

logger = logging.getLogger(__name__)


class Observability(Observers):
    def __init__(self) -> None:
        super().__init__()
        self.access_log: AccessLog | None = None
        self.tracing: Tracing | None = None
        self.metrics: GatewayMetrics | None = None

    def configure_access_log(self, fmt: str) -> None:
        """Raises ValueError for a format other than text, json or off."""
        if fmt not in FORMATS:
            raise ValueError(f"gateway_access_log: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.access_log = None if fmt == "off" else AccessLog(fmt)
        self.refresh()

    def configure_tracing(self, option: str, metrics: GatewayMetrics) -> None:
        """Raises ValueError for an endpoint that is not an http(s) URL."""
        endpoint = traces_endpoint(option, os.environ)
        self.metrics = metrics
        if self.tracing is not None and (endpoint is None or endpoint != self.tracing.endpoint):
            self.tracing.shutdown()
            self.tracing = None
        if endpoint is not None and self.tracing is None:
            self.tracing = Tracing(endpoint, self.dropped, queue_size(os.environ))
            logger.info("ai-gateway: traces to %s", endpoint)
        self.refresh()

    def refresh(self) -> None:
        self.replace(o for o in (self.access_log, self.tracing) if o is not None)  # type: ignore[misc]

    def dropped(self, reason: str, count: int) -> None:
        """Spans lost on the export thread, counted in the gateway's current metrics."""
        if self.metrics is not None:
            self.metrics.trace_spans_dropped.labels(reason).inc(count)

    def request_arrived(self, flow: http.HTTPFlow, operation: str, model: str | None) -> None:
        """A metered request (or WebSocket handshake): its span, and the trace forwarded upstream."""
        if self.tracing is not None:
            request = flow.request
            forwarded = self.tracing.begin(flow.id, request.headers, operation, model)
            for name, value in forwarded.items():
                request.headers[name] = value

    def quiet_dumper(self) -> None:
        """The access log replaces mitmdump's flow lines (one per WebSocket message): `flow_detail`
        0 unless the user set it. `--set flow_detail=2` (or `-v`) brings them back."""
        options = ctx.options
        if self.access_log is not None and "flow_detail" in options and not options.has_changed("flow_detail"):
            options.update(flow_detail=0)

    # Hooks, after the gateway's: whatever span is still open was not ended by a record.

    def response(self, flow: http.HTTPFlow) -> None:
        if self.tracing is not None and flow.websocket is None and flow.response is not None:
            self.tracing.abandon(flow.id, flow.response.status_code, "")

    def error(self, flow: http.HTTPFlow) -> None:
        if self.tracing is not None and flow.websocket is None:
            self.tracing.abandon(flow.id, None, "error")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if self.tracing is not None:
            self.tracing.abandon(flow.id, None, "")

    def shutdown(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()
            self.tracing = None
        self.refresh()
