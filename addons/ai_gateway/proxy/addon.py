"""The mitmproxy addon: thin glue between mitmproxy's hooks and the gateway's pure parts."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from typing import NamedTuple

from mitmproxy import contentviews, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.budget import Budgets, client_key_digest, update_budgets
from ai_gateway.accounting.http_exchange import HttpExchange
from ai_gateway.accounting.items import ResponseRequested
from ai_gateway.accounting.ledger import Source, UsageLedger
from ai_gateway.accounting.metrics import DEFAULT_MAX_MODEL_LABELS, GatewayMetrics, MetricsServer
from ai_gateway.accounting.pricing import PriceCatalog, catalog_for
from ai_gateway.accounting.session_meters import RealtimeMeter, ResponsesSocketMeter, SessionMeter
from ai_gateway.config.policy import DEFAULT_POLICY, Policy, PolicyError, RouteType, load_policy
from ai_gateway.protocols.openai_http import METERED_HTTP, OPERATIONS, StreamReader, read_body, rewrite_request
from ai_gateway.protocols.openai_realtime import RealtimeProtocol, requested_model
from ai_gateway.protocols.openai_responses_socket import ResponsesSocketProtocol
from ai_gateway.proxy.contentview import realtime_view
from ai_gateway.proxy.credential import UpstreamCredential
from ai_gateway.proxy.failures import close_error, error_type
from ai_gateway.proxy.headers import apply_header_policy, client_credential, remove_client_credentials
from ai_gateway.proxy.history import parse_history, shrink_audio, trim
from ai_gateway.proxy.observability import Observability
from ai_gateway.proxy.refusals import budget_error_event, budget_response

POLICY_POLL_SECONDS = 1.0
CLIENT_KEY_METADATA = "ai_gateway.client_key"
METRICS_OPTIONS = {"gateway_metrics_host", "gateway_metrics_port", "gateway_metrics_prefix", "gateway_max_model_labels"}
TRACING_OPTIONS = {"gateway_otlp_endpoint", "gateway_metrics_prefix", "gateway_max_model_labels"}

logger = logging.getLogger(__name__)

_METRIC_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def never_raises[Hook: Callable[..., None]](hook: Hook) -> Hook:
    """A hook that fails must not break the relay: log it and let the flow go on."""

    @functools.wraps(hook)
    def guarded(self: object, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            logger.exception("ai-gateway: %s failed for %s", hook.__name__, flow.request.path.split("?", 1)[0])

    return guarded  # type: ignore[return-value]


class Gateway:
    """Applies the policy to requests and meters usage into Prometheus metrics and the ledger."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.catalog: PriceCatalog | None = None
        self.budgets: Budgets | None = None
        self.metrics = GatewayMetrics("agentgateway")
        self.ledger: UsageLedger | None = None
        self.observability = Observability()
        self.accounting = Accounting(self.metrics, observer=self.observability)
        self.server: MetricsServer | None = None
        self.credential = UpstreamCredential()
        self.history: int | None = 1
        self.shrink_relayed_audio = True
        self.is_running = False
        self.watcher: asyncio.Task[None] | None = None
        self.sessions: dict[str, Session] = {}
        self.exchanges: dict[str, HttpExchange] = {}

    def load(self, loader: Loader) -> None:
        contentviews.add(realtime_view)
        option = loader.add_option
        option(
            "gateway_policy",
            str,
            str(DEFAULT_POLICY),
            "Policy file (YAML): route types, header policies, upstream key.",
        )
        option(
            "gateway_policy_reload", bool, True, "Apply edits of the policy file to new connections without restart."
        )
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
            "gateway_usage_log", str, "", "Append one JSON line per metered response to this file (the usage ledger)."
        )
        option(
            "gateway_strip_audio",
            bool,
            True,
            "Replace audio payloads of kept WebSocket messages by a short placeholder once they were relayed.",
        )
        option(
            "gateway_websocket_history",
            str,
            "auto",
            "WebSocket messages kept per flow: a number, 'all', or 'auto' (the last one under mitmdump, "
            "all under mitmweb). mitmproxy otherwise keeps every message of a session until it closes.",
        )
        option(
            "gateway_access_log",
            str,
            "text",
            "One line per metered HTTP request, finished WebSocket response and closed session on stdout: "
            "text, json or off. While on, mitmdump's own flow lines are off unless flow_detail is set.",
        )
        option(
            "gateway_otlp_endpoint",
            str,
            "",
            "OpenTelemetry collector (OTLP/HTTP base URL, such as http://collector:4318) to send traces to; "
            "empty: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no traces; off: no traces.",
        )

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if "gateway_policy" in updated:
            self.set_policy(options.gateway_policy)
        if updated & {"gateway_metrics_prefix", "gateway_max_model_labels"}:
            prefix, max_labels = options.gateway_metrics_prefix, options.gateway_max_model_labels
            if not _METRIC_PREFIX.fullmatch(prefix):
                self.refuse(f"gateway_metrics_prefix: expected a Prometheus metric name prefix, got {prefix!r}")
            elif max_labels < 1:
                self.refuse(f"gateway_max_model_labels: expected a positive number, got {max_labels}")
            else:
                self.metrics = GatewayMetrics(prefix, max_labels)
        if "gateway_usage_log" in updated:
            self.open_ledger(options.gateway_usage_log)
        self.accounting = Accounting(self.metrics, self.ledger, self.catalog, self.budgets, self.observability)
        if "gateway_websocket_history" in updated:
            try:
                self.history = parse_history(options.gateway_websocket_history, under_web="web_port" in options)
            except ValueError as e:
                self.refuse(str(e))
        if "gateway_strip_audio" in updated:
            self.shrink_relayed_audio = options.gateway_strip_audio
        self.configure_observability(updated)
        if self.is_running and updated & METRICS_OPTIONS:
            self.restart_metrics_server()

    def configure_observability(self, updated: set[str]) -> None:
        try:
            if "gateway_access_log" in updated:
                self.observability.configure_access_log(ctx.options.gateway_access_log)
            if updated & TRACING_OPTIONS:
                self.observability.configure_tracing(ctx.options.gateway_otlp_endpoint, self.metrics)
        except ValueError as e:
            self.refuse(str(e))

    def refuse(self, message: str) -> None:
        """An invalid setting: refused while running (the previous value stays), fatal at startup.

        At startup mitmproxy would print a traceback for an exception; one logged line is clearer,
        and a logged error makes mitmproxy's startup check exit non-zero.
        """
        if self.is_running:
            raise exceptions.OptionsError(message)
        logger.error("ai-gateway: %s", message)

    def set_policy(self, path: str) -> None:
        try:
            self.apply_policy(*read_policy(path))
        except PolicyError as e:
            self.refuse(f"invalid policy: {e}")
            return
        logger.info("ai-gateway: policy %s (%d routes)", path, len(self.policy.routes))

    def apply_policy(self, policy: Policy, catalog: PriceCatalog | None) -> None:
        """Everything that follows from a policy; spend already counted against budgets is kept."""
        self.policy, self.catalog = policy, catalog
        self.budgets = update_budgets(self.budgets, policy.budgets)
        self.accounting = Accounting(self.metrics, self.ledger, self.catalog, self.budgets, self.observability)
        self.credential.auth = policy.auth

    def open_ledger(self, path: str) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if path:
            try:
                self.ledger = UsageLedger(path)
            except OSError as e:
                self.refuse(f"gateway_usage_log: cannot append to {path}: {e.strerror or e}")

    async def watch_policy(self) -> None:
        """mitmproxy's script watcher does the same for scripts: poll the file's stat every second.

        It follows `gateway_policy`: a policy set through the option is watched from then on."""
        path = ctx.options.gateway_policy
        last = policy_stamp(path)
        while True:
            await asyncio.sleep(POLICY_POLL_SECONDS)
            if ctx.options.gateway_policy != path:  # configure() already loaded the new file
                path = ctx.options.gateway_policy
                last = policy_stamp(path)
                continue
            stamp = policy_stamp(path)
            if stamp != last and stamp is not None:
                last = stamp
                self.reload_policy(path)

    def reload_policy(self, path: str) -> None:
        try:
            self.apply_policy(*read_policy(path))
        except PolicyError as e:
            logger.error("ai-gateway: policy change refused, the previous policy stays in force: %s", e)
            return
        logger.info(
            "ai-gateway: policy reloaded: %s (%d routes), applies to new connections", path, len(self.policy.routes)
        )

    def running(self) -> None:
        self.is_running = True
        show_comment_column()
        ctx.master.addons.add(self.credential, self.observability)
        self.observability.quiet_dumper()
        self.restart_metrics_server()
        if ctx.options.gateway_policy_reload:
            self.watcher = asyncio.get_running_loop().create_task(self.watch_policy())

    def done(self) -> None:
        self.is_running = False
        if self.watcher is not None:
            self.watcher.cancel()
        if ctx.master.addons.get("upstreamcredential") is self.credential:
            ctx.master.addons.remove(self.credential)
        if ctx.master.addons.get("observability") is self.observability:
            ctx.master.addons.remove(self.observability)
        self.observability.shutdown()
        self.stop_metrics_server()
        if self.ledger is not None:
            self.ledger.close()

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
        if credential := client_credential(request):
            flow.metadata[CLIENT_KEY_METADATA] = client_key_digest(credential)
        if self.policy.auth is not None:
            remove_client_credentials(request)
        route = self.policy.match(request.path)
        apply_header_policy(request.headers, route.request)
        model = self.policy.model_for(route)
        if route.type is RouteType.REALTIME and model is not None:
            request.query["model"] = model
        if route.type in (SESSION_KINDS if is_websocket_upgrade(request) else METERED_HTTP):
            self.observability.request_arrived(flow, traced_operation(route.type), model)

    @never_raises
    def request(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        route = self.policy.match(flow.request.path)
        upgrade = is_websocket_upgrade(flow.request)
        if route.type not in (SESSION_KINDS if upgrade else METERED_HTTP):
            return
        source = self.source(flow, route.type)
        if scope := self.accounting.exhausted(source):
            flow.response = budget_response(scope)
            self.accounting.enforced(scope, "rejected_request")
            return
        if upgrade:
            return
        body = flow.request.get_content(strict=False) or b""
        request_model, rewritten = rewrite_request(route.type, body, self.policy.model_for(route))
        if rewritten is not None:
            flow.request.content = rewritten
        operation = OPERATIONS[route.type]
        self.exchanges[flow.id] = HttpExchange(self.accounting, source, operation, self.policy.provider, request_model)

    def source(self, flow: http.HTTPFlow, route_type: RouteType) -> Source:
        return Source(flow.id, route_type.value, flow.metadata.get(CLIENT_KEY_METADATA))

    @never_raises
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.get(flow.id)
        response = flow.response
        if exchange is None or response is None or not 200 <= response.status_code < 300:
            return
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            reader = StreamReader(RouteType(exchange.source.route_type), response.headers.get("content-encoding", ""))
            response.stream = metered_stream(exchange, reader)

    @never_raises
    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if flow.response is not None and flow.response.status_code >= 400 and (source := self.upgrade_source(flow)):
            self.accounting.error(source, str(flow.response.status_code))
        if exchange is None or flow.response is None:
            return
        status = flow.response.status_code
        if status >= 400:
            exchange.finish(str(status), status)
            return
        if not exchange.streamed and flow.websocket is None:
            route_type = RouteType(exchange.source.route_type)
            exchange.apply(read_body(route_type, flow.response.get_content(strict=False) or b""))
        exchange.finish("", status)

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if flow.error is None:
            return
        if exchange is not None:
            exchange.finish(error_type(flow.error.msg))
        elif flow.websocket is None and (source := self.upgrade_source(flow)):
            self.accounting.error(source, error_type(flow.error.msg))

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        """With mitmproxy's eager connection strategy the upstream is dialled before any request
        (so before any flow): count the failure here, under route_type `unknown`. Lazily, the
        flow's `error` hook counts it with its route type, and this one stays out of the way."""
        if ctx.options.connection_strategy == "eager":
            self.metrics.upstream_errors.labels("unknown", error_type(data.server.error or "")).inc()

    def upgrade_source(self, flow: http.HTTPFlow) -> Source | None:
        """The source of a WebSocket handshake on a metered route, for counting its failure."""
        if self.policy is None or not is_websocket_upgrade(flow.request):
            return None
        route_type = self.policy.match(flow.request.path).type
        return self.source(flow, route_type) if route_type in SESSION_KINDS else None

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        route_type = self.policy.match(flow.request.path).type
        kinds = SESSION_KINDS.get(route_type)
        if kinds is not None:
            protocol, meter = kinds
            source = self.source(flow, route_type)
            model = requested_model(flow.request.url)
            self.sessions[flow.id] = Session(protocol(), meter(self.accounting, source, self.policy.provider, model))
            self.metrics.websocket_sessions.labels(route_type.value).inc()

    @never_raises
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        messages = flow.websocket.messages
        message = messages[-1]
        session = self.sessions.get(flow.id)
        if session is not None:
            if message.from_client:
                self.client_frame(flow, message, session)
            else:
                self.server_frame(message, session)
            if session.meter.totals.changed:
                self.show_totals(flow, session.meter)
        # The current message is relayed after this hook returns; the one before it has gone.
        trim(messages, self.history, self.shrink_relayed_audio)

    def server_frame(self, message: WebSocketMessage, session: Session) -> None:
        item = session.protocol.server_frame(message.content, message.is_text)
        if item is not None and (problem := session.meter.apply(item)):
            logger.debug("ai-gateway: unreadable server frame (%s): %s", problem.reason, problem.detail)

    def client_frame(self, flow: http.HTTPFlow, message: WebSocketMessage, session: Session) -> None:
        """A client frame: metered, unless it asks for a response the budget no longer allows."""
        item = session.protocol.client_frame(message.content, message.is_text)
        if item is None:
            return
        if isinstance(item, ResponseRequested) and (scope := self.accounting.exhausted(session.meter.source)):
            self.refuse_response(flow, message, scope)
        else:
            session.meter.apply(item)

    def refuse_response(self, flow: http.HTTPFlow, message: WebSocketMessage, scope: str) -> None:
        """Over budget: the response.create never reaches the upstream; the client gets an error event."""
        message.drop()
        event = budget_error_event(scope, message.content)
        ctx.master.commands.call("inject.websocket", flow, True, event)
        self.accounting.enforced(scope, "refused_response")

    def show_totals(self, flow: http.HTTPFlow, meter: SessionMeter) -> None:
        """The session's spend as the flow's comment, marked on errors. mitmproxy sends every flow a
        hook touched to mitmweb's list after the hook, so the comment updates live there."""
        meter.totals.changed = False
        flow.comment = meter.totals.summary()
        if meter.totals.errors:
            flow.marked = ":exclamation:"

    @never_raises
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None and self.shrink_relayed_audio and flow.websocket.messages:
            shrink_audio(flow.websocket.messages[-1])
        session = self.sessions.pop(flow.id, None)
        if self.budgets is not None:
            self.budgets.end_session(flow.id)
        if session is None or flow.websocket is None:
            return
        meter = session.meter
        self.metrics.websocket_sessions.labels(meter.source.route_type).dec()
        if failure := close_error(flow.websocket.close_code, flow.websocket.closed_by_client, meter.in_flight):
            self.accounting.error(meter.source, failure)
        if self.observability.active:
            closed_by_client = flow.websocket.closed_by_client
            self.observability.session_ended(meter.ended(flow.websocket.close_code, closed_by_client, failure or ""))


class Session(NamedTuple):
    """A metered WebSocket session: its protocol's adapter reads the frames, its meter bills them."""

    protocol: RealtimeProtocol | ResponsesSocketProtocol
    meter: SessionMeter


SESSION_KINDS: dict[RouteType, tuple[type[RealtimeProtocol | ResponsesSocketProtocol], type[SessionMeter]]] = {
    RouteType.REALTIME: (RealtimeProtocol, RealtimeMeter),
    RouteType.RESPONSES: (ResponsesSocketProtocol, ResponsesSocketMeter),
}


def metered_stream(exchange: HttpExchange, reader: StreamReader) -> Callable[[bytes], bytes]:
    """A chunk callback for mitmproxy's response streaming: each chunk is read, then forwarded unchanged."""
    exchange.streamed = True
    if reader.unsupported is not None:
        exchange.apply(reader.unsupported)

    def read(chunk: bytes) -> bytes:
        for item in reader.feed(chunk):
            exchange.apply(item)
        exchange.stream_finished = reader.finished
        return chunk

    return read


def traced_operation(route_type: RouteType) -> str:
    """The GenAI operation a request's span is named after: realtime for a Realtime session."""
    return OPERATIONS.get(route_type, route_type.value.lower())


def is_websocket_upgrade(request: http.Request) -> bool:
    return "websocket" in request.headers.get("upgrade", "").lower()


def show_comment_column() -> None:
    """Under mitmweb, add the comment column (where session totals show) to the flow list."""
    columns = getattr(ctx.options, "web_columns", None)
    if columns is not None and "comment" not in columns:
        ctx.options.update(web_columns=[*columns, "comment"])


def read_policy(path: str) -> tuple[Policy, PriceCatalog]:
    """The policy and its price catalog (its `prices` file over the database); either may raise PolicyError."""
    policy = load_policy(path)
    return policy, catalog_for(policy.provider, policy.prices)


def policy_stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
