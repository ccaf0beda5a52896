"""Test-only trigger of the gateway's WebSocket close, as a limit's timer will call it.

A client text frame `{"type": "test.close_websocket", "delay": S, "code": C, "reason": R}` is
dropped, and S seconds later `close_websocket(flow, C, R)` runs from a timer. Each call and each
`websocket_end` is logged for the test to read. Loaded with a second `-s` under mitmdump;
`python tests/e2e/close_trigger.py ARGS` runs scripts/serve's launcher with this addon in its chain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from mitmproxy import http

from ai_gateway.proxy.closer import close_websocket

TRIGGER = b'"test.close_websocket"'
logger = logging.getLogger(__name__)


class CloseTrigger:
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if not message.from_client or TRIGGER not in message.content:
            return
        message.drop()
        event = json.loads(message.content)
        asyncio.get_running_loop().call_later(event["delay"], self.close, flow, event["code"], event["reason"])

    def close(self, flow: http.HTTPFlow, code: int, reason: str) -> None:
        logger.warning("close-trigger: close_websocket %s -> %s", flow.id, close_websocket(flow, code, reason))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        again = close_websocket(flow, 1008, "again")
        logger.warning(
            "close-trigger: websocket_end %s close_code=%s reason=%s by_client=%s again=%s",
            flow.id, flow.websocket.close_code, flow.websocket.close_reason, flow.websocket.closed_by_client, again,
        )  # fmt: skip


addons = [CloseTrigger()]

if __name__ == "__main__":
    from ai_gateway.launcher import serve

    serve.LEAN_ADDONS = (*serve.LEAN_ADDONS, CloseTrigger)
    sys.exit(serve.main())
