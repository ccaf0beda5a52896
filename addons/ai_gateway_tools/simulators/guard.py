"""A simulated guard service: the operator's webhook (`POST /webhook`) and an OpenAI-compatible
moderation endpoint (`POST /v1/moderations`) on loopback, for guardrail tests and the demo.

Both flag text containing one of `denied` (case-insensitive): the webhook answers
`{"action": "block", "reason": ...}`, moderation a flagged `violence` result scored 0.9 (else
0.01), a result per input when `input` is a list, in order, as OpenAI answers. `delay` seconds
before every answer makes it a slow or, past the gateway's timeout_ms, a dead service; `padding`
bytes added to every answer make it an oversized one; every request body is kept in `requests`.
HTTP/1.1 with keep-alive, as a production service: `connections` counts the connections it
accepted (a client reusing its connections opens one per concurrent call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any

from ai_gateway_tools.simulators.served import LoopbackHttpServer

MODERATION_CATEGORIES = ("hate", "harassment", "self-harm", "sexual", "violence")


class GuardSimulator(LoopbackHttpServer):
    def __init__(self, denied: Sequence[str] = ("project falcon",), delay: float = 0.0, padding: int = 0) -> None:
        self.denied = [d.casefold() for d in denied]
        self.delay = delay
        self.padding = padding
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (path, body)
        self.connections = 0
        counting = threading.Lock()
        simulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the connection serves request after request
            disable_nagle_algorithm = True  # the answer's head and body written apart: no delayed-ACK stall

            def setup(self) -> None:
                super().setup()
                with counting:
                    simulator.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                simulator.requests.append((self.path, body))
                time.sleep(simulator.delay)
                answer = simulator.answer(self.path, body)
                if answer is not None and simulator.padding:
                    answer["padding"] = "x" * simulator.padding
                data = json.dumps(answer).encode()
                self.send_response(200 if answer is not None else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the gateway gave up waiting
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)

    def flags(self, text: Any) -> bool:
        return isinstance(text, str) and any(d in text.casefold() for d in self.denied)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if path == "/webhook":
            flagged = self.flags(body.get("text"))
            return {"action": "block", "reason": "denied phrase"} if flagged else {"action": "allow"}
        if path == "/v1/moderations":
            inputs = body.get("input")
            results = [self.moderation(text) for text in (inputs if isinstance(inputs, list) else [inputs])]
            return {"id": "modr-sim", "model": body.get("model", "omni-moderation-latest"), "results": results}
        return None

    def moderation(self, text: Any) -> dict[str, Any]:
        """One input's result, as OpenAI gives one per input of a list, in order."""
        flagged = self.flags(text)
        categories = {name: flagged and name == "violence" for name in MODERATION_CATEGORIES}
        scores = {name: 0.9 if flagged and name == "violence" else 0.01 for name in MODERATION_CATEGORIES}
        return {"flagged": flagged, "categories": categories, "category_scores": scores}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the simulated guard service until Ctrl-C.")
    parser.add_argument("--deny", action="append", default=None, help="a phrase to flag (repeatable)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args(argv)
    with GuardSimulator(args.deny or ("project falcon",), args.delay) as simulator:
        print(f"guard simulator listening on {simulator.url}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()


if __name__ == "__main__":
    main()
