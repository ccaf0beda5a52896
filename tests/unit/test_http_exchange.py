"""One HTTP exchange's accounting (accounting/http_exchange.py): billed once, its latencies, what never came."""

from __future__ import annotations

import pytest

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.http_exchange import HttpExchange
from ai_gateway.accounting.items import FirstDelta, Malformed, ResponseDone, SpeechInput
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.usage import TokenUsage

from .conftest import Records, sample_total

USAGE = TokenUsage(input=10, output=5)


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics("t")


@pytest.fixture
def records() -> Records:
    return Records()


@pytest.fixture
def exchange(metrics, records) -> HttpExchange:
    accounting = Accounting(metrics, observer=records)
    return HttpExchange(accounting, Source("f1", "ChatCompletions", "team-a"), "chat", "openai", "gpt-4o")


def test_a_streamed_response_bills_its_usage_once_with_its_latencies(exchange, metrics, records):
    exchange.streamed = True
    exchange.apply(FirstDelta())
    first_token = exchange.first_token
    exchange.apply(FirstDelta())  # only the first delta counts
    assert exchange.first_token == first_token is not None
    exchange.apply(ResponseDone(USAGE, response_id="r1", response_model="gpt-4o-2024"))
    exchange.finish("", 200)
    labels = {"gen_ai_request_model": "gpt-4o", "gen_ai_response_model": "gpt-4o-2024"}
    assert sample_total(metrics, "t_gen_ai_client_token_usage_sum", gen_ai_token_type="input", **labels) == 10
    assert sample_total(metrics, "t_gen_ai_client_token_usage_sum", gen_ai_token_type="output", **labels) == 5
    assert sample_total(metrics, "t_gen_ai_server_request_duration_count", error_type="", **labels) == 1
    assert sample_total(metrics, "t_gen_ai_server_time_to_first_token_count", **labels) == 1
    assert sample_total(metrics, "t_gen_ai_server_time_per_output_token_count", **labels) == 1
    (record,) = records.responses
    assert (record.flow_id, record.client_key, record.response_id, record.status) == ("f1", "team-a", "r1", "completed")
    assert (record.usage, record.http_status, record.event) == (USAGE, 200, "request")
    assert record.ttft is not None and record.duration is not None and 0 <= record.ttft <= record.duration


def test_a_second_usage_is_a_parse_error_and_bills_nothing_more(exchange, metrics):
    exchange.apply(ResponseDone(USAGE))
    exchange.apply(ResponseDone(TokenUsage(input=1000, output=1000)))
    assert sample_total(metrics, "t_gateway_parse_errors_total", reason="duplicate_usage") == 1
    assert sample_total(metrics, "t_gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 10


def test_a_response_without_readable_usage_counts_and_bills_nothing(exchange, metrics, records):
    exchange.apply(ResponseDone(None, status="completed", unread="invalid_usage"))
    exchange.finish("")
    assert sample_total(metrics, "t_gen_ai_client_responses_total", status="completed") == 1
    assert sample_total(metrics, "t_gateway_parse_errors_total", reason="invalid_usage") == 1
    assert sample_total(metrics, "t_gen_ai_client_token_usage_count") == 0
    assert records.responses[0].usage is None


@pytest.mark.parametrize("finished, reason", [(True, "missing_usage"), (False, "truncated")])
def test_a_stream_that_ends_without_usage_is_counted(exchange, metrics, finished, reason):
    exchange.streamed, exchange.stream_finished = True, finished
    exchange.finish("")
    assert sample_total(metrics, "t_gateway_parse_errors_total", route_type="ChatCompletions", reason=reason) == 1


def test_an_unreadable_stream_is_not_counted_twice(exchange, metrics):
    exchange.streamed, exchange.stream_unread = True, True
    exchange.apply(Malformed("invalid_json", "a broken event"))
    exchange.finish("")
    assert sample_total(metrics, "t_gateway_parse_errors_total") == 1


def test_a_failed_exchange_counts_its_error_type(exchange, metrics, records):
    exchange.finish("timeout")
    assert sample_total(metrics, "t_gateway_upstream_errors_total", error_type="timeout") == 1
    assert sample_total(metrics, "t_gen_ai_server_request_duration_count", error_type="timeout") == 1
    assert sample_total(metrics, "t_gen_ai_server_time_to_first_token_count") == 0  # nothing came
    assert (records.responses[0].status, records.responses[0].error_type) == ("timeout", "timeout")


def test_speech_bills_its_characters_when_the_audio_came(exchange, metrics, records):
    exchange.apply(SpeechInput(42))
    exchange.finish("")
    assert sample_total(metrics, "t_gen_ai_client_speech_input_characters_total") == 42
    assert sample_total(metrics, "t_gen_ai_client_responses_total", status="completed") == 1


def test_speech_that_failed_bills_nothing(exchange, metrics):
    exchange.apply(SpeechInput(42))
    exchange.finish("connection_error")
    assert sample_total(metrics, "t_gen_ai_client_speech_input_characters_total") == 0
