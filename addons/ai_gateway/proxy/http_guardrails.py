"""Guardrails on HTTP requests and responses (Chat, Responses, legacy Completions).

The user's messages are checked before the request goes upstream (a block answers 400), a whole
response before it reaches the client (replaced by a 400), a streamed one a window at a time (a
block ends what the client gets with an error event). HttpMetering calls `check_request`,
`check_response_headers` and `check_response` around its own reading, so that what a guard
drops is metered all the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable

from mitmproxy import http

from ai_gateway.config.guardrails import BLOCKED_CODE, Guard, Phase, Verdict, first_block
from ai_gateway.config.policy import Route
from ai_gateway.protocols.guard_text import GUARDED_HTTP, SseText, Window, request_text, response_text, sse_error
from ai_gateway.protocols.openai_http import decoded
from ai_gateway.proxy.guard_checks import GuardChecks, asker, blocked_message
from ai_gateway.proxy.state import GatewayState

logger = logging.getLogger(__name__)


class HttpGuardrails:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.checks = GuardChecks(state)

    def done(self) -> Awaitable[None] | None:
        return self.checks.shutdown()

    def guards(self, route: Route, phase: Phase) -> tuple[Guard, ...]:
        if self.state.policy is None or route.type not in GUARDED_HTTP:
            return ()
        return self.state.policy.guardrails_for(route).for_phase(phase)

    def check_request(self, flow: http.HTTPFlow, route: Route) -> Awaitable[None] | None:
        """A request's user text, before it goes upstream: a block answers it 400. Only a request
        with webhook or moderation guards waits (at most their timeout_ms)."""
        guards = self.guards(route, Phase.INPUT)
        if not guards:
            return None
        text = request_text(route.type, body_of(flow.request, self.state.max_body_bytes))
        if not text:
            return None
        return self.check_whole(flow, route, guards, Phase.INPUT, text)

    def check_response_headers(self, flow: http.HTTPFlow, route: Route) -> None:
        """A streamed (SSE) response's text checked a window at a time as it passes; a block ends
        what the client gets with an error event. Compressed streams pass unchecked."""
        response = flow.response
        guards = self.guards(route, Phase.OUTPUT)
        if not guards or response is None or "content-encoding" in response.headers:
            return
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return
        inner = response.stream if callable(response.stream) else None
        stream = GuardedStream(self.checks, flow, route, guards)
        response.stream = lambda chunk: stream.filter(inner(chunk) if inner is not None else chunk)  # type: ignore[arg-type]

    def check_response(self, flow: http.HTTPFlow, route: Route) -> Awaitable[None] | None:
        """A whole response's text, before it reaches the client: a block replaces it by a 400."""
        response = flow.response
        guards = self.guards(route, Phase.OUTPUT)
        if not guards or response is None or response.stream or not 200 <= response.status_code < 300:
            return None
        text = response_text(route.type, body_of(response, self.state.max_body_bytes))
        if not text:
            return None
        return self.check_whole(flow, route, guards, Phase.OUTPUT, text)

    def check_whole(
        self, flow: http.HTTPFlow, route: Route, guards: tuple[Guard, ...], phase: Phase, text: str
    ) -> Awaitable[None] | None:
        """A request's or a whole response's text: regex guards decide at once; an awaitable
        while services are asked."""
        return self.checks.decide(
            flow, asker(flow, route.suffix), guards, phase, text, lambda verdict: self.refuse(flow, verdict, phase)
        )

    def refuse(self, flow: http.HTTPFlow, verdict: Verdict, phase: Phase) -> None:
        """The request answered, or the response replaced, by a 400."""
        flow.response = blocked_response(verdict, phase)
        self.checks.noted(flow, [verdict], phase)


class GuardedStream:
    """One SSE response's text as it passes: windows checked, and after a block nothing more."""

    def __init__(self, checks: GuardChecks, flow: http.HTTPFlow, route: Route, guards: tuple[Guard, ...]) -> None:
        self.checks = checks
        self.flow = flow
        self.route = route
        self.guards = guards
        self.remote = [g for g in guards if g.remote]
        self.asker = asker(flow, route.suffix)
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
        return sse_error(self.route.type, BLOCKED_CODE, blocked_message(self.block, Phase.OUTPUT))

    def check(self, chunk: bytes) -> None:
        windows = self.window.feed(self.sse.feed(chunk)) if chunk else self.window.flush()
        for normalised, start in windows:
            verdicts = self.checks.regex(self.guards, Phase.OUTPUT, normalised, start)
            if block := first_block(verdicts):
                self.blocked(block)
                return
            self.checks.noted(self.flow, verdicts, Phase.OUTPUT)
            if self.remote and normalised[start:].strip():
                self.checks.ask_later(self.asker, self.remote, Phase.OUTPUT, normalised[start:], self.checked)

    def checked(self, verdicts: list[Verdict]) -> None:
        if (block := first_block(verdicts)) and self.block is None:
            self.blocked(block)
        else:
            self.checks.noted(self.flow, verdicts, Phase.OUTPUT)

    def blocked(self, verdict: Verdict) -> None:
        self.block = verdict
        self.checks.noted(self.flow, [verdict], Phase.OUTPUT)


def body_of(message: http.Message, limit: int) -> bytes:
    """A body decoded within `limit`; empty when it cannot be (then there is nothing to check)."""
    body = decoded(message.raw_content or b"", message.headers.get("content-encoding", ""), limit)
    return body if isinstance(body, bytes) else b""


def blocked_response(verdict: Verdict, phase: Phase) -> http.Response:
    """What an HTTP client gets for a blocked request or response: 400, OpenAI-shaped."""
    message = blocked_message(verdict, phase, "the request")
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": BLOCKED_CODE}
    return http.Response.make(400, json.dumps({"error": error}), {"content-type": "application/json"})
