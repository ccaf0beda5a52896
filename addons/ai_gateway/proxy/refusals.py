"""What clients see when a budget refuses them: OpenAI-shaped errors, so SDKs surface them as usual."""

from __future__ import annotations

import json
import uuid

from mitmproxy import http

from ai_gateway.accounting.budget import CLIENT_KEY, SESSION
from ai_gateway.protocols.openai_http import decode_json

BUDGET_MESSAGES = {
    SESSION: "This session's budget is used up: the gateway refused the response.",
    CLIENT_KEY: "This API key's budget for the current window is used up: the gateway refused the request.",
}


def budget_error_event(scope: str, client_event: bytes) -> bytes:
    """A well-formed Realtime `error` event, naming the refused client event as OpenAI's errors do."""
    refused = decode_json(client_event)
    event_id = refused.get("event_id") if isinstance(refused, dict) else None
    error = {"type": "invalid_request_error", "code": "budget_exceeded", "message": BUDGET_MESSAGES[scope]}
    event = {
        "type": "error",
        "event_id": f"event_gateway_{uuid.uuid4().hex[:12]}",
        "error": {**error, "param": None, "event_id": event_id},
    }
    return json.dumps(event).encode()


def budget_response(scope: str) -> http.Response:
    """HTTP over budget: 429 with an OpenAI-shaped error body."""
    error = {"message": BUDGET_MESSAGES[scope], "type": "budget_exceeded", "param": None, "code": "budget_exceeded"}
    return http.Response.make(429, json.dumps({"error": error}), {"content-type": "application/json"})
