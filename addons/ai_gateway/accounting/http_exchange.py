"""Per-exchange HTTP accounting: the usage items of a JSON body or of an SSE stream as it passes,
and the exchange's latencies."""

from __future__ import annotations

import time

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.items import FirstDelta, Malformed, ResponseDone, SpeechInput, UsageItem
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.limits import Ticket
from ai_gateway.accounting.metrics import ModelLabels
from ai_gateway.accounting.observer import GuardrailBlock, ResponseRecord
from ai_gateway.accounting.usage import CharacterUsage, TokenUsage


class HttpExchange:
    """Meters one request/response on an HTTP route (Completions, Responses, Embeddings, audio, images)."""

    def __init__(
        self,
        accounting: Accounting,
        source: Source,
        operation: str,
        system: str,
        request_model: str | None,
        ticket: Ticket | None = None,
    ) -> None:
        self.accounting = accounting
        self.source = source
        self.operation = operation
        self.system = system
        self.request_model = request_model
        self.started = time.time()
        self.first_token: float | None = None
        self.billed: ResponseDone | None = None
        self.ticket = ticket  # its admission against budgets and limits, settled by its usage
        self.cost: float | None = None
        self.streamed = False  # the body is a stream, read as it passes
        self.stream_finished = False  # the stream reached its end marker (`[DONE]` or a final event)
        self.stream_unread = False  # the stream could not be read on (already counted): nothing more to count
        self.speech: SpeechInput | None = None  # a speech request's input, billed when its audio came

    def apply(self, item: UsageItem) -> None:
        if isinstance(item, FirstDelta):
            if self.first_token is None:
                self.first_token = time.time()
        elif isinstance(item, ResponseDone):
            self.bill(item)
        elif isinstance(item, Malformed):
            self.problem(item)
        elif isinstance(item, SpeechInput):
            self.speech = item

    def bill(self, done: ResponseDone) -> None:
        if self.billed is not None:  # one exchange bills once; a second usage is the upstream's error
            self.problem(Malformed("duplicate_usage", "a second usage in one response"))
            return
        self.billed = done
        if done.usage is None:
            self.accounting.unbilled(self.source, self.labels(), done.status, done.response_id, done.unread or "")
        else:
            self.cost = self.accounting.bill(self.source, self.labels(), done.usage, done.status, ticket=self.ticket)

    def problem(self, problem: Malformed) -> None:
        self.accounting.parse_error(self.source, problem.reason)

    def labels(self) -> ModelLabels:
        response_model = self.billed.response_model if self.billed else None
        return ModelLabels(self.operation, self.system, self.request_model, response_model)

    def finish(self, error_type: str, http_status: int | None = None, guardrail: GuardrailBlock | None = None) -> None:
        """The exchange ended (response complete, or error_type set): latencies and what never came."""
        ended = time.time()
        if self.ticket is not None:
            self.accounting.release(self.ticket)  # nothing, when its usage settled it already
        if self.speech is not None and not error_type:
            self.spoken(self.speech)
        if self.streamed and self.billed is None and not self.stream_unread:
            reason = "missing_usage" if self.stream_finished else "truncated"
            self.problem(Malformed(reason, "the stream ended without usage"))
        if error_type:
            self.accounting.error(self.source, error_type)
        labels = self.labels()
        self.accounting.duration(labels, ended - self.started, error_type)
        if self.streamed and self.first_token is not None:
            usage = self.billed.usage if self.billed else None
            output = usage.output if isinstance(usage, TokenUsage) else None
            self.accounting.latency(labels, self.first_token - self.started, ended - self.started, output)
        if self.accounting.observer.active:
            self.accounting.observer.response_finished(self.record(ended, error_type, http_status, guardrail))

    def record(
        self, ended: float, error_type: str, http_status: int | None, guardrail: GuardrailBlock | None = None
    ) -> ResponseRecord:
        labels, billed, source = self.labels(), self.billed, self.source
        return ResponseRecord(
            source.flow_id, source.route_type, source.client_key, labels.operation, labels.system,
            labels.request_model, labels.response_model, billed and billed.response_id,
            billed.status if billed else error_type or "unbilled", billed and billed.usage, self.cost, ended,
            ended - self.started, None if self.first_token is None else self.first_token - self.started,
            error_type=error_type, http_status=http_status, event="request", guardrail=guardrail,
        )  # fmt: skip

    def spoken(self, speech: SpeechInput) -> None:
        """Speech came back: its characters are billed, as the response when no usage was (audio bodies)."""
        first = self.billed is None
        usage = CharacterUsage(speech.characters)
        self.accounting.bill(
            self.source, self.labels(), usage, "completed" if first else None, ticket=self.ticket if first else None
        )
