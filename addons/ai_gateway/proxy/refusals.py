"""What clients see when a budget or limit refuses them: OpenAI-shaped errors, so SDKs surface them
as usual (an `error` event inside a session, an HTTP error with `retry-after` otherwise)."""

from __future__ import annotations

import json
import math

from mitmproxy import http

from ai_gateway.accounting.ledger import USAGE_LOG
from ai_gateway.accounting.limits import BUDGET_EXCEEDED, CLIENT_KEY, RATE_LIMITED, SESSION, Refusal
from ai_gateway.accounting.shared_limits import STORE, STORE_UNAVAILABLE
from ai_gateway.protocols.openai_realtime import error_event

UNKNOWN_CLIENT_KEY = "invalid_api_key"
MESSAGES = {
    (SESSION, BUDGET_EXCEEDED): "This session's budget is used up: the gateway refused the response.",
    (CLIENT_KEY, BUDGET_EXCEEDED): "This API key's budget for the current window is used up: the gateway refused"
    " the request.",
    (CLIENT_KEY, RATE_LIMITED): "This API key is over its rate limit: the gateway refused the request.",
    (USAGE_LOG, "usage_log_unavailable"): "The gateway cannot record usage right now (its usage ledger cannot be"
    " written): retry later.",
    (STORE, STORE_UNAVAILABLE): "The gateway cannot check budgets and rate limits right now (its limits store does"
    " not answer): retry later.",
}
SERVER_FAULTS = (USAGE_LOG, STORE)  # refusals that are the gateway's fault, not the client's


def message(refusal: Refusal) -> str:
    return MESSAGES.get((refusal.scope, refusal.code), "The gateway refused the request.")


def refusal_event(refusal: Refusal, client_event: bytes = b"") -> bytes:
    """The Realtime `error` event that tells the client its `response.create` was refused (or that a
    response the upstream started by itself was cancelled)."""
    kind = "server_error" if refusal.scope in SERVER_FAULTS else "invalid_request_error"
    return error_event(refusal.code, message(refusal), client_event, kind)


def refusal_response(refusal: Refusal) -> http.Response:
    """HTTP, or a WebSocket handshake, refused: 429 with an OpenAI-shaped body and, where waiting
    helps, `retry-after` in whole seconds; 503 while usage cannot be recorded or limits cannot be
    checked (the gateway's fault)."""
    kind = "server_error" if refusal.scope in SERVER_FAULTS else refusal.code
    error = {"message": message(refusal), "type": kind, "param": None, "code": refusal.code}
    headers = {"content-type": "application/json"}
    if refusal.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(refusal.retry_after)))
    status = 503 if refusal.scope in SERVER_FAULTS else 429
    return http.Response.make(status, json.dumps({"error": error}), headers)


def ambiguous_path_response(why: str) -> http.Response:
    """A path that upstreams could read in more than one way (config/paths.py): 400, as OpenAI
    answers a malformed request, before anything is routed or sent upstream."""
    return _invalid_request(400, f"The gateway refused the request path: {why}.", "invalid_path")


def unknown_key_response() -> http.Response:
    """A client key the policy does not know (or none) where the policy requires a known one: 401,
    as OpenAI answers an invalid key."""
    return _invalid_request(401, "The gateway does not know this API key.", UNKNOWN_CLIENT_KEY)


def _invalid_request(status: int, message: str, code: str) -> http.Response:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return http.Response.make(status, json.dumps({"error": error}), {"content-type": "application/json"})
