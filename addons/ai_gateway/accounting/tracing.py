"""OpenTelemetry traces: a span per metered HTTP request and per Realtime (or Responses
WebSocket) session, a child span per response, exported over OTLP/HTTP.

Names and attributes follow the OpenTelemetry GenAI semantic conventions (1.44, development
status): `{gen_ai.operation.name} {gen_ai.request.model}`, `gen_ai.usage.*`,
`gen_ai.response.id`, `gen_ai.conversation.id`. What they do not name yet (per-modality tokens,
cost, voice-turn latency) is under `ai_gateway.*`.

Spans are exported in batches by the SDK's BatchSpanProcessor on its own thread, from a bounded
queue: a dead or slow collector costs the relay a deque append per span, and what does not fit
or is refused is counted, never retried forever nor logged per span.

A response's span is known whole only once the response is done, so it is built finished, as the
SDK's Span.end() builds it, and handed to the processor: the SDK's live Span would validate each
of its twenty-odd attributes (the gateway's own str, int and float values) under a lock, several
times the cost of everything else a response.done costs the tracer. Where the environment asks
for what only the SDK's path does (a sampler that is not parent-based, span attribute limits the
span would exceed), that path is taken.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ai_gateway.accounting.observer import GuardrailBlock, Observer, ResponseRecord, SessionRecord
from ai_gateway.accounting.usage import TokenUsage

SERVICE_NAME = "ai-gateway"
QUEUE_SIZE = 2048  # spans waiting for export (the SDK's default); beyond it spans are dropped and counted
SHUTDOWN_SECONDS = 2.0  # what `done` waits for the last batch
MAX_OPEN_SPANS = 100_000  # requests and sessions open at once; more is not a real gateway
PROPAGATED = ("traceparent", "tracestate")

logger = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()


def queue_size(environ: Mapping[str, str]) -> int:
    """OTEL_BSP_MAX_QUEUE_SIZE, as the SDK reads it; raises ValueError unless a positive number."""
    value = environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "")
    if not value:
        return QUEUE_SIZE
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"OTEL_BSP_MAX_QUEUE_SIZE: expected a positive number, got {value!r}")
    return int(value)


def traces_endpoint(option: str, environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL: the option's base URL, else the standard environment variables;
    None (no traces) when neither is set or the option is `off`. Raises ValueError for a bad URL."""
    if option == "off":
        return None
    if option:
        url = urlsplit(option)
        if url.scheme not in ("http", "https") or not url.netloc:
            expected = "an http(s) URL such as http://collector:4318"
            raise ValueError(f"gateway_otlp_endpoint: expected {expected}, got {option!r}")
        return option.rstrip("/") + "/v1/traces"
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces
    if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return base.rstrip("/") + "/v1/traces"
    return None


class ReportingExporter(SpanExporter):
    """The OTLP exporter, with failures counted and said once until the collector answers again.

    The exporter itself logs every failed batch and retry; those loggers are quietened, this
    says it once."""

    def __init__(self, exporter: SpanExporter, endpoint: str, dropped: Callable[[str, int], None]) -> None:
        self.exporter = exporter
        self.endpoint = endpoint
        self.dropped = dropped
        self.handed = 0  # spans taken off the queue for export
        self.failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.handed += len(spans)
        try:
            result = self.exporter.export(spans)
        except Exception:  # the SDK would log it per batch; a failed export is a drop like any other
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                logger.info("ai-gateway: exporting traces to %s again", self.endpoint)
            self.failing = False
        else:
            self.dropped("export_failed", len(spans))
            if not self.failing:
                logger.warning(
                    "ai-gateway: cannot export traces to %s; spans are dropped (and counted) until it answers",
                    self.endpoint,
                )
            self.failing = True
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts what its full queue drops (the SDK only logs it).

    Queued = ended here - taken by the exporter - dropped; one thread writes each count."""

    def __init__(self, exporter: ReportingExporter, max_queue_size: int, dropped: Callable[[str, int], None]) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size)
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.dropped = dropped
        self.ended = 0
        self.overflowed = 0

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        self.ended += 1
        if self.ended - 1 - self.exporter.handed - self.overflowed >= self.max_queue_size:
            self.overflowed += 1  # the queue drops its oldest span to take this one
            self.dropped("queue_full", 1)
        super().on_end(span)


class Tracing(Observer):
    """Opens a span when a metered request arrives, ends it when the gateway is done with it."""

    active = True

    def __init__(self, endpoint: str, dropped: Callable[[str, int], None], queue_size: int = QUEUE_SIZE) -> None:
        for name in ("opentelemetry.exporter", "opentelemetry.sdk._shared_internal"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # ReportingExporter says it once
        self.endpoint = endpoint
        exporter = ReportingExporter(OTLPSpanExporter(endpoint=endpoint), endpoint, dropped)
        self.processor = CountingBatchProcessor(exporter, queue_size, dropped)
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("ai_gateway")
        self.open: dict[str, Span] = {}
        # A response's span is built finished only where the SDK would record it as given: a child
        # follows its sampled parent (the default, and every parentbased_* sampler), no value length
        # limit, fewer attributes than this limit (0: never).
        limits = SpanLimits()
        count = sys.maxsize if limits.max_span_attributes is None else limits.max_span_attributes
        parent_based = isinstance(self.provider.sampler, ParentBased) and limits.max_span_attribute_length is None
        self.prebuilt_limit = count if parent_based else 0

    def begin(self, flow_id: str, headers: Mapping[str, str], operation: str, model: str | None) -> dict[str, str]:
        """A metered request arrived: its span, a child of the client's `traceparent` if it sent
        one. Returns the trace headers to send upstream, naming this span as the parent."""
        if len(self.open) >= MAX_OPEN_SPANS:
            return {}
        carrier = {name: value for name in PROPAGATED if (value := headers.get(name))}
        parent: Context = _propagator.extract(carrier)
        span = self.tracer.start_span(
            span_name(operation, model),
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation, **optional("gen_ai.request.model", model)},
        )
        self.open[flow_id] = span
        forwarded: dict[str, str] = {}
        _propagator.inject(forwarded, context=set_span_in_context(span))
        return forwarded

    def response_finished(self, record: ResponseRecord) -> None:
        attributes = response_attributes(record)
        if record.event == "request":
            span = self.open.pop(record.flow_id, None)
            if span is not None:
                span.update_name(span_name(record.operation, record.request_model))
                span.set_attributes(attributes)
                finish(span, record.end, record.error_type or failed(record.status))
            return
        session = self.open.get(record.flow_id)
        if session is None:
            return
        name = f"{record.operation}.response {record.request_model or ''}".rstrip()
        start, error = record.end - (record.duration or 0.0), failed(record.status)
        if len(attributes) >= self.prebuilt_limit:  # room for error.type too
            span = self.tracer.start_span(
                name,
                context=set_span_in_context(session),
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=nanoseconds(start),
            )
            finish(span, record.end, error)
            return
        parent = session.get_span_context()
        if not (parent.trace_flags.sampled and isinstance(session, ReadableSpan)):
            return  # an unsampled or non-recording session: the SDK would not record its child either
        if error:
            attributes["error.type"] = error
        span_id = self.provider.id_generator.generate_span_id()
        context = SpanContext(parent.trace_id, span_id, False, parent.trace_flags, parent.trace_state)
        self.processor.on_end(
            ReadableSpan(
                name,
                context,
                parent,
                session.resource,
                attributes,
                kind=SpanKind.INTERNAL,
                status=ERROR if error else UNSET,
                start_time=nanoseconds(start),
                end_time=nanoseconds(record.end),
                instrumentation_scope=session.instrumentation_scope,
            )
        )

    def session_ended(self, record: SessionRecord) -> None:
        span = self.open.pop(record.flow_id, None)
        if span is None:
            return
        span.update_name(span_name(record.operation, record.request_model))
        span.set_attributes(
            {
                "gen_ai.provider.name": record.system,
                "gen_ai.usage.input_tokens": record.input,
                "gen_ai.usage.cache_read.input_tokens": record.cached,
                "gen_ai.usage.output_tokens": record.output,
                "ai_gateway.session.responses": record.responses,
                "ai_gateway.session.errors": record.errors,
                "ai_gateway.cost.usd": record.cost,
                "ai_gateway.websocket.closed_by": record.closed_by,
                **optional("ai_gateway.websocket.close_code", record.close_code),
                **optional("gen_ai.conversation.id", record.conversation_id),
                **optional("gen_ai.response.model", record.response_model),
                **optional("ai_gateway.client_key", record.client_key),
                **optional("ai_gateway.session.seconds", record.session_seconds),
                **optional("ai_gateway.session.close_reason", record.close_reason),
                **guardrail_attributes(record.guardrail),
            }
        )
        finish(span, record.end, record.error_type)

    def abandon(self, flow_id: str, http_status: int | None, error: str) -> None:
        """A request the gateway let go without a record (refused, failed before a response)."""
        span = self.open.pop(flow_id, None)
        if span is not None:
            if http_status is not None:
                span.set_attribute("http.response.status_code", http_status)
            finish(span, None, error or (str(http_status) if http_status and http_status >= 400 else ""))

    def shutdown(self) -> None:
        """Send what is queued, waiting at most SHUTDOWN_SECONDS: a dead collector must not hold up exit."""
        for span in self.open.values():
            finish(span, None, "shutdown")
        self.open.clear()
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(SHUTDOWN_SECONDS)


def span_name(operation: str, model: str | None) -> str:
    return f"{operation} {model}" if model else operation


def optional(key: str, value: Any) -> dict[str, Any]:
    return {} if value is None else {key: value}


def failed(status: str) -> str:
    return status if status in ("failed", "incomplete") else ""


def nanoseconds(epoch: float) -> int:
    return int(epoch * 1e9)


ERROR = Status(StatusCode.ERROR)
UNSET = Status(StatusCode.UNSET)


def finish(span: Span, end: float | None, error: str) -> None:
    if error:
        span.set_attribute("error.type", error)
        span.set_status(ERROR)
    span.end(None if end is None else nanoseconds(end))


def response_attributes(record: ResponseRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": record.operation,
        "gen_ai.provider.name": record.system,
        "ai_gateway.response.status": record.status,
    }
    for key, value in (
        ("gen_ai.request.model", record.request_model),
        ("gen_ai.response.model", record.response_model),
        ("gen_ai.response.id", record.response_id),
        ("gen_ai.response.time_to_first_chunk", record.ttft),
        ("ai_gateway.voice_turn.latency", record.turn_latency),
        ("ai_gateway.cost.usd", record.cost),
        ("ai_gateway.client_key", record.client_key),
        ("http.response.status_code", record.http_status),
    ):
        if value is not None:
            attributes[key] = value
    if record.usage is not None:
        add_usage(attributes, record.usage)
    if record.guardrail is not None:
        attributes |= guardrail_attributes(record.guardrail)
    return attributes


def guardrail_attributes(block: GuardrailBlock | None) -> dict[str, Any]:
    if block is None:
        return {}
    return {
        "ai_gateway.guardrail.name": block.guard,
        "ai_gateway.guardrail.phase": block.phase,
        "ai_gateway.guardrail.action": block.action,
    }


def add_usage(attributes: dict[str, Any], usage: TokenUsage) -> None:
    attributes["gen_ai.usage.input_tokens"] = usage.input
    for key, value in (
        ("gen_ai.usage.output_tokens", usage.output),
        ("gen_ai.usage.cache_read.input_tokens", usage.cache_read),
        ("gen_ai.usage.reasoning.output_tokens", usage.reasoning),
    ):
        if value is not None:
            attributes[key] = value
    for name, split in (
        ("input_tokens", usage.input_by_modality),
        ("cache_read.input_tokens", usage.cache_read_by_modality),
        ("output_tokens", usage.output_by_modality),
    ):
        for modality, count in split:
            attributes[f"ai_gateway.usage.{name}.{modality}"] = count
