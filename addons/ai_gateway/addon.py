"""The mitmproxy addon: thin glue between mitmproxy's hooks and the gateway's pure parts."""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import TypeVar

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from .headers import apply_header_policy, redact, remove_client_credentials
from .http_meter import METERED_HTTP, HttpExchange, rewrite_request
from .meter import RealtimeMeter, ResponsesSocketMeter, SessionMeter, requested_model
from .metrics import GatewayMetrics, MetricsServer
from .policy import DEFAULT_POLICY, Auth, Policy, PolicyError, RouteType, load_policy

logger = logging.getLogger(__name__)

_METRIC_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
Hook = TypeVar("Hook", bound=Callable[..., None])


def never_raises[Hook: Callable[..., None]](hook: Hook) -> Hook:
    """A hook that fails must not break the relay: log it and let the flow go on."""

    @functools.wraps(hook)
    def guarded(self: object, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            logger.exception("ai-gateway: %s failed for %s", hook.__name__, flow.request.path.split("?", 1)[0])

    return guarded  # type: ignore[return-value]


class UpstreamCredential:
    """Sets the upstream key on requests as the last addon in the chain.

    Running last means no other addon (mitmweb's view, interception, dumpers) sees the key
    before the request leaves; Gateway redacts it again as soon as the response begins.
    """

    def __init__(self) -> None:
        self.auth: Auth | None = None

    def request(self, flow: http.HTTPFlow) -> None:
        if self.auth is not None and flow.response is None and flow.error is None:
            flow.request.headers[self.auth.header] = self.auth.header_value


class Gateway:
    """Applies the policy to requests and meters Realtime sessions into Prometheus metrics."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.metrics = GatewayMetrics("agentgateway")
        self.server: MetricsServer | None = None
        self.credential = UpstreamCredential()
        self.history: int | None = 1
        self.is_running = False
        self.sessions: dict[str, SessionMeter] = {}
        self.exchanges: dict[str, HttpExchange] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_policy",
            str,
            str(DEFAULT_POLICY),
            "Gateway policy file (YAML): route types, header policies, upstream credential.",
        )
        loader.add_option(
            "gateway_metrics_host", str, "127.0.0.1", "Address the Prometheus /metrics endpoint listens on."
        )
        loader.add_option(
            "gateway_metrics_port", int, 15020, "Port of the Prometheus /metrics endpoint; 0 turns it off."
        )
        loader.add_option(
            "gateway_metrics_prefix", str, "agentgateway", "Prefix of every metric name (agentgateway's by default)."
        )
        loader.add_option(
            "gateway_websocket_history",
            str,
            "auto",
            "WebSocket messages kept per flow: a number, 'all', or 'auto' (the last one under mitmdump, "
            "all under mitmweb). mitmproxy otherwise keeps every message of a session until it closes.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_policy" in updated:
            self.policy = self.read_policy(ctx.options.gateway_policy)
            self.credential.auth = self.policy.auth
        if "gateway_metrics_prefix" in updated:
            prefix = ctx.options.gateway_metrics_prefix
            if not _METRIC_PREFIX.fullmatch(prefix):
                raise exceptions.OptionsError(
                    f"gateway_metrics_prefix: expected a Prometheus metric name prefix, got {prefix!r}"
                )
            self.metrics = GatewayMetrics(prefix)
        if "gateway_websocket_history" in updated:
            self.history = parse_history(ctx.options.gateway_websocket_history, under_web="web_port" in ctx.options)
        if self.is_running and updated & {"gateway_metrics_host", "gateway_metrics_port", "gateway_metrics_prefix"}:
            self.restart_metrics_server()

    def read_policy(self, path: str) -> Policy:
        try:
            policy = load_policy(path)
        except PolicyError as e:
            if self.is_running:
                raise exceptions.OptionsError(str(e)) from None
            # At startup mitmproxy would print a traceback for an exception; one line is clearer,
            # and the logged error makes mitmproxy's startup check exit non-zero.
            logger.error("ai-gateway: invalid policy: %s", e)
            return Policy(source=path)
        logger.info("ai-gateway: policy %s (%d routes)", path, len(policy.routes))
        return policy

    def running(self) -> None:
        self.is_running = True
        ctx.master.addons.add(self.credential)
        self.restart_metrics_server()

    def done(self) -> None:
        self.is_running = False
        if ctx.master.addons.get("upstreamcredential") is self.credential:
            ctx.master.addons.remove(self.credential)
        self.stop_metrics_server()

    def restart_metrics_server(self) -> None:
        self.stop_metrics_server()
        host, port = ctx.options.gateway_metrics_host, ctx.options.gateway_metrics_port
        if port == 0:
            return
        try:
            self.server = MetricsServer(self.metrics.registry, host, port)
        except OSError as e:
            logger.error("ai-gateway: cannot serve metrics on %s:%d: %s", host, port, e.strerror or e)
            return
        logger.info("ai-gateway: metrics on http://%s:%d/metrics", host, self.server.port)
        if not is_loopback(host):
            logger.warning("ai-gateway: the metrics endpoint listens on %s, beyond this machine", host)

    def stop_metrics_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @never_raises
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        request = flow.request
        if self.policy.auth is not None:
            remove_client_credentials(request.headers)
        route = self.policy.match(request.path)
        apply_header_policy(request.headers, route.request)
        model = self.policy.model_for(route)
        if route.type is RouteType.REALTIME and model is not None:
            request.query["model"] = model

    @never_raises
    def request(self, flow: http.HTTPFlow) -> None:
        if self.policy is None or is_websocket_upgrade(flow.request):
            return
        route = self.policy.match(flow.request.path)
        if route.type not in METERED_HTTP:
            return
        body = flow.request.get_content(strict=False) or b""
        request_model, rewritten = rewrite_request(route.type, body, self.policy.model_for(route))
        if rewritten is not None:
            flow.request.content = rewritten
        self.exchanges[flow.id] = HttpExchange(self.metrics, route.type, self.policy.provider, request_model)

    @never_raises
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.redact_credential(flow)
        exchange = self.exchanges.get(flow.id)
        response = flow.response
        if exchange is None or response is None or not 200 <= response.status_code < 300:
            return
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            response.stream = exchange.streaming(response.headers.get("content-encoding", ""))

    @never_raises
    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if exchange is None or flow.response is None:
            return
        status = flow.response.status_code
        if status >= 400:
            exchange.finish(str(status))
            return
        if exchange.stream is None and flow.websocket is None:
            exchange.body(flow.response.get_content(strict=False) or b"")
        exchange.finish("")

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        self.redact_credential(flow)
        exchange = self.exchanges.pop(flow.id, None)
        if exchange is not None and flow.error is not None:
            exchange.finish(error_type(flow.error.msg))

    def redact_credential(self, flow: http.HTTPFlow) -> None:
        if self.policy is not None and (auth := self.policy.auth) is not None:
            redact(flow.request.headers, auth.header, auth.key)

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        meter = SESSION_METERS.get(self.policy.match(flow.request.path).type)
        if meter is not None:
            self.sessions[flow.id] = meter(self.metrics, self.policy.provider, requested_model(flow.request.url))
            self.metrics.realtime_sessions.inc()

    @never_raises
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        messages = flow.websocket.messages
        message = messages[-1]
        meter = self.sessions.get(flow.id)
        if meter is not None:
            if message.from_client:
                meter.client_frame(message.content)
            elif problem := meter.server_frame(message.content, message.is_text):
                logger.debug("ai-gateway: unreadable server frame (%s): %s", problem.reason, problem.detail)
        if self.history is not None and len(messages) > self.history:
            del messages[: -self.history]

    @never_raises
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if self.sessions.pop(flow.id, None) is not None:
            self.metrics.realtime_sessions.dec()


SESSION_METERS = {RouteType.REALTIME: RealtimeMeter, RouteType.RESPONSES: ResponsesSocketMeter}


def is_websocket_upgrade(request: http.Request) -> bool:
    return "websocket" in request.headers.get("upgrade", "").lower()


def error_type(message: str) -> str:
    """A bounded error_type label from mitmproxy's error message."""
    lowered = message.lower()
    if "certificate" in lowered or "tls" in lowered or "ssl" in lowered:
        return "tls_error"
    if "timeout" in lowered or "timed out" in lowered:
        return "timeout"
    if "killed" in lowered or "client disconnected" in lowered:
        return "client_disconnected"
    return "connection_error"


def parse_history(value: str, under_web: bool) -> int | None:
    """Messages to keep per WebSocket flow; None keeps all."""
    if value == "all" or (value == "auto" and under_web):
        return None
    if value == "auto":
        return 1
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise exceptions.OptionsError(
        f"gateway_websocket_history: expected a positive number, 'all' or 'auto', got {value!r}"
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
