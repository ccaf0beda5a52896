"""Guardrails on WebSocket sessions: what the user says and what the model answers checked as it
streams, and blocked as the policy's `guardrails:` say. OpenAI Realtime here; Gemini Live in
proxy/live_guardrails.py; HTTP in proxy/http_guardrails.py.

- User text (`conversation.item.create`): checked before it is relayed. Regex guards decide in
  the hook; webhook and moderation guards hold the frame (and only it) until their verdict, at
  most their timeout_ms. A block drops the frame and sends the client an `error` event.
- Transcribed speech (`...input_audio_transcription.completed`) and the model's text and
  transcript deltas: never held. Output is checked a window at a time (a sentence, or 160
  characters: protocols/guard_text.py); a service's verdict arrives while frames flow on. A block
  cancels the response in flight upstream (`response.cancel`), drops the rest of it, deletes the
  offending item (`conversation.item.delete`) and sends the client an `error` event.
- A session a guard blocked more than its `max_blocks` times is closed with 1008.

SessionMetering calls `frame` after its metering, so that what a guard drops is metered all the
same, for every frame of a metered session (the gateway keeps one per-frame hook) except the audio
deltas of a response streaming alone (`unwatched`: metering counts them, and the guards measure
that response's audio from the counts): a frame
mitmproxy's WebSocket layer relays, or one read from the byte stream (proxy/frame_relay.py), where
a drop cuts it out and an edit (a blocked response's response.done) takes its place. Guards send
and close through `Links`, whichever path the session takes.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mitmproxy import http

from ai_gateway.config.guardrails import BLOCKED_CODE, Phase, Verdict, first_block, normalise
from ai_gateway.config.policy import RouteType, WireProtocol
from ai_gateway.protocols.guard_text import (
    AUDIO_DELTAS,
    MS_PER_BASE64_CHAR,
    OutputAudio,
    OutputEnd,
    OutputText,
    Started,
    Transcript,
    Window,
    base64_length,
    client_event,
    response_id,
    server_event,
)
from ai_gateway.protocols.openai_realtime import RealtimeProtocol, cancel_event, error_event
from ai_gateway.proxy.guard_checks import GuardChecks, GuardedSession, asker, blocked_message, told
from ai_gateway.proxy.injection import Links
from ai_gateway.proxy.live_guardrails import LiveGuardrails
from ai_gateway.proxy.state import GatewayState

if TYPE_CHECKING:
    from ai_gateway.proxy.sessions import Frame, Session

SPEECH_STARTED = "input_audio_buffer.speech_started"

logger = logging.getLogger(__name__)


@dataclass
class GuardedResponse:
    """One response's output as its guards see it."""

    window: Window = field(default_factory=Window)
    item_id: str | None = None
    audio_ms: float = 0.0
    envelope: int = -1  # the bytes of an audio delta of it around the audio (-1: none read yet)

    def audio(self, content: bytes) -> None:
        """An audio delta of this response, relayed. Its base64 is found once, in the first delta:
        the others have the same ids and members around theirs, so their audio is their size less
        that envelope, not a scan of 6-100 KB per delta."""
        if self.envelope < 0:
            self.envelope = len(content) - base64_length(content)
        self.audio_ms += (len(content) - self.envelope) * MS_PER_BASE64_CHAR

    def audio_since(self, protocol: RealtimeProtocol, since: tuple[int, int]) -> None:
        """The audio deltas metering counted (their sizes, their number) since `since`: all this
        response's, relayed while the guards were not handed them."""
        size, count = protocol.audio_bytes - since[0], protocol.audio_deltas - since[1]
        self.audio_ms += (size - count * self.envelope) * MS_PER_BASE64_CHAR


@dataclass
class RealtimeSession(GuardedSession):
    responses: dict[str, GuardedResponse] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)  # responses whose every later frame is dropped
    cancel_next: Verdict | None = None  # a blocked turn with no response yet: the one it starts is cancelled
    # The one response streaming (guarded output, none blocked), once an audio delta found it so:
    # its next audio deltas are not handed to the guards, metering counts them from `counted`
    # on. Settled at any other server event and at any block, which are all that change that.
    streaming: GuardedResponse | None = None
    counted: tuple[int, int] = (0, 0)  # metering's audio bytes and deltas when streaming began
    protocol: RealtimeProtocol | None = None


class Guardrails:
    def __init__(self, state: GatewayState, links: Links) -> None:
        self.state = state
        self.links = links  # the session's path: injected on mitmproxy's WebSocket layer, or its byte link
        self.checks = GuardChecks(state, links)
        self.sessions: dict[str, RealtimeSession] = {}
        self.live = LiveGuardrails(self.checks, links)  # Gemini Live sessions
        # Sessions whose output audio deltas SessionMetering need not hand over (most frames of a
        # voice session): their one response streaming, its audio counted by metering meanwhile.
        self.unwatched: set[str] = set()
        self.unchecked: set[tuple[str, RouteType, WireProtocol]] = set()  # guarded routes whose sessions no guard reads

    def start(self, flow: http.HTTPFlow) -> None:
        """A metered session's relay begins, on either path (told by SessionMetering): its guards."""
        policy, route = self.state.policy, self.state.route(flow)
        if policy is None or route is None or not (guards := policy.guardrails_for(route)):
            return
        if route.type is RouteType.REALTIME and route.protocol is WireProtocol.OPENAI:
            self.sessions[flow.id] = RealtimeSession(guards, asker(flow, route.suffix))
        elif route.type is RouteType.REALTIME and route.protocol is WireProtocol.GEMINI_LIVE:
            self.live.open(flow, guards, asker(flow, route.suffix))
        elif (kind := (route.suffix, route.type, route.protocol)) not in self.unchecked:
            self.unchecked.add(kind)  # said once per route and kind of session, not per session
            logger.warning(
                "ai-gateway: route %s has guardrails, but its %s sessions (%s) are relayed unchecked: "
                "guards run on OpenAI Realtime and Gemini Live sessions, and on HTTP Chat, Responses and Completions",
                route.suffix, route.type, route.protocol,
            )  # fmt: skip

    def end(self, flow: http.HTTPFlow) -> None:
        self.sessions.pop(flow.id, None)
        self.unwatched.discard(flow.id)
        self.live.sessions.pop(flow.id, None)

    def done(self) -> Awaitable[None] | None:
        return self.checks.shutdown()

    def frame(self, flow: http.HTTPFlow, message: Frame, metered: Session) -> Awaitable[None] | None:
        """A relayed frame of a metered session, on either path (its meter told of blocks, for its
        records); an awaitable only for user text held for a service's verdict."""
        session = self.sessions.get(flow.id)
        if session is None:
            return self.live.frame(flow, message, metered.meter) if self.live.sessions else None
        session.meter = metered.meter
        if not message.is_text or message.dropped:
            return None
        try:
            if message.from_client:  # what metering found it names none of the events read (audio): unread
                plain = metered.protocol.plain  # type: ignore[union-attr]
                return self.client_frame(flow, message, session) if session.inputs and not plain else None
            self.server_frame(flow, message, session, metered.protocol)  # type: ignore[arg-type]
        except Exception:
            logger.exception("ai-gateway: guardrails failed on a frame of %s", flow.id)
        return None

    def client_frame(self, flow: http.HTTPFlow, message: Frame, session: RealtimeSession) -> Awaitable[None] | None:
        user = client_event(message.content)
        if user is None or not user.text:
            return None
        return self.checks.decide(
            flow, session.asker, session.inputs, Phase.INPUT, user.text,
            lambda verdict: self.refuse_item(flow, message, session, verdict),
        )  # fmt: skip

    def refuse_item(self, flow: http.HTTPFlow, message: Frame, session: RealtimeSession, verdict: Verdict) -> None:
        message.drop()
        self.links.send(flow, True, blocked_event(verdict, Phase.INPUT, message.content))
        self.checks.blocked(flow, session, verdict, Phase.INPUT)

    def server_frame(
        self, flow: http.HTTPFlow, message: Frame, session: RealtimeSession, protocol: RealtimeProtocol
    ) -> None:
        """A server frame, its type (and a response's id) as metering read it."""
        if protocol.kind == SPEECH_STARTED:
            session.cancel_next = None  # a new turn: what the last one started is its own
            return
        if protocol.kind in AUDIO_DELTAS and not session.blocked and len(session.in_flight) == 1:
            # The audio of the one response streaming: its response id not read, no event made;
            # the next ones counted by metering, not handed over, until something else happens.
            if session.outputs:
                session.streaming = self.output_of(session, next(iter(session.in_flight)))
                session.streaming.audio(message.content)
                session.protocol, session.counted = protocol, (protocol.audio_bytes, protocol.audio_deltas)
                self.unwatched.add(flow.id)
            return
        self.settle(flow, session)
        event = server_event(message.content, protocol.kind, protocol.item)
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
            if (verdict := session.cancel_next) is not None:
                session.cancel_next = None
                session.blocked.add(rid)
                self.links.send(flow, False, cancel_event(rid))
                told(session, verdict, Phase.INPUT, rid)  # the record of the response it answered
            return
        if isinstance(event, OutputEnd) and event.finished:
            session.in_flight.discard(rid)
            if rid not in session.blocked and (response := session.responses.get(rid)) is not None:
                self.check_output(flow, session, rid, response.window.flush())  # text no .done event ended
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
        response = self.output_of(session, rid)
        if isinstance(event, OutputAudio):
            response.audio_ms += event.milliseconds
            return
        if isinstance(event, OutputText):
            response.item_id = event.item_id or response.item_id
            windows = response.window.feed(event.text)
        else:
            windows = response.window.flush()
        if self.check_output(flow, session, rid, windows):
            message.drop()

    def settle(self, flow: http.HTTPFlow, session: RealtimeSession) -> None:
        """The streaming response's audio counted by metering since it began is its own; from now on
        the guards are handed each audio delta again."""
        if session.streaming is not None and session.protocol is not None:
            session.streaming.audio_since(session.protocol, session.counted)
        session.streaming = None
        self.unwatched.discard(flow.id)

    @staticmethod
    def output_of(session: RealtimeSession, rid: str) -> GuardedResponse:
        """The response's guarded output so far (not setdefault: no object made and thrown away per delta)."""
        response = session.responses.get(rid)
        if response is None:
            response = session.responses[rid] = GuardedResponse()
        return response

    def check_output(
        self, flow: http.HTTPFlow, session: RealtimeSession, rid: str, windows: list[tuple[str, int]]
    ) -> bool:
        """A response's windows of output checked; True when one was blocked."""
        for normalised, start in windows:
            verdicts = self.checks.regex(session.outputs, Phase.OUTPUT, normalised, start)
            if block := first_block(verdicts):
                self.block_response(flow, session, rid, block)
                return True
            self.checks.noted(flow, verdicts, Phase.OUTPUT)
            self.ask_later(flow, session, rid, normalised[start:])
        return False

    def check_transcript(
        self, flow: http.HTTPFlow, message: Frame, session: RealtimeSession, transcript: Transcript
    ) -> None:
        verdicts = self.checks.regex(session.inputs, Phase.INPUT, normalise(transcript.text))
        if block := first_block(verdicts):
            message.drop()
            self.block_turn(flow, session, transcript.item_id, block)
            return
        self.checks.noted(flow, verdicts, Phase.INPUT)
        remote = [g for g in session.inputs if g.remote]
        if remote:
            then = functools.partial(self.turn_checked, flow, session, transcript.item_id)
            self.checks.ask_later(session.asker, remote, Phase.INPUT, transcript.text, then)

    def turn_checked(
        self, flow: http.HTTPFlow, session: RealtimeSession, item_id: str | None, verdicts: list[Verdict]
    ) -> None:
        """The services' verdicts on a transcribed turn, arrived while the session went on."""
        if (block := first_block(verdicts)) and flow.id in self.sessions:
            self.block_turn(flow, session, item_id, block)
        else:
            self.checks.noted(flow, verdicts, Phase.INPUT)

    def block_turn(self, flow: http.HTTPFlow, session: RealtimeSession, item_id: str | None, verdict: Verdict) -> None:
        """A user turn blocked: whatever answers it is cancelled (or the response it is about to
        start), the item deleted, the client told; the records of the responses cancelled say why."""
        self.settle(flow, session)
        cancelled = sorted(session.in_flight - session.blocked)
        for rid in cancelled:
            session.blocked.add(rid)
            self.links.send(flow, False, cancel_event(rid))
        session.cancel_next = None if session.in_flight else verdict
        if item_id:
            self.links.send(flow, False, delete_event(item_id))
        self.links.send(flow, True, blocked_event(verdict, Phase.INPUT))
        self.checks.blocked(flow, session, verdict, Phase.INPUT, response_ids=cancelled)

    def ask_later(self, flow: http.HTTPFlow, session: RealtimeSession, rid: str, text: str) -> None:
        """A window of output for the services, asked off the relay."""
        remote = [g for g in session.outputs if g.remote]
        if remote and text.strip():
            then = functools.partial(self.output_checked, flow, session, rid)
            self.checks.ask_later(session.asker, remote, Phase.OUTPUT, text, then)

    def output_checked(self, flow: http.HTTPFlow, session: RealtimeSession, rid: str, verdicts: list[Verdict]) -> None:
        if (block := first_block(verdicts)) and flow.id in self.sessions and rid not in session.blocked:
            self.block_response(flow, session, rid, block)
        else:
            self.checks.noted(flow, verdicts, Phase.OUTPUT)

    def block_response(self, flow: http.HTTPFlow, session: RealtimeSession, rid: str, verdict: Verdict) -> None:
        """Output blocked: the response cancelled upstream (if still running), its item deleted,
        the rest of it dropped, the client told; the audio it had already sent is recorded."""
        self.settle(flow, session)
        session.blocked.add(rid)
        if rid in session.in_flight:
            self.links.send(flow, False, cancel_event(rid))
        response = session.responses.pop(rid, None) or GuardedResponse()
        if response.item_id:
            self.links.send(flow, False, delete_event(response.item_id))
        self.links.send(flow, True, blocked_event(verdict, Phase.OUTPUT))
        self.state.accounting.guardrail_audio(verdict.guard, response.audio_ms / 1000)
        note = f"{response.audio_ms:.0f} ms of audio before the block"
        self.checks.blocked(flow, session, verdict, Phase.OUTPUT, note, (rid,))


def blocked_event(verdict: Verdict, phase: Phase, refused: bytes = b"") -> bytes:
    return error_event(BLOCKED_CODE, blocked_message(verdict, phase), refused)


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
