"""Guardrails on OpenAI Realtime sessions and HTTP requests: what the user says and what the
model answers checked as it streams, and blocked as the policy's `guardrails:` say.

- User text (`conversation.item.create`): checked before it is relayed. Regex guards decide in
  the hook; webhook and moderation guards hold the frame (and only it) until their verdict, at
  most their timeout_ms. A block drops the frame and sends the client an `error` event.
- Transcribed speech (`...input_audio_transcription.completed`) and the model's text and
  transcript deltas: never held. Output is checked a window at a time (a sentence, or 160
  characters: protocols/guard_text.py); a service's verdict arrives while frames flow on. A block
  cancels the response in flight upstream (`response.cancel`), drops the rest of it, deletes the
  offending item (`conversation.item.delete`) and sends the client an `error` event.

HTTP (Chat, Responses, legacy Completions): the user's messages are checked before the request
goes upstream (a block answers 400), a whole response before it reaches the client (replaced by
a 400), a streamed one a window at a time (a block ends what the client gets with an error event).

SessionMetering calls `frame` for every frame of a metered session (the gateway keeps one
per-frame hook), HttpMetering calls `request`, `responseheaders` and `response` around its own
reading, so that what a guard drops is metered all the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.guard_service import ask
from ai_gateway.config.guardrails import (
    BLOCKED_CODE,
    Guard,
    GuardrailPolicy,
    Phase,
    Verdict,
    check_regex,
    failed,
    first_block,
    normalise,
)
from ai_gateway.config.policy import Route, RouteType, WireProtocol
from ai_gateway.protocols.guard_text import (
    GUARDED_HTTP,
    OutputAudio,
    OutputEnd,
    OutputText,
    SseText,
    Started,
    Transcript,
    Window,
    client_event,
    request_text,
    response_id,
    response_text,
    server_event,
    sse_error,
)
from ai_gateway.protocols.json_events import event_type
from ai_gateway.protocols.openai_http import decoded
from ai_gateway.protocols.openai_realtime import cancel_event, error_event
from ai_gateway.proxy.injection import Injections
from ai_gateway.proxy.state import CLIENT_KEY_METADATA, GatewayState, never_raises

GUARDRAIL_METADATA = "ai_gateway.guardrails"  # what guards did on a flow: its comment in mitmweb
SPEECH_STARTED = "input_audio_buffer.speech_started"
MAX_PENDING_CHECKS = 32  # service calls in flight per session; beyond, a check is an error verdict

logger = logging.getLogger(__name__)


@dataclass
class GuardedResponse:
    """One response's output as its guards see it."""

    window: Window = field(default_factory=Window)
    item_id: str | None = None
    audio_ms: float = 0.0


@dataclass
class GuardedSession:
    inputs: tuple[Guard, ...]
    outputs: tuple[Guard, ...]
    context: dict[str, str]  # what a webhook is told besides the text
    responses: dict[str, GuardedResponse] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)  # responses whose every later frame is dropped
    cancel_next: bool = False  # a blocked turn with no response yet: the one it starts is cancelled
    pending: int = 0


class Guardrails:
    def __init__(self, state: GatewayState, injections: Injections) -> None:
        self.state = state
        self.injections = injections
        self.sessions: dict[str, GuardedSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    @never_raises
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        policy, route = self.state.policy, self.state.route(flow)
        if policy is None or route is None or (route.type, route.protocol) != (RouteType.REALTIME, WireProtocol.OPENAI):
            return
        guards = policy.guardrails_for(route)
        if guards:
            self.sessions[flow.id] = new_session(guards, flow, route.suffix)

    @never_raises
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.sessions.pop(flow.id, None)

    def done(self) -> None:
        for task in self.tasks:
            task.cancel()

    def frame(self, flow: http.HTTPFlow, message: WebSocketMessage) -> Awaitable[None] | None:
        """A relayed frame of a guarded session; an awaitable only for a user text item held for a
        service's verdict."""
        session = self.sessions.get(flow.id)
        if session is None or not message.is_text or message.dropped:
            return None
        try:
            if message.from_client:
                return self.client_frame(flow, message, session) if session.inputs else None
            self.server_frame(flow, message, session)
        except Exception:
            logger.exception("ai-gateway: guardrails failed on a frame of %s", flow.id)
        return None

    def client_frame(
        self, flow: http.HTTPFlow, message: WebSocketMessage, session: GuardedSession
    ) -> Awaitable[None] | None:
        user = client_event(message.content)
        if user is None or not user.text:
            return None
        verdicts = self.check_regex(session.inputs, Phase.INPUT, normalise(user.text))
        if block := first_block(verdicts):
            self.refuse_item(flow, message, block)
            return None
        self.noted(flow, verdicts)
        remote = [g for g in session.inputs if g.remote]
        return self.hold(flow, message, session, remote, user.text) if remote else None

    async def hold(
        self, flow: http.HTTPFlow, message: WebSocketMessage, session: GuardedSession, guards: list[Guard], text: str
    ) -> None:
        """The user's text waits for the services' verdicts (each within its timeout) before it is relayed."""
        verdicts = await self.ask_all(session, guards, Phase.INPUT, text)
        if block := first_block(verdicts):
            self.refuse_item(flow, message, block)
        else:
            self.noted(flow, verdicts)

    def refuse_item(self, flow: http.HTTPFlow, message: WebSocketMessage, verdict: Verdict) -> None:
        message.drop()
        self.injections.send(flow, True, blocked_event(verdict, Phase.INPUT, message.content))
        self.noted(flow, [verdict])

    def server_frame(self, flow: http.HTTPFlow, message: WebSocketMessage, session: GuardedSession) -> None:
        kind = event_type(message.content)
        if kind == SPEECH_STARTED:
            session.cancel_next = False  # a new turn: what the last one started is its own
            return
        event = server_event(message.content, kind)
        if event is None:
            if session.blocked and response_id(message.content) in session.blocked:
                message.drop()  # content parts and output items of a blocked response
            return
        if isinstance(event, Transcript):
            if session.inputs and event.text:
                self.check_transcript(flow, message, session, event)
            return
        rid = event.response_id or ""
        if isinstance(event, Started):
            session.in_flight.add(rid)
            if session.cancel_next:
                session.cancel_next = False
                session.blocked.add(rid)
                self.injections.send(flow, False, cancel_event(rid))
            return
        if isinstance(event, OutputEnd) and event.finished:
            session.in_flight.discard(rid)
            session.responses.pop(rid, None)
            if rid in session.blocked:
                session.blocked.discard(rid)
                message.content = without_output(message.content)
            return
        if rid in session.blocked:
            message.drop()
            return
        if not session.outputs:
            return
        response = session.responses.setdefault(rid, GuardedResponse())
        if isinstance(event, OutputAudio):
            response.audio_ms += event.milliseconds
            return
        if isinstance(event, OutputText):
            response.item_id = event.item_id or response.item_id
            windows = response.window.feed(event.text)
        else:
            windows = response.window.flush()
        for normalised, start in windows:
            verdicts = self.check_regex(session.outputs, Phase.OUTPUT, normalised, start)
            if block := first_block(verdicts):
                message.drop()
                self.block_response(flow, session, rid, block)
                return
            self.noted(flow, verdicts)
            self.ask_later(flow, session, rid, normalised[start:])

    def check_transcript(
        self, flow: http.HTTPFlow, message: WebSocketMessage, session: GuardedSession, transcript: Transcript
    ) -> None:
        verdicts = self.check_regex(session.inputs, Phase.INPUT, normalise(transcript.text))
        if block := first_block(verdicts):
            message.drop()
            self.block_turn(flow, session, transcript.item_id, block)
            return
        self.noted(flow, verdicts)
        remote = [g for g in session.inputs if g.remote]
        if remote:
            self.spawn(self.ask_turn(flow, session, remote, transcript))

    async def ask_turn(
        self, flow: http.HTTPFlow, session: GuardedSession, guards: list[Guard], transcript: Transcript
    ) -> None:
        verdicts = await self.ask_all(session, guards, Phase.INPUT, transcript.text)
        if (block := first_block(verdicts)) and flow.id in self.sessions:
            self.block_turn(flow, session, transcript.item_id, block)
        else:
            self.noted(flow, verdicts)

    def block_turn(self, flow: http.HTTPFlow, session: GuardedSession, item_id: str | None, verdict: Verdict) -> None:
        """A user turn blocked: whatever answers it is cancelled (or the response it is about to
        start), the item deleted, the client told."""
        for rid in session.in_flight - session.blocked:
            session.blocked.add(rid)
            self.injections.send(flow, False, cancel_event(rid))
        session.cancel_next = not session.in_flight
        if item_id:
            self.injections.send(flow, False, delete_event(item_id))
        self.injections.send(flow, True, blocked_event(verdict, Phase.INPUT))
        self.noted(flow, [verdict])

    def http_guards(self, route: Route, phase: Phase) -> tuple[Guard, ...]:
        if self.state.policy is None or route.type not in GUARDED_HTTP:
            return ()
        return self.state.policy.guardrails_for(route).for_phase(phase)

    def check_request(self, flow: http.HTTPFlow, route: Route) -> Awaitable[None] | None:
        """A request's user text, before it goes upstream: a block answers it 400. Only a request
        with webhook or moderation guards waits (at most their timeout_ms)."""
        guards = self.http_guards(route, Phase.INPUT)
        if not guards:
            return None
        text = request_text(route.type, body_of(flow.request, self.state.max_body_bytes))
        if not text:
            return None
        verdicts = self.check_regex(guards, Phase.INPUT, normalise(text))
        if block := first_block(verdicts):
            self.refuse_request(flow, block)
            return None
        self.noted(flow, verdicts)
        remote = [g for g in guards if g.remote]
        return self.hold_request(flow, route, remote, text) if remote else None

    async def hold_request(self, flow: http.HTTPFlow, route: Route, guards: list[Guard], text: str) -> None:
        session = new_session(GuardrailPolicy(), flow, route.suffix)
        verdicts = await self.ask_all(session, guards, Phase.INPUT, text)
        if block := first_block(verdicts):
            self.refuse_request(flow, block)
        else:
            self.noted(flow, verdicts)

    def refuse_request(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        flow.response = blocked_response(verdict, Phase.INPUT)
        self.noted(flow, [verdict])

    def check_response_headers(self, flow: http.HTTPFlow, route: Route) -> None:
        """A streamed (SSE) response's text checked a window at a time as it passes; a block ends
        what the client gets with an error event. Compressed streams pass unchecked."""
        response = flow.response
        guards = self.http_guards(route, Phase.OUTPUT)
        if not guards or response is None or "content-encoding" in response.headers:
            return
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return
        inner = response.stream if callable(response.stream) else None
        stream = GuardedStream(self, flow, route, guards)
        response.stream = lambda chunk: stream.filter(inner(chunk) if inner is not None else chunk)  # type: ignore[arg-type]

    def check_response(self, flow: http.HTTPFlow, route: Route) -> Awaitable[None] | None:
        """A whole response's text, before it reaches the client: a block replaces it by a 400."""
        response = flow.response
        guards = self.http_guards(route, Phase.OUTPUT)
        if not guards or response is None or response.stream or not 200 <= response.status_code < 300:
            return None
        text = response_text(route.type, body_of(response, self.state.max_body_bytes))
        if not text:
            return None
        verdicts = self.check_regex(guards, Phase.OUTPUT, normalise(text))
        if block := first_block(verdicts):
            self.replace_response(flow, block)
            return None
        self.noted(flow, verdicts)
        remote = [g for g in guards if g.remote]
        return self.hold_response(flow, route, remote, text) if remote else None

    async def hold_response(self, flow: http.HTTPFlow, route: Route, guards: list[Guard], text: str) -> None:
        verdicts = await self.ask_all(new_session(GuardrailPolicy(), flow, route.suffix), guards, Phase.OUTPUT, text)
        if block := first_block(verdicts):
            self.replace_response(flow, block)
        else:
            self.noted(flow, verdicts)

    def replace_response(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        flow.response = blocked_response(verdict, Phase.OUTPUT)
        self.noted(flow, [verdict])

    def ask_later(self, flow: http.HTTPFlow, session: GuardedSession, rid: str, text: str) -> None:
        """A window of output for the services, asked off the relay."""
        remote = [g for g in session.outputs if g.remote]
        if remote and text.strip():
            self.spawn(self.ask_output(flow, session, remote, rid, text))

    async def ask_output(
        self, flow: http.HTTPFlow, session: GuardedSession, guards: list[Guard], rid: str, text: str
    ) -> None:
        verdicts = await self.ask_all(session, guards, Phase.OUTPUT, text)
        if (block := first_block(verdicts)) and flow.id in self.sessions and rid not in session.blocked:
            self.block_response(flow, session, rid, block)
        else:
            self.noted(flow, verdicts)

    def block_response(self, flow: http.HTTPFlow, session: GuardedSession, rid: str, verdict: Verdict) -> None:
        """Output blocked: the response cancelled upstream (if still running), its item deleted,
        the rest of it dropped, the client told; the audio it had already sent is recorded."""
        session.blocked.add(rid)
        if rid in session.in_flight:
            self.injections.send(flow, False, cancel_event(rid))
        response = session.responses.pop(rid, None) or GuardedResponse()
        if response.item_id:
            self.injections.send(flow, False, delete_event(response.item_id))
        self.injections.send(flow, True, blocked_event(verdict, Phase.OUTPUT))
        self.state.accounting.guardrail_audio(verdict.guard, response.audio_ms / 1000)
        note = f"{response.audio_ms:.0f} ms of audio before the block"
        self.noted(flow, [verdict], note)

    def check_regex(self, guards: Iterable[Guard], phase: Phase, normalised: str, start: int = 0) -> list[Verdict]:
        verdicts = []
        for guard in guards:
            if not guard.remote:
                began = time.perf_counter()
                verdict = check_regex(guard, normalised, start)
                self.state.accounting.guardrail_checked(guard.name, phase, verdict.outcome, time.perf_counter() - began)
                verdicts.append(verdict)
        return verdicts

    async def ask_all(self, session: GuardedSession, guards: list[Guard], phase: Phase, text: str) -> list[Verdict]:
        return list(await asyncio.gather(*(self.ask_one(session, g, phase, text) for g in guards)))

    async def ask_one(self, session: GuardedSession, guard: Guard, phase: Phase, text: str) -> Verdict:
        began = time.perf_counter()
        if session.pending >= MAX_PENDING_CHECKS:
            verdict = failed(guard, "too many checks in flight")
        else:
            session.pending += 1
            try:
                verdict = await ask(guard, text, {**session.context, "phase": phase.value})
            finally:
                session.pending -= 1
        self.state.accounting.guardrail_checked(guard.name, phase, verdict.outcome, time.perf_counter() - began)
        return verdict

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("ai-gateway: a guardrail check failed: %r", error)

    def noted(self, flow: http.HTTPFlow, verdicts: Iterable[Verdict], detail: str = "") -> None:
        """Blocks, warnings and errors marked on the flow and kept for its comment."""
        for verdict in verdicts:
            if not verdict.marks:
                continue
            notes = flow.metadata.setdefault(GUARDRAIL_METADATA, [])
            text = f"guardrail {verdict.guard}: {verdict.outcome}" + (f" ({detail})" if detail else "")
            if len(notes) < 20:
                notes.append(text)
            flow.marked = ":no_entry:" if verdict.blocks else ":warning:"
            flow.comment = guard_comment(flow, flow.comment)
            logger.info("ai-gateway: %s on %s (%s)", text, flow.id, verdict.reason)


def new_session(guards: GuardrailPolicy, flow: http.HTTPFlow, route: str) -> GuardedSession:
    context = {
        "session": flow.id,
        "client_key_name": flow.metadata.get(CLIENT_KEY_METADATA, ""),
        "model": flow.request.query.get("model", ""),
        "route": route,
    }
    return GuardedSession(guards.for_phase(Phase.INPUT), guards.for_phase(Phase.OUTPUT), context)


def guard_comment(flow: http.HTTPFlow, comment: str) -> str:
    """A flow's comment with what its guards did after it (mitmweb's comment column)."""
    notes = flow.metadata.get(GUARDRAIL_METADATA)
    if not notes:
        return comment
    base = comment.split(" | guardrail ", 1)[0]
    return " | ".join([base, *notes[-3:]]) if base else " | ".join(notes[-3:])


def blocked_event(verdict: Verdict, phase: Phase, refused: bytes = b"") -> bytes:
    what = "your message" if phase is Phase.INPUT else "the response"
    message = f"The gateway's guardrail {verdict.guard!r} blocked {what}."
    return error_event(BLOCKED_CODE, message, refused)


class GuardedStream:
    """One SSE response's text as it passes: windows checked, and after a block nothing more."""

    def __init__(self, guardrails: Guardrails, flow: http.HTTPFlow, route: Route, guards: tuple[Guard, ...]) -> None:
        self.guardrails = guardrails
        self.flow = flow
        self.route = route
        self.guards = guards
        self.remote = [g for g in guards if g.remote]
        self.session = new_session(GuardrailPolicy(), flow, route.suffix)
        self.sse = SseText(route.type)
        self.window = Window()
        self.block: Verdict | None = None
        self.told = False

    def filter(self, chunk: bytes) -> bytes | list[bytes]:
        """The chunk as the client gets it: itself, the error event once a window was blocked, then
        nothing (an empty list: an empty chunk would end a chunked body early)."""
        if self.block is None:
            try:
                self.check(chunk)
            except Exception:
                logger.exception("ai-gateway: guardrails failed on a stream of %s", self.flow.id)
        if self.block is None:
            return chunk
        if self.told:
            return []
        self.told = True
        message = f"The gateway's guardrail {self.block.guard!r} blocked the response."
        return sse_error(self.route.type, BLOCKED_CODE, message)

    def check(self, chunk: bytes) -> None:
        windows = self.window.feed(self.sse.feed(chunk)) if chunk else self.window.flush()
        for normalised, start in windows:
            verdicts = self.guardrails.check_regex(self.guards, Phase.OUTPUT, normalised, start)
            if block := first_block(verdicts):
                self.blocked(block)
                return
            self.guardrails.noted(self.flow, verdicts)
            if self.remote and normalised[start:].strip():
                self.guardrails.spawn(self.ask(normalised[start:]))

    async def ask(self, text: str) -> None:
        verdicts = await self.guardrails.ask_all(self.session, self.remote, Phase.OUTPUT, text)
        if (block := first_block(verdicts)) and self.block is None:
            self.blocked(block)
        else:
            self.guardrails.noted(self.flow, verdicts)

    def blocked(self, verdict: Verdict) -> None:
        self.block = verdict
        self.guardrails.noted(self.flow, [verdict])


def body_of(message: http.Message, limit: int) -> bytes:
    """A body decoded within `limit`; empty when it cannot be (then there is nothing to check)."""
    body = decoded(message.raw_content or b"", message.headers.get("content-encoding", ""), limit)
    return body if isinstance(body, bytes) else b""


def blocked_response(verdict: Verdict, phase: Phase) -> http.Response:
    """What an HTTP client gets for a blocked request or response: 400, OpenAI-shaped."""
    what = "the request" if phase is Phase.INPUT else "the response"
    message = f"The gateway's guardrail {verdict.guard!r} blocked {what}."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": BLOCKED_CODE}
    return http.Response.make(400, json.dumps({"error": error}), {"content-type": "application/json"})


def delete_event(item_id: str) -> bytes:
    """The client event that removes an item from the conversation, sent upstream by the gateway."""
    event_id = f"event_gateway_{uuid.uuid4().hex[:12]}"
    return json.dumps({"type": "conversation.item.delete", "event_id": event_id, "item_id": item_id}).encode()


def without_output(content: bytes) -> bytes:
    """A blocked response's response.done, its output (the text it had produced) removed; usage kept."""
    try:
        event = json.loads(content)
        event["response"]["output"] = []
    except (ValueError, TypeError, KeyError):
        return content
    return json.dumps(event).encode()
