"""GPT-Live's adapter and meter: cumulative seconds differenced, never summed; delegated usage under its model."""

from __future__ import annotations

import json

import pytest

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.items import Malformed, ResponseDone, SessionModels, SessionTime
from ai_gateway.accounting.ledger import Source, UsageLedger
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.pricing import catalog_for
from ai_gateway.accounting.session_meters import LiveMeter, increase
from ai_gateway.accounting.usage import InvalidUsage, SessionSeconds
from ai_gateway.protocols.openai_live import LiveProtocol
from ai_gateway.protocols.usage_fields import parse_session_usage

from .conftest import sample_total


def frame(event: dict) -> bytes:
    return json.dumps(event).encode()


def test_the_adapter_reads_the_model_reports_and_delegated_usage():
    live = LiveProtocol()
    start = {"type": "session.start", "session": {"model": "gpt-live-1.1"}}
    assert live.client_frame(frame(start), True) == SessionModels("gpt-live-1.1", None)
    assert live.client_frame(frame({"type": "session.input_audio.append", "audio": "AAAA"}), True) is None
    started = {"type": "session.started", "event_id": "e1", "session": {"id": "sess_1", "model": "gpt-live-1.1"}}
    assert live.server_frame(frame(started), True) == SessionModels("gpt-live-1.1", None, "sess_1")
    report = {"type": "session.usage.updated", "usage": {"seconds": 60.0, "active_seconds": 20, "paused_seconds": 40}}
    assert live.server_frame(frame(report), True) == SessionTime(SessionSeconds(20.0, 40.0))
    closed = {"type": "session.closed", "reason": "expired", "session": {}, "usage": {"seconds": 61}}
    assert live.server_frame(frame(closed), True) == SessionTime(SessionSeconds(61.0), closed="expired")
    assert live.server_frame(frame({"type": "session.output_audio.delta", "delta": "AAAA"}), True) is None
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 5}
    completed = {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5-mini", "usage": usage}}
    done = live.server_frame(frame({"type": "response.event", "delegation_id": "d1", "event": completed}), True)
    assert isinstance(done, ResponseDone) and done.usage is not None
    assert (done.response_model, done.response_id, done.usage.input, done.usage.cache_read) == (
        "gpt-5-mini",
        "resp_1",
        10,
        4,
    )
    delta = {"type": "response.event", "event": {"type": "response.output_text.delta", "delta": "x"}}
    assert live.server_frame(frame(delta), True) is None


@pytest.mark.parametrize(
    "usage",
    [{"seconds": True}, {"seconds": -1}, {"seconds": "5"}, {"seconds": 10, "active_seconds": 4, "paused_seconds": 5}],
)
def test_a_usage_object_is_taken_whole_or_not_at_all(usage):
    with pytest.raises(InvalidUsage):
        parse_session_usage(usage)
    report = frame({"type": "session.usage.updated", "usage": usage})
    assert isinstance(LiveProtocol().server_frame(report, True), Malformed)


def test_only_the_increase_of_a_report_is_billed():
    assert increase(SessionSeconds(3.0), SessionSeconds(5.0)) == SessionSeconds(2.0)
    assert increase(SessionSeconds(5.0), SessionSeconds(4.0)) is None
    # A report without the breakdown after one with paused time: its growth is active time.
    assert increase(SessionSeconds(20.0, 40.0), SessionSeconds(65.0)) == SessionSeconds(5.0, 0.0)
    assert increase(SessionSeconds(20.0, 40.0), SessionSeconds(50.0)) is None


def test_the_meter_differences_reports_and_writes_one_ledger_line(tmp_path):
    metrics = GatewayMetrics("agentgateway")
    ledger = UsageLedger(str(tmp_path / "usage.jsonl"))
    accounting = Accounting(metrics, ledger, catalog_for("openai", None))
    meter = LiveMeter(accounting, Source("f1", "Realtime", session=True), "openai", "unknown")
    meter.apply(SessionModels("gpt-live-1.1", None, "sess_1"))
    for usage in (SessionSeconds(3.0), SessionSeconds(6.0), SessionSeconds(5.0), SessionSeconds(6.0, 6.0)):
        meter.apply(SessionTime(usage))
    seconds = "agentgateway_gen_ai_client_session_seconds_total"
    assert sample_total(metrics, seconds, kind="active", gen_ai_request_model="gpt-live-1.1") == 6.0
    assert sample_total(metrics, seconds, kind="paused") == 6.0
    assert sample_total(metrics, "agentgateway_gateway_parse_errors_total", reason="usage_decreased") == 1
    cost = sample_total(metrics, "agentgateway_gen_ai_client_cost_usd_total", gen_ai_request_model="gpt-live-1.1")
    assert cost == pytest.approx((6 * 0.05 + 6 * 0.02) / 60)
    assert not (tmp_path / "usage.jsonl").read_text()  # the line comes when the session ends
    assert "12 s of session" in meter.totals.summary() and f"${cost:,.4f}" in meter.totals.summary()
    meter.close()
    meter.close()
    (line,) = [json.loads(raw) for raw in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert (line["status"], line["response_id"], line["session_seconds"], line["paused_seconds"]) == (
        "unclosed",
        "sess_1",
        12.0,
        6.0,
    )
    assert line["cost_usd"] == pytest.approx(cost)
    record = meter.ended(1000, True, "")
    assert (record.session_seconds, record.close_reason, record.cost) == (12.0, "unclosed", pytest.approx(cost))


def test_nothing_is_billed_after_the_final_report():
    metrics = GatewayMetrics("agentgateway")
    meter = LiveMeter(Accounting(metrics), Source("f1", "Realtime", session=True), "openai", "gpt-live-1")
    meter.apply(SessionTime(SessionSeconds(9.0), closed="close_requested"))
    meter.apply(SessionTime(SessionSeconds(12.0)))
    assert sample_total(metrics, "agentgateway_gen_ai_client_session_seconds_total", kind="active") == 9.0
