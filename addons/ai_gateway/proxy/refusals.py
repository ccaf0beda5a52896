"""What clients see when a budget refuses them: OpenAI-shaped errors, so SDKs surface them as usual."""

from __future__ import annotations

import json

from mitmproxy import http

from ai_gateway.accounting.budget import CLIENT_KEY, SESSION
from ai_gateway.protocols.openai_realtime import error_event

BUDGET_MESSAGES = {
    SESSION: "This session's budget is used up: the gateway refused the response.",
    CLIENT_KEY: "This API key's budget for the current window is used up: the gateway refused the request.",
}


def budget_error_event(scope: str, client_event: bytes) -> bytes:
    """The Realtime `error` event that tells the client its `response.create` was refused."""
    return error_event("budget_exceeded", BUDGET_MESSAGES[scope], client_event)


def budget_response(scope: str) -> http.Response:
    """HTTP over budget: 429 with an OpenAI-shaped error body."""
    error = {"message": BUDGET_MESSAGES[scope], "type": "budget_exceeded", "param": None, "code": "budget_exceeded"}
    return http.Response.make(429, json.dumps({"error": error}), {"content-type": "application/json"})
