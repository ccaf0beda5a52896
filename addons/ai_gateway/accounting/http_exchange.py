"""Per-exchange HTTP accounting: request body policy (model override, streaming usage), then the
usage of the JSON body or of the SSE stream as it passes, and the exchange's latencies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import ModelLabels
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.encoding import stream_decoder
from ai_gateway.protocols.openai_http import Billed, FirstToken, SseStream, read_body
from ai_gateway.protocols.openai_realtime import Malformed

OPERATIONS = {RouteType.COMPLETIONS: "chat", RouteType.RESPONSES: "chat", RouteType.EMBEDDINGS: "embeddings"}
METERED_HTTP = frozenset(OPERATIONS)


def rewrite_request(route_type: RouteType, body: bytes, model: str | None) -> tuple[str | None, bytes | None]:
    """The request's model, and a new body when the policy changes it (else None: forward untouched).

    The model override replaces the body's `model`; a streaming Chat Completions request without
    `stream_options` gets `include_usage`, as agentgateway does, or its usage would never be sent.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    changed = False
    if model is not None and document.get("model") != model:
        document["model"] = model
        changed = True
    if route_type is RouteType.COMPLETIONS and document.get("stream") is True and "stream_options" not in document:
        document["stream_options"] = {"include_usage": True}
        changed = True
    requested = document.get("model")
    return requested if isinstance(requested, str) else None, json.dumps(document).encode() if changed else None


class HttpExchange:
    """Meters one request/response on a Completions, Responses or Embeddings route."""

    def __init__(self, accounting: Accounting, source: Source, system: str, request_model: str | None) -> None:
        self.accounting = accounting
        self.source = source
        self.route_type = RouteType(source.route_type)
        self.system = system
        self.request_model = request_model
        self.started = time.time()
        self.first_token: float | None = None
        self.billed: Billed | None = None
        self.stream: SseStream | None = None

    def streaming(self, content_encoding: str) -> Callable[[bytes], bytes]:
        """A chunk callback for mitmproxy's response streaming: reads each chunk, forwards it unchanged."""
        stream = self.stream = SseStream(self.route_type)
        decode = stream_decoder(content_encoding)
        if decode is None:
            self.problem(Malformed("unsupported_encoding", content_encoding[:64]))

        def read(chunk: bytes) -> bytes:
            nonlocal decode
            if decode is not None:
                try:
                    items = stream.feed(decode(chunk))
                except Exception as e:  # a corrupt compressed stream: relay it, meter nothing more
                    decode = None
                    items = [Malformed("invalid_encoding", str(e)[:200])]
                for item in items:
                    self.item(item)
            return chunk

        return read

    def item(self, item: Billed | FirstToken | Malformed) -> None:
        if isinstance(item, FirstToken):
            if self.first_token is None:
                self.first_token = time.time()
        elif isinstance(item, Billed):
            self.bill(item)
        else:
            self.problem(item)

    def body(self, content: bytes) -> None:
        """A whole (decoded) JSON body, for responses that were not streamed."""
        self.item(read_body(self.route_type, content))

    def bill(self, billed: Billed) -> None:
        if self.billed is not None:  # one exchange bills once; a second usage is the upstream's error
            self.problem(Malformed("duplicate_usage", "a second usage in one response"))
            return
        self.billed = billed
        self.accounting.bill(self.source, self.labels(), billed.usage, billed.status)

    def problem(self, problem: Malformed) -> None:
        self.accounting.parse_error(self.source, problem.reason)

    def labels(self) -> ModelLabels:
        response_model = self.billed.response_model if self.billed else None
        return ModelLabels(OPERATIONS[self.route_type], self.system, self.request_model, response_model)

    def finish(self, error_type: str) -> None:
        """The exchange ended (response complete, or error_type set): latencies and what never came."""
        ended = time.time()
        if self.stream is not None and self.billed is None:
            reason = "missing_usage" if self.stream.finished else "truncated"
            self.problem(Malformed(reason, "the stream ended without usage"))
        if error_type:
            self.accounting.error(self.source, error_type)
        series = self.accounting.metrics.series(self.labels())
        series.duration(ended - self.started, error_type)
        if self.stream is not None and self.first_token is not None:
            output = self.billed.usage.output if self.billed else None
            series.latency(self.first_token - self.started, ended - self.started, output)
