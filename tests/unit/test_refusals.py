"""What a refused client sees (proxy/refusals.py): OpenAI-shaped errors, 429 or 503, retry-after in whole seconds."""

from __future__ import annotations

import json

import pytest

from ai_gateway.accounting.ledger import USAGE_LOG
from ai_gateway.accounting.limits import BUDGET_EXCEEDED, CLIENT_KEY, RATE_LIMITED, SESSION, Refusal
from ai_gateway.accounting.shared_limits import STORE, STORE_UNAVAILABLE
from ai_gateway.proxy.refusals import (
    MESSAGES,
    ambiguous_path_response,
    refusal_event,
    refusal_response,
    unknown_key_response,
)


@pytest.mark.parametrize(
    "refusal, status, kind, retry_after",
    [
        (Refusal(CLIENT_KEY, RATE_LIMITED, retry_after=0.2), 429, RATE_LIMITED, "1"),  # at least one second
        (Refusal(CLIENT_KEY, BUDGET_EXCEEDED, retry_after=3600.5), 429, BUDGET_EXCEEDED, "3601"),  # rounded up
        (Refusal(SESSION, BUDGET_EXCEEDED), 429, BUDGET_EXCEEDED, None),
        (Refusal(USAGE_LOG, "usage_log_unavailable"), 503, "server_error", None),  # the gateway's fault
        (Refusal(STORE, STORE_UNAVAILABLE, retry_after=2), 503, "server_error", "2"),
    ],
)
def test_a_refused_request_gets_an_openai_error(refusal, status, kind, retry_after):
    response = refusal_response(refusal)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("retry-after") == retry_after
    error = json.loads(response.content)["error"]
    assert error == {
        "message": MESSAGES[refusal.scope, refusal.code],
        "type": kind,
        "param": None,
        "code": refusal.code,
    }


def test_an_unknown_refusal_still_says_the_gateway_refused():
    error = json.loads(refusal_response(Refusal("elsewhere", "new_code")).content)["error"]
    assert (error["message"], error["code"]) == ("The gateway refused the request.", "new_code")


def test_a_refused_response_create_is_an_error_event_naming_the_client_event():
    event = json.loads(refusal_event(Refusal(SESSION, BUDGET_EXCEEDED), b'{"type":"response.create","event_id":"e7"}'))
    assert event["type"] == "error" and event["event_id"].startswith("event_gateway_")
    assert event["error"] == {
        "type": "invalid_request_error",
        "code": BUDGET_EXCEEDED,
        "message": MESSAGES[SESSION, BUDGET_EXCEEDED],
        "param": None,
        "event_id": "e7",
    }


def test_a_refusal_that_is_the_gateways_fault_is_a_server_error_event_and_needs_no_client_event():
    error = json.loads(refusal_event(Refusal(STORE, STORE_UNAVAILABLE)))["error"]
    assert (error["type"], error["event_id"]) == ("server_error", None)


def test_bad_paths_and_unknown_keys_are_invalid_requests():
    path = ambiguous_path_response("an encoded slash")
    key = unknown_key_response()
    assert (path.status_code, key.status_code) == (400, 401)
    path_error, key_error = json.loads(path.content)["error"], json.loads(key.content)["error"]
    assert path_error["message"] == "The gateway refused the request path: an encoded slash."
    assert (path_error["type"], path_error["code"]) == ("invalid_request_error", "invalid_path")
    assert (key_error["type"], key_error["code"]) == ("invalid_request_error", "invalid_api_key")
