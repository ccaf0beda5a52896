"""Prometheus metrics, named and labelled as agentgateway exports them so dashboards carry over.

Every metric lives on a per-instance CollectorRegistry: mitmproxy's script hot reload creates a
new addon instance while the old module's metrics still exist, and the global registry would
refuse the duplicate names.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import RestrictedRegistry

from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, SessionSeconds, TokenUsage

# OpenTelemetry GenAI semantic conventions' advisory buckets, as agentgateway uses them.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TOKEN_BUCKETS = tuple(4**i for i in range(14))
DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(14))
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
# What a voice user waits for: conversational turn gaps are 0.2-1 s, an answer after 3 s feels broken.
VOICE_TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.001, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)

MODEL_LABELS = ("gen_ai_operation_name", "gen_ai_system", "gen_ai_request_model", "gen_ai_response_model")
UNKNOWN = "unknown"
OTHER = "other"
MAX_LABEL_LENGTH = 128
DEFAULT_MAX_MODEL_LABELS = 100
# Label sets per model-labelled family. A model pair in use makes at most about 10 in a family (its
# other label: the statuses of responses, the error types of request_duration), so 500 holds 50 pairs
# with every status and error type: normal use never folds. An upstream renaming its model before
# each response then stops at about 33,000 lines of /metrics (6.6 MB) instead of adding 110 per pair.
DEFAULT_MAX_SERIES_PER_FAMILY = 500
# `gen_ai_operation_name` values by naming scheme (option gateway_operation_names): the gateway's
# own name what was metered; agentgateway labels Realtime usage as chat, and has no value of its
# own for what it does not meter (transcription, the audio and image endpoints), which keep ours.
OPERATION_NAMES: dict[str, dict[str, str]] = {"ours": {}, "agentgateway": {"realtime": "chat"}}


def label_value(value: str | None) -> str:
    """A label value from untrusted input: printable, bounded in length, `unknown` when missing."""
    if not value:
        return UNKNOWN
    value = value[:MAX_LABEL_LENGTH]
    return value if value.isprintable() else "".join(c if c.isprintable() else "?" for c in value)


class LabelBound:
    """At most `limit` distinct values for one label; later newcomers are recorded as `other`.

    Model names come from clients (query parameters, request bodies), so without a bound any
    client could create unbounded time series in every metric family.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = label_value(value)
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


ModelValues = tuple[str, str, str, str]  # the values of MODEL_LABELS, bounded
LabelSet = tuple[str | None, ModelValues, str | None]  # a family's labels before, of and after the models


@dataclass(frozen=True, slots=True)
class ModelLabels:
    operation: str
    system: str
    request_model: str | None = None
    response_model: str | None = None


class GatewayMetrics:
    """The gateway's metric families; `series()` binds them to one label set for cheap updates."""

    def __init__(
        self,
        prefix: str,
        max_model_labels: int = DEFAULT_MAX_MODEL_LABELS,
        operation_names: str = "ours",
        max_series_per_family: int = DEFAULT_MAX_SERIES_PER_FAMILY,
    ) -> None:
        self.registry = CollectorRegistry()
        self.operation_names = OPERATION_NAMES[operation_names]
        self.request_models = LabelBound(max_model_labels)
        self.client_keys = LabelBound(max_model_labels)
        self.response_models = LabelBound(max_model_labels)
        self.token_usage = Histogram(
            f"{prefix}_gen_ai_client_token_usage",
            "Number of tokens used per request, by token type (OpenTelemetry gen_ai.client.token.usage).",
            ("gen_ai_token_type", *MODEL_LABELS),
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.input_tokens = self._modality_counter(
            f"{prefix}_gen_ai_client_inference_usage_input_tokens",
            "Input tokens by modality (OpenTelemetry gen_ai.client.inference.usage.input_tokens).",
        )
        self.cache_read_tokens = self._modality_counter(
            f"{prefix}_gen_ai_client_inference_usage_cache_read_input_tokens",
            "Input tokens read from the prompt cache, by modality; a subset of input tokens.",
        )
        self.output_tokens = self._modality_counter(
            f"{prefix}_gen_ai_client_inference_usage_output_tokens",
            "Output tokens by modality (OpenTelemetry gen_ai.client.inference.usage.output_tokens).",
        )
        self.reasoning_tokens = Counter(
            f"{prefix}_gen_ai_client_inference_usage_reasoning_output_tokens",
            "Output tokens spent on reasoning; a subset of output tokens.",
            MODEL_LABELS,
            registry=self.registry,
        )
        self.transcription_seconds = Counter(
            f"{prefix}_gen_ai_client_transcription_audio_seconds",
            "Seconds of input audio transcribed, for transcription billed by duration.",
            MODEL_LABELS,
            registry=self.registry,
        )
        self.session_seconds = Counter(
            f"{prefix}_gen_ai_client_session_seconds",
            "Seconds of session time billed by the second (GPT-Live), by kind: active, or paused (standby,"
            " priced at its own rate where the model has one).",
            ("kind", *MODEL_LABELS),
            registry=self.registry,
        )
        self.speech_characters = Counter(
            f"{prefix}_gen_ai_client_speech_input_characters",
            "Characters of speech input (POST /audio/speech `input`), which tts-1 is billed by; counted by the"
            " gateway because the audio response reports no usage.",
            MODEL_LABELS,
            registry=self.registry,
        )
        self.realtime_calls = Counter(
            f"{prefix}_gateway_realtime_calls",
            "WebRTC and SIP Realtime calls admitted: kind calls (POST /realtime/calls) or client_secrets"
            " (an ephemeral key minted for a browser session).",
            ("kind",),
            registry=self.registry,
        )
        self.responses = Counter(
            f"{prefix}_gen_ai_client_responses",
            "Metered responses by final status (completed, cancelled, failed, incomplete).",
            ("status", *MODEL_LABELS),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            f"{prefix}_gen_ai_server_request_duration",
            "Seconds from request to the end of the response; error_type is set for failures.",
            (*MODEL_LABELS, "error_type"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            f"{prefix}_gen_ai_server_time_to_first_token",
            "Seconds from request (Realtime: response.create, or the end of the user's turn for responses "
            "server VAD started) to the first generated content.",
            MODEL_LABELS,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.voice_turn_latency = Histogram(
            f"{prefix}_gen_ai_server_voice_turn_latency",
            "Seconds from the end of the user's turn (turn_end: speech_stopped from server VAD, or the client's "
            "input_audio_buffer.commit) to the first delta of the response it started.",
            ("turn_end", *MODEL_LABELS),
            buckets=VOICE_TURN_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            f"{prefix}_gen_ai_server_time_per_output_token",
            "Seconds per output token after the first one.",
            MODEL_LABELS,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.cost_usd = Counter(
            f"{prefix}_gen_ai_client_cost_usd",
            "Estimated cost in USD at the price catalog's list prices (policy key `prices`).",
            MODEL_LABELS,
            registry=self.registry,
        )
        self.price_lookups = Counter(
            f"{prefix}_gateway_price_lookups",
            "Price catalog lookups per metered usage, by status (priced, unpriced).",
            ("status", *MODEL_LABELS),
            registry=self.registry,
        )
        self.price_catalog_info = Gauge(
            f"{prefix}_gateway_price_catalog_info",
            "Sources of the price catalog in use (1): genai-prices with its version and data date, the override file.",
            ("source", "version", "data_date"),
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._catalog_sources: set[tuple[str, str, str]] = set()
        self.budget_remaining = Gauge(
            f"{prefix}_gateway_budget_remaining",
            "What is left of a client key's budget in the current window, reservations of responses in flight"
            " deducted (client_key: the policy's name for the key, else a SHA-256 digest prefix, or anonymous).",
            ("client_key", "unit"),
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.limit_headroom = Gauge(
            f"{prefix}_gateway_rate_limit_headroom",
            "What is left of a client key's rate limits now: requests_per_minute, tokens_per_minute,"
            " concurrent_sessions.",
            ("client_key", "limit"),
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.budget_enforcements = Counter(
            f"{prefix}_gateway_budget_enforcements",
            "Budget and limit enforcement: refused_response, cancelled_response, rejected_request,"
            " rejected_session, closed_session; scope session, client_key, usage_log (the ledger could not be"
            " written), store (the shared limits store failed, on_store_error closed); reason budget_exceeded,"
            " rate_limit_exceeded, invalid_api_key, usage_log_unavailable, limits_store_unavailable,"
            " session_too_long, session_idle.",
            ("scope", "action", "reason"),
            registry=self.registry,
        )
        self.guardrail_checks = Counter(
            f"{prefix}_guardrail_checks",
            "Guardrail checks by guard (its name in the policy), phase (input, output) and action, what happened:"
            " allow, block, warn, log, or error (the guard service failed or timed out; on_error decided).",
            ("guard", "phase", "action"),
            registry=self.registry,
        )
        self.guardrail_duration = Histogram(
            f"{prefix}_guardrail_check_duration_seconds",
            "Seconds a guardrail check took, by guard: microseconds for regex, the service's answer (at most"
            " timeout_ms) for webhook and moderation.",
            ("guard",),
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.guardrail_audio_before_block = Histogram(
            f"{prefix}_guardrail_audio_before_block_seconds",
            "Seconds of a blocked response's audio the client had been sent before the block: what a voice"
            " session cannot take back.",
            ("guard",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rate_limit_remaining = Gauge(
            f"{prefix}_gateway_upstream_rate_limit_remaining",
            "The upstream's own remaining rate limit from Realtime rate_limits.updated events.",
            ("name",),
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.rate_limit_limit = Gauge(
            f"{prefix}_gateway_upstream_rate_limit_limit",
            "The upstream's rate limit from Realtime rate_limits.updated events.",
            ("name",),
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.limits_store_errors = Counter(
            f"{prefix}_gateway_limits_store_errors",
            "Operations on the shared limits store (limits.store: redis://) that failed or timed out; "
            "limits.on_store_error then admitted (open) or refused (closed) what waited for it.",
            ("operation",),
            registry=self.registry,
        )
        self.limits_store_duration = Histogram(
            f"{prefix}_gateway_limits_store_duration_seconds",
            "Seconds an operation on the shared limits store took: admit (response, request), open_session "
            "(handshake), settle (usage arrived), renew (leases, a session closed) and flush (usage owed since an "
            "outage), failures included.",
            ("operation",),
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.limits_store_owed = Gauge(
            f"{prefix}_gateway_limits_store_owed",
            "Usage this process settled while the shared limits store failed, not yet taken by the store "
            "(unit tokens, usd): other processes do not count it until the store answers again.",
            ("unit",),
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.limits_store_owed_keys = Gauge(
            f"{prefix}_gateway_limits_store_owed_keys",
            "Client keys with usage owed to the shared limits store.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.usage_log_errors = Counter(
            f"{prefix}_gateway_usage_log_errors",
            "Usage ledger lines that could not be written (full disk, I/O error): that usage is in no ledger.",
            registry=self.registry,
        )
        self.parse_errors = Counter(
            f"{prefix}_gateway_parse_errors",
            "Frames or bodies that looked metered but could not be read; they were forwarded unchanged.",
            ("route_type", "reason"),
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            f"{prefix}_gateway_upstream_errors",
            "Metered requests and sessions that failed: HTTP status, connection, TLS, timeout, WebSocket close.",
            ("route_type", "error_type"),
            registry=self.registry,
        )
        self.websocket_sessions = Gauge(
            f"{prefix}_gateway_websocket_sessions",
            "Metered WebSocket sessions (Realtime, Responses WebSocket mode) open now.",
            ("route_type",),
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.trace_spans_dropped = Counter(
            f"{prefix}_gateway_trace_spans_dropped",
            "Trace spans not delivered to the OTLP collector: queue_full (the export queue was full), "
            "export_failed (the collector refused or did not answer).",
            ("reason",),
            registry=self.registry,
        )
        self.series_folded = Counter(
            f"{prefix}_gateway_metric_series_folded",
            "New label sets of a model-labelled family beyond gateway_max_series_per_family, recorded with"
            " request and response model `other` instead of as series of their own.",
            ("family",),
            registry=self.registry,
        )
        self.max_series_per_family = max_series_per_family
        # The label sets each model-labelled family admitted; its `other` ones are not counted.
        self._admitted: defaultdict[MetricWrapperBase, set[LabelSet]] = defaultdict(set)
        self._series: dict[ModelValues, Series] = {}

    def price_catalog(self, sources: Iterable[tuple[str, str, str]]) -> None:
        """Show the catalog's (source, version, data_date); one a new policy dropped reads 0.

        Set to 0 rather than removed: under --workers the multiprocess files keep every series.
        """
        current = set(sources)
        for labels in self._catalog_sources - current:
            self.price_catalog_info.labels(*labels).set(0)
        for labels in current:
            self.price_catalog_info.labels(*labels).set(1)
        self._catalog_sources = current

    def _modality_counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ("gen_ai_token_modality", *MODEL_LABELS), registry=self.registry)

    def series(self, labels: ModelLabels) -> Series:
        """Children of every model-labelled family for one label set, created once."""
        values = (
            self.operation_names.get(labels.operation, labels.operation),
            labels.system,
            self.request_models(labels.request_model),
            self.response_models(labels.response_model),
        )
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = Series(self, values)
        return series

    def child(self, family: MetricWrapperBase, values: ModelValues, first: str | None, last: str | None) -> Any:
        """The family's child for `values` between its `first` and `last` labels, once per label set.

        Each model label is bounded, their pairs are not (an upstream renaming its model before each
        response makes a new pair every time): beyond the family's bound a new label set is recorded
        with request and response model `other`, always admitted, so totals stay exact.
        """
        admitted = self._admitted[family]
        key = (first, values, last)
        if key not in admitted and values[2:] != (OTHER, OTHER):
            if len(admitted) < self.max_series_per_family:
                admitted.add(key)
            else:
                self.series_folded.labels(family.describe()[0].name).inc()
                values = (values[0], values[1], OTHER, OTHER)
        return family.labels(*(() if first is None else (first,)), *values, *(() if last is None else (last,)))

    def parse_error(self, route_type: str, reason: str) -> None:
        self.parse_errors.labels(route_type, reason).inc()


class Series:
    """Metric children bound to one label set: a response.done costs a few increments, not label lookups."""

    def __init__(self, metrics: GatewayMetrics, values: ModelValues) -> None:
        self._metrics = metrics
        self._values = values
        self._children: dict[tuple[MetricWrapperBase, str | None, str | None], Any] = {}

    def _child(self, family: MetricWrapperBase, first: str | None = None, last: str | None = None) -> Any:
        """The family's child for this series, `first` and `last` being the labels around the model labels."""
        child = self._children.get((family, first, last))
        if child is None:
            child = self._children[family, first, last] = self._metrics.child(family, self._values, first, last)
        return child

    def record(self, usage: TokenUsage | DurationUsage | CharacterUsage | SessionSeconds) -> None:
        metrics = self._metrics
        if isinstance(usage, SessionSeconds):
            self._child(metrics.session_seconds, "active").inc(usage.active)
            self._child(metrics.session_seconds, "paused").inc(usage.paused)
            return
        if isinstance(usage, DurationUsage):
            self._child(metrics.transcription_seconds).inc(usage.seconds)
            return
        if isinstance(usage, CharacterUsage):
            self._child(metrics.speech_characters).inc(usage.characters)
            return
        self._child(metrics.token_usage, "input").observe(usage.input)
        if usage.output is not None:
            self._child(metrics.token_usage, "output").observe(usage.output)
        if usage.reasoning is not None:
            self._child(metrics.reasoning_tokens).inc(usage.reasoning)
        if usage.cache_read is not None:
            self._child(metrics.token_usage, "input_cache_read").observe(usage.cache_read)
        for family, split in (
            (metrics.input_tokens, usage.input_by_modality),
            (metrics.cache_read_tokens, usage.cache_read_by_modality),
            (metrics.output_tokens, usage.output_by_modality),
        ):
            for modality, count in split:
                child = self._child(family, modality)  # reported zeros still make the series exist
                if count:
                    child.inc(count)

    def response(self, status: str) -> None:
        self._child(self._metrics.responses, status).inc()

    def priced(self, status: str, usd: float | None) -> None:
        self._child(self._metrics.price_lookups, status).inc()
        if usd is not None:
            self._child(self._metrics.cost_usd).inc(usd)

    def latency(self, first_token: float | None, done: float, output_tokens: int | None) -> None:
        """Time to first token and per output token after it, from seconds since the request."""
        if first_token is None:
            return
        self._child(self._metrics.time_to_first_token).observe(first_token)
        if output_tokens is not None and output_tokens > 1:
            self._child(self._metrics.time_per_output_token).observe((done - first_token) / (output_tokens - 1))

    def turn_latency(self, turn_end: str, seconds: float) -> None:
        self._child(self._metrics.voice_turn_latency, turn_end).observe(seconds)

    def duration(self, seconds: float, error_type: str) -> None:
        self._child(self._metrics.request_duration, last=error_type).observe(seconds)


class MetricsServer:
    """prometheus_client's HTTP server in a daemon thread, stoppable so `done` can free the port.

    It serves whatever `registry` is now: when the metric families are recreated (a new prefix),
    the same endpoint serves the new ones, without a gap or a rebind.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, host, self)  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        return self._server.server_port

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        """`/metrics?name[]=...`, as prometheus_client serves it."""
        return self.registry.restricted_registry(names)

    def stop(self) -> None:
        # serve_forever looks for a stop request between selects of 0.5 s; shutting the listening
        # socket down wakes its select at once (Linux), so a gateway stops without that wait.
        with contextlib.suppress(OSError):
            self._server.socket.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
