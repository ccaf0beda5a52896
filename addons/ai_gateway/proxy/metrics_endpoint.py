"""The Prometheus families and the `/metrics` endpoint that serves them."""

from __future__ import annotations

import ipaddress
import logging
import re

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from ai_gateway.accounting.metrics import (
    DEFAULT_MAX_MODEL_LABELS,
    DEFAULT_MAX_SERIES_PER_FAMILY,
    OPERATION_NAMES,
    GatewayMetrics,
    MetricsServer,
)
from ai_gateway.proxy.state import GatewayState

FAMILY_OPTIONS = {
    "gateway_metrics_prefix",
    "gateway_max_model_labels",
    "gateway_max_series_per_family",
    "gateway_operation_names",
}
ENDPOINT_OPTIONS = {"gateway_metrics_host", "gateway_metrics_port", *FAMILY_OPTIONS}

logger = logging.getLogger(__name__)

_METRIC_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class MetricsEndpoint:
    """Creates the metric families the options name (before any other addon configures: the
    policy's shared store and the tracer count into them) and serves them."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.server: MetricsServer | None = None

    def load(self, loader: Loader) -> None:
        option = loader.add_option
        option("gateway_metrics_host", str, "127.0.0.1", "Address the Prometheus /metrics endpoint listens on.")
        option("gateway_metrics_port", int, 15020, "Port of the Prometheus /metrics endpoint; 0 turns it off.")
        option(
            "gateway_metrics_prefix", str, "agentgateway", "Prefix of every metric name (agentgateway's by default)."
        )
        option(
            "gateway_max_model_labels",
            int,
            DEFAULT_MAX_MODEL_LABELS,
            "Distinct values kept per model label; later ones are recorded as 'other' (clients choose model names).",
        )
        option(
            "gateway_max_series_per_family",
            int,
            DEFAULT_MAX_SERIES_PER_FAMILY,
            "Label sets kept per model-labelled metric family (request x response model pairs included); later "
            "ones are recorded with both models 'other' and counted in metric_series_folded_total.",
        )
        option(
            "gateway_operation_names",
            str,
            "ours",
            "gen_ai_operation_name values: 'ours' (realtime for Realtime sessions) or 'agentgateway' (chat, as "
            "agentgateway labels them, for dashboards that expect its values exactly).",
            choices=OPERATION_NAMES,
        )

    def configure(self, updated: set[str]) -> None:
        if updated & FAMILY_OPTIONS:
            options = ctx.options
            prefix, max_labels = options.gateway_metrics_prefix, options.gateway_max_model_labels
            if not _METRIC_PREFIX.fullmatch(prefix):
                self.state.refuse(f"gateway_metrics_prefix: expected a Prometheus metric name prefix, got {prefix!r}")
            elif max_labels < 1:
                self.state.refuse(f"gateway_max_model_labels: expected a positive number, got {max_labels}")
            elif (max_series := options.gateway_max_series_per_family) < 1:
                self.state.refuse(f"gateway_max_series_per_family: expected a positive number, got {max_series}")
            elif (names := options.gateway_operation_names) not in OPERATION_NAMES:
                # mitmproxy checks `choices` when an option is set, but not for a `--set` deferred
                # until a script declares the option (as `mitmdump -s` does): checked here too.
                self.state.refuse(
                    f"gateway_operation_names: expected one of {', '.join(OPERATION_NAMES)}, got {names!r}"
                )
            else:
                self.state.metrics = GatewayMetrics(prefix, max_labels, names, max_series)
                self.state.rewire()
        if self.state.is_running and updated & ENDPOINT_OPTIONS:
            self.restart()

    def running(self) -> None:
        self.restart()  # before the gateway runs: a port in use is fatal at startup

    def done(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        """The new endpoint is bound before the old one stops: if it cannot be, the change is
        refused and the old one keeps serving. The same address keeps its server (new metrics)."""
        host, port = ctx.options.gateway_metrics_host, ctx.options.gateway_metrics_port
        if self.server is not None and (self.server.host, self.server.port) == (host, port):
            self.server.registry = self.state.metrics.registry
            return
        try:
            server = MetricsServer(self.state.metrics.registry, host, port) if port else None
        except OSError as e:
            self.state.refuse(f"cannot serve metrics on {host}:{port}: {e.strerror or e}")
            return
        self.done()
        self.server = server
        if server is None:
            return
        logger.info("ai-gateway: metrics on http://%s:%d/metrics", host, server.port)
        if not is_loopback(host):
            logger.warning("ai-gateway: the metrics endpoint listens on %s, beyond this machine", host)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
