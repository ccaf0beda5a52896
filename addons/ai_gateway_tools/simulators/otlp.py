"""A simulated OpenTelemetry collector: a real OTLP/HTTP trace receiver on loopback, decoding what
the gateway's exporter sends with opentelemetry-proto's ExportTraceServiceRequest, as a collector
would. For the tests (the spans against the simulators' ledgers) and the benchmarks (tracing's cost)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ai_gateway_tools.simulators.served import LoopbackHttpServer


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # hex, as in traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The span as an OTLP/JSON-like object, for people to read."""
        return {
            "name": self.name,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id or None,
            "duration_ms": round((self.end_ns - self.start_ns) / 1e6, 1),
            "attributes": self.attributes,
        }


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(LoopbackHttpServer):
    """`with OtlpReceiver() as receiver:` listens on a free loopback port; `receiver.spans` fills as batches arrive."""

    def __init__(self, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.keep = keep  # False: count the spans, keep none (a benchmark's millions)
        self.received = 0
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                receiver.add(request, self.path)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)
        self.paths: list[str] = []

    def add(self, request: ExportTraceServiceRequest, path: str) -> None:
        self.requests += 1
        self.paths.append(path)
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.received += len(scope.spans)
                if not self.keep:
                    continue
                for span in scope.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={a.key: value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            resource=resource,
                        )
                    )


def main(argv: Sequence[str] | None = None) -> None:
    """Receive (and count, keeping none) until Ctrl-C or SIGTERM, in a process of its own: a
    benchmark's collector must not share the measured processes' CPU."""
    parser = argparse.ArgumentParser(description="Run a loopback OTLP/HTTP trace receiver until Ctrl-C.")
    parser.parse_args(argv)
    with OtlpReceiver(keep=False) as receiver:
        print(f"OTLP/HTTP receiver listening on {receiver.url}", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
