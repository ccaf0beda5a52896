"""Metered HTTP requests: admitted against budgets and limits, their usage read from the body or
the SSE stream as it passes, and their outcome recorded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from ai_gateway.accounting.http_exchange import HttpExchange
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.limits import Refusal, Ticket
from ai_gateway.config.policy import Route, RouteType, WireProtocol
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.openai_http import METERED_HTTP, OPERATIONS, StreamReader, read_request, read_response
from ai_gateway.proxy.failures import error_type
from ai_gateway.proxy.guard_checks import guardrail_block
from ai_gateway.proxy.http_guardrails import HttpGuardrails
from ai_gateway.proxy.refusals import refusal_response
from ai_gateway.proxy.state import (
    UNROUTED,
    GatewayState,
    is_websocket_upgrade,
    never_raises,
    refused_unknown_key,
    source,
)


class HttpMetering:
    def __init__(self, state: GatewayState, guardrails: HttpGuardrails | None = None) -> None:
        self.state = state
        self.exchanges: dict[str, HttpExchange] = {}
        self.guardrails = guardrails  # checks requests before admission, responses after their reading

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_max_body_bytes",
            int,
            DEFAULT_MAX_BODY_BYTES,
            "Decoded bytes read of a body or server frame on a metered route (client frames: at most "
            "1 MiB); a larger (or inflating) one is forwarded unchanged and unread, counted as "
            "parse_errors_total{reason=too_large}.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_max_body_bytes" in updated:
            if ctx.options.gateway_max_body_bytes < 1:
                self.state.refuse(
                    f"gateway_max_body_bytes: expected a positive number, got {ctx.options.gateway_max_body_bytes}"
                )
            else:
                self.state.max_body_bytes = ctx.options.gateway_max_body_bytes

    @never_raises
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        route = self.state.route(flow)
        # A GET on a metered path reads (stored completions, a response by id): nothing is billed.
        if (
            route is None
            or flow.response is not None  # answered already: nothing goes upstream
            or is_websocket_upgrade(flow.request)
            or flow.request.method != "POST"
            or route.type not in METERED_HTTP
            and not is_call(route)
            or refused_unknown_key(self.state, flow, "rejected_request")
        ):
            return None
        accounting = self.state.accounting
        origin = source(flow, route.type)
        guarded = self.guardrails.check_request(flow, route) if self.guardrails is not None else None
        if flow.response is not None:  # blocked by a guard: neither admitted nor metered
            return None
        if accounting.shared is not None or guarded is not None:
            return self.held_request(flow, route, origin, guarded)
        self.admitted(flow, route, origin, accounting.admit(origin))
        return None

    async def held_request(
        self, flow: http.HTTPFlow, route: Route, origin: Source, guarded: Awaitable[None] | None
    ) -> None:
        """The request waits for its guards' services (at most their timeout_ms), then for the
        shared store (at most limits.store_timeout_ms), before it goes upstream."""
        if guarded is not None:
            await guarded
            if flow.response is not None:
                return
        accounting = self.state.accounting
        verdict = await accounting.admit_shared(origin) if accounting.shared is not None else accounting.admit(origin)
        self.admitted(flow, route, origin, verdict)

    def admitted(self, flow: http.HTTPFlow, route: Route, origin: Source, verdict: Ticket | Refusal | None) -> None:
        """A metered HTTP request, admitted (its reservation held) or refused with the reason."""
        state = self.state
        assert state.policy is not None
        if isinstance(verdict, Refusal):
            flow.response = refusal_response(verdict)
            state.accounting.enforced(verdict, "rejected_request")
            return
        request = flow.request
        if is_call(route):
            state.accounting.realtime_call(verdict, request.path.split("?", 1)[0].rpartition("/")[2])
            return
        encoding = request.headers.get("content-encoding", "")
        model = state.policy.model_for(route)
        request_model, rewritten, problem = read_request(
            route.type, request.raw_content or b"", encoding, model, state.max_body_bytes
        )
        if rewritten is not None:  # decoded: sent as it is, never compressed again
            request.headers.pop("content-encoding", None)
            request.content = rewritten
        provider = state.policy.provider_for(route)
        exchange = HttpExchange(state.accounting, origin, OPERATIONS[route.type], provider, request_model, verdict)
        if problem is not None:
            exchange.apply(problem)
        self.exchanges[flow.id] = exchange

    @never_raises
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.get(flow.id)
        response = flow.response
        if exchange is None or response is None or not 200 <= response.status_code < 300:
            return
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            encoding = response.headers.get("content-encoding", "")
            reader = StreamReader(RouteType(exchange.source.route_type), encoding, self.state.max_body_bytes)
            response.stream = metered_stream(exchange, reader)
            if self.guardrails is not None and (route := self.state.route(flow)) is not None:
                self.guardrails.check_response_headers(flow, route)  # reads what metering read, after it

    @never_raises
    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange = self.exchanges.pop(flow.id, None)
        if exchange is None or flow.response is None:
            return None
        status = flow.response.status_code
        if status >= 400:
            exchange.finish(str(status), status)
            return None
        if not exchange.streamed:
            route_type = RouteType(exchange.source.route_type)
            encoding = flow.response.headers.get("content-encoding", "")
            raw = flow.response.raw_content or b""
            exchange.apply(read_response(route_type, raw, encoding, self.state.max_body_bytes))
        guarded = None
        if self.guardrails is not None and (route := self.state.route(flow)) is not None:
            guarded = self.guardrails.check_response(flow, route)  # metered first: a blocked answer is still billed
        if guarded is not None:
            return self.finish_checked(flow, exchange, status, guarded)
        exchange.finish("", status, guardrail_block(flow))
        return None

    async def finish_checked(
        self, flow: http.HTTPFlow, exchange: HttpExchange, status: int, guarded: Awaitable[None]
    ) -> None:
        """The exchange's record once the guard services have answered (a block is in it)."""
        try:
            await guarded
        finally:
            exchange.finish("", status, guardrail_block(flow))

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.exchanges.pop(flow.id, None)
        if exchange is None or flow.error is None:
            return
        failure = error_type(flow.error.msg)
        if failure == "client_disconnected" and exchange.stream_finished and flow.response is not None:
            # The client left after the stream's last event (the SDKs stop reading at `[DONE]` and
            # close) while the upstream had yet to end the response: an answer complete, not an error.
            exchange.finish("", flow.response.status_code, guardrail_block(flow))
            return
        exchange.finish(failure)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        """With mitmproxy's eager connection strategy the upstream is dialled before any request
        (so before any flow): count the failure here, under route_type `unknown`. Lazily, the
        flow's `error` hook counts it with its route type, and this one stays out of the way."""
        if ctx.options.connection_strategy == "eager":
            self.state.accounting.error(Source("", UNROUTED), error_type(data.server.error or ""))


def is_call(route: Route) -> bool:
    """A POST that mints a call or session whose media bypasses the gateway (Realtime WebRTC and
    SIP, GPT-Live's WebRTC creation): admitted and counted; usage is seen on a sideband only."""
    return route.type is RouteType.REALTIME_CALLS or route.protocol is WireProtocol.OPENAI_LIVE


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
