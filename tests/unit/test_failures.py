"""How failures are named (proxy/failures.py): peers' messages and close codes become a few label values."""

from __future__ import annotations

import pytest

from ai_gateway.proxy.failures import close_error, error_type


@pytest.mark.parametrize(
    "message, name",
    [
        ("Certificate verify failed: self-signed certificate", "tls_error"),
        ("TLS handshake failed", "tls_error"),
        ("SSL routines::wrong version number", "tls_error"),
        ("Connection timed out", "timeout"),
        ("read TIMEOUT after 60s", "timeout"),
        ("Connection killed.", "client_disconnected"),
        ("Client disconnected.", "client_disconnected"),
        ("[Errno 111] Connection refused", "connection_error"),
        ("", "connection_error"),
    ],
)
def test_error_messages_map_to_a_bounded_name(message, name):
    assert error_type(message) == name


@pytest.mark.parametrize(
    "code, by_client, in_flight, name",
    [
        (1000, False, True, None),  # normal ends
        (1001, False, False, None),
        (1005, None, False, None),
        (None, None, False, None),
        (None, True, False, None),  # the client left between responses
        (1000, True, True, "client_disconnected"),  # the client left while a response was on its way
        (1006, False, False, "connection_reset"),
        (1011, False, False, "ws_close_1011"),
        (1002, False, False, "ws_close_1002"),
        (1015, False, False, "ws_close_1015"),
        (1016, False, False, "ws_close_other"),
        (3000, False, False, "ws_close_application"),
        (4999, False, False, "ws_close_application"),
        (5000, False, False, "ws_close_other"),
    ],
)
def test_close_codes_map_to_a_bounded_name(code, by_client, in_flight, name):
    assert close_error(code, by_client, in_flight) == name
