"""The mitmproxy addon: thin glue between mitmproxy's hooks and the gateway's pure parts."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable

from mitmproxy import contentviews, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.budget import Budgets, client_key_digest, update_budgets
from ai_gateway.accounting.http_exchange import METERED_HTTP, HttpExchange, rewrite_request
from ai_gateway.accounting.ledger import CONTINUE, REFUSE, Source, UsageLedger
from ai_gateway.accounting.metrics import DEFAULT_MAX_MODEL_LABELS, GatewayMetrics, MetricsServer
from ai_gateway.accounting.pricing import PriceCatalog, load_catalog
from ai_gateway.accounting.session_meters import (
    RealtimeMeter,
    ResponsesSocketMeter,
    SessionMeter,
    requested_model,
)
from ai_gateway.config.policy import (
    DEFAULT_POLICY,
    Auth,
    FileStamp,
    Policy,
    PolicyError,
    RouteType,
    file_stamp,
    load_policy,
)
from ai_gateway.protocols.openai_realtime import RESPONSE_CREATE, leading_type
from ai_gateway.proxy.contentview import realtime_view, strip_audio
from ai_gateway.proxy.drain import Drain, close_connections
from ai_gateway.proxy.failures import close_error, error_type
from ai_gateway.proxy.headers import apply_header_policy, client_credential, redact, remove_client_credentials
from ai_gateway.proxy.refusals import budget_error_event, budget_response

DRAIN_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
POLICY_POLL_SECONDS = 0.5
POLICY_SETTLE_SECONDS = 2.0  # a policy file must be unchanged this long before it is read
CLIENT_KEY_METADATA = "ai_gateway.client_key"
METRICS_OPTIONS = {"gateway_metrics_host", "gateway_metrics_port", "gateway_metrics_prefix", "gateway_max_model_labels"}

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
    """Applies the policy to requests and meters usage into Prometheus metrics and the ledger."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.catalog: PriceCatalog | None = None
        self.budgets: Budgets | None = None
        self.metrics = GatewayMetrics("agentgateway")
        self.ledger: UsageLedger | None = None
        self.accounting = Accounting(self.metrics)
        self.server: MetricsServer | None = None
        self.credential = UpstreamCredential()
        self.drain = Drain()
        self.history: int | None = 1
        self.shrink_relayed_audio = True
        self.is_running = False
        self.watcher: asyncio.Task[None] | None = None
        self.sessions: dict[str, SessionMeter] = {}
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
            "gateway_usage_log_on_error",
            str,
            CONTINUE,
            "While the usage ledger cannot be written (full disk): 'continue' relaying, its usage unrecorded "
            "and counted, or 'refuse' new metered requests and responses (503, error event) until it can.",
            choices=(CONTINUE, REFUSE),
        )
        option(
            "gateway_drain_seconds",
            int,
            DRAIN_SECONDS,
            "On SIGTERM/SIGINT: stop accepting connections and let open requests and sessions finish for up "
            "to this many seconds before closing them (Kubernetes' default grace period is 30 s).",
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
        if self.ledger is not None:
            self.ledger.on_error = options.gateway_usage_log_on_error
        self.rewire_accounting()
        if "gateway_websocket_history" in updated:
            try:
                self.history = parse_history(options.gateway_websocket_history, under_web="web_port" in options)
            except ValueError as e:
                self.refuse(str(e))
        if "gateway_strip_audio" in updated:
            self.shrink_relayed_audio = options.gateway_strip_audio
        if self.is_running and updated & METRICS_OPTIONS:
            self.restart_metrics_server()

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
        self.rewire_accounting()
        self.credential.auth = policy.auth

    def rewire_accounting(self) -> None:
        """Every meter holds this one Accounting: pointing it at the current metrics, ledger, prices
        and budgets makes a change reach open sessions too, from their next response on."""
        accounting = self.accounting
        accounting.metrics, accounting.ledger = self.metrics, self.ledger
        accounting.catalog, accounting.budgets = self.catalog, self.budgets

    def open_ledger(self, path: str) -> None:
        """The new ledger is opened before the old one closes: if it cannot be, the old one stays."""
        try:
            ledger = UsageLedger(path, ctx.options.gateway_usage_log_on_error) if path else None
        except OSError as e:
            self.refuse(f"gateway_usage_log: cannot append to {path}: {e.strerror or e}")
            return
        if self.ledger is not None:
            self.ledger.close()
        self.ledger = ledger

    async def watch_policy(self) -> None:
        """Polls the file's stat, as mitmproxy's script watcher does for scripts, off the event loop
        (a stat or read on a hung file system must not stop the relay).

        A change is read once the file has not changed for POLICY_SETTLE_SECONDS: a file written
        in place is read whole, not half-written. It follows `gateway_policy`: a policy set
        through the option is watched from then on."""
        path = ctx.options.gateway_policy
        applied = seen = await asyncio.to_thread(file_stamp, path)
        since = time.monotonic()
        while True:
            await asyncio.sleep(POLICY_POLL_SECONDS)
            if ctx.options.gateway_policy != path:  # configure() already loaded the new file
                path = ctx.options.gateway_policy
                applied = seen = await asyncio.to_thread(file_stamp, path)
                continue
            stamp = await asyncio.to_thread(file_stamp, path)
            if stamp != seen:
                seen, since = stamp, time.monotonic()
            elif stamp not in (applied, None) and time.monotonic() - since >= POLICY_SETTLE_SECONDS:
                applied = stamp
                await self.reload_policy(path, stamp)

    async def reload_policy(self, path: str, stamp: FileStamp) -> None:
        try:
            policy, catalog = await asyncio.to_thread(read_policy, path)
        except PolicyError as e:
            logger.error("ai-gateway: policy change refused, the previous policy stays in force: %s", e)
            return
        if await asyncio.to_thread(file_stamp, path) != stamp:
            return  # changed again while read: the watcher reads it once it settles
        if ctx.options.gateway_policy != path:
            return  # the option moved to another file meanwhile, and configure() loaded it
        self.apply_policy(policy, catalog)
        logger.info(
            "ai-gateway: policy reloaded: %s (%d routes), applies to new connections", path, len(self.policy.routes)
        )

    def running(self) -> None:
        show_comment_column()
        ctx.master.addons.add(self.credential, self.drain)
        self.drain.install()
        self.restart_metrics_server()  # before is_running: a port in use is fatal at startup
        self.is_running = True
        if ctx.options.gateway_policy_reload:
            self.watcher = asyncio.get_running_loop().create_task(self.watch_policy())

    async def done(self) -> None:
        """Connections still open (a shutdown that did not drain) are closed first, the ledger last."""
        self.is_running = False
        if self.watcher is not None:
            self.watcher.cancel()
        if ctx.master.should_exit.is_set():  # not a script reload, which must not cut anyone off
            await close_connections()
        for addon in (self.credential, self.drain):
            if addon in ctx.master.addons.chain:
                ctx.master.addons.remove(addon)
        self.stop_metrics_server()
        if self.ledger is not None:
            self.ledger.close()

    def restart_metrics_server(self) -> None:
        """The new endpoint is bound before the old one stops: if it cannot be, the change is
        refused and the old one keeps serving. The same address keeps its server (new metrics)."""
        host, port = ctx.options.gateway_metrics_host, ctx.options.gateway_metrics_port
        if self.server is not None and (self.server.host, self.server.port) == (host, port):
            self.server.registry = self.metrics.registry
            return
        try:
            server = MetricsServer(self.metrics.registry, host, port) if port else None
        except OSError as e:
            self.refuse(f"cannot serve metrics on {host}:{port}: {e.strerror or e}")
            return
        self.stop_metrics_server()
        self.server = server
        if server is None:
            return
        logger.info("ai-gateway: metrics on http://%s:%d/metrics", host, server.port)
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
        if credential := client_credential(request.headers):
            flow.metadata[CLIENT_KEY_METADATA] = client_key_digest(credential)
        if self.policy.auth is not None:
            remove_client_credentials(request.headers)
        route = self.policy.match(request.path)
        apply_header_policy(request.headers, route.request)
        model = self.policy.model_for(route)
        if route.type is RouteType.REALTIME and model is not None:
            request.query["model"] = model

    @never_raises
    def request(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        route = self.policy.match(flow.request.path)
        upgrade = is_websocket_upgrade(flow.request)
        if route.type not in (SESSION_METERS if upgrade else METERED_HTTP):
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
        self.exchanges[flow.id] = HttpExchange(self.accounting, source, self.policy.provider, request_model)

    def source(self, flow: http.HTTPFlow, route_type: RouteType) -> Source:
        return Source(flow.id, route_type.value, flow.metadata.get(CLIENT_KEY_METADATA))

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
        if flow.response is not None and flow.response.status_code >= 400 and (source := self.upgrade_source(flow)):
            self.accounting.error(source, str(flow.response.status_code))
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
        return self.source(flow, route_type) if route_type in SESSION_METERS else None

    def redact_credential(self, flow: http.HTTPFlow) -> None:
        if self.policy is not None and (auth := self.policy.auth) is not None:
            redact(flow.request.headers, auth.header, auth.key)

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        route_type = self.policy.match(flow.request.path).type
        meter = SESSION_METERS.get(route_type)
        if meter is not None:
            source = self.source(flow, route_type)
            self.sessions[flow.id] = meter(
                self.accounting, source, self.policy.provider, requested_model(flow.request.url)
            )
            self.metrics.websocket_sessions.labels(route_type.value).inc()

    @never_raises
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        messages = flow.websocket.messages
        message = messages[-1]
        meter = self.sessions.get(flow.id)
        if meter is not None:
            if message.from_client:
                self.client_frame(flow, message, meter)
            elif problem := meter.server_frame(message.content, message.is_text):
                logger.debug("ai-gateway: unreadable server frame (%s): %s", problem.reason, problem.detail)
            if meter.totals.changed:
                self.show_totals(flow, meter)
        # The current message is relayed after this hook returns; the one before it has gone.
        if self.shrink_relayed_audio and len(messages) >= 2 and (self.history is None or self.history > 1):
            shrink_audio(messages[-2])
        if self.history is not None and len(messages) > self.history:
            del messages[: -self.history]

    def client_frame(self, flow: http.HTTPFlow, message: WebSocketMessage, meter: SessionMeter) -> None:
        """A client frame: metered, unless it asks for a response the budget no longer allows."""
        kind = leading_type(message.content)
        if kind == RESPONSE_CREATE and (scope := self.accounting.exhausted(meter.source)):
            self.refuse_response(flow, message, scope)
        else:
            meter.client_frame(kind, message.content)

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
        meter = self.sessions.pop(flow.id, None)
        if self.budgets is not None:
            self.budgets.end_session(flow.id)
        if meter is None or flow.websocket is None:
            return
        self.metrics.websocket_sessions.labels(meter.source.route_type).dec()
        if failure := close_error(flow.websocket.close_code, flow.websocket.closed_by_client, meter.in_flight):
            self.accounting.error(meter.source, failure)


SESSION_METERS = {RouteType.REALTIME: RealtimeMeter, RouteType.RESPONSES: ResponsesSocketMeter}


def is_websocket_upgrade(request: http.Request) -> bool:
    return "websocket" in request.headers.get("upgrade", "").lower()


def show_comment_column() -> None:
    """Under mitmweb, add the comment column (where session totals show) to the flow list."""
    columns = getattr(ctx.options, "web_columns", None)
    if columns is not None and "comment" not in columns:
        ctx.options.update(web_columns=[*columns, "comment"])


def read_policy(path: str) -> tuple[Policy, PriceCatalog | None]:
    """The policy and the price catalog it names; either may raise PolicyError."""
    policy = load_policy(path)
    return policy, load_catalog(policy.prices) if policy.prices else None


def shrink_audio(message: WebSocketMessage) -> None:
    if (stripped := strip_audio(message.content)) is not None:
        message.content = stripped


def parse_history(value: str, under_web: bool) -> int | None:
    """Messages to keep per WebSocket flow; None keeps all."""
    if value == "all" or (value == "auto" and under_web):
        return None
    if value == "auto":
        return 1
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"gateway_websocket_history: expected a positive number, 'all' or 'auto', got {value!r}")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
