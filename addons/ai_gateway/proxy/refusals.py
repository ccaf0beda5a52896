"""What clients see when a budget refuses them: OpenAI-shaped errors, so SDKs surface them as usual."""

from __future__ import annotations

import json
import uuid

from mitmproxy import http

from ai_gateway.accounting.budget import CLIENT_KEY, SESSION
from ai_gateway.accounting.ledger import USAGE_LOG
from ai_gateway.protocols.openai_http import decode_json

BUDGET_MESSAGES = {
    SESSION: "This session's budget is used up: the gateway refused the response.",
    CLIENT_KEY: "This API key's budget for the current window is used up: the gateway refused the request.",
    USAGE_LOG: "The gateway cannot record usage right now (its usage ledger cannot be written): retry later.",
}
# (HTTP status, error type, code): a ledger that cannot be written is the gateway's fault, and passes.
REFUSALS = {
    SESSION: (429, "budget_exceeded", "budget_exceeded"),
    CLIENT_KEY: (429, "budget_exceeded", "budget_exceeded"),
    USAGE_LOG: (503, "server_error", "usage_log_unavailable"),
}


def budget_error_event(scope: str, client_event: bytes) -> bytes:
    """A well-formed Realtime `error` event, naming the refused client event as OpenAI's errors do."""
    refused = decode_json(client_event)
    event_id = refused.get("event_id") if isinstance(refused, dict) else None
    kind = "server_error" if scope == USAGE_LOG else "invalid_request_error"
    error = {"type": kind, "code": REFUSALS[scope][2], "message": BUDGET_MESSAGES[scope]}
    event = {
        "type": "error",
        "event_id": f"event_gateway_{uuid.uuid4().hex[:12]}",
        "error": {**error, "param": None, "event_id": event_id},
    }
    return json.dumps(event).encode()


def budget_response(scope: str) -> http.Response:
    """HTTP over budget: 429 with an OpenAI-shaped error body (503 while usage cannot be recorded)."""
    status, kind, code = REFUSALS[scope]
    error = {"message": BUDGET_MESSAGES[scope], "type": kind, "param": None, "code": code}
    headers = {"content-type": "application/json"}
    if scope == USAGE_LOG:
        headers["retry-after"] = "1"
    return http.Response.make(status, json.dumps({"error": error}), headers)
