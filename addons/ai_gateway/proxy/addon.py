"""The mitmproxy addon: thin glue between mitmproxy's hooks and the gateway's pure parts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from mitmproxy import contentviews, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.http_exchange import HttpExchange
from ai_gateway.accounting.items import ResponseStarted, UsageItem
from ai_gateway.accounting.ledger import CONTINUE, REFUSE, Source, UsageLedger, recent_records
from ai_gateway.accounting.limits import ANONYMOUS, MINUTE, Refusal, SpendControl, Ticket, client_key_sha256, identify
from ai_gateway.accounting.metrics import DEFAULT_MAX_MODEL_LABELS, OPERATION_NAMES, GatewayMetrics, MetricsServer
from ai_gateway.accounting.pricing import PriceCatalog, catalog_for
from ai_gateway.accounting.session_meters import (
    GeminiLiveMeter,
    LiveMeter,
    RealtimeMeter,
    ResponsesSocketMeter,
    SessionMeter,
)
from ai_gateway.accounting.shared_limits import SharedLimits
from ai_gateway.config.paths import AmbiguousPath, normalise_target
from ai_gateway.config.policy import (
    DEFAULT_POLICY,
    MEMORY_STORE,
    FileStamp,
    LimitPolicy,
    Policy,
    PolicyError,
    RateLimits,
    Route,
    RouteType,
    WireProtocol,
    file_stamp,
    load_policy,
)
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.gemini_live import GeminiLiveProtocol
from ai_gateway.protocols.openai_http import METERED_HTTP, OPERATIONS, StreamReader, read_request, read_response
from ai_gateway.protocols.openai_live import CLOSE_EVENT, LiveProtocol
from ai_gateway.protocols.openai_realtime import RealtimeProtocol, cancel_event, requested_model
from ai_gateway.protocols.openai_responses_socket import ResponsesSocketProtocol
from ai_gateway.proxy import closer
from ai_gateway.proxy.collector import freeze_startup_objects
from ai_gateway.proxy.contentview import realtime_view
from ai_gateway.proxy.credential import UpstreamCredential
from ai_gateway.proxy.drain import Drain, close_connections
from ai_gateway.proxy.failures import close_error, error_type
from ai_gateway.proxy.headers import (
    CREDENTIAL_PLACES,
    apply_header_policy,
    client_credential,
    protocol_credential,
    remove_client_credentials,
    remove_protocol_credentials,
)
from ai_gateway.proxy.history import parse_history, shrink_audio, trim
from ai_gateway.proxy.injection import Injections
from ai_gateway.proxy.observability import Observability
from ai_gateway.proxy.refusals import (
    UNKNOWN_CLIENT_KEY,
    ambiguous_path_response,
    message,
    refusal_event,
    refusal_response,
    unknown_key_response,
)
from ai_gateway.proxy.session_limits import REASONS, SessionClock

DRAIN_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
POLICY_POLL_SECONDS = 0.5
SESSION_CLOCK_SECONDS = 1.0
POLICY_SETTLE_SECONDS = 2.0  # a policy file must be unchanged this long before it is read
CLIENT_KEY_METADATA = "ai_gateway.client_key"  # the client's identity label (never the key)
KNOWN_KEY_METADATA = "ai_gateway.known_client_key"
SESSION_OPEN_METADATA = "ai_gateway.session_admitted"  # counted against concurrent_sessions until it ends
METRIC_FAMILY_OPTIONS = {"gateway_metrics_prefix", "gateway_max_model_labels", "gateway_operation_names"}
METRICS_OPTIONS = {"gateway_metrics_host", "gateway_metrics_port", *METRIC_FAMILY_OPTIONS}
TRACING_OPTIONS = {"gateway_otlp_endpoint", "gateway_metrics_prefix", "gateway_max_model_labels"}

logger = logging.getLogger(__name__)

_METRIC_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def never_raises[Hook: Callable[..., Awaitable[None] | None]](hook: Hook) -> Hook:
    """A hook that fails must not break the relay: log it and let the flow go on.

    A hook may return an awaitable (only where it must wait for the shared limits store):
    mitmproxy awaits it before relaying the message or request, and it is guarded the same way."""

    def failed(flow: http.HTTPFlow) -> None:
        logger.exception("ai-gateway: %s failed for %s", hook.__name__, flow.request.path.split("?", 1)[0])

    async def awaited(work: Awaitable[None], flow: http.HTTPFlow) -> None:
        try:
            await work
        except Exception:
            failed(flow)

    @functools.wraps(hook)
    def guarded(self: object, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            work = hook(self, flow)
        except Exception:
            failed(flow)
            return None
        return None if work is None else awaited(work, flow)

    return guarded  # type: ignore[return-value]


class Gateway:
    """Applies the policy to requests and meters usage into Prometheus metrics and the ledger."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.catalog: PriceCatalog | None = None
        self.control: SpendControl | None = None
        self.shared: SharedLimits | None = None
        self.policy_stamp: FileStamp | None = None
        self.retiring: set[asyncio.Task[None]] = set()  # stores of earlier policies, closing
        self.metrics = GatewayMetrics("agentgateway")
        self.ledger: UsageLedger | None = None
        self.observability = Observability()
        self.accounting = Accounting(self.metrics, observer=self.observability)
        self.server: MetricsServer | None = None
        self.credential = UpstreamCredential()
        self.drain = Drain()
        self.history: int | None = 1
        self.shrink_relayed_audio = True
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.is_running = False
        self.watcher: asyncio.Task[None] | None = None
        self.sessions: dict[str, Session] = {}
        self.clock = SessionClock()
        self.injections = Injections()
        self.clock_task: asyncio.Task[None] | None = None
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
            "gateway_operation_names",
            str,
            "ours",
            "gen_ai_operation_name values: 'ours' (realtime for Realtime sessions) or 'agentgateway' (chat, as "
            "agentgateway labels them, for dashboards that expect its values exactly).",
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
        option(
            "gateway_max_body_bytes",
            int,
            DEFAULT_MAX_BODY_BYTES,
            "Decoded bytes read of a body on a metered route; a larger (or inflating) body is forwarded "
            "unchanged and unread, counted as parse_errors_total{reason=too_large}.",
        )
        option(
            "gateway_access_log",
            str,
            "text",
            "One line per metered HTTP request, finished WebSocket response and closed session on stdout: "
            "text, json or off. While on, mitmdump's own flow lines are off unless flow_detail is set.",
        )
        option(
            "gateway_gc_freeze",
            bool,
            True,
            "Once running, move startup's objects (mitmproxy, the price database) out of the garbage "
            "collector's scans: a full collection no longer pauses every session for about 80 ms.",
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
        if updated & METRIC_FAMILY_OPTIONS:
            prefix, max_labels = options.gateway_metrics_prefix, options.gateway_max_model_labels
            names = options.gateway_operation_names
            if not _METRIC_PREFIX.fullmatch(prefix):
                self.refuse(f"gateway_metrics_prefix: expected a Prometheus metric name prefix, got {prefix!r}")
            elif max_labels < 1:
                self.refuse(f"gateway_max_model_labels: expected a positive number, got {max_labels}")
            elif names not in OPERATION_NAMES:
                self.refuse(f"gateway_operation_names: expected one of {', '.join(OPERATION_NAMES)}, got {names!r}")
            else:
                self.metrics = GatewayMetrics(prefix, max_labels, names)
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
        if "gateway_max_body_bytes" in updated:
            if options.gateway_max_body_bytes < 1:
                self.refuse(f"gateway_max_body_bytes: expected a positive number, got {options.gateway_max_body_bytes}")
            else:
                self.max_body_bytes = options.gateway_max_body_bytes
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
        stamp = file_stamp(path)  # before reading: a change made while it is read is seen by the watcher
        try:
            self.apply_policy(*read_policy(path))
        except PolicyError as e:
            self.refuse(f"invalid policy: {e}")
            return
        self.policy_stamp = stamp
        logger.info("ai-gateway: policy %s (%d routes)", path, len(self.policy.routes))

    def apply_policy(self, policy: Policy, catalog: PriceCatalog | None) -> None:
        """Everything that follows from a policy; spend already counted against budgets is kept."""
        self.policy, self.catalog = policy, catalog
        self.control = controls_for(self.control, policy)
        self.shared = self.shared_store(policy.limits.store if self.control is not None else MEMORY_STORE)
        self.rewire_accounting()
        self.credential.auth = policy.auth

    def shared_store(self, store: str) -> SharedLimits | None:
        """The policy's shared limits store: the same URL keeps its client (and its leases); a new
        one starts from what that store holds; the old one is closed once its writes are sent."""
        if self.shared is not None and self.shared.url == store:
            return self.shared
        if self.shared is not None:
            self.retire(self.shared)
        if store == MEMORY_STORE:
            return None
        shared = SharedLimits(store, self.metrics)
        if self.is_running:
            shared.start(self.control_window, self.control_limits)
        return shared

    def retire(self, shared: SharedLimits) -> None:
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing was sent
            task = asyncio.get_running_loop().create_task(shared.close())
            self.retiring.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self.retiring.discard)

    def control_window(self) -> float:
        return self.control.window if self.control is not None else MINUTE

    def control_limits(self) -> LimitPolicy:
        return self.control.limits if self.control is not None else LimitPolicy()

    def rewire_accounting(self) -> None:
        """Every meter holds this one Accounting: pointing it at the current metrics, ledger, prices
        and budgets makes a change reach open sessions too, from their next response on."""
        self.accounting.rewire(self.metrics, self.ledger, self.catalog, self.control, self.shared)

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
        applied = seen = self.policy_stamp  # of the file as configure() read it, however long ago
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
        ctx.master.addons.add(self.credential, self.drain, self.observability)
        self.drain.install()
        self.observability.quiet_dumper()
        if ctx.options.gateway_gc_freeze:
            freeze_startup_objects()
        self.restart_metrics_server()  # before is_running: a port in use is fatal at startup
        self.is_running = True
        if self.shared is not None:
            self.shared.start(self.control_window, self.control_limits)
        self.restore_spend()
        if ctx.options.gateway_policy_reload:
            self.watcher = asyncio.get_running_loop().create_task(self.watch_policy())
        self.clock_task = asyncio.get_running_loop().create_task(self.watch_sessions())

    async def watch_sessions(self) -> None:
        """Once a second: sessions past their duration or idle limit are closed with 1008."""
        while True:
            await asyncio.sleep(SESSION_CLOCK_SECONDS)
            for flow, reason in self.clock.expired():
                if self.close_websocket(flow, REASONS[reason]):
                    self.accounting.enforced(Refusal("client_key", reason), "closed_session")

    def restore_spend(self) -> None:
        """A restart does not forgive spend: the ledger's lines of the current budget window are
        charged to their client keys again (budgets live in this process's memory). A shared
        store keeps the spend itself, across restarts."""
        if self.control is None or self.ledger is None or self.policy is None or self.policy.budgets is None:
            return
        if self.shared is not None:
            return
        window = self.policy.budgets.window_seconds
        wall = datetime.now(UTC)
        records = recent_records(self.ledger.path, wall - timedelta(seconds=window))
        restored = self.control.restore(records, lambda at: (wall - at).total_seconds(), time.monotonic())
        logger.info(
            "ai-gateway: spend of %d responses in the last %gs restored from the usage ledger", restored, window
        )

    async def done(self) -> None:
        """Connections still open (a shutdown that did not drain) are closed first, the ledger last."""
        self.is_running = False
        if self.watcher is not None:
            self.watcher.cancel()
        if self.clock_task is not None:
            self.clock_task.cancel()
        if ctx.master.should_exit.is_set():  # not a script reload, which must not cut anyone off
            await close_connections()
        for addon in (self.credential, self.drain, self.observability):
            if addon in ctx.master.addons.chain:
                ctx.master.addons.remove(addon)
        self.observability.shutdown()
        if self.shared is not None:
            await self.shared.close()  # usage settled during the drain reaches the store
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
        if not self.route_on_normal_path(flow):
            return
        route = self.policy.match(request.path)
        places = CREDENTIAL_PLACES.get(route.protocol)
        credential = client_credential(request)
        if places is not None:
            credential = credential or protocol_credential(request.headers, request.query, places)
        identity = identify(self.policy.client_keys, client_key_sha256(credential) if credential else None)
        flow.metadata[CLIENT_KEY_METADATA] = identity.label
        flow.metadata[KNOWN_KEY_METADATA] = identity.known
        if self.policy.auth is not None:
            remove_client_credentials(request)
            if places is not None:
                remove_protocol_credentials(request.headers, request.query, places)
        apply_header_policy(request.headers, route.request)
        model = self.policy.model_for(route)
        if route.type is RouteType.REALTIME and route.protocol is WireProtocol.OPENAI and model is not None:
            request.query["model"] = model
        if session_kind(route) is not None if is_websocket_upgrade(request) else route.type in METERED_HTTP:
            self.observability.request_arrived(flow, traced_operation(route.type), model)

    def route_on_normal_path(self, flow: http.HTTPFlow) -> bool:
        """Every later decision (route, metering, credentials, limits) reads the path the upstream
        will serve: it is normalised here, before anything else, and sent upstream as normalised.
        A path with no single reading is answered 400 and goes nowhere."""
        try:
            target = normalise_target(flow.request.path)
        except AmbiguousPath as e:
            flow.response = ambiguous_path_response(str(e))
            self.metrics.parse_error("unknown", "ambiguous_path")
            return False
        if target != flow.request.path:
            flow.request.path = target
        return True

    @never_raises
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if self.policy is None or flow.response is not None:  # answered already: nothing goes upstream
            return None
        route = self.policy.match(flow.request.path)
        upgrade = is_websocket_upgrade(flow.request)
        # A GET on a metered path reads (stored completions, a response by id): nothing is billed.
        calls = is_call(route)
        metered = session_kind(route) is not None if upgrade else route.type in METERED_HTTP or calls
        if not metered or not upgrade and flow.request.method != "POST":
            return None
        source = self.source(flow, route.type, session=upgrade)
        action = "rejected_session" if upgrade else "rejected_request"
        if self.policy.client_keys.require and not flow.metadata.get(KNOWN_KEY_METADATA):
            flow.response = unknown_key_response()
            self.accounting.enforced(Refusal("client_key", UNKNOWN_CLIENT_KEY), action)
            return None
        shared = self.accounting.shared is not None
        if upgrade and shared:
            return self.shared_handshake(flow, source)
        if upgrade:
            self.handshake(flow, self.accounting.open_session(source))
        elif shared:
            return self.shared_request(flow, route, source)
        else:
            self.metered_request(flow, route, source, self.accounting.admit(source))
        return None

    async def shared_handshake(self, flow: http.HTTPFlow, source: Source) -> None:
        """The handshake waits for the shared store (at most limits.store_timeout_ms)."""
        self.handshake(flow, await self.accounting.open_session_shared(source))

    async def shared_request(self, flow: http.HTTPFlow, route: Route, source: Source) -> None:
        """The request waits for the shared store (at most limits.store_timeout_ms) before it goes upstream."""
        self.metered_request(flow, route, source, await self.accounting.admit_shared(source))

    def handshake(self, flow: http.HTTPFlow, refusal: Refusal | None) -> None:
        if refusal is not None:
            flow.response = refusal_response(refusal)
            self.accounting.enforced(refusal, "rejected_session")
        else:
            flow.metadata[SESSION_OPEN_METADATA] = True

    def metered_request(
        self, flow: http.HTTPFlow, route: Route, source: Source, verdict: Ticket | Refusal | None
    ) -> None:
        """A metered HTTP request, admitted (its reservation held) or refused with the reason."""
        assert self.policy is not None
        if isinstance(verdict, Refusal):
            flow.response = refusal_response(verdict)
            self.accounting.enforced(verdict, "rejected_request")
            return
        if is_call(route):  # minting a WebRTC/SIP session: checked and counted, billed on its sideband only
            self.accounting.realtime_call(verdict, flow.request.path.split("?", 1)[0].rpartition("/")[2])
            return
        request = flow.request
        encoding = request.headers.get("content-encoding", "")
        model = self.policy.model_for(route)
        request_model, rewritten, problem = read_request(
            route.type, request.raw_content or b"", encoding, model, self.max_body_bytes
        )
        if rewritten is not None:  # decoded: sent as it is, never compressed again
            request.headers.pop("content-encoding", None)
            request.content = rewritten
        operation = OPERATIONS[route.type]
        provider = self.policy.provider_for(route)
        exchange = HttpExchange(self.accounting, source, operation, provider, request_model, verdict)
        if problem is not None:
            exchange.apply(problem)
        self.exchanges[flow.id] = exchange

    def source(self, flow: http.HTTPFlow, route_type: RouteType, session: bool = False) -> Source:
        return Source(flow.id, route_type.value, flow.metadata.get(CLIENT_KEY_METADATA, ANONYMOUS), session)

    def end_session(self, flow: http.HTTPFlow) -> None:
        """A handshake admitted against concurrent_sessions ended (closed, refused upstream, failed)."""
        if flow.metadata.pop(SESSION_OPEN_METADATA, False):
            route_type = self.policy.match(flow.request.path).type if self.policy else RouteType.REALTIME
            self.accounting.close_session(self.source(flow, route_type, session=True))

    @never_raises
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.get(flow.id)
        response = flow.response
        if exchange is None or response is None or not 200 <= response.status_code < 300:
            return
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            encoding = response.headers.get("content-encoding", "")
            reader = StreamReader(RouteType(exchange.source.route_type), encoding, self.max_body_bytes)
            response.stream = metered_stream(exchange, reader)

    @never_raises
    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if flow.response is not None and flow.response.status_code >= 400 and (source := self.upgrade_source(flow)):
            self.accounting.error(source, str(flow.response.status_code))
        if flow.websocket is None:
            self.end_session(flow)
        if exchange is None or flow.response is None:
            return
        status = flow.response.status_code
        if status >= 400:
            exchange.finish(str(status), status)
            return
        if not exchange.streamed and flow.websocket is None:
            route_type = RouteType(exchange.source.route_type)
            encoding = flow.response.headers.get("content-encoding", "")
            raw = flow.response.raw_content or b""
            exchange.apply(read_response(route_type, raw, encoding, self.max_body_bytes))
        exchange.finish("", status)

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if flow.websocket is None:
            self.end_session(flow)
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
        route = self.policy.match(flow.request.path)
        return self.source(flow, route.type) if session_kind(route) else None

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if self.policy is None:
            return
        route = self.policy.match(flow.request.path)
        kinds = session_kind(route)
        if kinds is not None:
            protocol, meter = kinds
            source = self.source(flow, route.type, session=True)
            model = requested_model(flow.request.url)
            provider = self.policy.provider_for(route)
            self.sessions[flow.id] = Session(protocol(), meter(self.accounting, source, provider, model))
            if self.control is not None:
                self.clock.watch(flow, self.control.rate_limits(source.client_key))
            self.metrics.websocket_sessions.labels(route.type.value).inc()

    @never_raises
    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if closer.intercept(flow):  # the gateway's own close marker: neither relayed nor metered
            return None
        assert flow.websocket is not None
        messages = flow.websocket.messages
        message = messages[-1]
        session = self.sessions.get(flow.id)
        if self.injections.active and self.injections.arrived(flow, message):
            session = None  # the gateway's own message: relayed, never metered
        elif message.from_client and closer.CLOSE_METADATA in flow.metadata:
            message.drop()  # the gateway is closing the session: nothing more goes upstream
            session = None
        if session is not None:
            if self.clock.sessions:
                self.clock.touch(flow.id)
            protocol = session.protocol
            if message.from_client:
                item = protocol.client_frame(message.content, message.is_text)
            else:
                item = protocol.server_frame(message.content, message.is_text)
            if item is not None:
                if self.accounting.shared is not None and session.meter.admission_needed(item):
                    return self.shared_admission(flow, message, session, item)
                self.applied(flow, message, session, item, session.meter.apply(item))
        # The current message is relayed after this hook returns; the one before it has gone.
        trim(messages, self.history, self.shrink_relayed_audio)
        return None

    async def shared_admission(
        self, flow: http.HTTPFlow, message: WebSocketMessage, session: Session, item: UsageItem
    ) -> None:
        """A response starts (response.create, or one the upstream started): its admission waits
        for the shared store, at most limits.store_timeout_ms, before the frame is relayed. No
        other frame ever waits for the store."""
        verdict = await self.accounting.admit_shared(session.meter.source)
        if flow.id in self.sessions:  # the session may have ended meanwhile
            self.applied(flow, message, session, item, session.meter.apply_admitted(item, verdict))
        elif isinstance(verdict, Ticket):
            self.accounting.release(verdict)
        if flow.websocket is not None:
            trim(flow.websocket.messages, self.history, self.shrink_relayed_audio)

    def applied(
        self, flow: http.HTTPFlow, message: WebSocketMessage, session: Session, item: UsageItem, outcome: object
    ) -> None:
        """What the meter made of a frame's item: a refused response.create is dropped, a refused
        response the upstream started is cancelled, a refused Gemini Live session is closed."""
        if isinstance(outcome, Refusal):
            if message.from_client:
                self.refuse_response(flow, message, outcome)
            elif isinstance(session.protocol, (GeminiLiveProtocol, LiveProtocol)):
                self.close_session(flow, outcome)
            elif isinstance(item, ResponseStarted) and item.response_id is not None:
                self.cancel_response(flow, item.response_id, outcome)
        elif outcome is not None:
            logger.debug("ai-gateway: unreadable frame (%s): %s", outcome.reason, outcome.detail)
        if session.meter.totals.changed:
            self.show_totals(flow, session.meter)

    def refuse_response(self, flow: http.HTTPFlow, message: WebSocketMessage, refusal: Refusal) -> None:
        """The response.create never reaches the upstream; the client gets an error event."""
        message.drop()
        self.injections.send(flow, True, refusal_event(refusal, message.content))
        self.accounting.enforced(refusal, "refused_response")

    def close_session(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """A protocol with nothing to refuse or cancel per response (Gemini Live, GPT-Live): the
        session that spent its budget, or went over a limit, is closed with 1008 and the reason."""
        if self.close_websocket(flow, message(refusal)):
            self.accounting.enforced(refusal, "closed_session")

    def close_websocket(self, flow: http.HTTPFlow, reason: str) -> bool:
        """Close a session with 1008 on both legs; a GPT-Live session is first ended upstream
        (`session.close`), as its protocol asks, so that the upstream stops billing it."""
        session = self.sessions.get(flow.id)
        closing = flow.live and closer.CLOSE_METADATA not in flow.metadata  # not already under way
        if closing and session is not None and isinstance(session.protocol, LiveProtocol):
            self.injections.send(flow, False, CLOSE_EVENT)
        return closer.close_websocket(flow, 1008, reason)

    def cancel_response(self, flow: http.HTTPFlow, response_id: str, refusal: Refusal) -> None:
        """A response the upstream started by itself (server VAD) while over a budget or limit: the
        upstream is asked to cancel it, the client is told why. What it still bills is counted."""
        self.injections.send(flow, False, cancel_event(response_id))
        self.injections.send(flow, True, refusal_event(refusal))
        self.accounting.enforced(refusal, "cancelled_response")

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
        self.clock.forget(flow.id)
        self.injections.forget(flow.id)
        if session is not None and flow.websocket is not None:
            self.session_ended(flow, session)
        self.end_session(flow)  # last: what the session still billed above counted against it

    def session_ended(self, flow: http.HTTPFlow, session: Session) -> None:
        assert flow.websocket is not None
        meter = session.meter
        if isinstance(session.protocol, GeminiLiveProtocol) and (item := session.protocol.closed()) is not None:
            meter.apply(item)
        in_flight = meter.in_flight
        meter.close()
        self.metrics.websocket_sessions.labels(meter.source.route_type).dec()
        failure = None
        if closer.CLOSED_BY_GATEWAY not in flow.metadata:  # the gateway's own close: an enforcement, not an error
            failure = close_error(flow.websocket.close_code, flow.websocket.closed_by_client, in_flight)
            if failure:
                self.accounting.error(meter.source, failure)
        if self.observability.active:
            closed_by_client = flow.websocket.closed_by_client
            self.observability.session_ended(meter.ended(flow.websocket.close_code, closed_by_client, failure or ""))


class Session(NamedTuple):
    """A metered WebSocket session: its protocol's adapter reads the frames, its meter bills them."""

    protocol: SessionProtocol
    meter: SessionMeter


SessionProtocol = RealtimeProtocol | ResponsesSocketProtocol | GeminiLiveProtocol | LiveProtocol

# A WebSocket route's (route type, protocol) -> its protocol adapter and meter.
SESSION_KINDS: dict[tuple[RouteType, WireProtocol], tuple[type[SessionProtocol], type[SessionMeter]]] = {
    (RouteType.REALTIME, WireProtocol.OPENAI): (RealtimeProtocol, RealtimeMeter),
    (RouteType.RESPONSES, WireProtocol.OPENAI): (ResponsesSocketProtocol, ResponsesSocketMeter),
    (RouteType.REALTIME, WireProtocol.GEMINI_LIVE): (GeminiLiveProtocol, GeminiLiveMeter),
    (RouteType.REALTIME, WireProtocol.OPENAI_LIVE): (LiveProtocol, LiveMeter),
}


def is_call(route: Route) -> bool:
    """A POST that mints a call or session whose media bypasses the gateway (Realtime WebRTC and
    SIP, GPT-Live's WebRTC creation): admitted and counted; usage is seen on a sideband only."""
    return route.type is RouteType.REALTIME_CALLS or route.protocol is WireProtocol.OPENAI_LIVE


def session_kind(route: Route) -> tuple[type[SessionProtocol], type[SessionMeter]] | None:
    return SESSION_KINDS.get((route.type, route.protocol))


def metered_stream(exchange: HttpExchange, reader: StreamReader) -> Callable[[bytes], bytes]:
    """A chunk callback for mitmproxy's response streaming: each chunk is read, then forwarded unchanged."""
    exchange.streamed = True
    exchange.stream_unread = not reader.readable
    if reader.unsupported is not None:
        exchange.apply(reader.unsupported)

    def read(chunk: bytes) -> bytes:
        for item in reader.feed(chunk):
            exchange.apply(item)
        exchange.stream_finished = reader.finished
        exchange.stream_unread = not reader.readable
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


def controls_for(control: SpendControl | None, policy: Policy) -> SpendControl | None:
    """The budgets and limits of a new policy, keeping the spend already counted; None when the
    policy sets none (nothing is then held or checked per response)."""
    limits, keys = policy.limits, policy.client_keys
    if policy.budgets is None and limits.client_key == RateLimits() and not keys.keys:
        return None
    if control is None:
        return SpendControl(policy.budgets, limits, keys)
    control.update(policy.budgets, limits, keys)
    return control


def read_policy(path: str) -> tuple[Policy, PriceCatalog]:
    """The policy and its price catalog (its `prices` file over the database); either may raise PolicyError."""
    policy = load_policy(path)
    return policy, catalog_for(policy.provider, policy.prices)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
