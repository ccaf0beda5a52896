"""Voice turns and response timing in the meters: which response answers which turn, what is measured from where."""

from __future__ import annotations

import pytest

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.items import FirstDelta, ResponseDone, ResponseRequested, ResponseStarted, TurnEnded
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.session_meters import RealtimeMeter, ResponsesSocketMeter
from ai_gateway.accounting.turns import MAX_TRACKED, ResponseClock
from ai_gateway.accounting.usage import TokenUsage

from .conftest import Records, sample_total

USAGE = TokenUsage(input=100, output=20)


def meter() -> tuple[RealtimeMeter, GatewayMetrics, Records]:
    metrics, records = GatewayMetrics("t"), Records()
    accounting = Accounting(metrics, observer=records)
    return RealtimeMeter(accounting, Source("flow", "Realtime"), "openai", "gpt-realtime"), metrics, records


def respond(m: RealtimeMeter, response_id: str, *before: object) -> None:
    for item in (
        *before,
        ResponseStarted(response_id),
        FirstDelta(response_id),
        ResponseDone(USAGE, response_id=response_id),
    ):
        m.apply(item)  # type: ignore[arg-type]


def count(metrics: GatewayMetrics, family: str, **labels: str) -> float:
    return sample_total(metrics, f"t_gen_ai_server_{family}_count", **labels)


def test_a_turn_is_answered_by_the_next_response_only():
    m, metrics, records = meter()
    respond(m, "r1", TurnEnded("speech_stopped"))  # server VAD: the upstream starts it by itself
    respond(m, "r2")  # out of band, no turn, no request: nothing to measure from
    respond(m, "r3", TurnEnded("commit"), ResponseRequested())
    first, second, third = records.responses
    assert first.turn_latency is not None and first.ttft == first.turn_latency  # TTFT from speech_stopped
    assert second.turn_latency is None and second.ttft is None and second.duration is not None
    assert third.turn_latency is not None and third.ttft is not None and third.turn_latency >= third.ttft
    assert count(metrics, "voice_turn_latency", turn_end="speech_stopped") == 1
    assert count(metrics, "voice_turn_latency", turn_end="commit") == 1
    assert count(metrics, "time_to_first_token") == 2
    assert m.totals.turn_latency == third.turn_latency and m.totals.ttft == third.ttft
    assert not m.in_flight


def test_the_latest_turn_end_counts_and_the_clock_is_bounded():
    clock = ResponseClock()
    clock.turn_ended("speech_stopped", 1.0)
    clock.turn_ended("speech_stopped", 2.0)  # the user went on speaking: the wait starts at the last stop
    assert clock.started("r1", None, 2.5) == 2.0
    assert clock.started("r2", None, 3.0) is None  # the turn was answered already
    timing = clock.finished("r1", (2.0, 2.4), 3.0)
    assert (timing.turn, timing.duration) == ("speech_stopped", 1.0)
    assert timing.ttft == timing.turn_latency == pytest.approx(0.4)
    for i in range(2 * MAX_TRACKED):
        clock.started(f"x{i}", 0.0, 0.0)  # started, never finished: a broken upstream
    assert len(clock.began) == MAX_TRACKED


def test_a_responses_websocket_response_lasts_from_its_request():
    records = Records()
    accounting = Accounting(GatewayMetrics("t"), observer=records)
    m = ResponsesSocketMeter(accounting, Source("flow", "Responses"), "openai", "gpt-4o")
    m.apply(ResponseDone(USAGE, response_id="resp_0"))  # no request seen: no duration to tell
    m.apply(ResponseRequested(model="gpt-4o-mini"))
    m.apply(ResponseDone(USAGE, response_id="resp_1", response_model="gpt-4o-mini-2024-07-18"))
    unasked, asked = records.responses
    assert unasked.duration is None and asked.duration is not None and asked.duration >= 0
    assert (asked.operation, asked.request_model, asked.usage) == ("chat", "gpt-4o-mini", USAGE)
