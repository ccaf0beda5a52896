"""Metered WebSocket sessions (Realtime, Responses WebSocket mode, Gemini Live): the handshake
admitted, every frame read by its protocol's adapter and billed by its meter, what a budget or
limit refuses enforced, and the history mitmproxy keeps of the session trimmed.

The only one of the gateway's addons with a per-frame hook: what mitmproxy dispatches per
message does not grow with the number of the gateway's concerns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import NamedTuple, Protocol

from mitmproxy import ctx, http

from ai_gateway.accounting.items import ResponseStarted, UsageItem
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.limits import Refusal, Ticket
from ai_gateway.accounting.session_meters import (
    GeminiLiveMeter,
    LiveMeter,
    RealtimeMeter,
    ResponsesSocketMeter,
    SessionMeter,
)
from ai_gateway.config.policy import Route, RouteType, WireProtocol
from ai_gateway.protocols.conversation import Conversation
from ai_gateway.protocols.gemini_live import GeminiLiveProtocol
from ai_gateway.protocols.openai_live import CLOSE_EVENT, LiveProtocol
from ai_gateway.protocols.openai_realtime import RealtimeProtocol, cancel_event, requested_model
from ai_gateway.protocols.openai_responses_socket import ResponsesSocketProtocol
from ai_gateway.proxy import closer, refusals
from ai_gateway.proxy.conversation import record
from ai_gateway.proxy.failures import close_error, error_type
from ai_gateway.proxy.guard_checks import guard_comment
from ai_gateway.proxy.guardrails import Guardrails
from ai_gateway.proxy.injection import Links
from ai_gateway.proxy.recorder import Recorder
from ai_gateway.proxy.refusals import refusal_event, refusal_response
from ai_gateway.proxy.replay import REPLAY_SYSTEM, REPLAYED_METADATA
from ai_gateway.proxy.retention import KeptHistory
from ai_gateway.proxy.session_limits import REASONS, SessionClock
from ai_gateway.proxy.state import GatewayState, is_websocket_upgrade, never_raises, refused_unknown_key, source

SESSION_CLOCK_SECONDS = 1.0
SESSION_OPEN_METADATA = "ai_gateway.session_admitted"  # counted against concurrent_sessions until it ends

logger = logging.getLogger(__name__)


class SessionMetering:
    def __init__(
        self,
        state: GatewayState,
        links: Links | None = None,
        guardrails: Guardrails | None = None,
        kept: KeptHistory | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.state = state
        self.kept = kept or KeptHistory(state)  # the kept history: trimmed, redacted, audio shrunk
        self.recorder = recorder  # gateway_record: told of every frame, and of each session's end
        self.sessions: dict[str, Session] = {}
        self.clock = SessionClock()
        self.links = links or Links()  # the gateway's messages and closes, on either path
        self.injections = self.links.injections
        self.guardrails = guardrails  # told of every frame after its metering
        self.clock_task: asyncio.Task[None] | None = None

    def running(self) -> None:
        show_comment_column()
        self.clock_task = asyncio.get_running_loop().create_task(self.watch_clock())

    def done(self) -> None:
        if self.clock_task is not None:
            self.clock_task.cancel()

    async def watch_clock(self) -> None:
        """Once a second: sessions past their duration or idle limit are closed with 1008."""
        while True:
            await asyncio.sleep(SESSION_CLOCK_SECONDS)
            for flow, reason in self.clock.expired():
                if self.close(flow, REASONS[reason]):
                    self.state.accounting.enforced(Refusal("client_key", reason), "closed_session")

    def route(self, flow: http.HTTPFlow) -> Route | None:
        """The flow's route when it is a metered session's handshake."""
        route = self.state.route(flow)
        return route if route is not None and session_kind(route) and is_websocket_upgrade(flow.request) else None

    @never_raises
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        route = self.route(flow)
        if route is None or flow.response is not None or refused_unknown_key(self.state, flow, "rejected_session"):
            return None
        origin = source(flow, route.type, session=True)
        if self.state.accounting.shared is not None:
            return self.shared_handshake(flow, origin)
        self.handshake(flow, self.state.accounting.open_session(origin))
        return None

    async def shared_handshake(self, flow: http.HTTPFlow, origin: Source) -> None:
        """The handshake waits for the shared store (at most limits.store_timeout_ms)."""
        self.handshake(flow, await self.state.accounting.open_session_shared(origin))

    def handshake(self, flow: http.HTTPFlow, refusal: Refusal | None) -> None:
        if refusal is not None:
            flow.response = refusal_response(refusal)
            self.state.accounting.enforced(refusal, "rejected_session")
        else:
            flow.metadata[SESSION_OPEN_METADATA] = True

    def end_session(self, flow: http.HTTPFlow) -> None:
        """A handshake admitted against concurrent_sessions ended (closed, refused upstream, failed)."""
        if flow.metadata.pop(SESSION_OPEN_METADATA, False):
            route = self.state.route(flow)
            route_type = route.type if route is not None else RouteType.REALTIME
            self.state.accounting.close_session(source(flow, route_type, session=True))

    @never_raises
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code >= 400 and (route := self.route(flow)):
            self.state.accounting.error(source(flow, route.type), str(flow.response.status_code))
        if flow.websocket is None:
            self.end_session(flow)

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            return
        self.end_session(flow)
        if flow.error is not None and (route := self.route(flow)):
            self.state.accounting.error(source(flow, route.type), error_type(flow.error.msg))

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.start_session(flow)

    def start_session(self, flow: http.HTTPFlow) -> None:
        """A metered session's relay begins: its adapter and meter, its clock."""
        route = self.state.route(flow)
        kinds = session_kind(route) if route is not None else None
        if route is None or kinds is None:
            return
        protocol, meter = kinds
        origin = source(flow, route.type, session=True)
        # A replayed session is metered as any other, under its own gen_ai_system.
        replayed = flow.metadata.get(REPLAYED_METADATA)
        provider = REPLAY_SYSTEM if replayed else self.state.policy.provider_for(route)  # type: ignore[union-attr]
        self.sessions[flow.id] = Session(
            protocol(self.state.max_body_bytes),
            meter(self.state.accounting, origin, provider, requested_model(flow.request.url)),
            self.state.conversations.open(flow, route.protocol) if route.type is RouteType.REALTIME else None,
        )
        if self.state.control is not None:
            self.clock.watch(flow, self.state.control.rate_limits(origin.client_key))
        self.state.accounting.relaying(origin, 1)
        if self.guardrails is not None:
            self.guardrails.start(flow)

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
        if session is not None and (pending := self.frame(flow, message, session)) is not None:
            return self.relayed_after(flow, pending)
        # The current message is relayed after this hook returns; the one before it has gone.
        self.kept.relayed(flow)
        return None

    async def relayed_after(self, flow: http.HTTPFlow, pending: Awaitable[None]) -> None:
        """The message waited (the layer with it): the one before it has gone now."""
        await pending
        if flow.websocket is not None:
            self.kept.relayed(flow)

    def frame(self, flow: http.HTTPFlow, message: Frame, session: Session) -> Awaitable[None] | None:
        """A peer's message, on either path: adapter, meter, enforcement, then the guardrails. An
        awaitable when the message waits: for the shared store's admission, or a guard's verdict."""
        if self.clock.sessions:
            self.clock.touch(flow.id)
        protocol = session.protocol
        if message.from_client:
            item = protocol.client_frame(message.content, message.is_text)
        else:
            item = protocol.server_frame(message.content, message.is_text)
        if session.conversation is not None:
            record(session.conversation, message)
        if self.recorder is not None and self.recorder.active:
            self.recorder.frame(flow, message, session)
        if item is not None:
            if self.state.accounting.shared is not None and session.meter.admission_needed(item):
                return self.shared_admission(flow, message, session, item)
            self.applied(flow, message, session, item, session.meter.apply(item))
        guards = self.guardrails
        if guards is None or (flow.id in guards.unwatched and protocol.audio):  # type: ignore[union-attr]
            return None  # an audio delta of the response streaming: metering counted it for the guards
        return guards.frame(flow, message, session)

    async def shared_admission(self, flow: http.HTTPFlow, message: Frame, session: Session, item: UsageItem) -> None:
        """A response starts (response.create, or one the upstream started): its admission waits
        for the shared store, at most limits.store_timeout_ms, before the frame is relayed (and
        is then the guards' to see, as any frame). No other frame ever waits for the store."""
        verdict = await self.state.accounting.admit_shared(session.meter.source)
        if flow.id not in self.sessions:  # the session ended meanwhile
            if isinstance(verdict, Ticket):
                self.state.accounting.release(verdict)
            return
        self.applied(flow, message, session, item, session.meter.apply_admitted(item, verdict))
        if self.guardrails is not None and (held := self.guardrails.frame(flow, message, session)) is not None:
            await held

    def applied(self, flow: http.HTTPFlow, message: Frame, session: Session, item: UsageItem, outcome: object) -> None:
        """What the meter made of a frame's item: a refused response.create never reaches the
        upstream (the client gets an error event), a refused response the upstream started by
        itself (server VAD) is cancelled upstream, a refused Gemini Live session (nothing to refuse
        per response: Gemini Live, GPT-Live) is closed with 1008 and the reason."""
        accounting = self.state.accounting
        if isinstance(outcome, Refusal):
            if message.from_client:
                message.drop()
                self.send(flow, True, refusal_event(outcome, message.content))
                accounting.enforced(outcome, "refused_response")
            elif isinstance(session.protocol, GeminiLiveProtocol | LiveProtocol):
                if self.close(flow, refusals.message(outcome)):
                    accounting.enforced(outcome, "closed_session")
            elif isinstance(item, ResponseStarted) and item.response_id is not None:
                self.send(flow, False, cancel_event(item.response_id))
                self.send(flow, True, refusal_event(outcome))
                accounting.enforced(outcome, "cancelled_response")
        elif outcome is not None:
            logger.debug("ai-gateway: unreadable frame (%s): %s", outcome.reason, outcome.detail)  # type: ignore[attr-defined]
        totals = session.meter.totals
        if totals.changed:
            # The session's spend as the flow's comment, marked on errors. mitmproxy sends every
            # flow a hook touched to mitmweb's list after the hook: the comment updates live there.
            totals.changed = False
            flow.comment = guard_comment(flow, totals.summary())
            if totals.errors:
                flow.marked = ":exclamation:"

    def send(self, flow: http.HTTPFlow, to_client: bool, payload: bytes) -> None:
        self.links.send(flow, to_client, payload)

    def close(self, flow: http.HTTPFlow, reason: str) -> bool:
        """Close a session with 1008 on both legs; a GPT-Live session is first ended upstream
        (`session.close`), as its protocol asks, so that the upstream stops billing it."""
        session = self.sessions.get(flow.id)
        if session is not None and isinstance(session.protocol, LiveProtocol) and self.links.open(flow):
            self.links.send(flow, False, CLOSE_EVENT)
        return self.links.close(flow, 1008, reason)

    @never_raises
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        websocket = flow.websocket
        self.kept.closed(flow)
        if websocket is not None:
            self.finish_session(flow, websocket.close_code, websocket.closed_by_client)
        else:
            self.end_session(flow)

    def finish_session(self, flow: http.HTTPFlow, close_code: int | None, closed_by_client: bool | None) -> None:
        """A relayed session ended, on either path: what it still billed, its record."""
        session = self.sessions.pop(flow.id, None)
        self.clock.forget(flow.id)
        self.links.forget(flow.id)
        if self.guardrails is not None:
            self.guardrails.end(flow)
        if session is not None:
            self.session_ended(flow, session, close_code, closed_by_client)
            if self.recorder is not None and self.recorder.active:
                self.recorder.finished(flow, session)
        self.end_session(flow)  # last: what the session still billed above counted against it

    def session_ended(
        self, flow: http.HTTPFlow, session: Session, close_code: int | None, closed_by_client: bool | None
    ) -> None:
        meter = session.meter
        if isinstance(session.protocol, GeminiLiveProtocol) and (item := session.protocol.closed()) is not None:
            meter.apply(item)
        in_flight = meter.in_flight
        meter.close()
        self.state.accounting.relaying(meter.source, -1)
        failure = None
        if closer.CLOSED_BY_GATEWAY not in flow.metadata:  # the gateway's own close: an enforcement, not an error
            failure = close_error(close_code, closed_by_client, in_flight)
            if failure:
                self.state.accounting.error(meter.source, failure)
        observability = self.state.observability
        if observability.active:
            observability.session_ended(meter.ended(close_code, closed_by_client, failure or ""))


class Frame(Protocol):
    """A message as the metering path reads it: mitmproxy's WebSocketMessage, or one read from
    the byte stream (proxy/frame_relay.py)."""

    from_client: bool
    content: bytes
    is_text: bool
    timestamp: float
    dropped: bool

    def drop(self) -> None: ...


class Session(NamedTuple):
    """A metered WebSocket session: its protocol's adapter reads the frames, its meter bills them."""

    protocol: SessionProtocol
    meter: SessionMeter
    conversation: Conversation | None = None  # kept for mitmweb (proxy/conversation.py)


SessionProtocol = RealtimeProtocol | ResponsesSocketProtocol | GeminiLiveProtocol | LiveProtocol

# A WebSocket route's (route type, protocol) -> its protocol adapter and meter.
SESSION_KINDS: dict[tuple[RouteType, WireProtocol], tuple[type[SessionProtocol], type[SessionMeter]]] = {
    (RouteType.REALTIME, WireProtocol.OPENAI): (RealtimeProtocol, RealtimeMeter),
    (RouteType.RESPONSES, WireProtocol.OPENAI): (ResponsesSocketProtocol, ResponsesSocketMeter),
    (RouteType.REALTIME, WireProtocol.GEMINI_LIVE): (GeminiLiveProtocol, GeminiLiveMeter),
    (RouteType.REALTIME, WireProtocol.OPENAI_LIVE): (LiveProtocol, LiveMeter),
}


def session_kind(route: Route) -> tuple[type[SessionProtocol], type[SessionMeter]] | None:
    return SESSION_KINDS.get((route.type, route.protocol))


def show_comment_column() -> None:
    """Under mitmweb, add the comment column (where session totals show) to the flow list."""
    columns = getattr(ctx.options, "web_columns", None)
    if columns is not None and "comment" not in columns:
        ctx.options.update(web_columns=[*columns, "comment"])
