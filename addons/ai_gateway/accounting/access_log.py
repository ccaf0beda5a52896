"""The access log: one line per metered HTTP request, per finished WebSocket response, per closed
session, on stdout, where operators read a gateway first (`kubectl logs`).

`text` is for people (`key=value` pairs, greppable); `json` is one object per line for log
shippers. A line is one write, so the lines of `--workers` processes sharing stdout never mix.
Nothing is written per audio frame, and no secret is: the client key is a digest.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from typing import IO, Any

from ai_gateway.accounting.observer import GuardrailBlock, Observer, ResponseRecord, SessionRecord

FORMATS = ("text", "json", "off")

logger = logging.getLogger(__name__)


def response_fields(record: ResponseRecord) -> dict[str, Any]:
    usage = record.usage
    fields = {
        "time": _time(record.end),
        "event": record.event,
        "route": record.route_type,
        "operation": record.operation,
        "client_key": record.client_key,
        "request_model": record.request_model,
        "response_model": record.response_model,
        "response_id": record.response_id,
        "status": record.status,
        "http_status": record.http_status,
        "input_tokens": usage.input if usage else None,
        "cached_tokens": usage.cache_read if usage else None,
        "output_tokens": usage.output if usage else None,
        "cost_usd": _usd(record.cost),
        "duration_s": _seconds(record.duration),
        "ttft_s": _seconds(record.ttft),
        "turn_latency_s": _seconds(record.turn_latency),
        "error_type": record.error_type or None,
        "flow_id": record.flow_id,
    }
    return fields | guardrail_fields(record.guardrail) if record.guardrail else fields


def guardrail_fields(block: GuardrailBlock) -> dict[str, Any]:
    """Where a guard blocked: only on lines it did (a blocked response, a session with a block)."""
    return {"guardrail": block.guard, "guardrail_phase": block.phase, "guardrail_action": block.action}


def session_fields(record: SessionRecord) -> dict[str, Any]:
    fields = {
        "time": _time(record.end),
        "event": "session",
        "route": record.route_type,
        "client_key": record.client_key,
        "request_model": record.request_model,
        "response_model": record.response_model,
        "responses": record.responses,
        "input_tokens": record.input,
        "cached_tokens": record.cached,
        "output_tokens": record.output,
        "cost_usd": _usd(record.cost),
        "duration_s": _seconds(record.duration),
        "close_code": record.close_code,
        "closed_by": record.closed_by,
        "errors": record.errors,
        "error_type": record.error_type or None,
        "flow_id": record.flow_id,
    }
    if record.session_seconds is not None:  # a session billed by the second: its time, and how it ended
        fields |= {"session_seconds": record.session_seconds, "close_reason": record.close_reason}
    return fields | guardrail_fields(record.guardrail) if record.guardrail else fields


class _Clock:
    """`2026-12-01T10:57:38.680Z` for a time.time(), as datetime's isoformat(timespec="milliseconds")
    writes it (microseconds rounded half to even first, then truncated), with the part up to the
    second formatted once per second rather than once per line."""

    def __init__(self) -> None:
        self.second = -1.0
        self.prefix = ""

    def __call__(self, epoch: float) -> str:
        fraction, second = math.modf(epoch)
        microseconds = round(fraction * 1e6)
        if microseconds >= 1_000_000:
            second += 1.0
            microseconds -= 1_000_000
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return f"{self.prefix}.{microseconds // 1000:03d}Z"


_time = _Clock()


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 9)  # float sums carry noise below a nano-dollar


_HEAD = frozenset(("time", "event", "route"))
_NEEDS_QUOTES = re.compile(r'[ "=]')


def text_line(fields: dict[str, Any]) -> str:
    """`time event route key=value...`; absent values left out, strings with spaces quoted."""
    pairs = [f"{key}={_text_value(value)}" for key, value in fields.items() if value is not None and key not in _HEAD]
    return f"{fields['time']} {fields['event']} {fields['route']} {' '.join(pairs)}"


def _text_value(value: Any) -> str:
    if type(value) is int:  # most values: token counts, status codes
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if not text or not text.isprintable() or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds this encoder on every call


def json_line(fields: dict[str, Any]) -> str:
    return _json(fields)


class AccessLog(Observer):
    """Writes the lines in the chosen format to stdout (or `out`), flushed line by line."""

    active = True

    def __init__(self, fmt: str, out: IO[str] | None = None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"gateway_access_log: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.format = text_line if fmt == "text" else json_line
        self.out = out or sys.stdout
        self.failed = False

    def response_finished(self, record: ResponseRecord) -> None:
        self.write(response_fields(record))

    def session_ended(self, record: SessionRecord) -> None:
        self.write(session_fields(record))

    def write(self, fields: dict[str, Any]) -> None:
        try:
            self.out.write(self.format(fields) + "\n")
            self.out.flush()
        except (OSError, ValueError) as e:  # a closed or full stdout: said once, never raised into a hook
            if not self.failed:
                logger.error("ai-gateway: cannot write the access log: %s", e)
            self.failed = True
