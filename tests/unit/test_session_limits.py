"""Session duration and idle limits (proxy/session_limits.py): which sessions the clock closes, and when."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow

from ai_gateway.config.policy import RateLimits
from ai_gateway.proxy import session_limits
from ai_gateway.proxy.session_limits import IDLE, REASONS, TOO_LONG, SessionClock


@pytest.fixture
def now(monkeypatch):
    """The clock's time, set by the test."""
    clock = [1000.0]
    monkeypatch.setattr(session_limits.time, "monotonic", lambda: clock[0])
    return clock


def test_a_session_without_time_limits_is_not_watched(now):
    clock = SessionClock()
    clock.watch(tflow.twebsocketflow(), RateLimits(requests_per_minute=10, concurrent_sessions=2))
    assert not clock.sessions


def test_a_session_past_its_duration_is_closed_once(now):
    clock, flow = SessionClock(), tflow.twebsocketflow()
    clock.watch(flow, RateLimits(max_session_seconds=60))
    now[0] += 59.9
    clock.touch(flow.id)
    assert clock.expired() == []
    now[0] += 0.1
    assert clock.expired() == [(flow, TOO_LONG)]
    assert clock.expired() == [] and not clock.sessions


def test_a_frame_puts_the_idle_limit_back(now):
    clock, flow = SessionClock(), tflow.twebsocketflow()
    clock.watch(flow, RateLimits(idle_session_seconds=10))
    for _ in range(5):
        now[0] += 9
        clock.touch(flow.id)
        assert clock.expired() == []
    now[0] += 10
    assert clock.expired() == [(flow, IDLE)]


def test_the_duration_limit_is_named_before_the_idle_one_and_only_due_sessions_close(now):
    clock, both, idle_only = SessionClock(), tflow.twebsocketflow(), tflow.twebsocketflow()
    clock.watch(both, RateLimits(max_session_seconds=30, idle_session_seconds=30))
    clock.watch(idle_only, RateLimits(idle_session_seconds=60))
    now[0] += 30
    assert clock.expired() == [(both, TOO_LONG)]
    assert list(clock.sessions) == [idle_only.id]
    clock.forget(idle_only.id)
    clock.touch(idle_only.id)  # a frame after its end: nothing to do
    assert not clock.sessions
    assert set(REASONS) == {TOO_LONG, IDLE}
