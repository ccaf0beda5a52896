"""The access log and the traces, as the gateway's options ask for them.

The meters tell `Observability` (the observer every `Accounting` holds) about each finished
response and session; the request policy hands it each metered request as it arrives, to open
its span and forward the trace upstream. As an addon after the metering addons, it ends the
spans of requests that finished without a record: refused by a budget, failed before any response.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from ai_gateway.accounting.access_log import FORMATS, AccessLog
from ai_gateway.accounting.observer import Observers
from ai_gateway.accounting.tracing import Tracing, queue_size, traces_endpoint

if TYPE_CHECKING:
    from ai_gateway.proxy.state import GatewayState

logger = logging.getLogger(__name__)


class Observability(Observers):
    def __init__(self, state: GatewayState) -> None:
        super().__init__()
        self.state = state
        self.access_log: AccessLog | None = None
        self.tracing: Tracing | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_access_log",
            str,
            "text",
            "One line per metered HTTP request, finished WebSocket response and closed session on stdout: "
            "text, json or off. While on, mitmdump's own flow lines are off unless flow_detail is set.",
        )
        loader.add_option(
            "gateway_otlp_endpoint",
            str,
            "",
            "OpenTelemetry collector (OTLP/HTTP base URL, such as http://collector:4318) to send traces to; "
            "empty: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no traces; off: no traces.",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            if "gateway_access_log" in updated:
                self.configure_access_log(ctx.options.gateway_access_log)
            if "gateway_otlp_endpoint" in updated:
                self.configure_tracing(ctx.options.gateway_otlp_endpoint)
        except ValueError as e:
            self.state.refuse(str(e))

    def running(self) -> None:
        self.quiet_dumper()

    def done(self) -> None:
        self.shutdown()

    def configure_access_log(self, fmt: str) -> None:
        """Raises ValueError for a format other than text, json or off."""
        if fmt not in FORMATS:
            raise ValueError(f"gateway_access_log: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.access_log = None if fmt == "off" else AccessLog(fmt)
        self.refresh()

    def configure_tracing(self, option: str) -> None:
        """Raises ValueError for an endpoint that is not an http(s) URL."""
        endpoint = traces_endpoint(option, os.environ)
        if self.tracing is not None and (endpoint is None or endpoint != self.tracing.endpoint):
            self.tracing.shutdown()
            self.tracing = None
        if endpoint is not None and self.tracing is None:
            self.tracing = Tracing(endpoint, self.dropped, queue_size(os.environ))
            logger.info("ai-gateway: traces to %s", endpoint)
        self.refresh()

    def refresh(self) -> None:
        """The observers in force: the access log, the traces, the conversations kept for mitmweb."""
        conversations = self.state.conversations if self.state.conversations.enabled else None
        self.replace(o for o in (self.access_log, self.tracing, conversations) if o is not None)  # type: ignore[misc]

    def dropped(self, reason: str, count: int) -> None:
        """Spans lost on the export thread, counted by Accounting in the metrics now in force."""
        self.state.accounting.spans_dropped(reason, count)

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

    # Hooks, after the metering addons': whatever span is still open was not ended by a record.

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
