"""What the session and HTTP guardrails share: running a list of guards on some text (regex in
the hook, services off it), counting each check, and noting blocks, warnings and errors on the
flow (mitmweb's mark and comment, the record the access log and traces read).

Each guardrail addon holds a `GuardChecks` of its own (its service calls, their connections), shut down when done.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mitmproxy import http

from ai_gateway.accounting.guard_service import SHUTTING_DOWN, GuardClients, went_wrong
from ai_gateway.accounting.observer import GuardrailBlock
from ai_gateway.accounting.session_meters import SessionMeter
from ai_gateway.config.guardrails import (
    Guard,
    GuardrailPolicy,
    Phase,
    Verdict,
    check_regex,
    failed,
    first_block,
    normalise,
)
from ai_gateway.proxy.injection import Links
from ai_gateway.proxy.state import CLIENT_KEY_METADATA, GatewayState

GUARDRAIL_METADATA = "ai_gateway.guardrails"  # what guards did on a flow: its comment in mitmweb
BLOCKED_METADATA = "ai_gateway.guardrail_blocked"  # the last block on a flow: (guard, phase, action)
MAX_PENDING_CHECKS = 32  # service calls in flight per session; beyond, a check is an error verdict

logger = logging.getLogger(__name__)


@dataclass
class Asker:
    """What a guard service is told besides the text, and the calls in flight for one flow."""

    context: dict[str, str]
    pending: int = 0


def asker(flow: http.HTTPFlow, route: str) -> Asker:
    return Asker(
        {
            "session": flow.id,
            "client_key_name": flow.metadata.get(CLIENT_KEY_METADATA, ""),
            "model": flow.request.query.get("model", ""),
            "route": route,
        }
    )


@dataclass
class GuardedSession:
    """A WebSocket session's guards, each phase's, and how often each guard blocked it."""

    guards: GuardrailPolicy
    asker: Asker
    inputs: tuple[Guard, ...] = ()
    outputs: tuple[Guard, ...] = ()
    blocks: dict[str, int] = field(default_factory=dict)
    meter: SessionMeter | None = None  # told of blocks, for the session's and responses' records

    def __post_init__(self) -> None:
        self.inputs = self.guards.for_phase(Phase.INPUT)
        self.outputs = self.guards.for_phase(Phase.OUTPUT)


class GuardChecks:
    def __init__(self, state: GatewayState, links: Links | None = None) -> None:
        self.state = state
        self.links = links or Links()  # closes a session (max_blocks) on whichever path it is relayed
        self.clients = GuardClients()  # pooled connections to the guard services
        self.closing = False  # set at shutdown: verdicts arriving since are nobody's business

    def shutdown(self) -> Awaitable[None] | None:
        """At `done`: the service calls in flight ended, the moderation batches still lingering
        and their connections closed (awaited by mitmproxy's shutdown); what they were asked for is
        then neither counted nor acted on."""
        self.closing = True
        return self.clients.close() if self.clients.busy else None

    def regex(self, guards: Iterable[Guard], phase: Phase, normalised: str, start: int = 0) -> list[Verdict]:
        """The regex guards' verdicts, decided here and now (services are asked by `decide` and `ask_later`)."""
        verdicts = []
        for guard in guards:
            if not guard.remote:
                began = time.perf_counter()
                verdict = check_regex(guard, normalised, start)
                self.state.accounting.guardrail_checked(guard.name, phase, verdict.outcome, time.perf_counter() - began)
                verdicts.append(verdict)
        return verdicts

    def decide(
        self,
        flow: http.HTTPFlow,
        asker: Asker,
        guards: Iterable[Guard],
        phase: Phase,
        text: str,
        refuse: Callable[[Verdict], None],
    ) -> Awaitable[None] | None:
        """Text that waits for its verdict (user text, an HTTP request or whole response): a regex
        guard's block refuses it here and now; service guards are asked, and the awaitable is done
        once they answered (each within its timeout), having refused it on a block."""
        verdicts = self.regex(guards, phase, normalise(text))
        if block := first_block(verdicts):
            refuse(block)
            return None
        self.noted(flow, verdicts, phase)
        remote = [g for g in guards if g.remote]
        return self.decided(flow, asker, remote, phase, text, refuse) if remote else None

    async def decided(
        self,
        flow: http.HTTPFlow,
        asker: Asker,
        guards: list[Guard],
        phase: Phase,
        text: str,
        refuse: Callable[[Verdict], None],
    ) -> None:
        verdicts = await self.ask_all(asker, guards, phase, text)
        if block := first_block(verdicts):
            refuse(block)
        else:
            self.noted(flow, verdicts, phase)

    async def ask_all(self, asker: Asker, guards: Iterable[Guard], phase: Phase, text: str) -> list[Verdict]:
        """The services' verdicts on text the relay holds until they are in (`decide`): none of its
        checks lingers for a moderation batch."""
        guards = tuple(guards)
        if len(guards) == 1:  # the usual case: no task of its own for the one check
            return [await self.ask_one(asker, guards[0], phase, text)]
        return list(await asyncio.gather(*(self.ask_one(asker, g, phase, text) for g in guards)))

    async def ask_one(self, asker: Asker, guard: Guard, phase: Phase, text: str) -> Verdict:
        began = time.perf_counter()
        if asker.pending >= MAX_PENDING_CHECKS:
            verdict = failed(guard, "too many checks in flight")
        else:
            asker.pending += 1
            try:
                verdict = await self.clients.ask(guard, text, {**asker.context, "phase": phase.value}, held=True)
            finally:
                asker.pending -= 1
        self.state.accounting.guardrail_checked(guard.name, phase, verdict.outcome, time.perf_counter() - began)
        return verdict

    def ask_later(
        self, asker: Asker, guards: Sequence[Guard], phase: Phase, text: str, then: Callable[[list[Verdict]], None]
    ) -> None:
        """The services asked about text already relayed (a window of output, a transcript), and
        `then` given their verdicts, in the guards' order, once all are in. Most frames of a guarded
        session are relayed while such checks run, so they cost no task: a callback on each call's
        future (for moderation, its batch's)."""
        gathered = Gathered(phase, time.perf_counter(), then, [None] * len(guards), len(guards))
        context = {**asker.context, "phase": phase.value}
        for index, guard in enumerate(guards):
            if asker.pending >= MAX_PENDING_CHECKS:
                self.answered(gathered, index, guard, failed(guard, "too many checks in flight"))
                continue
            asker.pending += 1
            call = self.clients.soon(guard, text, context)
            call.add_done_callback(functools.partial(self.called, asker, gathered, index, guard))

    def called(self, asker: Asker, gathered: Gathered, index: int, guard: Guard, call: asyncio.Future[Verdict]) -> None:
        """A call done: its verdict (the clients make every failure one; what else ends a call is an error)."""
        asker.pending -= 1
        if call.cancelled():
            verdict = failed(guard, SHUTTING_DOWN)
        elif (error := call.exception()) is not None:
            logger.error("ai-gateway: a guardrail check failed: %r", error)
            verdict = went_wrong(guard, error)
        else:
            verdict = call.result()
        self.answered(gathered, index, guard, verdict)

    def answered(self, gathered: Gathered, index: int, guard: Guard, verdict: Verdict) -> None:
        """One guard's verdict in, counted and timed; the last one in hands them all over."""
        if self.closing:
            return
        elapsed = time.perf_counter() - gathered.began
        self.state.accounting.guardrail_checked(guard.name, gathered.phase, verdict.outcome, elapsed)
        gathered.verdicts[index] = verdict
        gathered.left -= 1
        if gathered.left == 0:
            try:
                gathered.then(gathered.verdicts)  # type: ignore[arg-type]  # none left None
            except Exception:
                logger.exception("ai-gateway: acting on a guardrail verdict failed")

    def noted(self, flow: http.HTTPFlow, verdicts: Iterable[Verdict], phase: Phase, detail: str = "") -> None:
        """Blocks, warnings and errors marked on the flow and kept for its comment; a block is also
        kept for the flow's records (access log, trace)."""
        for verdict in verdicts:
            if not verdict.marks:
                continue
            notes = flow.metadata.setdefault(GUARDRAIL_METADATA, [])
            text = f"guardrail {verdict.guard}: {verdict.outcome}" + (f" ({detail})" if detail else "")
            if len(notes) < 20:
                notes.append(text)
            if verdict.blocks:
                flow.metadata[BLOCKED_METADATA] = (verdict.guard, phase.value, verdict.outcome)
            flow.marked = ":no_entry:" if verdict.blocks else ":warning:"
            flow.comment = guard_comment(flow, flow.comment)
            logger.info("ai-gateway: %s on %s (%s)", text, flow.id, verdict.reason)

    def blocked(
        self,
        flow: http.HTTPFlow,
        session: GuardedSession,
        verdict: Verdict,
        phase: Phase,
        detail: str = "",
        response_ids: Iterable[str] = (),
    ) -> bool:
        """A block on a session (on the responses it cancelled, with their ids), noted and told to
        the session's meter; True when it is one more than the guard's max_blocks allow: the session
        is then closed with 1008."""
        self.noted(flow, [verdict], phase, detail)
        told(session, verdict, phase, *response_ids)
        count = session.blocks[verdict.guard] = session.blocks.get(verdict.guard, 0) + 1
        limit = session.guards.max_blocks(verdict.guard)
        if limit is None or count <= limit:
            return False
        self.close(flow, verdict, f"blocked this session {count} times")
        return True

    def close(self, flow: http.HTTPFlow, verdict: Verdict, why: str) -> None:
        """The session closed with 1008 on both legs, the guard and why in the close reason."""
        reason = f"guardrail {verdict.guard!r} {why}"
        if self.links.close(flow, 1008, reason):
            flow.metadata.setdefault(GUARDRAIL_METADATA, []).append(f"guardrail {verdict.guard}: closed the session")
            flow.comment = guard_comment(flow, flow.comment)
            logger.info("ai-gateway: closed %s: %s", flow.id, reason)


@dataclass
class Gathered:
    """The verdicts of one `ask_later`, as its guards' calls answer."""

    phase: Phase
    began: float
    then: Callable[[list[Verdict]], None]
    verdicts: list[Verdict | None]
    left: int


def told(session: GuardedSession, verdict: Verdict, phase: Phase, *response_ids: str) -> None:
    """A block told to the session's meter: the session's record says so, and each response's it
    cancelled (none: the session's alone)."""
    if session.meter is not None:
        block = GuardrailBlock(verdict.guard, phase.value, verdict.outcome)
        for response_id in response_ids or (None,):
            session.meter.guardrail_blocked(block, response_id)


def guardrail_block(flow: http.HTTPFlow) -> GuardrailBlock | None:
    """The last guard block on an HTTP flow, for its record."""
    kept = flow.metadata.get(BLOCKED_METADATA)
    return GuardrailBlock(*kept) if kept else None


def guard_comment(flow: http.HTTPFlow, comment: str) -> str:
    """A flow's comment with what its guards did after it (mitmweb's comment column)."""
    notes = flow.metadata.get(GUARDRAIL_METADATA)
    if not notes:
        return comment
    base = comment.split(" | guardrail ", 1)[0]
    return " | ".join([base, *notes[-3:]]) if base else " | ".join(notes[-3:])


def blocked_message(verdict: Verdict, phase: Phase, request: str = "your message") -> str:
    """What a client is told of a block, the guard named."""
    what = request if phase is Phase.INPUT else "the response"
    return f"The gateway's guardrail {verdict.guard!r} blocked {what}."
