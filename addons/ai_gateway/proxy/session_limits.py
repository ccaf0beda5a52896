"""Session duration and idle limits: a session past `max_session_seconds`, or without a frame for
`idle_session_seconds`, is closed by the gateway with close code 1008 (policy violation).

The limits are per client key (`limits.client_key` in the policy); a clock checked once a second
is enough for limits counted in seconds, and keeps the per-frame work to one timestamp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mitmproxy import http

from ai_gateway.config.policy import RateLimits

TOO_LONG = "session_too_long"
IDLE = "session_idle"
REASONS = {TOO_LONG: "session longer than the gateway allows", IDLE: "session idle longer than the gateway allows"}


@dataclass
class Timed:
    flow: http.HTTPFlow
    started: float
    last_frame: float
    max_seconds: float | None
    idle_seconds: float | None

    def expired(self, now: float) -> str | None:
        if self.max_seconds is not None and now - self.started >= self.max_seconds:
            return TOO_LONG
        if self.idle_seconds is not None and now - self.last_frame >= self.idle_seconds:
            return IDLE
        return None


class SessionClock:
    """The open sessions that have a duration or idle limit."""

    def __init__(self) -> None:
        self.sessions: dict[str, Timed] = {}

    def watch(self, flow: http.HTTPFlow, limits: RateLimits) -> None:
        if limits.max_session_seconds is not None or limits.idle_session_seconds is not None:
            now = time.monotonic()
            self.sessions[flow.id] = Timed(flow, now, now, limits.max_session_seconds, limits.idle_session_seconds)

    def touch(self, flow_id: str) -> None:
        if (timed := self.sessions.get(flow_id)) is not None:
            timed.last_frame = time.monotonic()

    def forget(self, flow_id: str) -> None:
        self.sessions.pop(flow_id, None)

    def expired(self) -> list[tuple[http.HTTPFlow, str]]:
        """Sessions past a limit now, with the limit's name; each is forgotten (closed once)."""
        now = time.monotonic()
        due = [(timed.flow, reason) for timed in self.sessions.values() if (reason := timed.expired(now))]
        for flow, _ in due:
            self.forget(flow.id)
        return due
