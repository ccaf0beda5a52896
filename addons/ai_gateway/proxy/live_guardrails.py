"""Guardrails on Gemini Live sessions (`BidiGenerateContent`), told of each frame by Guardrails.

Input is the user's text (`clientContent` turns, `realtimeInput.text`) and the user's speech as
the upstream transcribes it (`serverContent.inputTranscription`); output is the model's text
parts and its speech transcript (`serverContent.outputTranscription`). Transcripts and output
stream in pieces: each is checked a window at a time (a sentence, or 160 characters), never per
message, as on Realtime.

Gemini Live has no error event, no response.cancel and no conversation.item.delete, so a block does
what the protocol leaves:

- user text: the frame is dropped (the model never sees it, the conversation stays clean) and the
  client gets a google.rpc.Status message, which google-genai raises as a ClientError (code 400,
  reason GUARDRAIL_BLOCKED); the session goes on.
- transcribed speech and output: the upstream already holds them in the session's context, and
  nothing the client or the gateway can send removes them or stops the turn. So nothing more of
  the turn reaches the client and the session is closed with 1008 and the guard's name (the SDK
  raises it as an APIError): closing is what stops the model (and its billing) and keeps the next
  turn from building on what was blocked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mitmproxy import http

from ai_gateway.accounting.session_meters import SessionMeter
from ai_gateway.config.guardrails import BLOCKED_CODE, Guard, GuardrailPolicy, Phase, Verdict, first_block
from ai_gateway.protocols.gemini_live import error_message
from ai_gateway.protocols.guard_text import Window, live_client_text, live_server_event
from ai_gateway.proxy.guard_checks import Asker, GuardChecks, GuardedSession, blocked_message
from ai_gateway.proxy.injection import Links

if TYPE_CHECKING:
    from ai_gateway.proxy.sessions import Frame

logger = logging.getLogger(__name__)


@dataclass
class LiveSession(GuardedSession):
    text: Window = field(default_factory=Window)  # the model's text parts in this turn
    spoken: Window = field(default_factory=Window)  # its speech transcript
    heard: Window = field(default_factory=Window)  # the user's speech transcript
    audio_ms: float = 0.0  # the turn's audio relayed so far
    closing: bool = False  # blocked: nothing more reaches the client


class LiveGuardrails:
    def __init__(self, checks: GuardChecks, links: Links) -> None:
        self.checks = checks
        self.links = links
        self.sessions: dict[str, LiveSession] = {}

    def open(self, flow: http.HTTPFlow, guards: GuardrailPolicy, asker: Asker) -> None:
        self.sessions[flow.id] = LiveSession(guards, asker)

    def frame(self, flow: http.HTTPFlow, message: Frame, meter: SessionMeter) -> Awaitable[None] | None:
        """A frame of a guarded Live session (JSON in text or binary frames); an awaitable only
        for user text held for a service's verdict."""
        session = self.sessions.get(flow.id)
        if session is None or message.dropped:
            return None
        session.meter = meter
        try:
            if message.from_client:
                return self.client_frame(flow, message, session) if session.inputs else None
            self.server_frame(flow, message, session)
        except Exception:
            logger.exception("ai-gateway: guardrails failed on a frame of %s", flow.id)
        return None

    def client_frame(self, flow: http.HTTPFlow, message: Frame, session: LiveSession) -> Awaitable[None] | None:
        text = live_client_text(message.content)
        if not text:
            return None
        return self.checks.decide(
            flow, session.asker, session.inputs, Phase.INPUT, text,
            lambda verdict: self.refuse(flow, message, session, verdict),
        )  # fmt: skip

    def refuse(self, flow: http.HTTPFlow, message: Frame, session: LiveSession, verdict: Verdict) -> None:
        message.drop()
        error = error_message(blocked_message(verdict, Phase.INPUT), BLOCKED_CODE.upper(), {"guard": verdict.guard})
        self.links.send(flow, True, error)
        self.checks.blocked(flow, session, verdict, Phase.INPUT)

    def server_frame(self, flow: http.HTTPFlow, message: Frame, session: LiveSession) -> None:
        if session.closing:
            message.drop()  # what the upstream sent before the close reached it
            return
        event = live_server_event(message.content)
        if event is None:
            return
        session.audio_ms += event.audio_ms
        windows: list[tuple[Phase, tuple[Guard, ...], list[tuple[str, int]]]] = []
        if session.inputs:
            answering = bool(event.text or event.spoken or event.audio_ms) or event.turn_over
            heard = session.heard.feed(event.heard) if event.heard else []
            windows.append((Phase.INPUT, session.inputs, heard + (session.heard.flush() if answering else [])))
        if session.outputs:
            for window, text in ((session.text, event.text), (session.spoken, event.spoken)):
                found = window.feed(text) if text else []
                windows.append((Phase.OUTPUT, session.outputs, found + (window.flush() if event.turn_over else [])))
        if event.turn_over:
            session.text, session.spoken, session.audio_ms = Window(), Window(), 0.0
        for phase, guards, found in windows:
            for normalised, start in found:
                verdicts = self.checks.regex(guards, phase, normalised, start)
                if block := first_block(verdicts):
                    message.drop()
                    self.block_turn(flow, session, block, phase)
                    return
                self.checks.noted(flow, verdicts, phase)
                remote = [g for g in guards if g.remote]
                if remote and normalised[start:].strip():
                    then = functools.partial(self.checked, flow, session, phase)
                    self.checks.ask_later(session.asker, remote, phase, normalised[start:], then)

    def checked(self, flow: http.HTTPFlow, session: LiveSession, phase: Phase, verdicts: list[Verdict]) -> None:
        """The services' verdicts on a window of transcript or output, asked off the relay."""
        if (block := first_block(verdicts)) and flow.id in self.sessions and not session.closing:
            self.block_turn(flow, session, block, phase)
        else:
            self.checks.noted(flow, verdicts, phase)

    def block_turn(self, flow: http.HTTPFlow, session: LiveSession, verdict: Verdict, phase: Phase) -> None:
        """What the user said or the model answered blocked: nothing more of the session reaches
        the client, which is closed with 1008 (see the module's docstring)."""
        session.closing = True
        detail = ""
        if phase is Phase.OUTPUT:
            self.checks.state.accounting.guardrail_audio(verdict.guard, session.audio_ms / 1000)
            detail = f"{session.audio_ms:.0f} ms of audio before the block"
        if not self.checks.blocked(flow, session, verdict, phase, detail, ("",)):  # "": the turn in flight
            self.checks.close(
                flow, verdict, "blocked " + ("what the user said" if phase is Phase.INPUT else "the response")
            )
