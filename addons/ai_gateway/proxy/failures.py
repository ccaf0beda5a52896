"""How failures are named: a small, bounded set of `error_type` label values.

Error messages and close codes come from peers; exported as they are they would make unbounded
label values, so each is mapped to one of a few names a dashboard can group by.
"""

from __future__ import annotations


def error_type(message: str) -> str:
    """A bounded error_type label from mitmproxy's error message."""
    lowered = message.lower()
    if "certificate" in lowered or "tls" in lowered or "ssl" in lowered:
        return "tls_error"
    if "timeout" in lowered or "timed out" in lowered:
        return "timeout"
    if "killed" in lowered or "client disconnected" in lowered:
        return "client_disconnected"
    return "connection_error"


def close_error(code: int | None, by_client: bool | None, in_flight: bool) -> str | None:
    """The error_type of a WebSocket session's end, None for a normal end; a bounded set of values."""
    if by_client:
        return "client_disconnected" if in_flight else None
    if code in (None, 1000, 1001, 1005):
        return None
    if code == 1006:
        return "connection_reset"
    if 1002 <= code <= 1015:
        return f"ws_close_{code}"
    return "ws_close_application" if 3000 <= code <= 4999 else "ws_close_other"
