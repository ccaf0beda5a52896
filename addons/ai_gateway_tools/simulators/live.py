"""A simulated GPT-Live upstream (`/v1/live/sessions` and its sideband `.../{id}/attach`), for tests
and the demo.

A real WebSocket server on localhost speaking enough of GPT-Live for the openai SDK
(`client.live.connect()`) to hold sessions through the gateway. Session time is simulated, driven
by the client: each `session.input_audio.append` stands for `tick_seconds` of session time (one
`session.output_audio.delta` answers it), active or, after `session.input_audio.mute` until
`session.input_audio.unmute`, paused (standby: `session.paused`, `session.resumed`); each tick is
transcribed both ways (`session.input_transcript.delta` HEARD before the audio,
`session.output_transcript.delta` SAID after it). Every `report_every` seconds of it a
`session.usage.updated` reports the cumulative time, its `seconds` sometimes typed as a float
(`6.0`), with the active/paused breakdown once the session has paused.

`response.create` makes the model delegate to Responses: `session.delegation.created`, then
`response.event`s wrapping `response.created`, a text delta and `response.completed` with the
delegated model's usage. `session.close` ends the session with `session.closed` (reason
`close_requested`, the final usage) and a normal close. Words in `session.instructions.append`
steer the upstream: `sim_expire` ends the session with reason `expired`; `sim_drop` closes the
connection (1011) without `session.closed`; `sim_decrease` sends a report lower than the last one
(which no reader may bill).

The ledger holds what is billable as the upstream reported it: per delegated response its usage
(kind `response`), per session its last report (kind `live_session`, status the close reason, or
`unclosed` when it ended without `session.closed`). A sideband connection is a session of its own
here (the model `gpt-live-1.1`, announced in `session.updated`): nothing else attaches to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ai_gateway_tools.simulators.realtime import Handshake, SentUsage
from ai_gateway_tools.simulators.served import Served, command_line

SESSION_KIND, RESPONSE_KIND = "live_session", "responses"  # the harness's kinds
UNCLOSED = "unclosed"
SIDEBAND_MODEL = "gpt-live-1.1"
DEFAULT_DELEGATE = "gpt-5-mini"
_ATTACH = re.compile(r"/live/sessions/([^/]+)/attach\Z")
_AUDIO = "AAAA" * 256
HEARD, SAID = "Hello?", "Hi there."  # each tick's transcripts: the user's, then the model's


@dataclass
class _Session:
    id: str
    ws: ServerConnection
    model: str = "unknown"
    delegate: str = DEFAULT_DELEGATE
    active: int = 0
    paused: int = 0
    standby: bool = False
    eligible: bool = False  # paused once: reports carry the breakdown
    reported: dict[str, Any] | None = None  # the last usage sent
    reports: int = 0
    delegations: int = 0
    events: int = 0


@dataclass
class LiveSimulator(Served):
    """The simulated upstream; `async with LiveSimulator() as sim` starts and stops it."""

    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0
    tick_seconds: int = 1
    report_every: int = 3
    ledger: list[SentUsage] = field(default_factory=list)
    handshakes: list[Handshake] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def usage_for(self, model: str, kind: str | None = None) -> list[SentUsage]:
        """What was billable in sessions of `model` (delegated responses included), of `kind` if given."""
        sessions = {u.session_id for u in self.ledger if u.kind == SESSION_KIND and u.request_model == model}
        return [u for u in self.ledger if u.session_id in sessions and (kind is None or u.kind == kind)]

    async def start(self) -> None:
        self.listening(await serve(self._serve, self.host, self.port, process_request=self._check_handshake))

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        accepted = url.path.endswith("/live/sessions") or _ATTACH.search(url.path) is not None
        self.handshakes.append(
            Handshake(
                path=url.path,
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers=[(name.lower(), value) for name, value in request.headers.raw_items()],
                session_id=f"sess_{connection.id.hex[:16]}" if accepted else None,
            )
        )
        return None if accepted else connection.respond(HTTPStatus.NOT_FOUND, "not a GPT-Live path\n")

    async def _serve(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        attached = _ATTACH.search(urlsplit(ws.request.path).path)
        session = _Session(attached.group(1) if attached else f"sess_{ws.id.hex[:16]}", ws)
        if attached:
            session.model = SIDEBAND_MODEL
            await self._send(session, {"type": "session.updated", "session": self._resource(session)})
        try:
            async for frame in ws:
                try:
                    event = json.loads(frame)
                except ValueError:
                    await ws.close(1007, "invalid JSON")
                    break
                try:
                    if not await self._receive(session, event if isinstance(event, dict) else {}):
                        return
                except ConnectionClosed:
                    continue  # closed while answering: what the client sent before its close is still read
        except ConnectionClosed:
            pass
        self._ended(session, UNCLOSED)

    async def _receive(self, session: _Session, event: dict[str, Any]) -> bool:
        """Handle one client event; False once the session is over."""
        kind = event.get("type")
        if kind == "session.start":
            config = event.get("session") or {}
            session.model = str(config.get("model") or "unknown")
            delegation = config.get("delegation") or {}
            session.delegate = str((delegation.get("responses") or {}).get("model") or DEFAULT_DELEGATE)
            await self._send(session, {"type": "session.started", "session": self._resource(session)})
        elif kind == "session.input_audio.append":
            await self._tick(session)
        elif kind in ("session.input_audio.mute", "session.input_audio.unmute"):
            session.standby = kind.endswith(".mute")
            session.eligible = session.eligible or session.standby
            await self._send(session, {"type": "session.paused" if session.standby else "session.resumed"})
        elif kind == "response.create":
            await self._delegate(session)
        elif kind == "session.instructions.append":
            text = str(event.get("content") or "")
            if "sim_decrease" in text and session.reported is not None:
                lower = {"seconds": max(session.reported["seconds"] - 1, 0)}
                await self._send(session, {"type": "session.usage.updated", "usage": lower})
            if "sim_drop" in text:
                self._ended(session, UNCLOSED)
                await session.ws.close(1011, "simulated upstream failure")
                return False
            if "sim_expire" in text:
                return await self._close(session, "expired")
        elif kind == "session.close":
            return await self._close(session, "close_requested")
        return True

    async def _tick(self, session: _Session) -> None:
        before = session.active + session.paused
        if session.standby:
            session.paused += self.tick_seconds
        else:
            session.active += self.tick_seconds
        await self._send(session, {"type": "session.input_transcript.delta", "delta": HEARD} | self._timeline(before))
        await self._send(session, {"type": "session.output_audio.delta", "delta": _AUDIO})
        await self._send(session, {"type": "session.output_transcript.delta", "delta": SAID} | self._timeline(before))
        if (before + self.tick_seconds) // self.report_every > before // self.report_every:
            await self._send(session, {"type": "session.usage.updated", "usage": self._usage(session)})

    def _timeline(self, start: int) -> dict[str, int]:
        return {"start_ms": start * 1000, "end_ms": (start + self.tick_seconds) * 1000}

    def _usage(self, session: _Session) -> dict[str, Any]:
        """The cumulative usage now, `seconds` a float in every other report; it is recorded as sent."""
        seconds = session.active + session.paused
        session.reports += 1
        usage: dict[str, Any] = {"seconds": float(seconds) if session.reports % 2 == 0 else seconds}
        if session.eligible:
            usage |= {"active_seconds": session.active, "paused_seconds": session.paused}
        session.reported = usage
        return usage

    async def _delegate(self, session: _Session) -> None:
        session.delegations += 1
        response_id = f"resp_{session.id}_{session.delegations}"
        delegation_id = f"dlg_{session.id}_{session.delegations}"
        input_tokens = self._rng.randint(50, 4000)
        output_tokens = self._rng.randint(1, 800)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": self._rng.randint(0, input_tokens)},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": self._rng.randint(0, output_tokens)},
            "total_tokens": input_tokens + output_tokens,
        }
        self.ledger.append(
            SentUsage(session.id, RESPONSE_KIND, session.delegate, session.delegate, "completed", usage)
        )  # before sending, so that no reader sees usage the ledger lacks
        delegation = {"id": delegation_id, "type": "delegation", "target": "responses", "response_id": response_id}
        await self._send(session, {"type": "session.delegation.created", "delegation": delegation, "offset_ms": 0})
        response = {"id": response_id, "object": "response", "model": session.delegate}
        for inner in (
            {"type": "response.created", "response": response | {"status": "in_progress"}},
            {"type": "response.output_text.delta", "delta": "Done.", "item_id": "msg_1", "output_index": 0},
            {"type": "response.completed", "response": response | {"status": "completed", "usage": usage}},
        ):
            await self._send(session, {"type": "response.event", "delegation_id": delegation_id, "event": inner})

    async def _close(self, session: _Session, reason: str) -> bool:
        usage = self._usage(session)
        self._ended(session, reason)
        closed = {"type": "session.closed", "reason": reason, "session": self._resource(session), "usage": usage}
        with contextlib.suppress(ConnectionClosed):
            await self._send(session, closed)
            await session.ws.close(1000)
        return False

    def _ended(self, session: _Session, status: str) -> None:
        """The session's ledger entry, once: its last report as billed."""
        if session.reported is not None and not any(
            u.session_id == session.id and u.kind == SESSION_KIND for u in self.ledger
        ):
            model = session.model
            self.ledger.append(SentUsage(session.id, SESSION_KIND, model, model, status, dict(session.reported)))

    def _resource(self, session: _Session) -> dict[str, Any]:
        return {"id": session.id, "object": "live.session", "model": session.model, "status": "active", "expires_at": 0}

    async def _send(self, session: _Session, event: dict[str, Any]) -> None:
        session.events += 1
        await session.ws.send(json.dumps({"event_id": f"event_{session.events}"} | event))
        await asyncio.sleep(0)


def main(argv: Sequence[str] | None = None) -> None:
    make = lambda args: LiveSimulator(host=args.host, port=args.port, seed=args.seed)  # noqa: E731
    command_line("GPT-Live", make, argv, seed="seed of the delegated usage numbers")


if __name__ == "__main__":
    main()
